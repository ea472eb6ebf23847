//! The hub core, independent of its fronts: clients, subscriptions,
//! permissions, presence, join/leave, history, and the routing of each
//! publication once to this node's subscribers.
//!
//! A front (the WebSocket front in [`crate::ws`], later others) opens a
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::auth::{claim_grants, now_unix, Verifier};
use crate::config::{ChannelOptions, Config, PublishRule, SubscribeRule};
use crate::engine::{
    Engine, EngineEvents, EngineStats, HistoryOptions, HistoryQuery, PresenceStats, StreamPosition,
};
use crate::metrics::{MethodLabel, Metrics};
use crate::presence_diff::PendingDiff;
use crate::protocol::{
    self, BatchItem, ClientInfo, Command, ConnectRequest, Disconnect, DisconnectCode, ErrorCode,
    ErrorReply, Frame, HistoryRequest, Position, Publication, PublishRequest, Request,
    SubscribeRequest, Unsubscribed,
};
use crate::proxy::{ConnectCall, Proxy, PublishCall};
use crate::shards::{lock, Shards};

/// How a frame may be treated when the client's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A publication, join or leave: the slow-consumer policy applies.
    Publication,
    /// A reply or control push: if it cannot be queued, the connection
    /// must end (the client would be out of step).
    Control,
}

/// What became of a frame handed to a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Queued for sending.
    Queued,
    /// Dropped by the slow-consumer policy.
    Dropped,
    /// The connection is closed or closing (perhaps by this very frame
    /// overflowing its queue).
    Closed,
}

/// A front's handle on one client connection.
pub trait ClientSink: Send + Sync + 'static {
    /// Queues a frame without waiting.
    fn send(&self, frame: Frame, kind: FrameKind) -> SendOutcome;
    /// Ends the connection after what is queued, with a close code and
    /// reason (WebSocket close frame or its equivalent).
    fn close(&self, code: u16, reason: &str);
    /// Frames waiting to be written.
    fn queued(&self) -> usize;
    /// Queues a frame like [`send`](Self::send) without waking the
    /// connection's writer (the fan-out queues a publication on every
    /// subscriber first and wakes them after, a wave at a time). The flag
    /// says whether the sink must be woken with [`wake`](Self::wake): it
    /// was not already due.
    fn send_deferred(&self, frame: Frame, kind: FrameKind) -> (SendOutcome, bool) {
        (self.send(frame, kind), false)
    }
    /// Wakes the writer after [`send_deferred`](Self::send_deferred).
    fn wake(&self) {}
    /// Whether the connection is closing (asked to, or its queue
    /// overflowed): the session runs no more of its commands.
    fn is_closing(&self) -> bool {
        false
    }
}

/// Entries the hub holds, for metrics, `/api/info` and leak tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
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
}

/// The hub: cheap to clone, shared by the fronts and the HTTP API.
#[derive(Clone)]
pub struct Hub {
    node: Arc<Node>,
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
    config: Arc<Config>,
    engine: Arc<dyn Engine>,
    verifier: Verifier,
    proxy: Option<Proxy>,
    metrics: Arc<Metrics>,
    clients: Shards<u64, Arc<Client>>,
    users: Shards<String, Vec<u64>>,
    channels: Shards<String, Arc<Channel>>,
    shutting_down: AtomicBool,
    started: Instant,
    /// Subscribers with publications queued, waiting for their wake-up
    /// (see [`dispatch_wakes`]).
    wakes: Mutex<std::collections::VecDeque<Arc<dyn ClientSink>>>,
    wake_signal: Arc<tokio::sync::Notify>,
}

impl Drop for Node {
    fn drop(&mut self) {
        // Lets the wake dispatcher see that the node is gone.
        self.wake_signal.notify_one();
    }
}

/// Subscribers woken per wave: between two waves every other task that is
/// ready (a publisher's next command, say) gets its turn, so a command
/// waits behind at most one wave of subscriber writes rather than behind
/// the whole fan-out.
const WAKE_WAVE: usize = 128;

/// Wakes subscribers whose publications were queued by the fan-out, a
/// wave at a time, in the order they became due. Each subscriber is woken
/// once however many publications were queued for it meanwhile, so its
/// task writes them all in one go.
async fn dispatch_wakes(node: Weak<Node>, signal: Arc<tokio::sync::Notify>) {
    let mut wave: Vec<Arc<dyn ClientSink>> = Vec::with_capacity(WAKE_WAVE);
    loop {
        signal.notified().await;
        loop {
            let Some(node) = node.upgrade() else { return };
            {
                let mut due = lock(&node.wakes);
                let n = due.len().min(WAKE_WAVE);
                wave.extend(due.drain(..n));
                if due.is_empty() && due.capacity() > 4 * WAKE_WAVE {
                    // Give back the memory of a big fan-out.
                    *due = std::collections::VecDeque::new();
                }
            }
            drop(node);
            if wave.is_empty() {
                break;
            }
            for sink in wave.drain(..) {
                sink.wake();
            }
            tokio::task::yield_now().await;
        }
    }
}

#[derive(Default)]
struct Channel {
    /// Locked before `subscribers` when both are held.
    presence: Mutex<PendingDiff>,
    subscribers: Mutex<Subscribers>,
}

type ParkedFrames = Vec<(u64, Frame)>;

#[derive(Default)]
struct Subscribers {
    live: Vec<(u64, Arc<dyn ClientSink>)>,
    /// Position of each live subscriber in `live`.
    index: HashMap<u64, usize>,
    /// Subscribers reading history: publications wait here for them.
    parked: Vec<(u64, ParkedFrames)>,
}

impl Subscribers {
    fn is_empty(&self) -> bool {
        self.live.is_empty() && self.parked.is_empty()
    }

    fn members(&self) -> usize {
        self.live.len() + self.parked.len()
    }

    fn add_live(&mut self, client: u64, sink: Arc<dyn ClientSink>) {
        if self.index.contains_key(&client) {
            return;
        }
        self.index.insert(client, self.live.len());
        self.live.push((client, sink));
    }

    fn take_parked(&mut self, client: u64) -> Option<ParkedFrames> {
        let at = self.parked.iter().position(|(c, _)| *c == client)?;
        Some(self.parked.swap_remove(at).1)
    }

    fn remove(&mut self, client: u64) -> bool {
        if self.take_parked(client).is_some() {
            return true;
        }
        let Some(at) = self.index.remove(&client) else {
            return false;
        };
        self.live.swap_remove(at);
        if let Some((moved, _)) = self.live.get(at) {
            self.index.insert(*moved, at);
        }
        if self.live.is_empty() {
            // Give the memory of a big channel back when it empties.
            self.live = Vec::new();
            self.index = HashMap::new();
        }
        true
    }
}

/// A client connection as the core sees it.
pub(crate) struct Client {
    id: u64,
    sink: Arc<dyn ClientSink>,
    state: Mutex<ClientState>,
}

#[derive(Default)]
struct ClientState {
    /// Set by a successful `connect`.
    info: Option<Arc<ClientInfo>>,
    /// Channels granted by the connection token.
    granted: Vec<String>,
    subscriptions: Vec<String>,
    /// Subscriptions granted by a subscription token with an expiry.
    expiring: Vec<(String, u64)>,
    /// Token expiry (seconds since the Unix epoch).
    expires_at: Option<u64>,
    /// After expiry: when the client is disconnected unless it refreshed.
    refresh_deadline: Option<Instant>,
    /// The session has ended (no more subscriptions).
    closed: bool,
}

impl Client {
    fn send(&self, frame: Frame) {
        self.sink.send(frame, FrameKind::Control);
    }

    fn disconnect(&self, disconnect: &Disconnect) {
        self.send(protocol::encode_disconnect(disconnect));
        self.sink.close(disconnect.code, &disconnect.reason);
    }

    fn info(&self) -> Option<Arc<ClientInfo>> {
        lock(&self.state).info.clone()
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(code, message)
}

fn history_options(options: &ChannelOptions) -> HistoryOptions {
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
fn personal_users(channel: &str) -> Option<std::str::Split<'_, char>> {
    channel.rsplit_once('#').map(|(_, users)| users.split(','))
}

impl Hub {
    /// A hub over `engine`, with a maintenance task (token expiry,
    /// application pings, engine expiry) on the current tokio runtime.
    ///
    /// # Errors
    /// An invalid token key in the configuration.
    pub fn new(config: Config, engine: Arc<dyn Engine>) -> Result<Hub, String> {
        let verifier = Verifier::new(&config.token)?;
        let proxy = Proxy::new(&config.proxy);
        let node = Arc::new_cyclic(|me| Node {
            me: me.clone(),
            config: Arc::new(config),
            engine,
            verifier,
            proxy,
            metrics: Arc::new(Metrics::new()),
            clients: Shards::default(),
            users: Shards::default(),
            channels: Shards::default(),
            shutting_down: AtomicBool::new(false),
            started: Instant::now(),
            wakes: Mutex::default(),
            wake_signal: Arc::default(),
        });
        let events: Arc<dyn EngineEvents> = node.clone();
        node.engine.set_events(Arc::downgrade(&events));
        tokio::spawn(maintenance(Arc::downgrade(&node)));
        tokio::spawn(dispatch_wakes(
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

    /// The engine.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.node.engine
    }

    /// Opens a session for a new connection.
    pub fn open(&self, sink: Arc<dyn ClientSink>) -> Session {
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
            state: Mutex::new(ClientState::default()),
        });
        shard.insert(id, client.clone());
        drop(shard);
        self.node.metrics.connections.inc();
        // A session that opens during shutdown (its upgrade was under way
        // when it began) is told to leave at once, like the others. Either
        // this load sees the flag, or `shutdown` sees this client (SeqCst on
        // both sides): none is missed.
        if self.node.shutting_down.load(Ordering::SeqCst) {
            tell_to_leave(&client, &shutdown_notice());
        }
        Session {
            node: self.node.clone(),
            client,
            closed: false,
        }
    }

    /// Entries held now.
    pub fn counts(&self) -> HubCounts {
        let node = &self.node;
        let engine = node.engine.stats();
        let mut counts = HubCounts {
            sessions: node.clients.len(),
            users: node.users.len(),
            channels: node.channels.len(),
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
                .map(|c| {
                    let s = lock(&c.subscribers);
                    s.live.len() + s.parked.len()
                })
                .sum::<usize>();
        }
        counts
    }

    /// Engine entries.
    pub fn engine_stats(&self) -> EngineStats {
        self.node.engine.stats()
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
            .set(node.engine.stats().streams as i64);
        node.metrics.encode()
    }

    /// Whether the engine works.
    pub async fn health(&self) -> Result<(), String> {
        if self.node.shutting_down.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        self.node.engine.health().await.map_err(|e| e.to_string())
    }

    /// Seconds since start.
    pub fn uptime(&self) -> Duration {
        self.node.started.elapsed()
    }

    /// Publishes from the server (the HTTP API): no permission check
    /// beyond the channel's validity.
    ///
    /// # Errors
    /// 109 / 108 for the channel, 114 when the engine fails.
    pub async fn publish(
        &self,
        channel: &str,
        data: Box<RawValue>,
    ) -> Result<Option<StreamPosition>, ErrorReply> {
        let options = self.node.channel_options(channel)?;
        let publication = Publication {
            offset: 0,
            data,
            info: None,
        };
        self.node
            .engine
            .publish(channel, publication, history_options(options))
            .await
            .map_err(unavailable)
    }

    /// Who is present in a channel.
    ///
    /// # Errors
    /// 108 / 109 for the channel, 112 when presence is off, 114.
    pub async fn presence(&self, channel: &str) -> Result<Vec<Arc<ClientInfo>>, ErrorReply> {
        let options = self.node.channel_options(channel)?;
        if !options.presence {
            return Err(error(
                ErrorCode::NotAvailable,
                "presence is off for this namespace",
            ));
        }
        self.node
            .engine
            .presence(channel)
            .await
            .map_err(unavailable)
    }

    /// Presence counts of a channel.
    ///
    /// # Errors
    /// As [`presence`](Self::presence).
    pub async fn presence_stats(&self, channel: &str) -> Result<PresenceStats, ErrorReply> {
        let options = self.node.channel_options(channel)?;
        if !options.presence {
            return Err(error(
                ErrorCode::NotAvailable,
                "presence is off for this namespace",
            ));
        }
        self.node
            .engine
            .presence_stats(channel)
            .await
            .map_err(unavailable)
    }

    /// History of a channel.
    ///
    /// # Errors
    /// 108 / 109, 112 when history is off, 115 for a position of another
    /// epoch, 114.
    pub async fn history(&self, request: &HistoryRequest) -> Result<HistoryReply, ErrorReply> {
        self.node.history(request).await
    }

    /// Channels with subscribers on this node, with their subscriber
    /// counts, sorted by name; `prefix` filters.
    pub fn channels(&self, prefix: &str) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = Vec::new();
        for shard in self.node.channels.each() {
            for (name, channel) in shard.iter().filter(|(n, _)| n.starts_with(prefix)) {
                let s = lock(&channel.subscribers);
                out.push((name.clone(), s.live.len() + s.parked.len()));
            }
        }
        out.sort();
        out
    }

    /// Disconnects a user's clients (or one of them). Returns how many.
    pub fn disconnect_user(
        &self,
        user: &str,
        client: Option<&str>,
        disconnect: &Disconnect,
    ) -> usize {
        let clients = self.node.clients_of(user, client);
        for c in &clients {
            c.disconnect(disconnect);
        }
        tracing::info!(
            user,
            client,
            code = disconnect.code,
            count = clients.len(),
            "disconnected by the API"
        );
        clients.len()
    }

    /// Unsubscribes a user's clients (or one of them) from a channel, with
    /// an `unsubscribe` push. Returns how many were subscribed.
    pub async fn unsubscribe_user(&self, user: &str, channel: &str, client: Option<&str>) -> usize {
        let why = Unsubscribed {
            code: 2000,
            reason: "unsubscribed by the server".into(),
        };
        let mut count = 0;
        for c in self.node.clients_of(user, client) {
            if self.node.server_unsubscribe(&c, channel, &why).await {
                count += 1;
            }
        }
        count
    }

    /// Graceful shutdown: every client gets a `disconnect` push (3001,
    /// reconnect) and its connection is closed with 1001; new connections
    /// are refused.
    pub fn shutdown(&self) {
        self.node.shutting_down.store(true, Ordering::SeqCst);
        let notice = shutdown_notice();
        for shard in self.node.clients.each() {
            for client in shard.values() {
                tell_to_leave(client, &notice);
            }
        }
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.node.shutting_down.load(Ordering::Relaxed)
    }
}

/// The `disconnect` push of a shutdown (3001, reconnect).
fn shutdown_notice() -> Frame {
    protocol::encode_disconnect(&Disconnect::new(
        DisconnectCode::Shutdown,
        "server shutting down",
    ))
}

/// Sends the shutdown `notice`, then close 1001.
fn tell_to_leave(client: &Client, notice: &Frame) {
    client.sink.send(notice.clone(), FrameKind::Control);
    client.sink.close(1001, "server shutting down");
}

fn unavailable(e: crate::engine::EngineError) -> ErrorReply {
    tracing::warn!("{e}");
    error(
        ErrorCode::Unavailable,
        "the engine is unavailable; retry later",
    )
}

/// A history reply.
#[derive(Debug, Serialize)]
pub struct HistoryReply {
    /// The publications.
    pub publications: Vec<Arc<Publication>>,
    /// The stream's current offset.
    pub offset: u64,
    /// The stream's epoch: `""` when the channel has no stream (no
    /// publication and no subscriber yet, or it expired).
    pub epoch: Arc<str>,
}

impl Node {
    fn channel_options(&self, channel: &str) -> Result<&ChannelOptions, ErrorReply> {
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
        self.config.channel_options(channel).map_err(|ns| {
            error(
                ErrorCode::UnknownNamespace,
                format!("namespace {ns:?} is not configured"),
            )
        })
    }

    /// A user's connected clients, or the one with id `client` (which
    /// must belong to `user`; "" finds anonymous clients by id).
    fn clients_of(&self, user: &str, client: Option<&str>) -> Vec<Arc<Client>> {
        if let Some(client) = client {
            let Ok(id) = u64::from_str_radix(client, 16) else {
                return Vec::new();
            };
            let found = self.clients.lock(&id).get(&id).cloned();
            return found
                .filter(|c| c.info().is_some_and(|info| info.user == user))
                .into_iter()
                .collect();
        }
        if user.is_empty() {
            return Vec::new();
        }
        let ids: Vec<u64> = self.users.lock(user).get(user).cloned().unwrap_or_default();
        ids.into_iter()
            .filter_map(|id| self.clients.lock(&id).get(&id).cloned())
            .collect()
    }

    /// Adds a parked subscriber; true when the channel is new on this node.
    fn park(&self, channel: &str, client: u64) -> bool {
        let mut shard = self.channels.lock(channel);
        let mut created = false;
        let ch = shard.entry(channel.to_owned()).or_insert_with(|| {
            created = true;
            Arc::default()
        });
        lock(&ch.subscribers).parked.push((client, Vec::new()));
        created
    }

    /// Sends the subscribe reply and what was parked after `after`, then
    /// makes the subscriber live, all under the channel's lock (so that no
    /// publication slips between). When the subscriber was removed
    /// meanwhile (unsubscribed by the server), only the reply goes out.
    fn go_live(&self, channel: &str, client: &Client, reply: Frame, after: u64) {
        let Some(ch) = self.channels.lock(channel).get(channel).cloned() else {
            client.sink.send(reply, FrameKind::Control);
            return;
        };
        let mut subs = lock(&ch.subscribers);
        let Some(parked) = subs.take_parked(client.id) else {
            client.sink.send(reply, FrameKind::Control);
            return;
        };
        client.sink.send(reply, FrameKind::Control);
        for (offset, frame) in parked {
            if offset > after {
                client.sink.send(frame, FrameKind::Publication);
            }
        }
        subs.add_live(client.id, client.sink.clone());
    }

    /// Adds a live subscriber and sends the reply under the channel's
    /// lock; true when the channel is new on this node.
    fn attach(&self, channel: &str, client: &Client, reply: Frame) -> bool {
        let mut shard = self.channels.lock(channel);
        let mut created = false;
        let ch = shard.entry(channel.to_owned()).or_insert_with(|| {
            created = true;
            Arc::default()
        });
        let mut subs = lock(&ch.subscribers);
        client.sink.send(reply, FrameKind::Control);
        subs.add_live(client.id, client.sink.clone());
        created
    }

    /// Removes a subscriber; true when the channel emptied and was removed.
    fn detach(&self, channel: &str, client: u64) -> (bool, bool) {
        let mut shard = self.channels.lock(channel);
        let Some(ch) = shard.get(channel) else {
            return (false, false);
        };
        let mut subs = lock(&ch.subscribers);
        let removed = subs.remove(client);
        let empty = subs.is_empty();
        drop(subs);
        if empty {
            shard.remove(channel);
        }
        (removed, empty)
    }

    /// Unsubscribes a client on the server's initiative, with an
    /// `unsubscribe` push; false when it was not subscribed.
    async fn server_unsubscribe(&self, client: &Client, channel: &str, why: &Unsubscribed) -> bool {
        let removed = {
            let mut st = lock(&client.state);
            let before = st.subscriptions.len();
            st.subscriptions.retain(|s| s != channel);
            st.expiring.retain(|(s, _)| s != channel);
            st.subscriptions.len() != before
        };
        if removed {
            self.leave_channel(client, channel).await;
            client.send(protocol::encode_unsubscribe(channel, why));
        }
        removed
    }

    /// Everything that leaving a channel entails (the client's own list
    /// was already updated by the caller).
    async fn leave_channel(&self, client: &Client, channel: &str) {
        let (removed, emptied) = self.detach(channel, client.id);
        if removed {
            self.metrics.subscriptions.dec();
        }
        if emptied {
            self.metrics.channels.dec();
            if let Err(e) = self.engine.unsubscribe(channel).await {
                tracing::warn!("{e}");
            }
        }
        let (Ok(options), Some(info)) = (self.config.channel_options(channel), client.info())
        else {
            return;
        };
        if options.presence {
            if let Err(e) = self.engine.remove_presence(channel, &info.client).await {
                tracing::warn!("{e}");
            }
        }
        if options.join_leave {
            if let Err(e) = self.engine.publish_leave(channel, info).await {
                tracing::warn!("{e}");
            }
        }
    }

    async fn history(&self, request: &HistoryRequest) -> Result<HistoryReply, ErrorReply> {
        let options = self.channel_options(&request.channel)?;
        if !options.has_history() {
            return Err(error(
                ErrorCode::NotAvailable,
                "history is off for this namespace",
            ));
        }
        let max = self.config.client.max_history_limit;
        // Without `since`, `limit` counts from the newest end ("the last 50
        // messages"), in the order asked for: read newest first, and turn
        // the page around for oldest first.
        let latest_oldest_first = request.since.is_none() && !request.reverse;
        let mut result = self
            .engine
            .history(
                &request.channel,
                HistoryQuery {
                    since: request.since.as_ref().map(|p| p.offset),
                    limit: request.limit.unwrap_or(max).min(max),
                    reverse: request.reverse || latest_oldest_first,
                    // Reads leave nothing behind: a client's subscribe
                    // started the stream already; an API read of a channel
                    // without one gets {0, ""}.
                    start_stream: false,
                    options: history_options(options),
                },
            )
            .await
            .map_err(unavailable)?;
        if latest_oldest_first {
            result.publications.reverse();
        }
        if let Some(since) = &request.since {
            if *since.epoch != *result.position.epoch {
                return Err(error(
                    ErrorCode::StalePosition,
                    "the position is from another epoch of the stream",
                ));
            }
        }
        Ok(HistoryReply {
            publications: result.publications,
            offset: result.position.offset,
            epoch: result.position.epoch,
        })
    }

    /// Queues `frame` on every live subscriber of `ch` (and, for a
    /// publication at offset `park`, on the parked ones).
    fn deliver(&self, ch: &Channel, frame: &Frame, park: Option<u64>) {
        let mut subs = lock(&ch.subscribers);
        if let Some(offset) = park {
            for (_, parked) in subs.parked.iter_mut() {
                parked.push((offset, frame.clone()));
            }
        }
        let (mut delivered, mut dropped) = (0u64, 0u64);
        // Queued on every subscriber first; the ones not already due are
        // woken afterwards by the dispatcher, a wave at a time.
        let mut due = Vec::new();
        for (_, sink) in &subs.live {
            let (outcome, wake) = sink.send_deferred(frame.clone(), FrameKind::Publication);
            match outcome {
                SendOutcome::Queued => delivered += 1,
                SendOutcome::Dropped => dropped += 1,
                SendOutcome::Closed => {}
            }
            if wake {
                due.push(sink.clone());
            }
        }
        drop(subs);
        if !due.is_empty() {
            lock(&self.wakes).extend(due);
            self.wake_signal.notify_one();
        }
        self.metrics.deliveries.inc_by(delivered);
        if dropped > 0 {
            self.metrics.dropped.inc_by(dropped);
        }
    }

    /// A join or leave: gathered into the channel's next `presence_diff`
    /// push. The first one after a quiet interval goes out at once; the
    /// ones that follow within `join_leave_interval` go out together when
    /// it ends (see [`crate::presence_diff`]).
    fn presence_event(&self, channel: &str, info: &Arc<ClientInfo>, join: bool) {
        let Some(ch) = self.channels.lock(channel).get(channel).cloned() else {
            return;
        };
        let Ok(options) = self.config.channel_options(channel) else {
            return;
        };
        let max = options.join_leave_max_members;
        let mut pending = lock(&ch.presence);
        let members = lock(&ch.subscribers).members();
        pending.record(info, join, members, max);
        if pending.scheduled {
            return;
        }
        if let Some(sent) = pending.last_sent {
            let due = sent + options.join_leave_interval;
            if Instant::now() < due {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    pending.scheduled = true;
                    runtime.spawn(send_presence_diff_at(
                        due,
                        self.me.clone(),
                        Arc::downgrade(&ch),
                        channel.to_owned(),
                    ));
                    return;
                }
            }
        }
        self.send_presence_diff(channel, &ch, &mut pending, max);
    }

    /// Sends what `pending` (the channel's, locked by the caller) gathered.
    fn send_presence_diff(
        &self,
        channel: &str,
        ch: &Channel,
        pending: &mut PendingDiff,
        max_listed: usize,
    ) {
        let members = lock(&ch.subscribers).members();
        if let Some(frame) = pending.take(channel, members, max_listed) {
            pending.last_sent = Some(Instant::now());
            self.deliver(ch, &frame, None);
        }
    }
}

/// The timer of a channel's coalesced `presence_diff` push.
async fn send_presence_diff_at(due: Instant, node: Weak<Node>, ch: Weak<Channel>, channel: String) {
    tokio::time::sleep_until(due).await;
    let (Some(node), Some(ch)) = (node.upgrade(), ch.upgrade()) else {
        return;
    };
    let Ok(options) = node.config.channel_options(&channel) else {
        return;
    };
    let mut pending = lock(&ch.presence);
    pending.scheduled = false;
    node.send_presence_diff(&channel, &ch, &mut pending, options.join_leave_max_members);
}

impl EngineEvents for Node {
    fn publication(&self, channel: &str, publication: &Arc<Publication>) {
        self.metrics.publications.inc();
        let Some(ch) = self.channels.lock(channel).get(channel).cloned() else {
            return;
        };
        let frame = protocol::encode_publication(channel, publication);
        let mut pending = lock(&ch.presence);
        // Members hear who joined before what the newcomer publishes.
        if pending.has_listed() {
            if let Ok(options) = self.config.channel_options(channel) {
                self.send_presence_diff(channel, &ch, &mut pending, options.join_leave_max_members);
            }
        }
        self.deliver(&ch, &frame, Some(publication.offset));
    }

    fn join(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.presence_event(channel, info, true);
    }

    fn leave(&self, channel: &str, info: &Arc<ClientInfo>) {
        self.presence_event(channel, info, false);
    }
}

/// Token expiry, application pings and engine expiry, about once a second.
async fn maintenance(node: Weak<Node>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ping = Instant::now();
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        node.engine.maintain();
        let now = Instant::now();
        let interval = node.config.client.ping_interval;
        let ping = !interval.is_zero() && now.duration_since(last_ping) >= interval;
        if ping {
            last_ping = now;
        }
        let grace = node.config.client.refresh_grace;
        let unix = now_unix();
        let ping_frame = protocol::ping_frame();
        for shard in node.clients.each() {
            for client in shard.values() {
                let mut st = lock(&client.state);
                if st.info.is_none() || st.closed {
                    continue;
                }
                if ping {
                    client.sink.send(ping_frame.clone(), FrameKind::Publication);
                }
                if st.expiring.iter().any(|(_, exp)| unix >= *exp) {
                    let expired: Vec<String> = st
                        .expiring
                        .iter()
                        .filter(|(_, exp)| unix >= *exp)
                        .map(|(channel, _)| channel.clone())
                        .collect();
                    st.expiring.retain(|(_, exp)| unix < *exp);
                    let (node, client) = (node.clone(), client.clone());
                    tokio::spawn(async move {
                        let why = Unsubscribed {
                            code: 2001,
                            reason: "subscription token expired".into(),
                        };
                        for channel in expired {
                            node.server_unsubscribe(&client, &channel, &why).await;
                        }
                    });
                }
                if st.expires_at.is_some_and(|exp| unix >= exp) {
                    match st.refresh_deadline {
                        None => {
                            st.refresh_deadline = Some(now + grace);
                            client.send(protocol::encode_refresh(grace.as_secs()));
                        }
                        Some(deadline) if now >= deadline => {
                            st.expires_at = None;
                            drop(st);
                            tracing::debug!(client = %format!("{:016x}", client.id), "token expired");
                            client.disconnect(&Disconnect::new(
                                DisconnectCode::TokenExpired,
                                "connection token expired",
                            ));
                        }
                        Some(_) => {}
                    }
                }
            }
        }
    }
}

/// One connection's session with the hub; see the module docs.
pub struct Session {
    node: Arc<Node>,
    client: Arc<Client>,
    closed: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("client", &format!("{:016x}", self.client.id))
            .finish()
    }
}

#[derive(Serialize)]
struct ConnectReply<'a> {
    client: &'a str,
    user: &'a str,
    version: u32,
    /// Seconds between the server's application pings (0: none).
    ping_interval: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<u64>,
}

#[derive(Serialize)]
struct SubscribeReply<'a> {
    recoverable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    publications: &'a [Arc<Publication>],
}

type Outcome = Result<Option<String>, ErrorReply>;

fn body(value: &impl Serialize) -> Outcome {
    Ok(Some(
        serde_json::to_string(value).unwrap_or_else(|_| "{}".into()),
    ))
}

impl Session {
    /// The client id.
    pub fn client_id(&self) -> String {
        format!("{:016x}", self.client.id)
    }

    /// Whether `connect` succeeded.
    pub fn is_connected(&self) -> bool {
        self.client.info().is_some()
    }

    /// The connect timeout fired: disconnect.
    pub fn connect_timeout(&self) {
        self.client.disconnect(&Disconnect::new(
            DisconnectCode::ConnectTimeout,
            "no connect command in time",
        ));
    }

    /// Handles one text message: a command, or a newline-separated batch.
    /// Commands past `client.max_batch` are not run; each gets error 113
    /// with its id, and those without an id one 113 without id together.
    /// Once an error reply finds the connection closing (its queue
    /// overflowed, say), the rest of the message is dropped unread: a
    /// flood of refusals costs at most one send queue.
    pub async fn handle_text(&self, message: &str) {
        let max = self.node.config.client.max_batch;
        let mut refused_without_id = 0;
        for item in protocol::parse_batch(message, max) {
            // A reply that overflowed the queue closed the connection: the
            // rest of the batch must not run (its effects, a publication
            // say, would happen for a client that never hears of them).
            if self.client.sink.is_closing() {
                return;
            }
            let outcome = match item {
                BatchItem::Command(Ok(command)) => {
                    self.dispatch(command).await;
                    continue;
                }
                BatchItem::Command(Err(e)) => self.reply_error(e.id, &e.error),
                BatchItem::Refused { id: 0, .. } => {
                    refused_without_id += 1;
                    continue;
                }
                BatchItem::Refused { id, number } => {
                    self.reply_error(id, &protocol::batch_limit_error(max, number))
                }
            };
            if outcome == SendOutcome::Closed {
                return;
            }
        }
        if refused_without_id > 0 {
            let e = protocol::batch_limit_error_without_id(max, refused_without_id);
            self.reply_error(0, &e);
        }
    }

    /// A binary message: not part of the protocol.
    pub fn handle_binary(&self) {
        self.reply_error(
            0,
            &error(
                ErrorCode::BadRequest,
                "binary messages are not part of the protocol: send JSON text",
            ),
        );
    }

    fn reply_error(&self, id: u64, e: &ErrorReply) -> SendOutcome {
        self.node.metrics.error(e.code);
        self.client
            .sink
            .send(protocol::encode_error(id, e), FrameKind::Control)
    }

    async fn dispatch(&self, command: Command) {
        let Command { id, request } = command;
        let name = request.name();
        self.node
            .metrics
            .commands
            .get_or_create(&MethodLabel { method: name })
            .inc();
        let connected = self.is_connected();
        let outcome = match request {
            Request::Connect(r) => self.connect(r).await,
            _ if !connected => Err(error(ErrorCode::NotConnected, "send connect first")),
            Request::Subscribe(r) => self.subscribe(id, r).await,
            Request::Unsubscribe(r) => self.unsubscribe(&r.channel).await,
            Request::Publish(r) => self.publish(r).await,
            Request::Presence(r) => self.presence(&r.channel).await,
            Request::PresenceStats(r) => self.presence_stats(&r.channel).await,
            Request::History(r) => self.history(r).await,
            Request::Refresh(r) => self.refresh(&r.token).await,
            Request::Ping => Ok(Some("{}".into())),
        };
        match outcome {
            Ok(Some(result)) if id != 0 => {
                let frame = format!("{{\"id\":{id},\"{name}\":{result}}}");
                self.client.send(frame.into());
            }
            Ok(_) => {}
            Err(e) => {
                self.reply_error(id, &e);
            }
        }
    }

    async fn connect(&self, request: ConnectRequest) -> Outcome {
        let node = &self.node;
        if self.is_connected() {
            return Err(error(ErrorCode::AlreadyConnected, "already connected"));
        }
        if node.shutting_down.load(Ordering::Relaxed) {
            return Err(error(ErrorCode::Unavailable, "the server is shutting down"));
        }
        let client_id = self.client_id();
        let mut claims = match &request.token {
            Some(token) => node.verifier.connection(token).await?,
            None => Default::default(),
        };
        if let Some(proxy) = &node.proxy {
            let call = ConnectCall {
                client: &client_id,
                transport: "websocket",
                user: &claims.user,
                data: request.data.as_deref(),
            };
            if let Some(result) = proxy.connect(&call).await? {
                if let Some(user) = result.user {
                    claims.user = user;
                }
                if let Some(info) = result.info {
                    claims.info = Some(info);
                }
                if let Some(exp) = result.expire_at {
                    claims.expires_at = Some(exp);
                }
                if let Some(channels) = result.channels {
                    claims.channels = channels;
                }
            }
        }
        // With anonymous clients off, every connection has a user: from the
        // token's `sub` or from the connect proxy. A signed token without
        // one (or with `sub: ""`) would otherwise connect as anonymous.
        if claims.user.is_empty() && !node.config.client.anonymous {
            return Err(error(
                ErrorCode::Unauthorized,
                if request.token.is_some() {
                    "the token names no user (its sub claim is missing or empty), and \
                     anonymous clients are not allowed"
                } else {
                    "a connection token is required"
                },
            ));
        }
        let info = Arc::new(ClientInfo {
            client: client_id.clone(),
            user: claims.user.clone(),
            info: claims.info,
        });
        {
            let mut st = lock(&self.client.state);
            if st.closed {
                return Err(error(ErrorCode::Unavailable, "the connection is closing"));
            }
            st.info = Some(info);
            st.granted = claims.channels;
            st.expires_at = claims.expires_at;
        }
        if !claims.user.is_empty() {
            let mut users = node.users.lock(claims.user.as_str());
            let ids = users.entry(claims.user.clone()).or_default();
            if ids.is_empty() {
                node.metrics.users.inc();
            }
            ids.push(self.client.id);
        }
        node.metrics.clients.inc();
        tracing::debug!(client = %client_id, user = %claims.user, "connected");
        body(&ConnectReply {
            client: &client_id,
            user: &claims.user,
            version: protocol::VERSION,
            ping_interval: node.config.client.ping_interval.as_secs(),
            expires_in: claims.expires_at.map(|exp| exp.saturating_sub(now_unix())),
        })
    }

    async fn can_subscribe(
        &self,
        channel: &str,
        options: &ChannelOptions,
        token: Option<&str>,
        info: &ClientInfo,
    ) -> Result<Option<u64>, ErrorReply> {
        let denied = |m: &str| Err(error(ErrorCode::PermissionDenied, m));
        if let Some(mut users) = personal_users(channel) {
            return if !info.user.is_empty() && users.any(|u| u == info.user) {
                Ok(None)
            } else {
                denied("this personal channel belongs to another user")
            };
        }
        if let Some(token) = token {
            let claims = self.node.verifier.subscription(token).await?;
            if claims.user.is_empty() && !self.node.config.client.anonymous {
                return Err(error(
                    ErrorCode::Unauthorized,
                    "the subscription token names no user (its sub claim is missing or \
                     empty), and anonymous clients are not allowed",
                ));
            }
            if claims.channel != channel || claims.user != info.user {
                return denied("the subscription token is for another channel or user");
            }
            // The subscription ends when its token expires.
            return Ok(claims.expires_at);
        }
        match options.subscribe {
            SubscribeRule::Anonymous => Ok(None),
            SubscribeRule::Authenticated if !info.user.is_empty() => Ok(None),
            SubscribeRule::Authenticated => denied("this namespace is for authenticated users"),
            SubscribeRule::Token => {
                if claim_grants(&lock(&self.client.state).granted, channel) {
                    Ok(None)
                } else {
                    denied("this channel needs a token that grants it")
                }
            }
        }
    }

    async fn subscribe(&self, id: u64, request: SubscribeRequest) -> Outcome {
        let node = &self.node;
        let channel = request.channel.as_str();
        let options = node.channel_options(channel)?;
        let info = self.client.info().expect("connected");
        let expires_at = self
            .can_subscribe(channel, options, request.token.as_deref(), &info)
            .await?;
        {
            let mut st = lock(&self.client.state);
            if st.subscriptions.iter().any(|s| s == channel) {
                return Err(error(ErrorCode::AlreadySubscribed, "already subscribed"));
            }
            if st.subscriptions.len() >= node.config.client.max_subscriptions {
                return Err(error(
                    ErrorCode::LimitExceeded,
                    format!(
                        "at most {} subscriptions per client",
                        node.config.client.max_subscriptions
                    ),
                ));
            }
            // Most clients hold one or two subscriptions: grow one at a
            // time (a first push would reserve four).
            st.subscriptions.reserve_exact(1);
            st.subscriptions.push(channel.to_owned());
            if let Some(exp) = expires_at {
                st.expiring.push((channel.to_owned(), exp));
            }
        }
        if options.presence {
            if let Err(e) = node.engine.add_presence(channel, info.clone()).await {
                lock(&self.client.state)
                    .subscriptions
                    .retain(|s| s != channel);
                return Err(unavailable(e));
            }
        }
        let created = if options.has_history() {
            self.subscribe_positioned(id, &request, options).await?
        } else {
            let reply = SubscribeReply {
                recoverable: false,
                epoch: None,
                offset: None,
                recovered: None,
                publications: &[],
            };
            let frame = protocol::encode_reply(id, "subscribe", &reply);
            node.attach(channel, &self.client, frame)
        };
        node.metrics.subscriptions.inc();
        if created {
            node.metrics.channels.inc();
            if let Err(e) = node.engine.subscribe(channel).await {
                tracing::warn!("{e}");
            }
        }
        // Unsubscribed by the server meanwhile: undo, leave nothing behind.
        if !lock(&self.client.state)
            .subscriptions
            .iter()
            .any(|s| s == channel)
        {
            node.leave_channel(&self.client, channel).await;
            return Ok(None);
        }
        if options.join_leave {
            if let Err(e) = node.engine.publish_join(channel, info).await {
                tracing::warn!("{e}");
            }
        }
        Ok(None)
    }

    /// Subscribes to a channel with history: park, read the position (and
    /// what was missed), starting the stream if there is none, reply, then
    /// go live. Returns whether the channel is new on this node.
    async fn subscribe_positioned(
        &self,
        id: u64,
        request: &SubscribeRequest,
        options: &ChannelOptions,
    ) -> Result<bool, ErrorReply> {
        let node = &self.node;
        let channel = request.channel.as_str();
        let since = (request.recover && options.has_recovery()).then(|| Position {
            offset: request.offset.unwrap_or(0),
            epoch: request.epoch.clone().unwrap_or_default(),
        });
        let created = node.park(channel, self.client.id);
        let query = HistoryQuery {
            since: since.as_ref().map(|p| p.offset),
            limit: if since.is_some() {
                options.history_size
            } else {
                0
            },
            reverse: false,
            // The reply's epoch is the one of the publications that follow
            // (pushes carry none): it must be the stream's, even before the
            // first publication.
            start_stream: true,
            options: history_options(options),
        };
        let result = match node.engine.history(channel, query).await {
            Ok(result) => result,
            Err(e) => {
                lock(&self.client.state)
                    .subscriptions
                    .retain(|s| s != channel);
                node.leave_channel(&self.client, channel).await;
                return Err(unavailable(e));
            }
        };
        let recovered = since.as_ref().map(|p| result.recovers(p));
        let publications: &[Arc<Publication>] = if recovered == Some(true) {
            &result.publications
        } else {
            &[]
        };
        let reply = SubscribeReply {
            recoverable: options.has_recovery(),
            epoch: Some(&result.position.epoch),
            offset: Some(result.position.offset),
            recovered: request.recover.then_some(recovered == Some(true)),
            publications,
        };
        let frame = protocol::encode_reply(id, "subscribe", &reply);
        node.go_live(channel, &self.client, frame, result.position.offset);
        Ok(created)
    }

    async fn unsubscribe(&self, channel: &str) -> Outcome {
        let removed = {
            let mut st = lock(&self.client.state);
            let before = st.subscriptions.len();
            st.subscriptions.retain(|s| s != channel);
            st.expiring.retain(|(s, _)| s != channel);
            st.subscriptions.len() != before
        };
        if !removed {
            return Err(error(ErrorCode::NotSubscribed, "not subscribed"));
        }
        self.node.leave_channel(&self.client, channel).await;
        Ok(Some("{}".into()))
    }

    fn is_subscribed(&self, channel: &str) -> bool {
        lock(&self.client.state)
            .subscriptions
            .iter()
            .any(|s| s == channel)
    }

    async fn publish(&self, request: PublishRequest) -> Outcome {
        let node = &self.node;
        let channel = request.channel.as_str();
        let options = node.channel_options(channel)?;
        match options.publish {
            PublishRule::Server => {
                return Err(error(
                    ErrorCode::PermissionDenied,
                    "only the server publishes to this namespace",
                ))
            }
            PublishRule::Subscribers if !self.is_subscribed(channel) => {
                return Err(error(
                    ErrorCode::PermissionDenied,
                    format!(
                        "subscribe to {channel:?} before publishing to it: its namespace has \
                         publish = \"subscribers\" (publish = \"clients\" lets any connected \
                         client publish)"
                    ),
                ))
            }
            _ => {}
        }
        let info = self.client.info().expect("connected");
        let mut data = request.data;
        if let Some(proxy) = &node.proxy {
            let call = PublishCall {
                client: &info.client,
                user: &info.user,
                channel,
                data: &data,
            };
            if let Some(result) = proxy.publish(&call).await? {
                if let Some(replacement) = result.data {
                    data = replacement;
                }
            }
        }
        let publication = Publication {
            offset: 0,
            data,
            info: Some(info),
        };
        let position = node
            .engine
            .publish(channel, publication, history_options(options))
            .await
            .map_err(unavailable)?;
        match position {
            Some(p) => body(&serde_json::json!({"offset": p.offset, "epoch": &*p.epoch})),
            None => Ok(Some("{}".into())),
        }
    }

    fn must_be_subscribed(&self, channel: &str) -> Result<(), ErrorReply> {
        if self.is_subscribed(channel) {
            Ok(())
        } else {
            Err(error(
                ErrorCode::PermissionDenied,
                "subscribe to the channel first",
            ))
        }
    }

    async fn presence(&self, channel: &str) -> Outcome {
        let hub = Hub {
            node: self.node.clone(),
        };
        hub.node.channel_options(channel)?;
        self.must_be_subscribed(channel)?;
        let clients = hub.presence(channel).await?;
        body(&serde_json::json!({ "clients": clients }))
    }

    async fn presence_stats(&self, channel: &str) -> Outcome {
        let hub = Hub {
            node: self.node.clone(),
        };
        hub.node.channel_options(channel)?;
        self.must_be_subscribed(channel)?;
        let stats = hub.presence_stats(channel).await?;
        body(&serde_json::json!({ "clients": stats.clients, "users": stats.users }))
    }

    async fn history(&self, request: HistoryRequest) -> Outcome {
        self.node.channel_options(&request.channel)?;
        self.must_be_subscribed(&request.channel)?;
        body(&self.node.history(&request).await?)
    }

    async fn refresh(&self, token: &str) -> Outcome {
        let claims = self.node.verifier.connection(token).await?;
        let mut st = lock(&self.client.state);
        let user = st.info.as_ref().map(|i| i.user.clone()).unwrap_or_default();
        if claims.user != user {
            return Err(error(
                ErrorCode::Unauthorized,
                "the new token is for another user",
            ));
        }
        st.expires_at = claims.expires_at;
        st.refresh_deadline = None;
        body(&serde_json::json!({
            "expires_in": claims.expires_at.map(|exp| exp.saturating_sub(now_unix()))
        }))
    }

    /// The connection ended: leave every channel, forget the client.
    pub async fn close(mut self) {
        self.closed = true;
        Box::pin(cleanup(self.node.clone(), self.client.clone())).await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.closed {
            // The front's task was cancelled: clean up anyway.
            let (node, client) = (self.node.clone(), self.client.clone());
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(cleanup(node, client));
            }
        }
    }
}

async fn cleanup(node: Arc<Node>, client: Arc<Client>) {
    let (subscriptions, info) = {
        let mut st = lock(&client.state);
        st.closed = true;
        (std::mem::take(&mut st.subscriptions), st.info.clone())
    };
    for channel in &subscriptions {
        node.leave_channel(&client, channel).await;
    }
    node.clients.lock(&client.id).remove(&client.id);
    node.metrics.connections.dec();
    if let Some(info) = info {
        node.metrics.clients.dec();
        if !info.user.is_empty() {
            let mut users = node.users.lock(info.user.as_str());
            if let Some(ids) = users.get_mut(&info.user) {
                ids.retain(|id| *id != client.id);
                if ids.is_empty() {
                    users.remove(&info.user);
                    node.metrics.users.dec();
                }
            }
        }
    }
}
