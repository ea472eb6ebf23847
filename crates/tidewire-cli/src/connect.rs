//! `tidewire connect`: an interactive client in the manner of wscat.

use clap::Args;
use tidewire::tls::TlsConnector;
use tidewire::{ClientBuilder, DeflateConfig, Message};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Args, Debug)]
pub struct ConnectArgs {
    /// Server URL, e.g. ws://127.0.0.1:9001/
    url: String,
    /// Send each stdin line as a binary message instead of text.
    #[arg(long)]
    binary: bool,
    /// Extra request header, "Name: value" (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Subprotocol to offer (repeatable).
    #[arg(short = 's', long = "protocol")]
    protocols: Vec<String>,
    /// Don't offer permessage-deflate compression.
    #[arg(long)]
    no_deflate: bool,
    /// For wss://: also trust the CA certificate(s) in this PEM file.
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// For wss://: don't verify the server's certificate (development only).
    #[arg(long, conflicts_with = "ca_file")]
    insecure: bool,
}

/// Runs the session; returns the process exit code (0 after a normal close).
pub async fn run(args: ConnectArgs) -> anyhow::Result<i32> {
    let mut builder =
        ClientBuilder::new(&args.url).deflate((!args.no_deflate).then(DeflateConfig::default));
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--header {header:?} is not \"Name: value\""))?;
        builder = builder.header(name.trim(), value.trim());
    }
    if args.insecure || args.ca_file.is_some() {
        let mut tls = TlsConnector::builder();
        if let Some(path) = &args.ca_file {
            tls = tls.add_ca_file(path)?;
        }
        if args.insecure {
            tls = tls.danger_accept_invalid_certs();
        }
        builder = builder.tls(tls.build()?);
    }
    for p in &args.protocols {
        builder = builder.protocol(p);
    }
    let (ws, _response) = builder.connect().await?;
    eprintln!(
        "Connected to {}{} (press Ctrl-D to close)",
        args.url,
        ws.protocol()
            .map(|p| format!(" with subprotocol {p}"))
            .unwrap_or_default()
    );
    let (mut reader, mut writer) = ws.split();
    let binary = args.binary;
    let input = tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let msg = if binary {
                Message::binary(line.into_bytes())
            } else {
                Message::text(line)
            };
            if writer.send(msg).await.is_err() {
                return;
            }
        }
        let _ = writer.close(1000u16, "").await;
    });
    let mut code = 1;
    while let Some(msg) = reader.recv().await {
        match msg {
            Ok(Message::Text(text)) => println!("< {text}"),
            Ok(Message::Binary(data)) => {
                println!("< [binary, {} bytes] {}", data.len(), hex(&data))
            }
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => {}
            Ok(Message::Close(frame)) => {
                let (c, reason) = frame
                    .map(|f| (f.code.0, f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                eprintln!("Disconnected (code: {c}, reason: {reason:?})");
                code = if matches!(c, 1000 | 1001 | 1005) {
                    0
                } else {
                    1
                };
            }
            Err(e) => {
                eprintln!("Disconnected (code: 1006): {e}");
                code = 1;
            }
        }
    }
    input.abort();
    Ok(code)
}

fn hex(data: &[u8]) -> String {
    const SHOWN: usize = 64;
    let mut out: String = data
        .iter()
        .take(SHOWN)
        .map(|b| format!("{b:02x}"))
        .collect();
    if data.len() > SHOWN {
        out.push('…');
    }
    out
}
