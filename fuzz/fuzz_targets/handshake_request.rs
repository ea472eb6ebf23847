//! Server side of the opening handshake on arbitrary bytes:
//! `parse_request`, `ServerHandshake::new`, then `accept` or `to_response`.
//!
//! Input: `[flags, request...]`. flags bit 0: permessage-deflate enabled;
//! bits 1-2: server/client no_context_takeover asked by the server.
//!
//! Pass rule: no panic; every response the server produces is itself a
//! well-formed HTTP response with the status it claims.

#![no_main]

use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use tidewire_proto::handshake::{parse_request, parse_response};
use tidewire_proto::{Config, DeflateConfig, ServerHandshake};

fuzz_target!(|data: &[u8]| {
    let [flags, request @ ..] = data else {
        return;
    };
    let config = Config {
        deflate: (flags & 1 != 0).then(|| DeflateConfig {
            server_no_context_takeover: flags & 2 != 0,
            client_no_context_takeover: flags & 4 != 0,
            ..DeflateConfig::default()
        }),
        max_handshake_size: 4096,
        ..Config::default()
    };
    let max = config.max_handshake_size;
    let parsed = match parse_request(request, max) {
        Ok(Some((req, used))) => {
            assert!(used <= request.len().min(max));
            ServerHandshake::new(req, config)
        }
        Ok(None) => {
            assert!(request.len() < max);
            return;
        }
        Err(err) => Err(err),
    };
    match parsed {
        Ok(hs) => {
            let deflate = hs.deflate();
            let protocol = hs.protocols().next().map(str::to_owned);
            let (response, conn) = hs.accept(protocol.as_deref(), &HeaderMap::new());
            assert_eq!(conn.deflate_params(), deflate);
            let (resp, used) = parse_response(&response, 1 << 20)
                .expect("our 101 response parses")
                .expect("our 101 response is complete");
            assert_eq!(used, response.len());
            assert_eq!(resp.status().as_u16(), 101);
        }
        Err(err) => {
            let response = err.to_response();
            let (resp, used) = parse_response(&response, 1 << 20)
                .expect("our error response parses")
                .expect("our error response is complete");
            assert!(used <= response.len());
            assert_eq!(resp.status(), err.status());
        }
    }
});
