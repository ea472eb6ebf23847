//! The HTTP API's body parser on arbitrary bytes, for every method.
//!
//! Input: `[method, body...]`: `method` picks one of `api::METHODS` (or,
//! past them, an unknown method); the body is taken as sent (not
//! necessarily UTF-8).
//!
//! Pass rule: no panic; a body is accepted, or refused with a documented
//! code (101; 102 only for an unknown method; 113 only for a broadcast to
//! too many channels) whose HTTP status is 400, 404 or 413, and a message
//! in words; what is accepted holds the documented limits, and its `data`
//! is the body's, byte for byte.

#![no_main]

mod error_text;

use libfuzzer_sys::fuzz_target;
use tidewire_hub::http::api::{parse_call, ApiCall, MAX_BROADCAST, MAX_DISCONNECT_REASON, METHODS};
use tidewire_hub::protocol::ErrorCode;

/// `data` is passed on exactly as it was in the body (not re-encoded: a
/// number like `1e400`, valid JSON, stays as it is).
fn sent_as_is(body: &[u8], data: &str) -> bool {
    std::str::from_utf8(body).is_ok_and(|body| body.contains(data))
}

fuzz_target!(|data: &[u8]| {
    let [pick, body @ ..] = data else {
        return;
    };
    let method = METHODS.get(usize::from(*pick)).copied().unwrap_or("dance");
    match parse_call(method, body) {
        Ok(call) => {
            assert!(METHODS.contains(&method));
            match call {
                ApiCall::Broadcast { channels, data } => {
                    assert!(channels.len() <= MAX_BROADCAST);
                    assert_eq!(method, "broadcast");
                    assert!(sent_as_is(body, data.get()));
                }
                ApiCall::Publish(p) => {
                    assert!(sent_as_is(body, p.data.get()));
                }
                ApiCall::Disconnect { disconnect, .. } => {
                    assert!((3000..=4999).contains(&disconnect.code));
                    assert!(disconnect.reason.len() <= MAX_DISCONNECT_REASON);
                }
                _ => {}
            }
        }
        Err(e) => {
            match e.code {
                ErrorCode::BadRequest => assert!(METHODS.contains(&method)),
                ErrorCode::UnknownCommand => assert_eq!(method, "dance"),
                ErrorCode::LimitExceeded => assert_eq!(method, "broadcast"),
                other => panic!("code {} for a body", other.number()),
            }
            assert!(matches!(e.code.http_status().as_u16(), 400 | 404 | 413));
            error_text::check(&e.message);
            let encoded = serde_json::to_string(&e).expect("an error encodes");
            let value: serde_json::Value = serde_json::from_str(&encoded).unwrap();
            assert_eq!(value["message"].as_str(), Some(e.message.as_str()));
        }
    }
});
