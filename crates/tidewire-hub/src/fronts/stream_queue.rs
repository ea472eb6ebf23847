//! The queue between the hub and a streamed HTTP response (the fallbacks'
//! fronts): bounded like a WebSocket's send queue, with the same
//! slow-consumer policy; the response body drains it, with a keepalive
//! after [`KEEPALIVE`] of silence, then a last message when the hub
//! closes it, then the end.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::node::{FrameKind, Hub, SendOutcome};
use crate::shards::lock;

/// How often an idle stream sends something (an SSE comment, an empty
/// line), so that proxies keep it open and a dead peer is noticed.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// Largest chunk the body takes at once.
const MAX_CHUNK: usize = 1 << 16;

/// One queued message in up to three parts (a frame between its
/// transport's framing, say `data: `, the frame, `\n\n`), so that a frame
/// encoded once for every subscriber is not copied per subscriber to be
/// framed.
pub(crate) type Parts = [Bytes; 3];

fn parts_len(parts: &Parts) -> usize {
    parts.iter().map(Bytes::len).sum()
}

#[derive(Default)]
struct State {
    queue: VecDeque<Parts>,
    bytes: usize,
    /// Closed by the hub: the last message, sent after what is queued.
    closed: Option<Bytes>,
    /// The last message went out: the stream ends.
    finished: bool,
}

/// What became of bytes handed to [`StreamQueue::push`].
pub(crate) enum Pushed {
    /// As for any sink.
    Outcome(SendOutcome),
    /// The queue is full and the policy closes: the sink closes the
    /// stream with this code (once) and reports it closed.
    Overflow(u16),
}

pub(crate) struct StreamQueue {
    state: Mutex<State>,
    /// Wakes the response body.
    wake: Notify,
    /// Wakes the session's task when the hub closed the stream.
    pub(crate) done: Notify,
    max_messages: usize,
    max_bytes: usize,
    close_on_overflow: Option<u16>,
    closing: AtomicBool,
    keepalive: Bytes,
    hub: Hub,
}

impl StreamQueue {
    /// With the hub's queue limits and slow-consumer policy.
    pub(crate) fn new(hub: &Hub, keepalive: &'static [u8]) -> StreamQueue {
        let settings = &hub.config().client;
        StreamQueue {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            done: Notify::new(),
            max_messages: settings.queue_messages,
            max_bytes: settings.queue_bytes,
            close_on_overflow: match settings.slow_consumer {
                tidewire::SlowConsumer::Close(code) => Some(code.0),
                _ => None,
            },
            closing: AtomicBool::new(false),
            keepalive: Bytes::from_static(keepalive),
            hub: hub.clone(),
        }
    }

    /// Queues bytes of the transport's own, past the limits.
    pub(crate) fn push_raw(&self, bytes: Bytes) {
        let mut state = lock(&self.state);
        state.bytes += bytes.len();
        state.queue.push_back([bytes, Bytes::new(), Bytes::new()]);
        drop(state);
        self.wake.notify_one();
    }

    /// Queues the parts of a message of `kind`, within the limits.
    pub(crate) fn push(&self, parts: Parts, kind: FrameKind) -> Pushed {
        {
            let mut state = lock(&self.state);
            if state.closed.is_some() || state.finished {
                return Pushed::Outcome(SendOutcome::Closed);
            }
            let len = parts_len(&parts);
            let full = state.queue.len() >= self.max_messages || state.bytes + len > self.max_bytes;
            if !full {
                state.bytes += len;
                state.queue.push_back(parts);
                drop(state);
                self.wake.notify_one();
                return Pushed::Outcome(SendOutcome::Queued);
            }
        }
        if kind == FrameKind::Publication && self.close_on_overflow.is_none() {
            return Pushed::Outcome(SendOutcome::Dropped);
        }
        if self.closing.swap(true, Ordering::Relaxed) {
            return Pushed::Outcome(SendOutcome::Closed);
        }
        self.hub.metrics().slow_consumers.inc();
        Pushed::Overflow(self.close_on_overflow.unwrap_or(1013))
    }

    /// Ends the stream after what is queued, with `last` (once).
    pub(crate) fn close(&self, last: Bytes) {
        self.closing.store(true, Ordering::Relaxed);
        let mut state = lock(&self.state);
        if state.closed.is_none() && !state.finished {
            state.closed = Some(last);
        }
        drop(state);
        self.wake.notify_one();
        self.done.notify_one();
    }

    /// Closed by the hub (or finished).
    pub(crate) fn is_done(&self) -> bool {
        let state = lock(&self.state);
        state.closed.is_some() || state.finished
    }

    pub(crate) fn queued(&self) -> usize {
        lock(&self.state).queue.len()
    }

    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// The next bytes of the response: what is queued, a keepalive after
    /// [`KEEPALIVE`] of silence, the closing message, or the end.
    pub(crate) async fn next_chunk(&self) -> Option<Bytes> {
        loop {
            {
                let mut state = lock(&self.state);
                if !state.queue.is_empty() {
                    let mut chunk = Vec::with_capacity(state.bytes.min(MAX_CHUNK));
                    while let Some(parts) = state.queue.pop_front() {
                        state.bytes -= parts_len(&parts);
                        for part in &parts {
                            chunk.extend_from_slice(part);
                        }
                        if chunk.len() >= MAX_CHUNK {
                            break;
                        }
                    }
                    return Some(Bytes::from(chunk));
                }
                if state.finished {
                    return None;
                }
                if let Some(last) = state.closed.take() {
                    state.finished = true;
                    return Some(last);
                }
            }
            let wake = self.wake.notified();
            if tokio::time::timeout(KEEPALIVE, wake).await.is_err() {
                return Some(self.keepalive.clone());
            }
        }
    }
}
