//! The bounded send queue of a connection, and the [`Sender`] handles that
//! feed it from any task.
//!
//! Messages wait here until the connection's driver (whoever polls `recv`)
//! moves them into the protocol's output buffer, which is itself kept under a
//! high-water mark. So memory per connection is bounded by the queue limits
//! plus that mark, whatever the peer does. When the queue is full, the
//! configured [`SlowConsumer`] policy decides: the sender waits, the message
//! is dropped (and counted), or the connection is closed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use tidewire_proto::CloseCode;
use tokio::sync::Notify;

use crate::Message;

/// What to do when a connection's send queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowConsumer {
    /// `send` waits for room; `try_send` returns [`SendError::Full`].
    Wait,
    /// The new message is dropped and counted.
    Drop,
    /// The connection is closed with this code (1008 policy violation or
    /// 1013 try again later); what is queued is discarded.
    Close(CloseCode),
}

impl std::str::FromStr for SlowConsumer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wait" => Ok(SlowConsumer::Wait),
            "drop" => Ok(SlowConsumer::Drop),
            "close" => Ok(SlowConsumer::Close(CloseCode::POLICY_VIOLATION)),
            other => Err(format!(
                "unknown slow-consumer policy {other:?} (wait, drop or close)"
            )),
        }
    }
}

/// Bounds of a connection's send queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most messages waiting.
    pub max_messages: usize,
    /// Most payload bytes waiting (messages plus encoded output not yet
    /// written).
    pub max_bytes: usize,
    /// What happens when a limit would be exceeded.
    pub policy: SlowConsumer,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            max_messages: 1024,
            max_bytes: 4 << 20,
            policy: SlowConsumer::Wait,
        }
    }
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The queue is full (policy [`SlowConsumer::Wait`], `try_send`); the
    /// message is handed back.
    #[error("send queue full")]
    Full(Message),
    /// The queue is full and the policy dropped the message.
    #[error("send queue full: message dropped")]
    Dropped,
    /// The connection is closing or closed (or was closed by the
    /// [`SlowConsumer::Close`] policy).
    #[error("connection closed")]
    Closed,
}

#[derive(Debug, Default)]
pub(crate) struct QueueState {
    pub(crate) queue: VecDeque<Message>,
    /// Payload bytes in `queue`.
    pub(crate) bytes: usize,
    /// Encoded bytes in the protocol output buffer, not yet written.
    pub(crate) output: usize,
    /// No more messages are accepted.
    pub(crate) closed: bool,
    /// The close policy fired; the driver sends the close.
    pub(crate) overflow: Option<CloseCode>,
    pub(crate) driver: Option<Waker>,
}

#[derive(Debug)]
pub(crate) struct Outbox {
    pub(crate) limits: QueueLimits,
    state: Mutex<QueueState>,
    /// Room was made (or the connection ended).
    space: Notify,
    /// Everything queued was written (or the connection ended).
    drained: Notify,
    dropped: AtomicU64,
    /// Something for the driver to do (queued messages, an overflow): lets
    /// the driver skip the lock on the hot path when nobody uses a Sender.
    pub(crate) work: AtomicBool,
}

impl Outbox {
    pub(crate) fn new(limits: QueueLimits) -> Arc<Outbox> {
        Arc::new(Outbox {
            limits,
            state: Mutex::new(QueueState::default()),
            space: Notify::new(),
            drained: Notify::new(),
            dropped: AtomicU64::new(0),
            work: AtomicBool::new(false),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The driver made room in the queue.
    pub(crate) fn notify_space(&self) {
        self.space.notify_waiters();
    }

    /// The driver wrote everything out.
    pub(crate) fn notify_drained(&self) {
        self.drained.notify_waiters();
    }

    /// The connection is over: refuse new messages, release every waiter.
    pub(crate) fn shut(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.queue.clear();
        st.bytes = 0;
        st.output = 0;
        drop(st);
        self.space.notify_waiters();
        self.drained.notify_waiters();
    }

    fn push(&self, message: Message) -> Result<(), SendError> {
        self.push_and(message, true)
    }

    /// Queues a message; wakes the driver only when `wake` (see
    /// [`Sender::try_send_deferred`]).
    fn push_and(&self, message: Message, wake: bool) -> Result<(), SendError> {
        let len = message.as_bytes().len();
        let mut st = self.lock();
        if st.closed || st.overflow.is_some() {
            return Err(SendError::Closed);
        }
        let full = st.queue.len() >= self.limits.max_messages
            || (st.bytes + st.output + len > self.limits.max_bytes && !st.queue.is_empty());
        if full {
            return match self.limits.policy {
                SlowConsumer::Wait => Err(SendError::Full(message)),
                SlowConsumer::Drop => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    Err(SendError::Dropped)
                }
                SlowConsumer::Close(code) => {
                    st.overflow = Some(code);
                    st.queue.clear();
                    st.bytes = 0;
                    self.work.store(true, Ordering::Release);
                    if let Some(w) = st.driver.take() {
                        w.wake();
                    }
                    Err(SendError::Closed)
                }
            };
        }
        st.bytes += len;
        st.queue.push_back(message);
        self.work.store(true, Ordering::Release);
        if wake {
            if let Some(w) = st.driver.take() {
                w.wake();
            }
        }
        Ok(())
    }

    fn wake_driver(&self) {
        let waker = self.lock().driver.take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A cloneable handle that queues messages on a connection from any task.
///
/// The connection's own task must keep calling `recv` (it writes what is
/// queued). Memory is bounded by the connection's [`QueueLimits`].
#[derive(Debug, Clone)]
pub struct Sender {
    pub(crate) outbox: Arc<Outbox>,
}

impl Sender {
    /// Queues a message without waiting; a full queue applies the policy
    /// (`Wait` hands the message back in [`SendError::Full`]).
    pub fn try_send(&self, message: impl Into<Message>) -> Result<(), SendError> {
        self.outbox.push(message.into())
    }

    /// Queues a message like [`try_send`](Self::try_send) without waking the
    /// connection's task: it writes the message the next time it runs, or
    /// after [`wake`](Self::wake). For fan-out to many connections: queue
    /// a message on each, then wake them at a pace of your choosing, so
    /// that the tasks run (and write) once per batch of messages and other
    /// tasks get their turn in between.
    pub fn try_send_deferred(&self, message: impl Into<Message>) -> Result<(), SendError> {
        self.outbox.push_and(message.into(), false)
    }

    /// Wakes the connection's task if it waits, so that it writes what
    /// [`try_send_deferred`](Self::try_send_deferred) queued.
    pub fn wake(&self) {
        self.outbox.wake_driver();
    }

    /// Queues a message; with [`SlowConsumer::Wait`] waits for room.
    ///
    /// # Cancel safety
    /// If cancelled while waiting, the message was not queued.
    pub async fn send(&self, message: impl Into<Message>) -> Result<(), SendError> {
        let mut message = message.into();
        loop {
            let space = self.outbox.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            match self.outbox.push(message) {
                Err(SendError::Full(m)) => message = m,
                other => return other,
            }
            space.await;
        }
    }

    /// Queues a close frame behind the messages already queued.
    pub fn close(&self, code: impl Into<CloseCode>, reason: &str) -> Result<(), SendError> {
        let frame = tidewire_proto::CloseFrame::new(code.into(), reason);
        let mut st = self.outbox.lock();
        if st.closed || st.overflow.is_some() {
            return Err(SendError::Closed);
        }
        st.bytes += frame.reason.len();
        st.queue.push_back(Message::Close(Some(frame)));
        st.closed = true;
        self.outbox.work.store(true, Ordering::Release);
        if let Some(w) = st.driver.take() {
            w.wake();
        }
        Ok(())
    }

    /// Payload bytes queued plus encoded bytes not yet written (the
    /// browser's `bufferedAmount`, uWebSockets' `getBufferedAmount`).
    pub fn buffered_amount(&self) -> usize {
        let st = self.outbox.lock();
        st.bytes + st.output
    }

    /// Messages waiting in the queue.
    pub fn queued_messages(&self) -> usize {
        self.outbox.lock().queue.len()
    }

    /// Waits until everything queued has been written to the transport (the
    /// "drain" event), or the connection ended.
    pub async fn drained(&self) {
        loop {
            let drained = self.outbox.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let st = self.outbox.lock();
                if st.queue.is_empty() && st.output == 0 {
                    return;
                }
            }
            drained.await;
        }
    }

    /// Whether the connection no longer accepts messages.
    pub fn is_closed(&self) -> bool {
        let st = self.outbox.lock();
        st.closed || st.overflow.is_some()
    }

    /// Messages dropped by the [`SlowConsumer::Drop`] policy so far.
    pub fn dropped(&self) -> u64 {
        self.outbox.dropped.load(Ordering::Relaxed)
    }
}
