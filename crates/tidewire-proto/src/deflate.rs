//! permessage-deflate (RFC 7692): negotiation and the per-message codec.
//!
//! Negotiation turns `Sec-WebSocket-Extensions` offers into agreed
//! [`DeflateParams`]; [`Deflater`] and [`Inflater`] compress and decompress
//! whole messages with the agreed window sizes and context takeover. zlib
//! (through `flate2` on the `zlib-rs` backend) does the actual work; the
//! compression contexts are created on first use, so a connection that never
//! sends or receives a compressed message never pays for them.
//!
//! Without context takeover a context holds nothing between messages, so
//! it is not kept per connection: it goes back to a per-thread spare (reset)
//! after each message and the next message on this thread, of any
//! connection, takes it. A server of many such connections then holds one
//! context per thread instead of ~300 KiB per active connection, and does
//! not allocate and initialise one per message.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::error::ProtocolError;

/// The extension token.
pub const EXTENSION_NAME: &str = "permessage-deflate";

/// The four bytes a sync flush ends with, stripped on send, restored on
/// receive (RFC 7692 §7.2.1, §7.2.2).
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What this endpoint offers or accepts for permessage-deflate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Messages shorter than this many bytes are sent uncompressed.
    pub threshold: usize,
    /// zlib compression level, 0-9.
    pub level: u32,
    /// Ask that the server reset its compression context after each message.
    pub server_no_context_takeover: bool,
    /// Ask that the client reset its compression context after each message.
    pub client_no_context_takeover: bool,
    /// Limit the server's LZ77 window to 2^n bytes (8-15).
    pub server_max_window_bits: Option<u8>,
    /// Limit the client's LZ77 window to 2^n bytes (8-15).
    pub client_max_window_bits: Option<u8>,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            threshold: 32,
            level: 6,
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: None,
            client_max_window_bits: None,
        }
    }
}

/// Parameters both sides agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server resets its context after every message.
    pub server_no_context_takeover: bool,
    /// The client resets its context after every message.
    pub client_no_context_takeover: bool,
    /// The server's window, 2^n bytes.
    pub server_max_window_bits: u8,
    /// The client's window, 2^n bytes.
    pub client_max_window_bits: u8,
}

impl Default for DeflateParams {
    fn default() -> Self {
        DeflateParams {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        }
    }
}

/// One extension in a `Sec-WebSocket-Extensions` value: a name and its
/// parameters (value `None` for a bare parameter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionOffer {
    /// Extension token, e.g. `permessage-deflate`.
    pub name: String,
    /// Parameters in order of appearance.
    pub params: Vec<(String, Option<String>)>,
}

/// Parses the comma-separated extension list of one or more header values
/// (RFC 6455 §9.1). Quoted parameter values are unquoted.
pub fn parse_extensions<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<ExtensionOffer> {
    let mut offers = Vec::new();
    for value in values {
        for item in split_outside_quotes(value, ',') {
            let mut parts = split_outside_quotes(item, ';').into_iter();
            let name = parts.next().unwrap_or("").trim();
            if name.is_empty() {
                continue;
            }
            let params = parts
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (
                        k.trim().to_ascii_lowercase(),
                        Some(v.trim().trim_matches('"').to_string()),
                    ),
                    None => (p.trim().to_ascii_lowercase(), None),
                })
                .filter(|(k, _)| !k.is_empty())
                .collect();
            offers.push(ExtensionOffer {
                name: name.to_ascii_lowercase(),
                params,
            });
        }
    }
    offers
}

fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn parse_window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.len() > 2 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bits: u8 = value.parse().ok()?;
    (8..=15).contains(&bits).then_some(bits)
}

/// The parameters of one permessage-deflate offer or response, syntax-checked.
#[derive(Debug, Default)]
struct RawParams {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: present without a value.
    client_max_window_bits: Option<Option<u8>>,
}

fn check_params(params: &[(String, Option<String>)]) -> Option<RawParams> {
    let mut raw = RawParams::default();
    let mut seen = [false; 4];
    for (name, value) in params {
        let slot = match name.as_str() {
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => 2,
            "client_max_window_bits" => 3,
            _ => return None,
        };
        if std::mem::replace(&mut seen[slot], true) {
            return None;
        }
        match (slot, value) {
            (0, None) => raw.server_no_context_takeover = true,
            (1, None) => raw.client_no_context_takeover = true,
            (2, Some(v)) => raw.server_max_window_bits = Some(parse_window_bits(v)?),
            (3, None) => raw.client_max_window_bits = Some(None),
            (3, Some(v)) => raw.client_max_window_bits = Some(Some(parse_window_bits(v)?)),
            _ => return None,
        }
    }
    Some(raw)
}

/// Server side: picks the first acceptable permessage-deflate offer.
/// Returns the agreed parameters and the response header value, or `None` to
/// decline (no acceptable offer).
pub fn negotiate_server(
    offers: &[ExtensionOffer],
    config: &DeflateConfig,
) -> Option<(DeflateParams, String)> {
    offers
        .iter()
        .filter(|o| o.name == EXTENSION_NAME)
        .find_map(|offer| {
            let raw = check_params(&offer.params)?;
            let mut params = DeflateParams::default();
            let mut response = String::from(EXTENSION_NAME);
            if raw.server_no_context_takeover || config.server_no_context_takeover {
                params.server_no_context_takeover = true;
                response.push_str("; server_no_context_takeover");
            }
            if raw.client_no_context_takeover || config.client_no_context_takeover {
                params.client_no_context_takeover = true;
                response.push_str("; client_no_context_takeover");
            }
            let server_bits = match (raw.server_max_window_bits, config.server_max_window_bits) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(bits) = server_bits {
                params.server_max_window_bits = bits;
                response.push_str(&format!("; server_max_window_bits={bits}"));
            }
            if let (Some(offered), Some(wanted)) =
                (raw.client_max_window_bits, config.client_max_window_bits)
            {
                let bits = offered.map_or(wanted, |o| o.min(wanted));
                params.client_max_window_bits = bits;
                response.push_str(&format!("; client_max_window_bits={bits}"));
            } else if let Some(Some(offered)) = raw.client_max_window_bits {
                // The client told us it will not use more; nothing to answer.
                params.client_max_window_bits = offered;
            }
            Some((params, response))
        })
}

/// Client side: the `Sec-WebSocket-Extensions` offer for `config`.
pub fn client_offer(config: &DeflateConfig) -> String {
    let mut offer = String::from(EXTENSION_NAME);
    if config.server_no_context_takeover {
        offer.push_str("; server_no_context_takeover");
    }
    if config.client_no_context_takeover {
        offer.push_str("; client_no_context_takeover");
    }
    if let Some(bits) = config.server_max_window_bits {
        offer.push_str(&format!("; server_max_window_bits={bits}"));
    }
    match config.client_max_window_bits {
        Some(bits) => offer.push_str(&format!("; client_max_window_bits={bits}")),
        None => offer.push_str("; client_max_window_bits"),
    }
    offer
}

/// Client side: checks the server's response against what was offered.
/// `Err` names what was wrong; the client must then fail the connection.
pub fn accept_client_response(
    response: &ExtensionOffer,
    config: &DeflateConfig,
) -> Result<DeflateParams, &'static str> {
    let raw = check_params(&response.params).ok_or("invalid permessage-deflate parameters")?;
    let mut params = DeflateParams {
        server_no_context_takeover: raw.server_no_context_takeover,
        client_no_context_takeover: raw.client_no_context_takeover
            || config.client_no_context_takeover,
        ..DeflateParams::default()
    };
    if config.server_no_context_takeover && !raw.server_no_context_takeover {
        return Err("server ignored server_no_context_takeover");
    }
    match (raw.server_max_window_bits, config.server_max_window_bits) {
        (Some(got), Some(asked)) if got > asked => {
            return Err("server_max_window_bits larger than offered")
        }
        (None, Some(_)) => return Err("server ignored server_max_window_bits"),
        (Some(got), _) => params.server_max_window_bits = got,
        (None, None) => {}
    }
    match raw.client_max_window_bits {
        Some(None) => return Err("client_max_window_bits without a value"),
        Some(Some(bits)) => {
            if config
                .client_max_window_bits
                .is_some_and(|asked| bits > asked)
            {
                return Err("client_max_window_bits larger than offered");
            }
            params.client_max_window_bits = bits;
        }
        None => {
            if let Some(bits) = config.client_max_window_bits {
                params.client_max_window_bits = bits;
            }
        }
    }
    Ok(params)
}

thread_local! {
    /// A reset compression context and its (level, window bits).
    static SPARE_DEFLATE: RefCell<Option<(u32, u8, Compress)>> = const { RefCell::new(None) };
    /// A reset decompression context (always a 2^15 window).
    static SPARE_INFLATE: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

fn take_spare_deflate(level: u32, bits: u8) -> Option<Compress> {
    SPARE_DEFLATE.with(|spare| match spare.borrow_mut().take() {
        Some((l, b, compress)) if (l, b) == (level, bits) => Some(compress),
        _ => None,
    })
}

fn return_spare_deflate(level: u32, bits: u8, mut compress: Compress) {
    compress.reset();
    SPARE_DEFLATE.with(|spare| *spare.borrow_mut() = Some((level, bits, compress)));
}

fn take_spare_inflate() -> Option<Decompress> {
    SPARE_INFLATE.with(|spare| spare.borrow_mut().take())
}

fn return_spare_inflate(mut decompress: Decompress) {
    decompress.reset(false);
    SPARE_INFLATE.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.is_none() {
            *spare = Some(decompress);
        }
    });
}

/// Compresses outgoing messages.
pub struct Deflater {
    compress: Option<Compress>,
    level: u32,
    window_bits: u8,
    no_context_takeover: bool,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater")
            .field("active", &self.compress.is_some())
            .field("window_bits", &self.window_bits)
            .field("no_context_takeover", &self.no_context_takeover)
            .finish()
    }
}

impl Deflater {
    /// A compressor with the given window (2^bits) and context rule.
    pub fn new(level: u32, window_bits: u8, no_context_takeover: bool) -> Self {
        Deflater {
            compress: None,
            level: level.min(9),
            // zlib cannot produce raw deflate with a 256-byte window; asking
            // for 9 yields a stream whose distances fit an 8-bit window.
            window_bits: window_bits.clamp(9, 15),
            no_context_takeover,
        }
    }

    /// Compresses one whole message into `out` (appended), without the
    /// trailing `00 00 ff ff`.
    pub fn compress(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let (level, bits) = (self.level, self.window_bits);
        let compress = self.compress.get_or_insert_with(|| {
            take_spare_deflate(level, bits).unwrap_or_else(|| {
                Compress::new_with_window_bits(Compression::new(level), false, bits)
            })
        });
        let start = out.len();
        let mut pos = 0;
        loop {
            out.reserve((data.len() - pos) + (data.len() - pos) / 8 + 64);
            let before = compress.total_in();
            compress
                .compress_vec(&data[pos..], out, FlushCompress::Sync)
                .expect("deflate with a valid configuration cannot fail");
            pos += (compress.total_in() - before) as usize;
            // Done when all input is taken and zlib left spare room (flush complete).
            if pos == data.len() && out.len() < out.capacity() {
                break;
            }
        }
        debug_assert!(out[start..].ends_with(&SYNC_TAIL));
        if out[start..].ends_with(&SYNC_TAIL) {
            out.truncate(out.len() - SYNC_TAIL.len());
        }
        if self.no_context_takeover {
            // Nothing to keep: the context goes back to the thread's spare.
            if let Some(compress) = self.compress.take() {
                return_spare_deflate(level, bits, compress);
            }
        }
    }
}

/// Decompresses incoming messages, bounded by a size limit.
pub struct Inflater {
    decompress: Option<Decompress>,
    no_context_takeover: bool,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("active", &self.decompress.is_some())
            .field("no_context_takeover", &self.no_context_takeover)
            .finish()
    }
}

const INFLATE_CHUNK: usize = 16 * 1024;

impl Inflater {
    /// A decompressor; `no_context_takeover` when the peer resets its context
    /// after every message. The window is always 2^15, which decodes any
    /// window the peer may use.
    pub fn new(no_context_takeover: bool) -> Self {
        Inflater {
            decompress: None,
            no_context_takeover,
        }
    }

    /// Decompresses one frame's worth of a compressed message, appending to
    /// `out`. Fails with [`ProtocolError::MessageTooBig`] as soon as `out`
    /// would grow past `limit` bytes, so a small input cannot expand without
    /// bound.
    pub fn inflate(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        // With context takeover the context is this connection's for good;
        // without, only until the message ends (a spare is taken if free).
        let decompress = self.decompress.get_or_insert_with(|| {
            let spare = if self.no_context_takeover {
                take_spare_inflate()
            } else {
                None
            };
            spare.unwrap_or_else(|| Decompress::new_with_window_bits(false, 15))
        });
        let mut pos = 0;
        loop {
            if out.len() > limit {
                return Err(ProtocolError::MessageTooBig { limit });
            }
            // `out.len() <= limit` here; saturate so that `usize::MAX` means "no limit".
            let room = (limit - out.len())
                .saturating_add(1)
                .min(INFLATE_CHUNK.max(input.len() - pos));
            out.reserve(room);
            let (in_before, out_before) = (decompress.total_in(), decompress.total_out());
            let status = decompress
                .decompress_vec(&input[pos..], out, FlushDecompress::Sync)
                .map_err(|e| ProtocolError::InvalidCompressedData(e.to_string()))?;
            pos += (decompress.total_in() - in_before) as usize;
            let produced = decompress.total_out() - out_before;
            if out.len() > limit {
                return Err(ProtocolError::MessageTooBig { limit });
            }
            if status == Status::StreamEnd {
                // The peer ended its deflate stream (BFINAL): what follows
                // starts a fresh stream. RFC 7692 §7.2.3.4: a sender that
                // flushes with BFINAL appends the first octet of an empty
                // stored block, which the restored tail completes, so the
                // rest of the input is decoded, not rejected.
                decompress.reset(false);
                if pos == input.len() || input[pos..] == SYNC_TAIL {
                    return Ok(());
                }
                continue;
            }
            let output_full = out.len() == out.capacity();
            if pos == input.len() && !output_full {
                return Ok(());
            }
            if produced == 0
                && !output_full
                && pos < input.len()
                && in_before == decompress.total_in()
            {
                return Err(ProtocolError::InvalidCompressedData(
                    "inflate made no progress".into(),
                ));
            }
        }
    }

    /// Ends a message: feeds the stripped sync-flush tail and applies the
    /// context rule.
    pub fn finish_message(&mut self, out: &mut Vec<u8>, limit: usize) -> Result<(), ProtocolError> {
        self.inflate(&SYNC_TAIL, out, limit)?;
        if self.no_context_takeover {
            if let Some(decompress) = self.decompress.take() {
                return_spare_inflate(decompress);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(s: &str) -> Vec<ExtensionOffer> {
        parse_extensions([s])
    }

    fn sample(seed: u8) -> Vec<u8> {
        (0..20_000u32)
            .map(|i| b"tidewire shares contexts "[(i as usize + seed as usize) % 25])
            .collect()
    }

    #[test]
    fn contexts_shared_through_the_thread_spare_keep_messages_apart() {
        // Two connections without context takeover, interleaved on one
        // thread: each message still decodes on its own.
        let (mut a, mut b) = (Deflater::new(6, 15, true), Deflater::new(6, 15, true));
        let (mut ca, mut cb, mut ca2) = (Vec::new(), Vec::new(), Vec::new());
        a.compress(&sample(1), &mut ca);
        b.compress(&sample(2), &mut cb);
        a.compress(&sample(1), &mut ca2);
        // No context taken over: the same message compresses the same way.
        assert_eq!(ca, ca2);
        for (compressed, expected) in [(&ca, sample(1)), (&cb, sample(2))] {
            let mut fresh = Inflater::new(false);
            let mut out = Vec::new();
            fresh.inflate(compressed, &mut out, usize::MAX).unwrap();
            fresh.finish_message(&mut out, usize::MAX).unwrap();
            assert_eq!(out, expected);
        }
        // An inflater mid-message keeps its context while another finishes
        // messages (and returns the spare) in between.
        let (mut x, mut y) = (Inflater::new(true), Inflater::new(true));
        let (mut out_x, half) = (Vec::new(), ca.len() / 2);
        x.inflate(&ca[..half], &mut out_x, usize::MAX).unwrap();
        for _ in 0..2 {
            let mut out_y = Vec::new();
            y.inflate(&cb, &mut out_y, usize::MAX).unwrap();
            y.finish_message(&mut out_y, usize::MAX).unwrap();
            assert_eq!(out_y, sample(2));
        }
        x.inflate(&ca[half..], &mut out_x, usize::MAX).unwrap();
        x.finish_message(&mut out_x, usize::MAX).unwrap();
        assert_eq!(out_x, sample(1));
    }

    #[test]
    fn rfc7692_7_2_3_1_hello_from_the_rfc() {
        // "Hello" compressed, as in RFC 7692 §7.2.3.1.
        let mut inflater = Inflater::new(false);
        let mut out = Vec::new();
        inflater
            .inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], &mut out, 100)
            .unwrap();
        inflater.finish_message(&mut out, 100).unwrap();
        assert_eq!(out, b"Hello");
        // The same message again, with the context taken over (§7.2.3.2).
        let mut out = Vec::new();
        inflater
            .inflate(&[0xf2, 0x00, 0x11, 0x00, 0x00], &mut out, 100)
            .unwrap();
        inflater.finish_message(&mut out, 100).unwrap();
        assert_eq!(out, b"Hello");
    }

    #[test]
    fn round_trip_with_and_without_context_takeover() {
        for no_context in [false, true] {
            for bits in [8, 9, 12, 15] {
                let mut d = Deflater::new(6, bits, no_context);
                let mut i = Inflater::new(no_context);
                for msg in [&b""[..], b"hello hello hello hello", &[7u8; 100_000]] {
                    let mut wire = Vec::new();
                    d.compress(msg, &mut wire);
                    let mut out = Vec::new();
                    i.inflate(&wire, &mut out, 1 << 20).unwrap();
                    i.finish_message(&mut out, 1 << 20).unwrap();
                    assert_eq!(out, msg);
                }
            }
        }
    }

    #[test]
    fn rfc7692_7_2_3_4_bfinal_block_followed_by_empty_stored_block() {
        // "Hello" in a block with BFINAL set, then the 0x00 octet that starts
        // the empty stored block completed by the stripped tail.
        let mut inflater = Inflater::new(false);
        let mut out = Vec::new();
        inflater
            .inflate(
                &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00],
                &mut out,
                100,
            )
            .unwrap();
        inflater.finish_message(&mut out, 100).unwrap();
        assert_eq!(out, b"Hello");
        // The next message decodes on the fresh stream.
        let mut out = Vec::new();
        inflater
            .inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], &mut out, 100)
            .unwrap();
        inflater.finish_message(&mut out, 100).unwrap();
        assert_eq!(out, b"Hello");
        // Garbage after the final block is still an error.
        let mut out = Vec::new();
        let err = Inflater::new(false)
            .inflate(
                &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0xff, 0xff],
                &mut out,
                100,
            )
            .unwrap_err();
        assert!(matches!(err, ProtocolError::InvalidCompressedData(_)));
    }

    #[test]
    fn decompression_bomb_is_cut_at_the_limit() {
        let mut d = Deflater::new(9, 15, false);
        let mut wire = Vec::new();
        d.compress(&vec![0u8; 10 << 20], &mut wire);
        assert!(wire.len() < 20_000);
        let mut out = Vec::new();
        let err = Inflater::new(false)
            .inflate(&wire, &mut out, 1 << 20)
            .unwrap_err();
        assert_eq!(err, ProtocolError::MessageTooBig { limit: 1 << 20 });
        assert!(out.capacity() <= 2 << 20, "capacity {}", out.capacity());
    }

    #[test]
    fn unlimited_size_does_not_overflow() {
        // A limit of usize::MAX (no limit) used to overflow `limit + 1`.
        let mut wire = Vec::new();
        Deflater::new(6, 15, false).compress(b"hello hello hello", &mut wire);
        let mut inflater = Inflater::new(false);
        let mut out = Vec::new();
        inflater.inflate(&wire, &mut out, usize::MAX).unwrap();
        inflater.finish_message(&mut out, usize::MAX).unwrap();
        assert_eq!(out, b"hello hello hello");
    }

    #[test]
    fn garbage_is_an_error() {
        let mut out = Vec::new();
        let err = Inflater::new(false)
            .inflate(&[0xff; 16], &mut out, 1000)
            .unwrap_err();
        assert!(matches!(err, ProtocolError::InvalidCompressedData(_)));
    }

    #[test]
    fn rfc7692_7_1_server_negotiation() {
        let cfg = DeflateConfig::default();
        let (p, resp) =
            negotiate_server(&offer("permessage-deflate; client_max_window_bits"), &cfg).unwrap();
        assert_eq!(resp, "permessage-deflate");
        assert_eq!(p, DeflateParams::default());

        let (p, resp) = negotiate_server(
            &offer("permessage-deflate; server_no_context_takeover; server_max_window_bits=10"),
            &cfg,
        )
        .unwrap();
        assert_eq!(
            resp,
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=10"
        );
        assert!(p.server_no_context_takeover);
        assert_eq!(p.server_max_window_bits, 10);

        // Invalid first offer is declined, the fallback taken.
        let (_, resp) = negotiate_server(
            &offer("permessage-deflate; server_max_window_bits=16, permessage-deflate"),
            &cfg,
        )
        .unwrap();
        assert_eq!(resp, "permessage-deflate");
        for bad in [
            "permessage-deflate; foo",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "x-webkit-deflate-frame",
        ] {
            assert!(negotiate_server(&offer(bad), &cfg).is_none(), "{bad}");
        }
        // Quoted values are accepted.
        assert!(negotiate_server(
            &offer("permessage-deflate; server_max_window_bits=\"12\""),
            &cfg
        )
        .is_some());
    }

    #[test]
    fn rfc7692_7_1_server_applies_its_own_limits() {
        let cfg = DeflateConfig {
            client_no_context_takeover: true,
            client_max_window_bits: Some(10),
            ..DeflateConfig::default()
        };
        let (p, resp) = negotiate_server(
            &offer("permessage-deflate; client_max_window_bits=12"),
            &cfg,
        )
        .unwrap();
        assert_eq!(
            resp,
            "permessage-deflate; client_no_context_takeover; client_max_window_bits=10"
        );
        assert_eq!(p.client_max_window_bits, 10);
    }

    #[test]
    fn rfc7692_7_1_client_checks_the_response() {
        let cfg = DeflateConfig::default();
        assert_eq!(
            client_offer(&cfg),
            "permessage-deflate; client_max_window_bits"
        );
        let ok =
            &offer("permessage-deflate; client_max_window_bits=9; server_no_context_takeover")[0];
        let p = accept_client_response(ok, &cfg).unwrap();
        assert_eq!(p.client_max_window_bits, 9);
        assert!(p.server_no_context_takeover);
        for bad in [
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; bogus",
            "permessage-deflate; server_max_window_bits=16",
        ] {
            assert!(
                accept_client_response(&offer(bad)[0], &cfg).is_err(),
                "{bad}"
            );
        }
    }
}
