//! Configuration: defaults, the TOML file, `TIDEWIRE_*` environment
//! variables, and the namespace options of channels.
//!
//! Precedence (highest first): command-line flags (applied by the CLI on
//! top of what this module returns), environment, TOML file, defaults. The
//! defaults are the embedded mode: one node, in memory, on
//! `127.0.0.1:8080`, with a permissive default namespace good for a chat
//! demo (anonymous clients may connect, subscribe and publish; presence,
//! join/leave, 100 messages / 5 minutes of history, recovery).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tidewire::CloseCode;
pub use tidewire::SlowConsumer;

/// Everything `tidewire serve` can be told (docs/configuration.md lists
/// every key). It serializes to the keys of the TOML file, secrets
/// included.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (`HOST:PORT`).
    pub listen: String,
    /// Client protocol limits and timers.
    pub client: ClientSettings,
    /// Connection and subscription tokens (JWT).
    pub token: TokenSettings,
    /// The server HTTP API.
    pub api: ApiSettings,
    /// The operator's page at `/admin`.
    pub admin: AdminSettings,
    /// Callbacks to the application backend.
    pub proxy: ProxySettings,
    /// Transport: TLS, connection limits, WebSocket limits, queues.
    pub server: ServerSettings,
    /// Options of channels without a namespace (`lobby`), and of channels
    /// in unknown namespaces when `unknown_namespaces = "default"`.
    pub channels: ChannelOptions,
    /// Named namespaces: `[namespaces.chat]` applies to `chat:*` channels.
    pub namespaces: BTreeMap<String, ChannelOptions>,
    /// What a channel in a namespace that is not configured gets.
    pub unknown_namespaces: UnknownNamespaces,
    /// Where streams, presence and the fan-out between nodes live.
    pub engine: EngineSettings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            client: ClientSettings::default(),
            token: TokenSettings::default(),
            api: ApiSettings::default(),
            admin: AdminSettings::default(),
            proxy: ProxySettings::default(),
            server: ServerSettings::default(),
            engine: EngineSettings::default(),
            channels: ChannelOptions::default(),
            namespaces: BTreeMap::new(),
            unknown_namespaces: UnknownNamespaces::Default,
        }
    }
}

/// Channels in namespaces that are not configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownNamespaces {
    /// They get the options of `[channels]` (the embedded default).
    Default,
    /// They are refused with "unknown namespace" (strict deployments).
    Reject,
}

/// Client protocol settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientSettings {
    /// Clients may connect without a token (as anonymous, user id "").
    pub anonymous: bool,
    /// Application-level ping push interval (browsers cannot see WebSocket
    /// pings); sent to the client in the connect reply. 0 = off.
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub ping_interval: Duration,
    /// A connection that has not sent a successful `connect` by then is
    /// disconnected.
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub connect_timeout: Duration,
    /// After a connection token expires: time to send `refresh` before the
    /// disconnect.
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub refresh_grace: Duration,
    /// How long a client's presence entry lives in the engine unless
    /// refreshed; the node refreshes its clients' entries every third of
    /// it, so that a node that dies leaves nobody present after this.
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub presence_ttl: Duration,
    /// Largest WebSocket message (one command or a batch), in bytes; larger
    /// ones close the connection with 1009.
    pub max_message_size: usize,
    /// Most commands in one message (newline-separated batch).
    pub max_batch: usize,
    /// Longest channel name, in bytes.
    pub max_channel_length: usize,
    /// Most channels one client may be subscribed to.
    pub max_subscriptions: usize,
    /// Most publications one `history` call returns.
    pub max_history_limit: usize,
    /// Per-connection send queue: most messages waiting.
    pub queue_messages: usize,
    /// Per-connection send queue: most bytes waiting.
    pub queue_bytes: usize,
    /// What happens to a client whose send queue is full when a
    /// publication arrives: `close` (1013, the client reconnects and
    /// recovers from history) or `drop` (counted; the client sees a gap in
    /// offsets). The server layer's `wait` is not offered: a fan-out to
    /// thousands of subscribers cannot wait for one.
    #[serde(
        deserialize_with = "slow_consumer",
        serialize_with = "serialize_slow_consumer"
    )]
    pub slow_consumer: SlowConsumer,
    /// The name of a cookie that carries the connection token: a
    /// `connect` without a token uses the cookie's (the browser sends it
    /// with the WebSocket upgrade and the HTTP fallbacks alike). Unset:
    /// cookies are not read. Pair it with `server.allowed_origins`: a
    /// cookie is sent whichever page opens the connection.
    pub token_cookie: Option<String>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            anonymous: true,
            ping_interval: Duration::from_secs(25),
            connect_timeout: Duration::from_secs(10),
            refresh_grace: Duration::from_secs(10),
            presence_ttl: Duration::from_secs(60),
            max_message_size: 64 * 1024,
            max_batch: 100,
            max_channel_length: 255,
            max_subscriptions: 128,
            max_history_limit: 1000,
            queue_messages: 1024,
            queue_bytes: 1 << 20,
            slow_consumer: SLOW_CONSUMER_CLOSE,
            token_cookie: None,
        }
    }
}

/// A setting's value that does not parse (from a flag, a variable or the
/// file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// A number that is not a duration (negative, not finite, too big).
    #[error("{0:?} is not a duration (a number of seconds from 0, or \"10s\", \"5m\")")]
    NotADuration(String),
    /// Text that is not a duration.
    #[error("{value:?}: {reason}")]
    BadDuration {
        /// The text.
        value: String,
        /// Why, from the duration parser.
        reason: String,
    },
    /// A slow-consumer policy the hub does not offer.
    #[error("slow-consumer policy {0:?} is not available for the hub (close or drop)")]
    SlowConsumerPolicy(String),
}

/// The hub's `close` slow-consumer policy: 1013, try again later.
pub const SLOW_CONSUMER_CLOSE: SlowConsumer = SlowConsumer::Close(CloseCode::TRY_AGAIN_LATER);

/// A hub slow-consumer policy by name: `close` ([`SLOW_CONSUMER_CLOSE`])
/// or `drop`.
///
/// # Errors
/// Any other name, `wait` included (see [`ClientSettings::slow_consumer`]).
pub fn parse_slow_consumer(name: &str) -> Result<SlowConsumer, ValueError> {
    match name {
        "close" => Ok(SLOW_CONSUMER_CLOSE),
        "drop" => Ok(SlowConsumer::Drop),
        other => Err(ValueError::SlowConsumerPolicy(other.to_owned())),
    }
}

fn slow_consumer<'de, D: Deserializer<'de>>(d: D) -> Result<SlowConsumer, D::Error> {
    parse_slow_consumer(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn serialize_slow_consumer<S: Serializer>(policy: &SlowConsumer, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match policy {
        SlowConsumer::Drop => "drop",
        SlowConsumer::Wait => "wait",
        SlowConsumer::Close(_) => "close",
    })
}

/// JWT verification settings. Without any key, tokens are refused (and
/// anonymous connections are the only ones, if allowed).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenSettings {
    /// HS256 shared secret.
    pub hmac_secret: Option<String>,
    /// RS256 public key: PEM text, or the path of a PEM file (any value
    /// that does not start with `-----BEGIN`), read at start.
    pub rsa_public_key: Option<String>,
    /// ES256 (P-256) public key: PEM text or the path of a PEM file, like
    /// `rsa_public_key`.
    pub ecdsa_public_key: Option<String>,
    /// A JWKS document URL (RS256 / ES256 keys by `kid`).
    pub jwks_url: Option<String>,
    /// If set, tokens must have this `aud` (a token without `aud` is
    /// refused like one with another).
    pub audience: Option<String>,
    /// If set, tokens must have this `iss` (likewise).
    pub issuer: Option<String>,
}

/// Which engine a node runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum EngineKind {
    /// In this process (the embedded default): one node.
    Memory,
    /// Redis: history, offsets, epochs and presence in Redis, the fan-out
    /// between nodes over its PUB/SUB; many nodes.
    Redis,
    /// NATS: the fan-out between nodes only; no history and no presence
    /// (namespaces that ask for them are refused).
    Nats,
}

/// What carries the publications between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BrokerKind {
    /// The engine's own (Redis PUB/SUB for the Redis engine).
    Redis,
    /// NATS (`engine.nats_url`); the Redis engine keeps the streams and
    /// presence.
    Nats,
}

/// The engine.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    /// `memory` or `redis`.
    #[serde(rename = "type")]
    pub kind: EngineKind,
    /// The Redis server (`redis://[user:password@]host:port[/db]`), or
    /// nodes of a Redis Cluster separated by commas.
    pub redis_url: String,
    /// Whether `redis_url` is a node of a Redis Cluster (implied by
    /// several URLs).
    pub redis_cluster: bool,
    /// The prefix of the Redis keys and topics (the nodes of one cluster
    /// share it; two clusters on one Redis need two).
    pub redis_prefix: String,
    /// What carries publications between the nodes of the Redis engine:
    /// `redis` (its PUB/SUB) or `nats`.
    pub broker: BrokerKind,
    /// The NATS server of `broker = "nats"`.
    pub nats_url: String,
}

impl EngineSettings {
    /// In words, for people: `memory`, `redis`, `redis cluster`,
    /// `redis + nats`, `nats`.
    pub fn describe(&self) -> String {
        match (self.kind, self.broker) {
            (EngineKind::Memory, _) => "memory".into(),
            (EngineKind::Nats, _) => "nats".into(),
            (EngineKind::Redis, BrokerKind::Nats) => "redis + nats".into(),
            (EngineKind::Redis, _) if self.redis_cluster || self.redis_url.contains(',') => {
                "redis cluster".into()
            }
            (EngineKind::Redis, _) => "redis".into(),
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            kind: EngineKind::Memory,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_cluster: false,
            redis_prefix: "tidewire".into(),
            broker: BrokerKind::Redis,
            nats_url: "nats://127.0.0.1:4222".into(),
        }
    }
}

/// HTTP API settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// The API key (`Authorization: apikey KEY`). Unset: a random key is
    /// generated at start and printed.
    pub key: Option<String>,
    /// Largest request body, in bytes (beyond: 413).
    pub max_body_size: usize,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            key: None,
            max_body_size: 1 << 20,
        }
    }
}

/// The admin page (`/admin`): the cluster's nodes, live, for operators.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Serve the page and its token endpoint.
    pub enabled: bool,
    /// The secret an operator types in (unset: the API key). Every node
    /// of a cluster must have the same one: a page's token is good on all.
    pub secret: Option<String>,
    /// How long an admin token is good for (the page fetches a new one
    /// before it expires).
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub token_ttl: Duration,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            enabled: true,
            secret: None,
            token_ttl: Duration::from_secs(15 * 60),
        }
    }
}

/// The reserved channel admin pages subscribe to: each node sends its
/// view of the cluster there every second (see [`crate::admin`]).
pub const ADMIN_CHANNEL: &str = "$admin";

/// The options of [`ADMIN_CHANNEL`], whatever the configuration says:
/// nothing kept, nobody but the server publishes, nobody listed.
pub const ADMIN_CHANNEL_OPTIONS: ChannelOptions = ChannelOptions {
    subscribe: SubscribeRule::Token,
    publish: PublishRule::Server,
    presence: false,
    join_leave: false,
    join_leave_max_members: 0,
    join_leave_interval: Duration::ZERO,
    history_size: 0,
    history_ttl: Duration::ZERO,
    recovery: false,
};

/// Proxy callbacks to the application backend.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxySettings {
    /// Called on every `connect` (http:// or https://).
    pub connect_url: Option<String>,
    /// Called on every client `publish`.
    pub publish_url: Option<String>,
    /// Timeout of one callback.
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub timeout: Duration,
    /// Headers of the request that opened a connection (the WebSocket
    /// upgrade, or the request that opened an HTTP-fallback session)
    /// passed on to the connect callback, so that the application can
    /// authenticate a browser by its cookies. Case-insensitive.
    pub http_headers: Vec<String>,
}

/// The headers the connect callback is given unless configured otherwise.
pub const DEFAULT_PROXY_HTTP_HEADERS: &[&str] = &[
    "cookie",
    "authorization",
    "origin",
    "user-agent",
    "x-forwarded-for",
    "x-real-ip",
];

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            connect_url: None,
            publish_url: None,
            timeout: Duration::from_secs(5),
            http_headers: DEFAULT_PROXY_HTTP_HEADERS
                .iter()
                .map(|&h| h.to_owned())
                .collect(),
        }
    }
}

/// Transport settings (the server layer's policies).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// TLS certificate chain (PEM file) for https:// and wss://.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM file).
    pub tls_key: Option<PathBuf>,
    /// Allowed browser origins for WebSocket connections (empty: any).
    pub allowed_origins: Vec<String>,
    /// Most simultaneous TCP connections (beyond: 503).
    pub max_connections: usize,
    /// Most simultaneous connections per client IP (0: no limit; beyond: 429).
    pub max_connections_per_ip: usize,
    /// Deadline for TLS and the HTTP request head.
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub handshake_timeout: Duration,
    /// Close WebSockets silent for this long (0: never).
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub idle_timeout: Duration,
    /// WebSocket-level keepalive ping interval (0: off).
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub ping_interval: Duration,
    /// How long a peer has to answer a keepalive ping.
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub pong_timeout: Duration,
    /// Offer permessage-deflate.
    pub deflate: bool,
    /// permessage-deflate without context takeover both ways: no
    /// compression memory is held between messages (one context per
    /// thread is shared), at some cost in ratio.
    pub deflate_no_context_takeover: bool,
    /// How long graceful shutdown waits.
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub shutdown_timeout: Duration,
    /// Over how long a graceful shutdown spreads its disconnects (0: all
    /// at once): in a rolling restart behind a load balancer the clients
    /// move to the other nodes a few at a time. Shorter than
    /// `shutdown_timeout`.
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub drain_window: Duration,
    /// A node whose engine stays unreachable this long tells its clients
    /// to reconnect elsewhere (disconnect 3005), spread over
    /// `drain_window`, and again each time as long as it lasts (0:
    /// never): a load balancer has taken it out by then (its `/health`
    /// says 503), and its clients would otherwise hear nothing.
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub unhealthy_grace: Duration,
    /// WebSockets on tidewire's event loop (a thread per core, every
    /// connection plain state, writes straight from the fan-out) rather
    /// than a tokio task each; the rest of the HTTP stays on tokio, on the
    /// same port. Plain ws:// only. Unset: on, unless the hub serves TLS
    /// (see [`ServerSettings::event_loop_front`]).
    pub event_loop: Option<bool>,
    /// The event loop's threads (0: one per CPU this process may use).
    pub event_loop_threads: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            tls_cert: None,
            tls_key: None,
            allowed_origins: Vec::new(),
            max_connections: 20_000,
            max_connections_per_ip: 0,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::ZERO,
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(20),
            // Off by default: a compressor per connection costs far more
            // than the 4 KiB per idle connection we aim for.
            deflate: false,
            deflate_no_context_takeover: false,
            shutdown_timeout: Duration::from_secs(10),
            drain_window: Duration::ZERO,
            unhealthy_grace: Duration::from_secs(15),
            event_loop: None,
            event_loop_threads: 0,
        }
    }
}

impl ServerSettings {
    /// Whether the WebSockets go on the event loop when the hub serves
    /// TLS (`tls`) or not: as `event_loop` says, or, unset, unless it does
    /// (the event loop serves plain ws://; TLS stays on tokio).
    pub fn event_loop_front(&self, tls: bool) -> bool {
        self.event_loop.unwrap_or(!tls)
    }
}

/// Who may subscribe to a channel of a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscribeRule {
    /// Any connected client, anonymous included.
    Anonymous,
    /// Clients with a user id (connected with a token or through the
    /// connect proxy).
    Authenticated,
    /// Only clients whose connection token lists the channel in its
    /// `channels` claim, or who present a subscription token for it.
    Token,
}

/// Who may publish to a channel of a namespace from a client connection
/// (the HTTP API may always publish).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishRule {
    /// Clients subscribed to the channel.
    Subscribers,
    /// Any connected client.
    Clients,
    /// Nobody: the server (HTTP API) only.
    Server,
}

/// Options of the channels of a namespace.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelOptions {
    /// Who may subscribe.
    pub subscribe: SubscribeRule,
    /// Who may publish from a client connection.
    pub publish: PublishRule,
    /// Keep and serve presence (who is subscribed).
    pub presence: bool,
    /// Send join and leave (`presence_diff`) pushes to subscribers.
    pub join_leave: bool,
    /// Above this many subscribers (on this node), `presence_diff` pushes
    /// carry only how many joined and left, not who: listing every join
    /// to every member costs members² pushes when a big room fills up.
    pub join_leave_max_members: usize,
    /// The joins and leaves of a channel within this interval go out as
    /// one `presence_diff` push (0: one push per join or leave).
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub join_leave_interval: Duration,
    /// Publications kept per channel (0: no history, no offsets).
    pub history_size: usize,
    /// How long publications are kept.
    #[serde(deserialize_with = "duration", serialize_with = "serialize_duration")]
    pub history_ttl: Duration,
    /// Let subscribers recover missed publications from history.
    pub recovery: bool,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        ChannelOptions {
            subscribe: SubscribeRule::Anonymous,
            publish: PublishRule::Subscribers,
            presence: true,
            join_leave: true,
            join_leave_max_members: 100,
            join_leave_interval: Duration::from_millis(200),
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            recovery: true,
        }
    }
}

impl ChannelOptions {
    /// Whether channels keep a history (and so offsets and an epoch).
    pub fn has_history(&self) -> bool {
        self.history_size > 0 && !self.history_ttl.is_zero()
    }

    /// Whether subscribers may recover missed publications.
    pub fn has_recovery(&self) -> bool {
        self.recovery && self.has_history()
    }
}

/// The error of loading a configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// An environment variable has a value of the wrong form.
    #[error("environment variable {name}: {message}")]
    Env {
        /// The variable.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or settings contradict each other.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The file read when no `--config` is given and it exists in the current
/// folder.
pub const DEFAULT_FILE: &str = "tidewire.toml";

/// Environment variables read by [`Config::apply_env`], with the key each
/// sets (`TIDEWIRE_ALLOWED_ORIGINS` is comma-separated).
pub const ENV_VARS: &[(&str, &str)] = &[
    ("TIDEWIRE_LISTEN", "listen"),
    ("TIDEWIRE_API_KEY", "api.key"),
    ("TIDEWIRE_ADMIN_SECRET", "admin.secret"),
    ("TIDEWIRE_TOKEN_HMAC_SECRET", "token.hmac_secret"),
    ("TIDEWIRE_TOKEN_RSA_PUBLIC_KEY", "token.rsa_public_key"),
    ("TIDEWIRE_TOKEN_ECDSA_PUBLIC_KEY", "token.ecdsa_public_key"),
    ("TIDEWIRE_TOKEN_JWKS_URL", "token.jwks_url"),
    ("TIDEWIRE_CLIENT_ANONYMOUS", "client.anonymous"),
    ("TIDEWIRE_PROXY_CONNECT_URL", "proxy.connect_url"),
    ("TIDEWIRE_PROXY_PUBLISH_URL", "proxy.publish_url"),
    ("TIDEWIRE_PROXY_HTTP_HEADERS", "proxy.http_headers"),
    ("TIDEWIRE_CLIENT_TOKEN_COOKIE", "client.token_cookie"),
    ("TIDEWIRE_ALLOWED_ORIGINS", "server.allowed_origins"),
    ("TIDEWIRE_MAX_CONNECTIONS", "server.max_connections"),
    ("TIDEWIRE_TLS_CERT", "server.tls_cert"),
    ("TIDEWIRE_TLS_KEY", "server.tls_key"),
    ("TIDEWIRE_ENGINE", "engine.type"),
    ("TIDEWIRE_ENGINE_REDIS_URL", "engine.redis_url"),
    ("TIDEWIRE_ENGINE_REDIS_PREFIX", "engine.redis_prefix"),
    ("TIDEWIRE_ENGINE_REDIS_CLUSTER", "engine.redis_cluster"),
    ("TIDEWIRE_ENGINE_BROKER", "engine.broker"),
    ("TIDEWIRE_ENGINE_NATS_URL", "engine.nats_url"),
];

impl Config {
    /// Parses a TOML document (`path` names it in errors).
    ///
    /// # Errors
    /// [`ConfigError::Parse`] with the parser's line and column.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Defaults, then `file` (or `tidewire.toml` in `dir` if it exists),
    /// then the environment (`env` returns a variable's value).
    ///
    /// # Errors
    /// The file cannot be read or parsed, or a value is invalid.
    pub fn load(
        file: Option<&Path>,
        dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(Config, Option<PathBuf>), ConfigError> {
        let path = match file {
            Some(path) => Some(path.to_owned()),
            None => Some(dir.join(DEFAULT_FILE)).filter(|p| p.is_file()),
        };
        let mut config = match &path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Config::from_toml(&text, path)?
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        config.validate()?;
        Ok((config, path))
    }

    /// Applies the `TIDEWIRE_*` variables listed in [`ENV_VARS`].
    ///
    /// # Errors
    /// [`ConfigError::Env`] for a value of the wrong form.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |name: &str| env(name).filter(|v| !v.is_empty());
        if let Some(v) = get("TIDEWIRE_LISTEN") {
            self.listen = v;
        }
        if let Some(v) = get("TIDEWIRE_API_KEY") {
            self.api.key = Some(v);
        }
        if let Some(v) = get("TIDEWIRE_ADMIN_SECRET") {
            self.admin.secret = Some(v);
        }
        if let Some(v) = get("TIDEWIRE_TOKEN_HMAC_SECRET") {
            self.token.hmac_secret = Some(v);
        }
        if let Some(v) = get("TIDEWIRE_TOKEN_RSA_PUBLIC_KEY") {
            self.token.rsa_public_key = Some(v);
        }
        if let Some(v) = get("TIDEWIRE_TOKEN_ECDSA_PUBLIC_KEY") {
            self.token.ecdsa_public_key = Some(v);
        }
        if let Some(v) = get("TIDEWIRE_TOKEN_JWKS_URL") {
            self.token.jwks_url = Some(v);
        }
        if let Some(v) = get("TIDEWIRE_CLIENT_ANONYMOUS") {
            self.client.anonymous = match v.as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    return Err(ConfigError::Env {
                        name: "TIDEWIRE_CLIENT_ANONYMOUS",
                        message: format!("{v:?} is not true or false"),
                    })
                }
            };
        }
        if let Some(v) = get("TIDEWIRE_PROXY_CONNECT_URL") {
            self.proxy.connect_url = Some(v);
        }
        if let Some(v) = get("TIDEWIRE_PROXY_PUBLISH_URL") {
            self.proxy.publish_url = Some(v);
        }
        let list = |v: String| {
            v.split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(String::from)
                .collect()
        };
        if let Some(v) = get("TIDEWIRE_PROXY_HTTP_HEADERS") {
            self.proxy.http_headers = list(v);
        }
        if let Some(v) = get("TIDEWIRE_CLIENT_TOKEN_COOKIE") {
            self.client.token_cookie = Some(v);
        }
        if let Some(v) = get("TIDEWIRE_ALLOWED_ORIGINS") {
            self.server.allowed_origins = list(v);
        }
        if let Some(v) = get("TIDEWIRE_MAX_CONNECTIONS") {
            self.server.max_connections = v.parse().map_err(|e| ConfigError::Env {
                name: "TIDEWIRE_MAX_CONNECTIONS",
                message: format!("{v:?}: {e}"),
            })?;
        }
        if let Some(v) = get("TIDEWIRE_TLS_CERT") {
            self.server.tls_cert = Some(v.into());
        }
        if let Some(v) = get("TIDEWIRE_TLS_KEY") {
            self.server.tls_key = Some(v.into());
        }
        if let Some(v) = get("TIDEWIRE_ENGINE") {
            self.engine.kind = match v.as_str() {
                "memory" => EngineKind::Memory,
                "redis" => EngineKind::Redis,
                "nats" => EngineKind::Nats,
                _ => {
                    return Err(ConfigError::Env {
                        name: "TIDEWIRE_ENGINE",
                        message: format!("{v:?} is not memory, redis or nats"),
                    })
                }
            };
        }
        if let Some(v) = get("TIDEWIRE_ENGINE_REDIS_URL") {
            self.engine.redis_url = v;
        }
        if let Some(v) = get("TIDEWIRE_ENGINE_REDIS_PREFIX") {
            self.engine.redis_prefix = v;
        }
        if let Some(v) = get("TIDEWIRE_ENGINE_BROKER") {
            self.engine.broker = match v.as_str() {
                "redis" => BrokerKind::Redis,
                "nats" => BrokerKind::Nats,
                _ => {
                    return Err(ConfigError::Env {
                        name: "TIDEWIRE_ENGINE_BROKER",
                        message: format!("{v:?} is not redis or nats"),
                    })
                }
            };
        }
        if let Some(v) = get("TIDEWIRE_ENGINE_NATS_URL") {
            self.engine.nats_url = v;
        }
        if let Some(v) = get("TIDEWIRE_ENGINE_REDIS_CLUSTER") {
            self.engine.redis_cluster = match v.as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    return Err(ConfigError::Env {
                        name: "TIDEWIRE_ENGINE_REDIS_CLUSTER",
                        message: format!("{v:?} is not true or false"),
                    })
                }
            };
        }
        Ok(())
    }

    /// Checks ranges and consistency.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] saying what is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.admin.secret.as_deref() == Some("") {
            return invalid(
                "admin.secret is empty: set a secret, or leave it out to use the API key".into(),
            );
        }
        if let Some(bad) = self
            .proxy
            .http_headers
            .iter()
            .find(|h| http::HeaderName::from_bytes(h.as_bytes()).is_err())
        {
            return invalid(format!("proxy.http_headers: {bad:?} is not a header name"));
        }
        if let Some(name) = &self.client.token_cookie {
            if name.is_empty() || name.contains([';', '=', ',', ' ', '"']) {
                return invalid(format!(
                    "client.token_cookie: {name:?} is not a cookie name"
                ));
            }
        }
        if self.server.event_loop == Some(true) && self.server.tls_cert.is_some() {
            return invalid(
                "server.event_loop serves plain ws:// only: leave out server.tls_cert, or \
                 terminate TLS in front of the hub"
                    .into(),
            );
        }
        let tls = self.server.tls_cert.is_some();
        if self.server.event_loop_threads != 0 && !self.server.event_loop_front(tls) {
            return invalid(format!(
                "server.event_loop_threads is for the event loop, and the WebSockets go on \
                 tokio here ({}): leave it out, or serve plain ws:// on the event loop",
                if tls {
                    "TLS"
                } else {
                    "server.event_loop = false, or --tokio"
                }
            ));
        }
        if self.engine.broker == BrokerKind::Nats && self.engine.kind == EngineKind::Memory {
            return invalid(
                "engine.broker = \"nats\" carries publications between nodes of \
                 engine.type = \"redis\" (which keeps history and presence); \
                 set engine.type = \"redis\""
                    .into(),
            );
        }
        if self.engine.kind == EngineKind::Nats {
            let sections = std::iter::once(("[channels]".to_owned(), &self.channels)).chain(
                self.namespaces
                    .iter()
                    .map(|(name, options)| (format!("[namespaces.{name}]"), options)),
            );
            for (section, options) in sections {
                if options.has_history() || options.presence {
                    return invalid(format!(
                        "engine.type = \"nats\" keeps no history and no presence, and {section} \
                         asks for them: set history_size = 0, recovery = false and presence = false \
                         there, or run engine.type = \"redis\" with engine.broker = \"nats\""
                    ));
                }
            }
        }
        let c = &self.client;
        if c.max_message_size < 256 {
            return invalid("client.max_message_size must be at least 256".into());
        }
        if c.max_batch == 0 || c.max_channel_length == 0 || c.queue_messages == 0 {
            return invalid(
                "client.max_batch, client.max_channel_length and client.queue_messages \
                 must be positive"
                    .into(),
            );
        }
        if self.api.max_body_size == 0 {
            return invalid("api.max_body_size must be positive".into());
        }
        for name in self.namespaces.keys() {
            if name.is_empty() || name.contains(':') || name.len() > 64 {
                return invalid(format!(
                    "namespace name {name:?} must be 1 to 64 bytes without ':'"
                ));
            }
        }
        if !self.server.drain_window.is_zero()
            && self.server.drain_window >= self.server.shutdown_timeout
        {
            return invalid(
                "server.drain_window must be shorter than server.shutdown_timeout (the \
                 drain's disconnects come within the shutdown's wait)"
                    .into(),
            );
        }
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return invalid("server.tls_cert and server.tls_key go together".into());
        }
        Ok(())
    }

    /// Every key of the TOML file with its value, in JSON form: dotted
    /// paths (`client.max_batch`, `namespaces.chat.presence`) to leaves
    /// (unset options are `null`, durations strings such as `"10s"`).
    /// What docs/configuration.md lists; secrets included.
    pub fn keys(&self) -> BTreeMap<String, serde_json::Value> {
        fn walk(
            prefix: &str,
            value: serde_json::Value,
            out: &mut BTreeMap<String, serde_json::Value>,
        ) {
            match value {
                serde_json::Value::Object(fields) => {
                    for (name, value) in fields {
                        let path = match prefix {
                            "" => name,
                            _ => format!("{prefix}.{name}"),
                        };
                        walk(&path, value, out);
                    }
                }
                leaf => {
                    out.insert(prefix.to_owned(), leaf);
                }
            }
        }
        let mut out = BTreeMap::new();
        let value = serde_json::to_value(self).expect("a configuration is plain data");
        walk("", value, &mut out);
        out
    }

    /// The options for `channel` (`ns:rest` uses namespace `ns`).
    ///
    /// # Errors
    /// `Err(namespace)` when the namespace is not configured and
    /// `unknown_namespaces = "reject"`.
    pub fn channel_options<'a>(&self, channel: &'a str) -> Result<&ChannelOptions, &'a str> {
        if channel == ADMIN_CHANNEL {
            return Ok(&ADMIN_CHANNEL_OPTIONS);
        }
        match namespace_of(channel) {
            None => Ok(&self.channels),
            Some(ns) => match self.namespaces.get(ns) {
                Some(options) => Ok(options),
                None if self.unknown_namespaces == UnknownNamespaces::Default => Ok(&self.channels),
                None => Err(ns),
            },
        }
    }
}

/// The namespace of a channel: the part before the first `:`.
pub fn namespace_of(channel: &str) -> Option<&str> {
    channel.split_once(':').map(|(ns, _)| ns)
}

/// Parses "10s", "5m", "250ms", or a number of seconds.
///
/// # Errors
/// Anything else, a negative or non-finite number included.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        // Negative, NaN, infinite or past Duration::MAX: an error, not a panic.
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| ValueError::NotADuration(s.to_owned()));
    }
    humantime::parse_duration(s).map_err(|e| ValueError::BadDuration {
        value: s.to_owned(),
        reason: e.to_string(),
    })
}

/// A duration as the TOML file writes it ("30s", "5m", "0s").
fn serialize_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// A duration in TOML: a string ("30s", "5m") or a number of seconds.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(f64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Seconds(s) => parse_duration(&s.to_string()),
        Raw::Text(t) => parse_duration(&t),
    }
    .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn embedded_defaults_are_permissive_and_local() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert!(c.client.anonymous);
        let o = c.channel_options("chat:lobby").unwrap();
        assert_eq!(o.subscribe, SubscribeRule::Anonymous);
        assert_eq!(o.publish, PublishRule::Subscribers);
        assert!(o.presence && o.join_leave && o.has_recovery());
        assert_eq!(o.history_size, 100);
    }

    #[test]
    fn toml_namespaces_and_durations() {
        let text = r#"
            listen = "0.0.0.0:9000"
            unknown_namespaces = "reject"
            [client]
            ping_interval = "10s"
            [channels]
            history_size = 0
            [namespaces.news]
            publish = "server"
            history_ttl = 60
            [namespaces.private]
            subscribe = "token"
            presence = false
        "#;
        let c = Config::from_toml(text, Path::new("t.toml")).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9000");
        assert_eq!(c.client.ping_interval, Duration::from_secs(10));
        assert!(!c.channel_options("lobby").unwrap().has_history());
        let news = c.channel_options("news:eu").unwrap();
        assert_eq!(news.publish, PublishRule::Server);
        assert_eq!(news.history_ttl, Duration::from_secs(60));
        assert_eq!(
            c.channel_options("private:x").unwrap().subscribe,
            SubscribeRule::Token
        );
        assert_eq!(c.channel_options("other:x").unwrap_err(), "other");
    }

    #[test]
    fn unknown_keys_are_errors_with_a_position() {
        let err = Config::from_toml("[client]\nping = 3\n", Path::new("t.toml")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("t.toml") && text.contains("ping"), "{text}");
        let err = Config::from_toml("[channels]\nsubscribe = \"everyone\"\n", Path::new("t"));
        assert!(err.is_err());
    }

    #[test]
    fn env_overrides_file_and_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("tidewire-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(DEFAULT_FILE),
            "listen = \"127.0.0.1:7000\"\n[api]\nkey = \"file\"\n",
        )
        .unwrap();
        let (c, path) = Config::load(None, &dir, no_env).unwrap();
        assert_eq!(path.unwrap(), dir.join(DEFAULT_FILE));
        assert_eq!(
            (c.listen.as_str(), c.api.key.as_deref()),
            ("127.0.0.1:7000", Some("file"))
        );
        let env = |name: &str| (name == "TIDEWIRE_API_KEY").then(|| "env".to_string());
        let (c, _) = Config::load(None, &dir, env).unwrap();
        assert_eq!(c.api.key.as_deref(), Some("env"));
        assert_eq!(c.listen, "127.0.0.1:7000");
        let bad = |name: &str| (name == "TIDEWIRE_MAX_CONNECTIONS").then(|| "many".to_string());
        assert!(matches!(
            Config::load(None, &dir, bad),
            Err(ConfigError::Env { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
        let (c, path) = Config::load(None, &dir, no_env).unwrap();
        assert!(path.is_none());
        assert_eq!(c.listen, "127.0.0.1:8080");
    }

    #[test]
    fn the_readme_example_configuration_is_valid() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("```toml\n")
            .expect("a TOML example in the README")
            + 8;
        let end = start + readme[start..].find("```").unwrap();
        let c = Config::from_toml(&readme[start..end], Path::new("README.md")).unwrap();
        assert!(!c.client.anonymous);
        assert_eq!(c.unknown_namespaces, UnknownNamespaces::Reject);
        assert_eq!(
            c.channel_options("news:eu").unwrap().publish,
            PublishRule::Server
        );
        assert_eq!(
            c.channel_options("private:x").unwrap().subscribe,
            SubscribeRule::Token
        );
        assert!(!c.channel_options("lobby").unwrap().has_history());
    }

    #[test]
    fn the_slow_consumer_policy_is_close_or_drop() {
        let path = Path::new("tidewire.toml");
        let read = |v: &str| {
            Config::from_toml(&format!("[client]\nslow_consumer = {v:?}\n"), path)
                .map(|c| c.client.slow_consumer)
        };
        assert_eq!(read("close").unwrap(), SLOW_CONSUMER_CLOSE);
        assert_eq!(
            SLOW_CONSUMER_CLOSE,
            SlowConsumer::Close(CloseCode::TRY_AGAIN_LATER)
        );
        assert_eq!(read("drop").unwrap(), SlowConsumer::Drop);
        let wait = read("wait").unwrap_err().to_string();
        assert!(wait.contains("not available for the hub"), "{wait}");
        assert_eq!(Config::default().keys()["client.slow_consumer"], "close");
    }

    #[test]
    fn keys_are_the_toml_keys_and_read_back() {
        let mut config = Config::default();
        config
            .namespaces
            .insert("chat".into(), ChannelOptions::default());
        let keys = config.keys();
        assert_eq!(keys["listen"], "127.0.0.1:8080");
        assert_eq!(keys["client.refresh_grace"], "10s");
        assert_eq!(keys["server.idle_timeout"], "0s");
        assert_eq!(keys["channels.history_ttl"], "5m");
        assert_eq!(keys["api.max_body_size"], 1 << 20);
        assert_eq!(keys["api.key"], serde_json::Value::Null);
        assert_eq!(keys["namespaces.chat.presence"], true);
        // Serialized values read back as the same configuration.
        let back: Config = serde_json::from_value(serde_json::to_value(&config).unwrap()).unwrap();
        assert_eq!(back.keys(), keys);
    }

    #[test]
    fn the_nats_engine_refuses_history_and_presence_naming_where_they_are_asked() {
        let mut config = Config::default();
        config.engine.kind = EngineKind::Nats;
        let refused = config.validate().unwrap_err().to_string();
        assert!(refused.contains("[channels]"), "{refused}");
        config.channels.history_size = 0;
        config.channels.recovery = false;
        config.channels.presence = false;
        config.validate().unwrap();
        config
            .namespaces
            .insert("chat".into(), ChannelOptions::default());
        let refused = config.validate().unwrap_err().to_string();
        assert!(refused.contains("[namespaces.chat]"), "{refused}");
        // NATS as the broker of the Redis engine keeps both.
        let mut config = Config::default();
        config.engine.kind = EngineKind::Redis;
        config.engine.broker = BrokerKind::Nats;
        config.validate().unwrap();
        config.engine.kind = EngineKind::Memory;
        assert!(config.validate().is_err());
    }

    #[test]
    fn every_environment_variable_sets_its_key() {
        let before = Config::default().keys();
        for &(name, key) in ENV_VARS {
            assert!(before.contains_key(key), "{name}: no key {key}");
            let value = match before[key] {
                serde_json::Value::Bool(b) => (!b).to_string(),
                serde_json::Value::Number(_) => "7".to_string(),
                _ if key == "engine.type" => "redis".to_string(),
                _ if key == "engine.broker" => "nats".to_string(),
                _ => "https://a.example, https://b.example".to_string(),
            };
            let mut config = Config::default();
            config
                .apply_env(|n| (n == name).then(|| value.clone()))
                .unwrap_or_else(|e| panic!("{name}={value}: {e}"));
            let after = config.keys();
            let changed: Vec<&String> = after.keys().filter(|k| after[*k] != before[*k]).collect();
            assert_eq!(changed, [key], "{name}={value}");
        }
    }

    /// The code spans (`like this`) of a Markdown table cell.
    fn code_spans(cell: &str) -> Vec<&str> {
        cell.split('`').skip(1).step_by(2).collect()
    }

    /// The rows of docs/configuration.md's key tables, by key: the cells
    /// key, type, default, env, flag, what it does.
    fn documented_keys() -> BTreeMap<String, Vec<String>> {
        let doc = include_str!("../../../docs/configuration.md");
        let mut rows = BTreeMap::new();
        for line in doc.lines() {
            let cells: Vec<String> = line
                .trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect();
            let key = match code_spans(&cells[0])[..] {
                [key] if cells[0] == format!("`{key}`") && !key.starts_with('-') => key.to_owned(),
                _ => continue,
            };
            assert_eq!(cells.len(), 6, "docs/configuration.md: the row of {key}");
            assert!(
                rows.insert(key.clone(), cells).is_none(),
                "docs/configuration.md lists {key} twice"
            );
        }
        rows
    }

    #[test]
    fn docs_configuration_lists_every_key_with_its_default_and_variable() {
        let rows = documented_keys();
        let mut config = Config::default();
        config
            .namespaces
            .insert("<name>".into(), ChannelOptions::default());
        let keys = config.keys();
        for (key, value) in &keys {
            let row = rows
                .get(key)
                .unwrap_or_else(|| panic!("docs/configuration.md does not list {key}"));
            let default = &row[2];
            if value.is_null() {
                assert!(
                    default.starts_with("unset"),
                    "{key}: default {default}, not unset"
                );
            } else {
                let literal = serde_json::to_string(value).unwrap();
                assert_eq!(
                    code_spans(default).first().copied(),
                    Some(literal.as_str()),
                    "docs/configuration.md: the default of {key}"
                );
            }
            let variables: Vec<&str> = ENV_VARS
                .iter()
                .filter(|(_, k)| k == key)
                .map(|(name, _)| *name)
                .collect();
            assert_eq!(
                code_spans(&row[3]),
                variables,
                "docs/configuration.md: the environment variable of {key}"
            );
        }
        for key in rows.keys() {
            assert!(
                keys.contains_key(key),
                "docs/configuration.md lists {key}, which is not a configuration key"
            );
        }
    }

    #[test]
    fn invalid_values_are_refused() {
        assert!(Config::from_toml("[namespaces.\"a:b\"]\n", Path::new("t")).is_err());
        assert!(Config::from_toml("[client]\nmax_batch = 0\n", Path::new("t")).is_err());
        assert!(Config::from_toml("[api]\nmax_body_size = 0\n", Path::new("t")).is_err());
        let empty = Config::from_toml("[admin]\nsecret = \"\"\n", Path::new("t"));
        assert!(empty
            .unwrap_err()
            .to_string()
            .contains("admin.secret is empty"));
        assert!(Config::from_toml("[client]\nping_interval = \"soon\"\n", Path::new("t")).is_err());
        for bad in ["-1", "inf", "NaN", "1e30", "-0.5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_duration("0.25"), Ok(Duration::from_millis(250)));
    }

    /// Event-loop threads asked for where the WebSockets go on tokio would
    /// be ignored: refused instead.
    #[test]
    fn event_loop_threads_only_with_the_event_loop() {
        let toml = |extra: &str| format!("[server]\nevent_loop_threads = 2\n{extra}");
        assert!(Config::from_toml(&toml(""), Path::new("t")).is_ok());
        assert!(Config::from_toml(&toml("event_loop = true\n"), Path::new("t")).is_ok());
        let tokio = Config::from_toml(&toml("event_loop = false\n"), Path::new("t"));
        assert!(tokio
            .unwrap_err()
            .to_string()
            .contains("server.event_loop_threads is for the event loop"));
        let tls = toml("tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n");
        let tls = Config::from_toml(&tls, Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(tls.contains("(TLS)"), "{tls}");
    }
}
