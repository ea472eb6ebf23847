//! sink_echo: the generator's ceiling. The least a server can do and still
//! echo: a current-thread tokio runtime, a handshake answered from the one
//! header it needs, then every frame written back unmasked with its opcode
//! (a ping as a pong) by reading its header only: no UTF-8 check, no
//! message assembly, no limits, one write per read. Not a WebSocket server
//! for anything else.

use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

fn main() -> std::io::Result<()> {
    let port = tidewire_bench_peers::port_arg();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        println!("sink_echo listening on ws://127.0.0.1:{port}/");
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(async move {
                        let _ = serve(stream).await;
                    });
                }
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    })
}

/// The value of the `Sec-WebSocket-Key` header of a request head.
fn websocket_key(head: &[u8]) -> Option<&[u8]> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = line.split_at(colon);
        name.eq_ignore_ascii_case(b"sec-websocket-key")
            .then(|| value[1..].trim_ascii())
    })
}

async fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 256 << 10];
    let mut len = 0;
    // The request head, up to the blank line.
    let head_end = loop {
        if let Some(i) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if len == 8192 {
            return Ok(());
        }
        let n = stream.read(&mut buf[len..8192]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    };
    let Some(key) = websocket_key(&buf[..head_end]) else {
        return stream
            .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            .await;
    };
    let accept = base64::engine::general_purpose::STANDARD
        .encode(Sha1::new().chain_update(key).chain_update(GUID).finalize());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).await?;
    buf.copy_within(head_end..len, 0);
    len -= head_end;

    let mut out = Vec::with_capacity(256 << 10);
    loop {
        // Echo every complete frame in the buffer.
        let mut pos = 0;
        let mut closing = false;
        let mut need = 2;
        while let Some((header_len, payload_len, mask)) = frame_header(&buf[pos..len]) {
            let frame_len = header_len + payload_len;
            if len - pos < frame_len {
                need = frame_len;
                break;
            }
            let opcode = buf[pos] & 0x0f;
            let first = match opcode {
                0x9 => (buf[pos] & 0xf0) | 0xa, // ping: pong
                _ => buf[pos],
            };
            if opcode != 0xa {
                out.push(first);
                tidewire_bench_peers::push_length(&mut out, 0, payload_len);
                unmask_into(&mut out, &buf[pos + header_len..pos + frame_len], mask);
            }
            pos += frame_len;
            if opcode == 0x8 {
                closing = true;
                break;
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if closing {
            return stream.shutdown().await;
        }
        // Keep the partial frame at the front, room for all of it behind.
        buf.copy_within(pos..len, 0);
        len -= pos;
        if need > buf.len() {
            buf.resize(need, 0);
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
}

/// Header length, payload length and masking key of the frame at the
/// start of `b`, once its header is complete.
fn frame_header(b: &[u8]) -> Option<(usize, usize, [u8; 4])> {
    if b.len() < 2 {
        return None;
    }
    let masked = b[1] & 0x80 != 0;
    let (ext, payload_len) = match b[1] & 0x7f {
        126 => (
            2,
            u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as usize,
        ),
        127 => (
            8,
            u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize,
        ),
        n => (0, n as usize),
    };
    let header_len = 2 + ext + if masked { 4 } else { 0 };
    let mask = if masked {
        b.get(2 + ext..header_len)?.try_into().ok()?
    } else {
        [0; 4]
    };
    Some((header_len, payload_len, mask))
}

/// Appends `payload` XORed with the masking key, eight bytes at a time.
fn unmask_into(out: &mut Vec<u8>, payload: &[u8], mask: [u8; 4]) {
    let start = out.len();
    out.extend_from_slice(payload);
    let data = &mut out[start..];
    let word = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes(chunk.try_into().expect("8 bytes")) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}
