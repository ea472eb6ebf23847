//! The WebSocket front: one task per connection reads text messages and
//! hands them to its hub [`Session`]; everything the hub sends goes
//! through the connection's bounded tidewire [`Sender`] queue, in one
//! order (replies, publications and control pushes alike).
//!
//! A full queue: the connection's tidewire queue always drops (the fan-out
//! never waits); the hub's slow-consumer policy then decides. `close`
//! (default) queues a close 1013 behind what is queued: the client gets
//! every publication that fit, then the close, reconnects and recovers the
//! rest from history. `drop` drops the publication and goes on. A reply or
//! control push that cannot be queued always closes (1013): the client
//! would be out of step.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tidewire::{CloseCode, Message, SendError, Sender, WebSocket};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::node::{ClientSink, FrameKind, Hub, OpeningRequest, SendOutcome, Session, Transport};
use crate::protocol::Frame;

struct WsSink {
    sender: Sender,
    slow: SlowConsumerPolicy,
    /// Publications were queued without a wake-up, and the hub's
    /// dispatcher will wake the connection.
    wake_due: AtomicBool,
}

/// The hub's slow-consumer policy for a WebSocket sink (this front's and
/// the event loop's): what a refused send becomes, and the closing flag.
pub(super) struct SlowConsumerPolicy {
    hub: Hub,
    /// The close code of the slow-consumer policy `close`; `None` for
    /// `drop` (a reply that overflows still closes, with 1013).
    close_on_overflow: Option<CloseCode>,
    /// Closing (asked by the hub, or after an overflow).
    closing: AtomicBool,
}

impl SlowConsumerPolicy {
    pub(super) fn new(hub: Hub) -> SlowConsumerPolicy {
        let close_on_overflow = match hub.config().client.slow_consumer {
            tidewire::SlowConsumer::Close(code) => Some(code),
            _ => None,
        };
        SlowConsumerPolicy {
            hub,
            close_on_overflow,
            closing: AtomicBool::new(false),
        }
    }

    /// What became of a send; `close` ends the connection after an
    /// overflow (once).
    pub(super) fn outcome(
        &self,
        sent: Result<(), SendError>,
        kind: FrameKind,
        close: impl FnOnce(CloseCode, &str),
    ) -> SendOutcome {
        match sent {
            Ok(()) => SendOutcome::Queued,
            Err(SendError::Dropped | SendError::Full(_)) => {
                if kind == FrameKind::Publication && self.close_on_overflow.is_none() {
                    SendOutcome::Dropped
                } else {
                    if !self.closing.swap(true, Ordering::Relaxed) {
                        self.hub.metrics().slow_consumers.inc();
                        let code = self.close_on_overflow.unwrap_or(CloseCode::TRY_AGAIN_LATER);
                        close(code, "send queue full");
                    }
                    SendOutcome::Closed
                }
            }
            Err(_) => SendOutcome::Closed,
        }
    }

    /// The hub closes the connection.
    pub(super) fn set_closing(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    pub(super) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }
}

impl WsSink {
    fn outcome(&self, sent: Result<(), SendError>, kind: FrameKind) -> SendOutcome {
        self.slow.outcome(sent, kind, |code, reason| {
            let _ = self.sender.close(code, reason);
        })
    }
}

impl ClientSink for WsSink {
    fn transport(&self) -> Transport {
        Transport::WEBSOCKET
    }

    fn send(&self, frame: Frame, kind: FrameKind) -> SendOutcome {
        self.outcome(self.sender.try_send(message(frame)), kind)
    }

    fn send_deferred(&self, frame: Frame, kind: FrameKind) -> (SendOutcome, bool) {
        let outcome = self.outcome(self.sender.try_send_deferred(message(frame)), kind);
        let wake = outcome == SendOutcome::Queued
            && !self.wake_due.load(Ordering::Relaxed)
            && !self.wake_due.swap(true, Ordering::AcqRel);
        (outcome, wake)
    }

    fn wake(&self) {
        self.wake_due.store(false, Ordering::Release);
        self.sender.wake();
    }

    fn close(&self, code: u16, reason: &str) {
        self.slow.set_closing();
        let _ = self.sender.close(CloseCode(code), reason);
    }

    fn queued(&self) -> usize {
        self.sender.queued_messages()
    }

    fn is_closing(&self) -> bool {
        self.slow.is_closing()
    }
}

/// A codec's frame as the WebSocket message that carries it.
pub(crate) fn message(frame: Frame) -> Message {
    match frame {
        Frame::Text(text) => Message::Text(text),
        Frame::Binary(bytes) => Message::Binary(bytes),
    }
}

/// The queue limits a hub connection needs: the hub's bounds, and `drop`
/// in the server layer (see the module docs).
pub fn queue_limits(settings: &crate::config::ClientSettings) -> tidewire::QueueLimits {
    tidewire::QueueLimits {
        max_messages: settings.queue_messages,
        max_bytes: settings.queue_bytes,
        policy: tidewire::SlowConsumer::Drop,
    }
}

/// Runs a hub session over an open WebSocket until it ends; `opening` is
/// what its `connect` needs of the upgrade request
/// ([`Hub::opening_request`]); `guard` (a connection-limit slot, say) is
/// dropped at the end.
///
/// Not an `async fn`: the WebSocket is captured once by the returned
/// future (an `async fn` keeps its arguments twice in its state), which
/// keeps an idle connection's task small (a test guards it).
#[allow(clippy::manual_async_fn)]
pub fn run_session<S, G>(
    hub: Hub,
    mut ws: WebSocket<S>,
    opening: Option<Box<OpeningRequest>>,
    guard: G,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        let sink = Arc::new(WsSink {
            sender: ws.sender(),
            slow: SlowConsumerPolicy::new(hub.clone()),
            wake_due: AtomicBool::new(false),
        });
        let session = hub.open_with(sink, opening);
        run(&session, &mut ws).await;
        tracing::debug!(client = %session.client_id(), "session ended");
        session.close().await;
        drop(guard);
    }
}

async fn run<S>(session: &Session, ws: &mut WebSocket<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Until `connect` succeeds, the connection has connect_timeout.
    let mut deadline = Some(Instant::now() + session.connect_timeout_after());
    loop {
        let next = match deadline {
            Some(at) if !session.is_connected() => {
                // Boxed: the timer lives on the heap until `connect`, not
                // in every connected session's task.
                match Box::pin(tokio::time::timeout_at(at, ws.recv())).await {
                    Ok(next) => next,
                    Err(_) => {
                        deadline = None;
                        session.connect_timeout();
                        continue;
                    }
                }
            }
            _ => {
                deadline = None;
                ws.recv().await
            }
        };
        match next {
            None => return,
            // Boxed: command handling's state is on the heap while it
            // runs, not part of every idle connection's task.
            Some(Ok(Message::Text(text))) => Box::pin(session.handle_text(text.as_str())).await,
            Some(Ok(Message::Binary(bytes))) => Box::pin(session.handle_binary(&bytes)).await,
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(client = %session.client_id(), "connection ended: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, F: FnOnce(A, B, C, D) -> Fut, Fut>(_: F) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// An idle connection's task is the session future: the WebSocket
    /// plus a few hundred bytes (the WebSocket once, not twice; command
    /// handling boxed).
    #[test]
    fn an_idle_session_is_little_more_than_its_websocket() {
        type S = tidewire::hyper::UpgradedStream;
        let ws = std::mem::size_of::<WebSocket<S>>();
        let session = future_size(run_session::<S, ()>);
        assert!(
            session < ws + 512,
            "session future {session} bytes, WebSocket {ws}"
        );
    }
}
