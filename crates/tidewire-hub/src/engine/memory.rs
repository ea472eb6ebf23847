//! [`MemoryEngine`]: the in-memory, single-node engine (the embedded
//! default).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock, Weak};

use tokio::time::Instant;

use super::{
    BoxFuture, Broker, EngineError, EngineEvents, EngineStats, HistoryOptions, HistoryQuery,
    HistoryResult, PresenceStats, PresenceStore, StreamPosition,
};
use crate::protocol::{ClientInfo, Publication};
use crate::shards::{lock, Shards};

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

/// A channel's stream, and the publications of it waiting to be handed
/// to the nodes (outside the stream's lock, in offset order).
struct StreamCell {
    stream: Mutex<Stream>,
    delivery: Arc<Mutex<Delivery>>,
}

/// A channel's publications on their way to the nodes.
#[derive(Default)]
struct Delivery {
    waiting: VecDeque<Arc<Publication>>,
    /// A delivery task is handing them over: publishers only queue theirs.
    busy: bool,
}

/// The nodes over an engine (replaced whole when one joins, so that a
/// delivery takes the list and holds no lock).
type Nodes = RwLock<Arc<Vec<Weak<dyn EngineEvents>>>>;

/// Calls `deliver` for every node still there, holding no lock.
fn each_node(nodes: &Nodes, mut deliver: impl FnMut(&dyn EngineEvents)) {
    let nodes = nodes.read().unwrap_or_else(|e| e.into_inner()).clone();
    for node in nodes.iter() {
        if let Some(node) = node.upgrade() {
            deliver(&*node);
        }
    }
}

/// Queues `publication` on its channel's delivery, and starts a delivery
/// task unless one is running: the publisher does not wait for the
/// fan-out (its reply goes out at once), and one task per channel at a
/// time keeps the channel's publications in order.
fn queue(
    nodes: &Arc<Nodes>,
    channel: &str,
    delivery: &Arc<Mutex<Delivery>>,
    publication: Arc<Publication>,
) {
    let start = {
        let mut queued = lock(delivery);
        queued.waiting.push_back(publication);
        !std::mem::replace(&mut queued.busy, true)
    };
    if start {
        tokio::spawn(hand_over(nodes.clone(), channel.into(), delivery.clone()));
    }
}

/// A channel's delivery task: hands its queued publications to the nodes,
/// oldest first, and ends when none is left.
async fn hand_over(nodes: Arc<Nodes>, channel: Box<str>, delivery: Arc<Mutex<Delivery>>) {
    /// Lets the next publisher start a task again should a node's
    /// callback panic (the publications queued stay queued).
    struct Idle<'a>(&'a Mutex<Delivery>);
    impl Drop for Idle<'_> {
        fn drop(&mut self) {
            lock(self.0).busy = false;
        }
    }
    let idle = Idle(&delivery);
    let mut handed = 0u32;
    loop {
        let next = {
            let mut queued = lock(&delivery);
            match queued.waiting.pop_front() {
                Some(next) => next,
                None => {
                    // Marked idle under the lock that publishers queue
                    // under: a publication queued after this starts a task.
                    queued.busy = false;
                    std::mem::forget(idle);
                    return;
                }
            }
        };
        each_node(&nodes, |node| node.publication(&channel, &next));
        handed += 1;
        // A channel that never stops publishing shares its worker thread.
        if handed.is_multiple_of(32) {
            tokio::task::yield_now().await;
        }
    }
}

/// The in-memory engine (the embedded default): one process, one node,
/// or several nodes in one process sharing it (each `Hub` over the same
/// engine is a node; tests use this for cluster behaviour).
///
/// Per channel stream one mutex, held while a publication is assigned its
/// offset and stored and queued for delivery; a delivery task per busy
/// channel hands the publications to the nodes, one at a time in offset
/// order, holding no lock. Publishing needs a tokio runtime.
#[derive(Default)]
pub struct MemoryEngine {
    nodes: Arc<Nodes>,
    streams: Shards<String, Arc<StreamCell>>,
    /// The deliveries of channels without history (no stream to hold
    /// them); idle ones are dropped by `maintain`.
    live: Shards<String, Arc<Mutex<Delivery>>>,
    /// Per channel, per client: the entry and when it expires.
    presence: Shards<String, HashMap<String, (Arc<ClientInfo>, Instant)>>,
    /// Per channel: subscribes less unsubscribes (see `Engine::subscribe`).
    subscribed: Shards<String, usize>,
}

impl MemoryEngine {
    /// A new, empty engine.
    pub fn new() -> MemoryEngine {
        MemoryEngine::default()
    }

    /// Calls `deliver` for every node still there, holding no lock.
    fn each_node(&self, deliver: impl FnMut(&dyn EngineEvents)) {
        each_node(&self.nodes, deliver);
    }

    /// The stream of `channel`, started if there is none.
    fn stream(&self, channel: &str, options: HistoryOptions) -> Arc<StreamCell> {
        let now = Instant::now();
        self.streams
            .lock(channel)
            .entry(channel.to_owned())
            .or_insert_with(|| {
                Arc::new(StreamCell {
                    stream: Mutex::new(Stream::new(options, now)),
                    delivery: Arc::default(),
                })
            })
            .clone()
    }

    fn publish_now(
        &self,
        channel: &str,
        mut publication: Publication,
        options: HistoryOptions,
    ) -> Option<StreamPosition> {
        if !options.enabled() {
            publication.offset = 0;
            let delivery = self
                .live
                .lock(channel)
                .entry(channel.to_owned())
                .or_default()
                .clone();
            queue(&self.nodes, channel, &delivery, Arc::new(publication));
            return None;
        }
        let cell = self.stream(channel, options);
        let mut stream = lock(&cell.stream);
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
        // Queued under the stream's lock, so in offset order.
        queue(&self.nodes, channel, &cell.delivery, publication);
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
        let mut stream = lock(&stream.stream);
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

impl Broker for MemoryEngine {
    fn set_events(&self, events: Weak<dyn EngineEvents>) {
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<Weak<dyn EngineEvents>> = nodes
            .iter()
            .filter(|node| node.strong_count() > 0)
            .cloned()
            .collect();
        list.push(events);
        *nodes = Arc::new(list);
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
            let mut stream = lock(&stream.stream);
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
        Box::pin(async move { Ok(self.publish_now(channel, publication, options)) })
    }

    fn publish_join<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        self.each_node(|node| node.join(channel, &info));
        Box::pin(async { Ok(()) })
    }

    fn publish_leave<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        self.each_node(|node| node.leave(channel, &info));
        Box::pin(async { Ok(()) })
    }

    fn publish_control<'a>(&'a self, message: &'a [u8]) -> BoxFuture<'a, Result<(), EngineError>> {
        self.each_node(|node| node.control(message));
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

    fn health(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }

    fn maintain(&self) {
        let now = Instant::now();
        for mut shard in self.live.each() {
            // Held elsewhere: a publisher or a delivery task has it.
            shard.retain(|_, delivery| Arc::strong_count(delivery) > 1);
        }
        for mut shard in self.streams.each() {
            shard.retain(|channel, stream| {
                // Held elsewhere: in use right now, keep it.
                if Arc::strong_count(stream) > 1 {
                    return true;
                }
                let mut s = lock(&stream.stream);
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
                .map(|s| {
                    s.values()
                        .map(|cell| lock(&cell.stream).entries.len())
                        .sum::<usize>()
                })
                .sum(),
            presence_channels: self.presence.len(),
            subscribed_channels: self.subscribed.len(),
        }
    }
}

impl PresenceStore for MemoryEngine {
    fn add_presence<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        let expires = Instant::now() + ttl;
        self.presence
            .lock(channel)
            .entry(channel.to_owned())
            .or_default()
            .insert(info.client.clone(), (info, expires));
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
        let now = Instant::now();
        let mut clients: Vec<Arc<ClientInfo>> = self
            .presence
            .lock(channel)
            .get(channel)
            .map(|c| {
                c.values()
                    .filter(|(_, expires)| *expires > now)
                    .map(|(info, _)| info.clone())
                    .collect()
            })
            .unwrap_or_default();
        clients.sort_by(|a, b| a.client.cmp(&b.client));
        Box::pin(async move { Ok(clients) })
    }

    fn presence_stats<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<PresenceStats, EngineError>> {
        let now = Instant::now();
        let stats = match self.presence.lock(channel).get(channel) {
            None => PresenceStats::default(),
            Some(clients) => {
                let live: Vec<&Arc<ClientInfo>> = clients
                    .values()
                    .filter(|(_, expires)| *expires > now)
                    .map(|(info, _)| info)
                    .collect();
                let users: std::collections::HashSet<&str> =
                    live.iter().map(|c| c.user.as_str()).collect();
                PresenceStats {
                    clients: live.len(),
                    users: users.len(),
                }
            }
        };
        Box::pin(async move { Ok(stats) })
    }

    fn presence_health(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async { Ok(()) })
    }

    fn expire_presence(&self) {
        let now = Instant::now();
        for mut shard in self.presence.each() {
            shard.retain(|_, clients| {
                clients.retain(|_, (_, expires)| *expires > now);
                !clients.is_empty()
            });
        }
    }

    fn presence_channels(&self) -> usize {
        self.presence.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::MemoryEngine;
    use crate::engine::conformance::Harness;
    use crate::engine::{BoxFuture, Broker, Engine};

    /// The memory engine on tokio's paused clock.
    struct Memory;

    impl Harness for Memory {
        fn engine(&self) -> BoxFuture<'_, Arc<dyn Engine>> {
            Box::pin(async { Arc::new(MemoryEngine::new()) as Arc<dyn Engine> })
        }

        fn pass<'a>(&'a self, engine: &'a dyn Engine, secs: u64) -> BoxFuture<'a, ()> {
            Box::pin(async move {
                tokio::time::advance(Duration::from_secs(secs)).await;
                engine.maintain();
                engine.expire_presence();
            })
        }

        fn advance(&self, secs: u64) -> BoxFuture<'_, ()> {
            Box::pin(tokio::time::advance(Duration::from_secs(secs)))
        }
    }

    conformance_suite!(Memory);

    /// The execution contract: the engine holds no lock of its own while
    /// it hands events over, so a node may call it back from a callback.
    #[test]
    fn a_node_may_call_the_engine_back_from_its_events() {
        use std::sync::{Mutex, OnceLock, Weak};

        use crate::engine::{EngineEvents, HistoryOptions, HistoryQuery, PresenceStore};
        use crate::protocol::{ClientInfo, Publication};

        #[derive(Default)]
        struct CallsBack {
            engine: OnceLock<Weak<MemoryEngine>>,
            seen: Mutex<Vec<u64>>,
        }
        impl EngineEvents for CallsBack {
            fn publication(&self, channel: &str, p: &Arc<Publication>) {
                if let Some(engine) = self.engine.get().and_then(Weak::upgrade) {
                    let options = HistoryOptions {
                        size: 10,
                        ttl: Duration::from_secs(60),
                    };
                    let query = HistoryQuery {
                        since: None,
                        limit: 10,
                        reverse: false,
                        start_stream: false,
                        options,
                    };
                    // Each runs at once in the memory engine: under a lock
                    // the publisher held, this would deadlock.
                    drop(engine.history(channel, query));
                    drop(engine.presence_stats(channel));
                }
                self.seen.lock().unwrap().push(p.offset);
            }
            fn join(&self, _: &str, _: &Arc<ClientInfo>) {}
            fn leave(&self, _: &str, _: &Arc<ClientInfo>) {}
            fn control(&self, _: &[u8]) {}
            fn gap(&self, _: &str) {}
        }

        let engine = Arc::new(MemoryEngine::new());
        let node = Arc::new(CallsBack::default());
        let _ = node.engine.set(Arc::downgrade(&engine));
        let events: Arc<dyn EngineEvents> = node.clone();
        engine.set_events(Arc::downgrade(&events));
        let (done, finished) = std::sync::mpsc::channel();
        let publisher = engine.clone();
        let seen = node.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(async {
                for n in 0..3 {
                    let data = serde_json::value::RawValue::from_string(n.to_string()).unwrap();
                    let publication = Publication {
                        offset: 0,
                        data: crate::protocol::Payload::from_json(data),
                        info: None,
                    };
                    let options = HistoryOptions {
                        size: 10,
                        ttl: Duration::from_secs(60),
                    };
                    publisher.publish("a", publication, options).await.unwrap();
                }
                // Handed over by a task of their own.
                while seen.seen.lock().unwrap().len() < 3 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("publishing deadlocked on a callback that calls the engine");
        assert_eq!(*node.seen.lock().unwrap(), [1, 2, 3]);
    }

    /// Records the publications a node is handed: (channel, offset, data).
    #[derive(Default)]
    struct Seen(std::sync::Mutex<Vec<(String, u64, String)>>);

    impl crate::engine::EngineEvents for Seen {
        fn publication(&self, channel: &str, p: &Arc<crate::protocol::Publication>) {
            let data = String::from_utf8_lossy(p.data.as_bytes()).into_owned();
            self.0
                .lock()
                .unwrap()
                .push((channel.into(), p.offset, data));
        }
        fn join(&self, _: &str, _: &Arc<crate::protocol::ClientInfo>) {}
        fn leave(&self, _: &str, _: &Arc<crate::protocol::ClientInfo>) {}
        fn control(&self, _: &[u8]) {}
        fn gap(&self, _: &str) {}
    }

    fn numbered(n: usize) -> crate::protocol::Publication {
        crate::protocol::Publication {
            offset: 0,
            data: crate::protocol::Payload::from_json(
                serde_json::value::RawValue::from_string(n.to_string()).unwrap(),
            ),
            info: None,
        }
    }

    const KEEP: crate::engine::HistoryOptions = crate::engine::HistoryOptions {
        size: 10,
        ttl: Duration::from_secs(60),
    };

    fn watched() -> (
        Arc<MemoryEngine>,
        Arc<Seen>,
        Arc<dyn crate::engine::EngineEvents>,
    ) {
        let engine = Arc::new(MemoryEngine::new());
        let seen = Arc::new(Seen::default());
        let events: Arc<dyn crate::engine::EngineEvents> = seen.clone();
        engine.set_events(Arc::downgrade(&events));
        (engine, seen, events)
    }

    /// The publisher's reply does not wait for the fan-out: the
    /// publication is stored and its position known when `publish`
    /// returns, and a task of its own hands it to the nodes.
    #[tokio::test]
    async fn the_publisher_does_not_wait_for_the_hand_over() {
        let (engine, seen, _events) = watched();
        let position = engine.publish("a", numbered(1), KEEP).await.unwrap();
        assert_eq!(position.map(|p| p.offset), Some(1));
        // On this current-thread runtime the delivery task has not run.
        assert!(seen.0.lock().unwrap().is_empty());
        let none = engine
            .publish("b", numbered(2), crate::engine::HistoryOptions::NONE)
            .await
            .unwrap();
        assert!(none.is_none());
        assert!(seen.0.lock().unwrap().is_empty());
        tokio::task::yield_now().await;
        let mut got = seen.0.lock().unwrap().clone();
        got.sort();
        assert_eq!(
            got,
            [("a".into(), 1, "1".into()), ("b".into(), 0, "2".into())]
        );
        // The idle delivery of the channel without history is dropped.
        engine.maintain();
        assert_eq!(engine.live.len(), 0);
    }

    /// Concurrent publishers on many threads: every publication of a
    /// channel is handed over once, in offset order; one publisher's
    /// publications to a channel without history keep its order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn hand_over_keeps_offset_order_under_concurrent_publishers() {
        let (engine, seen, _events) = watched();
        let mut publishers = Vec::new();
        for p in 0..4 {
            let engine = engine.clone();
            publishers.push(tokio::spawn(async move {
                for n in 0..250 {
                    engine.publish("a", numbered(n), KEEP).await.unwrap();
                    let none = crate::engine::HistoryOptions::NONE;
                    engine
                        .publish("live", numbered(p * 1000 + n), none)
                        .await
                        .unwrap();
                    if n % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        for publisher in publishers {
            publisher.await.unwrap();
        }
        for _ in 0..1000 {
            if seen.0.lock().unwrap().len() == 2000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let got = seen.0.lock().unwrap().clone();
        let offsets: Vec<u64> = got.iter().filter(|e| e.0 == "a").map(|e| e.1).collect();
        assert_eq!(offsets, (1..=1000).collect::<Vec<u64>>());
        for p in 0..4 {
            let from_p: Vec<usize> = got
                .iter()
                .filter(|e| e.0 == "live")
                .map(|e| e.2.parse::<usize>().unwrap())
                .filter(|n| n / 1000 == p)
                .collect();
            assert_eq!(from_p, (0..250).map(|n| p * 1000 + n).collect::<Vec<_>>());
        }
    }
}
