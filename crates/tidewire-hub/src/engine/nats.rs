//! [`NatsEngine`]: NATS as the whole engine, for nodes that need the
//! fan-out between them and nothing kept. NATS stores nothing, so this
//! engine has no history (no offsets, epochs or recovery) and no presence:
//! `tidewire serve --engine nats` refuses, at start, namespaces that ask
//! for either (run `--engine redis --broker nats` for those: Redis keeps
//! them, NATS carries the publications).
//!
//! Topics: `<prefix>:c:<channel>` per channel, `<prefix>:control` between
//! nodes, and one probe topic per node; each is one NATS subject
//! ([`super::link::Nats::subject`]). One reader task per node holds the
//! subscriptions (it makes them again on a connection whose probes stop
//! coming back) and hands what arrives to the node: a channel's
//! publications from one node in the order that node sent them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;

use super::link::{self, Nats, Sink};
use super::wire::{self, Event};
use super::{
    BoxFuture, Broker, EngineError, EngineEvents, EngineStats, HistoryOptions, HistoryQuery,
    HistoryResult, PresenceStats, PresenceStore, StreamPosition,
};
use crate::protocol::{ClientInfo, Publication};

/// How a node reaches NATS.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `nats://host:port`.
    pub url: String,
    /// The prefix of every topic (nodes of one cluster share it).
    pub prefix: String,
    /// How long a call may take before the engine reports NATS
    /// unavailable.
    pub timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            prefix: "tidewire".into(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// The NATS engine; see the module docs.
pub struct NatsEngine {
    inner: Arc<Inner>,
}

struct Inner {
    config: NatsConfig,
    nats: Nats,
    /// The connection publications go out on.
    publisher: async_nats::Client,
    events: RwLock<Option<Weak<dyn EngineEvents>>>,
    /// The subscribed channels and the reader's sink (none while it
    /// connects again); held while a (re)subscription is under way.
    subscriptions: tokio::sync::Mutex<(HashSet<String>, Option<Sink>)>,
    subscribed: AtomicUsize,
    /// Whether the reader's probes come back.
    listening: AtomicBool,
    probe_topic: String,
}

/// How often the reader probes its subscription connection, and how long
/// probes may stay away before it is made again.
const PROBE_EVERY: Duration = Duration::from_secs(2);
const PROBE_DEADLINE: Duration = Duration::from_secs(6);

fn unavailable(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(e.to_string())
}

impl Inner {
    fn topic(&self, channel: &str) -> String {
        format!("{}:c:{channel}", self.config.prefix)
    }

    fn control_topic(&self) -> String {
        format!("{}:control", self.config.prefix)
    }

    fn events(&self) -> Option<Arc<dyn EngineEvents>> {
        self.events
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(Weak::upgrade)
    }

    async fn bounded<T, E: std::fmt::Display>(
        &self,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, EngineError> {
        tokio::time::timeout(self.config.timeout, call)
            .await
            .map_err(|_| unavailable("NATS did not answer in time"))?
            .map_err(unavailable)
    }

    async fn publish_to(&self, topic: &str, message: Bytes) -> Result<(), EngineError> {
        self.bounded(self.publisher.publish(Nats::subject(topic), message))
            .await
    }

    fn dispatch(&self, topic: &str, payload: &[u8]) {
        let Some(events) = self.events() else { return };
        if topic == self.control_topic() {
            events.control(payload);
            return;
        }
        let Some(channel) = topic
            .strip_prefix(self.config.prefix.as_str())
            .and_then(|t| t.strip_prefix(":c:"))
        else {
            return;
        };
        match wire::decode_event(&Bytes::copy_from_slice(payload)) {
            Ok(Event::Publication { publication, .. }) => {
                events.publication(channel, &Arc::new(publication));
            }
            Ok(Event::Join(info)) => events.join(channel, &Arc::new(info)),
            Ok(Event::Leave(info)) => events.leave(channel, &Arc::new(info)),
            Err(e) => tracing::warn!(channel, "unreadable message from NATS: {e}"),
        }
    }
}

/// The reader: (re)connects, subscribes every channel, hands what arrives
/// to the node; ends when the engine is dropped.
async fn listen(inner: Weak<Inner>) {
    let mut backoff = link::Backoff::new();
    loop {
        let Some(engine) = inner.upgrade() else {
            return;
        };
        let mut messages = match engine.bounded(engine.nats.subscriber()).await {
            Ok((mut sink, messages)) => {
                let mut subscriptions = engine.subscriptions.lock().await;
                let mut topics = vec![engine.control_topic(), engine.probe_topic.clone()];
                topics.extend(subscriptions.0.iter().map(|c| engine.topic(c)));
                match engine.bounded(sink.subscribe(&topics)).await {
                    Ok(()) => {
                        subscriptions.1 = Some(sink);
                        engine.listening.store(true, Ordering::SeqCst);
                        backoff.reset();
                        messages
                    }
                    Err(e) => {
                        tracing::warn!("NATS subscribe failed: {e}");
                        drop(subscriptions);
                        drop(engine);
                        backoff.wait().await;
                        continue;
                    }
                }
            }
            Err(e) => {
                tracing::warn!("NATS connection failed: {e}");
                drop(engine);
                backoff.wait().await;
                continue;
            }
        };
        drop(engine);
        let mut ticks = tokio::time::interval(PROBE_EVERY);
        let mut probe_seen = tokio::time::Instant::now();
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else { break };
                    let Some(engine) = inner.upgrade() else { return };
                    if message.topic() == engine.probe_topic {
                        probe_seen = tokio::time::Instant::now();
                        engine.listening.store(true, Ordering::SeqCst);
                        continue;
                    }
                    engine.dispatch(message.topic(), message.payload());
                }
                _ = ticks.tick() => {
                    let Some(engine) = inner.upgrade() else { return };
                    if probe_seen.elapsed() > PROBE_DEADLINE {
                        tracing::warn!("NATS delivers nothing (its probes do not come back); reconnecting");
                        break;
                    }
                    if probe_seen.elapsed() > PROBE_EVERY * 2 {
                        engine.listening.store(false, Ordering::SeqCst);
                    }
                    let _ = engine.publish_to(&engine.probe_topic, Bytes::from_static(b"probe")).await;
                }
            }
        }
        let Some(engine) = inner.upgrade() else {
            return;
        };
        engine.listening.store(false, Ordering::SeqCst);
        engine.subscriptions.lock().await.1 = None;
    }
}

impl NatsEngine {
    /// Connects to NATS and starts the reader.
    ///
    /// # Errors
    /// A NATS that cannot be reached.
    pub async fn connect(config: NatsConfig) -> Result<NatsEngine, EngineError> {
        let nats = Nats::new(&config.url, config.timeout);
        let publisher = nats.connect().await.map_err(unavailable)?;
        let probe_topic = format!("{}:probe:{:016x}", config.prefix, rand::random::<u64>());
        let inner = Arc::new(Inner {
            config,
            nats,
            publisher,
            events: RwLock::new(None),
            subscriptions: tokio::sync::Mutex::default(),
            subscribed: AtomicUsize::new(0),
            listening: AtomicBool::new(false),
            probe_topic,
        });
        tokio::spawn(listen(Arc::downgrade(&inner)));
        let ready = async {
            while !inner.listening.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(inner.config.timeout, ready)
            .await
            .map_err(|_| unavailable("NATS subscriptions did not start in time"))?;
        Ok(NatsEngine { inner })
    }
}

fn no_history() -> EngineError {
    EngineError::Unavailable(
        "the NATS engine keeps no history (use --engine redis --broker nats)".into(),
    )
}

fn no_presence() -> EngineError {
    EngineError::Unavailable(
        "the NATS engine keeps no presence (use --engine redis --broker nats)".into(),
    )
}

impl Broker for NatsEngine {
    fn set_events(&self, events: Weak<dyn EngineEvents>) {
        *self.inner.events.write().unwrap_or_else(|e| e.into_inner()) = Some(events);
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut subscriptions = inner.subscriptions.lock().await;
            if subscriptions.0.insert(channel.to_owned()) {
                inner.subscribed.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(sink) = subscriptions.1.as_mut() {
                inner
                    .bounded(sink.subscribe(&[inner.topic(channel)]))
                    .await?;
            }
            Ok(())
        })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut subscriptions = inner.subscriptions.lock().await;
            if subscriptions.0.remove(channel) {
                inner.subscribed.fetch_sub(1, Ordering::Relaxed);
            }
            if let Some(sink) = subscriptions.1.as_mut() {
                inner
                    .bounded(sink.unsubscribe(&[inner.topic(channel)]))
                    .await?;
            }
            Ok(())
        })
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: Publication,
        options: HistoryOptions,
    ) -> BoxFuture<'a, Result<Option<StreamPosition>, EngineError>> {
        Box::pin(async move {
            if options.enabled() {
                return Err(no_history());
            }
            let inner = &self.inner;
            if !inner.listening.load(Ordering::SeqCst) {
                return Err(unavailable("the NATS subscriptions are down"));
            }
            let envelope = wire::encode_publication(&publication);
            let event = wire::encode_publication_event(0, "", &envelope);
            inner.publish_to(&inner.topic(channel), event).await?;
            Ok(None)
        })
    }

    fn publish_join<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let event = wire::encode_presence_event(wire::JOIN, &info);
            self.inner
                .publish_to(&self.inner.topic(channel), event)
                .await
        })
    }

    fn publish_leave<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let event = wire::encode_presence_event(wire::LEAVE, &info);
            self.inner
                .publish_to(&self.inner.topic(channel), event)
                .await
        })
    }

    fn publish_control<'a>(&'a self, message: &'a [u8]) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let inner = &self.inner;
            inner
                .publish_to(&inner.control_topic(), Bytes::copy_from_slice(message))
                .await
        })
    }

    fn history<'a>(
        &'a self,
        _channel: &'a str,
        query: HistoryQuery,
    ) -> BoxFuture<'a, Result<HistoryResult, EngineError>> {
        Box::pin(async move {
            if query.options.enabled() {
                return Err(no_history());
            }
            Ok(HistoryResult {
                publications: Vec::new(),
                position: StreamPosition {
                    offset: 0,
                    epoch: "".into(),
                },
            })
        })
    }

    fn health(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            if self.inner.listening.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(unavailable("the NATS subscriptions are down"))
            }
        })
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            subscribed_channels: self.inner.subscribed.load(Ordering::Relaxed),
            ..EngineStats::default()
        }
    }
}

impl PresenceStore for NatsEngine {
    fn add_presence<'a>(
        &'a self,
        _channel: &'a str,
        _info: Arc<ClientInfo>,
        _ttl: Duration,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async { Err(no_presence()) })
    }

    fn remove_presence<'a>(
        &'a self,
        _channel: &'a str,
        _client: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async { Err(no_presence()) })
    }

    fn presence<'a>(
        &'a self,
        _channel: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Arc<ClientInfo>>, EngineError>> {
        Box::pin(async { Err(no_presence()) })
    }

    fn presence_stats<'a>(
        &'a self,
        _channel: &'a str,
    ) -> BoxFuture<'a, Result<PresenceStats, EngineError>> {
        Box::pin(async { Err(no_presence()) })
    }

    fn presence_health(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        self.health()
    }

    fn presence_channels(&self) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::engine::nats_server::NatsServer;
    use crate::protocol::Payload;
    use crate::shards::lock;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl EngineEvents for Recorder {
        fn publication(&self, channel: &str, p: &Arc<Publication>) {
            let data = String::from_utf8_lossy(p.data.as_bytes());
            lock(&self.0).push(format!("{channel} {} {data}", p.offset));
        }
        fn join(&self, channel: &str, info: &Arc<ClientInfo>) {
            lock(&self.0).push(format!("{channel} join {}", info.client));
        }
        fn leave(&self, channel: &str, info: &Arc<ClientInfo>) {
            lock(&self.0).push(format!("{channel} leave {}", info.client));
        }
        fn control(&self, message: &[u8]) {
            lock(&self.0).push(format!("control {}", String::from_utf8_lossy(message)));
        }
        fn gap(&self, channel: &str) {
            lock(&self.0).push(format!("{channel} gap"));
        }
    }

    async fn node(nats: &NatsServer) -> (NatsEngine, Arc<Recorder>, Arc<dyn EngineEvents>) {
        let engine = NatsEngine::connect(NatsConfig {
            url: nats.url(),
            timeout: Duration::from_secs(2),
            ..NatsConfig::default()
        })
        .await
        .unwrap();
        let recorder = Arc::new(Recorder::default());
        let events: Arc<dyn EngineEvents> = recorder.clone();
        engine.set_events(Arc::downgrade(&events));
        (engine, recorder, events)
    }

    async fn seen(recorder: &Recorder, n: usize) -> Vec<String> {
        for _ in 0..500 {
            let seen = lock(&recorder.0).clone();
            if seen.len() >= n {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} events expected, got {:?}", lock(&recorder.0));
    }

    fn publication(data: &str) -> Publication {
        Publication {
            offset: 0,
            data: Payload::from_bytes(Bytes::from(data.to_owned())),
            info: None,
        }
    }

    const NO_HISTORY: HistoryOptions = HistoryOptions {
        size: 0,
        ttl: Duration::ZERO,
    };

    #[tokio::test]
    async fn publications_joins_and_control_messages_reach_the_subscribed_nodes_in_order() {
        let nats = NatsServer::start();
        let (a, _a_seen, _a_events) = node(&nats).await;
        let (b, b_seen, _b_events) = node(&nats).await;
        b.subscribe("room").await.unwrap();
        for n in 1..=20 {
            let position = a
                .publish("room", publication(&n.to_string()), NO_HISTORY)
                .await
                .unwrap();
            assert_eq!(position, None);
        }
        a.publish("elsewhere", publication("0"), NO_HISTORY)
            .await
            .unwrap();
        let info = Arc::new(ClientInfo {
            client: "c1".into(),
            user: "u".into(),
            info: None,
        });
        a.publish_join("room", info.clone()).await.unwrap();
        a.publish_leave("room", info).await.unwrap();
        let seen = seen(&b_seen, 22).await;
        let expected: Vec<String> = (1..=20)
            .map(|n| format!("room 0 {n}"))
            .chain(["room join c1".into(), "room leave c1".into()])
            .collect();
        assert_eq!(seen, expected);
        // Control messages reach every node, the sender included.
        b.publish_control(b"hello").await.unwrap();
        assert_eq!(seen_control(&_a_seen).await, "control hello");
        b.unsubscribe("room").await.unwrap();
        a.publish("room", publication("after"), NO_HISTORY)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!lock(&b_seen.0).iter().any(|l| l.ends_with("after")));
    }

    async fn seen_control(recorder: &Recorder) -> String {
        for _ in 0..500 {
            if let Some(line) = lock(&recorder.0).iter().find(|l| l.starts_with("control")) {
                return line.clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no control message: {:?}", lock(&recorder.0));
    }

    #[tokio::test]
    async fn history_and_presence_are_refused_with_a_clear_error() {
        let nats = NatsServer::start();
        let (a, _seen, _events) = node(&nats).await;
        let keep = HistoryOptions {
            size: 10,
            ttl: Duration::from_secs(60),
        };
        let refused = a.publish("room", publication("1"), keep).await.unwrap_err();
        assert!(refused.to_string().contains("no history"), "{refused}");
        let refused = a.presence("room").await.unwrap_err();
        assert!(refused.to_string().contains("no presence"), "{refused}");
    }

    #[tokio::test]
    async fn after_nats_comes_back_the_node_is_subscribed_again() {
        let mut nats = NatsServer::start();
        let port = nats.port;
        let (a, _a_seen, _a_events) = node(&nats).await;
        let (b, b_seen, _b_events) = node(&nats).await;
        b.subscribe("room").await.unwrap();
        nats.stop();
        let mut down = false;
        for _ in 0..1000 {
            if a.health().await.is_err() && b.health().await.is_err() {
                down = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(down, "health stays ok with NATS gone");
        assert!(a
            .publish("room", publication("refused"), NO_HISTORY)
            .await
            .is_err());
        let _nats = NatsServer::on(port);
        for _ in 0..1000 {
            if a.health().await.is_ok() && b.health().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        a.publish("room", publication("back"), NO_HISTORY)
            .await
            .unwrap();
        assert_eq!(seen(&b_seen, 1).await, ["room 0 back"]);
    }
}
