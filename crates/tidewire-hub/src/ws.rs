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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tidewire::{CloseCode, Message, SendError, Sender, WebSocket};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::config::SlowConsumerPolicy;
use crate::hub::{ClientSink, FrameKind, Hub, SendOutcome, Session};
use crate::protocol::Frame;

/// The close code of a connection whose send queue overflowed.
pub const SLOW_CONSUMER_CLOSE: CloseCode = CloseCode::TRY_AGAIN_LATER;

struct WsSink {
    sender: Sender,
    hub: Hub,
    /// The slow-consumer policy is `close`.
    close_on_overflow: bool,
    /// Closing (asked by the hub, or after an overflow).
    closing: AtomicBool,
}

impl WsSink {
    fn overflow(&self) -> SendOutcome {
        if !self.closing.swap(true, Ordering::Relaxed) {
            self.hub.metrics().slow_consumers.inc();
            let _ = self.sender.close(SLOW_CONSUMER_CLOSE, "send queue full");
        }
        SendOutcome::Closed
    }
}

impl ClientSink for WsSink {
    fn send(&self, frame: Frame, kind: FrameKind) -> SendOutcome {
        match self.sender.try_send(Message::Text(frame)) {
            Ok(()) => SendOutcome::Queued,
            Err(SendError::Dropped | SendError::Full(_)) => {
                if kind == FrameKind::Publication && !self.close_on_overflow {
                    SendOutcome::Dropped
                } else {
                    self.overflow()
                }
            }
            Err(_) => SendOutcome::Closed,
        }
    }

    fn close(&self, code: u16, reason: &str) {
        self.closing.store(true, Ordering::Relaxed);
        let _ = self.sender.close(CloseCode(code), reason);
    }

    fn queued(&self) -> usize {
        self.sender.queued_messages()
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

/// Runs a hub session over an open WebSocket until it ends.
pub async fn run_session<S>(hub: Hub, mut ws: WebSocket<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let sink = Arc::new(WsSink {
        sender: ws.sender(),
        hub: hub.clone(),
        close_on_overflow: hub.config().client.slow_consumer == SlowConsumerPolicy::Close,
        closing: AtomicBool::new(false),
    });
    let session = hub.open(sink);
    run(&session, &mut ws, &hub).await;
    session.close().await;
}

async fn run<S>(session: &Session, ws: &mut WebSocket<S>, hub: &Hub)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Until `connect` succeeds, the connection has connect_timeout.
    let mut deadline = Some(Instant::now() + hub.config().client.connect_timeout);
    loop {
        let next = match deadline {
            Some(at) if !session.is_connected() => {
                match tokio::time::timeout_at(at, ws.recv()).await {
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
            Some(Ok(Message::Text(text))) => session.handle_text(text.as_str()).await,
            Some(Ok(Message::Binary(_))) => session.handle_binary(),
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(client = %session.client_id(), "connection ended: {e}");
                return;
            }
        }
    }
}
