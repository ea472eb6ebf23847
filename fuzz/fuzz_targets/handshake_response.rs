//! Client side of the opening handshake on arbitrary bytes:
//! `ClientHandshake::new`, then `parse_response` and `finish`.
//!
//! Input: `[flags, response...]`. flags bit 0: offer permessage-deflate;
//! bit 1: replace Sec-WebSocket-Accept with the right value (so the checks
//! after it, subprotocol and extensions, are reached); bits 2-3: window bits
//! and no_context_takeover asked for.
//!
//! Pass rule: no panic.

#![no_main]

use http::header::{HeaderValue, SEC_WEBSOCKET_ACCEPT};
use libfuzzer_sys::fuzz_target;
use tidewire_proto::handshake::{accept_key, parse_request, parse_response};
use tidewire_proto::{ClientHandshake, Config, DeflateConfig};

fuzz_target!(|data: &[u8]| {
    let [flags, response @ ..] = data else {
        return;
    };
    let config = Config {
        deflate: (flags & 1 != 0).then(|| DeflateConfig {
            client_max_window_bits: (flags & 4 != 0).then_some(10),
            server_max_window_bits: (flags & 4 != 0).then_some(12),
            server_no_context_takeover: flags & 8 != 0,
            ..DeflateConfig::default()
        }),
        max_handshake_size: 4096,
        ..Config::default()
    };
    let protocols = ["chat".to_string(), "superchat".to_string()];
    let (client, request) = ClientHandshake::new(
        "ws://localhost:9001/path?q=1",
        &http::HeaderMap::new(),
        &protocols,
        config,
    )
    .expect("a valid URL");
    let Ok(Some((mut resp, used))) = parse_response(response, 4096) else {
        return;
    };
    assert!(used <= response.len());
    if flags & 2 != 0 {
        let (req, _) = parse_request(&request, 4096)
            .expect("our request parses")
            .expect("our request is complete");
        let key = req.headers()["sec-websocket-key"].as_bytes().to_vec();
        let accept = HeaderValue::from_str(&accept_key(&key)).expect("base64 is a valid value");
        resp.headers_mut().insert(SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Ok(accepted) = client.finish(resp) {
        if let Some(p) = &accepted.protocol {
            assert!(protocols.contains(p));
        }
        assert_eq!(accepted.response.status().as_u16(), 101);
    }
});
