//! Server flags shared by `tidewire echo` and `tidewire serve`: the listen
//! address and every policy of the server layer, with safe defaults.
//!
//! The defaults written here are `echo`'s; `serve` shows and applies its
//! configuration's instead (`serve::with_hub_defaults`), and applies a flag
//! only when it is given on the command line, over its configuration.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use tidewire::tls::TlsAcceptor;
use tidewire::{
    Config, DeflateConfig, IoOptions, Limits, OriginPolicy, QueueLimits, ServerBuilder,
    ServerConfig, SlowConsumer,
};

/// Plain numbers are seconds; otherwise "500ms", "10s", "2m", "1h".
pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    tidewire_hub::config::parse_duration(s).map_err(|e| e.to_string())
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

/// Whether the flag `id` was given on the command line (not defaulted).
pub(crate) fn given(matches: Option<&ArgMatches>, id: &str) -> bool {
    matches.is_some_and(|m| m.value_source(id) == Some(ValueSource::CommandLine))
}

/// `HOST:PORT` (`[::1]:PORT` for IPv6) split into the host, without
/// brackets, and the port.
pub(crate) fn split_address(address: &str) -> Result<(String, u16), String> {
    let form = || format!("{address:?} is not HOST:PORT (e.g. 127.0.0.1:8080 or [::1]:8080)");
    let (host, port) = address.rsplit_once(':').ok_or_else(form)?;
    let port = port.parse::<u16>().map_err(|_| form())?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner.strip_suffix(']').ok_or_else(form)?,
        None if host.contains(':') => return Err(form()),
        None => host,
    };
    if host.is_empty() {
        return Err(form());
    }
    Ok((host.to_owned(), port))
}

/// `host` and `port` as one `HOST:PORT` (IPv6 addresses in brackets).
pub(crate) fn join_address(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A `--listen` value: checked here so that a typo is a usage error.
fn listen_address(s: &str) -> Result<String, String> {
    split_address(s).map(|_| s.to_owned())
}

#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on, HOST:PORT ([::1]:PORT for IPv6; port 0 picks
    /// a free one). Or give its parts: --host, --port.
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:9001",
        value_parser = listen_address,
        conflicts_with_all = ["host", "port"]
    )]
    pub listen: String,
    /// Host (name or IP address) to listen on; the port stays.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one); the host stays.
    #[arg(long, default_value_t = 9001)]
    pub port: u16,
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

/// Where a server's TLS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// Plain ws:// and http://.
    None,
    /// PEM files.
    Files { cert: PathBuf, key: PathBuf },
    /// A certificate generated at start.
    SelfSigned,
}

/// What the server flags of `echo` say, resolved: everything the server is
/// built from (tests compare it, so defaults shown and applied agree).
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// `HOST:PORT` to listen on.
    pub address: String,
    pub config: ServerConfig,
    pub limits: Limits,
    pub shutdown_timeout: Duration,
    pub allow_origins: Vec<String>,
    pub tls: TlsSource,
}

impl ServerArgs {
    /// The settings these flags describe; `matches` (of the command) tell
    /// whether `--listen` or `--host`/`--port` were given.
    pub fn settings(&self, max_frame_size: usize, matches: Option<&ArgMatches>) -> ServerSettings {
        let address = if given(matches, "listen") {
            self.listen.clone()
        } else {
            join_address(&self.host, self.port)
        };
        let config = ServerConfig {
            protocol: Config {
                max_message_size: self.max_message_size,
                max_frame_size: max_frame_size.min(self.max_message_size),
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
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => TlsSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ if self.tls_self_signed => TlsSource::SelfSigned,
            _ => TlsSource::None,
        };
        ServerSettings {
            address,
            config,
            limits: Limits {
                max_connections: self.max_connections,
                max_connections_per_ip: self.max_connections_per_ip,
            },
            shutdown_timeout: self.shutdown_timeout,
            allow_origins: self.allow_origins.clone(),
            tls,
        }
    }
}

impl ServerSettings {
    /// The server builder these settings describe, and a note for the
    /// operator (where a self-signed certificate went).
    pub fn builder(&self, port: u16) -> anyhow::Result<(ServerBuilder, Option<String>)> {
        let mut builder = tidewire::Server::builder()
            .config(self.config.clone())
            .limits(self.limits)
            .shutdown_timeout(self.shutdown_timeout);
        if !self.allow_origins.is_empty() {
            builder = builder.origins(OriginPolicy::allow(self.allow_origins.clone()));
        }
        let mut note = None;
        match &self.tls {
            TlsSource::None => {}
            TlsSource::Files { cert, key } => {
                builder = builder.tls(TlsAcceptor::from_pem_files(cert, key)?);
            }
            TlsSource::SelfSigned => {
                let (acceptor, message) = self_signed(&self.address, port)?;
                note = Some(message);
                builder = builder.tls(acceptor);
            }
        }
        Ok((builder, note))
    }

    pub fn is_tls(&self) -> bool {
        self.tls != TlsSource::None
    }
}

/// A development certificate for localhost and the host of `address`,
/// written to the temp dir; returns the acceptor and where the PEM went.
pub fn self_signed(address: &str, port: u16) -> anyhow::Result<(TlsAcceptor, String)> {
    let mut names = vec![
        "localhost".to_string(),
        Ipv4Addr::LOCALHOST.to_string(),
        Ipv6Addr::LOCALHOST.to_string(),
    ];
    let (host, _) = split_address(address).map_err(anyhow::Error::msg)?;
    let host = host.parse::<IpAddr>().map_or(host, |ip| ip.to_string());
    let unspecified = host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified());
    if !unspecified && !names.contains(&host) {
        names.push(host);
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let (acceptor, pem) = TlsAcceptor::self_signed(&names)?;
    let path = std::env::temp_dir().join(format!("tidewire-self-signed-{port}.pem"));
    std::fs::write(&path, &pem.cert_pem).with_context(|| format!("writing {}", path.display()))?;
    let message = format!(
        "self-signed certificate for {} written to {} (clients: --ca-file {})",
        names.join(", "),
        path.display(),
        path.display()
    );
    Ok((acceptor, message))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split_and_join_with_ipv6_in_brackets() {
        for (text, host, port) in [
            ("127.0.0.1:8080", "127.0.0.1", 8080),
            ("localhost:0", "localhost", 0),
            ("[::1]:9001", "::1", 9001),
            ("0.0.0.0:65535", "0.0.0.0", 65535),
        ] {
            assert_eq!(split_address(text), Ok((host.to_owned(), port)), "{text}");
            assert_eq!(join_address(host, port), text);
        }
        for bad in [
            "8080",
            ":8080",
            "host:",
            "host:port",
            "::1:8080",
            "[::1:80",
            "h:70000",
        ] {
            let err = split_address(bad).unwrap_err();
            assert!(err.contains("HOST:PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_out_of_range_are_errors_not_panics() {
        assert_eq!(duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(optional_duration("off"), Ok(Duration::ZERO));
        for bad in ["-1", "inf", "NaN", "1e30", "soon"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
    }
}
