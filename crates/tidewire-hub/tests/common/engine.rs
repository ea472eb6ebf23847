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
    /// `+channel` for each subscribe, `-channel` for each unsubscribe (in
    /// the order they completed), `history channel` for each history read
    /// (when it began).
    pub calls: Mutex<Vec<String>>,
    /// How long a subscribe and an unsubscribe take.
    pub delays: Mutex<(Duration, Duration)>,
}

impl TestEngine {
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
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
        self.inner.set_events(events)
    }
    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            self.call(format!("+{channel}")).await;
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
