//! Sending to an event-loop connection from any thread: a [`Remote`]
//! handle queues messages, and the connection's worker writes them.
//!
//! Each worker has one inbox: the remotes that have something queued, in
//! the order they became due. A remote is on it at most once however many
//! messages wait for it, so a broadcast to many connections costs one
//! queue push per connection and, on the worker, one pass over the due
//! list writing each connection's messages with one (vectored) write: the
//! next round of a fan-out begins with whoever is first due, and a
//! message queued while the round runs goes out in that round to the
//! connections not yet written.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tidewire_proto::{CloseCode, CloseFrame};

use super::group::GroupShared;
use crate::{Message, QueueLimits, SendError, SlowConsumer};

/// What other threads hand a worker: remotes that became due, and the
/// posts of its [`Group`](super::Group)s, in the order they were posted.
#[derive(Default)]
pub(super) struct Posted {
    pub(super) due: Vec<Arc<RemoteInner>>,
    pub(super) posts: Vec<Post>,
}

impl Posted {
    fn is_empty(&self) -> bool {
        self.due.is_empty() && self.posts.is_empty()
    }
}

/// A group's change or message for one worker.
pub(super) enum Post {
    Join {
        group: Arc<GroupShared>,
        remote: Arc<RemoteInner>,
    },
    Leave {
        group: u64,
        remote: Arc<RemoteInner>,
    },
    /// The worker's `seq`th publication (numbered from 1).
    Publish {
        group: u64,
        seq: u64,
        message: Message,
    },
}

/// A worker's list of due remotes and group posts, and the way to wake
/// its poll.
pub(super) struct Inbox {
    posted: Mutex<Posted>,
    /// Publications posted here so far. A message queued on a remote is
    /// tagged with it, so that the worker writes it after the group
    /// messages posted before it and before those posted after.
    published: AtomicU64,
    waker: Arc<mio::Waker>,
}

impl Inbox {
    pub(super) fn new(waker: Arc<mio::Waker>) -> Arc<Inbox> {
        Arc::new(Inbox {
            posted: Mutex::new(Posted::default()),
            published: AtomicU64::new(0),
            waker,
        })
    }

    /// Takes what was posted, leaving `spare` (emptied) in its place, so
    /// that neither side allocates in the steady state.
    pub(super) fn take(&self, spare: &mut Posted) {
        spare.due.clear();
        spare.posts.clear();
        std::mem::swap(&mut *lock(&self.posted), spare);
    }

    fn push_all(&self, remotes: &mut Vec<Arc<RemoteInner>>) {
        let mut posted = lock(&self.posted);
        let first = posted.is_empty();
        posted.due.append(remotes);
        drop(posted);
        if first {
            let _ = self.waker.wake();
        }
    }

    fn push(&self, remote: Arc<RemoteInner>) {
        let mut posted = lock(&self.posted);
        let first = posted.is_empty();
        posted.due.push(remote);
        drop(posted);
        if first {
            // The worker drains the whole list per wake-up: one wake for
            // the lot.
            let _ = self.waker.wake();
        }
    }

    /// Posts a group's join, leave or message (a message gets its number
    /// here).
    pub(super) fn post(&self, mut post: Post) {
        let mut posted = lock(&self.posted);
        let first = posted.is_empty();
        if let Post::Publish { seq, .. } = &mut post {
            *seq = self.published.load(Ordering::Relaxed) + 1;
            self.published.store(*seq, Ordering::Release);
        }
        posted.posts.push(post);
        drop(posted);
        if first {
            let _ = self.waker.wake();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Default)]
pub(super) struct Queue {
    /// Each with the number of publications posted to the worker when it
    /// was queued (see [`Inbox::published`]).
    messages: VecDeque<(u64, Message)>,
    bytes: usize,
    /// A close asked for (sent after the messages before it), and its tag.
    close: Option<CloseFrame>,
    close_after: u64,
    /// A close was asked for: nothing more is queued.
    closing: bool,
    /// The connection is gone: nothing more is taken.
    ended: bool,
}

impl Queue {
    /// The tag of what comes next (a message, or else the close): the
    /// number of publications posted before it.
    pub(super) fn next_after(&self) -> Option<u64> {
        match self.messages.front() {
            Some((after, _)) => Some(*after),
            None => self.close.as_ref().map(|_| self.close_after),
        }
    }

    /// The next message for the connection.
    pub(super) fn pop(&mut self) -> Option<Message> {
        let (_, message) = self.messages.pop_front()?;
        self.bytes -= message.as_bytes().len();
        Some(message)
    }

    /// The close asked for, once every message before it is taken.
    pub(super) fn take_close(&mut self) -> Option<CloseFrame> {
        if self.messages.is_empty() {
            self.close.take()
        } else {
            None
        }
    }

    /// Closes with `code` for a slow consumer: what waits is dropped, the
    /// close goes out next.
    fn close_slow(&mut self, code: CloseCode, after: u64) {
        self.messages.clear();
        self.bytes = 0;
        self.set_close(CloseFrame::new(code, "send queue full"), after);
    }

    /// The close goes out after what is queued (and after the `after`
    /// publications); nothing more is queued.
    fn set_close(&mut self, frame: CloseFrame, after: u64) {
        self.close = Some(frame);
        self.close_after = after;
        self.closing = true;
    }
}

/// What a [`Remote`] and the connection's worker share.
pub(super) struct RemoteInner {
    /// The connection's key in its worker's slab (checked against the
    /// entry's own remote: keys are reused).
    pub(super) key: usize,
    pub(super) inbox: Arc<Inbox>,
    limits: QueueLimits,
    queue: Mutex<Queue>,
    /// Messages waiting in `queue` (read without its lock).
    waiting: AtomicUsize,
    /// On the inbox's due list, or to be put there by [`Remote::wake`].
    due: AtomicBool,
}

impl RemoteInner {
    pub(super) fn new(key: usize, inbox: Arc<Inbox>, limits: QueueLimits) -> Arc<RemoteInner> {
        Arc::new(RemoteInner {
            key,
            inbox,
            limits,
            queue: Mutex::new(Queue::default()),
            waiting: AtomicUsize::new(0),
            due: AtomicBool::new(false),
        })
    }

    /// Whether anything waits (a message or a close).
    pub(super) fn has_work(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// The worker is at this remote (from its due list): a message queued
    /// from now on puts it on the list again. Before its queue is looked
    /// at, so that nothing queued meanwhile is left without a visit.
    pub(super) fn visited(&self) {
        self.due.store(false, Ordering::Release);
    }

    /// The worker takes what is queued: `f` gets the queue, locked.
    /// Clears the due flag first, so that a message queued meanwhile puts
    /// the remote on the due list again.
    pub(super) fn take<R>(&self, f: impl FnOnce(&mut Queue) -> R) -> R {
        self.due.store(false, Ordering::Release);
        let mut queue = lock(&self.queue);
        let result = f(&mut queue);
        let waiting = queue.messages.len() + usize::from(queue.close.is_some());
        self.waiting.store(waiting, Ordering::Release);
        result
    }

    /// Gives back the queue's memory when nothing waits (an idle
    /// connection keeps no allocation for a burst it once had).
    pub(super) fn release_idle(&self) {
        let mut queue = lock(&self.queue);
        if queue.messages.is_empty() && queue.messages.capacity() > 0 {
            queue.messages = VecDeque::new();
        }
    }

    /// Closes the connection for falling behind a group (the worker's
    /// side of [`SlowConsumer::Close`]), after the group's messages it has
    /// not taken (`backlog`, numbered, oldest first) and what was queued
    /// here, in the order they were sent; whether it was not closing yet.
    pub(super) fn close_behind(&self, code: CloseCode, backlog: Vec<(u64, Message)>) -> bool {
        let mut queue = lock(&self.queue);
        if queue.ended || queue.closing {
            return false;
        }
        // Publication `seq` goes before the messages queued after it was
        // posted (tagged `seq` or more): tagged `seq - 1`, in order.
        let mut merged = VecDeque::with_capacity(queue.messages.len() + backlog.len());
        let mut own = std::mem::take(&mut queue.messages).into_iter().peekable();
        for (seq, message) in backlog {
            while let Some(next) = own.next_if(|(after, _)| *after < seq) {
                merged.push_back(next);
            }
            queue.bytes += message.as_bytes().len();
            merged.push_back((seq - 1, message));
        }
        merged.extend(own);
        queue.messages = merged;
        let after = self.inbox.published.load(Ordering::Acquire);
        queue.set_close(CloseFrame::new(code, "send queue full"), after);
        let waiting = queue.messages.len() + 1;
        self.waiting.store(waiting, Ordering::Release);
        true
    }

    /// The connection ended: refuse from now on, drop what waits.
    pub(super) fn end(&self) {
        let mut queue = lock(&self.queue);
        queue.ended = true;
        queue.messages.clear();
        queue.bytes = 0;
        queue.close = None;
        self.waiting.store(0, Ordering::Release);
    }

    fn push(self: &Arc<Self>, message: Message, wake: bool) -> Result<bool, SendError> {
        let len = message.as_bytes().len();
        let mut queue = lock(&self.queue);
        if queue.ended || queue.closing {
            return Err(SendError::Closed);
        }
        let full = queue.messages.len() >= self.limits.max_messages
            || (queue.bytes + len > self.limits.max_bytes && !queue.messages.is_empty());
        if full {
            return match self.limits.policy {
                SlowConsumer::Wait => Err(SendError::Full(message)),
                SlowConsumer::Drop => Err(SendError::Dropped),
                SlowConsumer::Close(code) => {
                    let after = self.inbox.published.load(Ordering::Acquire);
                    queue.close_slow(code, after);
                    self.waiting.store(1, Ordering::Release);
                    drop(queue);
                    self.make_due(true);
                    Err(SendError::Closed)
                }
            };
        }
        queue.bytes += len;
        let after = self.inbox.published.load(Ordering::Acquire);
        queue.messages.push_back((after, message));
        self.waiting.fetch_add(1, Ordering::AcqRel);
        drop(queue);
        Ok(self.make_due(wake))
    }

    /// Marks the remote due; puts it on the inbox when `wake`. Whether it
    /// was not due before (then, without `wake`, a [`Remote::wake`] must
    /// follow).
    pub(super) fn make_due(self: &Arc<Self>, wake: bool) -> bool {
        let newly = !self.due.load(Ordering::Acquire) && !self.due.swap(true, Ordering::AcqRel);
        if newly && wake {
            self.inbox.push(self.clone());
        }
        newly
    }
}

/// A handle on one event-loop connection for other threads (and other
/// connections' callbacks): queues messages that its worker writes. Made
/// by [`Socket::remote`](super::Socket::remote); cheap to clone.
///
/// The queue is bounded by the [`QueueLimits`] given then; when it is
/// full, the policy decides: `Wait` hands the message back
/// ([`SendError::Full`]: a remote cannot wait), `Drop` drops it, `Close`
/// drops what waits and closes the connection with that code.
#[derive(Clone)]
pub struct Remote {
    pub(super) inner: Arc<RemoteInner>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("queued", &self.queued_messages())
            .finish()
    }
}

impl Remote {
    /// Queues a message and makes sure the worker will write it.
    ///
    /// # Errors
    /// The queue is full (see the type's docs), or the connection is
    /// closing or gone ([`SendError::Closed`]).
    pub fn send(&self, message: Message) -> Result<(), SendError> {
        self.inner.push(message, true).map(|_| ())
    }

    /// Queues a message without telling the worker yet: `Ok(true)` when
    /// [`wake`](Self::wake) must follow (the remote was not due), so that
    /// a broadcast can queue on every connection first and wake them
    /// after, or leave the waking to someone else.
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub fn send_deferred(&self, message: Message) -> Result<bool, SendError> {
        self.inner.push(message, false)
    }

    /// Puts a remote that [`send_deferred`](Self::send_deferred) made due
    /// on its worker's list.
    pub fn wake(&self) {
        self.inner.inbox.push(self.inner.clone());
    }

    /// Closes the connection after what is queued (the closing
    /// handshake, with this code and reason). Later sends are refused.
    pub fn close(&self, code: CloseCode, reason: &str) {
        let reason = reason.get(..reason.len().min(123)).unwrap_or("");
        let mut queue = lock(&self.inner.queue);
        if queue.ended || queue.closing {
            return;
        }
        let after = self.inner.inbox.published.load(Ordering::Acquire);
        queue.set_close(CloseFrame::new(code, reason), after);
        self.inner.waiting.fetch_add(1, Ordering::AcqRel);
        drop(queue);
        self.inner.make_due(true);
    }

    /// Messages queued here and not yet taken by the worker.
    pub fn queued_messages(&self) -> usize {
        lock(&self.inner.queue).messages.len()
    }

    /// Whether the connection is gone or closing (nothing more is sent).
    pub fn is_closed(&self) -> bool {
        let queue = lock(&self.inner.queue);
        queue.ended || queue.closing
    }
}

/// Wake-ups gathered for a batch of [`Remote::send_deferred`]s (one
/// broadcast's, say) and handed to the workers together: one lock and at
/// most one wake-up per worker, where waking each remote on its own could
/// switch to the worker and back for every one of them (a worker woken on
/// the broadcaster's core runs at once). Flushed when dropped.
#[derive(Default)]
pub struct Wakes {
    batches: Vec<(Arc<Inbox>, Vec<Arc<RemoteInner>>)>,
}

impl std::fmt::Debug for Wakes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let remotes: usize = self.batches.iter().map(|(_, b)| b.len()).sum();
        f.debug_struct("Wakes").field("remotes", &remotes).finish()
    }
}

impl Wakes {
    /// No wake-up gathered yet.
    pub fn new() -> Wakes {
        Wakes::default()
    }

    /// Adds a remote that [`Remote::send_deferred`] said must be woken.
    pub fn add(&mut self, remote: &Remote) {
        let inbox = &remote.inner.inbox;
        let batch = match self
            .batches
            .iter_mut()
            .position(|(i, _)| Arc::ptr_eq(i, inbox))
        {
            Some(at) => &mut self.batches[at].1,
            None => {
                self.batches.push((inbox.clone(), Vec::new()));
                &mut self.batches.last_mut().expect("just pushed").1
            }
        };
        batch.push(remote.inner.clone());
    }

    /// Hands what was gathered to the workers.
    pub fn flush(&mut self) {
        for (inbox, batch) in &mut self.batches {
            if !batch.is_empty() {
                inbox.push_all(batch);
            }
        }
    }
}

impl Drop for Wakes {
    fn drop(&mut self) {
        self.flush();
    }
}
