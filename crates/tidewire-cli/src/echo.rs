//! `tidewire echo`: an echo server, and the page that talks to it.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tidewire::http::{Response, StatusCode};
use tokio::net::TcpListener;
use tracing::info;

use crate::server_args::{shutdown_signal, ServerArgs};

/// The tutorial's browser page, served at `/`.
const ECHO_PAGE: &str = include_str!("../../../examples/echo.html");

#[derive(Args, Debug, Clone)]
pub struct EchoArgs {
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 9001)]
    port: u16,
    /// Text message sent to every client when it connects.
    #[arg(long)]
    welcome: Option<String>,
    /// Prepended to every echo. With a prefix, every answer is text: a
    /// binary message comes back as the prefix plus its bytes decoded as
    /// UTF-8 (invalid ones become U+FFFD), like the tutorial's
    /// ws.send(`Echo: ${message}`). Without one, messages keep their type.
    #[arg(long, default_value = "")]
    prefix: String,
    #[command(flatten)]
    server: ServerArgs,
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

pub async fn run(args: EchoArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind((args.server.host.as_str(), args.port)).await?;
    let addr = listener.local_addr()?;
    let (builder, note) = args.server.builder(addr.port())?;
    let server = builder.http(|req| async move { page(req) }).build();
    let stats = server.stats();
    let (ws, http) = if args.server.is_tls() {
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
    let welcome: Option<Arc<str>> = args.welcome.map(Into::into);
    let prefix: Arc<str> = args.prefix.into();
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
