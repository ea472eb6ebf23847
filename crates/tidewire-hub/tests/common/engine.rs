//! An engine for tests: the memory engine behind a switch that breaks it
//! and a record of its subscribe/unsubscribe calls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tidewire_hub::engine::{
    BoxFuture, EngineError, EngineEvents, EngineStats, HistoryOptions, HistoryQuery, HistoryResult,
    PresenceStats, StreamPosition,
};
use tidewire_hub::protocol::{ClientInfo, Publication};
use tidewire_hub::{Broker, MemoryEngine, PresenceStore};

/// MemoryEngine with a switch that makes it fail, and a record of the
/// subscribe and unsubscribe calls it gets (each taking its `delays`, as
/// a broker's round trip would).
#[derive(Default)]
pub struct TestEngine {
    pub inner: MemoryEngine,
    pub broken: AtomicBool,
    /// Makes subscribe calls fail (as a broker that cannot be reached).
    pub refuse_subscribe: AtomicBool,
    /// `+channel` for each subscribe, `-channel` for each unsubscribe (in
    /// the order they completed), `history channel` for each history read
    /// (when it began).
    pub calls: Mutex<Vec<String>>,
    /// How long a subscribe and an unsubscribe take.
    pub delays: Mutex<(Duration, Duration)>,
    /// Between the engine and the node: holds publications back on
    /// request (see [`hold`](Self::hold)).
    relay: Arc<Relay>,
}

/// Passes the engine's events to the node, or holds publications back.
#[derive(Default)]
struct Relay {
    node: Mutex<Option<Weak<dyn EngineEvents>>>,
    holding: AtomicBool,
    held: Mutex<Vec<(String, Arc<Publication>)>>,
}

impl Relay {
    fn node(&self) -> Option<Arc<dyn EngineEvents>> {
        self.node.lock().unwrap().as_ref().and_then(Weak::upgrade)
    }
}

impl EngineEvents for Relay {
    fn publication(&self, channel: &str, publication: &Arc<Publication>) {
        if self.holding.load(Ordering::SeqCst) {
            self.held
                .lock()
                .unwrap()
                .push((channel.to_owned(), publication.clone()));
        } else if let Some(node) = self.node() {
            node.publication(channel, publication);
        }
    }
    fn join(&self, channel: &str, info: &Arc<ClientInfo>) {
        if let Some(node) = self.node() {
            node.join(channel, info);
        }
    }
    fn leave(&self, channel: &str, info: &Arc<ClientInfo>) {
        if let Some(node) = self.node() {
            node.leave(channel, info);
        }
    }
    fn control(&self, message: &[u8]) {
        if let Some(node) = self.node() {
            node.control(message);
        }
    }
    fn gap(&self, channel: &str) {
        if let Some(node) = self.node() {
            node.gap(channel);
        }
    }
}

impl TestEngine {
    /// Tells the node that publications of `channel` were lost on their
    /// way, as a broker engine does when it cannot read them back.
    #[allow(dead_code)] // not every test binary loses publications
    pub fn lose(&self, channel: &str) {
        if let Some(node) = self.relay.node() {
            node.gap(channel);
        }
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    /// From now on publications are stored but not handed to the node,
    /// as if still on their way through a broker.
    pub fn hold(&self) {
        self.relay.holding.store(true, Ordering::SeqCst);
    }

    /// Hands the held publications to the node, in order, and stops
    /// holding.
    pub fn release(&self) {
        self.relay.holding.store(false, Ordering::SeqCst);
        let held = std::mem::take(&mut *self.relay.held.lock().unwrap());
        if let Some(node) = self.relay.node() {
            for (channel, publication) in held {
                node.publication(&channel, &publication);
            }
        }
    }

    async fn call(&self, what: String) {
        let (subscribe, unsubscribe) = *self.delays.lock().unwrap();
        let delay = if what.starts_with('+') {
            subscribe
        } else {
            unsubscribe
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.calls.lock().unwrap().push(what);
    }
}

impl Broker for TestEngine {
    fn set_events(&self, events: Weak<dyn EngineEvents>) {
        *self.relay.node.lock().unwrap() = Some(events);
        let relay: Arc<dyn EngineEvents> = self.relay.clone();
        self.inner.set_events(Arc::downgrade(&relay))
    }
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            self.call(format!("+{channel}")).await;
            if self.refuse_subscribe.load(Ordering::Relaxed) {
                return Err(EngineError::Unavailable("refused".into()));
            }
            self.inner.subscribe(channel).await
        })
    }
    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            self.call(format!("-{channel}")).await;
            self.inner.unsubscribe(channel).await
        })
    }
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: Publication,
        options: HistoryOptions,
    ) -> BoxFuture<'a, Result<Option<StreamPosition>, EngineError>> {
        if self.broken.load(Ordering::Relaxed) {
            return Box::pin(async { Err(EngineError::Unavailable("broken".into())) });
        }
        self.inner.publish(channel, publication, options)
    }
    fn publish_join<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        self.inner.publish_join(channel, info)
    }
    fn publish_leave<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        self.inner.publish_leave(channel, info)
    }
    fn publish_control<'a>(&'a self, message: &'a [u8]) -> BoxFuture<'a, Result<(), EngineError>> {
        self.inner.publish_control(message)
    }
    fn history<'a>(
        &'a self,
        channel: &'a str,
        query: HistoryQuery,
    ) -> BoxFuture<'a, Result<HistoryResult, EngineError>> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("history {channel}"));
        self.inner.history(channel, query)
    }
    fn health(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        let broken = self.broken.load(Ordering::Relaxed);
        Box::pin(async move {
            if broken {
                Err(EngineError::Unavailable("store unreachable".into()))
            } else {
                Ok(())
            }
        })
    }
    fn maintain(&self) {
        self.inner.maintain()
    }
    fn stats(&self) -> EngineStats {
        self.inner.stats()
    }
}

impl PresenceStore for TestEngine {
    fn add_presence<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        self.inner.add_presence(channel, info, ttl)
    }
    fn remove_presence<'a>(
        &'a self,
        channel: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        self.inner.remove_presence(channel, client)
    }
    fn presence<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Arc<ClientInfo>>, EngineError>> {
        self.inner.presence(channel)
    }
    fn presence_stats<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<PresenceStats, EngineError>> {
        self.inner.presence_stats(channel)
    }
    fn presence_health(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        self.inner.presence_health()
    }
    fn expire_presence(&self) {
        self.inner.expire_presence()
    }
    fn presence_channels(&self) -> usize {
        self.inner.presence_channels()
    }
}
