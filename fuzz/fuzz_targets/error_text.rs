//! What every error message of the hub's parsers must be: short, and in
//! words for people (the field and what it must be), with none of the JSON
//! parser's own phrases.

/// Phrases of serde / serde_json error messages, which name Rust types and
/// parser states rather than the field at fault.
const PARSER_PHRASES: [&str; 10] = [
    "invalid type",
    "invalid value",
    "invalid length",
    "expected",
    "missing field",
    "unknown variant",
    "duplicate field",
    "trailing characters",
    "EOF while",
    "line 1 column",
];

/// Longest message: names echoed from the input are cut to 64 characters
/// (escaped, at most 10 bytes each), the rest is fixed text.
const MAX_MESSAGE: usize = 1024;

/// The message without its quoted parts (`"…"`, with `\"` escapes): the
/// names echoed from the input, which may hold any text.
fn unquoted(message: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in message.chars() {
        match (quoted, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => quoted = false,
            (true, false, _) => {}
            (false, _, '"') => quoted = true,
            (false, _, c) => out.push(c),
        }
    }
    out
}

/// Panics when `message` breaks the rules above.
pub fn check(message: &str) {
    assert!(!message.is_empty(), "an empty error message");
    assert!(
        message.len() <= MAX_MESSAGE,
        "a {}-byte error message: {message}",
        message.len()
    );
    let own_words = unquoted(message);
    for phrase in PARSER_PHRASES {
        assert!(
            !own_words.contains(phrase),
            "parser internals ({phrase:?}) in {message:?}"
        );
    }
}
