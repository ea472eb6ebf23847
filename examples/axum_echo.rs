//! tidewire WebSockets mounted in an axum app: `/ws` echoes every message
//! (with permessage-deflate, subprotocol `echo` when offered), `/` stays a
//! plain HTTP route.
//!
//! ```text
//! cargo run -p tidewire --features axum --example axum_echo   # 127.0.0.1:8080
//! tidewire connect ws://127.0.0.1:8080/ws
//! ```

use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tidewire::axum::WebSocketUpgrade;
use tidewire::{DeflateConfig, Message, ServerConfig};

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    let mut config = ServerConfig::default();
    config.protocol.deflate = Some(DeflateConfig::default());
    upgrade
        .protocols(["echo"])
        .config(config)
        .on_upgrade(|mut ws| async move {
            while let Some(msg) = ws.recv().await {
                match msg {
                    Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                        if ws.send(m).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !e.is_disconnect() {
                            eprintln!("connection failed: {e}");
                        }
                        break;
                    }
                }
            }
        })
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let app = Router::new()
        .route(
            "/",
            get(|| async { "tidewire in axum: WebSockets on /ws\n" }),
        )
        .route("/ws", get(ws));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "listening on http://{0}/ and ws://{0}/ws",
        listener.local_addr()?
    );
    axum::serve(listener, app).await
}
