//! The engine: what a node shares with the other nodes of a cluster, in
//! two parts.
//!
//! A [`Broker`] owns the publication streams (offset and epoch
//! assignment, history with size and TTL, the recovery query) and the
//! routing of publications and join/leave events to every node that has
//! subscribers ([`EngineEvents`], implemented by the node). A
//! [`PresenceStore`] owns who is in which channel, with entries that
//! expire unless their node refreshes them. An [`Engine`] is both
//! ([`MemoryEngine`], the single-node default; Redis); a node may also
//! take them from two ([`crate::Hub::with_engines`]). A Redis or NATS
//! broker publishes through the broker, and its subscription calls
//! `EngineEvents` on each node.
//!
//! The execution contract, the same for every engine: it calls
//! [`EngineEvents`] from any task (a delivery task, or a broker's reader
//! task), never while it holds a lock of its own, so a node may call the
//! engine back from a callback; it calls [`EngineEvents::publication`] for
//! the publications of one channel one at a time, in offset order. A
//! publication may reach a node after a history read that already
//! includes it (stored, then still on its way): the node skips what a
//! subscriber's position already covers (see the node's channels).
//! `publish` returns once the publication is stored and its position
//! known, without waiting for its delivery: the publisher's reply does not
//! wait for the fan-out. The memory engine queues a channel's publications
//! and hands them over from one delivery task per busy channel.
//!
//! Streams: a channel's stream (its epoch, newest offset and kept
//! publications) starts with its first publication, or with a history
//! read that asks for it ([`HistoryQuery::start_stream`]: a subscribe
//! does, so that its reply names a real epoch before anything was
//! published). It is forgotten [`HistoryOptions::ttl`] after the latest of
//! its last publication, the last read that asked to start it and the last
//! node's unsubscribe, never while a node is subscribed. A stream started
//! again gets a new epoch: no position from before can match it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::protocol::{ClientInfo, Position, Publication};

#[cfg(test)]
#[macro_use]
pub(crate) mod conformance;
mod link;
mod memory;
mod nats;
#[cfg(test)]
#[path = "../../tests/support/nats_server.rs"]
mod nats_server;
mod redis;
pub mod wire;

pub use self::redis::{system_clock, Clock, RedisConfig, RedisEngine};
pub use memory::MemoryEngine;
pub use nats::{NatsConfig, NatsEngine};

/// A boxed future, so that the trait is object-safe (`Arc<dyn Engine>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where an engine delivers what it routes (the node's side).
pub trait EngineEvents: Send + Sync {
    /// A publication in `channel`, to every local subscriber.
    fn publication(&self, channel: &str, publication: &Arc<Publication>);
    /// A client joined `channel`.
    fn join(&self, channel: &str, info: &Arc<ClientInfo>);
    /// A client left `channel`.
    fn leave(&self, channel: &str, info: &Arc<ClientInfo>);
    /// A control message from a node (this one included), as it was sent
    /// with [`Broker::publish_control`].
    fn control(&self, message: &[u8]);
    /// Publications of `channel` were lost on their way to this node and
    /// cannot be read back (the stream no longer holds them, or it was
    /// lost and started anew): the node's subscribers must subscribe again
    /// (and learn whether they recovered). Called in order with the
    /// channel's publications: the ones handed over after it come after
    /// the gap.
    fn gap(&self, channel: &str);
}

/// An engine failure.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The store or broker cannot be reached, or did not answer in time:
    /// worth retrying later.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The store answered with what this node cannot read (another
    /// version's data, or damaged): retrying will not help.
    #[error("engine data unreadable: {0}")]
    Corrupt(String),
}

/// The current position of a channel's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPosition {
    /// The offset of the newest publication (0 before the first).
    pub offset: u64,
    /// The stream's epoch: changes when the stream is lost and started
    /// anew (a restart of an in-memory engine, an expiry).
    pub epoch: Arc<str>,
}

/// How a channel keeps history (from its namespace's options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryOptions {
    /// Publications kept (0: none; publications get no offset).
    pub size: usize,
    /// How long they are kept; the stream itself (its epoch and offset)
    /// is forgotten this long after its last publication, start or
    /// unsubscribe once no node has subscribers (see the module docs).
    pub ttl: Duration,
}

impl HistoryOptions {
    /// No history.
    pub const NONE: HistoryOptions = HistoryOptions {
        size: 0,
        ttl: Duration::ZERO,
    };

    fn enabled(&self) -> bool {
        self.size > 0 && !self.ttl.is_zero()
    }
}

/// A history query.
#[derive(Debug, Clone)]
pub struct HistoryQuery {
    /// Publications after this offset (forward) or before it (reverse);
    /// `None`: the newest (reverse) or oldest (forward) kept.
    pub since: Option<u64>,
    /// Most publications returned.
    pub limit: usize,
    /// Newest first.
    pub reverse: bool,
    /// Start the channel's stream (a new epoch, offset 0) when it has
    /// none, in the same step as the read, so that the answer's position
    /// names a stream that later publications continue. A subscribe asks
    /// for this: its reply gives the epoch that publication pushes (which
    /// carry none) belong to. Plain history reads do not: reading alone
    /// leaves nothing behind.
    pub start_stream: bool,
    /// The channel's history options.
    pub options: HistoryOptions,
}

/// The answer to a history query.
#[derive(Debug, Clone)]
pub struct HistoryResult {
    /// The publications, in the order asked for.
    pub publications: Vec<Arc<Publication>>,
    /// The stream's current position: `{0, ""}` when the channel has no
    /// stream (nothing published yet, or it expired) and the query did
    /// not start one, or when the channel keeps no history.
    pub position: StreamPosition,
}

impl HistoryResult {
    /// Whether these publications (a forward query from `since`) are all
    /// that was published after `since`: same epoch, no gap at the start,
    /// nothing newer left out.
    ///
    /// Only a position in the stream's current epoch recovers. An empty
    /// epoch names no stream (a position from before subscribe replies
    /// named one, or an answer without a stream): it never recovers, even
    /// at offset 0, because a stream may have started, had publications
    /// and been lost (a restart, an expiry) since, and nothing tells.
    pub fn recovers(&self, since: &Position) -> bool {
        if since.epoch.is_empty()
            || *since.epoch != *self.position.epoch
            || since.offset > self.position.offset
        {
            return false;
        }
        if since.offset == self.position.offset {
            return true;
        }
        match (self.publications.first(), self.publications.last()) {
            (Some(first), Some(last)) => {
                first.offset == since.offset + 1 && last.offset == self.position.offset
            }
            _ => false,
        }
    }
}

/// Presence counts of a channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresenceStats {
    /// Clients present.
    pub clients: usize,
    /// Distinct users among them (anonymous clients count as one).
    pub users: usize,
}

/// Entries an engine holds, for metrics and leak tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Channel streams (history) kept.
    pub streams: usize,
    /// Publications kept over all streams.
    pub publications: usize,
    /// Channels with presence entries.
    pub presence_channels: usize,
    /// Channels some local node is subscribed to.
    pub subscribed_channels: usize,
}

/// The broker side of an engine: streams (offsets, epochs, history) and
/// the routing of publications and join/leave events to every node.
pub trait Broker: Send + Sync + 'static {
    /// Sets where publications and join/leave events go: called once by
    /// each node over this engine (a broker engine has one; the memory
    /// engine may have several, all in one process).
    fn set_events(&self, events: Weak<dyn EngineEvents>);

    /// This node has its first subscriber to `channel` (a broker engine
    /// subscribes to the channel's topic). The node calls it before it
    /// reads the channel's history for that subscriber.
    ///
    /// The node serialises the calls for one channel: `subscribe` only
    /// when the engine is not subscribed for it, `unsubscribe` only when
    /// it is, never two at a time; an engine need not count them.
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), EngineError>>;

    /// This node has no subscriber left in `channel` (see
    /// [`subscribe`](Broker::subscribe) for the order of the calls).
    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Publishes: assigns the next offset when the channel keeps history,
    /// stores it, and routes it to every node's subscribers, in order.
    /// Returns the publication's position (`None` without history).
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: Publication,
        options: HistoryOptions,
    ) -> BoxFuture<'a, Result<Option<StreamPosition>, EngineError>>;

    /// Routes a join event.
    fn publish_join<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
    ) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Routes a leave event.
    fn publish_leave<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
    ) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Sends a control message (opaque bytes) to every node over this
    /// broker, the sender included.
    fn publish_control<'a>(&'a self, message: &'a [u8]) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Reads history and the stream's current position, in one step
    /// (no publication slips between the two).
    ///
    /// Without a stream the position is `{0, ""}`, unless
    /// `query.start_stream`: then the engine starts the stream (a new
    /// epoch, offset 0) and answers with it; two such reads that race get
    /// the same epoch. A stream started so is forgotten like any other
    /// (see the module docs): a broker engine stores its epoch with the
    /// expiry `options.ttl`, which publications and unsubscribes extend.
    fn history<'a>(
        &'a self,
        channel: &'a str,
        query: HistoryQuery,
    ) -> BoxFuture<'a, Result<HistoryResult, EngineError>>;

    /// Whether the broker works (`/health`).
    fn health(&self) -> BoxFuture<'_, Result<(), EngineError>>;

    /// Drops what has expired; called about once a second by the node.
    fn maintain(&self) {}

    /// Entries held.
    fn stats(&self) -> EngineStats;
}

/// The presence side of an engine: who is in which channel, entries that
/// expire unless their node refreshes them.
pub trait PresenceStore: Send + Sync + 'static {
    /// Adds (or refreshes) a client's presence in a channel. The entry is
    /// forgotten `ttl` after unless added again: its node refreshes the
    /// entries of its clients well before, so that a node that dies
    /// leaves nobody present for longer than `ttl`.
    fn add_presence<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Removes a client's presence from a channel.
    fn remove_presence<'a>(
        &'a self,
        channel: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>>;

    /// Who is present in a channel.
    fn presence<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Arc<ClientInfo>>, EngineError>>;

    /// How many are present in a channel.
    fn presence_stats<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<PresenceStats, EngineError>>;

    /// Whether the store works (`/health`).
    fn presence_health(&self) -> BoxFuture<'_, Result<(), EngineError>>;

    /// Drops the entries whose TTL ran out; called about once a second by
    /// the node.
    fn expire_presence(&self) {}

    /// Channels with presence entries (for metrics and leak tests).
    fn presence_channels(&self) -> usize;
}

/// A whole engine: a [`Broker`] and a [`PresenceStore`] in one (the memory
/// engine, and Redis, are both). A node may also take them apart
/// ([`Hub::with_engines`](crate::Hub::with_engines)), say a NATS broker
/// with a Redis presence store.
pub trait Engine: Broker + PresenceStore {}

impl<T: Broker + PresenceStore> Engine for T {}
