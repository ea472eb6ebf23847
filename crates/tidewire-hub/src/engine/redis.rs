//! [`RedisEngine`]: streams, offsets, epochs and presence in Redis, and
//! the fan-out between nodes over Redis PUB/SUB.
//!
//! Keys of a channel share one hash tag, `{<channel>}`, so that a script's
//! keys are in one slot (Redis Cluster):
//!
//! - `<prefix>:{<channel>}:m` the stream's meta hash: `e` epoch, `t` the
//!   newest offset, `l` the history TTL in ms;
//! - `<prefix>:{<channel>}:s` the stream: entry id `<offset>-0`, fields
//!   `d` (the publication's envelope, [`super::wire`]) and `x` (when it
//!   expires, ms since the Unix epoch);
//! - `<prefix>:{<channel>}:t` the channel's PUB/SUB topic;
//! - `<prefix>:{<channel>}:p` / `:z` presence: client id to client info,
//!   and client id to its expiry (ms);
//! - `<prefix>:control` the topic of control messages between nodes.
//!
//! One script per publication assigns the offset (starting a new epoch
//! when the meta hash is missing), appends the entry, trims the stream to
//! the history size and to its TTL, sets the keys' expiry, and publishes
//! the publication with its offset and epoch, so that every node learns
//! the position with the publication. A history read is one script too
//! (the position and the entries in one step).
//!
//! One reader task per node holds the PUB/SUB connection: it hands what
//! arrives to the node in arrival order (so a channel's publications stay
//! in offset order), and after a lost connection reconnects and
//! subscribes every channel again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, PubSubSink};
use redis::{Script, Value};

use super::wire::{self, Event};
use super::{
    BoxFuture, Broker, EngineError, EngineEvents, EngineStats, HistoryOptions, HistoryQuery,
    HistoryResult, PresenceStats, PresenceStore, StreamPosition,
};
use crate::protocol::{ClientInfo, Publication};
use crate::shards::lock;

/// The time expiries are counted in: ms since the Unix epoch. Nodes of a
/// cluster compare theirs (as for presence), so keep their clocks in sync
/// (NTP); tests give a clock they move themselves.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    })
}

/// How a node reaches Redis.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// The prefix of every key and topic (nodes of one cluster share it).
    pub prefix: String,
    /// How long a command may take before the engine reports Redis
    /// unavailable.
    pub timeout: Duration,
    /// Where expiries are read from ([`system_clock`] by default).
    pub clock: Clock,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "tidewire".into(),
            timeout: Duration::from_secs(5),
            clock: system_clock(),
        }
    }
}

/// The start of every stream script: a stream whose expiry (`x` in the
/// meta hash, node time) has passed is gone. Keys get a Redis expiry a
/// minute past that too, so that Redis drops what no node reads again.
const EXPIRED: &str = r#"
local function expire(now)
  local x = redis.call('HGET', KEYS[2], 'x')
  if x and tonumber(x) <= now then
    redis.call('DEL', KEYS[1], KEYS[2])
  end
end
local function keep_until(x)
  redis.call('HSET', KEYS[2], 'x', x)
  redis.call('PEXPIREAT', KEYS[2], x + 60000)
  if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIREAT', KEYS[1], x + 60000) end
end
local function trim(now)
  while true do
    local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
    if #first == 0 or tonumber(first[1][2][4]) > now then break end
    redis.call('XDEL', KEYS[1], first[1][1])
  end
end
"#;

const PUBLISH: &str = r#"
-- KEYS: stream, meta. ARGV: envelope, size, ttl ms, topic, fresh epoch, now ms.
local now = tonumber(ARGV[6])
local ttl = tonumber(ARGV[3])
expire(now)
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 't', 0)
end
local top = redis.call('HINCRBY', KEYS[2], 't', 1)
redis.call('HSET', KEYS[2], 'l', ttl)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], top .. '-0', 'd', ARGV[1], 'x', now + ttl)
trim(now)
local x = tonumber(redis.call('HGET', KEYS[2], 'x') or '0')
keep_until(math.max(x, now + ttl))
redis.call('PUBLISH', ARGV[4], 'p' .. top .. ' ' .. epoch .. ' ' .. ARGV[1])
return {top, epoch}
"#;

const HISTORY: &str = r#"
-- KEYS: stream, meta. ARGV: start stream (0/1), fresh epoch, ttl ms, now ms,
-- reverse (0/1), from (an id, '-' or '+'), limit.
local now = tonumber(ARGV[4])
local ttl = tonumber(ARGV[3])
expire(now)
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  if ARGV[1] ~= '1' then return {0, ''} end
  epoch = ARGV[2]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 't', 0, 'l', ttl)
  keep_until(now + ttl)
  return {0, epoch}
end
local top = tonumber(redis.call('HGET', KEYS[2], 't'))
if ARGV[1] == '1' then
  redis.call('HSET', KEYS[2], 'l', ttl)
  local x = tonumber(redis.call('HGET', KEYS[2], 'x') or '0')
  if x < now + ttl then keep_until(now + ttl) end
end
trim(now)
local entries
if ARGV[5] == '1' then
  entries = redis.call('XREVRANGE', KEYS[1], ARGV[6], '-', 'COUNT', ARGV[7])
else
  entries = redis.call('XRANGE', KEYS[1], ARGV[6], '+', 'COUNT', ARGV[7])
end
return {top, epoch, entries}
"#;

const KEEP: &str = r#"
-- KEYS: stream, meta. ARGV: now ms. Extends the stream's expiry to its
-- TTL from now (a node is subscribed, or its last subscriber just left).
local now = tonumber(ARGV[1])
expire(now)
local ttl = tonumber(redis.call('HGET', KEYS[2], 'l') or '0')
local x = tonumber(redis.call('HGET', KEYS[2], 'x') or '0')
if ttl > 0 and x < now + ttl then keep_until(now + ttl) end
return 0
"#;

const ADD_PRESENCE: &str = r#"
-- KEYS: clients hash, expiries zset. ARGV: client, info, expires ms, ttl ms.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < tonumber(ARGV[4]) then redis.call('PEXPIRE', key, ARGV[4]) end
end
return 0
"#;

const PRESENCE: &str = r#"
-- KEYS: clients hash, expiries zset. ARGV: now ms. Drops the expired, returns the rest.
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, client in ipairs(gone) do redis.call('HDEL', KEYS[1], client) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
return redis.call('HVALS', KEYS[1])
"#;

/// The Redis engine; see the module docs.
pub struct RedisEngine {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    client: redis::Client,
    commands: ConnectionManager,
    publish: Script,
    history: Script,
    keep: Script,
    add_presence: Script,
    presence: Script,
    events: RwLock<Option<Weak<dyn EngineEvents>>>,
    /// The channels this node is subscribed to, and the PUB/SUB
    /// connection's sink (none while it reconnects). One lock, held while
    /// a (re)subscription is under way, so that none is lost in between.
    subscriptions: tokio::sync::Mutex<Subscriptions>,
    /// Their count, for the synchronous `stats`.
    subscribed: std::sync::atomic::AtomicUsize,
    /// Whether the PUB/SUB connection is up (and its self-probe comes
    /// back).
    listening: AtomicBool,
    /// Per subscribed channel: the position of the last publication handed
    /// to the node (offset, epoch), to notice what PUB/SUB lost.
    positions: Mutex<std::collections::HashMap<String, (u64, String)>>,
    /// This engine's own probe topic.
    probe_topic: String,
}

/// How often the reader publishes to its probe topic, and checks the
/// positions of its channels against the streams.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// A PUB/SUB connection whose probes do not come back for this long is
/// dropped and made again, its channels checked for what they missed.
const PROBE_DEADLINE: Duration = Duration::from_secs(6);

#[derive(Default)]
struct Subscriptions {
    channels: HashSet<String>,
    sink: Option<PubSubSink>,
}

fn unavailable(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> EngineError {
    EngineError::Corrupt(e.to_string())
}

fn fresh_epoch() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

fn ttl_ms(ttl: Duration) -> u64 {
    (ttl.as_millis() as u64).max(1)
}

impl Inner {
    fn now(&self) -> u64 {
        (self.config.clock)()
    }

    fn key(&self, channel: &str, kind: &str) -> String {
        format!("{}:{{{channel}}}:{kind}", self.config.prefix)
    }

    fn control_topic(&self) -> String {
        format!("{}:control", self.config.prefix)
    }

    /// The channel of a topic, or `None` for the control topic.
    fn channel_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        topic
            .strip_prefix(self.config.prefix.as_str())?
            .strip_prefix(":{")?
            .strip_suffix("}:t")
    }

    fn events(&self) -> Option<Arc<dyn EngineEvents>> {
        self.events
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(Weak::upgrade)
    }

    /// `call` within the configured timeout; Redis's errors and a late
    /// answer are both "unavailable".
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, EngineError> {
        tokio::time::timeout(self.config.timeout, call)
            .await
            .map_err(|_| unavailable("Redis did not answer in time"))?
            .map_err(unavailable)
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, EngineError> {
        let mut conn = self.commands.clone();
        self.bounded(invocation.invoke_async(&mut conn)).await
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, EngineError> {
        let mut conn = self.commands.clone();
        self.bounded(cmd.query_async(&mut conn)).await
    }

    async fn publish_to(&self, topic: &str, message: &[u8]) -> Result<(), EngineError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(topic).arg(message);
        self.query::<i64>(&cmd).await.map(drop)
    }

    /// Extends the expiry of `channel`'s stream to its TTL from now.
    async fn keep(&self, channel: &str) -> Result<(), EngineError> {
        let mut invocation = self.keep.prepare_invoke();
        invocation
            .key(self.key(channel, "s"))
            .key(self.key(channel, "m"))
            .arg(self.now());
        self.run::<i64>(invocation).await.map(drop)
    }

    /// Hands one PUB/SUB message to the node; a publication past a gap
    /// is preceded by what the gap held, read from the stream.
    async fn dispatch(&self, topic: &str, payload: &[u8]) {
        let Some(events) = self.events() else { return };
        let Some(channel) = self.channel_of(topic) else {
            if topic == self.control_topic() {
                events.control(payload);
            }
            return;
        };
        match wire::decode_event(&Bytes::copy_from_slice(payload)) {
            Ok(Event::Publication { publication, epoch }) => {
                if publication.offset > 0
                    && !self.next_in_order(channel, publication.offset, &epoch)
                {
                    self.catch_up(&*events, channel, publication.offset - 1, &epoch)
                        .await;
                    if !self.advance(channel, publication.offset, &epoch) {
                        return;
                    }
                }
                events.publication(channel, &Arc::new(publication));
            }
            Ok(Event::Join(info)) => events.join(channel, &Arc::new(info)),
            Ok(Event::Leave(info)) => events.leave(channel, &Arc::new(info)),
            Err(e) => tracing::warn!(channel, "unreadable message from Redis: {e}"),
        }
    }

    /// Whether the publication at `offset` of `epoch` is the one after the
    /// channel's last, as nearly always: then recorded in place, with
    /// nothing allocated.
    fn next_in_order(&self, channel: &str, offset: u64, epoch: &str) -> bool {
        match lock(&self.positions).get_mut(channel) {
            Some(position) if position.1 == epoch && offset == position.0 + 1 => {
                position.0 = offset;
                true
            }
            _ => false,
        }
    }

    /// Records that the publication at `offset` of `epoch` goes to the
    /// node; false when it went already (read from the stream by a
    /// catch-up, then arriving over PUB/SUB).
    fn advance(&self, channel: &str, offset: u64, epoch: &str) -> bool {
        let mut positions = lock(&self.positions);
        let Some(position) = positions.get_mut(channel) else {
            // Not subscribed (any more): nobody to deliver to.
            return false;
        };
        if position.1 == epoch && offset <= position.0 {
            return false;
        }
        *position = (offset, epoch.to_owned());
        true
    }

    /// Hands the node what the stream holds after the channel's last
    /// delivered position, up to `upto` (a publication arriving past a
    /// gap, or the stream's top in a periodic check).
    async fn catch_up(&self, events: &dyn EngineEvents, channel: &str, upto: u64, epoch: &str) {
        let (last, known) = match lock(&self.positions).get(channel) {
            Some((last, known)) => (*last, known.clone()),
            None => return,
        };
        if known.is_empty() {
            return;
        }
        if known != epoch {
            // A new stream (Redis lost its data, or the stream expired):
            // what the old one held after `last` is gone.
            tracing::warn!(channel, from = %known, to = %epoch, "stream epoch changed");
            events.gap(channel);
            return;
        }
        if upto <= last {
            return;
        }
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.key(channel, "s"))
            .arg(format!("{}-0", last + 1))
            .arg(format!("{upto}-0"));
        let entries: Value = match self.query(&cmd).await {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(channel, "reading a gap from the stream failed: {e}");
                return;
            }
        };
        let missed = match entries_of(&entries) {
            Ok(missed) => missed,
            Err(e) => {
                tracing::warn!(channel, "reading a gap from the stream failed: {e}");
                return;
            }
        };
        if missed.first().map(|p| p.offset) != Some(last + 1) {
            tracing::warn!(
                channel,
                after = last,
                "publications lost by PUB/SUB are no longer in the stream"
            );
            events.gap(channel);
            if let Some(position) = lock(&self.positions).get_mut(channel) {
                *position = (upto, epoch.to_owned());
            }
            return;
        }
        tracing::debug!(channel, count = missed.len(), "caught up from the stream");
        for publication in missed {
            if self.advance(channel, publication.offset, epoch) {
                events.publication(channel, &publication);
            }
        }
    }

    /// Compares every subscribed channel's delivered position with its
    /// stream and hands over what PUB/SUB did not bring.
    async fn check_positions(&self) {
        let Some(events) = self.events() else { return };
        let channels: Vec<(String, String)> = lock(&self.positions)
            .iter()
            .filter(|(_, (_, epoch))| !epoch.is_empty())
            .map(|(c, (_, e))| (c.clone(), e.clone()))
            .collect();
        for (channel, epoch) in channels {
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(self.key(&channel, "m")).arg("e").arg("t");
            let Ok((current, top)) = self.query::<(Option<String>, Option<u64>)>(&cmd).await else {
                continue;
            };
            match (current, top) {
                (Some(current), Some(top)) if current == epoch => {
                    self.catch_up(&*events, &channel, top, &epoch).await;
                }
                (Some(current), top) => {
                    tracing::warn!(channel, from = %epoch, to = %current, "stream epoch changed");
                    events.gap(&channel);
                    if let Some(position) = lock(&self.positions).get_mut(&channel) {
                        *position = (top.unwrap_or(0), current);
                    }
                }
                _ => {}
            }
        }
    }

    /// The position a subscription starts from: the stream's top now (the
    /// node reads the history after the engine is subscribed, so what came
    /// before is the node's to merge).
    async fn start_position(&self, channel: &str) {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.key(channel, "m")).arg("e").arg("t");
        let (epoch, top) = self
            .query::<(Option<String>, Option<u64>)>(&cmd)
            .await
            .unwrap_or((None, None));
        let mut positions = lock(&self.positions);
        let position = positions.entry(channel.to_owned()).or_default();
        if let (Some(epoch), Some(top)) = (epoch, top) {
            if position.1.is_empty() {
                *position = (top, epoch);
            }
        }
    }
}

/// The PUB/SUB reader: (re)connects, subscribes every channel, hands
/// what arrives to the node; ends when the engine is dropped.
async fn listen(inner: Weak<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(engine) = inner.upgrade() else {
            return;
        };
        let connected = engine.client.get_async_pubsub().await;
        let mut stream = match connected {
            Ok(pubsub) => {
                let (mut sink, stream) = pubsub.split();
                let mut subscriptions = engine.subscriptions.lock().await;
                let mut topics = vec![engine.control_topic(), engine.probe_topic.clone()];
                topics.extend(subscriptions.channels.iter().map(|c| engine.key(c, "t")));
                // Bounded: a connection that stalls right away must not
                // hold the subscriptions' lock.
                let subscribed = engine.bounded(sink.subscribe(&topics)).await;
                match subscribed {
                    Ok(()) => {
                        subscriptions.sink = Some(sink);
                        engine.listening.store(true, Ordering::SeqCst);
                        backoff = Duration::from_millis(100);
                        stream
                    }
                    Err(e) => {
                        tracing::warn!("Redis PUB/SUB subscribe failed: {e}");
                        drop(subscriptions);
                        drop(engine);
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                }
            }
            Err(e) => {
                tracing::warn!("Redis PUB/SUB connection failed: {e}");
                drop(engine);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        // What was published while the connection was down.
        engine.check_positions().await;
        drop(engine);
        let mut ticks = tokio::time::interval(PROBE_EVERY);
        let mut probe_seen = tokio::time::Instant::now();
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else { break };
                    let Some(engine) = inner.upgrade() else { return };
                    let topic = message.get_channel_name();
                    if topic == engine.probe_topic {
                        probe_seen = tokio::time::Instant::now();
                        engine.listening.store(true, Ordering::SeqCst);
                        continue;
                    }
                    engine.dispatch(topic, message.get_payload_bytes()).await;
                }
                _ = ticks.tick() => {
                    let Some(engine) = inner.upgrade() else { return };
                    if probe_seen.elapsed() > PROBE_DEADLINE {
                        // Alive but delivering nothing: make it again.
                        tracing::warn!("Redis PUB/SUB delivers nothing (its probes do not come back); reconnecting");
                        break;
                    }
                    if probe_seen.elapsed() > PROBE_EVERY * 2 {
                        engine.listening.store(false, Ordering::SeqCst);
                    }
                    let _ = engine.publish_to(&engine.probe_topic, b"probe").await;
                    engine.check_positions().await;
                }
            }
        }
        let Some(engine) = inner.upgrade() else {
            return;
        };
        tracing::warn!("Redis PUB/SUB connection lost; reconnecting");
        engine.listening.store(false, Ordering::SeqCst);
        engine.subscriptions.lock().await.sink = None;
    }
}

impl RedisEngine {
    /// Connects to Redis and starts the PUB/SUB reader.
    ///
    /// # Errors
    /// A URL that does not parse, or a Redis that cannot be reached.
    pub async fn connect(config: RedisConfig) -> Result<RedisEngine, EngineError> {
        let client = redis::Client::open(config.url.as_str()).map_err(corrupt)?;
        let commands = tokio::time::timeout(config.timeout, client.get_connection_manager())
            .await
            .map_err(|_| unavailable("Redis did not answer in time"))?
            .map_err(unavailable)?;
        let config_prefix = config.prefix.clone();
        let inner = Arc::new(Inner {
            config,
            client,
            commands,
            publish: Script::new(&format!("{EXPIRED}{PUBLISH}")),
            history: Script::new(&format!("{EXPIRED}{HISTORY}")),
            keep: Script::new(&format!("{EXPIRED}{KEEP}")),
            add_presence: Script::new(ADD_PRESENCE),
            presence: Script::new(PRESENCE),
            events: RwLock::new(None),
            subscriptions: tokio::sync::Mutex::default(),
            subscribed: std::sync::atomic::AtomicUsize::new(0),
            listening: AtomicBool::new(false),
            positions: Mutex::default(),
            probe_topic: format!("{}:probe:{:016x}", config_prefix, rand::random::<u64>()),
        });
        tokio::spawn(listen(Arc::downgrade(&inner)));
        // Ready once the control topic is subscribed (a node's own
        // heartbeats come back through it).
        let ready = async {
            while !inner.listening.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(inner.config.timeout, ready)
            .await
            .map_err(|_| unavailable("Redis PUB/SUB did not connect in time"))?;
        Ok(RedisEngine { inner })
    }

    /// Extends the expiry of the streams this node is subscribed to (a
    /// subscribed stream is never forgotten); runs from `maintain`.
    async fn keep_subscribed(inner: Arc<Inner>) {
        let channels: Vec<String> = inner
            .subscriptions
            .lock()
            .await
            .channels
            .iter()
            .cloned()
            .collect();
        for channel in channels {
            if let Err(e) = inner.keep(&channel).await {
                tracing::debug!(channel, "keeping the stream failed: {e}");
            }
        }
    }
}

fn entries_of(value: &Value) -> Result<Vec<Arc<Publication>>, EngineError> {
    let Value::Array(entries) = value else {
        return Err(corrupt("history entries are not a list"));
    };
    let mut publications = Vec::with_capacity(entries.len());
    for entry in entries {
        let (id, fields): (String, Vec<Vec<u8>>) =
            redis::from_redis_value_ref(entry).map_err(corrupt)?;
        let offset = id
            .split_once('-')
            .and_then(|(o, _)| o.parse::<u64>().ok())
            .ok_or_else(|| corrupt(format!("stream entry id {id}")))?;
        // Field names and values alternate; the envelope is moved out.
        let mut fields = fields.into_iter();
        let mut envelope = None;
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            if name == b"d" {
                envelope = Some(Bytes::from(value));
                break;
            }
        }
        let envelope = envelope.ok_or_else(|| corrupt("stream entry without its publication"))?;
        let publication = wire::decode_publication(&envelope, offset).map_err(corrupt)?;
        publications.push(Arc::new(publication));
    }
    Ok(publications)
}

impl Broker for RedisEngine {
    fn set_events(&self, events: Weak<dyn EngineEvents>) {
        *self.inner.events.write().unwrap_or_else(|e| e.into_inner()) = Some(events);
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut subscriptions = inner.subscriptions.lock().await;
            if subscriptions.channels.insert(channel.to_owned()) {
                inner.subscribed.fetch_add(1, Ordering::Relaxed);
            }
            // Without a connection, the reader subscribes it when it is back.
            if let Some(sink) = subscriptions.sink.as_mut() {
                let topic = inner.key(channel, "t");
                inner.bounded(sink.subscribe(topic)).await?;
            }
            drop(subscriptions);
            inner.start_position(channel).await;
            Ok(())
        })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let inner = &self.inner;
            {
                let mut subscriptions = inner.subscriptions.lock().await;
                if subscriptions.channels.remove(channel) {
                    inner.subscribed.fetch_sub(1, Ordering::Relaxed);
                }
                lock(&inner.positions).remove(channel);
                if let Some(sink) = subscriptions.sink.as_mut() {
                    let topic = inner.key(channel, "t");
                    inner.bounded(sink.unsubscribe(topic)).await?;
                }
            }
            // The stream's TTL counts from the last subscriber leaving too.
            inner.keep(channel).await
        })
    }

    fn publish<'a>(
        &'a self,
        channel: &'a str,
        publication: Publication,
        options: HistoryOptions,
    ) -> BoxFuture<'a, Result<Option<StreamPosition>, EngineError>> {
        Box::pin(async move {
            let inner = &self.inner;
            // A node that cannot hear the others does not publish either:
            // its publishers are told (114) rather than its subscribers
            // silently missing what they publish.
            if !inner.listening.load(Ordering::SeqCst) {
                return Err(unavailable("the Redis PUB/SUB connection is down"));
            }
            let envelope = wire::encode_publication(&publication);
            if !options.enabled() {
                let event = wire::encode_publication_event(0, "", &envelope);
                inner.publish_to(&inner.key(channel, "t"), &event).await?;
                return Ok(None);
            }
            let mut invocation = inner.publish.prepare_invoke();
            invocation
                .key(inner.key(channel, "s"))
                .key(inner.key(channel, "m"))
                .arg(&envelope[..])
                .arg(options.size)
                .arg(ttl_ms(options.ttl))
                .arg(inner.key(channel, "t"))
                .arg(fresh_epoch())
                .arg(inner.now());
            let (offset, epoch): (u64, String) = inner.run(invocation).await?;
            Ok(Some(StreamPosition {
                offset,
                epoch: epoch.into(),
            }))
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
                .publish_to(&self.inner.key(channel, "t"), &event)
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
                .publish_to(&self.inner.key(channel, "t"), &event)
                .await
        })
    }

    fn publish_control<'a>(&'a self, message: &'a [u8]) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            self.inner
                .publish_to(&self.inner.control_topic(), message)
                .await
        })
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        query: HistoryQuery,
    ) -> BoxFuture<'a, Result<HistoryResult, EngineError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let none = HistoryResult {
                publications: Vec::new(),
                position: StreamPosition {
                    offset: 0,
                    epoch: "".into(),
                },
            };
            if !query.options.enabled() {
                return Ok(none);
            }
            let from = match (query.reverse, query.since) {
                (false, None) => "-".to_owned(),
                (false, Some(after)) => format!("{}-0", after.saturating_add(1)),
                (true, None) => "+".to_owned(),
                (true, Some(0)) => return self.position_only(channel, &query).await,
                (true, Some(before)) => format!("{}-0", before - 1),
            };
            let mut invocation = inner.history.prepare_invoke();
            invocation
                .key(inner.key(channel, "s"))
                .key(inner.key(channel, "m"))
                .arg(u8::from(query.start_stream))
                .arg(fresh_epoch())
                .arg(ttl_ms(query.options.ttl))
                .arg(inner.now())
                .arg(u8::from(query.reverse))
                .arg(from)
                .arg(query.limit.max(1));
            let reply: Vec<Value> = inner.run(invocation).await?;
            let (offset, epoch): (u64, String) = match reply.as_slice() {
                [offset, epoch, ..] => (
                    redis::from_redis_value_ref(offset).map_err(corrupt)?,
                    redis::from_redis_value_ref(epoch).map_err(corrupt)?,
                ),
                _ => return Err(corrupt("history reply too short")),
            };
            if epoch.is_empty() {
                return Ok(none);
            }
            let publications = match reply.get(2) {
                Some(entries) if query.limit > 0 => entries_of(entries)?,
                _ => Vec::new(),
            };
            Ok(HistoryResult {
                publications,
                position: StreamPosition {
                    offset,
                    epoch: epoch.into(),
                },
            })
        })
    }

    fn health(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            if !self.inner.listening.load(Ordering::SeqCst) {
                return Err(unavailable("the Redis PUB/SUB connection is down"));
            }
            self.inner
                .query::<String>(&redis::cmd("PING"))
                .await
                .map(drop)
        })
    }

    fn maintain(&self) {
        tokio::spawn(RedisEngine::keep_subscribed(self.inner.clone()));
    }

    fn stats(&self) -> EngineStats {
        // What lives in Redis is not counted here (it would take a round
        // trip): only this node's subscriptions.
        EngineStats {
            subscribed_channels: self.inner.subscribed.load(Ordering::Relaxed),
            ..EngineStats::default()
        }
    }
}

impl RedisEngine {
    /// A reverse read before offset 1: no publications, the position.
    async fn position_only(
        &self,
        channel: &str,
        query: &HistoryQuery,
    ) -> Result<HistoryResult, EngineError> {
        let query = HistoryQuery {
            limit: 0,
            since: None,
            ..query.clone()
        };
        self.history(channel, query).await
    }
}

impl PresenceStore for RedisEngine {
    fn add_presence<'a>(
        &'a self,
        channel: &'a str,
        info: Arc<ClientInfo>,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let entry = wire::encode_presence_event(wire::JOIN, &info);
            let mut invocation = inner.add_presence.prepare_invoke();
            invocation
                .key(inner.key(channel, "p"))
                .key(inner.key(channel, "z"))
                .arg(&info.client)
                .arg(&entry[..])
                .arg(inner.now() + ttl_ms(ttl))
                .arg(ttl_ms(ttl));
            inner.run::<i64>(invocation).await.map(drop)
        })
    }

    fn remove_presence<'a>(
        &'a self,
        channel: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut pipe = redis::pipe();
            pipe.atomic()
                .hdel(inner.key(channel, "p"), client)
                .zrem(inner.key(channel, "z"), client);
            let mut conn = inner.commands.clone();
            inner.bounded(pipe.query_async::<()>(&mut conn)).await
        })
    }

    fn presence<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Arc<ClientInfo>>, EngineError>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut invocation = inner.presence.prepare_invoke();
            invocation
                .key(inner.key(channel, "p"))
                .key(inner.key(channel, "z"))
                .arg(inner.now());
            let entries: Vec<Vec<u8>> = inner.run(invocation).await?;
            let mut clients = Vec::with_capacity(entries.len());
            for entry in entries {
                match wire::decode_event(&Bytes::from(entry)).map_err(corrupt)? {
                    Event::Join(info) => clients.push(Arc::new(info)),
                    _ => return Err(corrupt("a presence entry that is not a client info")),
                }
            }
            clients.sort_by(|a: &Arc<ClientInfo>, b| a.client.cmp(&b.client));
            Ok(clients)
        })
    }

    fn presence_stats<'a>(
        &'a self,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<PresenceStats, EngineError>> {
        Box::pin(async move {
            let clients = self.presence(channel).await?;
            let users: HashSet<&str> = clients.iter().map(|c| c.user.as_str()).collect();
            Ok(PresenceStats {
                clients: clients.len(),
                users: users.len(),
            })
        })
    }

    fn presence_health(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        Box::pin(async move {
            self.inner
                .query::<String>(&redis::cmd("PING"))
                .await
                .map(drop)
        })
    }

    fn presence_channels(&self) -> usize {
        0
    }
}

#[cfg(test)]
#[path = "../../tests/support/redis_server.rs"]
mod redis_server;

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::engine::HistoryOptions;
    use crate::protocol::Payload;

    use super::redis_server::RedisServer;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl EngineEvents for Recorder {
        fn publication(&self, channel: &str, p: &Arc<Publication>) {
            let data = String::from_utf8_lossy(p.data.as_bytes());
            let from = p.info.as_ref().map_or("", |i| i.client.as_str());
            lock(&self.0).push(format!("{channel} {} {data} {from}", p.offset));
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

    impl Recorder {
        async fn wait_for(&self, n: usize) -> Vec<String> {
            for _ in 0..500 {
                let seen = lock(&self.0).clone();
                if seen.len() >= n {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{n} events expected, got {:?}", lock(&self.0));
        }
    }

    async fn node(
        server: &RedisServer,
        prefix: &str,
    ) -> (RedisEngine, Arc<Recorder>, Arc<dyn EngineEvents>) {
        let engine = RedisEngine::connect(RedisConfig {
            url: server.url(),
            prefix: prefix.into(),
            timeout: Duration::from_secs(2),
            ..RedisConfig::default()
        })
        .await
        .unwrap();
        let recorder = Arc::new(Recorder::default());
        let events: Arc<dyn EngineEvents> = recorder.clone();
        engine.set_events(Arc::downgrade(&events));
        (engine, recorder, events)
    }

    fn publication(data: &str, from: Option<&str>) -> Publication {
        Publication {
            offset: 0,
            data: Payload::from_bytes(Bytes::from(data.to_owned())),
            info: from.map(|c| {
                Arc::new(ClientInfo {
                    client: c.into(),
                    user: "u".into(),
                    info: None,
                })
            }),
        }
    }

    const KEEP: HistoryOptions = HistoryOptions {
        size: 3,
        ttl: Duration::from_secs(60),
    };

    fn read(since: Option<u64>, reverse: bool) -> HistoryQuery {
        HistoryQuery {
            since,
            limit: 10,
            reverse,
            start_stream: false,
            options: KEEP,
        }
    }

    #[tokio::test]
    async fn publications_reach_the_subscribed_nodes_with_their_position_and_history_keeps_them() {
        let server = RedisServer::start();
        let (a, _a_seen, _a_events) = node(&server, "t1").await;
        let (b, b_seen, _b_events) = node(&server, "t1").await;
        b.subscribe("room").await.unwrap();
        let mut positions = Vec::new();
        for n in 1..=4 {
            let p = a
                .publish("room", publication(&format!("\"m{n}\""), Some("c1")), KEEP)
                .await
                .unwrap()
                .unwrap();
            positions.push(p);
        }
        assert_eq!(
            positions.iter().map(|p| p.offset).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert!(positions.iter().all(|p| p.epoch == positions[0].epoch));
        let seen = b_seen.wait_for(4).await;
        assert_eq!(
            seen,
            [
                "room 1 \"m1\" c1",
                "room 2 \"m2\" c1",
                "room 3 \"m3\" c1",
                "room 4 \"m4\" c1"
            ]
        );
        // History keeps the newest 3, read both ways.
        let forward = b.history("room", read(None, false)).await.unwrap();
        let offsets: Vec<u64> = forward.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [2, 3, 4]);
        assert_eq!(forward.position, positions[3]);
        assert_eq!(forward.publications[0].info.as_ref().unwrap().client, "c1");
        let since = b.history("room", read(Some(2), false)).await.unwrap();
        assert!(since.recovers(&crate::protocol::Position {
            offset: 2,
            epoch: positions[0].epoch.to_string()
        }));
        assert!(!forward.recovers(&crate::protocol::Position {
            offset: 0,
            epoch: positions[0].epoch.to_string()
        }));
        let reverse = b.history("room", read(Some(4), true)).await.unwrap();
        let offsets: Vec<u64> = reverse.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, [3, 2]);
        // A plain read of a channel with no stream leaves none behind;
        // a subscribe's read starts one at offset 0.
        let none = b.history("empty", read(None, false)).await.unwrap();
        assert_eq!(none.position.offset, 0);
        assert_eq!(&*none.position.epoch, "");
        let started = b
            .history(
                "empty",
                HistoryQuery {
                    start_stream: true,
                    ..read(Some(0), false)
                },
            )
            .await
            .unwrap();
        assert_eq!(started.position.offset, 0);
        assert!(!started.position.epoch.is_empty());
        let first = a
            .publish("empty", publication("1", None), KEEP)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((first.offset, &first.epoch), (1, &started.position.epoch));
        // Unsubscribed: nothing more arrives.
        b.unsubscribe("room").await.unwrap();
        a.publish("room", publication("5", None), KEEP)
            .await
            .unwrap();
        a.publish_control(b"ping").await.unwrap();
        let seen = b_seen.wait_for(5).await;
        assert_eq!(seen[4], "control ping", "{seen:?}");
    }

    #[tokio::test]
    async fn joins_leaves_presence_and_channels_without_history() {
        let server = RedisServer::start();
        let (a, _a_seen, _a_events) = node(&server, "t2").await;
        let (b, b_seen, _b_events) = node(&server, "t2").await;
        b.subscribe("lobby").await.unwrap();
        let who = |c: &str, u: &str| {
            Arc::new(ClientInfo {
                client: c.into(),
                user: u.into(),
                info: Some(serde_json::value::RawValue::from_string("{\"n\":1}".into()).unwrap()),
            })
        };
        a.publish_join("lobby", who("c1", "u1")).await.unwrap();
        let none = a
            .publish("lobby", publication("\"x\"", None), HistoryOptions::NONE)
            .await
            .unwrap();
        assert!(none.is_none());
        a.publish_leave("lobby", who("c1", "u1")).await.unwrap();
        assert_eq!(
            b_seen.wait_for(3).await,
            ["lobby join c1", "lobby 0 \"x\" ", "lobby leave c1"]
        );
        let minute = Duration::from_secs(60);
        a.add_presence("lobby", who("c1", "u1"), minute)
            .await
            .unwrap();
        a.add_presence("lobby", who("c2", "u1"), minute)
            .await
            .unwrap();
        b.add_presence("lobby", who("c3", "u2"), Duration::from_millis(300))
            .await
            .unwrap();
        let present = b.presence("lobby").await.unwrap();
        assert_eq!(present.len(), 3);
        assert_eq!(present[0].info.as_ref().unwrap().get(), "{\"n\":1}");
        assert_eq!(
            a.presence_stats("lobby").await.unwrap(),
            PresenceStats {
                clients: 3,
                users: 2
            }
        );
        // c3's node stopped refreshing it: gone after its TTL, with no
        // other node cleaning up.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let present: Vec<String> = a
            .presence("lobby")
            .await
            .unwrap()
            .iter()
            .map(|c| c.client.clone())
            .collect();
        assert_eq!(present, ["c1", "c2"]);
        a.remove_presence("lobby", "c1").await.unwrap();
        assert_eq!(
            b.presence_stats("lobby").await.unwrap(),
            PresenceStats {
                clients: 1,
                users: 1
            }
        );
    }

    #[tokio::test]
    async fn after_redis_comes_back_the_node_is_subscribed_again() {
        let mut server = RedisServer::start();
        let port = server.port;
        let (a, _a_seen, _a_events) = node(&server, "t3").await;
        let (b, b_seen, _b_events) = node(&server, "t3").await;
        b.subscribe("news").await.unwrap();
        a.health().await.unwrap();
        server.stop();
        // Unhealthy while Redis is away.
        let mut down = false;
        for _ in 0..200 {
            if b.health().await.is_err() {
                down = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(down, "health stays ok with Redis gone");
        let _server = RedisServer::on(port);
        let mut up = false;
        for _ in 0..500 {
            if b.health().await.is_ok() && a.health().await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(up, "health never came back");
        a.publish("news", publication("\"after\"", None), KEEP)
            .await
            .unwrap();
        let seen = b_seen.wait_for(1).await;
        // A new Redis, without the old data: a new stream.
        assert_eq!(seen, ["news 1 \"after\" "]);
    }

    /// Publishes as the engine does, but to a topic nobody listens on:
    /// stored, and lost on the way, as PUB/SUB may lose it.
    async fn publish_lost(engine: &RedisEngine, channel: &str, data: &str) -> u64 {
        let inner = &engine.inner;
        let envelope = wire::encode_publication(&publication(data, None));
        let mut invocation = inner.publish.prepare_invoke();
        invocation
            .key(inner.key(channel, "s"))
            .key(inner.key(channel, "m"))
            .arg(&envelope[..])
            .arg(KEEP.size)
            .arg(ttl_ms(KEEP.ttl))
            .arg("nowhere")
            .arg(fresh_epoch())
            .arg(inner.now());
        let (offset, _epoch): (u64, String) = inner.run(invocation).await.unwrap();
        offset
    }

    #[tokio::test]
    async fn what_pub_sub_lost_is_read_from_the_stream_in_order() {
        let server = RedisServer::start();
        let (a, _a_seen, _a_events) = node(&server, "t4").await;
        let (b, b_seen, _b_events) = node(&server, "t4").await;
        b.subscribe("feed").await.unwrap();
        a.publish("feed", publication("\"1\"", None), KEEP)
            .await
            .unwrap();
        b_seen.wait_for(1).await;
        // Lost on the way, then revealed by the next one: handed over
        // first, in order, once.
        assert_eq!(publish_lost(&a, "feed", "\"2\"").await, 2);
        a.publish("feed", publication("\"3\"", None), KEEP)
            .await
            .unwrap();
        assert_eq!(
            b_seen.wait_for(3).await,
            ["feed 1 \"1\" ", "feed 2 \"2\" ", "feed 3 \"3\" "]
        );
        // Lost with nothing after it: the periodic check finds it.
        assert_eq!(publish_lost(&a, "feed", "\"4\"").await, 4);
        let seen = b_seen.wait_for(4).await;
        assert_eq!(seen[3], "feed 4 \"4\" ");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(lock(&b_seen.0).len(), 4, "nothing twice");
    }

    #[tokio::test]
    async fn publications_no_longer_in_the_stream_or_a_new_epoch_are_a_gap() {
        let server = RedisServer::start();
        let (a, _a_seen, _a_events) = node(&server, "t6").await;
        let (b, b_seen, _b_events) = node(&server, "t6").await;
        b.subscribe("feed").await.unwrap();
        a.publish("feed", publication("\"1\"", None), KEEP)
            .await
            .unwrap();
        b_seen.wait_for(1).await;
        // Four lost, and the stream keeps three: one is gone for good.
        for n in 2..=5 {
            publish_lost(&a, "feed", &format!("\"{n}\"")).await;
        }
        a.publish("feed", publication("\"6\"", None), KEEP)
            .await
            .unwrap();
        let seen = b_seen.wait_for(3).await;
        assert_eq!(seen[1..3], ["feed gap", "feed 6 \"6\" "]);
        // Redis loses the stream: the next publication starts a new epoch.
        let mut conn = a.inner.commands.clone();
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        a.publish("feed", publication("\"new\"", None), KEEP)
            .await
            .unwrap();
        let seen = b_seen.wait_for(5).await;
        assert_eq!(seen[3..5], ["feed gap", "feed 1 \"new\" "]);
    }

    /// A TCP proxy in front of Redis that can stop forwarding what Redis
    /// sends to its PUB/SUB connections (those whose client sent a
    /// SUBSCRIBE), keeping them open: alive, delivering nothing.
    struct StallingProxy {
        port: u16,
        stalled: Arc<AtomicBool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl StallingProxy {
        async fn start(redis_port: u16) -> StallingProxy {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let stalled = Arc::new(AtomicBool::new(false));
            let stall = stalled.clone();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                    else {
                        continue;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let subscriber = Arc::new(AtomicBool::new(false));
                    let marks = subscriber.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = client_read.read(&mut buf).await {
                            if n == 0 || server_write.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                            let text = String::from_utf8_lossy(&buf[..n]).to_ascii_uppercase();
                            if text.contains("SUBSCRIBE") {
                                marks.store(true, Ordering::SeqCst);
                            }
                        }
                    });
                    let stall = stall.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = server_read.read(&mut buf).await {
                            if n == 0 {
                                return;
                            }
                            if stall.load(Ordering::SeqCst) && subscriber.load(Ordering::SeqCst) {
                                continue;
                            }
                            if client_write.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
            StallingProxy {
                port,
                stalled,
                task,
            }
        }
    }

    impl Drop for StallingProxy {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    #[tokio::test]
    async fn a_pub_sub_connection_that_delivers_nothing_is_noticed_and_nothing_is_lost() {
        let server = RedisServer::start();
        let proxy = StallingProxy::start(server.port).await;
        let (a, _a_seen, _a_events) = node(&server, "t5").await;
        let b = RedisEngine::connect(RedisConfig {
            url: format!("redis://127.0.0.1:{}", proxy.port),
            prefix: "t5".into(),
            timeout: Duration::from_secs(2),
            ..RedisConfig::default()
        })
        .await
        .unwrap();
        let b_seen = Arc::new(Recorder::default());
        let b_events: Arc<dyn EngineEvents> = b_seen.clone();
        b.set_events(Arc::downgrade(&b_events));
        b.subscribe("live").await.unwrap();
        a.publish("live", publication("\"1\"", None), KEEP)
            .await
            .unwrap();
        b_seen.wait_for(1).await;
        b.health().await.unwrap();
        proxy.stalled.store(true, Ordering::SeqCst);
        // Publishes succeed; PUB/SUB brings nothing, the stream does.
        for n in 2..=3 {
            a.publish("live", publication(&format!("\"{n}\""), None), KEEP)
                .await
                .unwrap();
        }
        assert_eq!(
            b_seen.wait_for(3).await,
            ["live 1 \"1\" ", "live 2 \"2\" ", "live 3 \"3\" "]
        );
        // Its probes do not come back: unhealthy within a bounded time,
        // and its own publishes are refused meanwhile.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while b.health().await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "still healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let refused = b.publish("live", publication("\"x\"", None), KEEP).await;
        assert!(
            matches!(refused, Err(EngineError::Unavailable(_))),
            "{refused:?}"
        );
        proxy.stalled.store(false, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while b.health().await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never healthy again"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        a.publish("live", publication("\"4\"", None), KEEP)
            .await
            .unwrap();
        let seen = b_seen.wait_for(4).await;
        assert_eq!(seen[3], "live 4 \"4\" ");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(lock(&b_seen.0).len(), 4, "nothing twice");
    }

    /// The conformance suite over a redis-server of its own, time moved
    /// by the harness's clock.
    struct RedisHarness {
        server: RedisServer,
        clock_ms: Arc<std::sync::atomic::AtomicU64>,
        engines: Mutex<Vec<Arc<RedisEngine>>>,
    }

    impl RedisHarness {
        fn new() -> RedisHarness {
            RedisHarness {
                server: RedisServer::start(),
                clock_ms: Arc::new(std::sync::atomic::AtomicU64::new(1_800_000_000_000)),
                engines: Mutex::default(),
            }
        }

        fn now(&self) -> u64 {
            self.clock_ms.load(Ordering::SeqCst)
        }

        fn find(&self, engine: &dyn crate::engine::Engine) -> Arc<RedisEngine> {
            lock(&self.engines)
                .iter()
                .find(|e| {
                    std::ptr::addr_eq(Arc::as_ptr(e), engine as *const dyn crate::engine::Engine)
                })
                .cloned()
                .expect("an engine of this harness")
        }
    }

    impl crate::engine::conformance::Harness for RedisHarness {
        fn engine(&self) -> BoxFuture<'_, Arc<dyn crate::engine::Engine>> {
            Box::pin(async move {
                let clock = self.clock_ms.clone();
                let n = lock(&self.engines).len();
                let engine = Arc::new(
                    RedisEngine::connect(RedisConfig {
                        url: self.server.url(),
                        // A new prefix is a store with nothing in it.
                        prefix: format!("run{n}"),
                        timeout: Duration::from_secs(5),
                        clock: Arc::new(move || clock.load(Ordering::SeqCst)),
                    })
                    .await
                    .unwrap(),
                );
                lock(&self.engines).push(engine.clone());
                engine as Arc<dyn crate::engine::Engine>
            })
        }

        fn pass<'a>(
            &'a self,
            _engine: &'a dyn crate::engine::Engine,
            secs: u64,
        ) -> BoxFuture<'a, ()> {
            Box::pin(async move {
                // A second at a time, the upkeep after each, as on a node.
                for _ in 0..secs {
                    self.clock_ms.fetch_add(1000, Ordering::SeqCst);
                    let engines = lock(&self.engines).clone();
                    for engine in engines {
                        RedisEngine::keep_subscribed(engine.inner.clone()).await;
                    }
                }
            })
        }

        fn advance(&self, secs: u64) -> BoxFuture<'_, ()> {
            self.clock_ms.fetch_add(secs * 1000, Ordering::SeqCst);
            Box::pin(async {})
        }

        fn stored<'a>(
            &'a self,
            engine: &'a dyn crate::engine::Engine,
        ) -> BoxFuture<'a, EngineStats> {
            Box::pin(async move {
                let engine = self.find(engine);
                let now = self.now();
                let mut conn = engine.inner.commands.clone();
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{}:*", engine.inner.config.prefix))
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                let mut stats = engine.stats();
                for key in keys {
                    if let Some(base) = key.strip_suffix(":m") {
                        let x: Option<u64> = redis::cmd("HGET")
                            .arg(&key)
                            .arg("x")
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        if x.is_some_and(|x| x > now) {
                            stats.streams += 1;
                            let entries: Value = redis::cmd("XRANGE")
                                .arg(format!("{base}:s"))
                                .arg("-")
                                .arg("+")
                                .query_async(&mut conn)
                                .await
                                .unwrap();
                            let entries: Vec<(String, Vec<Vec<u8>>)> =
                                redis::from_redis_value_ref(&entries).unwrap();
                            stats.publications += entries
                                .iter()
                                .filter(|(_, f)| {
                                    std::str::from_utf8(&f[3])
                                        .ok()
                                        .and_then(|x| x.parse::<u64>().ok())
                                        .is_some_and(|x| x > now)
                                })
                                .count();
                        }
                    } else if key.ends_with(":z") {
                        let present: usize = redis::cmd("ZCOUNT")
                            .arg(&key)
                            .arg(format!("({now}"))
                            .arg("+inf")
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        if present > 0 {
                            stats.presence_channels += 1;
                        }
                    }
                }
                stats
            })
        }

        fn expires_lazily(&self) -> bool {
            false
        }
    }

    conformance_suite!(RedisHarness::new(), real_time, cases = 12);
}
