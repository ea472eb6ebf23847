//! Bidirectional emulation over plain HTTP, for networks that refuse the
//! WebSocket upgrade: a streamed response carries everything the hub
//! sends (Server-Sent Events at `GET /connection/sse`, or newline-delimited
//! JSON at `POST /connection/http_stream` for `fetch` and a
//! `ReadableStream`), and each batch of client commands goes up as
//! `POST /connection/emulation` naming the session.
//!
//! The client protocol is the WebSocket one (the same JSON commands,
//! replies and pushes); only the transport differs. The stream's first
//! message is the transport's own, `{"emulation":{"session":"ID"}}`; the
//! last, when the server ends it, says why
//! (`{"emulation":{"close":{"code":3001,"reason":"…"}}}`).
//!
//! No sticky sessions: a session lives on the node that holds its stream,
//! and its id starts with that node's id. A POST that lands on another
//! node is relayed there through the engine ([`Hub::relay`]). Relays may
//! cross, so each POST carries the session's sequence number (`seq`,
//! counting from one) and the owner runs them in that order, holding a
//! few that arrive early; one that never comes ends the session after a while (the
//! client reconnects and recovers, as after any lost connection).
//!
//! Bounds: a POST body is at most `client.max_message_size` (413 beyond);
//! a session holds at most [`MAX_PENDING`] batches not yet run (a flood
//! gets 429); the stream's queue has the WebSocket's limits and the same
//! slow-consumer policy.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::stream_queue::{Parts, Pushed, StreamQueue};
use crate::node::{ClientSink, FrameKind, Hub, OpeningRequest, SendOutcome, Transport};
use crate::protocol::Frame;
use crate::shards::lock;

/// The relay topic of emulation POSTs between nodes.
pub const RELAY_TOPIC: &str = "emulation";

/// Command batches a session holds before it runs them (early ones
/// waiting for their turn included).
pub const MAX_PENDING: usize = 64;

/// How long a session waits for a missing batch before it gives up.
const MISSING_BATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The emulation sessions of this node, by id.
#[derive(Default)]
pub struct Emulations {
    sessions: Mutex<HashMap<String, Arc<Emulated>>>,
}

/// A batch of commands for a session, as POSTed (and relayed).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// The session's id.
    pub session: String,
    /// Its place in the session's order, from 1.
    pub seq: u64,
    /// The commands: the text a WebSocket message would carry.
    pub text: String,
}

/// Why a batch was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// No such session (on its node, or its node is gone).
    #[error("unknown or ended session")]
    UnknownSession,
    /// A session id that no node makes.
    #[error("not a session id")]
    BadSession,
    /// The session holds too many batches.
    #[error("too many commands waiting for this session: slow down")]
    Flooded,
    /// `seq` 0.
    #[error("seq starts at 1")]
    BadSeq,
}

struct Emulated {
    order: Mutex<Order>,
    wake: Notify,
}

#[derive(Default)]
struct Order {
    /// The seq of the next batch to run.
    next: u64,
    /// Batches in order, ready to run.
    ready: VecDeque<String>,
    /// Batches that came early, by seq.
    early: BTreeMap<u64, String>,
    /// Since when a batch is missing (an early one waits).
    missing_since: Option<Instant>,
}

impl Emulations {
    /// A new session id on this node (its id first, for relays).
    pub(crate) fn new_id(hub: &Hub) -> String {
        format!(
            "{}.{:016x}{:016x}",
            hub.node_id(),
            rand::random::<u64>(),
            rand::random::<u64>()
        )
    }

    /// The node of a session id.
    pub fn node_of(session: &str) -> Option<&str> {
        let (node, rest) = session.split_once('.')?;
        (node.len() == 16
            && rest.len() == 32
            && session.bytes().all(|b| b == b'.' || b.is_ascii_hexdigit()))
        .then_some(node)
    }

    /// Takes a batch for one of this node's sessions.
    pub fn take(&self, batch: Batch) -> Result<(), BatchError> {
        if batch.seq == 0 {
            return Err(BatchError::BadSeq);
        }
        let session = lock(&self.sessions)
            .get(&batch.session)
            .cloned()
            .ok_or(BatchError::UnknownSession)?;
        {
            let mut order = lock(&session.order);
            if batch.seq < order.next {
                // A retry of one taken already.
                return Ok(());
            }
            if order.ready.len() + order.early.len() >= MAX_PENDING {
                return Err(BatchError::Flooded);
            }
            if batch.seq == order.next {
                order.ready.push_back(batch.text);
                order.next += 1;
                while let Some(text) = {
                    let next = order.next;
                    order.early.remove(&next)
                } {
                    order.ready.push_back(text);
                    order.next += 1;
                }
                order.missing_since = (!order.early.is_empty()).then(Instant::now);
            } else {
                order.early.insert(batch.seq, batch.text);
                order.missing_since.get_or_insert_with(Instant::now);
            }
        }
        session.wake.notify_one();
        Ok(())
    }

    /// Takes a batch here or relays it to its session's node.
    pub async fn take_or_relay(&self, hub: &Hub, batch: Batch) -> Result<(), BatchError> {
        let node = Emulations::node_of(&batch.session).ok_or(BatchError::BadSession)?;
        if node == hub.node_id() {
            return self.take(batch);
        }
        if !hub.node_is_up(node) {
            return Err(BatchError::UnknownSession);
        }
        let node = node.to_owned();
        match serde_json::to_string(&batch) {
            Ok(payload) => hub.relay(&node, RELAY_TOPIC, payload).await,
            Err(e) => tracing::warn!("emulation relay: {e}"),
        }
        Ok(())
    }

    /// Receives relayed batches on `hub`.
    pub fn listen(self: &Arc<Self>, hub: &Hub) {
        let me: Weak<Emulations> = Arc::downgrade(self);
        hub.on_relay(
            RELAY_TOPIC,
            Arc::new(move |payload: &str| {
                let Some(me) = me.upgrade() else { return };
                match serde_json::from_str::<Batch>(payload) {
                    Ok(batch) => {
                        if let Err(e) = me.take(batch) {
                            tracing::debug!("relayed emulation batch: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("unreadable relayed emulation batch: {e}"),
                }
            }),
        );
    }

    /// Opens a session for a new stream as `opening` says
    /// (the connect, usually). What the hub sends comes out of the
    /// returned stream, encoded for `kind`; the session ends when the
    /// stream is dropped (the client went away) or the hub closes it.
    pub fn open(
        self: &Arc<Self>,
        hub: &Hub,
        kind: StreamKind,
        opening: Opening,
    ) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        let id = Emulations::new_id(hub);
        let sink = Arc::new(StreamSink {
            kind,
            queue: StreamQueue::new(hub, kind.keepalive()),
        });
        sink.queue
            .push_raw(kind.encode(&format!(r#"{{"emulation":{{"session":"{id}"}}}}"#)));
        let gone = tokio_util::sync::CancellationToken::new();
        self.start(hub, id, sink.clone(), opening, gone.clone());
        let body = BodyState {
            sink,
            _gone: gone.drop_guard(),
        };
        futures_util::stream::unfold(body, |body| async move {
            let chunk = body.sink.queue.next_chunk().await?;
            Some((Ok(chunk), body))
        })
    }
}

impl Emulations {
    /// Runs session `id` over `sink`: first as `opening` says,
    /// then the batches POSTed for it, until the hub closes the sink or
    /// `gone` is cancelled (the client went away).
    pub(crate) fn start(
        self: &Arc<Self>,
        hub: &Hub,
        id: String,
        sink: Arc<dyn EmulatedSink>,
        opening: Opening,
        gone: tokio_util::sync::CancellationToken,
    ) {
        let emulated = Arc::new(Emulated {
            order: Mutex::new(Order {
                next: 1,
                ..Order::default()
            }),
            wake: Notify::new(),
        });
        lock(&self.sessions).insert(id.clone(), emulated.clone());
        tokio::spawn(run(
            hub.clone(),
            self.clone(),
            id,
            emulated,
            sink,
            opening,
            gone,
        ));
    }
}

/// How an emulated session opens.
pub struct Opening {
    /// Its first commands (the connect, usually), from the request that
    /// opened it.
    pub commands: String,
    /// What that connect needs of the request ([`Hub::opening_request`]).
    pub request: Option<Box<OpeningRequest>>,
}

/// A sink of an emulated session: it says when the hub closed it.
pub(crate) trait EmulatedSink: ClientSink {
    /// Closed by the hub.
    fn ended(&self) -> bool;
    /// Notified when the hub closes it.
    fn ended_signal(&self) -> &Notify;
}

impl EmulatedSink for StreamSink {
    fn ended(&self) -> bool {
        self.queue.is_done()
    }

    fn ended_signal(&self) -> &Notify {
        &self.queue.done
    }
}

/// The response body's side of a stream: when it is dropped (the client
/// went away, or the stream ended), the session ends.
struct BodyState {
    sink: Arc<StreamSink>,
    _gone: tokio_util::sync::DropGuard,
}

/// Runs one session: its first commands, then each batch in order, until
/// the stream is gone or the hub closed it.
async fn run(
    hub: Hub,
    emulations: Arc<Emulations>,
    id: String,
    emulated: Arc<Emulated>,
    sink: Arc<dyn EmulatedSink>,
    opening: Opening,
    gone: tokio_util::sync::CancellationToken,
) {
    let session = hub.open_with(sink.clone() as Arc<dyn ClientSink>, opening.request);
    if !opening.commands.trim().is_empty() {
        session.handle_text(&opening.commands).await;
    }
    let connect_deadline = Instant::now() + session.connect_timeout_after();
    let mut timed_out = false;
    loop {
        let next = {
            let mut order = lock(&emulated.order);
            if let Some(since) = order.missing_since {
                if since.elapsed() > MISSING_BATCH_TIMEOUT {
                    drop(order);
                    tracing::debug!(session = %id, "a command batch never came");
                    sink.close(3004, "a command batch was lost on its way: reconnect");
                    break;
                }
            }
            order.ready.pop_front()
        };
        if let Some(text) = next {
            Box::pin(session.handle_text(&text)).await;
            continue;
        }
        if sink.ended() {
            break;
        }
        let connect_wait = (!timed_out && !session.is_connected()).then_some(connect_deadline);
        // A timer only while a batch is missing: an idle session sleeps.
        let missing = lock(&emulated.order).missing_since.is_some();
        tokio::select! {
            _ = emulated.wake.notified() => {}
            _ = sink.ended_signal().notified() => {}
            _ = gone.cancelled() => break,
            _ = async {
                if missing {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {}
            _ = async {
                match connect_wait {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                timed_out = true;
                session.connect_timeout();
            }
        }
    }
    lock(&emulations.sessions).remove(&id);
    tracing::debug!(session = %id, client = %session.client_id(), "emulation session ended");
    session.close().await;
}

/// How a stream encodes the hub's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `text/event-stream`: each message an event (`data:` lines).
    Sse,
    /// `application/x-ndjson`: each message a line.
    Ndjson,
}

impl StreamKind {
    /// The response's content type.
    pub fn content_type(self) -> &'static str {
        match self {
            StreamKind::Sse => "text/event-stream",
            StreamKind::Ndjson => "application/x-ndjson",
        }
    }

    fn transport(self) -> Transport {
        match self {
            StreamKind::Sse => Transport::SSE,
            StreamKind::Ndjson => Transport::HTTP_STREAM,
        }
    }

    /// A frame as the parts of one message of the stream: the frame's own
    /// bytes (shared by every subscriber) between static framing; a frame
    /// of several lines (SSE: a `data:` each) is framed by copy.
    fn frame(self, text: tidewire::Utf8Text) -> Parts {
        match self {
            StreamKind::Sse if text.as_str().contains('\n') => {
                [self.encode(text.as_str()), Bytes::new(), Bytes::new()]
            }
            StreamKind::Sse => [
                Bytes::from_static(b"data: "),
                text.into_bytes(),
                Bytes::from_static(b"\n\n"),
            ],
            StreamKind::Ndjson => [text.into_bytes(), Bytes::from_static(b"\n"), Bytes::new()],
        }
    }

    /// One message (one or more JSON lines) as bytes of the stream.
    fn encode(self, text: &str) -> Bytes {
        match self {
            StreamKind::Sse => {
                let mut out = String::with_capacity(text.len() + 16);
                for line in text.split('\n') {
                    out.push_str("data: ");
                    out.push_str(line);
                    out.push('\n');
                }
                out.push('\n');
                Bytes::from(out)
            }
            StreamKind::Ndjson => {
                let mut out = String::with_capacity(text.len() + 1);
                out.push_str(text);
                out.push('\n');
                Bytes::from(out)
            }
        }
    }

    fn keepalive(self) -> &'static [u8] {
        match self {
            StreamKind::Sse => b": keepalive\n\n",
            StreamKind::Ndjson => b"\n",
        }
    }
}

/// The hub's side of a stream.
struct StreamSink {
    kind: StreamKind,
    queue: StreamQueue,
}

impl ClientSink for StreamSink {
    fn transport(&self) -> Transport {
        self.kind.transport()
    }

    fn send(&self, frame: Frame, kind: FrameKind) -> SendOutcome {
        let Frame::Text(text) = frame else {
            // The JSON codec sends text only.
            return SendOutcome::Dropped;
        };
        match self.queue.push(self.kind.frame(text), kind) {
            Pushed::Outcome(outcome) => outcome,
            Pushed::Overflow(code) => {
                self.close(code, "send queue full");
                SendOutcome::Closed
            }
        }
    }

    fn close(&self, code: u16, reason: &str) {
        let message = serde_json::json!({"emulation": {"close": {"code": code, "reason": reason}}});
        self.queue.close(self.kind.encode(&message.to_string()));
    }

    fn queued(&self) -> usize {
        self.queue.queued()
    }

    fn is_closing(&self) -> bool {
        self.queue.is_closing()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_name_their_node() {
        let id = format!("{}.{}", "0123456789abcdef", "f".repeat(32));
        assert_eq!(Emulations::node_of(&id), Some("0123456789abcdef"));
        assert_eq!(Emulations::node_of("nope"), None);
        assert_eq!(Emulations::node_of("0123456789abcdef.xyz"), None);
        let bad = format!("{}.{}", "0123456789abcdeg", "f".repeat(32));
        assert_eq!(Emulations::node_of(&bad), None);
    }

    #[test]
    fn messages_are_encoded_as_events_or_lines() {
        assert_eq!(
            &StreamKind::Sse.encode("{\"a\":1}\n{\"b\":2}")[..],
            b"data: {\"a\":1}\ndata: {\"b\":2}\n\n"
        );
        assert_eq!(&StreamKind::Ndjson.encode("{\"a\":1}")[..], b"{\"a\":1}\n");
        let joined = |parts: Parts| parts.concat();
        let text = |t: &'static str| tidewire::Utf8Text::from_static(t);
        assert_eq!(
            joined(StreamKind::Sse.frame(text("{\"a\":1}"))),
            b"data: {\"a\":1}\n\n"
        );
        assert_eq!(
            joined(StreamKind::Sse.frame(text("{\"a\":1}\n{\"b\":2}"))),
            b"data: {\"a\":1}\ndata: {\"b\":2}\n\n"
        );
        assert_eq!(
            joined(StreamKind::Ndjson.frame(text("{\"a\":1}"))),
            b"{\"a\":1}\n"
        );
    }
}
