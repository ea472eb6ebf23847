//! Output queued by reference (`send_*_bytes`) and input handed over
//! whole (`receive_buffer`): the bytes on the wire and the events are the
//! same as with the copying calls.

mod common;

use std::io::IoSlice;

use bytes::{Bytes, BytesMut};
use common::{client, drain, masked, server, unmasked};
use tidewire_proto::{Connection, Event, Utf8Text};

fn payload(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| seed.wrapping_add(i as u8))
        .collect::<Vec<u8>>()
        .into()
}

/// Queues the same messages on `conn`, by reference or by copy.
fn queue(conn: &mut Connection, by_reference: bool) {
    let big = payload(100_000, 1);
    let mid = payload(5_000, 2);
    let text = Utf8Text::try_from(Bytes::from("é".repeat(3000))).unwrap();
    if by_reference {
        conn.send_binary_bytes(big).unwrap();
        conn.send_text("small").unwrap();
        conn.send_text_bytes(text).unwrap();
        conn.send_binary_bytes(mid).unwrap();
        conn.send_binary_bytes(Bytes::from_static(b"tiny")).unwrap();
    } else {
        conn.send_binary(&big).unwrap();
        conn.send_text("small").unwrap();
        conn.send_text(text.as_str()).unwrap();
        conn.send_binary(&mid).unwrap();
        conn.send_binary(b"tiny").unwrap();
    }
}

#[test]
fn by_reference_output_is_the_same_bytes_in_several_chunks() {
    let (mut shared, mut copied) = (server(), server());
    queue(&mut shared, true);
    queue(&mut copied, false);
    let expected = copied.take_output();
    assert_eq!(shared.pending_output_len(), expected.len());
    let mut slices = [IoSlice::new(&[]); 16];
    let n = shared.pending_output_slices(&mut slices);
    assert!(n >= 4, "headers and large payloads in separate chunks: {n}");
    let joined: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
    assert_eq!(joined, &expected[..]);

    // Consumed in steps that straddle chunk boundaries.
    let mut written = Vec::new();
    while shared.has_pending_output() {
        let chunk = shared.pending_output();
        let step = chunk.len().min(7_777);
        written.extend_from_slice(&chunk[..step]);
        shared.consume_output(step);
    }
    assert_eq!(written, &expected[..]);
    assert_eq!(shared.pending_output_len(), 0);
}

#[test]
fn partial_consumption_across_slices_then_take_output() {
    let (mut shared, mut copied) = (server(), server());
    queue(&mut shared, true);
    queue(&mut copied, false);
    let expected = copied.take_output();
    // A vectored write that stops in the middle of the third slice.
    let mut slices = [IoSlice::new(&[]); 16];
    shared.pending_output_slices(&mut slices);
    let cut = slices[0].len() + slices[1].len() + 3;
    shared.consume_output(cut);
    assert_eq!(shared.take_output(), &expected[cut..]);
    assert!(!shared.has_pending_output());
}

#[test]
fn a_client_masks_a_copy_and_the_peer_reads_every_message() {
    let mut c = client();
    let data = payload(70_000, 9);
    c.send_binary_bytes(data.clone()).unwrap();
    let wire = c.take_output();
    // Masked on the wire (the caller's bytes are untouched).
    assert_ne!(&wire[wire.len() - 16..], &data[data.len() - 16..]);
    let mut s = server();
    s.receive_data(&wire);
    let events = drain(&mut s);
    assert!(matches!(&events[..], [Ok(Event::Binary(b))] if *b == data));
}

#[test]
fn receive_buffer_takes_a_buffer_whole_or_appends_to_a_partial_frame() {
    let mut s = server();
    let first = masked(0x82, &payload(40_000, 3));
    let second = masked(0x81, b"hello");
    let mut wire = first.clone();
    wire.extend_from_slice(&second);
    // Split inside the first frame: the rest arrives as a whole buffer.
    s.receive_data(&wire[..1000]);
    assert!(drain(&mut s).is_empty());
    s.receive_buffer(BytesMut::from(&wire[1000..]));
    let events = drain(&mut s);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(matches!(&events[0], Ok(Event::Binary(b)) if b.len() == 40_000));
    assert!(matches!(&events[1], Ok(Event::Text(t)) if t.as_str() == "hello"));
    // Nothing buffered: the buffer becomes the input as is.
    s.receive_buffer(BytesMut::from(&masked(0x89, b"ping")[..]));
    assert!(matches!(&drain(&mut s)[..], [Ok(Event::Ping(p))] if &p[..] == b"ping"));
    assert_eq!(
        s.take_output(),
        &unmasked(0x8A, b"ping")[..],
        "the pong answers the ping"
    );
}
