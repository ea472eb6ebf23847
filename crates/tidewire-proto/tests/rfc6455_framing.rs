//! RFC 6455 §5 (framing), driven through `Connection` with byte-literal
//! frames: opcodes, fragmentation, masking direction, reserved bits and
//! opcodes, control frame rules, size limits and UTF-8 validation.

mod common;

use bytes::Bytes;
use common::*;
use tidewire_proto::{Config, Connection, Event, ProtocolError, Role, State, Utf8Text};

fn text(s: &str) -> Result<Event, ProtocolError> {
    Ok(Event::Text(Utf8Text::from(s)))
}

fn binary(b: &[u8]) -> Result<Event, ProtocolError> {
    Ok(Event::Binary(Bytes::copy_from_slice(b)))
}

/// Asserts the connection failed with `err` and queued exactly `close`.
fn assert_failed(conn: &Connection, err: &ProtocolError, close: &[u8]) {
    assert_eq!(conn.failure(), Some(err));
    assert_eq!(conn.state(), State::Closed);
    assert_eq!(conn.pending_output(), close);
    assert!(conn.close_sent());
    assert!(conn.receiving_done());
}

// ---- §5.6 / §5.7: every opcode ----------------------------------------------

#[test]
fn rfc6455_5_7_masked_hello_from_the_rfc() {
    let mut s = server();
    let events = feed(&mut s, b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58");
    assert_eq!(events, [text("Hello")]);
    assert!(!s.has_pending_output());
    assert_eq!(s.state(), State::Open);
}

#[test]
fn rfc6455_5_7_unmasked_hello_to_a_client() {
    let mut c = client();
    assert_eq!(feed(&mut c, b"\x81\x05Hello"), [text("Hello")]);
    assert!(!c.has_pending_output());
}

#[test]
fn rfc6455_5_6_every_data_and_control_opcode_server_side() {
    let mut s = server();
    let mut input = Vec::new();
    input.extend(masked(0x81, b"text"));
    input.extend(masked(0x82, b"\x00\x01\xff"));
    input.extend(masked(0x01, b"frag"));
    input.extend(masked(0x80, b"mented"));
    input.extend(masked(0x89, b"ping"));
    input.extend(masked(0x8A, b"pong"));
    input.extend(masked(0x88, b"\x03\xe8done"));
    let events = feed(&mut s, &input);
    assert_eq!(
        events,
        [
            text("text"),
            binary(b"\x00\x01\xff"),
            text("fragmented"),
            Ok(Event::Ping(Bytes::from_static(b"ping"))),
            Ok(Event::Pong(Bytes::from_static(b"pong"))),
            Ok(Event::Close(Some(tidewire_proto::CloseFrame::new(
                1000, "done"
            )))),
        ]
    );
    // The pong answering the ping, then the echoed close code.
    assert_eq!(s.pending_output(), b"\x8a\x04ping\x88\x02\x03\xe8");
    assert_eq!(s.state(), State::Closed);
}

#[test]
fn rfc6455_5_6_every_data_and_control_opcode_client_side() {
    let mut c = client();
    let mut input = Vec::new();
    input.extend(unmasked(0x81, b"text"));
    input.extend(unmasked(0x82, b"\x00\x01\xff"));
    input.extend(unmasked(0x02, b"bin"));
    input.extend(unmasked(0x00, b"ary "));
    input.extend(unmasked(0x80, b"parts"));
    input.extend(unmasked(0x89, b"ping"));
    input.extend(unmasked(0x8A, b""));
    input.extend(unmasked(0x88, b""));
    let events = feed(&mut c, &input);
    assert_eq!(
        events,
        [
            text("text"),
            binary(b"\x00\x01\xff"),
            binary(b"binary parts"),
            Ok(Event::Ping(Bytes::from_static(b"ping"))),
            Ok(Event::Pong(Bytes::new())),
            Ok(Event::Close(None)),
        ]
    );
    // A client masks its pong and its close reply (empty: no code received).
    let frames = take_frames(&mut c);
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0].0.opcode, tidewire_proto::OpCode::Pong);
    assert!(frames[0].0.mask.is_some());
    assert_eq!(frames[0].1, b"ping");
    assert_eq!(frames[1].0.opcode, tidewire_proto::OpCode::Close);
    assert!(frames[1].0.mask.is_some());
    assert_eq!(frames[1].1, b"");
}

#[test]
fn rfc6455_5_2_lengths_7_16_and_64_bit() {
    for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70_000] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut s = server();
        assert_eq!(feed(&mut s, &masked(0x82, &payload)), [binary(&payload)]);
        let mut c = client();
        assert_eq!(feed(&mut c, &unmasked(0x82, &payload)), [binary(&payload)]);
    }
    // A 64-bit length form for a short payload is accepted (not minimal, but valid).
    let mut c = client();
    let events = feed(&mut c, b"\x82\x7f\x00\x00\x00\x00\x00\x00\x00\x03abc");
    assert_eq!(events, [binary(b"abc")]);
}

/// A fragmented text message with a ping between its fragments, then a
/// binary message; and the events it gives.
fn fragments_with_a_ping() -> (Vec<u8>, [Result<Event, ProtocolError>; 3]) {
    let mut input = Vec::new();
    input.extend(masked(0x01, "κό".as_bytes()));
    input.extend(masked(0x89, b"hi"));
    input.extend(masked(0x80, "σμε".as_bytes()));
    input.extend(masked(0x82, &[7u8; 300]));
    let events = [
        Ok(Event::Ping(Bytes::from_static(b"hi"))),
        text("κόσμε"),
        binary(&[7u8; 300]),
    ];
    (input, events)
}

/// Feeds `input` one byte at a time, releasing the idle state before each
/// byte when asked (as the I/O layer does before every read).
fn feed_bytewise(
    s: &mut Connection,
    input: &[u8],
    release_between: bool,
) -> Vec<Result<Event, ProtocolError>> {
    let mut events = Vec::new();
    for b in input {
        if release_between {
            s.release_idle_buffers();
        }
        events.extend(feed(s, std::slice::from_ref(b)));
    }
    events
}

#[test]
fn rfc6455_5_2_frames_delivered_one_byte_at_a_time() {
    let (input, expected) = fragments_with_a_ping();
    let mut s = server();
    let events = feed_bytewise(&mut s, &input, false);
    assert_eq!(events, expected);
    assert_eq!(s.pending_output(), b"\x8a\x02hi");
}

/// The I/O layer gives back the in-flight state (buffers, the frame and
/// message being assembled) before every read when it is all empty; a
/// frame split across reads, a fragmented message and pending output must
/// survive that.
#[test]
fn releasing_idle_state_between_reads_loses_nothing() {
    let (input, expected) = fragments_with_a_ping();
    let mut s = server();
    let events = feed_bytewise(&mut s, &input, true);
    s.release_idle_buffers();
    assert_eq!(events, expected);
    assert_eq!(s.pending_output(), b"\x8a\x02hi");
    s.consume_output(4);
    s.release_idle_buffers();
    assert!(!s.has_pending_output());
    assert_eq!((s.input_len(), s.bytes_wanted()), (0, 0));
    // Idle again: the next message is parsed as usual.
    assert_eq!(feed(&mut s, &masked(0x81, b"again")), [text("again")]);
}

/// An event loop lends one connection's written-out buffers to the next
/// connection it reads: nothing leaks from one to the other, and buffers
/// in use are never taken.
#[test]
fn idle_buffers_move_between_connections_only_when_empty() {
    let mut a = server();
    let mut b = server();
    assert!(a.take_idle_buffers().is_none(), "none before any traffic");
    a.send_binary(b"first").unwrap();
    assert!(a.take_idle_buffers().is_none(), "output waiting");
    assert_eq!(a.pending_output(), b"\x82\x05first");
    a.consume_output(3);
    assert!(a.take_idle_buffers().is_none(), "output partly written");
    a.consume_output(4);
    let buffers = a.take_idle_buffers().expect("all written");
    assert!(!a.has_buffers());
    // A frame cut off at the end of a read keeps its connection's buffers.
    let half = masked(0x82, b"split");
    assert!(feed(&mut b, &half[..4]).is_empty());
    let buffers = b.give_buffers(buffers).expect("b has its own");
    assert!(b.take_idle_buffers().is_none(), "a frame half received");
    assert_eq!(feed(&mut b, &half[4..]), [binary(b"split")]);
    // On a connection without any, they carry no byte of the last one.
    let mut c = server();
    assert!(c.give_buffers(buffers).is_none());
    assert!(c.has_buffers() && !c.has_pending_output());
    assert_eq!(feed(&mut c, &masked(0x81, b"third")), [text("third")]);
    c.send_text("reply").unwrap();
    assert_eq!(c.pending_output(), b"\x81\x05reply");
    // The first connection gets new ones of its own when it sends again.
    a.send_text("again").unwrap();
    assert_eq!(a.pending_output(), b"\x81\x05again");
}

/// A buffer a burst grew large goes back to the allocator rather than into
/// a pool of spares.
#[test]
fn idle_buffers_grown_large_are_not_handed_out() {
    let mut s = server();
    s.send_binary(&vec![1u8; 200 << 10]).unwrap();
    let n = s.pending_output_len();
    s.consume_output(n);
    assert!(s.take_idle_buffers().is_none());
    assert!(!s.has_buffers(), "released instead");
}

// ---- §5.4: fragmentation ---------------------------------------------------

#[test]
fn rfc6455_5_4_control_frames_interleaved_in_fragments() {
    let mut s = server();
    let mut input = Vec::new();
    input.extend(masked(0x01, b"Hel"));
    input.extend(masked(0x89, b"p1"));
    input.extend(masked(0x00, b"l"));
    input.extend(masked(0x8A, b"unsolicited"));
    input.extend(masked(0x89, b""));
    input.extend(masked(0x80, b"o"));
    let events = feed(&mut s, &input);
    assert_eq!(
        events,
        [
            Ok(Event::Ping(Bytes::from_static(b"p1"))),
            Ok(Event::Pong(Bytes::from_static(b"unsolicited"))),
            Ok(Event::Ping(Bytes::new())),
            text("Hello"),
        ]
    );
    assert_eq!(s.pending_output(), b"\x8a\x02p1\x8a\x00");
}

#[test]
fn rfc6455_5_4_close_interleaved_in_fragments_ends_the_message() {
    let mut s = server();
    let mut input = masked(0x02, b"never finished");
    input.extend(masked(0x88, b"\x03\xe9"));
    let events = feed(&mut s, &input);
    assert_eq!(
        events,
        [Ok(Event::Close(Some(tidewire_proto::CloseFrame::new(
            1001, ""
        ))))]
    );
    assert_eq!(s.pending_output(), b"\x88\x02\x03\xe9");
}

#[test]
fn rfc6455_5_4_empty_fragments() {
    let mut s = server();
    let mut input = Vec::new();
    input.extend(masked(0x01, b""));
    input.extend(masked(0x00, b""));
    input.extend(masked(0x80, b"x"));
    input.extend(masked(0x02, b""));
    input.extend(masked(0x80, b""));
    assert_eq!(feed(&mut s, &input), [text("x"), binary(b"")]);
}

#[test]
fn rfc6455_5_4_continuation_without_a_message_is_1002() {
    let mut s = server();
    let err = ProtocolError::UnexpectedContinuation;
    assert_eq!(feed(&mut s, &masked(0x80, b"x")), [Err(err.clone())]);
    assert_failed(
        &s,
        &err,
        b"\x88\x32\x03\xeacontinuation frame without a message to continue",
    );
}

#[test]
fn rfc6455_5_4_new_message_inside_a_fragmented_one_is_1002() {
    let mut s = server();
    let mut input = masked(0x01, b"a");
    input.extend(masked(0x81, b"b"));
    let err = ProtocolError::ExpectedContinuation;
    assert_eq!(feed(&mut s, &input), [Err(err.clone())]);
    assert_failed(
        &s,
        &err,
        b"\x88\x3a\x03\xeanew data frame while a fragmented message is in progress",
    );
}

// ---- §5.2: reserved bits and opcodes ----------------------------------------

#[test]
fn rfc6455_5_2_reserved_bits_without_extension_are_1002() {
    let cases: [(u8, u8, &[u8]); 3] = [
        (
            0xC1,
            0b100,
            b"\x88\x2a\x03\xeareserved bits set in frame header: 0b100",
        ),
        (
            0xA1,
            0b010,
            b"\x88\x2a\x03\xeareserved bits set in frame header: 0b010",
        ),
        (
            0x91,
            0b001,
            b"\x88\x2a\x03\xeareserved bits set in frame header: 0b001",
        ),
    ];
    for (b0, bits, close) in cases {
        let mut s = server();
        let err = ProtocolError::ReservedBits(bits);
        assert_eq!(feed(&mut s, &masked(b0, b"x")), [Err(err.clone())]);
        assert_failed(&s, &err, close);
        // The error is reported once; afterwards nothing more is parsed.
        assert_eq!(feed(&mut s, &masked(0x81, b"x")), []);
    }
}

#[test]
fn rfc6455_5_2_reserved_opcodes_are_1002() {
    for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        let mut s = server();
        let err = ProtocolError::ReservedOpcode(op);
        assert_eq!(feed(&mut s, &masked(0x80 | op, b"")), [Err(err.clone())]);
        let mut close = vec![0x88, 0x15, 0x03, 0xea];
        close.extend_from_slice(format!("reserved opcode {op:#x}").as_bytes());
        assert_failed(&s, &err, &close);
    }
    // The exact bytes for one of them, spelled out.
    let mut s = server();
    feed(&mut s, b"\x83\x80\x00\x00\x00\x00");
    assert_eq!(s.pending_output(), b"\x88\x15\x03\xeareserved opcode 0x3");
    // Client side: the same error, in a masked close frame.
    let mut c = client();
    assert_eq!(
        feed(&mut c, b"\x8b\x00"),
        [Err(ProtocolError::ReservedOpcode(0xB))]
    );
    let frames = take_frames(&mut c);
    assert_eq!(frames.len(), 1);
    assert!(frames[0].0.mask.is_some());
    assert_eq!(frames[0].1, b"\x03\xeareserved opcode 0xb");
}

#[test]
fn rfc6455_5_2_reserved_opcode_inside_a_fragmented_message_is_1002() {
    let mut s = server();
    let mut input = masked(0x01, b"start");
    input.extend(masked(0x83, b""));
    assert_eq!(
        feed(&mut s, &input),
        [Err(ProtocolError::ReservedOpcode(3))]
    );
    assert_eq!(s.pending_output(), b"\x88\x15\x03\xeareserved opcode 0x3");
}

#[test]
fn rfc6455_5_2_length_with_most_significant_bit_is_1002() {
    let mut s = server();
    let events = feed(
        &mut s,
        b"\x82\xff\x80\x00\x00\x00\x00\x00\x00\x00\x01\x02\x03\x04",
    );
    let err = ProtocolError::InvalidLength;
    assert_eq!(events, [Err(err.clone())]);
    assert_failed(
        &s,
        &err,
        b"\x88\x31\x03\xeapayload length has the most significant bit set",
    );
}

// ---- §5.1 / §5.3: masking direction ------------------------------------------

#[test]
fn rfc6455_5_1_unmasked_client_frame_is_1002() {
    let mut s = server();
    let err = ProtocolError::UnmaskedFrame;
    assert_eq!(feed(&mut s, b"\x81\x05Hello"), [Err(err.clone())]);
    assert_failed(&s, &err, b"\x88\x1c\x03\xeaclient frame is not masked");
}

#[test]
fn rfc6455_5_1_unmasked_control_frame_from_a_client_is_1002() {
    let mut s = server();
    assert_eq!(
        feed(&mut s, b"\x89\x00"),
        [Err(ProtocolError::UnmaskedFrame)]
    );
    assert_eq!(
        s.pending_output(),
        b"\x88\x1c\x03\xeaclient frame is not masked"
    );
}

#[test]
fn rfc6455_5_1_masked_server_frame_is_1002() {
    let mut c = client();
    let err = ProtocolError::MaskedFrame;
    assert_eq!(
        feed(&mut c, b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"),
        [Err(err.clone())]
    );
    assert_eq!(c.failure(), Some(&err));
    assert_eq!(c.state(), State::Closed);
    let frames = take_frames(&mut c);
    assert_eq!(frames.len(), 1);
    let (h, payload) = &frames[0];
    assert!(h.fin && h.mask.is_some());
    assert_eq!(h.opcode, tidewire_proto::OpCode::Close);
    assert_eq!(payload, b"\x03\xeaserver frame is masked");
}

#[test]
fn rfc6455_5_3_client_output_is_masked_and_server_output_is_not() {
    let mut s = server();
    s.send_text("Hi").unwrap();
    s.send_binary(b"\x00\x01").unwrap();
    s.send_ping(b"p").unwrap();
    s.send_pong(b"q").unwrap();
    assert_eq!(
        s.pending_output(),
        b"\x81\x02Hi\x82\x02\x00\x01\x89\x01p\x8a\x01q"
    );
    let mut c = client();
    c.send_text("Hi").unwrap();
    let out = c.take_output();
    assert_eq!(&out[..2], b"\x81\x82");
    let frames = parse_frames(&out);
    assert_eq!(frames[0].1, b"Hi");
    // And the server side takes the client's masked bytes.
    let mut s = server();
    assert_eq!(feed(&mut s, &out), [text("Hi")]);
}

// ---- §5.5: control frames ----------------------------------------------------

#[test]
fn rfc6455_5_5_control_frame_longer_than_125_is_1002() {
    for op in [0x88u8, 0x89, 0x8A] {
        let mut s = server();
        let err = ProtocolError::ControlFrameTooLong(126);
        assert_eq!(feed(&mut s, &masked(op, &[b'x'; 126])), [Err(err.clone())]);
        assert_failed(
            &s,
            &err,
            b"\x88\x30\x03\xeacontrol frame payload of 126 bytes exceeds 125",
        );
    }
    // Exactly 125 is fine, and the pong carries all of it.
    let mut s = server();
    let payload = [b'y'; 125];
    assert_eq!(
        feed(&mut s, &masked(0x89, &payload)),
        [Ok(Event::Ping(Bytes::copy_from_slice(&payload)))]
    );
    let mut expected = b"\x8a\x7d".to_vec();
    expected.extend_from_slice(&payload);
    assert_eq!(s.pending_output(), &expected[..]);
}

#[test]
fn rfc6455_5_5_control_frame_too_long_is_caught_from_the_header_alone() {
    // A ping announcing 2^16 bytes: the error comes before any payload.
    let mut s = server();
    assert_eq!(
        feed(
            &mut s,
            b"\x89\xff\x00\x00\x00\x00\x00\x01\x00\x00\x01\x02\x03\x04"
        ),
        [Err(ProtocolError::ControlFrameTooLong(65536))]
    );
}

#[test]
fn rfc6455_5_5_fragmented_control_frame_is_1002() {
    for op in [0x08u8, 0x09, 0x0A] {
        let mut s = server();
        let err = ProtocolError::FragmentedControlFrame;
        assert_eq!(feed(&mut s, &masked(op, b"")), [Err(err.clone())]);
        assert_failed(&s, &err, b"\x88\x1a\x03\xeafragmented control frame");
    }
}

#[test]
fn rfc6455_5_5_2_ping_is_answered_with_the_same_payload() {
    let mut s = server();
    let events = feed(&mut s, &masked(0x89, b"\x00payload\xff"));
    assert_eq!(
        events,
        [Ok(Event::Ping(Bytes::from_static(b"\x00payload\xff")))]
    );
    assert_eq!(s.pending_output(), b"\x8a\x09\x00payload\xff");
    // Client side: masked pong with the same payload.
    let mut c = client();
    feed(&mut c, b"\x89\x03abc");
    let frames = take_frames(&mut c);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].0.opcode, tidewire_proto::OpCode::Pong);
    assert_eq!(frames[0].1, b"abc");
}

#[test]
fn rfc6455_5_5_3_unsolicited_pong_is_accepted_without_reply() {
    let mut s = server();
    assert_eq!(
        feed(&mut s, &masked(0x8A, b"heartbeat")),
        [Ok(Event::Pong(Bytes::from_static(b"heartbeat")))]
    );
    assert!(!s.has_pending_output());
    assert_eq!(s.state(), State::Open);
    // The connection goes on normally.
    assert_eq!(feed(&mut s, &masked(0x81, b"after")), [text("after")]);
}

#[test]
fn rfc6455_5_5_send_side_control_payload_limit() {
    let mut s = server();
    assert_eq!(
        s.send_ping(&[0; 126]),
        Err(tidewire_proto::UsageError::ControlPayloadTooLong(126))
    );
    assert_eq!(
        s.send_pong(&[0; 200]),
        Err(tidewire_proto::UsageError::ControlPayloadTooLong(200))
    );
    assert!(!s.has_pending_output());
    s.send_ping(&[0; 125]).unwrap();
    assert_eq!(s.pending_output().len(), 127);
}

// ---- §10.4: size limits, enforced before buffering ----------------------------

fn limited(frame: usize, message: usize) -> Config {
    Config {
        max_frame_size: frame,
        max_message_size: message,
        ..Config::default()
    }
}

/// Header of a masked binary frame announcing `len` bytes (64-bit form).
fn huge_header(b0: u8, len: u64) -> Vec<u8> {
    let mut h = vec![b0, 0xFF];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&KEY);
    h
}

#[test]
fn rfc6455_10_4_frame_over_max_frame_size_is_1009_from_the_header() {
    let mut s = server_with(limited(1024, 1 << 20));
    let header = huge_header(0x82, 1 << 62);
    s.receive_data(&header);
    let err = ProtocolError::FrameTooBig {
        size: 1 << 62,
        limit: 1024,
    };
    assert_eq!(s.next_event(), Err(err.clone()));
    let mut close = vec![0x88, 0x3e, 0x03, 0xf1];
    close.extend_from_slice(b"frame of 4611686018427387904 bytes exceeds the limit of 1024");
    assert_failed(&s, &err, &close);
    assert!(s.input_buffer().capacity() <= 64, "input buffer grew");
    // Feeding the "payload" afterwards buffers nothing.
    s.receive_data(&[0u8; 4096]);
    assert_eq!(s.next_event(), Ok(None));
    assert!(s.input_buffer().capacity() <= 4096 + 64);
    assert_eq!(s.input_buffer().len(), 0);
}

#[test]
fn rfc6455_10_4_frame_one_byte_over_the_limit_is_1009_and_at_the_limit_is_fine() {
    let mut s = server_with(limited(100, 1000));
    assert_eq!(feed(&mut s, &masked(0x82, &[1; 100])), [binary(&[1; 100])]);
    let header = &masked(0x82, &[1; 101])[..8]; // 2 + 2 (length) + 4 (key)
    assert_eq!(
        feed(&mut s, header),
        [Err(ProtocolError::FrameTooBig {
            size: 101,
            limit: 100
        })]
    );
    assert_eq!(&s.pending_output()[..4], b"\x88\x2d\x03\xf1");
}

#[test]
fn rfc6455_10_4_message_over_max_message_size_is_1009_from_the_header() {
    // The frame limit is not the obstacle here: the message limit is.
    let mut s = server_with(limited(usize::MAX, 4096));
    s.receive_data(&huge_header(0x81, 1 << 62));
    let err = ProtocolError::MessageTooBig { limit: 4096 };
    assert_eq!(s.next_event(), Err(err.clone()));
    let mut close = vec![0x88, 0x29, 0x03, 0xf1];
    close.extend_from_slice(b"message exceeds the limit of 4096 bytes");
    assert_failed(&s, &err, &close);
    assert!(s.input_buffer().capacity() <= 64);
}

#[test]
fn rfc6455_10_4_fragmented_message_over_the_limit_fails_at_the_fragment_header() {
    let mut s = server_with(limited(1000, 2500));
    let mut input = masked(0x02, &[0; 1000]);
    input.extend(masked(0x89, b"still alive"));
    input.extend(masked(0x00, &[0; 1000]));
    assert_eq!(
        feed(&mut s, &input),
        [Ok(Event::Ping(Bytes::from_static(b"still alive")))]
    );
    // Only the header of the third fragment: 2000 + 1000 > 2500.
    let third = masked(0x80, &[0; 1000]);
    assert_eq!(
        feed(&mut s, &third[..8]),
        [Err(ProtocolError::MessageTooBig { limit: 2500 })]
    );
    assert!(s.input_buffer().capacity() <= 64);
    let frames = parse_frames(s.pending_output());
    assert_eq!(frames.last().unwrap().1[..2], [0x03, 0xf1]);
}

#[test]
fn rfc6455_10_4_control_frames_are_not_subject_to_the_frame_limit() {
    // Control frames are at most 125 bytes, whatever max_frame_size says.
    let mut s = server_with(limited(4, 4));
    assert_eq!(
        feed(&mut s, &masked(0x89, b"longer than four")),
        [Ok(Event::Ping(Bytes::from_static(b"longer than four")))]
    );
}

// ---- §8.1: UTF-8, fail fast -------------------------------------------------

#[test]
fn rfc6455_8_1_invalid_utf8_in_text_is_1007() {
    let mut s = server();
    let err = ProtocolError::InvalidUtf8;
    assert_eq!(feed(&mut s, &masked(0x81, b"ab\xffcd")), [Err(err.clone())]);
    assert_failed(
        &s,
        &err,
        b"\x88\x2f\x03\xefinvalid UTF-8 in text message or close reason",
    );
}

#[test]
fn rfc6455_8_1_invalid_utf8_fails_before_the_rest_of_the_frame_arrives() {
    // A 100-byte text frame of which only the first 6 payload bytes arrived,
    // the third of them invalid.
    let mut payload = b"ab\xffcd".to_vec();
    payload.resize(100, b'x');
    let frame = masked(0x81, &payload);
    let mut s = server();
    assert_eq!(feed(&mut s, &frame[..6 + 2]), []);
    assert_eq!(
        feed(&mut s, &frame[8..6 + 5]),
        [Err(ProtocolError::InvalidUtf8)]
    );
    assert_eq!(&s.pending_output()[..4], b"\x88\x2f\x03\xef");
}

#[test]
fn rfc6455_8_1_invalid_sequence_fails_fast_even_mid_codepoint() {
    // 0xF4 0x90 can never be valid (above U+10FFFF): fail at 0x90, before
    // the sequence's remaining bytes or the frame's rest arrive.
    let mut payload = b"ok \xf4\x90".to_vec();
    payload.resize(50, b'x');
    let frame = masked(0x81, &payload);
    let mut s = server();
    assert_eq!(feed(&mut s, &frame[..6 + 4]), []);
    assert_eq!(
        feed(&mut s, &frame[10..11]),
        [Err(ProtocolError::InvalidUtf8)]
    );
}

#[test]
fn rfc6455_8_1_invalid_utf8_in_a_later_fragment_fails_before_it_completes() {
    let mut s = server();
    assert_eq!(feed(&mut s, &masked(0x01, "valid κ".as_bytes())), []);
    let mut payload = b"more \xc3\x28".to_vec();
    payload.resize(200, b'x');
    let second = masked(0x00, &payload);
    // Header (2 + 2 + 4) and the first 7 payload bytes only.
    assert_eq!(
        feed(&mut s, &second[..8 + 7]),
        [Err(ProtocolError::InvalidUtf8)]
    );
    assert_eq!(&s.pending_output()[..4], b"\x88\x2f\x03\xef");
}

#[test]
fn rfc6455_8_1_codepoint_split_across_fragments_is_valid() {
    let euro = "€".as_bytes(); // e2 82 ac
    let mut s = server();
    let mut input = masked(0x01, &euro[..1]);
    input.extend(masked(0x89, b""));
    input.extend(masked(0x00, &euro[1..2]));
    input.extend(masked(0x80, &euro[2..]));
    assert_eq!(
        feed(&mut s, &input),
        [Ok(Event::Ping(Bytes::new())), text("€")]
    );
}

#[test]
fn rfc6455_8_1_sequence_split_across_fragments_fails_fast_in_the_next_one() {
    let mut s = server();
    assert_eq!(feed(&mut s, &masked(0x01, b"ok \xf4")), []);
    let mut payload = b"\x90".to_vec();
    payload.resize(40, b'x');
    let second = masked(0x80, &payload);
    assert_eq!(
        feed(&mut s, &second[..7]),
        [Err(ProtocolError::InvalidUtf8)]
    );
}

#[test]
fn rfc6455_8_1_text_ending_inside_a_codepoint_is_1007() {
    let mut s = server();
    assert_eq!(
        feed(&mut s, &masked(0x81, b"abc\xe2\x82")),
        [Err(ProtocolError::InvalidUtf8)]
    );
    let mut s = server();
    let mut input = masked(0x01, b"abc\xe2");
    input.extend(masked(0x80, b"\x82"));
    assert_eq!(feed(&mut s, &input), [Err(ProtocolError::InvalidUtf8)]);
}

#[test]
fn rfc6455_8_1_binary_is_not_validated() {
    let mut s = server();
    assert_eq!(
        feed(&mut s, &masked(0x82, b"\xff\xfe\xc0")),
        [binary(b"\xff\xfe\xc0")]
    );
}

#[test]
fn rfc6455_5_2_connection_roles_are_reported() {
    assert_eq!(server().role(), Role::Server);
    assert_eq!(client().role(), Role::Client);
    let c = Connection::new(Role::Client, Config::default(), None);
    assert_eq!(c.bytes_wanted(), 0);
    assert_eq!(c.deflate_params(), None);
}

#[test]
fn rfc6455_5_2_bytes_wanted_tracks_a_partial_frame() {
    let mut s = server();
    let frame = masked(0x82, &[5; 300]);
    assert_eq!(feed(&mut s, &frame[..8 + 100]), []);
    assert_eq!(s.bytes_wanted(), 200);
    assert_eq!(feed(&mut s, &frame[8 + 100..]), [binary(&[5; 300])]);
    assert_eq!(s.bytes_wanted(), 0);
}
