//! `tidewire echo`: an echo server, and the page that talks to it.

use std::sync::Arc;

use anyhow::Context;
use clap::{ArgMatches, Args};
use tidewire::event_loop::Incoming;
use tidewire::http::{Request, Response, StatusCode};
use tidewire::Message;
use tracing::info;

use crate::server_args::{shutdown_signal, ServerArgs, ServerSettings};

/// The tutorial's browser page, served at `/`.
const ECHO_PAGE: &str = include_str!("../../../examples/echo.html");

#[derive(Args, Debug, Clone)]
pub struct EchoArgs {
    /// Text message sent to every client when it connects.
    #[arg(long)]
    welcome: Option<String>,
    /// Prepended to every echo. With a prefix, every answer is text: a
    /// binary message comes back as the prefix plus its bytes decoded as
    /// UTF-8 (invalid ones become U+FFFD), like the tutorial's
    /// ws.send(`Echo: ${message}`). Without one, messages keep their type.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Largest frame accepted, in bytes (beyond: close 1009; at most
    /// --max-message-size).
    #[arg(long, default_value_t = 16 << 20)]
    max_frame_size: usize,
    /// Serve on the epoll event loop (one thread per core, connections in
    /// a slab) rather than tokio tasks: ws:// only, a slow reader is not
    /// read until it drains (--slow-consumer wait). The default without
    /// TLS and with --slow-consumer wait.
    #[arg(long, conflicts_with = "tokio")]
    event_loop: bool,
    /// Serve on tokio, a task per connection (the default with TLS or
    /// another --slow-consumer policy).
    #[arg(long)]
    tokio: bool,
    /// Threads of the event loop (0: one per CPU this process may use).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[command(flatten)]
    server: ServerArgs,
}

/// Everything `tidewire echo` runs with, resolved from its flags.
#[derive(Debug, Clone)]
pub struct EchoSettings {
    pub server: ServerSettings,
    pub welcome: Option<String>,
    pub prefix: String,
    /// On the event loop (`Some(true)`), on tokio (`Some(false)`), or on
    /// the event loop when it can serve the settings (`None`); with
    /// `threads` threads (0: one per CPU).
    pub event_loop: Option<bool>,
    pub threads: usize,
}

impl EchoArgs {
    /// The settings the flags describe; `matches` are the command's (they
    /// tell which address flags were given).
    pub fn settings(&self, matches: Option<&ArgMatches>) -> EchoSettings {
        EchoSettings {
            server: self.server.settings(self.max_frame_size, matches),
            welcome: self.welcome.clone(),
            prefix: self.prefix.clone(),
            event_loop: match (self.event_loop, self.tokio) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            },
            threads: self.threads,
        }
    }
}

fn page(request: tidewire::http::Request<()>) -> Response<bytes::Bytes> {
    let (status, kind, body) = match request.uri().path() {
        "/" | "/index.html" => (StatusCode::OK, "text/html; charset=utf-8", ECHO_PAGE),
        "/health" => (StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; WebSocket clients connect to any path\n",
        ),
    };
    Response::builder()
        .status(status)
        .header("Content-Type", kind)
        .body(bytes::Bytes::from_static(body.as_bytes()))
        .expect("valid response")
}

pub async fn run(args: EchoArgs, matches: Option<ArgMatches>) -> anyhow::Result<()> {
    let settings = args.settings(matches.as_ref());
    // What only tokio serves: TLS, a slow reader's messages dropped or
    // the reader closed.
    let loop_can_serve = !settings.server.is_tls()
        && settings.server.config.io.send_queue.policy == tidewire::SlowConsumer::Wait;
    if settings.event_loop.unwrap_or(loop_can_serve) {
        let threads = settings.threads;
        return run_event_loop(settings, threads).await;
    }
    if settings.threads != 0 {
        anyhow::bail!(
            "--threads is for the event loop (not with --tokio, TLS or --slow-consumer drop/close)"
        );
    }
    crate::listener::raise_open_file_limit();
    let listener = crate::listener::bind_listener(&settings.server.address).await?;
    let addr = listener.local_addr()?;
    let (builder, note) = settings.server.builder(addr.port())?;
    let server = builder.http(|req| async move { page(req) }).build();
    let stats = server.stats();
    let (ws, http) = if settings.server.is_tls() {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    if let Some(note) = note {
        eprintln!("{note}");
    }
    let signal = shutdown_signal().context("installing the shutdown signal handlers")?;
    // Scripts wait for this line: it says the port is open (and, from here
    // on, that SIGTERM shuts down gracefully).
    println!("tidewire echo listening on {ws}://{addr}/ (browser page: {http}://{addr}/; tokio)");
    let token = server.shutdown_token();
    tokio::spawn(async move {
        signal.await;
        info!("shutdown requested");
        token.cancel();
    });
    let welcome: Option<Arc<str>> = settings.welcome.map(Into::into);
    let prefix: Arc<str> = settings.prefix.into();
    server
        .serve(listener, move |session| {
            tidewire::echo(session, welcome.clone(), prefix.clone(), stats.clone())
        })
        .await?;
    let stats = server.stats();
    info!(
        opened = stats.opened.load(std::sync::atomic::Ordering::Relaxed),
        rejections = ?stats.rejections(),
        closes = ?stats.closes(),
        "stopped"
    );
    Ok(())
}

/// The echo as an event-loop handler (see `tidewire::event_loop`).
struct LoopEcho {
    welcome: Option<Arc<str>>,
    prefix: Arc<str>,
}

impl tidewire::event_loop::Handler for LoopEcho {
    type State = ();

    fn open(&mut self, socket: &mut tidewire::event_loop::Socket<'_>, _: &Request<()>) {
        if let Some(welcome) = &self.welcome {
            socket.send_text(welcome);
        }
    }

    fn message(
        &mut self,
        socket: &mut tidewire::event_loop::Socket<'_>,
        _: &mut (),
        message: Incoming<'_>,
    ) {
        match message {
            Incoming::Text(text) if !self.prefix.is_empty() => {
                socket.send_text(&format!("{}{text}", self.prefix));
            }
            Incoming::Binary(data) if !self.prefix.is_empty() => {
                let text = String::from_utf8_lossy(data);
                socket.send_text(&format!("{}{text}", self.prefix));
            }
            Incoming::Text(text) => socket.send_text(text),
            Incoming::Binary(data) => socket.send_binary(data),
            _ => {}
        }
    }

    fn message_owned(
        &mut self,
        socket: &mut tidewire::event_loop::Socket<'_>,
        state: &mut (),
        message: Message,
    ) {
        match message {
            // Large ones go back by reference, not copied.
            m @ (Message::Text(_) | Message::Binary(_)) if self.prefix.is_empty() => socket.send(m),
            Message::Text(text) => self.message(socket, state, Incoming::Text(text.as_str())),
            Message::Binary(data) => self.message(socket, state, Incoming::Binary(&data)),
            _ => {}
        }
    }

    fn http(&mut self, request: &Request<()>) -> Option<Response<bytes::Bytes>> {
        Some(page(request.clone()))
    }
}

async fn run_event_loop(settings: EchoSettings, threads: usize) -> anyhow::Result<()> {
    let server = &settings.server;
    if server.is_tls() {
        anyhow::bail!("--event-loop serves ws:// only: leave out the TLS flags, or --event-loop");
    }
    if server.config.io.send_queue.policy != tidewire::SlowConsumer::Wait {
        anyhow::bail!(
            "--event-loop stops reading a slow reader until it drains (--slow-consumer wait)"
        );
    }
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&server.address)
        .with_context(|| format!("resolving {}", server.address))?
        .next()
        .with_context(|| format!("{} resolves to no address", server.address))?;
    crate::listener::raise_open_file_limit();
    let io = &server.config.io;
    let config = tidewire::event_loop::EventLoopConfig {
        protocol: server.config.protocol.clone(),
        threads,
        handshake_timeout: server.config.handshake_timeout,
        ping_interval: io.ping_interval,
        pong_timeout: io.pong_timeout,
        idle_timeout: io.idle_timeout,
        shutdown_timeout: server.shutdown_timeout,
        max_connections: server.limits.max_connections,
        max_connections_per_ip: server.limits.max_connections_per_ip,
        max_pending_output: io.send_queue.max_bytes,
        origins: (!server.allow_origins.is_empty())
            .then(|| tidewire::OriginPolicy::allow(server.allow_origins.clone())),
        ..tidewire::event_loop::EventLoopConfig::default()
    };
    let welcome: Option<Arc<str>> = settings.welcome.map(Into::into);
    let prefix: Arc<str> = settings.prefix.into();
    let signal = shutdown_signal().context("installing the shutdown signal handlers")?;
    let running = tidewire::event_loop::serve(addr, config, move || LoopEcho {
        welcome: welcome.clone(),
        prefix: prefix.clone(),
    })
    .with_context(|| format!("listening on {addr}"))?;
    let addr = running.local_addr();
    println!("tidewire echo listening on ws://{addr}/ (browser page: http://{addr}/; event loop)");
    let stop = running.shutdown_handle();
    tokio::spawn(async move {
        signal.await;
        info!("shutdown requested");
        stop.shutdown();
    });
    tokio::task::spawn_blocking(move || running.join()).await??;
    info!("stopped");
    Ok(())
}
