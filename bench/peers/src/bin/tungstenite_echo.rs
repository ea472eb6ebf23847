//! tokio-tungstenite echo server, as the crate's examples/echo-server.rs
//! writes it: `#[tokio::main]` (the multi-threaded runtime, one worker per
//! CPU it may run on: one under `taskset -c 0`), `accept_async`, then the
//! read half forwarded into the write half, text and binary messages only.
//! tungstenite answers pings itself; it has no permessage-deflate.
//! The only change: errors end the connection quietly instead of panicking.

use futures_util::{future, StreamExt, TryStreamExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port = tidewire_bench_peers::port_arg();
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("tungstenite_echo listening on ws://127.0.0.1:{port}/");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(accept_connection(stream));
            }
            // Out of file descriptors and the like: keep serving the others.
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn accept_connection(stream: TcpStream) {
    let Ok(ws_stream) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (write, read) = ws_stream.split();
    let _ = read
        .try_filter(|msg| future::ready(msg.is_text() || msg.is_binary()))
        .forward(write)
        .await;
}
