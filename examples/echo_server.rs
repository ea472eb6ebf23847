//! The classic tutorial echo server: greets every client, then echoes each
//! message back prefixed with "Echo: ". Open `examples/echo.html` in a
//! browser to talk to it.
//!
//! ```text
//! cargo run -p tidewire --example echo_server      # listens on 127.0.0.1:8080
//! ```

use tidewire::{accept_with, Accept, Message, ServerConfig};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let listener = TcpListener::bind(&addr).await?;
    println!(
        "WebSocket server is running on ws://{}",
        listener.local_addr()?
    );
    loop {
        let (stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let mut ws =
                match accept_with(stream, ServerConfig::default(), |_| Ok(Accept::default())).await
                {
                    Ok(ws) => ws,
                    Err(e) => return eprintln!("{peer}: handshake failed: {e}"),
                };
            println!("{peer}: client connected");
            if ws
                .send_text("Welcome to the WebSocket server!")
                .await
                .is_err()
            {
                return;
            }
            while let Some(msg) = ws.recv().await {
                match msg {
                    Ok(Message::Text(text)) => {
                        println!("{peer}: received: {text}");
                        if ws.send_text(format!("Echo: {text}")).await.is_err() {
                            break;
                        }
                    }
                    Ok(Message::Binary(data)) => {
                        if ws.send_binary(data).await.is_err() {
                            break;
                        }
                    }
                    Ok(Message::Close(frame)) => {
                        println!("{peer}: client disconnected ({frame:?})");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        println!("{peer}: connection error: {e}");
                        break;
                    }
                }
            }
        });
    }
}
