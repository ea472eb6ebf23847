//! Detachable sessions: a session that outlives its transport for a
//! while, and is resumed by the next one.
//!
//! Long-polling and HTTP emulation carry a session over many requests:
//! between two of them there is no transport at all, yet the client stays
//! subscribed, present, and owed every publication. A front opens such a
//! session with [`Hub::open_resumable`]; when its request ends it calls
//! [`Session::detach`], and the next request brings the session back with
//! [`Hub::resume`] and the key. Meanwhile frames wait in a buffer bounded
//! like a send queue (`client.queue_messages`, `client.queue_bytes`):
//! past it publications are dropped (the slow-consumer `drop` policy) and
//! anything else ends the session. A session not resumed by its deadline
//! ends as if its connection had closed (leaves, presence removed): the
//! node's maintenance reaps it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::front::{ClientSink, FrameKind, SendOutcome, Transport};
use super::session::Session;
use super::{Hub, Node};
use crate::protocol::Frame;
use crate::shards::lock;

/// Why a session could not be resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResumeError {
    /// No detached session has this key (never had, or resumed already).
    #[error("no such session")]
    Unknown,
    /// Its deadline passed: it has ended.
    #[error("the session expired")]
    Expired,
    /// It ended while detached (disconnected, its buffer overflowed, or
    /// the server is shutting down).
    #[error("the session ended")]
    Closed,
}

/// Where a resumable session's frames go: its transport while it has
/// one, a bounded buffer while it has none.
pub(super) struct ResumableSink {
    /// The transport of the sink it was opened over (a resume brings one
    /// of the same front).
    transport: Transport,
    link: Mutex<Link>,
    max_messages: usize,
    max_bytes: usize,
}

enum Link {
    Attached(Arc<dyn ClientSink>),
    Detached {
        frames: VecDeque<(Frame, FrameKind)>,
        bytes: usize,
    },
    Closed,
}

impl ResumableSink {
    pub(super) fn new(
        sink: Arc<dyn ClientSink>,
        max_messages: usize,
        max_bytes: usize,
    ) -> ResumableSink {
        ResumableSink {
            transport: sink.transport(),
            link: Mutex::new(Link::Attached(sink)),
            max_messages,
            max_bytes,
        }
    }

    /// From now on frames wait in the buffer.
    fn detach(&self) {
        let mut link = lock(&self.link);
        if matches!(*link, Link::Attached(_)) {
            *link = Link::Detached {
                frames: VecDeque::new(),
                bytes: 0,
            };
        }
    }

    /// Hands what waited to `sink`, in order, and sends there from now on
    /// (under one lock: no frame can pass the buffered ones). False when
    /// the session ended while detached.
    fn attach(&self, sink: Arc<dyn ClientSink>) -> bool {
        let mut link = lock(&self.link);
        match std::mem::replace(&mut *link, Link::Closed) {
            Link::Detached { frames, .. } => {
                for (frame, kind) in frames {
                    sink.send(frame, kind);
                }
                *link = Link::Attached(sink);
                true
            }
            Link::Attached(old) => {
                *link = Link::Attached(old);
                false
            }
            Link::Closed => false,
        }
    }

    fn is_closed(&self) -> bool {
        matches!(*lock(&self.link), Link::Closed)
    }
}

impl ClientSink for ResumableSink {
    fn transport(&self) -> Transport {
        self.transport
    }

    fn send(&self, frame: Frame, kind: FrameKind) -> SendOutcome {
        let mut link = lock(&self.link);
        match &mut *link {
            Link::Attached(sink) => sink.send(frame, kind),
            Link::Detached { frames, bytes } => {
                let len = frame.as_bytes().len();
                if frames.len() < self.max_messages && *bytes + len <= self.max_bytes {
                    frames.push_back((frame, kind));
                    *bytes += len;
                    SendOutcome::Queued
                } else if kind == FrameKind::Publication {
                    SendOutcome::Dropped
                } else {
                    // A reply or control push it cannot hold: the client
                    // would be out of step, the session ends.
                    *link = Link::Closed;
                    SendOutcome::Closed
                }
            }
            Link::Closed => SendOutcome::Closed,
        }
    }

    fn send_deferred(&self, frame: Frame, kind: FrameKind) -> (SendOutcome, bool) {
        let link = lock(&self.link);
        if let Link::Attached(sink) = &*link {
            return sink.send_deferred(frame, kind);
        }
        drop(link);
        (self.send(frame, kind), false)
    }

    fn wake(&self) {
        if let Link::Attached(sink) = &*lock(&self.link) {
            sink.wake();
        }
    }

    fn close(&self, code: u16, reason: &str) {
        let mut link = lock(&self.link);
        match &*link {
            Link::Attached(sink) => sink.close(code, reason),
            Link::Detached { .. } => *link = Link::Closed,
            Link::Closed => {}
        }
    }

    fn queued(&self) -> usize {
        match &*lock(&self.link) {
            Link::Attached(sink) => sink.queued(),
            Link::Detached { frames, .. } => frames.len(),
            Link::Closed => 0,
        }
    }

    fn is_closing(&self) -> bool {
        match &*lock(&self.link) {
            Link::Attached(sink) => sink.is_closing(),
            Link::Detached { .. } => false,
            Link::Closed => true,
        }
    }
}

/// A session without a transport, waiting for [`Hub::resume`].
pub(super) struct Detached {
    session: Session,
    sink: Arc<ResumableSink>,
    deadline: Instant,
}

impl Session {
    /// The key that resumes this session after [`detach`](Self::detach)
    /// (hard to guess; give it to the client): `None` unless it was opened
    /// with [`Hub::open_resumable`].
    pub fn resume_key(&self) -> Option<&str> {
        self.resumable.as_ref().map(|r| r.1.as_str())
    }

    /// Leaves the session without a transport for at most `within`: it
    /// stays subscribed and present, and its frames wait (bounded) for
    /// [`Hub::resume`]. Returns the resume key; `None` (and the session
    /// ends) when it was not opened with [`Hub::open_resumable`].
    pub fn detach(self, within: Duration) -> Option<String> {
        let (sink, key) = (*self.resumable.clone()?).clone();
        sink.detach();
        let node = self.node.clone();
        let detached = Detached {
            session: self,
            sink,
            deadline: Instant::now() + within,
        };
        lock(&node.detached).insert(key.clone(), detached);
        Some(key)
    }
}

impl Hub {
    /// Opens a session that can be detached from its transport and
    /// resumed over another (see the module docs).
    pub fn open_resumable(&self, sink: Arc<dyn ClientSink>) -> Session {
        let config = &self.node.config.client;
        let resumable = Arc::new(ResumableSink::new(
            sink,
            config.queue_messages,
            config.queue_bytes,
        ));
        let mut session = self.open(resumable.clone());
        let key = format!("{}.{:032x}", session.client_id(), rand::random::<u128>());
        session.resumable = Some(Box::new((resumable, key)));
        session
    }

    /// Brings back a detached session over `sink`: what waited for it
    /// arrives first, in order.
    ///
    /// # Errors
    /// No such session, its deadline passed, or it ended while detached.
    pub fn resume(&self, key: &str, sink: Arc<dyn ClientSink>) -> Result<Session, ResumeError> {
        let detached = lock(&self.node.detached)
            .remove(key)
            .ok_or(ResumeError::Unknown)?;
        // Dropped on error: the session ends (its cleanup runs).
        if Instant::now() >= detached.deadline {
            return Err(ResumeError::Expired);
        }
        if !detached.sink.attach(sink) {
            return Err(ResumeError::Closed);
        }
        Ok(detached.session)
    }
}

impl Node {
    /// Ends the detached sessions whose deadline passed or that ended
    /// while detached (called by the maintenance task).
    pub(super) fn reap_detached(&self) {
        let now = Instant::now();
        let ended: Vec<Detached> = {
            let mut detached = lock(&self.detached);
            let keys: Vec<String> = detached
                .iter()
                .filter(|(_, d)| d.deadline <= now || d.sink.is_closed())
                .map(|(key, _)| key.clone())
                .collect();
            keys.iter().filter_map(|k| detached.remove(k)).collect()
        };
        // Dropped outside the lock: each session's cleanup is spawned.
        drop(ended);
    }
}
