//! RFC 6455 §5.5.1, §7 (closing handshake): close codes, close payloads,
//! echo, state transitions on both sides, and what happens after the close.

mod common;

use bytes::Bytes;
use common::*;
use tidewire_proto::{CloseCode, CloseFrame, Event, OpCode, ProtocolError, State, UsageError};

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

const VALID_CODES: &[u16] = &[
    1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999,
];
const INVALID_CODES: &[u16] = &[
    0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
];

#[test]
fn rfc6455_7_4_valid_close_codes_are_accepted_and_echoed() {
    for &code in VALID_CODES {
        let mut s = server();
        let events = feed(&mut s, &masked(0x88, &close_payload(code, b"reason")));
        assert_eq!(
            events,
            [Ok(Event::Close(Some(CloseFrame::new(code, "reason"))))],
            "{code}"
        );
        // Echo: the same code, no reason.
        let [hi, lo] = code.to_be_bytes();
        assert_eq!(s.pending_output(), [0x88, 0x02, hi, lo], "{code}");
        assert_eq!(s.state(), State::Closed);
        assert!(s.close_received() && s.close_sent());
        assert_eq!(s.failure(), None);
    }
}

#[test]
fn rfc6455_7_4_invalid_close_codes_are_1002() {
    for &code in INVALID_CODES {
        let mut s = server();
        let err = ProtocolError::InvalidCloseCode(code);
        assert_eq!(
            feed(&mut s, &masked(0x88, &close_payload(code, b""))),
            [Err(err.clone())],
            "{code}"
        );
        let mut expected = vec![0x88, 0, 0x03, 0xea];
        expected.extend_from_slice(format!("invalid close code {code}").as_bytes());
        expected[1] = (expected.len() - 2) as u8;
        assert_eq!(s.pending_output(), &expected[..], "{code}");
        assert_eq!(s.state(), State::Closed);
        assert_eq!(s.failure(), Some(&err));
    }
    // One spelled out byte for byte: 1005 must never be on the wire.
    let mut s = server();
    feed(&mut s, &masked(0x88, b"\x03\xed"));
    assert_eq!(
        s.pending_output(),
        b"\x88\x19\x03\xeainvalid close code 1005"
    );
}

#[test]
fn rfc6455_5_5_1_close_without_payload_is_echoed_without_code() {
    let mut s = server();
    assert_eq!(feed(&mut s, &masked(0x88, b"")), [Ok(Event::Close(None))]);
    assert_eq!(s.pending_output(), b"\x88\x00");
    assert_eq!(s.state(), State::Closed);
}

#[test]
fn rfc6455_5_5_1_one_byte_close_payload_is_1002() {
    let mut s = server();
    let err = ProtocolError::CloseFrameTooShort;
    assert_eq!(feed(&mut s, &masked(0x88, b"\x03")), [Err(err.clone())]);
    assert_eq!(
        s.pending_output(),
        b"\x88\x21\x03\xeaclose frame payload of one byte"
    );
    assert_eq!(s.failure(), Some(&err));
    assert_eq!(s.state(), State::Closed);
}

#[test]
fn rfc6455_5_5_1_invalid_utf8_close_reason_is_1007() {
    for reason in [&b"\xff"[..], b"ok\xc3", b"\xed\xa0\x80", b"\xc0\xaf"] {
        let mut s = server();
        assert_eq!(
            feed(&mut s, &masked(0x88, &close_payload(1000, reason))),
            [Err(ProtocolError::InvalidUtf8)]
        );
        assert_eq!(
            s.pending_output(),
            b"\x88\x2f\x03\xefinvalid UTF-8 in text message or close reason"
        );
    }
    // A valid multi-byte reason is handed out as is.
    let mut s = server();
    assert_eq!(
        feed(
            &mut s,
            &masked(0x88, &close_payload(4000, "¡adiós!".as_bytes()))
        ),
        [Ok(Event::Close(Some(CloseFrame::new(4000, "¡adiós!"))))]
    );
}

#[test]
fn rfc6455_7_1_peer_initiated_close_server_side() {
    let mut s = server();
    assert_eq!(s.state(), State::Open);
    assert_eq!(
        feed(&mut s, &masked(0x88, b"\x03\xe8bye")),
        [Ok(Event::Close(Some(CloseFrame::new(1000, "bye"))))]
    );
    // Open -> Closed directly: our reply went out with the event.
    assert_eq!(s.state(), State::Closed);
    assert!(s.close_received());
    assert!(s.close_sent());
    assert_eq!(s.take_output(), &b"\x88\x02\x03\xe8"[..]);
    assert!(!s.has_pending_output());
}

#[test]
fn rfc6455_7_1_peer_initiated_close_client_side() {
    let mut c = client();
    assert_eq!(
        feed(&mut c, b"\x88\x02\x03\xe9"),
        [Ok(Event::Close(Some(CloseFrame::new(
            CloseCode::GOING_AWAY,
            ""
        ))))]
    );
    assert_eq!(c.state(), State::Closed);
    let frames = take_frames(&mut c);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].0.opcode, OpCode::Close);
    assert!(frames[0].0.mask.is_some(), "client frames are masked");
    assert_eq!(frames[0].1, b"\x03\xe9");
}

#[test]
fn rfc6455_7_1_we_initiate_close_server_side() {
    let mut s = server();
    s.send_close(Some(CloseFrame::new(CloseCode::NORMAL, "bye")))
        .unwrap();
    assert_eq!(s.state(), State::Closing);
    assert!(s.close_sent() && !s.close_received());
    assert_eq!(s.take_output(), &b"\x88\x05\x03\xe8bye"[..]);
    // Nothing more may be sent, but the peer's messages still arrive.
    assert_eq!(s.send_text("late"), Err(UsageError::Closed));
    let mut input = masked(0x81, b"in flight");
    input.extend(masked(0x89, b"p"));
    input.extend(masked(0x88, b"\x03\xe8"));
    let events = feed(&mut s, &input);
    assert_eq!(
        events,
        [
            Ok(Event::Text("in flight".into())),
            Ok(Event::Ping(Bytes::from_static(b"p"))),
            Ok(Event::Close(Some(CloseFrame::new(1000, "")))),
        ]
    );
    // No pong after our close, and no second close frame.
    assert!(!s.has_pending_output());
    assert_eq!(s.state(), State::Closed);
    assert!(s.close_received());
}

#[test]
fn rfc6455_7_1_we_initiate_close_client_side() {
    let mut c = client();
    c.send_close(Some(CloseFrame::new(4001, "done"))).unwrap();
    assert_eq!(c.state(), State::Closing);
    let frames = take_frames(&mut c);
    assert_eq!(frames.len(), 1);
    assert!(frames[0].0.mask.is_some());
    assert_eq!(frames[0].1, b"\x0f\xa1done");
    assert_eq!(
        feed(&mut c, b"\x88\x06\x0f\xa1done"),
        [Ok(Event::Close(Some(CloseFrame::new(4001, "done"))))]
    );
    assert_eq!(c.state(), State::Closed);
    assert!(!c.has_pending_output());
}

#[test]
fn rfc6455_7_1_close_without_status_when_we_initiate() {
    let mut s = server();
    s.send_close(None).unwrap();
    assert_eq!(s.pending_output(), b"\x88\x00");
    assert_eq!(s.state(), State::Closing);
}

#[test]
fn rfc6455_7_1_send_close_rejects_unsendable_codes_and_long_reasons() {
    let mut s = server();
    for code in [1005u16, 1006, 1015, 999, 5000] {
        assert_eq!(
            s.send_close(Some(CloseFrame::new(code, ""))),
            Err(UsageError::InvalidCloseCode(code))
        );
    }
    let long = "x".repeat(124);
    assert_eq!(
        s.send_close(Some(CloseFrame::new(1000, long.as_str()))),
        Err(UsageError::CloseReasonTooLong(124))
    );
    // Nothing was queued and the state did not move.
    assert!(!s.has_pending_output());
    assert_eq!(s.state(), State::Open);
    let max = "y".repeat(123);
    s.send_close(Some(CloseFrame::new(1000, max.as_str())))
        .unwrap();
    assert_eq!(s.pending_output().len(), 2 + 125);
}

#[test]
fn rfc6455_5_5_1_data_after_close_is_ignored() {
    let mut s = server();
    let mut input = masked(0x88, b"\x03\xe8");
    input.extend(masked(0x81, b"ignored"));
    input.extend(masked(0x89, b"ignored"));
    assert_eq!(
        feed(&mut s, &input),
        [Ok(Event::Close(Some(CloseFrame::new(1000, ""))))]
    );
    assert_eq!(s.pending_output(), b"\x88\x02\x03\xe8");
    // More bytes after the close: no events, no pong, no error, nothing buffered.
    assert_eq!(feed(&mut s, &masked(0x89, b"x")), []);
    assert_eq!(feed(&mut s, b"\xff\xff garbage"), []);
    assert_eq!(s.pending_output(), b"\x88\x02\x03\xe8");
    assert_eq!(s.input_buffer().len(), 0);
    assert_eq!(s.failure(), None);
}

#[test]
fn rfc6455_5_5_1_send_after_close_is_a_usage_error() {
    // After the peer's close (our echo is queued).
    let mut s = server();
    feed(&mut s, &masked(0x88, b""));
    assert_eq!(s.send_text("x"), Err(UsageError::Closed));
    assert_eq!(s.send_binary(b"x"), Err(UsageError::Closed));
    assert_eq!(s.send_ping(b""), Err(UsageError::Closed));
    assert_eq!(s.send_pong(b""), Err(UsageError::Closed));
    assert_eq!(
        s.send_fragment(OpCode::Text, b"x", true),
        Err(UsageError::Closed)
    );
    assert_eq!(s.send_close(None), Err(UsageError::Closed));
    assert_eq!(s.pending_output(), b"\x88\x00");
    // After our own close.
    let mut c = client();
    c.send_close(None).unwrap();
    assert_eq!(c.send_text("x"), Err(UsageError::Closed));
    assert_eq!(c.send_close(None), Err(UsageError::Closed));
    // After a protocol failure.
    let mut s = server();
    feed(&mut s, b"\x81\x00");
    assert_eq!(s.send_binary(b"x"), Err(UsageError::Closed));
    // After the transport ended.
    let mut s = server();
    s.receive_eof();
    assert_eq!(s.state(), State::Closed);
    assert_eq!(s.send_text("x"), Err(UsageError::Closed));
    assert!(!s.has_pending_output());
}

#[test]
fn rfc6455_7_1_7_failure_while_closing_sends_no_second_close() {
    let mut s = server();
    s.send_close(Some(CloseFrame::new(1000, ""))).unwrap();
    s.take_output();
    assert_eq!(
        feed(&mut s, b"\x81\x01x"),
        [Err(ProtocolError::UnmaskedFrame)]
    );
    assert!(!s.has_pending_output());
    assert_eq!(s.state(), State::Closed);
}

#[test]
fn rfc6455_5_5_1_close_split_across_reads() {
    let frame = masked(0x88, b"\x03\xe8split reason");
    let mut s = server();
    let mut events = Vec::new();
    for chunk in frame.chunks(3) {
        events.extend(feed(&mut s, chunk));
    }
    assert_eq!(
        events,
        [Ok(Event::Close(Some(CloseFrame::new(
            1000,
            "split reason"
        ))))]
    );
}

#[test]
fn rfc6455_5_4_fragment_sending_order_is_enforced() {
    let mut s = server();
    assert!(matches!(
        s.send_fragment(OpCode::Continuation, b"x", true),
        Err(UsageError::FragmentOrder(_))
    ));
    s.send_fragment(OpCode::Text, b"He", false).unwrap();
    assert!(matches!(
        s.send_text("no"),
        Err(UsageError::FragmentOrder(_))
    ));
    assert!(matches!(
        s.send_fragment(OpCode::Binary, b"no", true),
        Err(UsageError::FragmentOrder(_))
    ));
    assert!(matches!(
        s.send_fragment(OpCode::Ping, b"", true),
        Err(UsageError::FragmentOrder(_))
    ));
    // Control frames may be interleaved while fragments are being sent.
    s.send_ping(b"!").unwrap();
    s.send_fragment(OpCode::Continuation, b"ll", false).unwrap();
    s.send_fragment(OpCode::Continuation, b"o", true).unwrap();
    assert_eq!(
        s.pending_output(),
        b"\x01\x02He\x89\x01!\x00\x02ll\x80\x01o"
    );
    s.send_text("next").unwrap();
}
