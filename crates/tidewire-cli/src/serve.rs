//! `tidewire serve`: the real-time hub.
//!
//! Configuration precedence: flags given on the command line, then
//! `TIDEWIRE_*` variables, then the TOML file (`--config`, or
//! `tidewire.toml` in the current folder), then the embedded defaults. The
//! server flags shared with `echo` apply only when given explicitly, so a
//! flag's default never overrides the file.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use tidewire::tls::TlsAcceptor;
use tidewire::{CancellationToken, SlowConsumer};
use tidewire_hub::config::SlowConsumerPolicy;
use tidewire_hub::{Config, Hub, MemoryEngine};
use tokio::net::TcpListener;
use tracing::info;

use crate::server_args::{shutdown_signal, ServerArgs};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:8080, or `listen` in the config].
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Configuration file [default: tidewire.toml in the current folder, if present].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Key for the HTTP API [default: api.key, TIDEWIRE_API_KEY, or a random key printed at start].
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// HS256 secret for connection and subscription tokens (token.hmac_secret).
    #[arg(long, value_name = "SECRET")]
    token_secret: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
}

fn given(matches: Option<&ArgMatches>, id: &str) -> bool {
    matches.is_some_and(|m| m.value_source(id) == Some(ValueSource::CommandLine))
}

/// The configuration: defaults < file < environment < flags.
fn configuration(args: &ServeArgs, matches: Option<&ArgMatches>) -> anyhow::Result<Config> {
    let cwd = std::env::current_dir()?;
    let (mut config, file) = Config::load(args.config.as_deref(), &cwd, |name| {
        std::env::var(name).ok()
    })?;
    if let Some(file) = file {
        info!(file = %file.display(), "configuration file");
    }
    if let Some(listen) = &args.listen {
        config.listen = listen.clone();
    }
    if let Some(key) = &args.api_key {
        config.api.key = Some(key.clone());
    }
    if let Some(secret) = &args.token_secret {
        config.token.hmac_secret = Some(secret.clone());
    }
    let s = &args.server;
    let server = &mut config.server;
    if given(matches, "host") {
        let port = config
            .listen
            .rsplit_once(':')
            .map_or("8080", |(_, port)| port)
            .to_owned();
        config.listen = if s.host.contains(':') {
            format!("[{}]:{port}", s.host)
        } else {
            format!("{}:{port}", s.host)
        };
    }
    if given(matches, "tls_cert") {
        server.tls_cert = s.tls_cert.clone();
        server.tls_key = s.tls_key.clone();
    }
    if given(matches, "allow_origins") {
        server.allowed_origins = s.allow_origins.clone();
    }
    if given(matches, "max_connections") {
        server.max_connections = s.max_connections;
    }
    if given(matches, "max_connections_per_ip") {
        server.max_connections_per_ip = s.max_connections_per_ip;
    }
    if given(matches, "handshake_timeout") {
        server.handshake_timeout = s.handshake_timeout;
    }
    if given(matches, "idle_timeout") {
        server.idle_timeout = s.idle_timeout;
    }
    if given(matches, "ping_interval") {
        server.ping_interval = s.ping_interval;
    }
    if given(matches, "pong_timeout") {
        server.pong_timeout = s.pong_timeout;
    }
    if given(matches, "no_deflate") {
        server.deflate = false;
    }
    if given(matches, "deflate_no_context_takeover") {
        server.deflate = true;
        server.deflate_no_context_takeover = true;
    }
    if given(matches, "shutdown_timeout") {
        server.shutdown_timeout = s.shutdown_timeout;
    }
    let client = &mut config.client;
    if given(matches, "max_message_size") {
        client.max_message_size = s.max_message_size;
    }
    if given(matches, "send_queue") {
        client.queue_messages = s.send_queue.max(1);
    }
    if given(matches, "send_queue_bytes") {
        client.queue_bytes = s.send_queue_bytes;
    }
    if given(matches, "slow_consumer") {
        client.slow_consumer = match s.slow_consumer {
            SlowConsumer::Drop => SlowConsumerPolicy::Drop,
            SlowConsumer::Close(_) => SlowConsumerPolicy::Close,
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
    let mut names = vec![
        "localhost".to_string(),
        Ipv4Addr::LOCALHOST.to_string(),
        Ipv6Addr::LOCALHOST.to_string(),
    ];
    if let Some((host, _)) = config.listen.rsplit_once(':') {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let unspecified = host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified());
        if !unspecified && !names.iter().any(|n| n == host) {
            names.push(host.to_string());
        }
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (acceptor, pem) = TlsAcceptor::self_signed(&names)?;
    let path = std::env::temp_dir().join(format!("tidewire-self-signed-{port}.pem"));
    std::fs::write(&path, &pem.cert_pem).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "self-signed certificate for {} written to {} (clients: --ca-file {})",
        names.join(", "),
        path.display(),
        path.display()
    );
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
    let addr: SocketAddr = tokio::net::lookup_host(config.listen.as_str())
        .await
        .with_context(|| format!("listen address {:?}", config.listen))?
        .next()
        .with_context(|| format!("listen address {:?} resolves to nothing", config.listen))?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    let addr = listener.local_addr()?;
    let tls = tls_acceptor(&args, &config, addr.port())?;
    let (http, ws) = if tls.is_some() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    let hub = Hub::new(config, Arc::new(MemoryEngine::new())).map_err(anyhow::Error::msg)?;
    if generated_key {
        // Safe by default: nobody can use /api without this key, and the
        // operator who started the server can.
        println!("api key (generated for this run; set api.key or TIDEWIRE_API_KEY to choose one): {api_key}");
    }
    let signal = shutdown_signal().context("installing the shutdown signal handlers")?;
    // Scripts wait for this line: it says the port is open (and, from here
    // on, that SIGTERM shuts down gracefully).
    println!(
        "tidewire serve listening on {http}://{addr}/ (WebSocket: {ws}://{addr}{})",
        tidewire_hub::server::WEBSOCKET_PATH
    );
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        signal.await;
        info!("shutdown requested");
        token.cancel();
    });
    tidewire_hub::server::serve(hub, listener, &api_key, tls, shutdown).await?;
    info!("stopped");
    Ok(())
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
        let matches = Cli::command().try_get_matches_from(argv)?;
        let cli = Cli::from_arg_matches(&matches)?;
        configuration(&cli.serve, Some(&matches))
    }

    #[test]
    fn flag_defaults_do_not_override_the_configuration() {
        let c = config_for(&["serve"]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080");
        // ServerArgs' own defaults (64 MiB messages, wait) stay out.
        assert_eq!(c.client.max_message_size, 64 * 1024);
        assert_eq!(c.client.slow_consumer, SlowConsumerPolicy::Close);
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
        assert_eq!(c.client.slow_consumer, SlowConsumerPolicy::Drop);
        assert_eq!(c.api.key.as_deref(), Some("k"));
        let c = config_for(&["serve", "--host", "0.0.0.0"]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080");
        assert!(config_for(&["serve", "--slow-consumer", "wait"]).is_err());
    }
}
