//! The hub core, independent of its fronts: clients, subscriptions,
//! permissions, presence, join/leave, history, and the routing of each
//! publication once to this node's subscribers.
//!
//! A front (the WebSocket front in [`crate::fronts::websocket`], later others) opens a
//! [`Session`] per connection with a [`ClientSink`], hands it every text
//! message, and closes it when the transport ends. The core writes
//! replies and pushes only through the sink, as encoded JSON frames, so it
//! never knows the transport.
//!
//! The fan-out path: the engine hands a publication to [`Node`] (as
//! [`EngineEvents`]), which encodes the push once and queues the same
//! shared bytes on every subscriber's sink, under the lock of that one
//! channel only (other channels never wait), without waking the
//! subscribers' tasks. A dispatcher task then wakes the subscribers that
//! became due, in waves of 128 (`WAKE_WAVE`), yielding between waves: each
//! subscriber is woken once for however many publications queued up for
//! it (its task writes them in one system call), and a publisher's next
//! command waits behind one wave of writes, not behind the whole fan-out
//! (which on one core is one write per subscriber). Subscribing with a position
//! parks the subscriber for the time of the history read: publications
//! that arrive meanwhile wait in its parking buffer and follow the reply,
//! without duplicates, so a recovered stream has neither gaps nor repeats.
//!
//! Every map keyed by client input (channels, users, clients) loses its
//! entry when the last user of the key leaves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::auth::{TokenKeyError, Verifier};
use crate::config::{ChannelOptions, Config};
use crate::engine::{
    Broker, Engine, EngineError, EngineEvents, EngineStats, HistoryOptions, PresenceStore,
};
use crate::metrics::Metrics;
use crate::protocol::{Disconnect, DisconnectCode, EncodedPush, ErrorCode, ErrorReply, Push};
use crate::proxy::Proxy;
use crate::shards::{lock, Shards};

mod channels;
mod cluster;
mod front;
mod maintenance;
mod presence_diff;
mod registry;
mod resume;
mod server_api;
mod session;
mod wakes;

pub use crate::protocol::HistoryReply;
use channels::Channel;
pub use cluster::{NodeInfo, RelayHandler, HEARTBEAT, NODE_TIMEOUT, SURVEY_TIMEOUT};
pub use front::{ClientSink, FrameKind, OpeningRequest, SendOutcome, Transport};
use registry::{Client, ClientState};
pub use resume::ResumeError;
pub use session::Session;

/// Entries the hub holds, for metrics, `/api/info` and leak tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct HubCounts {
    /// Open sessions (connected or not).
    pub sessions: usize,
    /// Sessions that completed `connect`.
    pub clients: usize,
    /// Distinct users with a connected client.
    pub users: usize,
    /// Channels with subscribers.
    pub channels: usize,
    /// Subscriptions over all channels.
    pub subscriptions: usize,
    /// Channel streams held by the engine.
    pub history_streams: usize,
    /// Channels with presence entries in the engine.
    pub presence_channels: usize,
    /// Channels this node has the engine subscribed to (one per channel
    /// with subscribers, once their subscribe calls are done).
    pub engine_subscriptions: usize,
    /// Sessions waiting, without a transport, to be resumed.
    pub detached_sessions: usize,
}

/// The hub: cheap to clone, shared by the fronts and the HTTP API.
#[derive(Clone)]
pub struct Hub {
    node: Arc<Node>,
}

/// A hub that does not keep it alive: what a handler the hub itself holds
/// (a relay handler, say) keeps, so that no cycle outlives the hub.
#[derive(Clone)]
pub struct WeakHub {
    node: Weak<Node>,
}

impl WeakHub {
    /// The hub, while it lives.
    pub fn upgrade(&self) -> Option<Hub> {
        self.node.upgrade().map(|node| Hub { node })
    }
}

impl Hub {
    /// A handle that does not keep the hub alive.
    pub fn downgrade(&self) -> WeakHub {
        WeakHub {
            node: Arc::downgrade(&self.node),
        }
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("counts", &self.counts())
            .finish()
    }
}

/// The node: this process's share of the hub, and the engine's
/// [`EngineEvents`].
pub struct Node {
    /// This node, for the timers it starts.
    me: Weak<Node>,
    /// Its id among the nodes of a cluster (random, new at each start).
    id: Arc<str>,
    /// The nodes it heard from.
    registry: cluster::Registry,
    /// Its surveys of the other nodes under way.
    surveys: cluster::Surveys,
    /// Where messages relayed to this node for its fronts go.
    relays: cluster::Relays,
    config: Arc<Config>,
    broker: Arc<dyn Broker>,
    presence_store: Arc<dyn PresenceStore>,
    verifier: Verifier,
    /// Admin tokens (`admin.secret`, or the API key), when admin pages
    /// are on.
    admin: Option<crate::admin::AdminAuth>,
    /// Why the engine failed at the last health check (`None`: it works).
    unhealthy: Mutex<Option<String>>,
    proxy: Option<Proxy>,
    metrics: Arc<Metrics>,
    clients: Shards<u64, Arc<Client>>,
    users: Shards<String, Vec<u64>>,
    channels: Shards<String, Arc<Channel>>,
    /// Per channel: whether the engine is subscribed for this node, behind
    /// the lock that orders subscribe and unsubscribe calls (see
    /// `sync_engine_subscription`).
    engine_links: Shards<String, Arc<tokio::sync::Mutex<bool>>>,
    /// Sessions without a transport, by resume key (see `resume`).
    detached: Mutex<std::collections::HashMap<String, resume::Detached>>,
    shutting_down: AtomicBool,
    started: Instant,
    /// Subscribers with publications queued, waiting for their wake-up
    /// (see [`wakes::dispatch_wakes`]).
    wakes: Mutex<std::collections::VecDeque<Arc<dyn ClientSink>>>,
    wake_signal: Arc<tokio::sync::Notify>,
}

impl Drop for Node {
    fn drop(&mut self) {
        // Lets the wake dispatcher see that the node is gone.
        self.wake_signal.notify_one();
    }
}

pub(super) fn error(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(code, message)
}

pub(super) fn history_options(options: &ChannelOptions) -> HistoryOptions {
    if options.has_history() {
        HistoryOptions {
            size: options.history_size,
            ttl: options.history_ttl,
        }
    } else {
        HistoryOptions::NONE
    }
}

/// The users a personal channel (`ns:#42` or `dm:#42,43`) belongs to.
pub(super) fn personal_users(channel: &str) -> Option<std::str::Split<'_, char>> {
    channel.rsplit_once('#').map(|(_, users)| users.split(','))
}

/// Why a hub cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// A token key setting cannot be used.
    #[error(transparent)]
    TokenKey(#[from] TokenKeyError),
}

/// Why the hub is not healthy (`/health` answers 503 with it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unhealthy {
    /// Graceful shutdown has begun.
    #[error("shutting down")]
    ShuttingDown,
    /// The engine fails.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl Hub {
    /// A hub over `engine` (its broker and presence store in one), with a
    /// maintenance task (token expiry, application pings, engine expiry)
    /// on the current tokio runtime.
    ///
    /// # Errors
    /// An invalid token key in the configuration.
    pub fn new(config: Config, engine: Arc<dyn Engine>) -> Result<Hub, HubError> {
        let broker: Arc<dyn Broker> = engine.clone();
        Hub::with_engines(config, broker, engine)
    }

    /// A hub over a broker and a presence store that may be different
    /// engines (see [`Engine`]).
    ///
    /// # Errors
    /// An invalid token key in the configuration.
    pub fn with_engines(
        config: Config,
        broker: Arc<dyn Broker>,
        presence_store: Arc<dyn PresenceStore>,
    ) -> Result<Hub, HubError> {
        let verifier = Verifier::new(&config.token)?;
        let admin = config
            .admin
            .enabled
            .then(|| config.admin.secret.as_deref().or(config.api.key.as_deref()))
            .flatten()
            .and_then(|secret| crate::admin::AdminAuth::new(secret, config.admin.token_ttl));
        let proxy = Proxy::new(&config.proxy);
        let node = Arc::new_cyclic(|me| Node {
            me: me.clone(),
            id: format!("{:016x}", rand::random::<u64>()).into(),
            registry: cluster::Registry::default(),
            surveys: cluster::Surveys::default(),
            relays: cluster::Relays::default(),
            config: Arc::new(config),
            broker,
            presence_store,
            verifier,
            admin,
            unhealthy: Mutex::new(None),
            proxy,
            metrics: Arc::new(Metrics::new()),
            clients: Shards::default(),
            users: Shards::default(),
            channels: Shards::default(),
            engine_links: Shards::default(),
            detached: Mutex::default(),
            shutting_down: AtomicBool::new(false),
            started: Instant::now(),
            wakes: Mutex::default(),
            wake_signal: Arc::default(),
        });
        let events: Arc<dyn EngineEvents> = node.clone();
        node.broker.set_events(Arc::downgrade(&events));
        tokio::spawn(maintenance::maintenance(Arc::downgrade(&node)));
        tokio::spawn(cluster::heartbeats(Arc::downgrade(&node)));
        if node.admin.is_some() {
            tokio::spawn(cluster::admin_feed(Arc::downgrade(&node)));
        }
        tokio::spawn(maintenance::watch_health(Arc::downgrade(&node)));
        tokio::spawn(wakes::dispatch_wakes(
            Arc::downgrade(&node),
            node.wake_signal.clone(),
        ));
        Ok(Hub { node })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.node.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.node.metrics
    }

    /// The broker.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.node.broker
    }

    /// The presence store.
    pub fn presence_store(&self) -> &Arc<dyn PresenceStore> {
        &self.node.presence_store
    }

    /// What a connection opened by a request with `headers` keeps of it
    /// for its `connect` (see [`OpeningRequest`]): `None` unless the
    /// token cookie or the connect callback is configured.
    pub fn opening_request(&self, headers: &http::HeaderMap) -> Option<Box<OpeningRequest>> {
        let config = &self.node.config;
        let proxied = config.proxy.connect_url.is_some();
        if config.client.token_cookie.is_none() && !proxied {
            return None;
        }
        OpeningRequest::read(config, proxied, headers)
    }

    /// Opens a session for a new connection.
    pub fn open(&self, sink: Arc<dyn ClientSink>) -> Session {
        self.open_with(sink, None)
    }

    /// Opens a session for a new connection opened by a request of which
    /// `connect` needs `opening` (from [`Hub::opening_request`]).
    pub fn open_with(
        &self,
        sink: Arc<dyn ClientSink>,
        opening: Option<Box<OpeningRequest>>,
    ) -> Session {
        let mut shard;
        let id = loop {
            let id = rand::random::<u64>() | 1;
            shard = self.node.clients.lock(&id);
            if !shard.contains_key(&id) {
                break id;
            }
        };
        let client = Arc::new(Client {
            id,
            sink,
            state: Mutex::new(ClientState {
                opening,
                ..ClientState::default()
            }),
        });
        shard.insert(id, client.clone());
        drop(shard);
        self.node.metrics.connections.inc();
        // A session that opens during shutdown (its upgrade was under way
        // when it began) is told to leave at once, like the others. Either
        // this load sees the flag, or `shutdown` sees this client (SeqCst on
        // both sides): none is missed.
        if self.node.shutting_down.load(Ordering::SeqCst) {
            let disconnect = shutdown_disconnect();
            tell_to_leave(
                &client,
                &mut EncodedPush::new(Push::Disconnect(&disconnect)),
            );
        }
        Session {
            node: self.node.clone(),
            client,
            closed: false,
            resumable: None,
        }
    }

    /// Entries held now.
    pub fn counts(&self) -> HubCounts {
        let node = &self.node;
        let engine = self.engine_stats();
        let mut counts = HubCounts {
            sessions: node.clients.len(),
            users: node.users.len(),
            channels: node.channels.len(),
            engine_subscriptions: node.engine_links.len(),
            detached_sessions: lock(&node.detached).len(),
            history_streams: engine.streams,
            presence_channels: engine.presence_channels,
            ..HubCounts::default()
        };
        for shard in node.clients.each() {
            counts.clients += shard.values().filter(|c| c.info().is_some()).count();
        }
        for shard in node.channels.each() {
            counts.subscriptions += shard
                .values()
                .map(|c| lock(&c.subscribers).members())
                .sum::<usize>();
        }
        counts
    }

    /// Engine entries (the broker's, with the presence store's channels).
    pub fn engine_stats(&self) -> EngineStats {
        EngineStats {
            presence_channels: self.node.presence_store.presence_channels(),
            ..self.node.broker.stats()
        }
    }

    /// The metrics in the text format, with the sampled gauges updated.
    pub fn metrics_text(&self) -> String {
        let node = &self.node;
        let queued: usize = node
            .clients
            .each()
            .map(|s| s.values().map(|c| c.sink.queued()).sum::<usize>())
            .sum();
        node.metrics.queue_depth.set(queued as i64);
        node.metrics
            .history_streams
            .set(node.broker.stats().streams as i64);
        node.metrics.encode()
    }

    /// Whether the engine works.
    ///
    /// # Errors
    /// Shutting down, or the engine's failure.
    pub async fn health(&self) -> Result<(), Unhealthy> {
        if self.node.shutting_down.load(Ordering::Relaxed) {
            return Err(Unhealthy::ShuttingDown);
        }
        self.node.broker.health().await?;
        Ok(self.node.presence_store.presence_health().await?)
    }

    /// Seconds since start.
    pub fn uptime(&self) -> Duration {
        self.node.started.elapsed()
    }

    /// Graceful shutdown: every client gets a `disconnect` push (3001,
    /// reconnect) and its connection is closed with 1001; new connections
    /// are refused.
    ///
    /// With `server.drain_window` the disconnects are spread over it, in
    /// equal steps every 100 ms (sessions that open meanwhile are told at
    /// once, as always during shutdown).
    pub fn shutdown(&self) {
        self.node.shutting_down.store(true, Ordering::SeqCst);
        let window = self.node.config.server.drain_window;
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(runtime) if !window.is_zero() => runtime,
            _ => {
                let disconnect = shutdown_disconnect();
                let mut notice = EncodedPush::new(Push::Disconnect(&disconnect));
                for shard in self.node.clients.each() {
                    for client in shard.values() {
                        tell_to_leave(client, &mut notice);
                    }
                }
                return;
            }
        };
        self.node
            .tell_all_to_leave(shutdown_disconnect(), 1001, runtime);
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.node.shutting_down.load(Ordering::Relaxed)
    }
}

impl Node {
    /// Tells every client to reconnect elsewhere (`disconnect`, then the
    /// close frame with `close_code`), spread over `server.drain_window`
    /// in equal steps every 100 ms.
    pub(super) fn tell_all_to_leave(
        &self,
        disconnect: Disconnect,
        close_code: u16,
        runtime: tokio::runtime::Handle,
    ) {
        let window = self.config.server.drain_window;
        let clients: Vec<Arc<Client>> = self
            .clients
            .each()
            .flat_map(|shard| shard.values().cloned().collect::<Vec<_>>())
            .collect();
        const STEP: Duration = Duration::from_millis(100);
        let steps = (window.as_millis() / STEP.as_millis()).max(1) as usize;
        let per_step = clients.len().div_ceil(steps).max(1);
        tracing::info!(
            clients = clients.len(),
            ?window,
            code = disconnect.code,
            "telling clients to leave"
        );
        runtime.spawn(async move {
            let reason = disconnect.reason.clone();
            let mut notice = EncodedPush::new(Push::Disconnect(&disconnect));
            let mut ticks = tokio::time::interval(STEP);
            for batch in clients.chunks(per_step) {
                ticks.tick().await;
                for client in batch {
                    let frame = notice.frame(client.codec()).clone();
                    client.sink.send(frame, FrameKind::Control);
                    client.sink.close(close_code, &reason);
                }
            }
        });
    }
}

/// The `disconnect` of a shutdown (3001, reconnect).
pub(super) fn shutdown_disconnect() -> Disconnect {
    Disconnect::new(DisconnectCode::Shutdown, "server shutting down")
}

/// Sends the shutdown `notice`, then close 1001.
pub(super) fn tell_to_leave(client: &Client, notice: &mut EncodedPush<'_>) {
    let frame = notice.frame(client.codec()).clone();
    client.sink.send(frame, FrameKind::Control);
    client.sink.close(1001, "server shutting down");
}

pub(super) fn unavailable(e: EngineError) -> ErrorReply {
    tracing::warn!("{e}");
    error(
        ErrorCode::Unavailable,
        "the engine is unavailable; retry later",
    )
}

impl Node {
    pub(super) fn channel_options(&self, channel: &str) -> Result<&ChannelOptions, ErrorReply> {
        let max = self.config.client.max_channel_length;
        if channel.is_empty() || channel.len() > max {
            return Err(error(
                ErrorCode::InvalidChannel,
                format!("a channel name has 1 to {max} bytes"),
            ));
        }
        if channel.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(error(
                ErrorCode::InvalidChannel,
                "a channel name has no spaces or control characters",
            ));
        }
        if channel.starts_with('$') && channel != crate::config::ADMIN_CHANNEL {
            return Err(error(
                ErrorCode::InvalidChannel,
                "channel names that start with $ are reserved for the server",
            ));
        }
        self.config.channel_options(channel).map_err(|ns| {
            error(
                ErrorCode::UnknownNamespace,
                format!("namespace {ns:?} is not configured"),
            )
        })
    }
}
