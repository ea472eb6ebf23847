//! Interoperability with independent implementations: Python `websockets`
//! and Node `ws` as clients of our server and as servers for our client.
//!
//! Runs with `--features interop-tests` (scripts/test enables it after
//! scripts/install-deps installed the peers in tests/interop). A missing
//! peer is a failure, not a skip.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tidewire::{
    accept_with, Accept, ClientBuilder, CloseFrame, Config, DeflateConfig, Message, OpCode,
    ServerConfig,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

const LIMIT: Duration = Duration::from_secs(60);

fn repo_root() -> PathBuf {
    std::env::var_os("TIDEWIRE_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

fn python() -> PathBuf {
    std::env::var_os("TIDEWIRE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/python"))
}

fn node() -> PathBuf {
    std::env::var_os("TIDEWIRE_NODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "node".into())
}

#[derive(Clone, Copy, Debug)]
enum Peer {
    Python,
    Node,
}

impl Peer {
    fn command(self, script: &str) -> Command {
        let dir = repo_root().join("tests/interop");
        let mut cmd = match self {
            Peer::Python => Command::new(python()),
            Peer::Node => Command::new(node()),
        };
        cmd.arg(dir.join(script))
            .current_dir(&dir)
            .kill_on_drop(true);
        cmd
    }

    fn server_script(self) -> &'static str {
        match self {
            Peer::Python => "py_echo_server.py",
            Peer::Node => "node_echo_server.js",
        }
    }

    fn client_script(self) -> &'static str {
        match self {
            Peer::Python => "py_client.py",
            Peer::Node => "node_client.js",
        }
    }
}

/// Starts a peer echo server and returns it with its URL.
async fn peer_server(peer: Peer, args: &[&str]) -> (Child, String) {
    let mut child = peer
        .command(peer.server_script())
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start the {peer:?} echo server (run scripts/install-deps): {e}")
        });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(port) = line.strip_prefix("READY ") {
                return port.trim().to_string();
            }
        }
        panic!("{peer:?} echo server exited before READY");
    })
    .await
    .expect("peer server did not start in time");
    (child, format!("ws://127.0.0.1:{port}/"))
}

fn deflate() -> Config {
    Config {
        deflate: Some(DeflateConfig::default()),
        ..Config::default()
    }
}

/// Our echo server, for one connection per call of the peer client.
async fn our_echo_server() -> (tokio::task::JoinHandle<()>, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let config = ServerConfig {
                    protocol: deflate(),
                    ..ServerConfig::default()
                };
                let mut ws = accept_with(stream, config, |_| Ok(Accept::default()))
                    .await
                    .unwrap();
                while let Some(Ok(msg)) = ws.recv().await {
                    if msg.is_data() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    (task, url)
}

async fn run_peer_client(peer: Peer) {
    let (server, url) = our_echo_server().await;
    let output = tokio::time::timeout(
        LIMIT,
        peer.command(peer.client_script())
            .args([url.as_str(), "--require-deflate"])
            .output(),
    )
    .await
    .expect("peer client timed out")
    .unwrap_or_else(|e| panic!("cannot start the {peer:?} client (run scripts/install-deps): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}{stderr}");
    assert!(
        output.status.success(),
        "{peer:?} client failed:\n{stdout}\n{stderr}"
    );
    for check in [
        "connect",
        "text",
        "large",
        "binary",
        "fragmented",
        "ping",
        "close",
    ] {
        assert!(
            stdout.contains(&format!("PASS {check}")),
            "{peer:?}: check {check} did not pass:\n{stdout}"
        );
    }
    server.abort();
}

#[tokio::test]
async fn python_websockets_client_against_our_server() {
    run_peer_client(Peer::Python).await;
}

#[tokio::test]
async fn node_ws_client_against_our_server() {
    run_peer_client(Peer::Node).await;
}

async fn recv(ws: &mut tidewire::WebSocket<tidewire::ClientStream>) -> Message {
    tokio::time::timeout(LIMIT, ws.recv())
        .await
        .expect("no message in time")
        .expect("connection ended")
        .expect("connection failed")
}

async fn our_client_against(peer: Peer) {
    let (_server, url) = peer_server(peer, &[]).await;
    let (mut ws, response) = ClientBuilder::new(&url)
        .config(deflate())
        .connect()
        .await
        .unwrap();
    let extensions = response
        .headers()
        .get("sec-websocket-extensions")
        .expect("deflate agreed");
    assert!(extensions
        .to_str()
        .unwrap()
        .starts_with("permessage-deflate"));

    ws.send_text("hello").await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("hello"));

    let bytes: Vec<u8> = (0..=255).collect();
    ws.send_binary(bytes.clone()).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::binary(bytes));

    let large = "tidewire interop ".repeat(64 * 1024);
    ws.send_text(large.clone()).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text(large));

    ws.send_fragment(OpCode::Text, "frag".as_bytes(), false)
        .await
        .unwrap();
    ws.send_fragment(OpCode::Continuation, "men".as_bytes(), false)
        .await
        .unwrap();
    ws.send_fragment(OpCode::Continuation, "ted €".as_bytes(), true)
        .await
        .unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("fragmented €"));

    ws.ping("ping payload").await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::Pong("ping payload".into()));

    let reply = tokio::time::timeout(LIMIT, ws.close(4000u16, "done"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.map(|f| f.code.0), Some(4000));
    assert!(ws.recv().await.is_none());
}

#[tokio::test]
async fn our_client_against_python_websockets_server() {
    our_client_against(Peer::Python).await;
}

#[tokio::test]
async fn our_client_against_node_ws_server() {
    our_client_against(Peer::Node).await;
}

async fn server_close_code_reaches_our_client(peer: Peer) {
    let (_server, url) = peer_server(peer, &["--close-after", "2"]).await;
    let (mut ws, _) = ClientBuilder::new(&url)
        .config(deflate())
        .connect()
        .await
        .unwrap();
    for text in ["one", "two"] {
        ws.send_text(text).await.unwrap();
        assert_eq!(recv(&mut ws).await, Message::text(text));
    }
    assert_eq!(
        recv(&mut ws).await,
        Message::Close(Some(CloseFrame::new(4001, "bye")))
    );
    assert!(tokio::time::timeout(LIMIT, ws.recv())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn python_websockets_server_close_code_reaches_our_client() {
    server_close_code_reaches_our_client(Peer::Python).await;
}

#[tokio::test]
async fn node_ws_server_close_code_reaches_our_client() {
    server_close_code_reaches_our_client(Peer::Node).await;
}
