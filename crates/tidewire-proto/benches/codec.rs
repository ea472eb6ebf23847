//! Codec micro-benchmarks: frame header parsing, masking, UTF-8 validation,
//! permessage-deflate, and the full server-side parse of a masked text frame.
//!
//! Run with `cargo bench -p tidewire-proto --bench codec`. Every group reports
//! throughput in bytes per second of input processed.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tidewire_proto::deflate::{Deflater, Inflater};
use tidewire_proto::mask::{apply_mask, apply_mask_bytewise};
use tidewire_proto::{Config, Connection, Event, FrameHeader, OpCode, Role, Utf8Validator};

const KIB: usize = 1024;
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// JSON-like text of exactly `n` bytes (ASCII); `seed` varies the content.
fn json_like(n: usize, seed: usize) -> String {
    let mut s = String::with_capacity(n + 128);
    let mut i = seed * 7919;
    s.push('[');
    while s.len() < n {
        s.push_str(&format!(
            "{{\"id\":{i},\"user\":\"user{}\",\"score\":{}.{},\"active\":{},\"tags\":[\"t{}\",\"t{}\"]}},",
            i % 977,
            (i * 31) % 1000,
            i % 10,
            i.is_multiple_of(3),
            i % 13,
            i % 7
        ));
        i += 1;
    }
    s.truncate(n);
    s
}

/// Valid UTF-8 of exactly `n` bytes mixing ASCII with 2-, 3- and 4-byte
/// sequences (about half the bytes are non-ASCII).
fn mixed_text(n: usize) -> String {
    let pattern = "Hello, κόσμε! Grüße – 你好世界 🌍 ok; ";
    let mut s = String::with_capacity(n + pattern.len());
    'outer: loop {
        for c in pattern.chars() {
            if s.len() + c.len_utf8() > n {
                break 'outer;
            }
            s.push(c);
        }
    }
    while s.len() < n {
        s.push('.');
    }
    s
}

fn label(n: usize) -> String {
    if n >= KIB {
        format!("{}KiB", n / KIB)
    } else {
        format!("{n}B")
    }
}

fn masked_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        fin: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: Some(KEY),
        payload_len: payload.len() as u64,
    };
    let mut out = BytesMut::new();
    header.encode(&mut out);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], KEY, 0);
    out.to_vec()
}

fn frame_header(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_header_parse");
    let cases: [(&str, u64); 3] = [("7bit", 100), ("16bit", 1000), ("64bit", 1 << 20)];
    for (name, len) in cases {
        let header = FrameHeader {
            fin: true,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode: OpCode::Binary,
            mask: Some(KEY),
            payload_len: len,
        };
        let mut bytes = BytesMut::new();
        header.encode(&mut bytes);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &bytes[..], |b, bytes| {
            b.iter(|| FrameHeader::decode(black_box(bytes)).unwrap().unwrap())
        });
    }
    group.finish();
}

fn masking(c: &mut Criterion) {
    let mut group = c.benchmark_group("mask");
    for size in [16, KIB, 64 * KIB] {
        let mut data: Vec<u8> = (0..size).map(|i| i as u8).collect();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("apply_mask", label(size)), |b| {
            b.iter(|| apply_mask(black_box(&mut data), black_box(KEY), 0))
        });
        group.bench_function(BenchmarkId::new("apply_mask_bytewise", label(size)), |b| {
            b.iter(|| apply_mask_bytewise(black_box(&mut data), black_box(KEY), 0))
        });
    }
    group.finish();
}

fn utf8(c: &mut Criterion) {
    let mut group = c.benchmark_group("utf8");
    for size in [KIB, 64 * KIB] {
        let inputs = [("ascii", json_like(size, 0)), ("mixed", mixed_text(size))];
        for (kind, text) in inputs {
            let bytes = text.into_bytes();
            assert_eq!(bytes.len(), size);
            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(
                BenchmarkId::new(format!("validator_{kind}"), label(size)),
                |b| {
                    b.iter(|| {
                        let mut v = Utf8Validator::new();
                        v.feed(black_box(&bytes)).unwrap();
                        v.finish().unwrap();
                    })
                },
            );
            group.bench_function(
                BenchmarkId::new(format!("std_from_utf8_{kind}"), label(size)),
                |b| b.iter(|| std::str::from_utf8(black_box(&bytes)).unwrap().len()),
            );
        }
    }
    group.finish();
}

/// Distinct JSON-like messages, compressed in turn on one context (context
/// takeover, the default), as a stream of messages on one connection is.
const MESSAGES: usize = 16;

fn deflate(c: &mut Criterion) {
    let mut group = c.benchmark_group("deflate");
    for size in [KIB, 64 * KIB] {
        let messages: Vec<Vec<u8>> = (0..MESSAGES)
            .map(|i| json_like(size, i).into_bytes())
            .collect();
        group.throughput(Throughput::Bytes(size as u64));

        let mut deflater = Deflater::new(6, 15, false);
        let mut out = Vec::with_capacity(2 * size);
        let mut next = 0;
        group.bench_function(BenchmarkId::new("compress", label(size)), |b| {
            b.iter(|| {
                out.clear();
                deflater.compress(black_box(&messages[next % MESSAGES]), &mut out);
                next += 1;
                out.len()
            })
        });

        // The same sequence compressed once; inflated in the same order on
        // one context, it decodes identically on every round.
        let mut d = Deflater::new(6, 15, false);
        let compressed: Vec<Vec<u8>> = messages
            .iter()
            .map(|m| {
                let mut w = Vec::new();
                d.compress(m, &mut w);
                w
            })
            .collect();
        let mut inflater = Inflater::new(false);
        for _ in 0..2 {
            for (m, w) in messages.iter().zip(&compressed) {
                let mut out = Vec::new();
                inflater.inflate(w, &mut out, usize::MAX).unwrap();
                inflater.finish_message(&mut out, usize::MAX).unwrap();
                assert_eq!(&out, m);
            }
        }
        let mut out = Vec::with_capacity(size + 64);
        let mut next = 0;
        group.bench_function(BenchmarkId::new("inflate", label(size)), |b| {
            b.iter(|| {
                out.clear();
                let w = &compressed[next % MESSAGES];
                inflater
                    .inflate(black_box(w), &mut out, usize::MAX)
                    .unwrap();
                inflater.finish_message(&mut out, usize::MAX).unwrap();
                next += 1;
                out.len()
            })
        });
    }
    group.finish();
}

fn connection(c: &mut Criterion) {
    let mut group = c.benchmark_group("server_parse_masked_text");
    for size in [KIB, 64 * KIB] {
        let frame = masked_frame(OpCode::Text, json_like(size, 1).as_bytes());
        let mut conn = Connection::new(Role::Server, Config::default(), None);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::from_parameter(label(size)), |b| {
            b.iter(|| {
                conn.receive_data(black_box(&frame));
                match conn.next_event() {
                    Ok(Some(Event::Text(t))) => t.len(),
                    other => panic!("unexpected {other:?}"),
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, frame_header, masking, utf8, deflate, connection);
criterion_main!(benches);
