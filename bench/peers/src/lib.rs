//! What the peers share: their one flag, the handshake and the frame header.

/// The value of `--port P` (or `--port=P`) on the command line; exits with
/// a usage message when it is missing or not a port number.
pub fn port_arg() -> u16 {
    let args: Vec<String> = std::env::args().collect();
    let name = args.first().map(String::as_str).unwrap_or("echo");
    let mut port = None;
    let mut i = 1;
    while i < args.len() {
        if let Some(value) = args[i].strip_prefix("--port=") {
            port = value.parse().ok();
        } else if args[i] == "--port" {
            port = args.get(i + 1).and_then(|v| v.parse().ok());
            i += 1;
        } else {
            port = None;
            break;
        }
        i += 1;
    }
    match port {
        Some(port) => port,
        None => {
            eprintln!("usage: {name} --port PORT   (binds 127.0.0.1:PORT)");
            std::process::exit(2);
        }
    }
}

/// Appends a frame's second byte and extended length for a payload of
/// `len` bytes (RFC 6455 §5.2); `mask_bit` is 0x80 for a masked frame.
pub fn push_length(out: &mut Vec<u8>, mask_bit: u8, len: usize) {
    match len {
        0..=125 => out.push(mask_bit | len as u8),
        126..=0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// The key suffix of RFC 6455 §1.3, hashed with the client's key.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The value of the `Sec-WebSocket-Key` header of a request head.
pub fn websocket_key(head: &[u8]) -> Option<&[u8]> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = line.split_at(colon);
        name.eq_ignore_ascii_case(b"sec-websocket-key")
            .then(|| value[1..].trim_ascii())
    })
}

/// The 101 response that accepts a request with `Sec-WebSocket-Key: key`.
pub fn switching_protocols(key: &[u8]) -> String {
    use base64::Engine;
    use sha1::{Digest, Sha1};
    let accept = base64::engine::general_purpose::STANDARD
        .encode(Sha1::new().chain_update(key).chain_update(GUID).finalize());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
}

/// A frame's header (RFC 6455 §5.2), as [`frame_header`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: u8,
    /// Bytes of the header, masking key included.
    pub header_len: usize,
    /// As the frame says: may be more than the buffer, or than memory.
    pub payload_len: u64,
    /// `None` for an unmasked frame.
    pub mask: Option<[u8; 4]>,
}

/// The header of the frame at the start of `b`, once all of it is there.
pub fn frame_header(b: &[u8]) -> Option<FrameHeader> {
    let (&first, &second) = (b.first()?, b.get(1)?);
    let (ext, payload_len) = match second & 0x7f {
        126 => (2, u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as u64),
        127 => (8, u64::from_be_bytes(b.get(2..10)?.try_into().ok()?)),
        n => (0, n as u64),
    };
    let masked = second & 0x80 != 0;
    let header_len = 2 + ext + if masked { 4 } else { 0 };
    let mask = if masked {
        Some(b.get(2 + ext..header_len)?.try_into().ok()?)
    } else {
        None
    };
    Some(FrameHeader {
        fin: first & 0x80 != 0,
        opcode: first & 0x0f,
        header_len,
        payload_len,
        mask,
    })
}

/// XORs `data` with the masking key in place, eight bytes at a time.
pub fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}
