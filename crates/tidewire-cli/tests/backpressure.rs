//! Peers that send but never read, against `tidewire echo`: the server's
//! memory (VmHWM of its process) grows by at most the send queue's byte
//! limit per such peer plus a fixed allowance, and a normal client keeps
//! getting its echoes meanwhile.

#![cfg(target_os = "linux")]

mod common;

use std::time::Duration;

use common::{start_echo, LIMIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const MIB: u64 = 1 << 20;

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Peak resident memory of a process, in bytes.
fn peak_bytes(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:") * 1024
}

/// A WebSocket client that completed the upgrade of `path` and reads
/// nothing more, with a 4 KiB receive buffer (so the server's answers back
/// up at once).
async fn non_reader(addr: &str, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    stream
}

/// How a non-reading peer's sending ended.
#[derive(Debug, PartialEq)]
enum Sending {
    /// The server stopped reading: a write made no progress for 2 s.
    Stalled,
    /// The server dropped the connection.
    Refused,
    /// Everything was sent.
    Finished,
}

/// Sends `total` bytes of 16 KiB binary messages (masked with a zero key:
/// valid, and no work to mask) until done, stalled or refused; returns the
/// outcome and the bytes sent.
async fn send_without_reading(stream: &mut TcpStream, total: u64) -> (Sending, u64) {
    const PAYLOAD: usize = 16 * 1024;
    let mut frame = vec![0x82, 0xFE];
    frame.extend_from_slice(&(PAYLOAD as u16).to_be_bytes());
    frame.extend_from_slice(&[0; 4]);
    frame.resize(frame.len() + PAYLOAD, b'x');
    // 16 messages per write.
    let batch = frame.repeat(16);
    let mut sent = 0u64;
    while sent < total {
        match tokio::time::timeout(Duration::from_secs(2), stream.write_all(&batch)).await {
            Err(_) => return (Sending::Stalled, sent),
            Ok(Err(_)) => return (Sending::Refused, sent),
            Ok(Ok(())) => sent += batch.len() as u64,
        }
    }
    (Sending::Finished, sent)
}

/// A normal client gets `rounds` echoes, each in time.
async fn echoes_still_flow(addr: &str, rounds: usize) {
    let (mut ws, _) = tidewire::connect(&format!("ws://{addr}/")).await.unwrap();
    for i in 0..rounds {
        let text = format!("still here {i}");
        ws.send_text(text.clone()).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(10), ws.recv())
            .await
            .expect("an echo in time")
            .unwrap()
            .unwrap();
        assert_eq!(echo, tidewire::Message::text(text));
    }
}

/// Runs `peers` non-readers that send up to `per_peer` bytes each against
/// a server started with `args`; returns the server's peak memory growth
/// and the outcomes.
async fn run(args: &[&str], peers: usize, per_peer: u64) -> (u64, Vec<(Sending, u64)>) {
    let (server, addr) = start_echo(args).await;
    let pid = server.id().unwrap();
    // Warm up the steady state the growth is measured from.
    echoes_still_flow(&addr, 3).await;
    let before = peak_bytes(pid);
    let mut streams = Vec::new();
    for _ in 0..peers {
        streams.push(non_reader(&addr, "/").await);
    }
    let senders: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let outcome = send_without_reading(&mut s, per_peer).await;
                (outcome, s)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    let mut held = Vec::new();
    for sender in senders {
        let (outcome, stream) = tokio::time::timeout(LIMIT, sender).await.unwrap().unwrap();
        outcomes.push(outcome);
        held.push(stream);
    }
    // The hostile peers are still connected (or refused): a normal client
    // is served meanwhile.
    echoes_still_flow(&addr, 20).await;
    let growth = peak_bytes(pid).saturating_sub(before);
    let sent: u64 = outcomes.iter().map(|(_, s)| s).sum();
    eprintln!(
        "echo {args:?}: {peers} non-readers sent {} MiB; server grew by {} KiB",
        sent / MIB,
        growth / 1024
    );
    drop(held);
    (growth, outcomes)
}

#[tokio::test]
async fn one_non_reader_is_held_to_the_send_queue_limit() {
    let (growth, outcomes) = run(&["--no-deflate"], 1, 96 * MIB).await;
    let (outcome, sent) = &outcomes[0];
    // Default --send-queue-bytes is 4 MiB; 12 MiB for the rest (read
    // buffers, allocator slack).
    assert!(
        growth <= 16 * MIB,
        "server grew by {} KiB for one non-reader ({sent} bytes sent, {outcome:?})",
        growth / 1024
    );
    // TCP pushed back: the peer could not send everything.
    assert_eq!(*outcome, Sending::Stalled, "{sent} bytes sent");
    assert!(*sent < 48 * MIB, "{sent} bytes sent");
}

#[tokio::test]
async fn a_hundred_non_readers_are_each_held_to_the_send_queue_limit() {
    let (growth, outcomes) = run(
        &["--no-deflate", "--send-queue-bytes", "262144"],
        100,
        16 * MIB,
    )
    .await;
    let sent: u64 = outcomes.iter().map(|(_, s)| s).sum();
    // Per peer: 256 KiB of output, plus its read side (up to 256 KiB read
    // and not yet decoded, and the 256 KiB read buffer the output's echoes
    // still point into); plus a fixed 40 MiB.
    assert!(
        growth <= 100 * (256 + 512) * 1024 + 40 * MIB,
        "server grew by {} KiB for 100 non-readers ({} MiB sent)",
        growth / 1024,
        sent / MIB
    );
}

#[tokio::test]
async fn with_slow_consumer_close_a_non_reader_is_dropped() {
    let (growth, outcomes) = run(
        &[
            "--no-deflate",
            "--slow-consumer",
            "close",
            "--send-queue-bytes",
            "1048576",
        ],
        1,
        96 * MIB,
    )
    .await;
    let (outcome, sent) = &outcomes[0];
    assert_eq!(*outcome, Sending::Refused, "{sent} bytes sent");
    assert!(
        growth <= 12 * MIB,
        "server grew by {} KiB ({sent} bytes sent)",
        growth / 1024
    );
}

/// `tidewire connect` against a server that completes the upgrade and
/// then never reads: the client's memory stays flat while its input backs
/// up (stdin stops being taken), instead of buffering what it cannot send.
#[tokio::test]
async fn connect_holds_its_input_when_the_server_does_not_read() {
    use std::process::Stdio;
    use tokio::io::{AsyncBufReadExt, BufReader};

    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(8).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.unwrap());
        }
        let head = String::from_utf8(head).unwrap();
        let key = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("Sec-WebSocket-Key: ")
                    .or_else(|| l.strip_prefix("sec-websocket-key: "))
            })
            .expect("a key")
            .trim()
            .to_string();
        let accept = tidewire::proto::handshake::accept_key(key.as_bytes());
        stream
            .write_all(format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        // Never reads again; holds the connection until the test ends.
        stream
    });
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(["connect", "--no-deflate", &format!("ws://{addr}/")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::time::timeout(LIMIT, async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.starts_with("Connected") {
                return;
            }
        }
        panic!("tidewire connect ended before connecting");
    })
    .await
    .unwrap();
    let before = peak_bytes(pid);
    let mut stdin = child.stdin.take().unwrap();
    let line = [vec![b'x'; 16 * 1024 - 1], vec![b'\n']].concat();
    let batch = line.repeat(16);
    let (mut sent, total) = (0u64, 96 * MIB);
    let mut stalled = false;
    while sent < total {
        match tokio::time::timeout(Duration::from_secs(2), stdin.write_all(&batch)).await {
            Err(_) => {
                stalled = true;
                break;
            }
            Ok(result) => result.unwrap(),
        }
        sent += batch.len() as u64;
    }
    let growth = peak_bytes(pid).saturating_sub(before);
    assert!(stalled, "connect took all {sent} bytes of input");
    assert!(
        growth <= 8 * MIB,
        "connect grew by {} KiB ({sent} bytes of input taken)",
        growth / 1024
    );
    drop(stdin);
    let _ = child.kill().await;
    drop(server.await.unwrap());
}

/// Text frames masked with a zero key.
fn text_frame(payload: &str) -> Vec<u8> {
    let len = payload.len();
    let mut frame = vec![0x81];
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    }
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(payload.as_bytes());
    frame
}

/// A hub client that publishes and asks for history without reading the
/// replies: the hub's memory stays within its send queue bound (the
/// client is closed as a slow consumer or pushed back by TCP), and other
/// clients are served meanwhile.
#[tokio::test]
async fn a_hub_client_that_never_reads_its_replies_is_bounded() {
    use std::process::Stdio;
    use tokio::io::{AsyncBufReadExt, BufReader};

    let dir = std::env::temp_dir().join(format!("tidewire-backpressure-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut hub = tokio::process::Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .current_dir(&dir)
        .env("RUST_LOG", "warn")
        .env_remove("TIDEWIRE_API_KEY")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = hub.id().unwrap();
    let mut lines = BufReader::new(hub.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(LIMIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                return rest.split('/').next().unwrap().to_string();
            }
        }
        panic!("tidewire serve exited before listening");
    })
    .await
    .unwrap();
    let url = format!("ws://{addr}/connection/websocket");
    // A normal client, connected before and checked after.
    let (mut normal, _) = tidewire::connect(&url).await.unwrap();
    normal.send_text(r#"{"id":1,"connect":{}}"#).await.unwrap();
    normal.recv().await.unwrap().unwrap();
    let before = peak_bytes(pid);

    let mut stream = non_reader(&addr, "/connection/websocket").await;
    let mut opening = text_frame(r#"{"id":1,"connect":{}}"#);
    opening.extend(text_frame(
        r#"{"id":2,"subscribe":{"channel":"chat:lobby"}}"#,
    ));
    let text = "y".repeat(8000);
    for id in 3..60 {
        opening.extend(text_frame(&format!(
            r#"{{"id":{id},"publish":{{"channel":"chat:lobby","data":{{"text":"{text}"}}}}}}"#
        )));
    }
    stream.write_all(&opening).await.unwrap();
    let mut batch = Vec::new();
    for id in 0..16 {
        batch.extend(text_frame(&format!(
            r#"{{"id":{},"history":{{"channel":"chat:lobby","limit":100}}}}"#,
            1000 + id
        )));
    }
    // And pings, whose pongs nobody reads either.
    let mut ping = vec![0x89, 0x80 | 125, 0, 0, 0, 0];
    ping.extend_from_slice(&[b'p'; 125]);
    batch.extend(ping.repeat(512));
    let mut sent = 0u64;
    while sent < 256 * MIB {
        match tokio::time::timeout(Duration::from_secs(2), stream.write_all(&batch)).await {
            Err(_) | Ok(Err(_)) => break,
            Ok(Ok(())) => sent += batch.len() as u64,
        }
    }
    let growth = peak_bytes(pid).saturating_sub(before);
    eprintln!(
        "hub grew by {} KiB; {sent} bytes of requests sent",
        growth / 1024
    );
    // client.queue_bytes is 1 MiB by default; the rest is allocator slack
    // of the replies built and refused (12-25 MiB seen in debug builds).
    // Unbounded, the pongs alone grew it by 300 MiB here.
    assert!(
        growth <= 64 * MIB,
        "hub grew by {} KiB ({sent} bytes of history requests sent)",
        growth / 1024
    );
    // The normal client is still served.
    normal
        .send_text(r#"{"id":2,"presence":{"channel":"chat:lobby"}}"#)
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), normal.recv())
        .await
        .expect("a reply in time")
        .unwrap()
        .unwrap();
    let reply = String::from_utf8_lossy(reply.as_bytes()).into_owned();
    assert!(reply.contains(r#""id":2"#), "{reply}");
    drop(stream);
    let _ = hub.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
}
