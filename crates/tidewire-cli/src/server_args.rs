//! Server flags shared by `tidewire echo` and `tidewire serve`: every
//! policy of the server layer, with safe defaults. (`serve` applies them
//! only when given on the command line, over its configuration.)

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tidewire::tls::TlsAcceptor;
use tidewire::{
    Config, DeflateConfig, IoOptions, Limits, OriginPolicy, QueueLimits, ServerBuilder,
    ServerConfig, SlowConsumer,
};

pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    // Plain numbers are seconds; otherwise "500ms", "10s", "2m", "1h".
    if let Ok(secs) = s.parse::<f64>() {
        return Ok(Duration::from_secs_f64(secs));
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// A duration where 0 (or "off") means "never".
fn optional_duration(s: &str) -> Result<Duration, String> {
    match s {
        "off" | "none" => Ok(Duration::ZERO),
        other => duration(other),
    }
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// TLS certificate chain (PEM) for wss://; needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for wss://.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve wss:// with a certificate generated at start (development only);
    /// its PEM is written next to the temp dir and its path printed, for
    /// clients' --ca-file.
    #[arg(long, conflicts_with = "tls_cert")]
    pub tls_self_signed: bool,
    /// Allowed browser origin, exact or with a wildcard subdomain
    /// (https://*.example.com); repeatable. Others get 403. Default: any.
    #[arg(long = "allow-origin", value_name = "ORIGIN")]
    pub allow_origins: Vec<String>,
    /// Most simultaneous connections (beyond: HTTP 503).
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// Most simultaneous connections per client IP (beyond: HTTP 429); 0 = no limit.
    #[arg(long, default_value_t = 0)]
    pub max_connections_per_ip: usize,
    /// Deadline for TLS plus the opening handshake (slowloris protection).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,
    /// Close connections that send no message for this long (0 = never).
    #[arg(long, default_value = "0", value_parser = optional_duration)]
    pub idle_timeout: Duration,
    /// Ping interval for keepalive (0 = off).
    #[arg(long, default_value = "30s", value_parser = optional_duration)]
    pub ping_interval: Duration,
    /// How long a peer has to answer a keepalive ping.
    #[arg(long, default_value = "20s", value_parser = duration)]
    pub pong_timeout: Duration,
    /// Largest message accepted, in bytes (beyond: close 1009).
    #[arg(long, default_value_t = 64 << 20)]
    pub max_message_size: usize,
    /// Largest frame accepted, in bytes (beyond: close 1009).
    #[arg(long, default_value_t = 16 << 20)]
    pub max_frame_size: usize,
    /// Per-connection send queue: most messages waiting.
    #[arg(long, default_value_t = 1024)]
    pub send_queue: usize,
    /// Per-connection send queue: most bytes waiting. Also bounds output
    /// the peer has not read yet: at it, the server stops reading that peer
    /// (or closes it, with --slow-consumer close).
    #[arg(long, default_value_t = 4 << 20)]
    pub send_queue_bytes: usize,
    /// When a send queue is full: wait (the sender waits), drop (the message
    /// is dropped and counted) or close (the connection is closed with 1008,
    /// also when a peer sends without reading the answers).
    #[arg(long, default_value = "wait")]
    pub slow_consumer: SlowConsumer,
    /// Don't offer permessage-deflate compression.
    #[arg(long)]
    pub no_deflate: bool,
    /// permessage-deflate without context takeover, both ways: each message
    /// is compressed on its own, so no compression memory is held between
    /// messages (about 300 KiB per active connection otherwise), at some
    /// cost in ratio.
    #[arg(long, conflicts_with = "no_deflate")]
    pub deflate_no_context_takeover: bool,
    /// How long graceful shutdown (Ctrl-C, SIGTERM) waits for closing handshakes.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub shutdown_timeout: Duration,
}

impl ServerArgs {
    /// The server builder these flags describe, and a note for the operator
    /// (where a self-signed certificate went).
    pub fn builder(&self, port: u16) -> anyhow::Result<(ServerBuilder, Option<String>)> {
        let config = ServerConfig {
            protocol: Config {
                max_message_size: self.max_message_size,
                max_frame_size: self.max_frame_size.min(self.max_message_size),
                deflate: (!self.no_deflate).then(|| DeflateConfig {
                    server_no_context_takeover: self.deflate_no_context_takeover,
                    client_no_context_takeover: self.deflate_no_context_takeover,
                    ..DeflateConfig::default()
                }),
                ..Config::default()
            },
            io: IoOptions {
                ping_interval: nonzero(self.ping_interval),
                pong_timeout: self.pong_timeout,
                idle_timeout: nonzero(self.idle_timeout),
                send_queue: QueueLimits {
                    max_messages: self.send_queue.max(1),
                    max_bytes: self.send_queue_bytes,
                    policy: self.slow_consumer,
                },
                ..IoOptions::default()
            },
            handshake_timeout: self.handshake_timeout,
        };
        let mut builder = tidewire::Server::builder()
            .config(config)
            .limits(Limits {
                max_connections: self.max_connections,
                max_connections_per_ip: self.max_connections_per_ip,
            })
            .shutdown_timeout(self.shutdown_timeout);
        if !self.allow_origins.is_empty() {
            builder = builder.origins(OriginPolicy::allow(self.allow_origins.clone()));
        }
        let mut note = None;
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            builder = builder.tls(TlsAcceptor::from_pem_files(cert, key)?);
        } else if self.tls_self_signed {
            let mut names = vec![
                "localhost".to_string(),
                Ipv4Addr::LOCALHOST.to_string(),
                Ipv6Addr::LOCALHOST.to_string(),
            ];
            let host = match self.host.parse::<IpAddr>() {
                Ok(ip) if ip.is_unspecified() => None,
                Ok(ip) => Some(ip.to_string()),
                Err(_) => Some(self.host.clone()),
            };
            if let Some(host) = host.filter(|h| !names.contains(h)) {
                names.push(host);
            }
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let (acceptor, pem) = TlsAcceptor::self_signed(&names)?;
            let path = std::env::temp_dir().join(format!("tidewire-self-signed-{port}.pem"));
            std::fs::write(&path, &pem.cert_pem)
                .with_context(|| format!("writing {}", path.display()))?;
            note = Some(format!(
                "self-signed certificate for {} written to {} (clients: --ca-file {})",
                names.join(", "),
                path.display(),
                path.display()
            ));
            builder = builder.tls(acceptor);
        }
        Ok((builder, note))
    }

    pub fn is_tls(&self) -> bool {
        self.tls_cert.is_some() || self.tls_self_signed
    }
}

/// Starts listening for Ctrl-C and SIGTERM now and returns a future that
/// resolves on the first of them.
///
/// The handlers are installed before the caller announces its port: a
/// supervisor that sends SIGTERM right after the "listening" line must get a
/// graceful shutdown, not the default action that kills the process.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        let mut ctrl_c = tokio::signal::windows::ctrl_c()?;
        Ok(async move {
            ctrl_c.recv().await;
        })
    }
}
