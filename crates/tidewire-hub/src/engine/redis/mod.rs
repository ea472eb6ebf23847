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
use redis::{Script, Value};

use super::link::{self, Commands, Nats, Partitions, Sink, Target};

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
    /// `redis://[user:password@]host:port[/db]`; for a Redis Cluster,
    /// one or more of its nodes separated by commas.
    pub url: String,
    /// Whether `url` is a Redis Cluster (implied by several URLs).
    pub cluster: bool,
    /// With a NATS URL (`nats://host:port`), the publications travel
    /// between nodes over NATS instead of Redis PUB/SUB; Redis keeps the
    /// streams, offsets, epochs and presence.
    pub nats_url: Option<String>,
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
            .field("cluster", &self.cluster)
            .field("nats_url", &self.nats_url)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            nats_url: None,
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
-- KEYS: stream, meta. ARGV: envelope, size, ttl ms, topic, fresh epoch, now ms,
-- the publish command (PUBLISH, or SPUBLISH on a cluster; none when the node
-- publishes over NATS itself).
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
if ARGV[7] ~= '' then
  redis.call(ARGV[7], ARGV[4], 'p' .. top .. ' ' .. epoch .. ' ' .. ARGV[1])
end
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

const RESTART: &str = r#"
-- KEYS: meta. ARGV: the epoch that went back, a fresh one. Returns the
-- epoch and top now.
if redis.call('HGET', KEYS[1], 'e') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'e', ARGV[2])
end
return {redis.call('HGET', KEYS[1], 'e') or '', tonumber(redis.call('HGET', KEYS[1], 't') or '0')}
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

const REMOVE_PRESENCE: &str = r#"
-- KEYS: clients hash, expiries zset. ARGV: client.
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
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
    target: Target,
    /// Replaced when a cluster's stops answering altogether (see
    /// `keep_commands_answering`).
    commands: RwLock<Commands>,
    /// Since when commands fail, none answered in between.
    failing: Mutex<Option<tokio::time::Instant>>,
    /// `--broker nats`: NATS, and the connection publications go out on.
    nats: Option<(Nats, async_nats::Client)>,
    partitions: Partitions,
    publish: Script,
    history: Script,
    keep: Script,
    restart: Script,
    add_presence: Script,
    remove_presence: Script,
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
    /// Per subscribed channel: where its stream stands for this node, to
    /// notice what PUB/SUB lost and a stream that went back.
    positions: Mutex<std::collections::HashMap<String, Position>>,
    /// Held while a publication or a gap goes to the node: the reader and
    /// the watcher's catch-ups both deliver, and one channel's order (and
    /// a gap before what follows it) must hold across them.
    delivery: Mutex<()>,
    /// This engine's own probe topics: one per partition on a cluster
    /// (each master's connection is probed), one on a single server.
    probe_topics: Vec<String>,
}

/// How often the watcher publishes to the probe topics, and checks the
/// positions of the channels against their streams.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// A PUB/SUB connection whose probes do not come back for this long is
/// dropped and made again, its channels checked for what they missed.
const PROBE_DEADLINE: Duration = Duration::from_secs(6);

/// A subscribed channel's position for this node.
#[derive(Default)]
struct Position {
    /// The offset of the last publication handed to the node.
    delivered: u64,
    /// Its epoch (empty until the stream is known).
    epoch: String,
    /// The highest offset of this epoch that arrived over PUB/SUB. The
    /// stream's order is PUB/SUB's order, so an offset at or below it
    /// arriving again means the stream went back (a Redis restarted from
    /// an older snapshot, a replica promoted before it had everything):
    /// its offsets are being given to other publications.
    heard: u64,
}

#[derive(Default)]
struct Subscriptions {
    channels: HashSet<String>,
    sink: Option<Sink>,
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
        let tag = self.partitions.tag_of(channel);
        format!("{}:{{{tag}}}:{channel}:{kind}", self.config.prefix)
    }

    fn control_topic(&self) -> String {
        format!(
            "{}:{{{}}}:control",
            self.config.prefix,
            self.partitions.tags()[0]
        )
    }

    /// The channel of a topic, or `None` for the control topic.
    fn channel_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let (_tag, rest) = topic
            .strip_prefix(self.config.prefix.as_str())?
            .strip_prefix(":{")?
            .split_once("}:")?;
        rest.strip_suffix(":t")
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
    async fn bounded<T, E: std::fmt::Display>(
        &self,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, EngineError> {
        tokio::time::timeout(self.config.timeout, call)
            .await
            .map_err(|_| unavailable("Redis did not answer in time"))?
            .map_err(unavailable)
    }

    /// The command of the publish script (none: the node publishes over
    /// NATS after it).
    fn script_publish_command(&self) -> &'static str {
        if self.nats.is_some() {
            ""
        } else {
            self.target.publish_command()
        }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, EngineError> {
        let mut conn = self.commands();
        let result = self.bounded(invocation.invoke_async(&mut conn)).await;
        self.note(result.is_ok());
        result
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, EngineError> {
        let mut conn = self.commands();
        let result = self.bounded(cmd.query_async(&mut conn)).await;
        self.note(result.is_ok());
        result
    }

    fn commands(&self) -> Commands {
        self.commands
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn note(&self, answered: bool) {
        let mut failing = lock(&self.failing);
        if answered {
            *failing = None;
        } else {
            failing.get_or_insert_with(tokio::time::Instant::now);
        }
    }

    /// A cluster connection can stay stuck in a slot refresh after a
    /// master died (every command then fails after its timeout, even on
    /// the live masters): when commands failed for three timeouts and none
    /// answered, or `stuck` (streams stayed unread over checks in a row),
    /// a new connection is made from the seeds.
    async fn keep_commands_answering(&self, stuck: bool) -> bool {
        let silent = lock(&self.failing).map_or(Duration::ZERO, |since| since.elapsed());
        if !self.target.is_cluster() || !(stuck || silent >= self.config.timeout * 3) {
            return false;
        }
        tracing::warn!(
            silent_ms = silent.as_millis() as u64,
            stuck,
            "the Redis Cluster connection does not answer; connecting again"
        );
        match tokio::time::timeout(self.config.timeout, self.target.commands()).await {
            Ok(Ok(commands)) => {
                *self.commands.write().unwrap_or_else(|e| e.into_inner()) = commands;
                *lock(&self.failing) = None;
                true
            }
            Ok(Err(e)) => {
                tracing::warn!("connecting to the Redis Cluster failed: {e}");
                false
            }
            Err(_) => {
                tracing::warn!("connecting to the Redis Cluster timed out");
                false
            }
        }
    }

    async fn publish_to(&self, topic: &str, message: &[u8]) -> Result<(), EngineError> {
        if let Some((_, nats)) = &self.nats {
            let message = Bytes::copy_from_slice(message);
            return self
                .bounded(nats.publish(Nats::subject(topic), message))
                .await;
        }
        let mut cmd = redis::cmd(self.target.publish_command());
        cmd.arg(topic).arg(message);
        self.query::<i64>(&cmd).await.map(drop)
    }

    /// Whether Redis answers. On a cluster a PING goes to every node, the
    /// failed ones too; there the probes tell instead: sent through the
    /// command connections and received over PUB/SUB, each partition's,
    /// they came back from every master within the last two rounds.
    async fn ping(&self) -> Result<(), EngineError> {
        if self.target.is_cluster() {
            return if self.listening.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(unavailable("a Redis Cluster master does not answer"))
            };
        }
        self.query::<String>(&redis::cmd("PING")).await.map(drop)
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
                let publication = Arc::new(publication);
                if publication.offset == 0 {
                    events.publication(channel, &publication);
                    return;
                }
                {
                    let _order = lock(&self.delivery);
                    if self.next_in_order(channel, publication.offset, &epoch) {
                        events.publication(channel, &publication);
                        return;
                    }
                }
                // Over NATS, publications of several nodes may cross: an
                // offset heard late is no sign of a stream gone back.
                if self.nats.is_none() && self.heard(channel, publication.offset, &epoch) {
                    self.went_back(&*events, channel, &epoch).await;
                    return;
                }
                if self
                    .catch_up(&*events, channel, publication.offset - 1, &epoch)
                    .await
                {
                    self.deliver(&*events, channel, &publication, &epoch);
                }
                // Else the gap could not be read: this one waits in the
                // stream for the watcher's next check, behind it.
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
            Some(position) if position.epoch == epoch && offset == position.delivered + 1 => {
                position.delivered = offset;
                position.heard = offset;
                true
            }
            _ => false,
        }
    }

    /// Records that the publication at `offset` of `epoch` arrived over
    /// PUB/SUB (not in order); true when the stream went back.
    fn heard(&self, channel: &str, offset: u64, epoch: &str) -> bool {
        let mut positions = lock(&self.positions);
        let Some(position) = positions.get_mut(channel) else {
            return false;
        };
        if position.epoch != epoch {
            return false;
        }
        if offset <= position.heard {
            return true;
        }
        position.heard = offset;
        false
    }

    /// Hands `publication` of `epoch` to the node unless it went already
    /// (read from the stream by a catch-up, then arriving over PUB/SUB).
    fn deliver(
        &self,
        events: &dyn EngineEvents,
        channel: &str,
        publication: &Arc<Publication>,
        epoch: &str,
    ) {
        let _order = lock(&self.delivery);
        if self.advance(channel, publication.offset, epoch) {
            events.publication(channel, publication);
        }
    }

    /// Tells the node that `channel` lost publications, its position set
    /// to `after` (where the stream goes on from); none when it is not
    /// subscribed any more.
    fn lose(&self, events: &dyn EngineEvents, channel: &str, after: impl FnOnce(&mut Position)) {
        let _order = lock(&self.delivery);
        match lock(&self.positions).get_mut(channel) {
            Some(position) => after(position),
            None => return,
        }
        events.gap(channel);
    }

    /// Records that the publication at `offset` of `epoch` goes to the
    /// node; false when it went already.
    fn advance(&self, channel: &str, offset: u64, epoch: &str) -> bool {
        let mut positions = lock(&self.positions);
        let Some(position) = positions.get_mut(channel) else {
            // Not subscribed (any more): nobody to deliver to.
            return false;
        };
        if position.epoch == epoch && offset <= position.delivered {
            return false;
        }
        if position.epoch != epoch {
            position.epoch = epoch.to_owned();
            position.heard = 0;
        }
        position.delivered = offset;
        true
    }

    /// Hands the node what the stream holds after the channel's last
    /// delivered position, up to `upto` (a publication arriving past a
    /// gap, or the stream's top in a periodic check); false when the
    /// stream could not be read (nothing after the position may go then).
    async fn catch_up(
        &self,
        events: &dyn EngineEvents,
        channel: &str,
        upto: u64,
        epoch: &str,
    ) -> bool {
        let (last, known) = match lock(&self.positions).get(channel) {
            Some(position) => (position.delivered, position.epoch.clone()),
            None => return false,
        };
        // Subscribed before the stream existed: all of its first epoch is
        // to be handed over.
        let (last, known) = if known.is_empty() {
            (0, epoch.to_owned())
        } else {
            (last, known)
        };
        if known != epoch {
            // A new stream (Redis lost its data, or the stream expired):
            // what the old one held after `last` is gone.
            tracing::warn!(channel, from = %known, to = %epoch, "stream epoch changed");
            self.lose(events, channel, |_| {});
            return true;
        }
        if upto <= last {
            return true;
        }
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.key(channel, "s"))
            .arg(format!("{}-0", last + 1))
            .arg(format!("{upto}-0"));
        let entries: Value = match self.query(&cmd).await {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(channel, "reading a gap from the stream failed: {e}");
                return false;
            }
        };
        let missed = match entries_of(&entries) {
            Ok(missed) => missed,
            Err(e) => {
                tracing::warn!(channel, "reading a gap from the stream failed: {e}");
                return false;
            }
        };
        if missed.first().map(|p| p.offset) != Some(last + 1) {
            tracing::warn!(
                channel,
                after = last,
                "publications lost by PUB/SUB are no longer in the stream"
            );
            self.lose(events, channel, |position| {
                position.delivered = position.delivered.max(upto);
            });
            return true;
        }
        tracing::debug!(channel, count = missed.len(), "caught up from the stream");
        for publication in &missed {
            self.deliver(events, channel, publication, epoch);
        }
        true
    }

    /// Compares every subscribed channel's delivered position with its
    /// stream and hands over what PUB/SUB did not bring; how many streams
    /// could not be read (they are read again at the next check).
    async fn check_positions(&self) -> usize {
        let Some(events) = self.events() else {
            return 0;
        };
        let channels: Vec<(String, u64, String)> = lock(&self.positions)
            .iter()
            .filter(|(_, position)| !position.epoch.is_empty())
            .map(|(c, position)| (c.clone(), position.delivered, position.epoch.clone()))
            .collect();
        let asked = channels.len();
        // The reads at once, and all of them within one timeout: a failed
        // master makes its reads wait, and the watcher must come back to
        // its probes.
        let mut reads = futures_util::StreamExt::buffer_unordered(
            futures_util::stream::iter(channels.into_iter().map(
                |(channel, delivered, epoch)| async move {
                    let mut cmd = redis::cmd("HMGET");
                    cmd.arg(self.key(&channel, "m")).arg("e").arg("t");
                    let top = self.query::<(Option<String>, Option<u64>)>(&cmd).await;
                    (channel, delivered, epoch, top)
                },
            )),
            256,
        );
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        let mut tops = Vec::with_capacity(asked);
        while let Ok(Some(read)) =
            tokio::time::timeout_at(deadline, futures_util::StreamExt::next(&mut reads)).await
        {
            if let (channel, delivered, epoch, Ok(top)) = read {
                tops.push((channel, delivered, epoch, top));
            }
        }
        drop(reads);
        let mut unread = asked - tops.len();
        for (channel, delivered, epoch, (current, top)) in tops {
            match (current, top) {
                (Some(current), Some(top)) if current == epoch && top < delivered => {
                    self.went_back(&*events, &channel, &epoch).await;
                }
                (Some(current), Some(top)) if current == epoch => {
                    if !self.catch_up(&*events, &channel, top, &epoch).await {
                        unread += 1;
                    }
                }
                (Some(current), top) => {
                    tracing::warn!(channel, from = %epoch, to = %current, "stream epoch changed");
                    self.lose(&*events, &channel, |position| {
                        *position = Position {
                            delivered: top.unwrap_or(0),
                            epoch: current,
                            heard: 0,
                        };
                    });
                }
                (None, _) => {
                    // Gone while subscribed (a subscribed stream is kept):
                    // Redis lost its data. The next publication starts a
                    // new epoch.
                    tracing::warn!(channel, epoch = %epoch, "the stream is gone");
                    self.lose(&*events, &channel, |position| {
                        *position = Position::default();
                    });
                }
            }
        }
        if unread > 0 {
            tracing::debug!(unread, "reading stream positions failed");
        }
        unread
    }

    /// `channel`'s stream went back: it gives offsets this node delivered
    /// already to other publications. It gets a new epoch (so that no
    /// client takes those for what it has) and the channel is a gap.
    async fn went_back(&self, events: &dyn EngineEvents, channel: &str, epoch: &str) {
        tracing::warn!(
            channel,
            epoch,
            "the stream went back (Redis lost what it had acknowledged); a new epoch"
        );
        let mut invocation = self.restart.prepare_invoke();
        invocation
            .key(self.key(channel, "m"))
            .arg(epoch)
            .arg(fresh_epoch());
        match self.run::<(String, u64)>(invocation).await {
            Ok((current, top)) => self.lose(events, channel, |position| {
                *position = Position {
                    delivered: top,
                    epoch: current,
                    heard: 0,
                };
            }),
            Err(e) => {
                // Checked again at the next tick.
                tracing::warn!(channel, "starting a new epoch failed: {e}");
                self.lose(events, channel, |_| {});
            }
        }
    }

    /// The position a subscription starts from: the stream's top now (the
    /// node reads the history after the engine is subscribed, so what came
    /// before is the node's to merge). An error when it cannot be read:
    /// taking an unread position for a stream not yet made would hand the
    /// node the whole stream again with the next publication.
    async fn start_position(&self, channel: &str) -> Result<(), EngineError> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.key(channel, "m")).arg("e").arg("t");
        let (epoch, top) = self.query::<(Option<String>, Option<u64>)>(&cmd).await?;
        let mut positions = lock(&self.positions);
        let position = positions.entry(channel.to_owned()).or_default();
        if let (Some(epoch), Some(top)) = (epoch, top) {
            if position.epoch.is_empty() {
                // Not heard: what was published between the SUBSCRIBE and
                // this read arrives still.
                *position = Position {
                    delivered: top,
                    epoch,
                    heard: 0,
                };
            }
        }
        Ok(())
    }
}

/// The PUB/SUB reader: (re)connects, subscribes every channel, hands
/// what arrives to the node; ends when the engine is dropped.
async fn listen(inner: Weak<Inner>) {
    let mut backoff = link::Backoff::new();
    loop {
        let Some(engine) = inner.upgrade() else {
            return;
        };
        let connected = match &engine.nats {
            Some((nats, _)) => engine.bounded(nats.subscriber()).await,
            None => engine.bounded(engine.target.subscriber()).await,
        };
        let mut messages = match connected {
            Ok((mut sink, messages)) => {
                let mut subscriptions = engine.subscriptions.lock().await;
                let mut topics = vec![engine.control_topic()];
                topics.extend(engine.probe_topics.iter().cloned());
                topics.extend(subscriptions.channels.iter().map(|c| engine.key(c, "t")));
                // Bounded: a connection that stalls right away must not
                // hold the subscriptions' lock.
                let subscribed = engine.bounded(sink.subscribe(&topics)).await;
                match subscribed {
                    Ok(()) => {
                        subscriptions.sink = Some(sink);
                        engine.listening.store(true, Ordering::SeqCst);
                        backoff.reset();
                        messages
                    }
                    Err(e) => {
                        tracing::warn!("Redis PUB/SUB subscribe failed: {e}");
                        drop(subscriptions);
                        drop(engine);
                        backoff.wait().await;
                        continue;
                    }
                }
            }
            Err(e) => {
                tracing::warn!("Redis PUB/SUB connection failed: {e}");
                drop(engine);
                backoff.wait().await;
                continue;
            }
        };
        // When each probe topic's probe came back last.
        let probes_seen = Arc::new(Mutex::new(vec![
            tokio::time::Instant::now();
            engine.probe_topics.len()
        ]));
        let (stalled, mut stalling) = tokio::sync::oneshot::channel();
        // Apart from the reader: its probes and reads wait for a failed
        // master's timeouts, and what arrives meanwhile must be read.
        let watcher = AbortOnDrop(tokio::spawn(watch(
            Arc::downgrade(&engine),
            probes_seen.clone(),
            stalled,
        )));
        drop(engine);
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else { break };
                    let Some(engine) = inner.upgrade() else { return };
                    let topic = message.topic();
                    if let Some(n) = engine.probe_topics.iter().position(|t| t == topic) {
                        let mut seen = lock(&probes_seen);
                        seen[n] = tokio::time::Instant::now();
                        if seen.iter().all(|seen| seen.elapsed() <= PROBE_EVERY * 2) {
                            engine.listening.store(true, Ordering::SeqCst);
                        }
                        continue;
                    }
                    engine.dispatch(topic, message.payload()).await;
                }
                // Alive but delivering nothing (or the engine is gone).
                _ = &mut stalling => break,
            }
        }
        drop(watcher);
        let Some(engine) = inner.upgrade() else {
            return;
        };
        tracing::warn!("Redis PUB/SUB connection lost; reconnecting");
        engine.listening.store(false, Ordering::SeqCst);
        engine.subscriptions.lock().await.sink = None;
    }
}

/// Aborts its task when dropped (the watcher ends with its connection).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The watcher of one PUB/SUB connection: publishes the probes,
/// subscribes again the partitions whose probes are late, checks the
/// positions (the first time at once, for what was published while the
/// connection was being made), makes the commands connection again when
/// it stays stuck, and sends on `stalled` when a probe stays silent past
/// the deadline. A round is bounded by a few timeouts, whatever fails.
async fn watch(
    inner: Weak<Inner>,
    probes_seen: Arc<Mutex<Vec<tokio::time::Instant>>>,
    stalled: tokio::sync::oneshot::Sender<()>,
) {
    let mut ticks = tokio::time::interval(PROBE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Checks in a row that left streams unread, and whether every probe
    // failed to go out in the last round (no master answered).
    let mut unread_checks = 0;
    let mut no_probe_sent = false;
    loop {
        ticks.tick().await;
        let Some(engine) = inner.upgrade() else {
            return;
        };
        if engine
            .keep_commands_answering(unread_checks >= 2 || no_probe_sent)
            .await
        {
            unread_checks = 0;
        }
        let (late, oldest): (Vec<usize>, Duration) = {
            let seen = lock(&probes_seen);
            let late = (0..seen.len())
                .filter(|&n| seen[n].elapsed() > PROBE_EVERY * 2)
                .collect();
            let oldest = seen.iter().map(|seen| seen.elapsed()).max();
            (late, oldest.unwrap_or(Duration::ZERO))
        };
        if oldest > PROBE_DEADLINE {
            tracing::warn!(
                "Redis PUB/SUB delivers nothing (its probes do not come back); reconnecting"
            );
            let _ = stalled.send(());
            return;
        }
        engine.listening.store(late.is_empty(), Ordering::SeqCst);
        if !late.is_empty() {
            engine.subscribe_again(&late).await;
        }
        let sent = futures_util::future::join_all(
            engine
                .probe_topics
                .iter()
                .map(|topic| engine.publish_to(topic, b"probe")),
        )
        .await;
        no_probe_sent = sent.iter().all(Result::is_err);
        if engine.check_positions().await > 0 {
            unread_checks += 1;
        } else {
            unread_checks = 0;
        }
    }
}

impl Inner {
    /// On a cluster: subscribes again the topics of the partitions whose
    /// probes are late. Their master failed over, and the client moves
    /// its subscriptions only once it learns the new slot map, which a
    /// subscriptions' connection (sending no commands) may never do; a
    /// subscription sent now reaches the shard's new master.
    async fn subscribe_again(&self, late: &[usize]) {
        let (mut router, channels) = {
            let subscriptions = self.subscriptions.lock().await;
            let Some(router) = subscriptions.sink.as_ref().and_then(Sink::cluster) else {
                return;
            };
            (router, subscriptions.channels.clone())
        };
        let tags: HashSet<&str> = late
            .iter()
            .filter_map(|&n| self.partitions.tags().get(n).map(String::as_str))
            .collect();
        let mut topics: Vec<String> = late
            .iter()
            .filter_map(|&n| self.probe_topics.get(n).cloned())
            .collect();
        topics.extend(
            channels
                .iter()
                .filter(|c| tags.contains(self.partitions.tag_of(c)))
                .map(|c| self.key(c, "t")),
        );
        tracing::info!(
            partitions = late.len(),
            topics = topics.len(),
            "Redis PUB/SUB probes late: subscribing their partitions again"
        );
        if let Err(e) = self.bounded(link::ssubscribe(&mut router, &topics)).await {
            tracing::debug!("subscribing again failed: {e}");
        }
    }
}

impl RedisEngine {
    /// Connects to Redis and starts the PUB/SUB reader.
    ///
    /// # Errors
    /// A URL that does not parse, or a Redis that cannot be reached.
    pub async fn connect(config: RedisConfig) -> Result<RedisEngine, EngineError> {
        if config.prefix.contains(['{', '}']) {
            return Err(corrupt("a Redis prefix may not contain { or }"));
        }
        let target = Target::parse(&config.url, config.cluster, config.timeout).map_err(corrupt)?;
        let commands = tokio::time::timeout(config.timeout, target.commands())
            .await
            .map_err(|_| unavailable("Redis did not answer in time"))?
            .map_err(unavailable)?;
        let partitions = Partitions::new();
        let node = rand::random::<u64>();
        let nats = match &config.nats_url {
            Some(url) => {
                let nats = Nats::new(url, config.timeout);
                let client = nats.connect().await.map_err(unavailable)?;
                Some((nats, client))
            }
            None => None,
        };
        // Over a cluster's sharded PUB/SUB, every partition (so every
        // master) is probed; NATS or one Redis is one connection.
        let probe_tags = if target.is_cluster() && nats.is_none() {
            partitions.tags()
        } else {
            &partitions.tags()[..1]
        };
        let probe_topics = probe_tags
            .iter()
            .map(|tag| format!("{}:{{{tag}}}:probe:{node:016x}", config.prefix))
            .collect();
        let inner = Arc::new(Inner {
            config,
            target,
            commands: RwLock::new(commands),
            failing: Mutex::new(None),
            nats,
            partitions,
            publish: Script::new(&format!("{EXPIRED}{PUBLISH}")),
            history: Script::new(&format!("{EXPIRED}{HISTORY}")),
            keep: Script::new(&format!("{EXPIRED}{KEEP}")),
            restart: Script::new(RESTART),
            add_presence: Script::new(ADD_PRESENCE),
            remove_presence: Script::new(REMOVE_PRESENCE),
            presence: Script::new(PRESENCE),
            events: RwLock::new(None),
            subscriptions: tokio::sync::Mutex::default(),
            subscribed: std::sync::atomic::AtomicUsize::new(0),
            listening: AtomicBool::new(false),
            positions: Mutex::default(),
            delivery: Mutex::default(),
            probe_topics,
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
                inner.bounded(sink.subscribe(&[topic])).await?;
            }
            drop(subscriptions);
            if let Err(e) = inner.start_position(channel).await {
                // Not subscribed after all: the node reports the error
                // (its client subscribes again) and nothing stays behind.
                let _ = self.unsubscribe(channel).await;
                return Err(e);
            }
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
                    inner.bounded(sink.unsubscribe(&[topic])).await?;
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
                .arg(inner.now())
                .arg(inner.script_publish_command());
            let (offset, epoch): (u64, String) = inner.run(invocation).await?;
            if inner.nats.is_some() {
                // Lost here (this node dies), it is found in the stream by
                // the other nodes' position checks.
                let event = wire::encode_publication_event(offset, &epoch, &envelope);
                inner.publish_to(&inner.key(channel, "t"), &event).await?;
            }
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
            self.inner.ping().await
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
            // A script, not MULTI: a cluster connection routes it whole.
            let mut invocation = inner.remove_presence.prepare_invoke();
            invocation
                .key(inner.key(channel, "p"))
                .key(inner.key(channel, "z"))
                .arg(client);
            inner.run::<i64>(invocation).await.map(drop)
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
        Box::pin(async move { self.inner.ping().await })
    }

    fn presence_channels(&self) -> usize {
        0
    }
}

#[cfg(test)]
#[path = "../../../tests/support/redis_server.rs"]
mod redis_server;

#[cfg(test)]
#[path = "../../../tests/support/redis_cluster.rs"]
mod redis_cluster;

#[cfg(test)]
#[path = "../../../tests/support/stalling_proxy.rs"]
mod stalling_proxy;

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::engine::HistoryOptions;
    use crate::protocol::Payload;

    use super::redis_cluster::RedisCluster;
    use super::redis_server::{Persistence, RedisServer};
    use super::stalling_proxy::StallingProxy;
    use crate::engine::nats_server::NatsServer;

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

    type Node = (RedisEngine, Arc<Recorder>, Arc<dyn EngineEvents>);

    /// An engine on `config` (a 2 s timeout), recording what it hands over.
    async fn engine_with(config: RedisConfig) -> Node {
        let engine = RedisEngine::connect(RedisConfig {
            timeout: Duration::from_secs(2),
            ..config
        })
        .await
        .unwrap();
        let recorder = Arc::new(Recorder::default());
        let events: Arc<dyn EngineEvents> = recorder.clone();
        engine.set_events(Arc::downgrade(&events));
        (engine, recorder, events)
    }

    async fn node(server: &RedisServer, prefix: &str) -> Node {
        engine_with(RedisConfig {
            url: server.url(),
            prefix: prefix.into(),
            ..RedisConfig::default()
        })
        .await
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
        // A subscription whose starting position cannot be read fails and
        // leaves nothing behind (an unread position taken for a new stream
        // would hand over the whole stream with the next publication).
        assert!(b.subscribe("sport").await.is_err());
        assert!(!b
            .inner
            .subscriptions
            .lock()
            .await
            .channels
            .contains("sport"));
        assert!(!lock(&b.inner.positions).contains_key("sport"));
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
        b.subscribe("sport").await.unwrap();
        assert!(lock(&b.inner.positions).contains_key("sport"));
    }

    async fn healthy_again(engines: &[&RedisEngine]) {
        for _ in 0..500 {
            let mut all = true;
            for engine in engines {
                all &= engine.health().await.is_ok();
            }
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("health never came back");
    }

    #[tokio::test]
    async fn a_redis_back_from_an_older_snapshot_starts_a_new_epoch_and_the_channel_is_a_gap() {
        let dir = RedisServer::data_dir("snapshot");
        let port = RedisServer::start().port;
        let mut server = RedisServer::keeping(port, Persistence::Snapshot, &dir);
        let (a, _a_seen, _a_events) = node(&server, "t9").await;
        let (b, b_seen, _b_events) = node(&server, "t9").await;
        b.subscribe("feed").await.unwrap();
        let mut first = None;
        for n in 1..=4 {
            let position = a
                .publish("feed", publication(&format!("\"{n}\""), None), KEEP)
                .await
                .unwrap();
            first = first.or(position);
            if n == 2 {
                let mut conn = a.inner.commands();
                redis::cmd("SAVE")
                    .query_async::<()>(&mut conn)
                    .await
                    .unwrap();
            }
        }
        b_seen.wait_for(4).await;
        // Back with offsets 1 and 2 only, in the same epoch: offsets 3 and
        // 4 would go to other publications.
        server.stop();
        let _server = RedisServer::keeping(port, Persistence::Snapshot, &dir);
        healthy_again(&[&a, &b]).await;
        let seen = b_seen.wait_for(5).await;
        assert_eq!(seen[4], "feed gap");
        let next = a
            .publish("feed", publication("\"5\"", None), KEEP)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next.offset, 3);
        assert_ne!(next.epoch, first.unwrap().epoch, "the same epoch again");
        let seen = b_seen.wait_for(6).await;
        assert_eq!(seen[5], "feed 3 \"5\" ");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(lock(&b_seen.0).len(), 6, "{:?}", lock(&b_seen.0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_redis_back_with_its_append_only_file_continues_the_stream_without_a_gap() {
        let dir = RedisServer::data_dir("aof");
        let port = RedisServer::start().port;
        let mut server = RedisServer::keeping(port, Persistence::AppendOnly, &dir);
        let (a, _a_seen, _a_events) = node(&server, "t11").await;
        let (b, b_seen, _b_events) = node(&server, "t11").await;
        b.subscribe("feed").await.unwrap();
        let mut first = None;
        for n in 1..=3 {
            let position = a
                .publish("feed", publication(&format!("\"{n}\""), None), KEEP)
                .await
                .unwrap();
            first = first.or(position);
        }
        b_seen.wait_for(3).await;
        server.stop();
        let _server = RedisServer::keeping(port, Persistence::AppendOnly, &dir);
        healthy_again(&[&a, &b]).await;
        let next = a
            .publish("feed", publication("\"4\"", None), KEEP)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((next.offset, &next.epoch), (4, &first.unwrap().epoch));
        let seen = b_seen.wait_for(4).await;
        assert_eq!(seen[3], "feed 4 \"4\" ");
        // A periodic check after the restart finds nothing to report.
        tokio::time::sleep(PROBE_EVERY + Duration::from_millis(200)).await;
        assert_eq!(lock(&b_seen.0).len(), 4, "{:?}", lock(&b_seen.0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_publication_at_an_offset_heard_already_is_a_stream_that_went_back() {
        let server = RedisServer::start();
        let (a, _a_seen, _a_events) = node(&server, "t10").await;
        let (b, b_seen, _b_events) = node(&server, "t10").await;
        b.subscribe("feed").await.unwrap();
        for n in 1..=3 {
            a.publish("feed", publication(&format!("\"{n}\""), None), KEEP)
                .await
                .unwrap();
        }
        b_seen.wait_for(3).await;
        // The stream's top back at 1 (as after a failover to a replica
        // that had not received 2 and 3), and a publication right after,
        // before any periodic check.
        let back = Script::new(
            "local first = redis.call('XRANGE', KEYS[1], '1-0', '1-0')
             redis.call('DEL', KEYS[1])
             redis.call('XADD', KEYS[1], '1-0', unpack(first[1][2]))
             redis.call('HSET', KEYS[2], 't', 1)
             return 0",
        );
        let mut invocation = back.prepare_invoke();
        invocation
            .key(a.inner.key("feed", "s"))
            .key(a.inner.key("feed", "m"));
        a.inner.run::<i64>(invocation).await.unwrap();
        a.publish("feed", publication("\"other 2\"", None), KEEP)
            .await
            .unwrap();
        let seen = b_seen.wait_for(4).await;
        assert_eq!(seen[3], "feed gap");
        let next = a
            .publish("feed", publication("\"after\"", None), KEEP)
            .await
            .unwrap()
            .unwrap();
        let seen = b_seen.wait_for(5).await;
        assert_eq!(seen[4], format!("feed {} \"after\" ", next.offset));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(lock(&b_seen.0).len(), 5, "{:?}", lock(&b_seen.0));
    }

    async fn cluster_node(cluster: &RedisCluster, prefix: &str) -> Node {
        engine_with(RedisConfig {
            url: cluster.urls(),
            cluster: true,
            prefix: prefix.into(),
            ..RedisConfig::default()
        })
        .await
    }

    /// Publishes until Redis takes it (a failover refuses publishes for a
    /// while); the offset it got. The history outlasts a failover (what a
    /// subscriber's PUB/SUB misses meanwhile is read from it).
    async fn publish_until_taken(engine: &RedisEngine, channel: &str, data: &str) -> u64 {
        for _ in 0..300 {
            match engine
                .publish(channel, publication(data, None), KEEP_MANY)
                .await
            {
                Ok(Some(position)) => return position.offset,
                Ok(None) => unreachable!("history is kept"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        panic!("{channel} {data} never published");
    }

    /// Per channel, the data received (in order), from a recorder's lines.
    fn received(recorder: &Recorder) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut per_channel = std::collections::BTreeMap::<String, Vec<String>>::new();
        for line in lock(&recorder.0).iter() {
            let mut fields = line.split(' ');
            let (Some(channel), Some(_offset), Some(data)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            per_channel
                .entry(channel.to_owned())
                .or_default()
                .push(data.to_owned());
        }
        per_channel
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redis_cluster_spreads_channels_over_its_masters_and_loses_nothing_in_a_failover() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("tidewire_hub=debug,redis=info")
            .with_test_writer()
            .try_init();
        let mut cluster = RedisCluster::start("engine");
        let (a, _a_seen, _a_events) = cluster_node(&cluster, "c1").await;
        let (b, b_seen, _b_events) = cluster_node(&cluster, "c1").await;
        let channels: Vec<String> = (0..300).map(|n| format!("room{n}")).collect();
        for channel in &channels {
            b.subscribe(channel).await.unwrap();
        }
        // The spread: every master holds its share of the channels' topics
        // (and of their keys: a channel's keys and topic share a slot).
        let masters = cluster.masters();
        assert_eq!(masters.len(), 3);
        let mut per_master = Vec::new();
        for (port, _) in &masters {
            let topics = cluster.on(*port, &["pubsub", "shardchannels", "c1:*:t"]);
            per_master.push(topics.lines().filter(|l| !l.is_empty()).count());
        }
        assert_eq!(per_master.iter().sum::<usize>(), 300, "{per_master:?}");
        assert!(
            per_master.iter().all(|&n| (80..=120).contains(&n)),
            "{per_master:?}"
        );
        let topic = a.inner.key("room0", "t");
        assert_eq!(
            cluster.slot_of(&topic),
            cluster.slot_of(&a.inner.key("room0", "s")),
            "a channel's keys and topic in one slot"
        );

        for channel in &channels {
            publish_until_taken(&a, channel, "\"1\"").await;
        }
        for _ in 0..500 {
            if lock(&b_seen.0).len() >= 300 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(lock(&b_seen.0).len(), 300);

        // The master of room0 dies; its replica takes over. Publications
        // go on all along (those of the dead master's slots wait).
        let victim = cluster.master_of(cluster.slot_of(&topic));
        // What it acknowledged is on its replica (see the test below for
        // what happens when it is not).
        tokio::task::block_in_place(|| cluster.wait_replicated(victim));
        cluster.kill(victim);
        let publisher = {
            let channels = channels.clone();
            async move {
                for n in 2..=4 {
                    for channel in &channels {
                        publish_until_taken(&a, channel, &format!("\"{n}\"")).await;
                    }
                }
                a
            }
        };
        let a = publisher.await;
        tokio::task::block_in_place(|| cluster.wait_until_ok());
        assert_ne!(cluster.master_of(cluster.slot_of(&topic)), victim);
        for channel in &channels {
            publish_until_taken(&a, channel, "\"5\"").await;
        }
        let expected: Vec<String> = (1..=5).map(|n| format!("\"{n}\"")).collect();
        let mut per_channel = received(&b_seen);
        for _ in 0..1500 {
            if per_channel.len() == 300 && per_channel.values().all(|got| got.len() >= 5) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            per_channel = received(&b_seen);
        }
        for channel in &channels {
            assert_eq!(
                per_channel.get(channel),
                Some(&expected),
                "{channel}: every publication once, in order"
            );
        }
        assert!(
            !lock(&b_seen.0).iter().any(|l| l.ends_with(" gap")),
            "nothing acknowledged was lost"
        );
        healthy_again(&[&a, &b]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_master_that_dies_before_its_replica_has_everything_is_a_gap_and_a_new_epoch() {
        let mut cluster = RedisCluster::start("unreplicated");
        let (a, _a_seen, _a_events) = cluster_node(&cluster, "c2").await;
        let (b, b_seen, _b_events) = cluster_node(&cluster, "c2").await;
        b.subscribe("feed").await.unwrap();
        let first = a
            .publish("feed", publication("\"1\"", None), KEEP)
            .await
            .unwrap()
            .unwrap();
        b_seen.wait_for(1).await;
        let victim = cluster.master_of(cluster.slot_of(&a.inner.key("feed", "s")));
        let replica = cluster.replica_of(victim);
        tokio::task::block_in_place(|| cluster.wait_replicated(victim));
        // Two more that the replica never gets (its link cut while it is
        // stopped, so it cannot come back for them): delivered, then gone.
        cluster.pause(replica, true);
        cluster.on(victim, &["client", "kill", "type", "replica"]);
        for n in 2..=3 {
            a.publish("feed", publication(&format!("\"{n}\""), None), KEEP)
                .await
                .unwrap();
        }
        b_seen.wait_for(3).await;
        cluster.kill(victim);
        cluster.pause(replica, false);
        tokio::task::block_in_place(|| cluster.wait_until_ok());
        assert_eq!(
            cluster.master_of(cluster.slot_of(&a.inner.key("feed", "s"))),
            replica
        );
        let next = publish_until_taken(&a, "feed", "\"4\"").await;
        let seen = b_seen.wait_for(4).await;
        assert_eq!(
            seen[..3],
            ["feed 1 \"1\" ", "feed 2 \"2\" ", "feed 3 \"3\" "]
        );
        assert_eq!(seen[3], "feed gap", "{seen:?}");
        // Offset 2 again: in a new epoch, so that no client takes it for
        // the old 2. (Whether it reaches the node depends on whether the
        // periodic check or it revealed the loss: the node's subscribers
        // were told of the gap either way, and read it from the history.)
        assert_eq!(next, 2);
        let last = a
            .publish("feed", publication("\"5\"", None), KEEP)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(last.offset, 3);
        assert_ne!(last.epoch, first.epoch);
        let history = a.history("feed", read(None, false)).await.unwrap();
        assert_eq!(history.position, last);
        let data: Vec<String> = history
            .publications
            .iter()
            .map(|p| String::from_utf8_lossy(p.data.as_bytes()).into_owned())
            .collect();
        assert_eq!(data, ["\"1\"", "\"4\"", "\"5\""]);
        for _ in 0..500 {
            if lock(&b_seen.0).last().is_some_and(|l| l == "feed 3 \"5\" ") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let seen = lock(&b_seen.0).clone();
        assert!(
            seen[4..] == ["feed 3 \"5\" "] || seen[4..] == ["feed 2 \"4\" ", "feed 3 \"5\" "],
            "{seen:?}"
        );
    }

    async fn nats_node(redis: &RedisServer, nats: &NatsServer, prefix: &str) -> Node {
        engine_with(RedisConfig {
            url: redis.url(),
            nats_url: Some(nats.url()),
            prefix: prefix.into(),
            ..RedisConfig::default()
        })
        .await
    }

    /// A history long enough that a publication overtaken on its way is
    /// still in the stream when the one that overtook it arrives.
    const KEEP_MANY: HistoryOptions = HistoryOptions {
        size: 1000,
        ttl: Duration::from_secs(60),
    };

    async fn publish_many(engine: &RedisEngine) {
        for n in 0..50 {
            engine
                .publish("room", publication(&format!("\"{n}\""), None), KEEP_MANY)
                .await
                .unwrap();
        }
    }

    /// The offsets a recorder saw in `channel`, in order.
    fn offsets(recorder: &Recorder, channel: &str) -> Vec<u64> {
        lock(&recorder.0)
            .iter()
            .filter_map(|l| {
                l.strip_prefix(channel)?
                    .strip_prefix(' ')?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn over_nats_a_channel_keeps_its_order_across_publishers_and_a_nats_restart_loses_nothing(
    ) {
        let redis = RedisServer::start();
        let mut nats = NatsServer::start();
        let (a, _a_seen, _a_events) = nats_node(&redis, &nats, "n1").await;
        let (b, _b_seen, _b_events) = nats_node(&redis, &nats, "n1").await;
        let (c, c_seen, _c_events) = nats_node(&redis, &nats, "n1").await;
        c.subscribe("room").await.unwrap();
        // Two nodes publish at once: offsets are given in Redis, the NATS
        // messages may cross; the subscriber's node hands them over in
        // offset order, once each.
        tokio::join!(publish_many(&a), publish_many(&b));
        for _ in 0..500 {
            if offsets(&c_seen, "room").len() >= 100 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(offsets(&c_seen, "room"), (1..=100).collect::<Vec<_>>());

        // NATS goes away: the nodes turn unhealthy; what is published
        // meanwhile is in the stream only.
        let port = nats.port;
        nats.stop();
        let mut down = false;
        for _ in 0..1000 {
            if a.health().await.is_err() && c.health().await.is_err() {
                down = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(down, "health stays ok with NATS gone");
        assert!(a
            .publish("room", publication("\"refused\"", None), KEEP)
            .await
            .is_err());
        assert_eq!(publish_lost(&a, "room", "\"101\"").await, 101);
        let _nats = NatsServer::on(port);
        healthy_again(&[&a, &b, &c]).await;
        a.publish("room", publication("\"102\"", None), KEEP)
            .await
            .unwrap();
        for _ in 0..500 {
            if offsets(&c_seen, "room").len() >= 102 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(offsets(&c_seen, "room"), (1..=102).collect::<Vec<_>>());
        assert!(!lock(&c_seen.0).iter().any(|l| l.ends_with(" gap")));
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
            .arg(inner.now())
            .arg(inner.script_publish_command());
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
        let mut conn = a.inner.commands();
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
        /// With NATS as the broker.
        nats: Option<NatsServer>,
        clock_ms: Arc<std::sync::atomic::AtomicU64>,
        engines: Mutex<Vec<Arc<RedisEngine>>>,
    }

    impl RedisHarness {
        fn new() -> RedisHarness {
            RedisHarness {
                server: RedisServer::start(),
                nats: None,
                clock_ms: Arc::new(std::sync::atomic::AtomicU64::new(1_800_000_000_000)),
                engines: Mutex::default(),
            }
        }

        fn over_nats() -> RedisHarness {
            RedisHarness {
                nats: Some(NatsServer::start()),
                ..RedisHarness::new()
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
                        nats_url: self.nats.as_ref().map(NatsServer::url),
                        // A new prefix is a store with nothing in it.
                        prefix: format!("run{n}"),
                        timeout: Duration::from_secs(5),
                        clock: Arc::new(move || clock.load(Ordering::SeqCst)),
                        ..RedisConfig::default()
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
                let mut conn = engine.inner.commands();
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

    /// The same with NATS carrying the publications between nodes.
    mod over_nats {
        use super::*;

        conformance_suite!(RedisHarness::over_nats(), real_time, cases = 6);
    }
}
