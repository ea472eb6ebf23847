//! Property tests: header codec, whole-connection round trips over randomly
//! chunked byte streams (with and without permessage-deflate), the
//! incremental UTF-8 validator against `std`, and the deflate codec.

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use proptest::prelude::*;
use tidewire_proto::deflate::{Deflater, Inflater};
use tidewire_proto::{
    Config, Connection, DeflateConfig, Event, EventRef, FrameHeader, OpCode, ProtocolError,
    Utf8Text, Utf8Validator,
};

// ---- strategies ----------------------------------------------------------------

fn opcode() -> impl Strategy<Value = OpCode> {
    prop_oneof![
        Just(OpCode::Continuation),
        Just(OpCode::Text),
        Just(OpCode::Binary),
        Just(OpCode::Close),
        Just(OpCode::Ping),
        Just(OpCode::Pong),
    ]
}

fn payload_len() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..=130,
        Just(125u64),
        Just(126u64),
        Just(65535u64),
        Just(65536u64),
        0u64..=0xFFFF,
        0u64..(1 << 63),
        Just((1u64 << 63) - 1),
    ]
}

fn header() -> impl Strategy<Value = FrameHeader> {
    (
        any::<(bool, bool, bool, bool)>(),
        opcode(),
        proptest::option::of(any::<[u8; 4]>()),
        payload_len(),
    )
        .prop_map(
            |((fin, rsv1, rsv2, rsv3), opcode, mask, payload_len)| FrameHeader {
                fin,
                rsv1,
                rsv2,
                rsv3,
                opcode,
                mask,
                payload_len,
            },
        )
}

/// Text mixing ASCII and multi-byte characters, so that chunk boundaries
/// fall inside code points.
fn text_string(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            4 => proptest::char::range('a', 'z'),
            1 => Just('é'),
            1 => Just('€'),
            1 => Just('🌍'),
            1 => any::<char>(),
        ],
        0..max,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn data(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Random bytes (incompressible).
        proptest::collection::vec(any::<u8>(), 0..max),
        // Repetitive bytes (compressible).
        (proptest::collection::vec(any::<u8>(), 1..8), 0..max)
            .prop_map(|(unit, n)| { unit.iter().copied().cycle().take(n).collect() }),
    ]
}

#[derive(Debug, Clone)]
enum Msg {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// A text or binary message sent with `send_fragment`, one part per
    /// frame, with a ping after the first part.
    Fragmented(bool, Vec<Vec<u8>>),
}

fn message() -> impl Strategy<Value = Msg> {
    prop_oneof![
        4 => text_string(300).prop_map(Msg::Text),
        4 => data(600).prop_map(Msg::Binary),
        1 => text_string(3000).prop_map(Msg::Text),
        1 => data(70_000).prop_map(Msg::Binary),
        1 => proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Msg::Ping),
        1 => proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Msg::Pong),
        2 => (any::<bool>(), text_string(200), proptest::collection::vec(0usize..200, 1..5))
            .prop_map(|(text, s, cuts)| {
                let bytes = if text { s.into_bytes() } else { s.into_bytes().into_iter().rev().collect() };
                Msg::Fragmented(text, cut(&bytes, &cuts))
            }),
    ]
}

/// Cuts `bytes` at the given offsets (modulo its length), keeping order.
fn cut(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut parts = Vec::new();
    let mut start = 0;
    for p in points {
        parts.push(bytes[start..p].to_vec());
        start = p;
    }
    parts.push(bytes[start..].to_vec());
    parts
}

fn deflate_config() -> impl Strategy<Value = DeflateConfig> {
    (
        0usize..64,
        0u32..=9,
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(8u8..=15),
        proptest::option::of(8u8..=15),
    )
        .prop_map(
            |(threshold, level, snct, cnct, sbits, cbits)| DeflateConfig {
                threshold,
                level,
                server_no_context_takeover: snct,
                client_no_context_takeover: cnct,
                server_max_window_bits: sbits,
                client_max_window_bits: cbits,
            },
        )
}

// ---- helpers -------------------------------------------------------------------

/// Queues `msgs` on `from` and returns the events the peer must see.
fn send_all(from: &mut Connection, msgs: &[Msg]) -> Vec<Event> {
    let mut expected = Vec::new();
    for m in msgs {
        match m {
            Msg::Text(s) => {
                from.send_text(s).unwrap();
                expected.push(Event::Text(Utf8Text::from(s.as_str())));
            }
            Msg::Binary(b) => {
                from.send_binary(b).unwrap();
                expected.push(Event::Binary(Bytes::copy_from_slice(b)));
            }
            Msg::Ping(p) => {
                from.send_ping(p).unwrap();
                expected.push(Event::Ping(Bytes::copy_from_slice(p)));
            }
            Msg::Pong(p) => {
                from.send_pong(p).unwrap();
                expected.push(Event::Pong(Bytes::copy_from_slice(p)));
            }
            Msg::Fragmented(text, parts) => {
                let first = if *text { OpCode::Text } else { OpCode::Binary };
                for (i, part) in parts.iter().enumerate() {
                    let op = if i == 0 { first } else { OpCode::Continuation };
                    from.send_fragment(op, part, i == parts.len() - 1).unwrap();
                    if i == 0 {
                        from.send_ping(b"mid").unwrap();
                        expected.push(Event::Ping(Bytes::from_static(b"mid")));
                    }
                }
                let whole = parts.concat();
                expected.push(if *text {
                    Event::Text(Utf8Text::try_from(whole).unwrap())
                } else {
                    Event::Binary(Bytes::from(whole))
                });
            }
        }
    }
    expected
}

/// Delivers `bytes` to `to` in chunks of the given sizes (cycled).
fn deliver_chunked(
    to: &mut Connection,
    bytes: &[u8],
    chunks: &[usize],
) -> Vec<Result<Event, ProtocolError>> {
    let mut events = Vec::new();
    let mut rest = bytes;
    let mut sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap()).clamp(1, rest.len());
        // Alternate between the two ways of handing over input.
        if n.is_multiple_of(2) {
            to.receive_data(&rest[..n]);
        } else {
            to.input_buffer().extend_from_slice(&rest[..n]);
        }
        rest = &rest[n..];
        events.extend(drain(to));
    }
    events
}

fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(
        prop_oneof![1usize..8, 1usize..200, 1usize..5000, Just(usize::MAX)],
        1..10,
    )
}

fn round_trip(
    client: &mut Connection,
    server: &mut Connection,
    to_server: &[Msg],
    to_client: &[Msg],
    chunks: &[usize],
) -> Result<(), TestCaseError> {
    let expected = send_all(client, to_server);
    let bytes = client.take_output();
    let events = deliver_chunked(server, &bytes, chunks);
    prop_assert_eq!(events, expected.into_iter().map(Ok).collect::<Vec<_>>());
    // The server answered each ping with a pong carrying the same payload.
    let pongs = server.take_output();
    let events = deliver_chunked(client, &pongs, chunks);
    prop_assert_eq!(events, pongs_for(to_server));

    let expected = send_all(server, to_client);
    let bytes = server.take_output();
    let events = deliver_chunked(client, &bytes, chunks);
    prop_assert_eq!(events, expected.into_iter().map(Ok).collect::<Vec<_>>());
    let pongs = client.take_output();
    let events = deliver_chunked(server, &pongs, chunks);
    prop_assert_eq!(events, pongs_for(to_client));
    Ok(())
}

fn pongs_for(msgs: &[Msg]) -> Vec<Result<Event, ProtocolError>> {
    msgs.iter()
        .filter_map(|m| match m {
            Msg::Ping(p) => Some(Ok(Event::Pong(Bytes::copy_from_slice(p)))),
            Msg::Fragmented(..) => Some(Ok(Event::Pong(Bytes::from_static(b"mid")))),
            _ => None,
        })
        .collect()
}

/// One frame of a semi-valid stream: mostly well-formed, sometimes with a
/// reserved bit or opcode, a missing mask, a bad close code or bad UTF-8.
fn wire_frame() -> impl Strategy<Value = Vec<u8>> {
    let b0 = prop_oneof![
        8 => (any::<bool>(), prop_oneof![Just(0u8), Just(1), Just(2), Just(8), Just(9), Just(10)])
            .prop_map(|(fin, op)| if fin || op == 0 { 0x80 | op } else { op }),
        1 => any::<u8>(),
    ];
    let payload = prop_oneof![
        4 => text_string(40).prop_map(String::into_bytes),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
        1 => (prop_oneof![Just(1000u16), Just(1005), Just(4000)], text_string(10))
            .prop_map(|(code, r)| [&code.to_be_bytes()[..], r.as_bytes()].concat()),
    ];
    (
        b0,
        payload,
        prop_oneof![9 => Just(true), 1 => Just(false)],
        any::<[u8; 4]>(),
    )
        .prop_map(|(b0, payload, masked, key)| frame(b0, &payload, masked.then_some(key)))
}

/// Everything a server shows for `stream` delivered in `chunks`.
fn server_outcome(stream: &[u8], chunks: &[usize]) -> (Vec<Result<Event, ProtocolError>>, Vec<u8>) {
    let mut s = server_with(Config {
        max_frame_size: 64,
        max_message_size: 100,
        ..Config::default()
    });
    let events = deliver_chunked(&mut s, stream, chunks);
    (events, s.take_output().to_vec())
}

/// The same as [`server_outcome`], each chunk handed over with
/// `receive_in_place` (events borrowed, copied here to compare).
fn server_outcome_in_place(
    stream: &[u8],
    chunks: &[usize],
) -> (Vec<Result<Event, ProtocolError>>, Vec<u8>) {
    let mut s = server_with(Config {
        max_frame_size: 64,
        max_message_size: 100,
        ..Config::default()
    });
    let mut events = Vec::new();
    let mut rest = stream;
    let mut sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap()).clamp(1, rest.len());
        let mut chunk = rest[..n].to_vec();
        rest = &rest[n..];
        let fed = s.receive_in_place(&mut chunk, |_, event| {
            events.push(Ok(match event {
                EventRef::Text(text) => Event::Text(Utf8Text::from(text)),
                EventRef::Binary(data) => Event::Binary(Bytes::copy_from_slice(data)),
                EventRef::Ping(data) => Event::Ping(Bytes::copy_from_slice(data)),
                EventRef::Pong(data) => Event::Pong(Bytes::copy_from_slice(data)),
                EventRef::Close(frame) => Event::Close(frame.cloned()),
            }))
        });
        if let Err(e) = fed {
            events.push(Err(e));
        }
    }
    (events, s.take_output().to_vec())
}

// ---- properties ----------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn frame_header_encode_decode_round_trip(h in header(), trailing in proptest::collection::vec(any::<u8>(), 0..4)) {
        let mut out = BytesMut::new();
        h.encode(&mut out);
        prop_assert_eq!(out.len(), h.encoded_len());
        let encoded_len = out.len();
        // Every strict prefix asks for more bytes.
        for cut in 0..encoded_len {
            prop_assert_eq!(FrameHeader::decode(&out[..cut]), Ok(None));
        }
        // Trailing payload bytes do not disturb decoding.
        out.extend_from_slice(&trailing);
        prop_assert_eq!(FrameHeader::decode(&out), Ok(Some((h, encoded_len))));
    }

    #[test]
    fn frame_header_decode_never_misreads(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
        // Whatever decodes re-encodes to the same bytes, unless the length
        // used a longer form than needed.
        if let Ok(Some((h, len))) = FrameHeader::decode(&bytes) {
            let mut out = BytesMut::new();
            h.encode(&mut out);
            let minimal = h.encoded_len() == len;
            prop_assert!(len <= bytes.len());
            if minimal {
                prop_assert_eq!(&out[..], &bytes[..len]);
            } else {
                prop_assert_eq!(out[0], bytes[0]);
            }
        }
    }

    #[test]
    fn utf8_validator_agrees_with_std(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            text_string(40).prop_map(String::into_bytes),
            (text_string(40), 0usize..200, any::<u8>()).prop_map(|(s, at, b)| {
                let mut v = s.into_bytes();
                let at = at % (v.len() + 1);
                v.insert(at, b);
                v
            }),
            (text_string(40), 0usize..200).prop_map(|(s, at)| {
                // Truncate, possibly inside a code point.
                let v = s.into_bytes();
                let at = at % (v.len() + 1);
                v[..at].to_vec()
            }),
        ],
        cuts in proptest::collection::vec(0usize..100, 0..6),
    ) {
        let expected = std::str::from_utf8(&bytes).is_ok();
        let mut v = Utf8Validator::new();
        let mut ok = true;
        for part in cut(&bytes, &cuts) {
            if v.feed(&part).is_err() {
                ok = false;
                break;
            }
        }
        if ok {
            ok = v.finish().is_ok();
        }
        prop_assert_eq!(ok, expected, "{:?} cut at {:?}", bytes, cuts);
        // Fail fast: when feeding fails, the bytes fed so far already have an
        // error that no continuation can repair.
        let mut v = Utf8Validator::new();
        let mut fed = Vec::new();
        for part in cut(&bytes, &cuts) {
            fed.extend_from_slice(&part);
            if v.feed(&part).is_err() {
                let e = std::str::from_utf8(&fed).unwrap_err();
                prop_assert!(e.error_len().is_some(), "failed early on {:?}", fed);
                break;
            }
        }
    }

    #[test]
    fn inflater_limit_is_exact(msg in data(5000).prop_filter("non-empty", |m| !m.is_empty())) {
        let mut wire = Vec::new();
        Deflater::new(6, 15, false).compress(&msg, &mut wire);
        let mut out = Vec::new();
        let mut i = Inflater::new(false);
        let limit = msg.len() - 1;
        let r = i.inflate(&wire, &mut out, limit).and_then(|_| i.finish_message(&mut out, limit));
        prop_assert_eq!(r, Err(ProtocolError::MessageTooBig { limit }));
        // Memory stays bounded by the limit, not by what the input expands to.
        prop_assert!(out.capacity() <= 2 * (limit + 1 + 16 * 1024 + wire.len()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn deflater_inflater_round_trip(
        msgs in proptest::collection::vec(data(12_000), 1..4),
        level in 0u32..=9,
        bits in 8u8..=15,
        no_context in any::<bool>(),
        cuts in proptest::collection::vec(0usize..5000, 0..4),
    ) {
        let mut d = Deflater::new(level, bits, no_context);
        let mut i = Inflater::new(no_context);
        for msg in &msgs {
            let mut wire = Vec::new();
            d.compress(msg, &mut wire);
            prop_assert!(!wire.ends_with(&[0, 0, 0xff, 0xff]));
            let mut out = Vec::new();
            // The compressed message split across frames.
            for part in cut(&wire, &cuts) {
                i.inflate(&part, &mut out, msg.len()).unwrap();
            }
            i.finish_message(&mut out, msg.len()).unwrap();
            prop_assert_eq!(&out, msg);
        }
    }


    #[test]
    fn connection_outcome_does_not_depend_on_chunking(
        frames in proptest::collection::vec(wire_frame(), 1..12),
        chunks in chunk_sizes(),
    ) {
        let stream = frames.concat();
        let whole = server_outcome(&stream, &[usize::MAX]);
        prop_assert_eq!(&whole, &server_outcome(&stream, &chunks));
        prop_assert_eq!(&whole, &server_outcome(&stream, &[1]));
        // Parsing in place changes nothing either, however the bytes come.
        prop_assert_eq!(&whole, &server_outcome_in_place(&stream, &[usize::MAX]));
        prop_assert_eq!(&whole, &server_outcome_in_place(&stream, &chunks));
        prop_assert_eq!(&whole, &server_outcome_in_place(&stream, &[1]));
    }

    #[test]
    fn connection_round_trip_in_random_chunks(
        to_server in proptest::collection::vec(message(), 0..8),
        to_client in proptest::collection::vec(message(), 0..8),
        chunks in chunk_sizes(),
    ) {
        let mut client = client();
        let mut server = server();
        round_trip(&mut client, &mut server, &to_server, &to_client, &chunks)?;
    }

    #[test]
    fn connection_round_trip_with_deflate_in_random_chunks(
        to_server in proptest::collection::vec(message(), 0..8),
        to_client in proptest::collection::vec(message(), 0..8),
        chunks in chunk_sizes(),
        deflate in deflate_config(),
    ) {
        let config = Config { deflate: Some(deflate), ..Config::default() };
        let (mut client, mut server) = handshake_pair(config.clone(), config);
        prop_assert!(client.deflate_params().is_some());
        prop_assert!(server.deflate_params().is_some());
        round_trip(&mut client, &mut server, &to_server, &to_client, &chunks)?;
        // Twice, so that context takeover carries over between batches.
        round_trip(&mut client, &mut server, &to_server, &to_client, &chunks)?;
    }
}
