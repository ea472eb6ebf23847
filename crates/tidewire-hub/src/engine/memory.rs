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
    delivery: Mutex<Delivery>,
}

#[derive(Default)]
struct Delivery {
    waiting: VecDeque<Arc<Publication>>,
    /// A publisher is handing them over: the others only queue theirs.
    busy: bool,
}

/// The in-memory engine (the embedded default): one process, one node,
/// or several nodes in one process sharing it (each `Hub` over the same
/// engine is a node; tests use this for cluster behaviour).
///
/// Per channel stream one mutex, held while a publication is assigned its
/// offset, stored and handed to the nodes: publications of a channel are
/// delivered one at a time in offset order, and other channels never wait.
#[derive(Default)]
pub struct MemoryEngine {
    /// The nodes over this engine (replaced whole when one joins, so that
    /// a delivery takes the list and holds no lock).
    nodes: RwLock<Arc<Vec<Weak<dyn EngineEvents>>>>,
    streams: Shards<String, Arc<StreamCell>>,
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
    fn each_node(&self, mut deliver: impl FnMut(&dyn EngineEvents)) {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone();
        for node in nodes.iter() {
            if let Some(node) = node.upgrade() {
                deliver(&*node);
            }
        }
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
                    delivery: Mutex::default(),
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
            let publication = Arc::new(publication);
            self.each_node(|node| node.publication(channel, &publication));
            return None;
        }
        let cell = self.stream(channel, options);
        let (position, deliverer) = {
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
            let mut delivery = lock(&cell.delivery);
            delivery.waiting.push_back(publication);
            let deliverer = !std::mem::replace(&mut delivery.busy, true);
            (stream.position(), deliverer)
        };
        // Handed to the nodes with no lock held (a node may call the engine
        // back), by one publisher at a time per channel, so in offset
        // order: a publisher that finds another handing over only queues.
        if deliverer {
            loop {
                let next = {
                    let mut delivery = lock(&cell.delivery);
                    match delivery.waiting.pop_front() {
                        Some(next) => next,
                        None => {
                            delivery.busy = false;
                            break;
                        }
                    }
                };
                self.each_node(|node| node.publication(channel, &next));
            }
        }
        Some(position)
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
        let position = self.publish_now(channel, publication, options);
        Box::pin(async move { Ok(position) })
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
        fn engine(&self) -> Arc<dyn Engine> {
            Arc::new(MemoryEngine::new())
        }

        fn pass<'a>(&'a self, engine: &'a dyn Engine, secs: u64) -> BoxFuture<'a, ()> {
            Box::pin(async move {
                tokio::time::advance(Duration::from_secs(secs)).await;
                engine.maintain();
                engine.expire_presence();
            })
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
        }

        let engine = Arc::new(MemoryEngine::new());
        let node = Arc::new(CallsBack::default());
        let _ = node.engine.set(Arc::downgrade(&engine));
        let events: Arc<dyn EngineEvents> = node.clone();
        engine.set_events(Arc::downgrade(&events));
        let (done, finished) = std::sync::mpsc::channel();
        let publisher = engine.clone();
        std::thread::spawn(move || {
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
                drop(publisher.publish("a", publication, options));
            }
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("publishing deadlocked on a callback that calls the engine");
        assert_eq!(*node.seen.lock().unwrap(), [1, 2, 3]);
    }
}
