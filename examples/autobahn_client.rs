//! The Autobahn|Testsuite client: runs every case of a `fuzzingserver`.
//!
//! Reads `AUTOBAHN_URL` (default `ws://127.0.0.1:9001`) and `AUTOBAHN_AGENT`
//! (default `tidewire`), asks for the case count, echoes every message of
//! every case with permessage-deflate offered, then updates the reports.
//!
//! ```text
//! cargo run --release -p tidewire --example autobahn_client
//! ```

use tidewire::{ClientBuilder, Config, DeflateConfig, Message};

fn client(url: String) -> ClientBuilder {
    ClientBuilder::new(url).config(Config {
        max_frame_size: 64 << 20,
        max_message_size: 64 << 20,
        deflate: Some(DeflateConfig::default()),
        ..Config::default()
    })
}

async fn echo_case(url: String) -> Result<(), tidewire::Error> {
    let (mut ws, _) = client(url).connect().await?;
    while let Some(msg) = ws.recv().await {
        match msg? {
            // The server may close while we echo; a failed send is then
            // expected, and the next recv reports how the connection ended.
            msg @ (Message::Text(_) | Message::Binary(_)) => {
                let _ = ws.send(msg).await;
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let base = std::env::var("AUTOBAHN_URL").unwrap_or_else(|_| "ws://127.0.0.1:9001".into());
    let agent = std::env::var("AUTOBAHN_AGENT").unwrap_or_else(|_| "tidewire".into());

    let (mut ws, _) = client(format!("{base}/getCaseCount")).connect().await?;
    let count: u32 = match ws.recv().await {
        Some(Ok(Message::Text(text))) => text.trim().parse()?,
        other => return Err(format!("expected the case count, got {other:?}").into()),
    };
    while ws.recv().await.is_some() {}
    eprintln!("autobahn client: {count} cases, agent {agent}");

    for case in 1..=count {
        let url = format!("{base}/runCase?case={case}&agent={agent}");
        if let Err(e) = echo_case(url).await {
            eprintln!("case {case}: {e}");
        }
    }

    let (mut ws, _) = client(format!("{base}/updateReports?agent={agent}"))
        .connect()
        .await?;
    while ws.recv().await.is_some() {}
    eprintln!("autobahn client: reports updated");
    Ok(())
}
