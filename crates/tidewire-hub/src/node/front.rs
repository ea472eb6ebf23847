//! The contract between the core and a front: what a front hands the
//! core for each connection (a [`ClientSink`]) and what becomes of the
//! frames the core queues on it.

use crate::protocol::{Codec, Frame, JSON};

/// How a frame may be treated when the client's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A publication, join or leave: the slow-consumer policy applies.
    Publication,
    /// A reply or control push: if it cannot be queued, the connection
    /// must end (the client would be out of step).
    Control,
}

/// What became of a frame handed to a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Queued for sending.
    Queued,
    /// Dropped by the slow-consumer policy.
    Dropped,
    /// The connection is closed or closing (perhaps by this very frame
    /// overflowing its queue).
    Closed,
}

/// What a front's transport is, as far as the core needs to know (the
/// core never names one itself).
#[derive(Clone, Copy)]
pub struct Transport {
    /// Its name, as the connect proxy is told (`websocket`; later `sse`,
    /// `http_stream`, `long_poll`, `socketio`).
    pub name: &'static str,
    /// How its messages are encoded.
    pub codec: &'static dyn Codec,
    /// Server to client only (SSE, HTTP streaming): the client's commands
    /// come another way.
    pub unidirectional: bool,
}

impl Transport {
    /// A WebSocket with the JSON v1 protocol: both ways.
    pub const WEBSOCKET: Transport = Transport {
        name: "websocket",
        codec: &JSON,
        unidirectional: false,
    };
    /// Server-Sent Events down, HTTP POSTs up (bidirectional emulation).
    pub const SSE: Transport = Transport {
        name: "sse",
        codec: &JSON,
        unidirectional: true,
    };
    /// Newline-delimited JSON over a streamed HTTP response down, HTTP
    /// POSTs up (bidirectional emulation).
    pub const HTTP_STREAM: Transport = Transport {
        name: "http_stream",
        codec: &JSON,
        unidirectional: true,
    };
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("name", &self.name)
            .field("codec", &self.codec.name())
            .field("unidirectional", &self.unidirectional)
            .finish()
    }
}

/// A front's handle on one client connection.
pub trait ClientSink: Send + Sync + 'static {
    /// The transport behind this sink.
    fn transport(&self) -> Transport;
    /// Queues a frame without waiting.
    fn send(&self, frame: Frame, kind: FrameKind) -> SendOutcome;
    /// Ends the connection after what is queued, with a close code and
    /// reason (WebSocket close frame or its equivalent).
    fn close(&self, code: u16, reason: &str);
    /// Frames waiting to be written.
    fn queued(&self) -> usize;
    /// Queues a frame like [`send`](Self::send) without waking the
    /// connection's writer (the fan-out queues a publication on every
    /// subscriber first and wakes them after, a wave at a time). The flag
    /// says whether the sink must be woken with [`wake`](Self::wake): it
    /// was not already due.
    fn send_deferred(&self, frame: Frame, kind: FrameKind) -> (SendOutcome, bool) {
        (self.send(frame, kind), false)
    }
    /// Wakes the writer after [`send_deferred`](Self::send_deferred).
    fn wake(&self) {}
    /// Wakes the writer after [`send_deferred`](Self::send_deferred)
    /// through `batch`, with the other subscribers of the same fan-out (an
    /// event-loop connection: its worker gets them all with one wake-up):
    /// `true` if it did; `false` leaves it to [`wake`](Self::wake), a wave
    /// at a time.
    fn wake_batched(&self, batch: &mut tidewire::event_loop::Wakes) -> bool {
        let _ = batch;
        false
    }
    /// Whether the connection is closing (asked to, or its queue
    /// overflowed): the session runs no more of its commands.
    fn is_closing(&self) -> bool {
        false
    }
    /// The event-loop connection behind this sink, if it is one: the
    /// fan-out then reaches it through its channel's group on the loop
    /// (one post per loop thread per publication, the subscribers' state
    /// touched only by their own thread) rather than with a send each.
    fn event_loop_remote(&self) -> Option<&tidewire::event_loop::Remote> {
        None
    }
}

/// What `connect` may need of the HTTP request that opened a connection
/// (the WebSocket upgrade, or the request that opened an HTTP-fallback
/// session): the connection token of `client.token_cookie`, and the
/// headers of `proxy.http_headers` for the connect callback. Kept only
/// until the client is connected, and only when one of them is
/// configured (see [`Hub::opening_request`](super::Hub::opening_request)).
#[derive(Debug, Default, Clone)]
pub struct OpeningRequest {
    /// The connection token from the cookie.
    pub(crate) token: Option<String>,
    /// Header names (lowercase) and values; repeated headers joined.
    pub(crate) headers: std::collections::BTreeMap<String, String>,
}

impl OpeningRequest {
    /// Reads what `config` asks for from `headers`; `None` when nothing
    /// (then a connection keeps nothing of its request).
    pub(crate) fn read(
        config: &crate::config::Config,
        proxied: bool,
        headers: &http::HeaderMap,
    ) -> Option<Box<OpeningRequest>> {
        let token = config
            .client
            .token_cookie
            .as_deref()
            .and_then(|name| tidewire::cookie(headers, name))
            .filter(|token| !token.is_empty())
            .map(str::to_owned);
        let mut forwarded = std::collections::BTreeMap::new();
        if proxied {
            for name in &config.proxy.http_headers {
                let name = name.to_ascii_lowercase();
                let joiner = if name == "cookie" { "; " } else { ", " };
                let values: Vec<&str> = headers
                    .get_all(name.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                if !values.is_empty() {
                    forwarded.insert(name, values.join(joiner));
                }
            }
        }
        (token.is_some() || !forwarded.is_empty()).then(|| {
            Box::new(OpeningRequest {
                token,
                headers: forwarded,
            })
        })
    }
}
