//! UTF-8: the validated text type and the incremental validator.
//!
//! Text messages are validated as their bytes arrive, so that an invalid byte
//! fails the connection at once (close 1007) even in the middle of a fragment
//! or of a frame still being received (RFC 6455 §8.1). Bulk validation is
//! SIMD-accelerated by `simdutf8`; only a sequence cut at a chunk boundary is
//! carried over (at most three bytes).

use bytes::Bytes;

/// Immutable UTF-8 text backed by [`Bytes`], so a received text message is
/// handed out without copying and can be cloned cheaply.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Utf8Text(Bytes);

/// The bytes given to [`Utf8Text::try_from`] were not valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid UTF-8")]
pub struct InvalidUtf8;

impl Utf8Text {
    /// An empty text.
    pub const fn new() -> Self {
        Utf8Text(Bytes::new())
    }

    /// Text from a static string, without copying.
    pub const fn from_static(s: &'static str) -> Self {
        Utf8Text(Bytes::from_static(s.as_bytes()))
    }

    /// Wraps bytes already proven to be UTF-8 by the incremental validator.
    pub(crate) fn from_validated(bytes: Bytes) -> Self {
        debug_assert!(std::str::from_utf8(&bytes).is_ok());
        Utf8Text(bytes)
    }

    /// The text as `&str`.
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor of `Utf8Text` either takes a `str`/`String`
        // or validates the bytes (`try_from`, or the incremental validator
        // before `from_validated`), and the inner `Bytes` is never mutated.
        // Skipping a second validation matters: text messages are validated
        // once on the hot path already (see benches/codec.rs).
        #[allow(unsafe_code)]
        unsafe {
            std::str::from_utf8_unchecked(&self.0)
        }
    }

    /// The UTF-8 bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The underlying buffer.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the text is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::ops::Deref for Utf8Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Utf8Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<[u8]> for Utf8Text {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::fmt::Debug for Utf8Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Utf8Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for Utf8Text {
    fn from(s: String) -> Self {
        Utf8Text(Bytes::from(s))
    }
}

impl From<&str> for Utf8Text {
    fn from(s: &str) -> Self {
        Utf8Text(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<Utf8Text> for Bytes {
    fn from(t: Utf8Text) -> Self {
        t.0
    }
}

impl TryFrom<Bytes> for Utf8Text {
    type Error = InvalidUtf8;
    fn try_from(bytes: Bytes) -> Result<Self, InvalidUtf8> {
        simdutf8::basic::from_utf8(&bytes).map_err(|_| InvalidUtf8)?;
        Ok(Utf8Text(bytes))
    }
}

impl TryFrom<Vec<u8>> for Utf8Text {
    type Error = InvalidUtf8;
    fn try_from(bytes: Vec<u8>) -> Result<Self, InvalidUtf8> {
        Utf8Text::try_from(Bytes::from(bytes))
    }
}

impl PartialEq<str> for Utf8Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Utf8Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Validates UTF-8 that arrives in pieces.
///
/// [`feed`](Self::feed) fails at the first byte that can no longer start or
/// continue a valid sequence; [`finish`](Self::finish) fails when the text
/// ends inside a sequence.
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    carry: [u8; 4],
    carry_len: u8,
}

impl Utf8Validator {
    /// A validator at the start of a text.
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates the next piece of the text.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), InvalidUtf8> {
        if self.carry_len > 0 {
            let have = self.carry_len as usize;
            let need = sequence_len(self.carry[0]) - have;
            let take = need.min(data.len());
            let mut joined = [0u8; 4];
            joined[..have].copy_from_slice(&self.carry[..have]);
            joined[have..have + take].copy_from_slice(&data[..take]);
            match simdutf8::compat::from_utf8(&joined[..have + take]) {
                Ok(_) => self.carry_len = 0,
                Err(e) if e.error_len().is_some() => return Err(InvalidUtf8),
                Err(_) => {
                    // Still incomplete: all of `data` went into the carry.
                    self.carry = joined;
                    self.carry_len = (have + take) as u8;
                    return Ok(());
                }
            }
            data = &data[take..];
        }
        if simdutf8::basic::from_utf8(data).is_ok() {
            return Ok(());
        }
        match simdutf8::compat::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(InvalidUtf8),
            Err(e) => {
                let tail = &data[e.valid_up_to()..];
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len() as u8;
                Ok(())
            }
        }
    }

    /// Ends the text: fails when it stopped inside a multi-byte sequence.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let complete = self.carry_len == 0;
        self.carry_len = 0;
        if complete {
            Ok(())
        } else {
            Err(InvalidUtf8)
        }
    }

    /// Forgets any partial sequence, ready for a new text.
    pub fn reset(&mut self) {
        self.carry_len = 0;
    }
}

/// Length of the sequence a lead byte starts (only called on lead bytes that
/// the validator already accepted as the start of an incomplete sequence).
fn sequence_len(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(pieces: &[&[u8]]) -> Result<(), InvalidUtf8> {
        let mut v = Utf8Validator::new();
        for p in pieces {
            v.feed(p)?;
        }
        v.finish()
    }

    #[test]
    fn valid_text_split_at_every_byte() {
        let text = "κόσμε 🌍 ascii € \u{10FFFF}".as_bytes();
        for split in 0..=text.len() {
            assert_eq!(feed_all(&[&text[..split], &text[split..]]), Ok(()));
        }
        let singles: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(feed_all(&singles), Ok(()));
    }

    #[test]
    fn fails_fast_inside_a_sequence() {
        let mut v = Utf8Validator::new();
        v.feed(b"ok \xF4").unwrap();
        // 0xF4 0x90 would encode above U+10FFFF: fail on this byte, before the rest.
        assert_eq!(v.feed(b"\x90"), Err(InvalidUtf8));
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b"\xed\xa0"), Err(InvalidUtf8)); // surrogate
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b"\xc0"), Err(InvalidUtf8)); // overlong lead
    }

    #[test]
    fn incomplete_at_end_fails_finish() {
        assert_eq!(feed_all(&[b"abc\xe2\x82"]), Err(InvalidUtf8));
        assert_eq!(feed_all(&[b"abc\xe2", b"\x82"]), Err(InvalidUtf8));
        assert_eq!(feed_all(&[b"abc\xe2", b"\x82", b"\xac"]), Ok(()));
    }

    #[test]
    fn agrees_with_std_on_every_two_byte_prefix() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let bytes = [a, b, b'x'];
                let expected = std::str::from_utf8(&bytes).is_ok();
                assert_eq!(feed_all(&[&bytes[..1], &bytes[1..]]).is_ok(), expected);
            }
        }
    }
}
