//! How publications, client infos and events travel between nodes through
//! a broker (Redis PUB/SUB and streams, NATS): a small binary envelope,
//! read back strictly.
//!
//! A publication's envelope is what a broker stores and carries; its
//! offset and epoch travel beside it (a broker assigns them). An event on
//! a channel's topic is one kind byte and its body:
//!
//! - `p` a publication: `<offset> <epoch> <envelope>` (decimal offset, the
//!   epoch without spaces, possibly empty), written by the publish script
//!   so that every node learns the position with the publication;
//! - `j` / `l` a join or a leave: a client info.
//!
//! Envelope: a version byte (1), a flags byte (bit 0: a client info
//! follows), the client info if any, then the payload (the rest).
//! Client info: the client id, the user id and the connection info (JSON
//! text, empty for none), each a LEB128 length and its bytes.
//!
//! Everything read here comes from the network: lengths are checked
//! against what is left before anything is allocated, and a message that
//! does not parse is an error ([`WireError`]), never a panic.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::value::RawValue;

use crate::protocol::{ClientInfo, Payload, Publication};

const VERSION: u8 = 1;
const HAS_INFO: u8 = 1;

/// The kind byte of a publication event.
pub const PUBLICATION: u8 = b'p';
/// The kind byte of a join event.
pub const JOIN: u8 = b'j';
/// The kind byte of a leave event.
pub const LEAVE: u8 = b'l';

/// A message from a broker that this node cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// It ends before a field does.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// Another version of the envelope, or an unknown event kind.
    #[error("unknown {what} {value}")]
    Unknown {
        /// What was unknown (`version`, `event kind`).
        what: &'static str,
        /// Its value.
        value: u8,
    },
    /// A field that must be UTF-8 (ids) or JSON (connection info) or a
    /// number (offset) is not.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// An event read from a channel's topic.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A publication with its position (offset 0 and an empty epoch
    /// without history).
    Publication {
        /// The publication, its offset set.
        publication: Publication,
        /// The stream's epoch.
        epoch: String,
    },
    /// A client joined.
    Join(ClientInfo),
    /// A client left.
    Leave(ClientInfo),
}

/// Appends a client info.
fn put_info(out: &mut BytesMut, info: &ClientInfo) {
    put_field(out, info.client.as_bytes());
    put_field(out, info.user.as_bytes());
    put_field(
        out,
        info.info.as_ref().map_or(&b""[..], |i| i.get().as_bytes()),
    );
}

fn put_field(out: &mut BytesMut, field: &[u8]) {
    let mut n = field.len();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.put_u8(byte);
            break;
        }
        out.put_u8(byte | 0x80);
    }
    out.put_slice(field);
}

/// A publication's envelope (its offset is not in it).
pub fn encode_publication(publication: &Publication) -> Bytes {
    let data = publication.data.as_bytes();
    let mut out = BytesMut::with_capacity(data.len() + 64);
    out.put_u8(VERSION);
    match &publication.info {
        Some(info) => {
            out.put_u8(HAS_INFO);
            put_info(&mut out, info);
        }
        None => out.put_u8(0),
    }
    out.put_slice(data);
    out.freeze()
}

/// A join (`JOIN`) or leave (`LEAVE`) event.
pub fn encode_presence_event(kind: u8, info: &ClientInfo) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.put_u8(kind);
    put_info(&mut out, info);
    out.freeze()
}

/// A publication event as the publish script writes it (for brokers
/// whose publish is not a script: NATS, and tests).
pub fn encode_publication_event(offset: u64, epoch: &str, envelope: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(envelope.len() + 32);
    out.put_u8(PUBLICATION);
    out.put_slice(offset.to_string().as_bytes());
    out.put_u8(b' ');
    out.put_slice(epoch.as_bytes());
    out.put_u8(b' ');
    out.put_slice(envelope);
    out.freeze()
}

/// Reads input field by field.
struct Reader<'a> {
    input: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self, what: &'static str) -> Result<u8, WireError> {
        let (&first, rest) = self.input.split_first().ok_or(WireError::Truncated(what))?;
        self.input = rest;
        Ok(first)
    }

    fn field(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let mut len: usize = 0;
        for shift in (0..).step_by(7).take(5) {
            let byte = self.byte(what)?;
            len |= usize::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                // One spelling per length: no trailing zero groups.
                if byte == 0 && shift > 0 {
                    return Err(WireError::Malformed(what));
                }
                if len > self.input.len() {
                    return Err(WireError::Truncated(what));
                }
                let (field, rest) = self.input.split_at(len);
                self.input = rest;
                return Ok(field);
            }
        }
        Err(WireError::Malformed(what))
    }

    fn text(&mut self, what: &'static str) -> Result<String, WireError> {
        let field = self.field(what)?;
        let text = std::str::from_utf8(field).map_err(|_| WireError::Malformed(what))?;
        Ok(text.to_owned())
    }

    fn info(&mut self) -> Result<ClientInfo, WireError> {
        let client = self.text("client id")?;
        let user = self.text("user id")?;
        let info = self.text("connection info")?;
        let info = if info.is_empty() {
            None
        } else {
            let len = info.len();
            let raw =
                RawValue::from_string(info).map_err(|_| WireError::Malformed("connection info"))?;
            // As a node writes it: no whitespace around the value.
            if raw.get().len() != len {
                return Err(WireError::Malformed("connection info"));
            }
            Some(raw)
        };
        Ok(ClientInfo { client, user, info })
    }

    /// Up to the next space (the space is consumed).
    fn word(&mut self, what: &'static str) -> Result<&'a [u8], WireError> {
        let at = self
            .input
            .iter()
            .position(|&b| b == b' ')
            .ok_or(WireError::Truncated(what))?;
        let word = &self.input[..at];
        self.input = &self.input[at + 1..];
        Ok(word)
    }
}

/// Reads a publication's envelope; `offset` is the one it was stored at.
/// The payload shares `envelope`'s memory.
pub fn decode_publication(envelope: &Bytes, offset: u64) -> Result<Publication, WireError> {
    let mut reader = Reader { input: envelope };
    let version = reader.byte("envelope")?;
    if version != VERSION {
        return Err(WireError::Unknown {
            what: "version",
            value: version,
        });
    }
    let flags = reader.byte("envelope")?;
    if flags & !HAS_INFO != 0 {
        return Err(WireError::Malformed("envelope flags"));
    }
    let info = if flags & HAS_INFO != 0 {
        Some(Arc::new(reader.info()?))
    } else {
        None
    };
    let data = envelope.slice(envelope.len() - reader.input.len()..);
    Ok(Publication {
        offset,
        data: Payload::from_bytes(data),
        info,
    })
}

/// Reads an event from a channel's topic.
pub fn decode_event(message: &Bytes) -> Result<Event, WireError> {
    let mut reader = Reader { input: message };
    match reader.byte("event")? {
        PUBLICATION => {
            let offset = reader.word("offset")?;
            let offset = std::str::from_utf8(offset)
                .ok()
                .and_then(|o| o.parse::<u64>().ok())
                .ok_or(WireError::Malformed("offset"))?;
            let epoch = reader.word("epoch")?;
            let epoch = std::str::from_utf8(epoch)
                .map_err(|_| WireError::Malformed("epoch"))?
                .to_owned();
            let envelope = message.slice(message.len() - reader.input.len()..);
            let publication = decode_publication(&envelope, offset)?;
            Ok(Event::Publication { publication, epoch })
        }
        kind @ (JOIN | LEAVE) => {
            let info = reader.info()?;
            if !reader.input.is_empty() {
                return Err(WireError::Malformed("event: bytes after the client info"));
            }
            Ok(if kind == JOIN {
                Event::Join(info)
            } else {
                Event::Leave(info)
            })
        }
        other => Err(WireError::Unknown {
            what: "event kind",
            value: other,
        }),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn info(client: &str, user: &str, conn: Option<&str>) -> ClientInfo {
        ClientInfo {
            client: client.into(),
            user: user.into(),
            info: conn.map(|c| RawValue::from_string(c.into()).unwrap()),
        }
    }

    fn infos() -> impl Strategy<Value = Option<ClientInfo>> {
        let conn = prop_oneof![
            Just(None),
            Just(Some(r#"{"name":"ann","n":[1,2]}"#)),
            Just(Some("\"é\"")),
        ];
        proptest::option::of((".{0,40}", ".{0,300}", conn))
            .prop_map(|i| i.map(|(c, u, conn)| info(&c, &u, conn)))
    }

    proptest! {
        #[test]
        fn a_publication_comes_back_as_it_went(
            data in proptest::collection::vec(any::<u8>(), 0..600),
            who in infos(),
            offset in any::<u64>(),
            epoch in "[0-9a-f]{0,16}",
        ) {
            let publication = Publication {
                offset,
                data: Payload::from_bytes(Bytes::from(data)),
                info: who.map(Arc::new),
            };
            let envelope = encode_publication(&publication);
            prop_assert_eq!(&decode_publication(&envelope, offset).unwrap(), &publication);
            let event = encode_publication_event(offset, &epoch, &envelope);
            prop_assert_eq!(
                decode_event(&event).unwrap(),
                Event::Publication { publication, epoch: epoch.clone() }
            );
        }

        #[test]
        fn joins_and_leaves_come_back_as_they_went(who in infos()) {
            let who = who.unwrap_or_else(|| info("c", "", None));
            let join = encode_presence_event(JOIN, &who);
            prop_assert_eq!(decode_event(&join).unwrap(), Event::Join(who.clone()));
            let leave = encode_presence_event(LEAVE, &who);
            prop_assert_eq!(decode_event(&leave).unwrap(), Event::Leave(who));
        }

        #[test]
        fn any_bytes_are_read_or_refused_without_a_panic(
            message in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let message = Bytes::from(message);
            let _ = decode_event(&message);
            let _ = decode_publication(&message, 1);
        }
    }

    #[test]
    fn truncated_and_unknown_input_is_refused_with_its_reason() {
        let who = info("c1", "u1", Some("{}"));
        let join = encode_presence_event(JOIN, &who);
        for cut in 1..join.len() {
            assert!(matches!(
                decode_event(&join.slice(..cut)),
                Err(WireError::Truncated(_))
            ));
        }
        assert_eq!(
            decode_event(&Bytes::from_static(b"x")),
            Err(WireError::Unknown {
                what: "event kind",
                value: b'x'
            })
        );
        assert_eq!(
            decode_publication(&Bytes::from_static(b"\x02\x00{}"), 1),
            Err(WireError::Unknown {
                what: "version",
                value: 2
            })
        );
        assert_eq!(
            decode_event(&Bytes::from_static(b"p12x e \x01\x00{}")),
            Err(WireError::Malformed("offset"))
        );
        // A length past the end allocates nothing and is refused.
        assert_eq!(
            decode_event(&Bytes::from_static(b"j\xff\xff\xff\xff\x07")),
            Err(WireError::Truncated("client id"))
        );
        assert_eq!(
            decode_event(&Bytes::from_static(b"j\xff\xff\xff\xff\xff\x01")),
            Err(WireError::Malformed("client id"))
        );
        assert_eq!(
            decode_event(&Bytes::from_static(b"j\x81\x00c")),
            Err(WireError::Malformed("client id"))
        );
        assert_eq!(
            decode_publication(&Bytes::from_static(b"\x01\x02{}"), 1),
            Err(WireError::Malformed("envelope flags"))
        );
        assert_eq!(
            decode_event(&Bytes::from_static(b"l\x01c\x00\x00z")),
            Err(WireError::Malformed("event: bytes after the client info"))
        );
        assert_eq!(
            decode_event(&Bytes::from_static(b"j\x01c\x00\x03 {}")),
            Err(WireError::Malformed("connection info"))
        );
        let bad_json = Bytes::from_static(b"j\x01c\x00\x02{x");
        assert_eq!(
            decode_event(&bad_json),
            Err(WireError::Malformed("connection info"))
        );
    }
}
