//! # tidewire
//!
//! A WebSocket server and client on tokio, built on the sans-I/O
//! [`tidewire_proto`] core: RFC 6455 and permessage-deflate (RFC 7692),
//! checked by the Autobahn test suite.
//!
//! ## Echo server
//!
//! ```no_run
//! use tidewire::{accept, Message};
//! use tokio::net::TcpListener;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = TcpListener::bind("127.0.0.1:9001").await?;
//! loop {
//!     let (stream, _) = listener.accept().await?;
//!     tokio::spawn(async move {
//!         let mut ws = accept(stream).await?;
//!         while let Some(msg) = ws.recv().await {
//!             match msg? {
//!                 msg @ (Message::Text(_) | Message::Binary(_)) => ws.send(msg).await?,
//!                 _ => {}
//!             }
//!         }
//!         Ok::<_, tidewire::Error>(())
//!     });
//! }
//! # }
//! ```
//!
//! For the hottest path there is a second runtime, [`event_loop`]: a
//! thread per core, each an epoll loop over its own listener, connections
//! as plain state, synchronous callbacks (what uWebSockets does).
//!
//! ## Client
//!
//! ```no_run
//! # async fn run() -> Result<(), tidewire::Error> {
//! let (mut ws, _response) = tidewire::connect("ws://127.0.0.1:9001/").await?;
//! ws.send_text("hello").await?;
//! if let Some(reply) = ws.recv().await {
//!     println!("{:?}", reply?);
//! }
//! ws.close(1000u16, "bye").await?;
//! # Ok(()) }
//! ```
//!
//! ## The browser API, one to one
//!
//! | browser `WebSocket` | tidewire |
//! |---|---|
//! | `open` | [`connect`] / [`accept`] return |
//! | `message` | [`Message::Text`] / [`Message::Binary`] from `recv` |
//! | `close` (code, reason, `wasClean`) | [`Message::Close`] (clean), or [`Error::AbnormalClosure`] (code 1006) |
//! | `error` | `Err` from `recv` or `send` |
//! | `send`, `close(code, reason)`, `bufferedAmount` | [`WebSocket::send`], [`WebSocket::close`], [`WebSocket::buffered_amount`] |

#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "axum")]
pub mod axum;
mod client;
mod error;
#[cfg(feature = "event-loop")]
pub mod event_loop;
#[cfg(feature = "hyper")]
pub mod hyper;
mod message;
mod outbox;
mod policy;
mod runtime;
mod server;
mod stream;
#[cfg(feature = "tls")]
pub mod tls;
mod websocket;

pub use client::{connect, ClientBuilder, ClientStream};
pub use error::Error;
pub use message::Message;
pub use outbox::{QueueLimits, SendError, Sender, SlowConsumer};
pub use policy::{cookie, HandshakeRequest, OriginPolicy};
pub use runtime::{
    echo, record_close, AuthHook, HttpHandler, Limits, Server, ServerBuilder, ServerStats,
    ServerStream, Session,
};
pub use server::{accept, accept_request, accept_with, read_request, Accept, Reject, ServerConfig};
pub use stream::MaybeTlsStream;
pub use websocket::{IoOptions, TrafficCounters, WebSocket, WebSocketReader, WebSocketWriter};

pub use http;
pub use tidewire_proto as proto;
pub use tidewire_proto::{CloseCode, CloseFrame, Config, DeflateConfig, OpCode, Utf8Text};
pub use tokio_util::sync::CancellationToken;
