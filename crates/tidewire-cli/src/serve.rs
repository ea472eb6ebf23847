//! `tidewire serve`: the real-time hub.
//!
//! Configuration precedence: flags given on the command line, then
//! `TIDEWIRE_*` variables, then the TOML file (`--config`, or
//! `tidewire.toml` in the current folder), then the embedded defaults. The
//! server flags shared with `echo` apply only when given explicitly, so a
//! flag's default never overrides the file; `--help` shows the embedded
//! defaults ([`with_hub_defaults`]). docs/configuration.md lists every key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{ArgMatches, Args, Command};
use tidewire::tls::TlsAcceptor;
use tidewire::{CancellationToken, SlowConsumer};
use tidewire_hub::config::SLOW_CONSUMER_CLOSE;
use tidewire_hub::config::{BrokerKind, EngineKind};
use tidewire_hub::engine::{NatsConfig, NatsEngine, RedisConfig, RedisEngine};
use tidewire_hub::{Config, Hub, MemoryEngine};
use tracing::info;

use crate::server_args::{
    given, join_address, self_signed, shutdown_signal, split_address, ServerArgs,
};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Configuration file (without it: tidewire.toml in the current folder, if present).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Key for the HTTP API (configured nowhere: a random key, printed at start).
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// HS256 secret for connection and subscription tokens.
    #[arg(long, value_name = "SECRET")]
    token_secret: Option<String>,
    /// Secret of the admin page at /admin (unset: the API key).
    #[arg(long, value_name = "SECRET")]
    admin_secret: Option<String>,
    /// Offer permessage-deflate compression (off by default for serve: a
    /// compressor per connection costs far more than an idle connection).
    #[arg(long, conflicts_with = "no_deflate")]
    deflate: bool,
    /// Where streams, presence and the fan-out between nodes live: memory
    /// (this process, one node) or redis (many nodes on one Redis).
    #[arg(long, value_name = "ENGINE", value_parser = ["memory", "redis", "nats"], default_value = "memory")]
    engine: String,
    /// The Redis server of --engine redis; several URLs separated by
    /// commas are the seed nodes of a Redis Cluster.
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// --redis-url is a node of a Redis Cluster (implied by several URLs).
    #[arg(long)]
    redis_cluster: bool,
    /// What carries publications between the nodes of --engine redis:
    /// redis (its PUB/SUB) or nats (--nats-url; Redis keeps history and
    /// presence).
    #[arg(long, value_name = "BROKER", value_parser = ["redis", "nats"], default_value = "redis")]
    broker: String,
    /// The NATS server of --broker nats.
    #[arg(long, value_name = "URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// WebSockets on tidewire's event loop (a thread per core, connections
    /// as plain state, the fan-out written straight from each thread);
    /// the rest of the HTTP stays on tokio, on the same port. Plain ws://
    /// only. The default without TLS.
    #[arg(long, conflicts_with = "tokio")]
    event_loop: bool,
    /// WebSockets on tokio, a task each (the default with TLS).
    #[arg(long)]
    tokio: bool,
    /// The event loop's threads (0: one per CPU this process may use).
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    server: ServerArgs,
}

/// Each flag of `serve` that sets a configuration key, with the key (a
/// flag may set several). docs/configuration.md lists them; tests check
/// that each flag sets exactly its keys and that the shown defaults are
/// the configuration's.
pub(crate) const FLAG_KEYS: &[(&str, &str)] = &[
    ("listen", "listen"),
    ("host", "listen"),
    ("port", "listen"),
    ("api_key", "api.key"),
    ("admin_secret", "admin.secret"),
    ("engine", "engine.type"),
    ("redis_url", "engine.redis_url"),
    ("redis_cluster", "engine.redis_cluster"),
    ("broker", "engine.broker"),
    ("nats_url", "engine.nats_url"),
    ("event_loop", "server.event_loop"),
    ("tokio", "server.event_loop"),
    ("threads", "server.event_loop_threads"),
    ("token_secret", "token.hmac_secret"),
    ("tls_cert", "server.tls_cert"),
    ("tls_key", "server.tls_key"),
    ("allow_origins", "server.allowed_origins"),
    ("max_connections", "server.max_connections"),
    ("max_connections_per_ip", "server.max_connections_per_ip"),
    ("handshake_timeout", "server.handshake_timeout"),
    ("idle_timeout", "server.idle_timeout"),
    ("ping_interval", "server.ping_interval"),
    ("pong_timeout", "server.pong_timeout"),
    ("deflate", "server.deflate"),
    ("no_deflate", "server.deflate"),
    ("deflate_no_context_takeover", "server.deflate"),
    (
        "deflate_no_context_takeover",
        "server.deflate_no_context_takeover",
    ),
    ("shutdown_timeout", "server.shutdown_timeout"),
    ("max_message_size", "client.max_message_size"),
    ("send_queue", "client.queue_messages"),
    ("send_queue_bytes", "client.queue_bytes"),
    ("slow_consumer", "client.slow_consumer"),
];

/// Help that says more for `serve` than the shared flag's text.
const SERVE_HELP: &[(&str, &str)] = &[
    (
        "slow_consumer",
        "When a subscriber's send queue is full: close (with 1013; the client \
         reconnects and recovers what it missed from history) or drop (the \
         publication, counted). echo's wait is not available: a fan-out cannot \
         wait for one subscriber",
    ),
    (
        "no_deflate",
        "Don't offer permessage-deflate compression (serve's default, unless the \
         configuration sets server.deflate = true)",
    ),
    (
        "max_message_size",
        "Largest client message (one command or a batch), in bytes; frames are \
         bounded by it too (beyond: close 1009)",
    ),
];

/// `serve`'s command with its own defaults: the shared server flags
/// declare `echo`'s, and `serve` shows the embedded configuration's (the
/// flags apply only when given, over the configuration), with the key
/// each flag sets.
pub fn with_hub_defaults(command: Command) -> Command {
    let defaults = Config::default().keys();
    let (host, port) = split_address(defaults["listen"].as_str().unwrap_or_default())
        .expect("the default listen address is HOST:PORT");
    let mut keys: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for &(id, key) in FLAG_KEYS {
        keys.entry(id).or_default().push(key);
    }
    let mut command = command;
    for (id, keys) in keys {
        let default = match id {
            "host" => Some(host.clone()),
            "port" => Some(port.to_string()),
            _ => match defaults.get(keys[0]) {
                Some(serde_json::Value::String(text)) => Some(text.clone()),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                _ => None,
            },
        };
        let help = SERVE_HELP
            .iter()
            .find(|(flag, _)| *flag == id)
            .map(|(_, h)| *h);
        let keys = keys.join(", ");
        command = command.mut_arg(id, |arg| {
            let text = match help {
                Some(text) => text.to_owned(),
                None => arg.get_help().map(ToString::to_string).unwrap_or_default(),
            };
            // A multi-paragraph doc comment is the long help `--help` shows.
            let long = arg
                .get_long_help()
                .map(|long| format!("{long}\n\n[config: {keys}]"));
            let arg = arg.help(format!("{text} [config: {keys}]"));
            let arg = match long {
                Some(long) => arg.long_help(long),
                None => arg,
            };
            // Only flags that take a value have a default; switches stay off.
            match default {
                Some(default) if !arg.get_default_values().is_empty() => arg.default_value(default),
                _ => arg,
            }
        });
    }
    command
}

/// The configuration: defaults < file < environment < flags given.
pub(crate) fn configuration(
    args: &ServeArgs,
    matches: Option<&ArgMatches>,
) -> anyhow::Result<Config> {
    let cwd = std::env::current_dir()?;
    let (mut config, file) = Config::load(args.config.as_deref(), &cwd, |name| {
        std::env::var(name).ok()
    })?;
    if let Some(file) = file {
        info!(file = %file.display(), "configuration file");
    }
    if let Some(key) = &args.api_key {
        config.api.key = Some(key.clone());
    }
    if let Some(secret) = &args.token_secret {
        config.token.hmac_secret = Some(secret.clone());
    }
    if let Some(secret) = &args.admin_secret {
        config.admin.secret = Some(secret.clone());
    }
    let given = |id: &str| given(matches, id);
    if given("engine") {
        config.engine.kind = match args.engine.as_str() {
            "redis" => EngineKind::Redis,
            "nats" => EngineKind::Nats,
            _ => EngineKind::Memory,
        };
    }
    if given("redis_url") {
        config.engine.redis_url = args.redis_url.clone();
    }
    if given("redis_cluster") {
        config.engine.redis_cluster = true;
    }
    if given("broker") {
        config.engine.broker = match args.broker.as_str() {
            "nats" => BrokerKind::Nats,
            _ => BrokerKind::Redis,
        };
    }
    if given("nats_url") {
        config.engine.nats_url = args.nats_url.clone();
    }
    let s = &args.server;
    if given("listen") {
        config.listen = s.listen.clone();
    }
    if given("host") || given("port") {
        // Each part replaces its half of the configured address.
        let (host, port) = split_address(&config.listen)
            .map_err(|e| anyhow::anyhow!("listen: {e}; --host and --port need HOST:PORT"))?;
        let host = if given("host") { s.host.clone() } else { host };
        let port = if given("port") { s.port } else { port };
        config.listen = join_address(&host, port);
    }
    let server = &mut config.server;
    if given("tls_cert") {
        server.tls_cert = s.tls_cert.clone();
        server.tls_key = s.tls_key.clone();
    }
    if given("allow_origins") {
        server.allowed_origins = s.allow_origins.clone();
    }
    if given("max_connections") {
        server.max_connections = s.max_connections;
    }
    if given("max_connections_per_ip") {
        server.max_connections_per_ip = s.max_connections_per_ip;
    }
    if given("handshake_timeout") {
        server.handshake_timeout = s.handshake_timeout;
    }
    if given("idle_timeout") {
        server.idle_timeout = s.idle_timeout;
    }
    if given("ping_interval") {
        server.ping_interval = s.ping_interval;
    }
    if given("pong_timeout") {
        server.pong_timeout = s.pong_timeout;
    }
    if args.deflate {
        server.deflate = true;
    }
    if given("no_deflate") {
        server.deflate = false;
    }
    if given("deflate_no_context_takeover") {
        server.deflate = true;
        server.deflate_no_context_takeover = true;
    }
    if given("shutdown_timeout") {
        server.shutdown_timeout = s.shutdown_timeout;
    }
    if args.event_loop {
        server.event_loop = Some(true);
    }
    if args.tokio {
        server.event_loop = Some(false);
    }
    if given("threads") {
        server.event_loop_threads = args.threads;
    }
    let client = &mut config.client;
    if given("max_message_size") {
        client.max_message_size = s.max_message_size;
    }
    if given("send_queue") {
        client.queue_messages = s.send_queue.max(1);
    }
    if given("send_queue_bytes") {
        client.queue_bytes = s.send_queue_bytes;
    }
    if given("slow_consumer") {
        client.slow_consumer = match s.slow_consumer {
            SlowConsumer::Drop => SlowConsumer::Drop,
            // The hub closes with 1013 (try again later): recover and go on.
            SlowConsumer::Close(_) => SLOW_CONSUMER_CLOSE,
            SlowConsumer::Wait => anyhow::bail!(
                "--slow-consumer wait is not available for serve: a fan-out cannot wait for \
                 one subscriber (use close or drop)"
            ),
        };
    }
    config.validate()?;
    Ok(config)
}

fn tls_acceptor(
    args: &ServeArgs,
    config: &Config,
    port: u16,
) -> anyhow::Result<Option<TlsAcceptor>> {
    if let (Some(cert), Some(key)) = (&config.server.tls_cert, &config.server.tls_key) {
        return Ok(Some(TlsAcceptor::from_pem_files(cert, key)?));
    }
    if !args.server.tls_self_signed {
        return Ok(None);
    }
    let (acceptor, message) = self_signed(&config.listen, port)?;
    eprintln!("{message}");
    Ok(Some(acceptor))
}

pub async fn run(args: ServeArgs, matches: Option<ArgMatches>) -> anyhow::Result<()> {
    let mut config = configuration(&args, matches.as_ref())?;
    let generated_key = config.api.key.is_none();
    let api_key: Arc<str> = match &config.api.key {
        Some(key) => key.as_str().into(),
        None => format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        )
        .into(),
    };
    config.api.key = Some(api_key.to_string());
    crate::listener::raise_open_file_limit();
    let serves_tls = config.server.tls_cert.is_some() || args.server.tls_self_signed;
    if config.server.event_loop == Some(true) && serves_tls {
        anyhow::bail!("--event-loop serves plain ws:// only (no --tls-cert, --tls-self-signed)");
    }
    let event_loop = config.server.event_loop_front(serves_tls);
    // The event loop binds its own listeners (one per thread, SO_REUSEPORT).
    let (listener, addr) = if event_loop {
        let addr = tokio::net::lookup_host(&config.listen)
            .await
            .with_context(|| format!("listen address {:?}", config.listen))?
            .next()
            .with_context(|| format!("listen address {:?} resolves to nothing", config.listen))?;
        (None, addr)
    } else {
        let listener = crate::listener::bind_listener(&config.listen).await?;
        let addr = listener.local_addr()?;
        (Some(listener), addr)
    };
    let tls = tls_acceptor(&args, &config, addr.port())?;
    let (http, ws) = if tls.is_some() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    let engine: Arc<dyn tidewire_hub::Engine> = match config.engine.kind {
        EngineKind::Redis => {
            let redis = RedisConfig {
                url: config.engine.redis_url.clone(),
                cluster: config.engine.redis_cluster,
                nats_url: (config.engine.broker == BrokerKind::Nats)
                    .then(|| config.engine.nats_url.clone()),
                prefix: config.engine.redis_prefix.clone(),
                ..RedisConfig::default()
            };
            let engine = RedisEngine::connect(redis)
                .await
                .with_context(|| format!("engine redis at {}", config.engine.redis_url))?;
            let cluster = config.engine.redis_cluster || config.engine.redis_url.contains(',');
            let broker = match config.engine.broker {
                BrokerKind::Nats => config.engine.nats_url.as_str(),
                _ => "redis",
            };
            info!(url = %config.engine.redis_url, cluster, broker, "engine: redis");
            Arc::new(engine)
        }
        EngineKind::Nats => {
            let nats = NatsConfig {
                url: config.engine.nats_url.clone(),
                prefix: config.engine.redis_prefix.clone(),
                ..NatsConfig::default()
            };
            let engine = NatsEngine::connect(nats)
                .await
                .with_context(|| format!("engine nats at {}", config.engine.nats_url))?;
            info!(url = %config.engine.nats_url, "engine: nats (no history, no presence)");
            Arc::new(engine)
        }
        _ => Arc::new(MemoryEngine::new()),
    };
    let hub = Hub::new(config, engine)?;
    if generated_key {
        // Safe by default: nobody can use /api without this key, and the
        // operator who started the server can.
        println!("api key (generated for this run; set api.key or TIDEWIRE_API_KEY to choose one): {api_key}");
    }
    let front = match listener {
        Some(listener) => Front::Tokio(listener),
        None => Front::EventLoop(
            tidewire_hub::http::start_on_event_loop(hub.clone(), addr, &api_key)
                .with_context(|| format!("listening on {addr}"))?,
        ),
    };
    let addr = match &front {
        Front::Tokio(listener) => listener.local_addr()?,
        Front::EventLoop(serving) => serving.local_addr(),
    };
    let signal = shutdown_signal().context("installing the shutdown signal handlers")?;
    // Scripts wait for this line: it says the port is open (and, from here
    // on, that SIGTERM shuts down gracefully).
    let on = match front {
        Front::Tokio(_) => "tokio",
        Front::EventLoop(_) => "the event loop",
    };
    println!(
        "tidewire serve listening on {http}://{addr}/ (WebSocket: {ws}://{addr}{}, on {on})",
        tidewire_hub::http::WEBSOCKET_PATH
    );
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        signal.await;
        info!("shutdown requested");
        token.cancel();
    });
    match front {
        Front::Tokio(listener) => {
            tidewire_hub::http::serve(hub, listener, &api_key, tls, shutdown).await?
        }
        Front::EventLoop(serving) => {
            info!("WebSockets on the event loop");
            serving.run(shutdown).await?
        }
    }
    info!("stopped");
    Ok(())
}

/// Where the hub's connections are served.
enum Front {
    /// Everything on tokio (`tidewire::Server`).
    Tokio(tokio::net::TcpListener),
    /// WebSockets on the event loop, the rest handed over to tokio.
    EventLoop(tidewire_hub::http::EventLoopServing),
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches, Parser};

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn config_for(argv: &[&str]) -> anyhow::Result<Config> {
        let matches = with_hub_defaults(Cli::command()).try_get_matches_from(argv)?;
        let cli = Cli::from_arg_matches(&matches)?;
        configuration(&cli.serve, Some(&matches))
    }

    #[test]
    fn flag_defaults_do_not_override_the_configuration() {
        let c = config_for(&["serve"]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080");
        // ServerArgs' own defaults (64 MiB messages, wait) stay out.
        assert_eq!(c.client.max_message_size, 64 * 1024);
        assert_eq!(c.client.slow_consumer, SLOW_CONSUMER_CLOSE);
    }

    #[test]
    fn explicit_flags_win() {
        let c = config_for(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--max-message-size",
            "4096",
            "--slow-consumer",
            "drop",
            "--api-key",
            "k",
        ])
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:0");
        assert_eq!(c.client.max_message_size, 4096);
        assert_eq!(c.client.slow_consumer, SlowConsumer::Drop);
        assert_eq!(c.api.key.as_deref(), Some("k"));
        let c = config_for(&["serve", "--host", "0.0.0.0"]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080");
        assert!(config_for(&["serve", "--slow-consumer", "wait"]).is_err());
    }

    #[test]
    fn address_flags_replace_their_part_of_the_configured_address() {
        let listen = |argv: &[&str]| config_for(argv).map(|c| c.listen);
        assert_eq!(
            listen(&["serve", "--port", "9000"]).unwrap(),
            "127.0.0.1:9000"
        );
        assert_eq!(listen(&["serve", "--host", "::1"]).unwrap(), "[::1]:8080");
        assert_eq!(
            listen(&["serve", "--host", "localhost", "--port", "0"]).unwrap(),
            "localhost:0"
        );
        assert_eq!(
            listen(&["serve", "--listen", "[::1]:7000"]).unwrap(),
            "[::1]:7000"
        );
        // Over a configured address: only the part given changes.
        let dir = std::env::temp_dir().join(format!("tidewire-serve-addr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("listen.toml");
        std::fs::write(&file, "listen = \"0.0.0.0:7000\"\n").unwrap();
        let file = file.to_str().unwrap();
        assert_eq!(
            listen(&["serve", "--config", file]).unwrap(),
            "0.0.0.0:7000"
        );
        assert_eq!(
            listen(&["serve", "--config", file, "--port", "7001"]).unwrap(),
            "0.0.0.0:7001"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        // --listen is the whole address: not with its parts, and HOST:PORT.
        for argv in [
            &["serve", "--listen", "127.0.0.1:1", "--port", "2"][..],
            &["serve", "--listen", "127.0.0.1:1", "--host", "::1"],
            &["serve", "--listen", "8080"],
            &["serve", "--listen", "::1:8080"],
            &["serve", "--port", "65536"],
        ] {
            assert!(listen(argv).is_err(), "{argv:?}");
        }
    }
}
