//! `tidewire echo`: an echo server, and the page that talks to it.

use std::net::SocketAddr;

use clap::Args;
use tidewire::http::StatusCode;
use tidewire::proto::handshake::{http_response, is_upgrade_request};
use tidewire::{
    accept_request, read_request, Accept, Config, DeflateConfig, Message, ServerConfig,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

/// The tutorial's browser page, served at `/`.
const ECHO_PAGE: &str = include_str!("../../../examples/echo.html");

#[derive(Args, Debug, Clone)]
pub struct EchoArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 9001)]
    port: u16,
    /// Text message sent to every client when it connects.
    #[arg(long)]
    welcome: Option<String>,
    /// Prepended to every echoed text message.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Don't offer permessage-deflate compression.
    #[arg(long)]
    no_deflate: bool,
    /// Largest message accepted, in bytes (1009 beyond it).
    #[arg(long, default_value_t = 64 << 20)]
    max_message_size: usize,
    /// Largest frame accepted, in bytes (1009 beyond it).
    #[arg(long, default_value_t = 16 << 20)]
    max_frame_size: usize,
}

pub async fn run(args: EchoArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind((args.host.as_str(), args.port)).await?;
    let addr = listener.local_addr()?;
    let config = ServerConfig {
        protocol: Config {
            max_message_size: args.max_message_size,
            max_frame_size: args.max_frame_size.min(args.max_message_size),
            deflate: (!args.no_deflate).then(DeflateConfig::default),
            ..Config::default()
        },
        ..ServerConfig::default()
    };
    // Scripts wait for this line: it says the port is open.
    println!("tidewire echo listening on ws://{addr}/ (browser page: http://{addr}/)");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (config, args) = (config.clone(), args.clone());
        tokio::spawn(async move {
            if let Err(e) = serve(stream, peer, config, &args).await {
                debug!(%peer, "connection ended: {e}");
            }
        });
    }
}

async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    config: ServerConfig,
    args: &EchoArgs,
) -> anyhow::Result<()> {
    let (request, leftover) = read_request(&mut stream, &config).await?;
    if !is_upgrade_request(&request) {
        let response = match request.uri().path() {
            "/" | "/index.html" => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    ECHO_PAGE.len()
                );
                [head.as_bytes(), ECHO_PAGE.as_bytes()].concat()
            }
            "/health" => http_response(StatusCode::OK, "", "ok"),
            _ => http_response(
                StatusCode::NOT_FOUND,
                "",
                "not found; WebSocket clients connect to any path",
            ),
        };
        stream.write_all(&response).await?;
        stream.shutdown().await?;
        return Ok(());
    }
    let mut ws = accept_request(
        stream,
        request,
        &leftover,
        config,
        |_| Ok(Accept::default()),
    )
    .await?;
    info!(%peer, deflate = ws.connection().deflate_params().is_some(), "client connected");
    if let Some(welcome) = &args.welcome {
        ws.send_text(welcome.clone()).await?;
    }
    while let Some(msg) = ws.recv().await {
        match msg {
            Ok(Message::Text(text)) if args.prefix.is_empty() => {
                ws.send(Message::Text(text)).await?
            }
            Ok(Message::Text(text)) => ws.send_text(format!("{}{text}", args.prefix)).await?,
            Ok(msg @ Message::Binary(_)) => ws.send(msg).await?,
            Ok(Message::Close(frame)) => {
                let (code, reason) = frame
                    .map(|f| (f.code.0, f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                info!(%peer, code, reason, "client disconnected");
            }
            Ok(_) => {}
            Err(e) => {
                info!(%peer, "connection failed: {e}");
                break;
            }
        }
    }
    Ok(())
}
