//! # tidewire-proto
//!
//! The WebSocket protocol (RFC 6455) and permessage-deflate (RFC 7692) as a
//! sans-I/O state machine: bytes in, events out. No sockets, no async
//! runtime, no clock: the I/O layer (the `tidewire` crate, or your own)
//! moves bytes and decides timeouts.
//!
//! ```
//! use tidewire_proto::{Config, Connection, Event, Role};
//!
//! let mut server = Connection::new(Role::Server, Config::default(), None);
//! // A masked text frame "Hello" from a client (RFC 6455 §5.7).
//! server.receive_data(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58");
//! match server.next_event().unwrap() {
//!     Some(Event::Text(text)) => assert_eq!(text, "Hello"),
//!     other => panic!("unexpected {other:?}"),
//! }
//! server.send_text("Hi").unwrap();
//! assert_eq!(server.pending_output(), b"\x81\x02Hi");
//! ```
//!
//! Modules: [`handshake`] (opening handshake, both sides), [`frame`]
//! (headers), [`mask`], [`utf8`], [`deflate`], [`close`], and
//! [`connection`] (the state machine that ties them together).

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod close;
pub mod connection;
pub mod deflate;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod utf8;

pub use close::{CloseCode, CloseFrame};
pub use connection::{Config, Connection, Event, EventRef, IdleBuffers, Role, State};
pub use deflate::{DeflateConfig, DeflateParams};
pub use error::{ProtocolError, UsageError};
pub use frame::{FrameHeader, OpCode};
pub use handshake::{ClientHandshake, HandshakeError, ServerHandshake};
pub use utf8::{InvalidUtf8, Utf8Text, Utf8Validator};
