//! Graceful shutdown as a load balancer sees it: while `tidewire echo` and
//! `tidewire serve` drain their connections after SIGTERM, the port stays
//! open, `/health` answers 503 "shutting down" and new WebSocket upgrades
//! get 503, until the process exits.

mod common;

use std::time::{Duration, Instant};

use common::{start_echo, start_serve, LIMIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// How long the servers under test wait for closing handshakes.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

fn upgrade_request(addr: &str, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A client that completes the upgrade and then reads nothing, so it
/// never answers the server's close: the drain lasts the shutdown timeout.
async fn stalled_client(addr: &str, path: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(upgrade_request(addr, path).as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: nothing past the response head is read.
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 4096, "no end of the response head");
        tokio::time::timeout(LIMIT, tcp.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

/// Sends one request on a new connection; the status code and the body.
/// Panics when the connection is refused.
async fn exchange(addr: &str, request: &str) -> (u16, String) {
    tokio::time::timeout(LIMIT, async {
        let mut tcp = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        tcp.read_to_end(&mut response).await.unwrap();
        let response = String::from_utf8_lossy(&response).into_owned();
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, body)| body.to_owned());
        (status, body)
    })
    .await
    .expect("no answer in time")
}

fn health_request(addr: &str) -> String {
    format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
}

/// SIGTERM with a stalled client connected; checks what the port answers
/// during the drain and that the process then exits.
async fn drain_answers_503_until_exit(mut child: Child, addr: &str, ws_path: &str) {
    assert_eq!(exchange(addr, &health_request(addr)).await.0, 200);
    let stalled = stalled_client(addr, ws_path).await;
    let pid = child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap()
        .success());
    let signalled = Instant::now();
    // The signal is handled asynchronously: until then /health says 200.
    // It never goes unanswered.
    let body = loop {
        let (status, body) = exchange(addr, &health_request(addr)).await;
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(signalled.elapsed() < SHUTDOWN_TIMEOUT, "no 503 in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(body, "shutting down\n");
    let (status, body) = exchange(addr, &upgrade_request(addr, ws_path)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body, "shutting down\n");
    // Both answers came while the drain was still going on.
    assert!(
        child.try_wait().unwrap().is_none(),
        "exited before the drain's end"
    );
    assert!(signalled.elapsed() < SHUTDOWN_TIMEOUT);
    let exit = tokio::time::timeout(LIMIT, child.wait())
        .await
        .expect("still running after the drain")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    // The drain waited for the stalled client until the shutdown timeout.
    assert!(
        signalled.elapsed() >= SHUTDOWN_TIMEOUT - Duration::from_millis(500),
        "{:?}",
        signalled.elapsed()
    );
    drop(stalled);
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn echo_answers_503_while_draining_on_both_fronts() {
    for front in ["--event-loop", "--tokio"] {
        let (child, addr) = start_echo(&["--shutdown-timeout", "3s", front]).await;
        drain_answers_503_until_exit(child, &addr, "/").await;
    }
}

#[tokio::test]
async fn serve_answers_503_while_draining_on_both_fronts() {
    // An empty folder: no tidewire.toml of the repository is read.
    let dir = std::env::temp_dir().join(format!("tidewire-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for front in ["--event-loop", "--tokio"] {
        let args = ["--listen", "127.0.0.1:0", "--shutdown-timeout", "3s", front];
        let served = start_serve(&dir, &args, &[], "serve.log").await;
        drain_answers_503_until_exit(served.child, &served.addr, "/connection/websocket").await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
