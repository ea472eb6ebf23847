//! `Inflater::inflate` on arbitrary bytes with a small output limit.
//!
//! Input: `[flags, cut, compressed...]`. flags bit 0: no_context_takeover;
//! bits 1-4 select the limit (2^n bytes). The payload is inflated as two
//! frames split at `cut`, finished as a message, then inflated again as a
//! second message on the same context.
//!
//! Pass rule: no panic; the output never passes the limit without an error,
//! and the memory it takes stays bounded by the limit, not the expansion.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tidewire_proto::deflate::Inflater;
use tidewire_proto::ProtocolError;

fuzz_target!(|data: &[u8]| {
    let [flags, cut, payload @ ..] = data else {
        return;
    };
    let no_context = flags & 1 != 0;
    let limit = 1usize << ((flags >> 1) & 0x0F);
    let cut = (*cut as usize).min(payload.len());
    let (a, b) = payload.split_at(cut);
    let mut inflater = Inflater::new(no_context);
    for _ in 0..2 {
        let mut out = Vec::new();
        let result = inflater
            .inflate(a, &mut out, limit)
            .and_then(|()| inflater.inflate(b, &mut out, limit))
            .and_then(|()| inflater.finish_message(&mut out, limit));
        let bound = 2 * (limit + 1 + 16 * 1024 + payload.len());
        assert!(
            out.capacity() <= bound,
            "capacity {} > {bound}",
            out.capacity()
        );
        match result {
            Ok(()) => assert!(out.len() <= limit, "{} > limit {limit}", out.len()),
            Err(ProtocolError::MessageTooBig { limit: l }) => {
                assert_eq!(l, limit);
                return;
            }
            Err(ProtocolError::InvalidCompressedData(_)) => return,
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
});
