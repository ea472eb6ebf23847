//! Groups: a set of event-loop connections, on any workers, that get the
//! same messages (a channel's subscribers, a room).
//!
//! A message published to a group costs one post per worker that has
//! members, whatever their number: the worker appends it to the group's
//! log there, and its members take it from the log when they are next
//! written, each from its own cursor. Nothing is queued per member and no
//! other thread touches a member's state, so a fan-out's cost is the
//! writes themselves. A member is written once per round over the group
//! with everything that waits for it; a message published while a round
//! runs goes out in that round to the members not yet written, and the
//! others get it in the next.
//!
//! A member's own messages ([`Remote::send`]) and its groups' come out in
//! the order they were sent: each queued message carries the number of
//! publications posted to its worker before it (see `remote::Inbox`).
//!
//! A member whose log grows past the group's [`QueueLimits`] (its socket
//! does not take what is written) is treated as a remote's queue would
//! be: `Close` ends it with the code, `Drop` and `Wait` skip the oldest
//! message for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::remote::{Inbox, Post, RemoteInner};
use super::Remote;
use crate::{Message, QueueLimits};

/// A set of event-loop connections that get the same messages: see the
/// module docs. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Group {
    shared: Arc<GroupShared>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("id", &self.shared.id)
            .field("members", &self.members())
            .finish()
    }
}

/// What a group's handles and its workers share.
pub(super) struct GroupShared {
    pub(super) id: u64,
    pub(super) limits: QueueLimits,
    /// The workers with members, and how many as posted (a worker lowers
    /// its count when a member leaves or its connection ends).
    workers: Mutex<Vec<(Arc<Inbox>, usize)>>,
    dropped: AtomicU64,
    closed: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl GroupShared {
    /// `n` members on `inbox`'s worker are gone (or their joins came too
    /// late).
    pub(super) fn left(&self, inbox: &Arc<Inbox>, n: usize) {
        let mut workers = lock(&self.workers);
        if let Some(at) = workers.iter().position(|(i, _)| Arc::ptr_eq(i, inbox)) {
            workers[at].1 = workers[at].1.saturating_sub(n);
            if workers[at].1 == 0 {
                workers.swap_remove(at);
            }
        }
    }

    pub(super) fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_closed(&self) {
        self.closed.fetch_add(1, Ordering::Relaxed);
    }
}

static NEXT_GROUP: AtomicU64 = AtomicU64::new(1);

impl Group {
    /// An empty group whose members' backlogs are bounded by `limits`.
    pub fn new(limits: QueueLimits) -> Group {
        Group {
            shared: Arc::new(GroupShared {
                id: NEXT_GROUP.fetch_add(1, Ordering::Relaxed),
                limits,
                workers: Mutex::new(Vec::new()),
                dropped: AtomicU64::new(0),
                closed: AtomicU64::new(0),
            }),
        }
    }

    /// Adds the connection: it gets the messages published from now on
    /// (after what was sent to it before). Joining twice is joining once.
    pub fn join(&self, remote: &Remote) {
        let inbox = &remote.inner.inbox;
        let mut workers = lock(&self.shared.workers);
        match workers.iter_mut().find(|(i, _)| Arc::ptr_eq(i, inbox)) {
            Some((_, members)) => *members += 1,
            None => workers.push((inbox.clone(), 1)),
        }
        // Posted under the lock: a publication that counted this member
        // is posted after its join.
        inbox.post(Post::Join {
            group: self.shared.clone(),
            remote: remote.inner.clone(),
        });
    }

    /// Removes the connection: nothing published from now on goes to it
    /// (what was published before still does).
    pub fn leave(&self, remote: &Remote) {
        remote.inner.inbox.post(Post::Leave {
            group: self.shared.id,
            remote: remote.inner.clone(),
        });
    }

    /// Sends `message` to every member; how many members it went to (as
    /// counted when it was posted).
    pub fn publish(&self, message: Message) -> usize {
        let workers = lock(&self.shared.workers);
        let mut members = 0;
        for (inbox, count) in workers.iter() {
            members += count;
            inbox.post(Post::Publish {
                group: self.shared.id,
                seq: 0,
                message: message.clone(),
            });
        }
        members
    }

    /// Members, as counted by the joins and leaves posted so far.
    pub fn members(&self) -> usize {
        lock(&self.shared.workers).iter().map(|(_, n)| n).sum()
    }

    /// Messages skipped for members that fell behind (policy `Drop` or
    /// `Wait`) since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.shared.dropped.swap(0, Ordering::Relaxed)
    }

    /// Members closed for falling behind (policy `Close`) since the last
    /// call.
    pub fn take_closed(&self) -> u64 {
        self.shared.closed.swap(0, Ordering::Relaxed)
    }
}

/// A member of a group on its worker.
pub(super) struct Member {
    /// Its connection's key (`usize::MAX`: it left).
    pub(super) key: usize,
    pub(super) remote: Arc<RemoteInner>,
    /// The number of the last publication it took.
    pub(super) cursor: u64,
}

pub(super) const LEFT: usize = usize::MAX;

/// A group on one worker: its members there and the messages some of
/// them have not taken yet.
pub(super) struct LocalGroup {
    pub(super) shared: Arc<GroupShared>,
    /// In the order they joined; a member that leaves is marked
    /// ([`LEFT`]) and taken out when no round runs, so that positions do
    /// not move under a round (connections know theirs).
    pub(super) members: Vec<Member>,
    pub(super) left: usize,
    /// Messages with their numbers, oldest first, and their bytes.
    pub(super) log: VecDeque<(u64, Message)>,
    pub(super) log_bytes: usize,
    /// A round over the members is under way; another must follow it.
    pub(super) in_round: bool,
    pub(super) again: bool,
}

impl LocalGroup {
    pub(super) fn new(shared: Arc<GroupShared>) -> LocalGroup {
        LocalGroup {
            shared,
            members: Vec::new(),
            left: 0,
            log: VecDeque::new(),
            log_bytes: 0,
            in_round: false,
            again: false,
        }
    }

    pub(super) fn live_members(&self) -> usize {
        self.members.len() - self.left
    }

    /// Where the first message after `cursor` is in the log (the log's
    /// length when there is none).
    pub(super) fn after(&self, cursor: u64) -> usize {
        self.log.partition_point(|(seq, _)| *seq <= cursor)
    }

    /// Whether `m` is `key`'s membership here (not a stale one: the
    /// slot reused by another group, or the member gone).
    pub(super) fn holds(&self, id: u64, at: usize, key: usize) -> bool {
        self.shared.id == id && self.members.get(at).is_some_and(|m| m.key == key)
    }

    /// Drops the messages every member has taken.
    pub(super) fn trim(&mut self) {
        let oldest = self
            .members
            .iter()
            .filter(|m| m.key != LEFT)
            .map(|m| m.cursor)
            .min();
        while let Some((seq, message)) = self.log.front() {
            if oldest.is_some_and(|oldest| *seq > oldest) {
                break;
            }
            self.log_bytes -= message.as_bytes().len();
            self.log.pop_front();
        }
        if self.log.is_empty() && self.log.capacity() > 64 {
            self.log = VecDeque::new();
        }
    }

    /// Whether the log holds more than the limits allow.
    pub(super) fn over_limits(&self) -> bool {
        let limits = &self.shared.limits;
        self.log.len() > limits.max_messages
            || (self.log_bytes > limits.max_bytes && self.log.len() > 1)
    }
}
