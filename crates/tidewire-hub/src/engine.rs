//! The engine: what a node shares with the other nodes of a cluster.
//!
//! The [`Engine`] trait owns the publication streams (offset and epoch
//! assignment, history with size and TTL, the recovery query), presence,
//! and the routing of publications and join/leave events to every node
//! that has subscribers ([`EngineEvents`], implemented by the node).
//! [`MemoryEngine`] is the single-node default; a Redis or NATS engine
//! implements the same trait: `publish` then goes through the broker, and
//! the broker's subscription calls `EngineEvents` on each node.
//!
//! Order: an engine calls [`EngineEvents::publication`] for the
//! publications of one channel one at a time, in offset order.
//!
//! Streams: a channel's stream (its epoch, newest offset and kept
//! publications) starts with its first publication, or with a history
//! read that asks for it ([`HistoryQuery::start_stream`]: a subscribe
//! does, so that its reply names a real epoch before anything was
//! published). It is forgotten [`HistoryOptions::ttl`] after the latest of
//! its last publication, the last read that asked to start it and the last
//! node's unsubscribe, never while a node is subscribed. A stream started
//! again gets a new epoch: no position from before can match it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::{ClientInfo, Position, Publication};
use crate::shards::{lock, Shards};

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

/// The engine interface; see the module docs.
pub trait Engine: Send + Sync + 'static {
    /// Sets where publications and join/leave events go (called once by
    /// the node that owns the engine).
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
    /// [`subscribe`](Engine::subscribe) for the order of the calls).
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

    /// Adds (or updates) a client's presence in a channel.
    fn add_presence<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
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

    /// Whether the engine works (`/health`).
    fn health(&self) -> BoxFuture<'_, Result<(), EngineError>>;

    /// Drops what has expired; called about once a second by the node.
    fn maintain(&self) {}

    /// Entries held.
    fn stats(&self) -> EngineStats;
}

/// A new random epoch.
fn new_epoch() -> Arc<str> {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff).into()
}

struct Stream {
    epoch: Arc<str>,
    /// Offset of the newest publication.
    top: u64,
    /// Publications with their expiry, oldest first.
    entries: VecDeque<(Instant, Arc<Publication>)>,
    options: HistoryOptions,
    /// When the stream may be forgotten (if no node is subscribed).
    expires: Instant,
}

impl Stream {
    fn new(options: HistoryOptions, now: Instant) -> Stream {
        Stream {
            epoch: new_epoch(),
            top: 0,
            entries: VecDeque::new(),
            options,
            expires: now + options.ttl,
        }
    }

    fn trim(&mut self, now: Instant) {
        while self.entries.len() > self.options.size {
            self.entries.pop_front();
        }
        while self.entries.front().is_some_and(|(exp, _)| *exp <= now) {
            self.entries.pop_front();
        }
    }

    fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.top,
            epoch: self.epoch.clone(),
        }
    }
}

/// The in-memory, single-node engine (the embedded default).
///
/// Per channel stream one mutex, held while a publication is assigned its
/// offset, stored and handed to the node: publications of a channel are
/// delivered one at a time in offset order, and other channels never wait.
#[derive(Default)]
pub struct MemoryEngine {
    events: OnceLock<Weak<dyn EngineEvents>>,
    streams: Shards<String, Arc<Mutex<Stream>>>,
    presence: Shards<String, HashMap<String, Arc<ClientInfo>>>,
    /// Per channel: subscribes less unsubscribes (see `Engine::subscribe`).
    subscribed: Shards<String, usize>,
}

impl MemoryEngine {
    /// A new, empty engine.
    pub fn new() -> MemoryEngine {
        MemoryEngine::default()
    }

    fn events(&self) -> Option<Arc<dyn EngineEvents>> {
        self.events.get().and_then(Weak::upgrade)
    }

    /// The stream of `channel`, started if there is none.
    fn stream(&self, channel: &str, options: HistoryOptions) -> Arc<Mutex<Stream>> {
        let now = Instant::now();
        self.streams
            .lock(channel)
            .entry(channel.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(Stream::new(options, now))))
            .clone()
    }

    fn publish_now(
        &self,
        channel: &str,
        mut publication: Publication,
        options: HistoryOptions,
    ) -> Option<StreamPosition> {
        let events = self.events();
        if !options.enabled() {
            publication.offset = 0;
            if let Some(events) = events {
                events.publication(channel, &Arc::new(publication));
            }
            return None;
        }
        let stream = self.stream(channel, options);
        let mut stream = lock(&stream);
        let now = Instant::now();
        stream.options = options;
        stream.top += 1;
        publication.offset = stream.top;
        let publication = Arc::new(publication);
        stream
            .entries
            .push_back((now + options.ttl, publication.clone()));
        stream.trim(now);
        stream.expires = now + options.ttl;
        // Delivered under the stream's lock: the next publication of this
        // channel waits, so every subscriber sees offset order.
        if let Some(events) = events {
            events.publication(channel, &publication);
        }
        Some(stream.position())
    }

    fn history_now(&self, channel: &str, query: &HistoryQuery) -> HistoryResult {
        // Without history, or without a stream that the query does not
        // start: no publications, and the position {0, ""}.
        let stream = if !query.options.enabled() {
            None
        } else if query.start_stream {
            Some(self.stream(channel, query.options))
        } else {
            self.streams.lock(channel).get(channel).cloned()
        };
        let Some(stream) = stream else {
            return HistoryResult {
                publications: Vec::new(),
                position: StreamPosition {
                    offset: 0,
                    epoch: "".into(),
                },
            };
        };
        let mut stream = lock(&stream);
        let now = Instant::now();
        stream.options = query.options;
        if query.start_stream {
            // The reader subscribes next: a stream past its expiry but not
            // yet dropped must not go before, or the epoch just answered
            // would not be the one of the next publications.
            stream.expires = stream.expires.max(now + query.options.ttl);
        }
        stream.trim(now);
        let entries = stream.entries.iter().map(|(_, p)| p);
        let publications = if query.reverse {
            let before = query.since.unwrap_or(u64::MAX);
            entries
                .rev()
                .filter(|p| p.offset < before)
                .take(query.limit)
                .cloned()
                .collect()
        } else {
            let after = query.since.unwrap_or(0);
            entries
                .filter(|p| p.offset > after)
                .take(query.limit)
                .cloned()
                .collect()
        };
        HistoryResult {
            publications,
            position: stream.position(),
        }
    }
}

impl Engine for MemoryEngine {
    fn set_events(&self, events: Weak<dyn EngineEvents>) {
        let _ = self.events.set(events);
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        *self
            .subscribed
            .lock(channel)
            .entry(channel.to_owned())
            .or_default() += 1;
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        {
            let mut subscribed = self.subscribed.lock(channel);
            if let Some(count) = subscribed.get_mut(channel) {
                *count -= 1;
                if *count == 0 {
                    subscribed.remove(channel);
                }
            }
        }
        if let Some(stream) = self.streams.lock(channel).get(channel) {
            // The stream's TTL counts from the last subscriber leaving too.
            let mut stream = lock(stream);
            stream.expires = stream.expires.max(Instant::now() + stream.options.ttl);
        }
        Box::pin(async { Ok(()) })
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: Publication,
        options: HistoryOptions,
    ) -> BoxFuture<'a, Result<Option<StreamPosition>, EngineError>> {
        let position = self.publish_now(channel, publication, options);
        Box::pin(async move { Ok(position) })
    }

    fn publish_join<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        if let Some(events) = self.events() {
            events.join(channel, &info);
        }
        Box::pin(async { Ok(()) })
    }

    fn publish_leave<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        if let Some(events) = self.events() {
            events.leave(channel, &info);
        }
        Box::pin(async { Ok(()) })
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        query: HistoryQuery,
    ) -> BoxFuture<'a, Result<HistoryResult, EngineError>> {
        let result = self.history_now(channel, &query);
        Box::pin(async move { Ok(result) })
    }

    fn add_presence<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        self.presence
            .lock(channel)
            .entry(channel.to_owned())
            .or_default()
            .insert(info.client.clone(), info);
        Box::pin(async { Ok(()) })
    }

    fn remove_presence<'a>(
        &'a self,
        channel: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        let mut shard = self.presence.lock(channel);
        if let Some(clients) = shard.get_mut(channel) {
            clients.remove(client);
            if clients.is_empty() {
                shard.remove(channel);
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn presence<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Arc<ClientInfo>>, EngineError>> {
        let mut clients: Vec<Arc<ClientInfo>> = self
            .presence
            .lock(channel)
            .get(channel)
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default();
        clients.sort_by(|a, b| a.client.cmp(&b.client));
        Box::pin(async move { Ok(clients) })
    }

    fn presence_stats<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<PresenceStats, EngineError>> {
        let stats = match self.presence.lock(channel).get(channel) {
            None => PresenceStats::default(),
            Some(clients) => {
                let users: std::collections::HashSet<&str> =
                    clients.values().map(|c| c.user.as_str()).collect();
                PresenceStats {
                    clients: clients.len(),
                    users: users.len(),
                }
            }
        };
        Box::pin(async move { Ok(stats) })
    }

    fn health(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }

    fn maintain(&self) {
        let now = Instant::now();
        for mut shard in self.streams.each() {
            shard.retain(|channel, stream| {
                // Held elsewhere: in use right now, keep it.
                if Arc::strong_count(stream) > 1 {
                    return true;
                }
                let mut s = lock(stream);
                s.trim(now);
                s.expires > now
                    || !s.entries.is_empty()
                    || self.subscribed.lock(channel.as_str()).contains_key(channel)
            });
        }
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            streams: self.streams.len(),
            publications: self
                .streams
                .each()
                .map(|s| s.values().map(|st| lock(st).entries.len()).sum::<usize>())
                .sum(),
            presence_channels: self.presence.len(),
            subscribed_channels: self.subscribed.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn publication(text: &str) -> Publication {
        Publication {
            offset: 0,
            data: RawValue::from_string(format!("{text:?}")).unwrap(),
            info: None,
        }
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, u64, String)>>);

    impl EngineEvents for Recorder {
        fn publication(&self, channel: &str, p: &Arc<Publication>) {
            lock(&self.0).push((channel.into(), p.offset, p.data.get().into()));
        }
        fn join(&self, channel: &str, info: &Arc<ClientInfo>) {
            lock(&self.0).push((channel.into(), 0, format!("join {}", info.client)));
        }
        fn leave(&self, channel: &str, info: &Arc<ClientInfo>) {
            lock(&self.0).push((channel.into(), 0, format!("leave {}", info.client)));
        }
    }

    const KEEP: HistoryOptions = HistoryOptions {
        size: 3,
        ttl: Duration::from_secs(60),
    };

    fn query(since: Option<u64>, limit: usize, reverse: bool) -> HistoryQuery {
        HistoryQuery {
            since,
            limit,
            reverse,
            start_stream: false,
            options: KEEP,
        }
    }

    /// The read of a subscribe: recovers from `since`, starts the stream.
    fn subscribe_read(since: u64) -> HistoryQuery {
        HistoryQuery {
            start_stream: true,
            ..query(Some(since), KEEP.size, false)
        }
    }

    fn at(offset: u64, epoch: &str) -> Position {
        Position {
            offset,
            epoch: epoch.into(),
        }
    }

    fn offsets(r: &HistoryResult) -> Vec<u64> {
        r.publications.iter().map(|p| p.offset).collect()
    }

    #[tokio::test]
    async fn offsets_increase_per_channel_and_events_follow_in_order() {
        let engine = MemoryEngine::new();
        let recorder = Arc::new(Recorder::default());
        let events: Arc<dyn EngineEvents> = recorder.clone();
        engine.set_events(Arc::downgrade(&events));
        let a1 = engine
            .publish("a", publication("1"), KEEP)
            .await
            .unwrap()
            .unwrap();
        let a2 = engine
            .publish("a", publication("2"), KEEP)
            .await
            .unwrap()
            .unwrap();
        let b1 = engine
            .publish("b", publication("x"), KEEP)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((a1.offset, a2.offset, b1.offset), (1, 2, 1));
        assert_eq!(a1.epoch, a2.epoch);
        assert_ne!(a1.epoch, b1.epoch);
        let none = engine
            .publish("c", publication("y"), HistoryOptions::NONE)
            .await
            .unwrap();
        assert!(none.is_none());
        let seen: Vec<(String, u64)> = lock(&recorder.0)
            .iter()
            .map(|(c, o, _)| (c.clone(), *o))
            .collect();
        assert_eq!(
            seen,
            [
                ("a".into(), 1),
                ("a".into(), 2),
                ("b".into(), 1),
                ("c".into(), 0)
            ]
        );
        assert_eq!(engine.stats().streams, 2);
    }

    #[tokio::test]
    async fn history_is_bounded_by_size_and_queried_both_ways() {
        let engine = MemoryEngine::new();
        for i in 1..=5 {
            engine
                .publish("a", publication(&i.to_string()), KEEP)
                .await
                .unwrap();
        }
        let all = engine.history("a", query(None, 10, false)).await.unwrap();
        assert_eq!(offsets(&all), [3, 4, 5]);
        assert_eq!(all.position.offset, 5);
        assert_eq!(
            offsets(
                &engine
                    .history("a", query(Some(3), 10, false))
                    .await
                    .unwrap()
            ),
            [4, 5]
        );
        assert_eq!(
            offsets(&engine.history("a", query(None, 2, true)).await.unwrap()),
            [5, 4]
        );
        assert_eq!(
            offsets(&engine.history("a", query(Some(5), 1, true)).await.unwrap()),
            [4]
        );
        assert_eq!(
            offsets(&engine.history("a", query(None, 0, false)).await.unwrap()),
            [] as [u64; 0]
        );
    }

    #[tokio::test]
    async fn recovery_is_complete_only_without_gaps_in_the_same_epoch() {
        let engine = MemoryEngine::new();
        for i in 1..=5 {
            engine
                .publish("a", publication(&i.to_string()), KEEP)
                .await
                .unwrap();
        }
        let r = engine
            .history("a", query(Some(3), 100, false))
            .await
            .unwrap();
        let epoch = r.position.epoch.to_string();
        let at = |offset| Position {
            offset,
            epoch: epoch.clone(),
        };
        assert!(r.recovers(&at(3)));
        assert!(engine
            .history("a", query(Some(5), 100, false))
            .await
            .unwrap()
            .recovers(&at(5)));
        // Offset 2 fell out of the 3-publication history: a gap.
        assert!(!engine
            .history("a", query(Some(1), 100, false))
            .await
            .unwrap()
            .recovers(&at(1)));
        // Another epoch, or an offset from the future.
        let other = Position {
            offset: 3,
            epoch: "other".into(),
        };
        assert!(!r.recovers(&other));
        assert!(!engine
            .history("a", query(Some(9), 100, false))
            .await
            .unwrap()
            .recovers(&at(9)));
    }

    #[tokio::test]
    async fn a_plain_read_creates_no_stream_and_its_empty_epoch_recovers_nothing() {
        let engine = MemoryEngine::new();
        let r = engine
            .history("a", query(Some(0), 10, false))
            .await
            .unwrap();
        assert_eq!((r.position.offset, &*r.position.epoch), (0, ""));
        assert!(!r.recovers(&at(0, "")), "no stream proves nothing");
        assert_eq!(engine.stats().streams, 0);
        engine.publish("a", publication("1"), KEEP).await.unwrap();
        let r = engine
            .history("a", query(Some(0), 10, false))
            .await
            .unwrap();
        assert_eq!(offsets(&r), [1]);
        assert!(
            !r.recovers(&at(0, "")),
            "an empty epoch matches no stream, not even from its start"
        );
    }

    #[tokio::test]
    async fn a_subscribe_read_starts_the_stream_at_offset_0_and_publications_continue_it() {
        let engine = MemoryEngine::new();
        let r = engine.history("a", subscribe_read(0)).await.unwrap();
        let epoch = r.position.epoch.to_string();
        assert_eq!(r.position.offset, 0);
        assert_eq!(epoch.len(), 12);
        assert!(r.recovers(&at(0, &epoch)));
        assert_eq!(engine.stats().streams, 1);
        // A second subscriber gets the same stream.
        let again = engine.history("a", subscribe_read(0)).await.unwrap();
        assert_eq!(again.position, r.position);
        for i in 1..=2 {
            let p = engine
                .publish("a", publication(&i.to_string()), KEEP)
                .await
                .unwrap()
                .unwrap();
            assert_eq!((p.offset, &*p.epoch), (i, epoch.as_str()));
        }
        let r = engine.history("a", subscribe_read(0)).await.unwrap();
        assert_eq!(offsets(&r), [1, 2]);
        assert!(r.recovers(&at(0, &epoch)));
        assert!(!r.recovers(&at(0, "")));
        for i in 3..=5 {
            engine
                .publish("a", publication(&i.to_string()), KEEP)
                .await
                .unwrap();
        }
        // Offset 1 is gone (history of 3): not recoverable from the start.
        let r = engine.history("a", subscribe_read(0)).await.unwrap();
        assert!(!r.recovers(&at(0, &epoch)));
    }

    #[tokio::test]
    async fn a_position_from_before_a_restart_does_not_recover() {
        let before = MemoryEngine::new();
        let seen = before.history("a", subscribe_read(0)).await.unwrap();
        // The restarted engine: the stream starts anew, with another epoch.
        let after = MemoryEngine::new();
        after.publish("a", publication("1"), KEEP).await.unwrap();
        let r = after.history("a", subscribe_read(0)).await.unwrap();
        assert_ne!(r.position.epoch, seen.position.epoch);
        assert_eq!(offsets(&r), [1]);
        assert!(!r.recovers(&at(0, &seen.position.epoch)));
        // Nothing published since the restart: still another stream.
        let empty = MemoryEngine::new()
            .history("a", subscribe_read(0))
            .await
            .unwrap();
        assert!(!empty.recovers(&at(0, &seen.position.epoch)));
    }

    #[tokio::test(start_paused = true)]
    async fn history_and_streams_expire_after_their_ttl() {
        let engine = MemoryEngine::new();
        engine.publish("a", publication("1"), KEEP).await.unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        engine.publish("a", publication("2"), KEEP).await.unwrap();
        tokio::time::advance(Duration::from_secs(31)).await;
        let r = engine.history("a", query(None, 10, false)).await.unwrap();
        assert_eq!(offsets(&r), [2]);
        let epoch = r.position.epoch.clone();
        assert_eq!(maintain_after(&engine, 30).await, EngineStats::default());
        // A new stream: new epoch, offsets from 1.
        let p = engine
            .publish("a", publication("3"), KEEP)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p.offset, 1);
        assert_ne!(p.epoch, epoch);
    }

    /// Lets `secs` pass (paused clock), runs the engine's upkeep and
    /// returns what it holds then.
    async fn maintain_after(engine: &MemoryEngine, secs: u64) -> EngineStats {
        tokio::time::advance(Duration::from_secs(secs)).await;
        engine.maintain();
        engine.stats()
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscribed_stream_is_kept_past_its_ttl() {
        let engine = MemoryEngine::new();
        engine.subscribe("a").await.unwrap();
        engine.publish("a", publication("1"), KEEP).await.unwrap();
        assert_eq!(maintain_after(&engine, 120).await.streams, 1);
        engine.unsubscribe("a").await.unwrap();
        assert_eq!(maintain_after(&engine, 61).await, EngineStats::default());
    }

    /// One client leaves a channel as another joins it: the node's
    /// subscribe can come before the unsubscribe of the previous subscriber.
    /// The node still has a subscriber, so the stream stays.
    #[tokio::test(start_paused = true)]
    async fn overlapping_subscribe_and_unsubscribe_are_counted() {
        let engine = MemoryEngine::new();
        engine.subscribe("a").await.unwrap();
        engine.publish("a", publication("1"), KEEP).await.unwrap();
        engine.subscribe("a").await.unwrap();
        engine.unsubscribe("a").await.unwrap();
        assert_eq!(engine.stats().subscribed_channels, 1);
        assert_eq!(maintain_after(&engine, 600).await.streams, 1);
        engine.unsubscribe("a").await.unwrap();
        assert_eq!(maintain_after(&engine, 61).await, EngineStats::default());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_started_by_a_subscribe_is_forgotten_like_any_other() {
        let engine = MemoryEngine::new();
        // Never subscribed (the subscribe failed after its read): forgotten
        // ttl after its start.
        engine.history("a", subscribe_read(0)).await.unwrap();
        assert_eq!(maintain_after(&engine, 59).await.streams, 1);
        assert_eq!(maintain_after(&engine, 2).await, EngineStats::default());
        // Subscribed: kept however long; forgotten ttl after the unsubscribe.
        let epoch = engine
            .history("a", subscribe_read(0))
            .await
            .unwrap()
            .position
            .epoch;
        engine.subscribe("a").await.unwrap();
        assert_eq!(maintain_after(&engine, 600).await.streams, 1);
        engine.unsubscribe("a").await.unwrap();
        assert_eq!(maintain_after(&engine, 59).await.streams, 1);
        // Past its expiry but not dropped yet: a subscribe's read keeps it
        // another ttl, the epoch it answers stays the stream's.
        tokio::time::advance(Duration::from_secs(2)).await;
        let kept = engine.history("a", subscribe_read(0)).await.unwrap();
        assert_eq!(kept.position.epoch, epoch);
        assert_eq!(maintain_after(&engine, 59).await.streams, 1);
        assert_eq!(maintain_after(&engine, 2).await, EngineStats::default());
        let r = engine.history("a", subscribe_read(0)).await.unwrap();
        assert_ne!(r.position.epoch, epoch, "started anew");
        assert!(!r.recovers(&at(0, &epoch)));
    }

    #[tokio::test]
    async fn presence_is_removed_with_its_last_client() {
        let engine = MemoryEngine::new();
        let info = |client: &str, user: &str| {
            Arc::new(ClientInfo {
                client: client.into(),
                user: user.into(),
                info: None,
            })
        };
        engine.add_presence("a", info("c1", "u1")).await.unwrap();
        engine.add_presence("a", info("c2", "u1")).await.unwrap();
        engine.add_presence("a", info("c3", "u2")).await.unwrap();
        let stats = engine.presence_stats("a").await.unwrap();
        assert_eq!((stats.clients, stats.users), (3, 2));
        let who: Vec<String> = engine
            .presence("a")
            .await
            .unwrap()
            .iter()
            .map(|c| c.client.clone())
            .collect();
        assert_eq!(who, ["c1", "c2", "c3"]);
        for c in ["c1", "c2", "c3"] {
            engine.remove_presence("a", c).await.unwrap();
        }
        assert_eq!(engine.stats().presence_channels, 0);
        assert_eq!(
            engine.presence_stats("a").await.unwrap(),
            PresenceStats::default()
        );
    }
}
