//! `tidewire echo`: an echo server, and the page that talks to it.

use std::sync::Arc;

use anyhow::Context;
use clap::{ArgMatches, Args};
use tidewire::http::{Response, StatusCode};
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
    #[command(flatten)]
    server: ServerArgs,
}

/// Everything `tidewire echo` runs with, resolved from its flags.
#[derive(Debug, Clone)]
pub struct EchoSettings {
    pub server: ServerSettings,
    pub welcome: Option<String>,
    pub prefix: String,
}

impl EchoArgs {
    /// The settings the flags describe; `matches` are the command's (they
    /// tell which address flags were given).
    pub fn settings(&self, matches: Option<&ArgMatches>) -> EchoSettings {
        EchoSettings {
            server: self.server.settings(self.max_frame_size, matches),
            welcome: self.welcome.clone(),
            prefix: self.prefix.clone(),
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
    println!("tidewire echo listening on {ws}://{addr}/ (browser page: {http}://{addr}/)");
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
