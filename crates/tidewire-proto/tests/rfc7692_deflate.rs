//! RFC 7692 (permessage-deflate) between a client and a server `Connection`
//! negotiated through `ClientHandshake` / `ServerHandshake`, plus the RFC's
//! byte-literal examples and hand-built compressed fragments.

mod common;

use bytes::Bytes;
use common::*;
use tidewire_proto::deflate::Deflater;
use tidewire_proto::{
    Config, Connection, DeflateConfig, DeflateParams, Event, OpCode, ProtocolError, State, Utf8Text,
};

fn text(s: &str) -> Result<Event, ProtocolError> {
    Ok(Event::Text(Utf8Text::from(s)))
}

fn binary(b: &[u8]) -> Result<Event, ProtocolError> {
    Ok(Event::Binary(Bytes::copy_from_slice(b)))
}

fn json_like(n: usize) -> String {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < n {
        s.push_str(&format!(
            "{{\"id\":{i},\"name\":\"user{i}\",\"active\":{},\"tags\":[\"a\",\"b\"]}},",
            i % 3 == 0
        ));
        i += 1;
    }
    s.truncate(n);
    s
}

fn compress(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Deflater::new(6, 15, false).compress(data, &mut out);
    out
}

/// A client-side connection with default permessage-deflate parameters, as
/// if negotiated (for feeding it the RFC's unmasked server frames).
fn deflate_client() -> Connection {
    Connection::new(
        tidewire_proto::Role::Client,
        Config::default(),
        Some(DeflateParams::default()),
    )
}

fn deflate_server(config: Config) -> Connection {
    Connection::new(
        tidewire_proto::Role::Server,
        config,
        Some(DeflateParams::default()),
    )
}

#[test]
fn rfc7692_5_handshake_negotiates_on_both_sides() {
    let (c, s) = deflate_pair(DeflateConfig::default());
    assert_eq!(c.deflate_params(), Some(DeflateParams::default()));
    assert_eq!(s.deflate_params(), Some(DeflateParams::default()));
    // Only one side configured: nothing is negotiated.
    let with = Config {
        deflate: Some(DeflateConfig::default()),
        ..Config::default()
    };
    let (c, s) = handshake_pair(with.clone(), Config::default());
    assert_eq!((c.deflate_params(), s.deflate_params()), (None, None));
    let (c, s) = handshake_pair(Config::default(), with);
    assert_eq!((c.deflate_params(), s.deflate_params()), (None, None));
}

#[test]
fn rfc7692_6_text_client_to_server_is_compressed() {
    let (mut c, mut s) = deflate_pair(DeflateConfig::default());
    let msg = json_like(4000);
    c.send_text(&msg).unwrap();
    let out = c.pending_output().to_vec();
    assert_eq!(out[0], 0xC1, "FIN + RSV1 + text");
    let frames = parse_frames(&out);
    assert!(frames[0].1.len() < msg.len() / 2, "not compressed");
    assert_eq!(transfer(&mut c, &mut s), [text(&msg)]);
}

#[test]
fn rfc7692_6_binary_server_to_client_is_compressed() {
    let (mut c, mut s) = deflate_pair(DeflateConfig::default());
    let msg: Vec<u8> = json_like(70_000).into_bytes();
    s.send_binary(&msg).unwrap();
    assert_eq!(s.pending_output()[0], 0xC2, "FIN + RSV1 + binary");
    assert!(s.pending_output().len() < msg.len() / 2);
    assert_eq!(transfer(&mut s, &mut c), [binary(&msg)]);
}

#[test]
fn rfc7692_6_many_messages_both_ways_with_context_takeover() {
    let (mut c, mut s) = deflate_pair(DeflateConfig::default());
    for i in 0..20 {
        let msg = json_like(100 + i * 37);
        c.send_text(&msg).unwrap();
        s.send_text(&msg).unwrap();
        c.send_binary(msg.as_bytes()).unwrap();
        assert_eq!(
            transfer(&mut c, &mut s),
            [text(&msg), binary(msg.as_bytes())]
        );
        assert_eq!(transfer(&mut s, &mut c), [text(&msg)]);
    }
}

#[test]
fn rfc7692_6_short_messages_below_the_threshold_are_sent_uncompressed() {
    let (mut c, mut s) = deflate_pair(DeflateConfig::default()); // threshold 32
    let short = "a".repeat(31);
    s.send_text(&short).unwrap();
    let mut expected = vec![0x81, 31];
    expected.extend_from_slice(short.as_bytes());
    assert_eq!(s.pending_output(), &expected[..], "RSV1 clear");
    assert_eq!(transfer(&mut s, &mut c), [text(&short)]);
    let at = "a".repeat(32);
    s.send_text(&at).unwrap();
    assert_eq!(s.pending_output()[0], 0xC1, "compressed at the threshold");
    assert_eq!(transfer(&mut s, &mut c), [text(&at)]);
    c.send_binary(&[9; 31]).unwrap();
    assert_eq!(c.pending_output()[0], 0x82);
    assert_eq!(transfer(&mut c, &mut s), [binary(&[9; 31])]);

    // A custom threshold.
    let (mut c, mut s) = deflate_pair(DeflateConfig {
        threshold: 1000,
        ..DeflateConfig::default()
    });
    let msg = json_like(999);
    c.send_text(&msg).unwrap();
    assert_eq!(c.pending_output()[0], 0x81);
    assert_eq!(transfer(&mut c, &mut s), [text(&msg)]);
    let msg = json_like(1000);
    c.send_text(&msg).unwrap();
    assert_eq!(c.pending_output()[0], 0xC1);
    assert_eq!(transfer(&mut c, &mut s), [text(&msg)]);
}

#[test]
fn rfc7692_6_send_fragment_is_never_compressed() {
    let (mut c, mut s) = deflate_pair(DeflateConfig::default());
    let part = json_like(500);
    s.send_fragment(OpCode::Text, part.as_bytes(), false)
        .unwrap();
    s.send_fragment(OpCode::Continuation, part.as_bytes(), true)
        .unwrap();
    let frames = parse_frames(s.pending_output());
    assert!(frames.iter().all(|(h, _)| !h.rsv1));
    assert_eq!(transfer(&mut s, &mut c), [text(&(part.clone() + &part))]);
}

#[test]
fn rfc7692_7_2_3_1_hello_compressed_single_and_fragmented() {
    let mut c = deflate_client();
    assert_eq!(
        feed(&mut c, b"\xc1\x07\xf2\x48\xcd\xc9\xc9\x07\x00"),
        [text("Hello")]
    );
    // The same, in two fragments, with a ping between them.
    let mut c = deflate_client();
    let mut input = b"\x41\x03\xf2\x48\xcd".to_vec();
    input.extend_from_slice(b"\x89\x01p");
    input.extend_from_slice(b"\x80\x04\xc9\xc9\x07\x00");
    assert_eq!(
        feed(&mut c, &input),
        [Ok(Event::Ping(Bytes::from_static(b"p"))), text("Hello")]
    );
}

#[test]
fn rfc7692_7_2_3_2_context_takeover_example() {
    let mut c = deflate_client();
    let mut input = b"\xc1\x07\xf2\x48\xcd\xc9\xc9\x07\x00".to_vec();
    input.extend_from_slice(b"\xc1\x05\xf2\x00\x11\x00\x00");
    assert_eq!(feed(&mut c, &input), [text("Hello"), text("Hello")]);
}

#[test]
fn rfc7692_7_2_3_3_uncompressed_deflate_block() {
    let mut c = deflate_client();
    assert_eq!(
        feed(&mut c, b"\xc1\x0b\x00\x05\x00\xfa\xffHello\x00"),
        [text("Hello")]
    );
}

#[test]
fn rfc7692_7_2_3_4_deflate_block_with_bfinal_set() {
    let mut c = deflate_client();
    assert_eq!(
        feed(&mut c, b"\xc1\x08\xf3\x48\xcd\xc9\xc9\x07\x00\x00"),
        [text("Hello")]
    );
    // And the stream goes on with the next message.
    assert_eq!(
        feed(&mut c, b"\xc1\x07\xf2\x48\xcd\xc9\xc9\x07\x00"),
        [text("Hello")]
    );
    assert_eq!(c.state(), State::Open);
}

#[test]
fn rfc7692_7_2_3_5_two_deflate_blocks_in_one_message() {
    let mut c = deflate_client();
    assert_eq!(
        feed(
            &mut c,
            b"\xc1\x0d\xf2\x48\x05\x00\x00\x00\xff\xff\xca\xc9\xc9\x07\x00"
        ),
        [text("Hello")]
    );
}

#[test]
fn rfc7692_7_2_3_6_empty_compressed_message() {
    let mut c = deflate_client();
    assert_eq!(feed(&mut c, b"\xc1\x01\x00"), [text("")]);
    let (mut c, mut s) = deflate_pair(DeflateConfig {
        threshold: 0,
        ..DeflateConfig::default()
    });
    c.send_binary(b"").unwrap();
    assert_eq!(c.pending_output()[0], 0xC2);
    assert_eq!(transfer(&mut c, &mut s), [binary(b"")]);
}

#[test]
fn rfc7692_6_1_fragmented_compressed_message_via_raw_frames() {
    let msg = json_like(10_000);
    let compressed = compress(msg.as_bytes());
    let parts: Vec<&[u8]> = compressed.chunks(compressed.len() / 4 + 1).collect();
    assert!(parts.len() >= 3);
    for opcode in [0x01u8, 0x02] {
        let mut input = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let first = i == 0;
            let last = i == parts.len() - 1;
            // RSV1 on the first frame only (RFC 7692 §6.1).
            let b0 = (if last { 0x80 } else { 0 }) | if first { 0x40 | opcode } else { 0 };
            input.extend(masked(b0, part));
            input.extend(masked(0x89, format!("{i}").as_bytes()));
        }
        let mut s = deflate_server(Config::default());
        let events = feed(&mut s, &input);
        let n = parts.len();
        assert_eq!(events.len(), n + 1);
        let message = if opcode == 1 {
            text(&msg)
        } else {
            binary(msg.as_bytes())
        };
        // The message completes with the last fragment, before the last ping.
        assert_eq!(events[n - 1], message);
        for (i, ev) in events.iter().enumerate().filter(|(i, _)| *i != n - 1) {
            let ping = if i < n - 1 { i } else { i - 1 };
            assert_eq!(
                *ev,
                Ok(Event::Ping(Bytes::from(format!("{ping}").into_bytes())))
            );
        }
    }
}

#[test]
fn rfc7692_6_1_rsv1_on_a_continuation_frame_is_1002() {
    let compressed = compress(b"Hello Hello Hello");
    let (a, b) = compressed.split_at(3);
    let mut input = masked(0x41, a);
    input.extend(masked(0xC0, b));
    let mut s = deflate_server(Config::default());
    let err = ProtocolError::ReservedBits(0b100);
    assert_eq!(feed(&mut s, &input), [Err(err.clone())]);
    assert_eq!(
        s.pending_output(),
        b"\x88\x2a\x03\xeareserved bits set in frame header: 0b100"
    );
}

#[test]
fn rfc7692_6_1_rsv1_on_a_control_frame_is_1002() {
    for op in [0xC8u8, 0xC9, 0xCA] {
        let mut s = deflate_server(Config::default());
        assert_eq!(
            feed(&mut s, &masked(op, b"")),
            [Err(ProtocolError::ReservedBits(0b100))]
        );
    }
}

#[test]
fn rfc7692_6_uncompressed_messages_are_still_accepted() {
    let mut s = deflate_server(Config::default());
    let mut input = masked(0x81, b"plain");
    input.extend(masked(0x02, b"pl"));
    input.extend(masked(0x80, b"ain"));
    assert_eq!(feed(&mut s, &input), [text("plain"), binary(b"plain")]);
}

#[test]
fn rfc7692_6_2_corrupt_compressed_data_is_1002() {
    let mut s = deflate_server(Config::default());
    let events = feed(&mut s, &masked(0xC2, &[0xff; 16]));
    assert!(
        matches!(events[..], [Err(ProtocolError::InvalidCompressedData(_))]),
        "{events:?}"
    );
    let out = s.pending_output();
    assert_eq!((out[0], &out[2..4]), (0x88, &b"\x03\xea"[..]), "1002");
    assert_eq!(s.state(), State::Closed);
}

#[test]
fn rfc7692_8_compressed_text_with_invalid_utf8_is_1007() {
    let compressed = compress(b"valid prefix \xff invalid");
    let mut s = deflate_server(Config::default());
    assert_eq!(
        feed(&mut s, &masked(0xC1, &compressed)),
        [Err(ProtocolError::InvalidUtf8)]
    );
    assert_eq!(&s.pending_output()[..4], b"\x88\x2f\x03\xef");
    // Invalid in the first fragment: fails there, before the last one
    // arrives. Level 0 (stored blocks) puts the raw bytes in the first half.
    let mut compressed = Vec::new();
    Deflater::new(0, 15, false).compress(
        &[b"\xc0\xaf".repeat(10), vec![b'x'; 5000]].concat(),
        &mut compressed,
    );
    let (a, _) = compressed.split_at(compressed.len() / 2);
    let mut s = deflate_server(Config::default());
    assert_eq!(
        feed(&mut s, &masked(0x41, a)),
        [Err(ProtocolError::InvalidUtf8)]
    );
}

#[test]
fn rfc7692_7_1_1_server_no_context_takeover_resets_each_message() {
    let msg = json_like(2000);
    // With context takeover, the second copy refers back to the first.
    let (mut c, mut s) = deflate_pair(DeflateConfig::default());
    s.send_text(&msg).unwrap();
    let first = s.take_output();
    s.send_text(&msg).unwrap();
    let second = s.take_output();
    assert!(
        second.len() < first.len() / 4,
        "{} vs {}",
        second.len(),
        first.len()
    );
    assert_eq!(feed(&mut c, &first), [text(&msg)]);
    assert_eq!(feed(&mut c, &second), [text(&msg)]);

    // server_no_context_takeover: identical messages compress identically.
    let (mut c, mut s) = deflate_pair(DeflateConfig {
        server_no_context_takeover: true,
        ..DeflateConfig::default()
    });
    let params = s.deflate_params().unwrap();
    assert!(params.server_no_context_takeover && !params.client_no_context_takeover);
    assert_eq!(c.deflate_params(), Some(params));
    let mut frames = Vec::new();
    for _ in 0..3 {
        s.send_text(&msg).unwrap();
        let out = s.take_output();
        assert_eq!(feed(&mut c, &out), [text(&msg)]);
        frames.push(out);
    }
    assert_eq!(frames[0], frames[1]);
    assert_eq!(frames[1], frames[2]);
    // The client keeps its context: its second copy is small.
    c.send_text(&msg).unwrap();
    let a = c.take_output();
    c.send_text(&msg).unwrap();
    let b = c.take_output();
    assert!(b.len() < a.len() / 4);
    assert_eq!(feed(&mut s, &a), [text(&msg)]);
    assert_eq!(feed(&mut s, &b), [text(&msg)]);
}

#[test]
fn rfc7692_7_1_1_client_no_context_takeover_resets_each_message() {
    let msg = json_like(2000);
    let (mut c, mut s) = deflate_pair(DeflateConfig {
        client_no_context_takeover: true,
        ..DeflateConfig::default()
    });
    let params = c.deflate_params().unwrap();
    assert!(params.client_no_context_takeover && !params.server_no_context_takeover);
    let mut payloads = Vec::new();
    for _ in 0..3 {
        c.send_text(&msg).unwrap();
        let out = c.take_output();
        // Masking keys differ; the unmasked compressed payloads do not.
        payloads.push(parse_frames(&out).remove(0).1);
        assert_eq!(feed(&mut s, &out), [text(&msg)]);
    }
    assert_eq!(payloads[0], payloads[1]);
    assert_eq!(payloads[1], payloads[2]);
    // Both sides resetting, messages interleaved both ways.
    let (mut c, mut s) = deflate_pair(DeflateConfig {
        client_no_context_takeover: true,
        server_no_context_takeover: true,
        ..DeflateConfig::default()
    });
    for i in 0..5 {
        let m = json_like(300 + i * 100);
        c.send_text(&m).unwrap();
        s.send_binary(m.as_bytes()).unwrap();
        assert_eq!(transfer(&mut c, &mut s), [text(&m)]);
        assert_eq!(transfer(&mut s, &mut c), [binary(m.as_bytes())]);
    }
}

#[test]
fn rfc7692_7_1_2_max_window_bits_variants_round_trip() {
    for (client_bits, server_bits) in [(Some(8), Some(8)), (Some(9), Some(12)), (None, Some(10))] {
        let (mut c, mut s) = deflate_pair(DeflateConfig {
            client_max_window_bits: client_bits,
            server_max_window_bits: server_bits,
            ..DeflateConfig::default()
        });
        let p = c.deflate_params().unwrap();
        assert_eq!(Some(p.server_max_window_bits), server_bits);
        if let Some(bits) = client_bits {
            assert_eq!(p.client_max_window_bits, bits);
        }
        for n in [100, 5000, 40_000] {
            let m = json_like(n);
            c.send_text(&m).unwrap();
            s.send_text(&m).unwrap();
            assert_eq!(transfer(&mut c, &mut s), [text(&m)]);
            assert_eq!(transfer(&mut s, &mut c), [text(&m)]);
        }
    }
}

#[test]
fn rfc7692_8_decompression_bomb_is_1009() {
    let limit = 64 << 10;
    let config = Config {
        max_message_size: limit,
        deflate: Some(DeflateConfig::default()),
        ..Config::default()
    };
    let (mut c, mut s) = handshake_pair(
        Config {
            deflate: Some(DeflateConfig::default()),
            ..Config::default()
        },
        config,
    );
    // 16 MiB of zeros compress to a few KiB: well under the frame limit.
    let bomb = vec![0u8; 16 << 20];
    c.send_binary(&bomb).unwrap();
    assert!(c.pending_output().len() < 100 << 10);
    let events = transfer(&mut c, &mut s);
    let err = ProtocolError::MessageTooBig { limit };
    assert_eq!(events, [Err(err.clone())]);
    assert_eq!(s.failure(), Some(&err));
    assert_eq!(
        s.pending_output(),
        b"\x88\x2a\x03\xf1message exceeds the limit of 65536 bytes"
    );
}

#[test]
fn rfc7692_8_bomb_spread_over_fragments_is_1009() {
    let limit = 100_000;
    let compressed = compress(&vec![b'a'; 1 << 20]);
    let mut s = deflate_server(Config {
        max_message_size: limit,
        ..Config::default()
    });
    let mut events = Vec::new();
    for (i, part) in compressed.chunks(64).enumerate() {
        let b0 = if i == 0 { 0x41 } else { 0x00 };
        events.extend(feed(&mut s, &masked(b0, part)));
        if !events.is_empty() {
            break;
        }
    }
    assert_eq!(events, [Err(ProtocolError::MessageTooBig { limit })]);
    assert_eq!(
        s.pending_output(),
        b"\x88\x2b\x03\xf1message exceeds the limit of 100000 bytes"
    );
}

#[test]
fn rfc7692_8_compressed_message_exactly_at_the_limit_is_accepted() {
    let limit = 50_000;
    let msg = json_like(limit);
    let mut s = deflate_server(Config {
        max_message_size: limit,
        ..Config::default()
    });
    assert_eq!(
        feed(&mut s, &masked(0xC1, &compress(msg.as_bytes()))),
        [text(&msg)]
    );
    let one_more = json_like(limit + 1);
    let mut s = deflate_server(Config {
        max_message_size: limit,
        ..Config::default()
    });
    assert_eq!(
        feed(&mut s, &masked(0xC1, &compress(one_more.as_bytes()))),
        [Err(ProtocolError::MessageTooBig { limit })]
    );
}

#[test]
fn rfc7692_8_unlimited_message_size_with_deflate() {
    // usize::MAX as the message limit means "no limit", not an overflow.
    let config = Config {
        max_message_size: usize::MAX,
        max_frame_size: usize::MAX,
        deflate: Some(DeflateConfig::default()),
        ..Config::default()
    };
    let (mut c, mut s) = handshake_pair(config.clone(), config);
    let msg = json_like(100_000);
    c.send_text(&msg).unwrap();
    s.send_binary(msg.as_bytes()).unwrap();
    assert_eq!(transfer(&mut c, &mut s), [text(&msg)]);
    assert_eq!(transfer(&mut s, &mut c), [binary(msg.as_bytes())]);
}
