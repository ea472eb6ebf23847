//! Hostile sizes against the `tidewire` binary, with its memory watched from
//! outside (VmRSS of the server process).

mod common;

use std::time::Duration;

use common::{start_echo, LIMIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn raw_client(addr: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    stream
}

/// Reads until EOF; returns the close code of the first close frame.
async fn close_code(stream: &mut TcpStream) -> u16 {
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(LIMIT, stream.read_to_end(&mut bytes))
        .await
        .unwrap();
    assert_eq!(bytes[0], 0x88, "{bytes:?}");
    u16::from_be_bytes([bytes[2], bytes[3]])
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn hostile_sizes_get_1009_and_server_memory_stays_flat() {
    for front in ["--event-loop", "--tokio"] {
        hostile_sizes_against(front).await;
    }
}

async fn hostile_sizes_against(front: &str) {
    let (server, addr) =
        start_echo(&["--max-message-size", "1048576", "--no-deflate", front]).await;
    let pid = server.id().unwrap();
    // Warm up: one ordinary exchange so the steady state is measured.
    let (mut ws, _) = tidewire::connect(&format!("ws://{addr}/")).await.unwrap();
    ws.send_text("warm").await.unwrap();
    ws.recv().await.unwrap().unwrap();
    let before = rss_kib(pid);

    // 1. A 100 MiB message in 1 MiB fragments: the second fragment's header
    //    pushes it over the 1 MiB message limit.
    let mut stream = raw_client(&addr).await;
    let chunk = vec![0u8; 1 << 20];
    let mut frame = vec![0x02, 0xFF];
    frame.extend_from_slice(&((1u64 << 20).to_be_bytes()));
    frame.extend_from_slice(&[0, 0, 0, 0]);
    for i in 0..100 {
        frame[0] = if i == 0 { 0x02 } else { 0x00 };
        // After failing the connection the server discards what still
        // arrives (bounded by its close timeout), so writes may succeed.
        if stream.write_all(&frame).await.is_err() || stream.write_all(&chunk).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut stream).await, 1009);

    // 2. One frame announcing 100 MiB: refused at the header.
    let mut stream = raw_client(&addr).await;
    let mut header = vec![0x82, 0xFF];
    header.extend_from_slice(&((100u64 << 20).to_be_bytes()));
    header.extend_from_slice(&[1, 2, 3, 4]);
    stream.write_all(&header).await.unwrap();
    let _ = stream.write_all(&chunk).await;
    assert_eq!(close_code(&mut stream).await, 1009);

    // 3. Length 2^63 - 1: too big (1009); 2^63: the top bit is reserved (1002).
    for (length, code) in [((1u64 << 63) - 1, 1009), (1u64 << 63, 1002)] {
        let mut stream = raw_client(&addr).await;
        let mut header = vec![0x82, 0xFF];
        header.extend_from_slice(&length.to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4]);
        stream.write_all(&header).await.unwrap();
        assert_eq!(close_code(&mut stream).await, code);
    }

    // The server still serves, and its memory stayed within a few MiB.
    tokio::time::sleep(Duration::from_millis(200)).await;
    ws.send_text("after").await.unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        tidewire::Message::text("after")
    );
    let after = rss_kib(pid);
    println!("{front}: server RSS before {before} KiB, after {after} KiB");
    assert!(
        after < before + 8 * 1024,
        "{front}: RSS grew from {before} KiB to {after} KiB"
    );
}
