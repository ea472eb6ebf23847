//! What a broker hands a node (Redis PUB/SUB messages and stream entries,
//! NATS messages) on arbitrary bytes.
//!
//! Pass rule: no panic, no allocation beyond the input; what decodes
//! encodes back to the same bytes (the envelope has one spelling).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tidewire_hub::engine::wire::{
    decode_event, decode_publication, encode_presence_event, encode_publication,
    encode_publication_event, Event, JOIN, LEAVE,
};

fuzz_target!(|input: &[u8]| {
    let message = bytes::Bytes::copy_from_slice(input);
    match decode_event(&message) {
        Ok(Event::Publication { publication, epoch }) => {
            let envelope = encode_publication(&publication);
            let again = encode_publication_event(publication.offset, &epoch, &envelope);
            let canonical = decode_event(&again).expect("what it wrote reads back");
            assert_eq!(canonical, Event::Publication { publication, epoch });
        }
        Ok(Event::Join(info)) => assert_eq!(encode_presence_event(JOIN, &info), message),
        Ok(Event::Leave(info)) => assert_eq!(encode_presence_event(LEAVE, &info), message),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    if let Ok(publication) = decode_publication(&message, 7) {
        assert_eq!(publication.offset, 7);
        assert_eq!(encode_publication(&publication), message);
    }
});
