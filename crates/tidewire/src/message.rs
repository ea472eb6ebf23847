//! Messages as the application sees them.

use bytes::Bytes;
use tidewire_proto::{CloseFrame, Event, Utf8Text};

/// A message received from or sent to the peer.
///
/// The browser API's events map one to one: `message` is [`Text`](Self::Text)
/// or [`Binary`](Self::Binary); `close` is [`Close`](Self::Close) (or an
/// [`Error`](crate::Error) for an abnormal close, code 1006); `error` is an
/// `Err` from `recv`. Pings are answered automatically and shown for
/// information.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A UTF-8 text message.
    Text(Utf8Text),
    /// A binary message.
    Binary(Bytes),
    /// A ping (already answered when received).
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// A close frame: code and reason, or `None` for no status code.
    Close(Option<CloseFrame>),
}

impl Message {
    /// A text message.
    pub fn text(text: impl Into<Utf8Text>) -> Message {
        Message::Text(text.into())
    }

    /// A binary message.
    pub fn binary(data: impl Into<Bytes>) -> Message {
        Message::Binary(data.into())
    }

    /// A close message with a code and reason.
    pub fn close(
        code: impl Into<tidewire_proto::CloseCode>,
        reason: impl Into<Utf8Text>,
    ) -> Message {
        Message::Close(Some(CloseFrame::new(code, reason)))
    }

    /// Whether this is a text or binary message.
    pub fn is_data(&self) -> bool {
        matches!(self, Message::Text(_) | Message::Binary(_))
    }

    /// The payload bytes (empty for a close without status).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b,
            Message::Close(Some(f)) => f.reason.as_bytes(),
            Message::Close(None) => &[],
        }
    }
}

impl From<Event> for Message {
    fn from(event: Event) -> Message {
        match event {
            Event::Text(t) => Message::Text(t),
            Event::Binary(b) => Message::Binary(b),
            Event::Ping(b) => Message::Ping(b),
            Event::Pong(b) => Message::Pong(b),
            Event::Close(f) => Message::Close(f),
        }
    }
}

impl From<String> for Message {
    fn from(s: String) -> Message {
        Message::Text(s.into())
    }
}

impl From<&str> for Message {
    fn from(s: &str) -> Message {
        Message::Text(s.into())
    }
}

impl From<Vec<u8>> for Message {
    fn from(v: Vec<u8>) -> Message {
        Message::Binary(v.into())
    }
}

impl From<Bytes> for Message {
    fn from(b: Bytes) -> Message {
        Message::Binary(b)
    }
}
