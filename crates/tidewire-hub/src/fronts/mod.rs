//! The fronts: each one carries the client protocol over one transport
//! and hands the core a [`ClientSink`](crate::node::ClientSink) per client.
//! [`websocket`] (on tokio) and [`event_loop`] (on tidewire's event
//! loop); [`emulation`], Server-Sent Events or HTTP streaming
//! down with HTTP POSTs up, for networks that refuse WebSocket;
//! [`long_poll`], polls that wait, where even a stream is held back;
//! [`uni_sse`], Server-Sent Events one way, for `new EventSource(url)`.
//! Socket.IO comes next, in a file of its own here.

pub mod emulation;
pub mod event_loop;
pub mod long_poll;
mod stream_queue;
pub mod uni_sse;
pub mod websocket;
