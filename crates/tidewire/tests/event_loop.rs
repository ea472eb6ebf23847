//! The event-loop server (`tidewire::event_loop`) with the tokio client on
//! the other side, or raw bytes where the client would not misbehave:
//! echo of every kind of message, the closing handshake and its codes,
//! protocol errors, plain HTTP, origins, limits, keepalive, idle timeout,
//! permessage-deflate, several threads, graceful shutdown.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tidewire::event_loop::{serve, EventLoopConfig, EventLoopServer, Handler, Incoming, Socket};
use tidewire::http::{Request, Response};
use tidewire::{ClientBuilder, CloseCode, DeflateConfig, Message, OriginPolicy};

const LIMIT: Duration = Duration::from_secs(10);

/// Echoes; counts its connections' ends by code.
#[derive(Clone, Default)]
struct Echo {
    closed: Arc<Mutex<Vec<u16>>>,
}

impl Handler for Echo {
    type State = ();

    fn open(&mut self, socket: &mut Socket<'_>, request: &Request<()>) {
        if request.uri().path() == "/welcome" {
            socket.send_text("welcome");
        }
    }

    fn message(&mut self, socket: &mut Socket<'_>, _: &mut (), message: Incoming<'_>) {
        match message {
            Incoming::Text("close me") => socket.close(CloseCode(4001), "as asked"),
            Incoming::Text("owned") => socket.send(Message::text("sent as a Message")),
            Incoming::Text(text) => socket.send_text(text),
            Incoming::Binary(data) => socket.send_binary(data),
            _ => {}
        }
    }

    fn message_owned(&mut self, socket: &mut Socket<'_>, state: &mut (), message: Message) {
        match message {
            // Large ones go back by reference; the marker shows which way.
            Message::Binary(data) if data.len() > 1 << 20 => {
                let mut marked = data.to_vec();
                marked[0] = b'O';
                socket.send(Message::binary(marked));
            }
            Message::Text(text) => self.message(socket, state, Incoming::Text(text.as_str())),
            Message::Binary(data) => self.message(socket, state, Incoming::Binary(&data)),
            _ => {}
        }
    }

    fn closed(&mut self, _: (), code: CloseCode) {
        self.closed.lock().unwrap().push(code.0);
    }

    fn http(&mut self, request: &Request<()>) -> Option<Response<Bytes>> {
        (request.uri().path() == "/health").then(|| Response::new(Bytes::from_static(b"ok\n")))
    }
}

fn start(config: EventLoopConfig) -> (EventLoopServer, Echo) {
    let echo = Echo::default();
    let handler = echo.clone();
    let server = serve(
        "127.0.0.1:0".parse().unwrap(),
        EventLoopConfig {
            threads: 1,
            ..config
        },
        move || handler.clone(),
    )
    .expect("serve");
    (server, echo)
}

fn url(server: &EventLoopServer, path: &str) -> String {
    format!("ws://{}{path}", server.local_addr())
}

/// Waits (bounded) until `check` holds.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn stop(server: EventLoopServer) {
    server.shutdown();
    server.join().expect("the threads end cleanly");
}

#[tokio::test]
async fn echoes_text_binary_fragments_and_large_messages() {
    let (server, echo) = start(EventLoopConfig::default());
    let (mut ws, _) = ClientBuilder::new(url(&server, "/welcome"))
        .connect()
        .await
        .unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("welcome"));
    ws.send(Message::text("héllo")).await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("héllo"));
    ws.send(Message::text("owned")).await.unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::text("sent as a Message")
    );
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    // Fragmented, and larger than the socket takes at once (partial writes).
    ws.send_fragment(tidewire::OpCode::Text, b"frag", false)
        .await
        .unwrap();
    ws.send_fragment(tidewire::OpCode::Continuation, b"mented", true)
        .await
        .unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::text("fragmented")
    );
    // A large message comes owned (to be sent on by reference); the test
    // handler marks it so.
    let mut big: Vec<u8> = (0..8 << 20).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    big[0] = b'O';
    match ws.recv().await.unwrap().unwrap() {
        Message::Binary(data) => assert!(data == big, "the 8 MiB echo differs"),
        other => panic!("expected the binary echo, got {other:?}"),
    }
    // A small one comes borrowed, whole.
    ws.send(Message::binary(vec![7u8; 1000])).await.unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::binary(vec![7u8; 1000])
    );
    // A hundred pipelined messages come back in order.
    for n in 0..100 {
        ws.feed(Message::text(n.to_string())).unwrap();
    }
    ws.flush().await.unwrap();
    for n in 0..100 {
        assert_eq!(
            ws.recv().await.unwrap().unwrap(),
            Message::text(n.to_string())
        );
    }
    let frame = ws.close(1000u16, "done").await.unwrap().unwrap();
    assert_eq!(frame.code, CloseCode::NORMAL);
    eventually("the handler saw the close", || {
        *echo.closed.lock().unwrap() == [1000]
    })
    .await;
    eventually("no connection left", || server.connections() == 0).await;
    stop(server);
}

#[tokio::test]
async fn the_server_closes_with_its_code_and_reports_the_peers() {
    let (server, echo) = start(EventLoopConfig::default());
    let (mut ws, _) = ClientBuilder::new(url(&server, "/"))
        .connect()
        .await
        .unwrap();
    ws.send(Message::text("close me")).await.unwrap();
    match ws.recv().await.unwrap().unwrap() {
        Message::Close(Some(frame)) => {
            assert_eq!(frame.code, CloseCode(4001));
            assert_eq!(frame.reason.as_str(), "as asked");
        }
        other => panic!("expected the server's close, got {other:?}"),
    }
    assert!(ws.recv().await.is_none(), "the server then ends TCP");
    let (mut ws, _) = ClientBuilder::new(url(&server, "/"))
        .connect()
        .await
        .unwrap();
    ws.close(4321u16, "client leaves").await.unwrap();
    let (ws, _) = ClientBuilder::new(url(&server, "/"))
        .connect()
        .await
        .unwrap();
    drop(ws); // no closing handshake: 1006
    eventually("three ends reported", || {
        echo.closed.lock().unwrap().len() == 3
    })
    .await;
    assert_eq!(*echo.closed.lock().unwrap(), [4001, 4321, 1006]);
    stop(server);
}

/// A raw connection past the handshake.
fn raw_open(addr: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(LIMIT)).unwrap();
    tcp.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let head = read_head(&mut tcp);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

fn read_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tcp.read(&mut byte).unwrap(), 1, "the head ended early");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// Everything until the server closes: the close frame's code, if one came.
fn close_code_then_eof(tcp: &mut TcpStream) -> Option<u16> {
    let mut all = Vec::new();
    tcp.read_to_end(&mut all).unwrap();
    // Frames from the server are unmasked; the close is the last one.
    let mut at = 0;
    let mut code = None;
    while at + 2 <= all.len() {
        let (opcode, len) = (all[at] & 0x0f, (all[at + 1] & 0x7f) as usize);
        assert!(len < 126, "small frames only here");
        if opcode == 0x8 && len >= 2 {
            code = Some(u16::from_be_bytes([all[at + 2], all[at + 3]]));
        }
        at += 2 + len;
    }
    code
}

/// A masked frame (key 0: the payload goes as is).
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![first, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    out.extend_from_slice(payload);
    out
}

#[tokio::test]
async fn protocol_errors_close_with_their_code_before_tcp_ends() {
    let mut config = EventLoopConfig::default();
    config.protocol.max_message_size = 100;
    config.protocol.max_frame_size = 100;
    let (server, echo) = start(config);
    let cases: [(Vec<u8>, u16); 4] = [
        // Unmasked.
        (vec![0x81, 0x02, b'h', b'i'], 1002),
        // Invalid UTF-8 in a text message.
        (frame(0x81, &[0xc3, 0x28]), 1007),
        // Over the message limit (a 126-byte announced length).
        (
            {
                let mut f = vec![0x82, 0x80 | 126, 0, 126, 0, 0, 0, 0];
                f.extend_from_slice(&[0u8; 126]);
                f
            },
            1009,
        ),
        // A reserved opcode.
        (frame(0x83, b""), 1002),
    ];
    for (bytes, expected) in cases {
        let mut tcp = raw_open(server.local_addr());
        tcp.write_all(&bytes).unwrap();
        assert_eq!(
            close_code_then_eof(&mut tcp),
            Some(expected),
            "{bytes:02x?}"
        );
    }
    eventually("four ends reported", || {
        echo.closed.lock().unwrap().len() == 4
    })
    .await;
    assert_eq!(*echo.closed.lock().unwrap(), [1002, 1007, 1009, 1002]);
    stop(server);
}

/// One HTTP request; the whole answer.
fn http(addr: SocketAddr, request: &str) -> String {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(LIMIT)).unwrap();
    tcp.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    answer
}

#[tokio::test]
async fn plain_http_bad_handshakes_origins_and_the_connection_limit() {
    let (server, _) = start(EventLoopConfig {
        origins: Some(OriginPolicy::allow(["https://app.example"])),
        max_connections: 2,
        ..EventLoopConfig::default()
    });
    let addr = server.local_addr();
    let answer = http(addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
    let answer = http(addr, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    let answer = http(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = http(addr, "NOT HTTP AT ALL\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let refused = ClientBuilder::new(url(&server, "/"))
        .header("Origin", "https://evil.example")
        .connect()
        .await;
    assert!(refused.is_err(), "a foreign origin is refused");
    let (_a, _) = ClientBuilder::new(url(&server, "/"))
        .header("Origin", "https://app.example")
        .connect()
        .await
        .unwrap();
    let (_b, _) = ClientBuilder::new(url(&server, "/"))
        .header("Origin", "https://app.example")
        .connect()
        .await
        .unwrap();
    let answer = http(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    stop(server);
}

#[tokio::test]
async fn keepalive_pings_and_drops_a_peer_that_never_answers() {
    let (server, echo) = start(EventLoopConfig {
        ping_interval: Some(Duration::from_secs(1)),
        pong_timeout: Duration::from_secs(1),
        ..EventLoopConfig::default()
    });
    let mut tcp = raw_open(server.local_addr());
    let mut got = Vec::new();
    // A silent peer: pinged, then dropped without a close frame.
    tcp.read_to_end(&mut got).unwrap();
    assert_eq!(got[0], 0x89, "a ping first: {got:02x?}");
    assert!(!got.contains(&0x88), "no close frame: {got:02x?}");
    eventually("the end reported", || {
        *echo.closed.lock().unwrap() == [1006]
    })
    .await;
    // A client that answers stays.
    let (mut ws, _) = ClientBuilder::new(url(&server, "/"))
        .connect()
        .await
        .unwrap();
    // Quiet for 3.5 s, but reading (the client answers pings as it reads).
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(3500);
    let mut pings = 0;
    while let Ok(next) = tokio::time::timeout_at(quiet_until, ws.recv()).await {
        match next {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected pings only, got {other:?}"),
        }
    }
    assert!(pings >= 1, "it was pinged while quiet");
    ws.send(Message::text("still here")).await.unwrap();
    loop {
        match tokio::time::timeout(LIMIT, ws.recv()).await.unwrap() {
            Some(Ok(Message::Ping(_))) => {}
            Some(Ok(m)) => {
                assert_eq!(m, Message::text("still here"));
                break;
            }
            other => panic!("expected the echo, got {other:?}"),
        }
    }
    stop(server);
}

#[tokio::test]
async fn an_idle_connection_is_closed_with_1001_and_a_silent_handshake_dropped() {
    let (server, echo) = start(EventLoopConfig {
        idle_timeout: Some(Duration::from_secs(1)),
        handshake_timeout: Duration::from_secs(1),
        ping_interval: None,
        ..EventLoopConfig::default()
    });
    let (mut ws, _) = ClientBuilder::new(url(&server, "/"))
        .connect()
        .await
        .unwrap();
    let started = Instant::now();
    match tokio::time::timeout(LIMIT, ws.recv()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::GOING_AWAY);
            assert_eq!(frame.reason.as_str(), "idle timeout");
        }
        other => panic!("expected the idle close, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(4));
    let mut silent = TcpStream::connect(server.local_addr()).unwrap();
    silent.set_read_timeout(Some(LIMIT)).unwrap();
    let mut nothing = Vec::new();
    silent.read_to_end(&mut nothing).unwrap();
    assert!(nothing.is_empty());
    eventually("one WebSocket end", || {
        echo.closed.lock().unwrap().len() == 1
    })
    .await;
    stop(server);
}

#[tokio::test]
async fn permessage_deflate_and_several_threads() {
    let mut config = EventLoopConfig {
        threads: 2,
        ..EventLoopConfig::default()
    };
    config.protocol.deflate = Some(DeflateConfig::default());
    let echo = Echo::default();
    let handler = echo.clone();
    let server = serve("127.0.0.1:0".parse().unwrap(), config, move || {
        handler.clone()
    })
    .unwrap();
    let mut clients = Vec::new();
    for _ in 0..40 {
        let (ws, response) = ClientBuilder::new(url(&server, "/"))
            .deflate(Some(DeflateConfig::default()))
            .connect()
            .await
            .unwrap();
        let extensions = response
            .headers()
            .get("sec-websocket-extensions")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(extensions.contains("permessage-deflate"), "{extensions}");
        clients.push(ws);
    }
    let text = "compressible ".repeat(1000);
    for ws in &mut clients {
        ws.send(Message::text(text.clone())).await.unwrap();
    }
    for ws in &mut clients {
        assert_eq!(
            ws.recv().await.unwrap().unwrap(),
            Message::text(text.clone())
        );
    }
    assert_eq!(server.connections(), 40);
    // Shutdown: every client is told (1001), and the threads end.
    server.shutdown();
    for ws in &mut clients {
        match ws.recv().await {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::GOING_AWAY),
            other => panic!("expected close 1001, got {other:?}"),
        }
    }
    drop(clients);
    tokio::task::spawn_blocking(move || server.join())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echo.closed.lock().unwrap().len(), 40);
}
