//! The hub's command parser on arbitrary text: single commands and
//! newline-separated batches, as a WebSocket text message brings them.
//!
//! Input: `[max_batch, message...]` (the message as UTF-8, invalid bytes
//! replaced, as the WebSocket layer only hands over valid text).
//!
//! Pass rule: no panic; every line is accepted or refused with a code from
//! the documented set (101 or 102 when parsed, 113 past the batch limit)
//! and a message in words; a batch yields exactly one item per command
//! line; a refused command keeps the id a full parse reads; every error
//! reply encodes to JSON that echoes that id.

#![no_main]

mod error_text;

use libfuzzer_sys::fuzz_target;
use tidewire_hub::protocol::{
    batch_limit_error, batch_limit_error_without_id, parse_batch, parse_command, split_batch,
    BatchItem, Codec, ErrorCode, ErrorReply, Incoming, Request, COMMANDS, JSON,
};

/// The id a refusal of `line` (past the batch limit) would carry: the
/// quick scan, which must agree with the full parse.
fn id_of_refused(line: &str) -> u64 {
    match parse_batch(line, 0).next() {
        Some(BatchItem::Refused { id, .. }) => id,
        other => panic!("a line past a limit of 0 is refused, got {other:?}"),
    }
}

/// The id a reply to `line` carries (0: none), by a full parse.
fn id_of(line: &str) -> u64 {
    match parse_command(line) {
        Ok(command) => command.id,
        Err(e) => e.id,
    }
}

/// An error reply encodes to `{"id":N,"error":{code, message}}` (no `id`
/// for 0) that reads back as itself.
fn check_encoding(id: u64, error: &ErrorReply) {
    let frame = JSON.encode_error(id, error);
    let text = frame.as_text().expect("JSON v1 frames are text");
    let value: serde_json::Value = serde_json::from_str(text).expect("an error reply is JSON");
    match id {
        0 => assert!(value.get("id").is_none(), "{value}"),
        id => assert_eq!(value["id"].as_u64(), Some(id), "{value}"),
    }
    assert_eq!(
        value["error"]["code"].as_u64(),
        Some(u64::from(error.code.number()))
    );
    assert_eq!(
        value["error"]["message"].as_str(),
        Some(error.message.as_str())
    );
}

fuzz_target!(|data: &[u8]| {
    let [max_batch, message @ ..] = data else {
        return;
    };
    let max_batch = usize::from(*max_batch % 8);
    let message = String::from_utf8_lossy(message);
    let lines: Vec<&str> = split_batch(&message).collect();
    let mut count = 0;
    for (n, item) in parse_batch(&message, max_batch).enumerate() {
        count += 1;
        let line = lines[n];
        match item {
            BatchItem::Command(parsed) => {
                assert!(n < max_batch, "command {n} past the limit {max_batch}");
                match parsed {
                    Ok(command) => {
                        assert!(COMMANDS.contains(&command.request.name()));
                        assert_eq!(command.id, id_of_refused(line), "ids of {line:?}");
                        // Data is passed on exactly as sent.
                        match &command.request {
                            Request::Publish(p) => assert!(line.contains(p.data.get())),
                            Request::Connect(c) => {
                                assert!(c.data.as_ref().is_none_or(|d| line.contains(d.get())))
                            }
                            _ => {}
                        }
                    }
                    Err(e) => {
                        assert!(
                            matches!(
                                e.error.code,
                                ErrorCode::BadRequest | ErrorCode::UnknownCommand
                            ),
                            "code {} for {line:?}",
                            e.error.code.number()
                        );
                        error_text::check(&e.error.message);
                        assert_eq!(e.id, id_of_refused(line), "ids of {line:?}");
                        check_encoding(e.id, &e.error);
                    }
                }
            }
            BatchItem::Refused { id, number } => {
                assert!(n >= max_batch, "command {n} refused within the limit");
                assert_eq!(number, n + 1);
                assert_eq!(id, id_of(line), "the id of refused {line:?}");
                let error = batch_limit_error(max_batch, number);
                assert_eq!(error.code, ErrorCode::LimitExceeded);
                check_encoding(id, &error);
            }
        }
    }
    assert_eq!(count, lines.len(), "one item per command line");
    // The codec, as a session uses it, reads the same batch.
    let decoded = JSON
        .decode_batch(Incoming::Text(&message), max_batch)
        .expect("JSON v1 takes any text");
    assert_eq!(decoded.count(), count, "the codec's batch");
    let summary = batch_limit_error_without_id(max_batch, count);
    assert_eq!(summary.code, ErrorCode::LimitExceeded);
    check_encoding(0, &summary);
});
