//! What the peers share: their one flag, and the length field of a frame.

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
