//! Arbitrary bytes into a `Connection` (server or client role, with or
//! without permessage-deflate, small limits), delivered in chunks.
//!
//! Input: `[flags, limits, stream...]`.
//! flags bit 0: client role; bit 1: deflate negotiated; bits 2/3: server/client
//! no_context_takeover; bits 4-7: chunk size selector.
//! limits: low nibble -> max_frame_size = 2^n, high nibble -> max_message_size = 2^n.
//!
//! Pass rule: no panic, memory bounded by the limits, errors reported once
//! with the connection closed, and the same outcome whether the stream
//! arrives at once or in chunks (1 byte when the selector is 0), and
//! whether it is parsed through the buffer or in place.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tidewire_proto::{
    Config, Connection, DeflateParams, Event, EventRef, ProtocolError, Role, State,
};

/// Everything observable from one run: events and errors in order, and (for
/// a server, whose frames are not masked with random keys) the bytes written.
type Outcome = (Vec<Result<Event, ProtocolError>>, Vec<u8>);

fuzz_target!(|data: &[u8]| {
    let [flags, limits, stream @ ..] = data else {
        return;
    };
    let chunk = match flags >> 4 {
        0 => usize::MAX,
        n => (n as usize).pow(2),
    };
    let whole = run(*flags, *limits, stream, usize::MAX);
    // Chunking must not change what is parsed: the parser is incremental,
    // so events, errors and replies are the same however the bytes arrive.
    let chunked = run(
        *flags,
        *limits,
        stream,
        if chunk == usize::MAX { 1 } else { chunk },
    );
    assert_eq!(whole, chunked, "outcome depends on chunking");
    // Parsing in place (receive_in_place: events borrowed from the bytes
    // read) must not change it either, at once or chunked.
    assert_eq!(
        whole,
        run_in_place(*flags, *limits, stream, usize::MAX),
        "outcome depends on parsing in place"
    );
    assert_eq!(
        whole,
        run_in_place(*flags, *limits, stream, if chunk == usize::MAX { 1 } else { chunk }),
        "outcome depends on parsing in place, chunked"
    );
});

/// As `run`, with each piece handed over by `receive_in_place`.
fn run_in_place(flags: u8, limits: u8, stream: &[u8], chunk: usize) -> Outcome {
    let (mut conn, max_message_size) = connection(flags, limits);
    let role = conn.role();
    let mut events = Vec::new();
    let mut written = Vec::new();
    for piece in stream.chunks(chunk.min(stream.len().max(1))) {
        let mut piece = piece.to_vec();
        let fed = conn.receive_in_place(&mut piece, |conn, event| {
            let event = match event {
                EventRef::Text(text) => {
                    assert!(text.len() <= max_message_size);
                    let _ = conn.send_text(text);
                    Event::Text(text.into())
                }
                EventRef::Binary(bytes) => {
                    assert!(bytes.len() <= max_message_size);
                    let _ = conn.send_binary(bytes);
                    Event::Binary(bytes.to_vec().into())
                }
                EventRef::Ping(p) => Event::Ping(p.to_vec().into()),
                EventRef::Pong(p) => Event::Pong(p.to_vec().into()),
                EventRef::Close(frame) => Event::Close(frame.cloned()),
            };
            events.push(Ok(event));
        });
        if let Err(err) = fed {
            assert_eq!(conn.failure(), Some(&err));
            assert_eq!(conn.state(), State::Closed);
            events.push(Err(err));
        }
        if role == Role::Server {
            written.extend_from_slice(conn.pending_output());
        }
        let n = conn.pending_output().len();
        conn.consume_output(n);
    }
    (events, written)
}

/// The connection `flags` and `limits` describe, and its message limit.
fn connection(flags: u8, limits: u8) -> (Connection, usize) {
    let role = if flags & 1 != 0 {
        Role::Client
    } else {
        Role::Server
    };
    let deflate = (flags & 2 != 0).then(|| DeflateParams {
        server_no_context_takeover: flags & 4 != 0,
        client_no_context_takeover: flags & 8 != 0,
        ..DeflateParams::default()
    });
    let max_message_size = 1usize << (limits >> 4);
    let config = Config {
        max_frame_size: 1usize << (limits & 0x0F),
        max_message_size,
        ..Config::default()
    };
    (Connection::new(role, config, deflate), max_message_size)
}

fn run(flags: u8, limits: u8, stream: &[u8], chunk: usize) -> Outcome {
    let (mut conn, max_message_size) = connection(flags, limits);
    let role = conn.role();
    let max_frame_size = conn.config().max_frame_size;
    let mut events = Vec::new();
    let mut written = Vec::new();
    let mut failed = false;
    for piece in stream.chunks(chunk.min(stream.len().max(1))) {
        conn.receive_data(piece);
        loop {
            match conn.next_event() {
                Ok(Some(event)) => {
                    assert!(!failed, "event after failure");
                    match &event {
                        Event::Text(text) => {
                            assert!(text.len() <= max_message_size);
                            assert!(std::str::from_utf8(text.as_bytes()).is_ok());
                            let _ = conn.send_text(text);
                        }
                        Event::Binary(bytes) => {
                            assert!(bytes.len() <= max_message_size);
                            let _ = conn.send_binary(bytes);
                        }
                        Event::Ping(p) | Event::Pong(p) => assert!(p.len() <= 125),
                        Event::Close(_) => {
                            assert!(conn.close_received());
                            assert_eq!(conn.state(), State::Closed);
                        }
                    }
                    events.push(Ok(event));
                }
                Ok(None) => break,
                Err(err) => {
                    assert!(!failed, "error reported twice");
                    failed = true;
                    assert_eq!(conn.failure(), Some(&err));
                    assert_eq!(conn.state(), State::Closed);
                    assert!(conn.close_sent());
                    assert!(conn.receiving_done());
                    let _ = err.close_code();
                    events.push(Err(err));
                    break;
                }
            }
        }
        // What stays buffered is at most one frame (and a partial header).
        let frame_bound = max_frame_size.max(125) + 14 + piece.len();
        assert!(
            conn.input_buffer().len() <= frame_bound,
            "{} buffered, bound {}",
            conn.input_buffer().len(),
            frame_bound
        );
        // Write out what was queued, as an I/O layer would.
        if role == Role::Server {
            written.extend_from_slice(conn.pending_output());
        }
        let n = conn.pending_output().len();
        conn.consume_output(n);
    }
    if failed {
        assert_eq!(conn.next_event(), Ok(None));
    }
    (events, written)
}
