//! The fronts: each one carries the client protocol over one transport
//! and hands the core a [`ClientSink`](crate::node::ClientSink) per client.
//! [`websocket`] is the only one today; SSE, HTTP streaming, long-polling
//! and Socket.IO come next, each in a file (or folder) of its own here.

pub mod websocket;
