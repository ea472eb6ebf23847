//! Helpers shared by the integration tests: byte-literal frame builders and a
//! client/server pair negotiated through the real opening handshake.

#![allow(dead_code)]

use http::HeaderMap;
use tidewire_proto::handshake::{parse_request, parse_response};
use tidewire_proto::{
    ClientHandshake, Config, Connection, DeflateConfig, Event, FrameHeader, ProtocolError, Role,
    ServerHandshake,
};

/// The masking key used by every masked test frame (RFC 6455 §5.7's example).
pub const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Encodes a frame whose first header byte is `b0` (FIN, RSV bits, opcode).
/// `mask`: `Some(key)` for client-to-server frames.
pub fn frame(b0: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut out = vec![b0];
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked frame, as a client sends it.
pub fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
    frame(b0, payload, Some(KEY))
}

/// An unmasked frame, as a server sends it.
pub fn unmasked(b0: u8, payload: &[u8]) -> Vec<u8> {
    frame(b0, payload, None)
}

pub fn server() -> Connection {
    Connection::new(Role::Server, Config::default(), None)
}

pub fn client() -> Connection {
    Connection::new(Role::Client, Config::default(), None)
}

pub fn server_with(config: Config) -> Connection {
    Connection::new(Role::Server, config, None)
}

/// All events until `Ok(None)` or the first error (included).
pub fn drain(conn: &mut Connection) -> Vec<Result<Event, ProtocolError>> {
    let mut out = Vec::new();
    loop {
        match conn.next_event() {
            Ok(Some(ev)) => out.push(Ok(ev)),
            Ok(None) => return out,
            Err(e) => {
                out.push(Err(e));
                return out;
            }
        }
    }
}

/// Feeds `bytes` and returns every event they produce.
pub fn feed(conn: &mut Connection, bytes: &[u8]) -> Vec<Result<Event, ProtocolError>> {
    conn.receive_data(bytes);
    drain(conn)
}

/// Splits a byte stream into frames: (header, unmasked payload).
/// Panics on an incomplete or invalid stream: it is only used on output.
pub fn parse_frames(mut bytes: &[u8]) -> Vec<(FrameHeader, Vec<u8>)> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let (header, len) = FrameHeader::decode(bytes)
            .expect("valid header")
            .expect("complete header");
        let end = len + header.payload_len as usize;
        let mut payload = bytes[len..end].to_vec();
        if let Some(key) = header.mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= key[i % 4];
            }
        }
        frames.push((header, payload));
        bytes = &bytes[end..];
    }
    frames
}

/// Takes the pending output of `conn` as frames.
pub fn take_frames(conn: &mut Connection) -> Vec<(FrameHeader, Vec<u8>)> {
    let out = conn.take_output();
    parse_frames(&out)
}

/// A client and a server connection negotiated through `ClientHandshake` and
/// `ServerHandshake`, each with its own `Config`.
pub fn handshake_pair(client_config: Config, server_config: Config) -> (Connection, Connection) {
    let (client, request) = ClientHandshake::new(
        "ws://localhost:9001/test",
        &HeaderMap::new(),
        &[],
        client_config,
    )
    .expect("client handshake");
    let (req, used) = parse_request(&request, 16 << 10)
        .expect("valid request")
        .expect("complete request");
    assert_eq!(used, request.len());
    let server = ServerHandshake::new(req, server_config).expect("server accepts");
    let (response, server) = server.accept(None, &HeaderMap::new());
    let (resp, used) = parse_response(&response, 16 << 10)
        .expect("valid response")
        .expect("complete response");
    assert_eq!(used, response.len());
    let accepted = client.finish(resp).expect("client accepts");
    (accepted.connection, server)
}

/// A pair with permessage-deflate configured identically on both sides.
pub fn deflate_pair(deflate: DeflateConfig) -> (Connection, Connection) {
    let config = Config {
        deflate: Some(deflate),
        ..Config::default()
    };
    handshake_pair(config.clone(), config)
}

/// Moves all pending output of `from` into `to` and returns `to`'s events.
pub fn transfer(from: &mut Connection, to: &mut Connection) -> Vec<Result<Event, ProtocolError>> {
    let bytes = from.take_output();
    feed(to, &bytes)
}
