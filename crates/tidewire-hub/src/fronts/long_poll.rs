//! Long-polling, for networks where even a streamed response does not get
//! through (proxies that hold a response until it ends):
//!
//! - `POST /connection/long_poll` with the first commands opens a session
//!   and answers like a poll.
//! - `GET /connection/long_poll?session=ID&ack=N` waits (at most `wait`
//!   seconds, 25 by default, 1 to 55) until something is queued, then
//!   answers with it as newline-delimited JSON: a first line
//!   `{"emulation":{"session":ID,"first":S}}` (S: the sequence number of the
//!   first message), then the messages S, S+1, …, and, when the server
//!   ended the session, `{"emulation":{"close":{"code","reason"}}}` last.
//! - `ack` is the number of the last message the client has: what it has
//!   not acknowledged is sent again (a response lost on its way loses
//!   nothing), and what it has is forgotten.
//! - Commands go up as for the other fallbacks, `POST /connection/emulation`.
//!
//! A session lives on the node that opened it (its id starts with the
//! node's id); a poll that lands on another node is relayed there and its
//! answer relayed back, so no sticky sessions are needed. At most one poll
//! waits per session: a second gets 409. A session that is not polled for
//! [`RESUME_DEADLINE`] ends. Unacknowledged messages count against the
//! queue limits and the slow-consumer policy, like a WebSocket's queue.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::emulation::{EmulatedSink, Emulations, Opening};
use crate::node::{ClientSink, FrameKind, Hub, SendOutcome, Transport};
use crate::protocol::{Frame, JSON};
use crate::shards::lock;

/// A session not polled for this long ends.
pub const RESUME_DEADLINE: Duration = Duration::from_secs(30);
/// How long a poll waits by default, and at most.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(25);
/// The longest wait a poll may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(55);
/// After the first message is queued, how long a poll waits for more to
/// go in the same answer.
const GATHER: Duration = Duration::from_millis(5);

const POLL_TOPIC: &str = "long_poll";
const ANSWER_TOPIC: &str = "long_poll_answer";

/// The transport of long-polling.
pub const TRANSPORT: Transport = Transport {
    name: "long_poll",
    codec: &JSON,
    unidirectional: true,
};

/// Why a poll got no messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PollError {
    /// No such session (ended, expired, or its node is gone).
    #[error("unknown or ended session")]
    UnknownSession,
    /// A session id no node makes.
    #[error("not a session id")]
    BadSession,
    /// Another poll waits for this session.
    #[error("another poll is waiting for this session: at most one at a time")]
    Busy,
    /// The relayed poll's node did not answer in time.
    #[error("the session's node did not answer")]
    NoAnswer,
}

#[derive(Default)]
struct PollState {
    /// Messages not acknowledged yet, from `first`.
    unacked: VecDeque<Bytes>,
    /// The sequence number of `unacked[0]`.
    first: u64,
    bytes: usize,
    /// Closed by the hub: the last line.
    closed: Option<Bytes>,
    /// A poll is waiting.
    polling: bool,
    /// When the last poll ended (or the session began).
    last_poll: Option<Instant>,
}

/// The hub's side of a long-polling session.
pub struct PollSink {
    state: Mutex<PollState>,
    wake: Notify,
    done: Notify,
    max_messages: usize,
    max_bytes: usize,
    close_on_overflow: Option<u16>,
    hub: Hub,
}

impl PollSink {
    fn new(hub: &Hub) -> PollSink {
        let settings = &hub.config().client;
        PollSink {
            state: Mutex::new(PollState {
                first: 1,
                last_poll: Some(Instant::now()),
                ..PollState::default()
            }),
            wake: Notify::new(),
            done: Notify::new(),
            max_messages: settings.queue_messages,
            max_bytes: settings.queue_bytes,
            close_on_overflow: match settings.slow_consumer {
                tidewire::SlowConsumer::Close(code) => Some(code.0),
                _ => None,
            },
            hub: hub.clone(),
        }
    }

    /// Forgets what the client has (up to and including `ack`).
    fn acknowledge(state: &mut PollState, ack: u64) {
        while state.first <= ack {
            let Some(bytes) = state.unacked.pop_front() else {
                // Acknowledging the future: nothing more to forget.
                state.first = ack + 1;
                break;
            };
            state.bytes -= bytes.len();
            state.first += 1;
        }
    }

    /// One poll: waits up to `wait` for something unacknowledged, then
    /// answers with it.
    async fn poll(&self, id: &str, ack: u64, wait: Duration) -> Result<String, PollError> {
        {
            let mut state = lock(&self.state);
            if state.polling {
                return Err(PollError::Busy);
            }
            state.polling = true;
            PollSink::acknowledge(&mut state, ack);
        }
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.wake.notified();
            {
                let state = lock(&self.state);
                if !state.unacked.is_empty() || state.closed.is_some() {
                    break;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        // A few more may be on their way (a reply and its pushes).
        if lock(&self.state).closed.is_none() {
            tokio::time::sleep(GATHER).await;
        }
        let mut state = lock(&self.state);
        state.polling = false;
        state.last_poll = Some(Instant::now());
        let mut out = String::with_capacity(state.bytes + 96);
        out.push_str(&format!(
            "{{\"emulation\":{{\"session\":\"{id}\",\"first\":{}}}}}\n",
            state.first
        ));
        for line in &state.unacked {
            out.push_str(std::str::from_utf8(line).unwrap_or(""));
            out.push('\n');
        }
        if let Some(last) = &state.closed {
            out.push_str(std::str::from_utf8(last).unwrap_or(""));
            out.push('\n');
        }
        Ok(out)
    }

    /// Not polled for longer than the deadline (and no poll waits).
    fn expired(&self) -> bool {
        let state = lock(&self.state);
        !state.polling
            && state
                .last_poll
                .is_some_and(|at| at.elapsed() > RESUME_DEADLINE)
    }
}

impl ClientSink for PollSink {
    fn transport(&self) -> Transport {
        TRANSPORT
    }

    fn send(&self, frame: Frame, kind: FrameKind) -> SendOutcome {
        let Some(text) = frame.as_text() else {
            return SendOutcome::Dropped;
        };
        let overflow = {
            let mut state = lock(&self.state);
            if state.closed.is_some() {
                return SendOutcome::Closed;
            }
            let lines: Vec<&str> = text.split('\n').filter(|l| !l.is_empty()).collect();
            let size: usize = lines.iter().map(|l| l.len()).sum();
            if state.unacked.len() + lines.len() <= self.max_messages
                && state.bytes + size <= self.max_bytes
            {
                for line in lines {
                    state.bytes += line.len();
                    state
                        .unacked
                        .push_back(Bytes::copy_from_slice(line.as_bytes()));
                }
                drop(state);
                self.wake.notify_one();
                return SendOutcome::Queued;
            }
            if kind == FrameKind::Publication && self.close_on_overflow.is_none() {
                return SendOutcome::Dropped;
            }
            self.close_on_overflow.unwrap_or(1013)
        };
        self.hub.metrics().slow_consumers.inc();
        self.close(overflow, "send queue full");
        SendOutcome::Closed
    }

    fn close(&self, code: u16, reason: &str) {
        let message = serde_json::json!({"emulation": {"close": {"code": code, "reason": reason}}});
        {
            let mut state = lock(&self.state);
            if state.closed.is_some() {
                return;
            }
            state.closed = Some(Bytes::from(message.to_string()));
        }
        self.wake.notify_one();
        self.done.notify_one();
    }

    fn queued(&self) -> usize {
        lock(&self.state).unacked.len()
    }

    fn is_closing(&self) -> bool {
        lock(&self.state).closed.is_some()
    }
}

impl EmulatedSink for PollSink {
    fn ended(&self) -> bool {
        lock(&self.state).closed.is_some()
    }

    fn ended_signal(&self) -> &Notify {
        &self.done
    }
}

/// A poll's answer: its body, or an HTTP status with the error's message.
type PollAnswer = Result<String, (u16, String)>;

/// A poll relayed to the session's node.
#[derive(Serialize, Deserialize)]
struct RelayedPoll {
    from: String,
    request: u64,
    session: String,
    ack: u64,
    wait_ms: u64,
}

/// Its answer, relayed back.
#[derive(Serialize, Deserialize)]
struct RelayedAnswer {
    request: u64,
    body: PollAnswer,
}

/// The long-polling sessions of this node, and polls relayed elsewhere.
#[derive(Default)]
pub struct LongPolls {
    sessions: Mutex<HashMap<String, Arc<PollSink>>>,
    next_request: AtomicU64,
    waiting: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<PollAnswer>>>,
}

/// The HTTP status of a poll error.
pub fn status_of(e: PollError) -> u16 {
    match e {
        PollError::UnknownSession => 404,
        PollError::BadSession => 400,
        PollError::Busy => 409,
        PollError::NoAnswer => 504,
    }
}

impl LongPolls {
    /// Opens a session as `opening` says; its later commands
    /// come through `emulations` after. The answer is that of a first poll.
    pub async fn open(
        self: &Arc<Self>,
        hub: &Hub,
        emulations: &Arc<Emulations>,
        opening: Opening,
        wait: Duration,
    ) -> String {
        let id = Emulations::new_id(hub);
        let sink = Arc::new(PollSink::new(hub));
        let gone = tokio_util::sync::CancellationToken::new();
        lock(&self.sessions).insert(id.clone(), sink.clone());
        emulations.start(hub, id.clone(), sink.clone(), opening, gone.clone());
        self.watch(id.clone(), sink.clone(), gone);
        sink.poll(&id, 0, wait)
            .await
            .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}\n"))
    }

    /// Ends the session when it is not polled in time, or forgets it once
    /// it ended and its last poll told the client.
    fn watch(
        self: &Arc<Self>,
        id: String,
        sink: Arc<PollSink>,
        gone: tokio_util::sync::CancellationToken,
    ) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let expired = sink.expired();
                if expired || gone.is_cancelled() {
                    gone.cancel();
                    if let Some(me) = me.upgrade() {
                        lock(&me.sessions).remove(&id);
                    }
                    return;
                }
            }
        });
    }

    /// A poll for a session of this node.
    async fn poll_here(
        &self,
        session: &str,
        ack: u64,
        wait: Duration,
    ) -> Result<String, PollError> {
        let sink = lock(&self.sessions)
            .get(session)
            .cloned()
            .ok_or(PollError::UnknownSession)?;
        sink.poll(session, ack, wait).await
    }

    /// A poll for a session of any node.
    ///
    /// # Errors
    /// As [`PollError`] says, with [`status_of`] for HTTP.
    pub async fn poll(&self, hub: &Hub, session: &str, ack: u64, wait: Duration) -> PollAnswer {
        let fail = |e: PollError| (status_of(e), e.to_string());
        let node = Emulations::node_of(session).ok_or_else(|| fail(PollError::BadSession))?;
        if node == hub.node_id() {
            return self.poll_here(session, ack, wait).await.map_err(fail);
        }
        if !hub.node_is_up(node) {
            return Err(fail(PollError::UnknownSession));
        }
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = tokio::sync::oneshot::channel();
        lock(&self.waiting).insert(request, answer);
        let relayed = RelayedPoll {
            from: hub.node_id().to_owned(),
            request,
            session: session.to_owned(),
            ack,
            wait_ms: wait.as_millis() as u64,
        };
        let node = node.to_owned();
        if let Ok(payload) = serde_json::to_string(&relayed) {
            hub.relay(&node, POLL_TOPIC, payload).await;
        }
        let result = tokio::time::timeout(wait + Duration::from_secs(5), answered).await;
        lock(&self.waiting).remove(&request);
        match result {
            Ok(Ok(answer)) => answer,
            _ => Err(fail(PollError::NoAnswer)),
        }
    }

    /// Serves relayed polls and their answers on `hub`.
    pub fn listen(self: &Arc<Self>, hub: &Hub) {
        let me: Weak<LongPolls> = Arc::downgrade(self);
        // Weak: the hub holds this handler.
        let relay_hub = hub.downgrade();
        hub.on_relay(
            POLL_TOPIC,
            Arc::new(move |payload: &str| {
                let Some(me) = me.upgrade() else { return };
                let Ok(poll) = serde_json::from_str::<RelayedPoll>(payload) else {
                    return tracing::warn!("unreadable relayed poll");
                };
                let Some(hub) = relay_hub.upgrade() else {
                    return;
                };
                tokio::spawn(async move {
                    let wait = Duration::from_millis(poll.wait_ms).min(MAX_WAIT);
                    let body = me
                        .poll_here(&poll.session, poll.ack, wait)
                        .await
                        .map_err(|e| (status_of(e), e.to_string()));
                    let answer = RelayedAnswer {
                        request: poll.request,
                        body,
                    };
                    if let Ok(payload) = serde_json::to_string(&answer) {
                        hub.relay(&poll.from, ANSWER_TOPIC, payload).await;
                    }
                });
            }),
        );
        let me: Weak<LongPolls> = Arc::downgrade(self);
        hub.on_relay(
            ANSWER_TOPIC,
            Arc::new(move |payload: &str| {
                let Some(me) = me.upgrade() else { return };
                let Ok(answer) = serde_json::from_str::<RelayedAnswer>(payload) else {
                    return tracing::warn!("unreadable relayed poll answer");
                };
                let waiting = lock(&me.waiting).remove(&answer.request);
                if let Some(waiting) = waiting {
                    let _ = waiting.send(answer.body);
                }
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledging_forgets_what_the_client_has() {
        let mut state = PollState {
            first: 1,
            ..PollState::default()
        };
        for n in 1..=4 {
            let line = Bytes::from(format!("{{\"n\":{n}}}"));
            state.bytes += line.len();
            state.unacked.push_back(line);
        }
        PollSink::acknowledge(&mut state, 2);
        assert_eq!(state.first, 3);
        assert_eq!(state.unacked.len(), 2);
        PollSink::acknowledge(&mut state, 2);
        assert_eq!(state.first, 3, "an old ack changes nothing");
        PollSink::acknowledge(&mut state, 9);
        assert!(state.unacked.is_empty());
        assert_eq!(state.bytes, 0);
    }
}
