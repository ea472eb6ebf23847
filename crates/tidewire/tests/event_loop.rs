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
use tidewire::event_loop::{
    serve, ConnectionSlot, EventLoopConfig, EventLoopServer, Handler, Incoming, Socket,
};
use tidewire::http::{Request, Response};
use tidewire::{ClientBuilder, CloseCode, DeflateConfig, Message, OriginPolicy};

const LIMIT: Duration = Duration::from_secs(10);

/// Echoes; counts its connections' ends by code, and those handed off.
#[derive(Clone, Default)]
struct Echo {
    closed: Arc<Mutex<Vec<u16>>>,
    handed_off: Arc<std::sync::atomic::AtomicUsize>,
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

    fn hand_off(&mut self, request: &Request<()>) -> bool {
        request.uri().path().starts_with("/handed")
    }

    /// Served on a thread of its own: reads the body (whatever of it the
    /// loop read first, then the rest) and sends it back.
    fn handed_off(
        &mut self,
        mut stream: TcpStream,
        request: Request<()>,
        received: Vec<u8>,
        slot: ConnectionSlot,
    ) {
        self.handed_off
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::spawn(move || {
            let _slot = slot;
            stream.set_nonblocking(false).unwrap();
            let length: usize = request.headers()["content-length"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let start = received.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let mut data = received;
            while data.len() < start + length {
                let mut more = [0u8; 64];
                let n = stream.read(&mut more).unwrap();
                assert!(n > 0, "the body ended early");
                data.extend_from_slice(&more[..n]);
            }
            let body = &data[start..start + length];
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len() + request.uri().path().len() + 1
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(request.uri().path().as_bytes()).unwrap();
            stream.write_all(b" ").unwrap();
            stream.write_all(body).unwrap();
        });
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

#[test]
fn a_port_another_server_listens_on_is_refused_not_shared() {
    let (server, _) = start(EventLoopConfig::default());
    let taken = server.local_addr();
    // Another event-loop server (its listeners with SO_REUSEPORT too).
    let twice = serve(taken, EventLoopConfig::default(), Echo::default);
    assert_eq!(
        twice.map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::AddrInUse
    );
    stop(server);
    // A plain listener.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = plain.local_addr().unwrap();
    let beside = serve(taken, EventLoopConfig::default(), Echo::default);
    assert_eq!(
        beside.map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::AddrInUse
    );
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

/// The whole server frames at the start of `data` (none longer than a
/// 16-bit length): opcode and payload of each, and the bytes they take.
fn server_frames(data: &[u8]) -> (Vec<(u8, &[u8])>, usize) {
    let (mut frames, mut at) = (Vec::new(), 0);
    while at + 2 <= data.len() {
        let (opcode, short) = (data[at] & 0x0f, (data[at + 1] & 0x7f) as usize);
        let (len, header) = match short {
            126 if at + 4 <= data.len() => {
                (u16::from_be_bytes([data[at + 2], data[at + 3]]) as usize, 4)
            }
            126 => break,
            127 => panic!("no frame here is that large"),
            n => (n, 2),
        };
        if at + header + len > data.len() {
            break;
        }
        frames.push((opcode, &data[at + header..at + header + len]));
        at += header + len;
    }
    (frames, at)
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
    // HTTP/1.0 (a load balancer's health check): answered, but no upgrade.
    let answer = http(addr, "GET /health HTTP/1.0\r\n\r\n");
    assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
    let answer = http(
        addr,
        "GET / HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 505"), "{answer}");
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

/// A room: every connection's remote is kept; a text message `all:X` is
/// sent to every connection (from the sender's thread, to connections of
/// every thread); `bye` closes the others through their remotes.
#[derive(Clone, Default)]
struct Room {
    remotes: Arc<Mutex<Vec<tidewire::event_loop::Remote>>>,
}

impl Handler for Room {
    type State = ();

    fn open(&mut self, socket: &mut Socket<'_>, _: &Request<()>) {
        let limits = tidewire::QueueLimits {
            max_messages: 64,
            max_bytes: 1 << 20,
            policy: tidewire::SlowConsumer::Close(CloseCode::TRY_AGAIN_LATER),
        };
        let remote = socket.remote(limits);
        assert!(remote.queued_messages() == 0 && !remote.is_closed());
        // The same remote the second time.
        let _ = socket.remote(limits);
        self.remotes.lock().unwrap().push(remote);
    }

    fn message(&mut self, _: &mut Socket<'_>, _: &mut (), message: Incoming<'_>) {
        let remotes = self.remotes.lock().unwrap().clone();
        match message {
            Incoming::Text("bye") => {
                for remote in &remotes {
                    remote.close(CloseCode(4002), "room closed");
                }
            }
            Incoming::Text(text) if text.starts_with("all:") => {
                let message = Message::text(text[4..].to_owned());
                // Deferred, then woken: the way a broadcast queues on
                // everyone first; woken one by one, or in one batch per
                // worker (by turns).
                let batched = text.len() % 2 == 0;
                let mut to_wake = Vec::new();
                let mut wakes = tidewire::event_loop::Wakes::new();
                for remote in &remotes {
                    if let Ok(true) = remote.send_deferred(message.clone()) {
                        if batched {
                            wakes.add(remote);
                        } else {
                            to_wake.push(remote);
                        }
                    }
                }
                wakes.flush();
                for remote in to_wake {
                    remote.wake();
                }
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn remotes_send_across_threads_in_order_and_close() {
    let room = Room::default();
    let handler = room.clone();
    let server = serve(
        "127.0.0.1:0".parse().unwrap(),
        EventLoopConfig {
            threads: 2,
            ..EventLoopConfig::default()
        },
        move || handler.clone(),
    )
    .unwrap();
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(
            ClientBuilder::new(url(&server, "/"))
                .connect()
                .await
                .unwrap()
                .0,
        );
    }
    eventually("every remote made", || {
        room.remotes.lock().unwrap().len() == 30
    })
    .await;
    // From a connection's callback, to all.
    for n in 0..50 {
        clients[0]
            .send(Message::text(format!("all:{n}")))
            .await
            .unwrap();
    }
    for ws in &mut clients {
        for n in 0..50 {
            assert_eq!(
                ws.recv().await.unwrap().unwrap(),
                Message::text(n.to_string())
            );
        }
    }
    // From a thread of no event loop at all.
    let remotes = room.remotes.lock().unwrap().clone();
    std::thread::spawn(move || {
        for remote in &remotes {
            remote.send(Message::text("from outside")).unwrap();
        }
    })
    .join()
    .unwrap();
    for ws in &mut clients {
        assert_eq!(
            ws.recv().await.unwrap().unwrap(),
            Message::text("from outside")
        );
    }
    // A close through the remotes, after what they queued.
    clients[1].send(Message::text("all:last")).await.unwrap();
    clients[1].send(Message::text("bye")).await.unwrap();
    for ws in &mut clients {
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("last"));
        match ws.recv().await {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(
                    (frame.code, frame.reason.as_str()),
                    (CloseCode(4002), "room closed")
                )
            }
            other => panic!("expected close 4002, got {other:?}"),
        }
    }
    drop(clients);
    let remotes = room.remotes.lock().unwrap().clone();
    eventually("connections gone", || server.connections() == 0).await;
    for remote in &remotes {
        assert!(remote.is_closed());
        assert!(matches!(
            remote.send(Message::text("late")),
            Err(tidewire::SendError::Closed)
        ));
    }
    stop(server);
}

#[tokio::test]
async fn a_remote_that_overflows_closes_its_connection_with_the_policys_code() {
    let room = Room::default();
    let handler = room.clone();
    let server = serve(
        "127.0.0.1:0".parse().unwrap(),
        EventLoopConfig {
            threads: 1,
            // Little room in the connection itself, so that the remote's
            // queue fills while the reader sleeps.
            max_pending_output: 64 << 10,
            close_timeout: Duration::from_secs(1),
            ..EventLoopConfig::default()
        },
        move || handler.clone(),
    )
    .unwrap();
    // A reader that reads nothing until the flood is over.
    let mut sleeper = raw_open(server.local_addr());
    eventually("remote made", || room.remotes.lock().unwrap().len() == 1).await;
    let remote = room.remotes.lock().unwrap()[0].clone();
    let big = Message::binary(vec![7u8; 32 << 10]);
    let mut refused = None;
    for n in 0..10_000 {
        if let Err(e) = remote.send(big.clone()) {
            refused = Some((n, e));
            break;
        }
        if n % 64 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let (n, e) = refused.expect("the queue is bounded");
    assert!(matches!(e, tidewire::SendError::Closed), "{e:?} after {n}");
    assert!(remote.is_closed());
    // Whatever fit, whole and in order, then the close with 1013.
    let mut all = Vec::new();
    sleeper.read_to_end(&mut all).unwrap();
    let (parsed, used) = server_frames(&all);
    let (mut frames, mut code) = (0, None);
    for (opcode, payload) in parsed {
        match opcode {
            0x2 => {
                assert!(payload.len() == 32 << 10 && payload.iter().all(|&b| b == 7));
                frames += 1;
            }
            0x8 => code = Some(u16::from_be_bytes([payload[0], payload[1]])),
            other => panic!("opcode {other}"),
        }
    }
    assert_eq!(used, all.len(), "whole frames only");
    assert_eq!(code, Some(1013));
    assert!(frames > 0 && frames < n, "{frames} of {n} delivered");
    stop(server);
}

#[tokio::test]
async fn a_handed_off_request_is_served_by_its_new_owner_with_every_byte() {
    let (server, _) = start(EventLoopConfig::default());
    let addr = server.local_addr();
    // Head and body in one write, and a body that comes later: the new
    // owner gets what the loop read and reads the rest itself.
    for (first, later) in [
        (
            "POST /handed HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            "",
        ),
        (
            "POST /handed/2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
            "world",
        ),
    ] {
        let answer = tokio::task::spawn_blocking(move || {
            let mut tcp = TcpStream::connect(addr).unwrap();
            tcp.set_read_timeout(Some(LIMIT)).unwrap();
            tcp.write_all(first.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            tcp.write_all(later.as_bytes()).unwrap();
            let mut answer = String::new();
            tcp.read_to_string(&mut answer).unwrap();
            answer
        })
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        assert!(
            body == "/handed hello" || body == "/handed/2 world",
            "{body}"
        );
    }
    // Uncounted once their new owner let go of them; the loop still serves.
    eventually("the handed-off connections uncounted", || {
        server.connections() == 0
    })
    .await;
    assert!(http(addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").ends_with("ok\n"));
    stop(server);
}

#[tokio::test]
async fn a_handed_off_connection_counts_toward_the_limit_while_it_lives() {
    let (server, echo) = start(EventLoopConfig {
        max_connections: 1,
        ..EventLoopConfig::default()
    });
    let addr = server.local_addr();
    // Handed off, its new owner waiting for the body.
    let mut held = TcpStream::connect(addr).unwrap();
    held.set_read_timeout(Some(LIMIT)).unwrap();
    held.write_all(b"POST /handed HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        .unwrap();
    let handed = echo.handed_off.clone();
    eventually("handed off", || {
        handed.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(server.connections(), 1);
    let refused = http(addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    // Answered and gone: room again.
    held.write_all(b"hello").unwrap();
    let mut answer = String::new();
    held.read_to_string(&mut answer).unwrap();
    assert!(answer.ends_with("/handed hello"), "{answer}");
    eventually("uncounted", || server.connections() == 0).await;
    assert!(http(addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").ends_with("ok\n"));
    stop(server);
}

/// Answers every message through its connection's remote, from a thread
/// of its own: the loop's own writes (after each read) and the remote's
/// wake-ups race all the time.
#[derive(Clone)]
struct Relay {
    to_thread: std::sync::mpsc::Sender<(tidewire::event_loop::Remote, String)>,
}

impl Handler for Relay {
    type State = tidewire::event_loop::Remote;

    fn open(&mut self, socket: &mut Socket<'_>, _: &Request<()>) -> tidewire::event_loop::Remote {
        socket.remote(tidewire::QueueLimits {
            max_messages: 1 << 20,
            max_bytes: 1 << 30,
            policy: tidewire::SlowConsumer::Wait,
        })
    }

    fn message(
        &mut self,
        socket: &mut Socket<'_>,
        remote: &mut tidewire::event_loop::Remote,
        message: Incoming<'_>,
    ) {
        if let Incoming::Text(text) = message {
            // Every other answer straight from the callback, through the
            // same remote: its queue is taken by this thread too.
            if text.ends_with('0') {
                remote.send(Message::text(text.to_owned())).unwrap();
                socket.send_text("");
            } else {
                self.to_thread
                    .send((remote.clone(), text.to_owned()))
                    .unwrap();
            }
        }
    }
}

#[tokio::test]
async fn remote_sends_racing_the_loops_own_writes_are_never_left_unwritten() {
    let (to_thread, from_loop) =
        std::sync::mpsc::channel::<(tidewire::event_loop::Remote, String)>();
    std::thread::spawn(move || {
        for (remote, text) in from_loop {
            let _ = remote.send(Message::text(text));
        }
    });
    let server = serve(
        "127.0.0.1:0".parse().unwrap(),
        EventLoopConfig {
            threads: 1,
            ..EventLoopConfig::default()
        },
        move || Relay {
            to_thread: to_thread.clone(),
        },
    )
    .unwrap();
    let (ws, _) = ClientBuilder::new(url(&server, "/"))
        .connect()
        .await
        .unwrap();
    let (mut reader, mut writer) = ws.split();
    let count = 20_000;
    let sending = tokio::spawn(async move {
        for n in 0..count {
            writer.send(Message::text(n.to_string())).await.unwrap();
        }
        writer
    });
    let mut seen = std::collections::HashSet::new();
    while seen.len() < count {
        let message = tokio::time::timeout(LIMIT, reader.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {count} answers, then nothing", seen.len()))
            .unwrap()
            .unwrap();
        match message {
            Message::Text(text) if text.as_str().is_empty() => {}
            Message::Text(text) => assert!(seen.insert(text.as_str().parse::<usize>().unwrap())),
            other => panic!("{other:?}"),
        }
    }
    drop((sending.await.unwrap(), reader));
    stop(server);
}

/// Every connection joins one group: `pub:X` publishes X to it, `leave`
/// leaves it.
#[derive(Clone)]
struct Members {
    group: tidewire::event_loop::Group,
    remotes: Arc<Mutex<Vec<tidewire::event_loop::Remote>>>,
}

impl Members {
    fn new(limits: tidewire::QueueLimits) -> Members {
        Members {
            group: tidewire::event_loop::Group::new(limits),
            remotes: Arc::default(),
        }
    }
}

impl Handler for Members {
    type State = Option<tidewire::event_loop::Remote>;

    fn open(&mut self, socket: &mut Socket<'_>, _: &Request<()>) -> Self::State {
        let remote = socket.remote(tidewire::QueueLimits::default());
        self.group.join(&remote);
        self.remotes.lock().unwrap().push(remote.clone());
        Some(remote)
    }

    fn message(&mut self, _: &mut Socket<'_>, remote: &mut Self::State, message: Incoming<'_>) {
        match message {
            Incoming::Text("leave") => {
                if let Some(remote) = remote {
                    self.group.leave(remote);
                }
            }
            Incoming::Text(text) if text.starts_with("pub:") => {
                self.group.publish(Message::text(text[4..].to_owned()));
            }
            _ => {}
        }
    }
}

fn serve_members(members: &Members, threads: usize, config: EventLoopConfig) -> EventLoopServer {
    let handler = members.clone();
    serve(
        "127.0.0.1:0".parse().unwrap(),
        EventLoopConfig { threads, ..config },
        move || handler.clone(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_group_reaches_every_member_in_order_with_their_own_messages() {
    let members = Members::new(tidewire::QueueLimits::default());
    let server = serve_members(&members, 2, EventLoopConfig::default());
    let mut clients = Vec::new();
    for _ in 0..30 {
        clients.push(
            ClientBuilder::new(url(&server, "/"))
                .connect()
                .await
                .unwrap()
                .0,
        );
    }
    eventually("every member joined", || members.group.members() == 30).await;
    // From a member's callback.
    for n in 0..20 {
        clients[3]
            .send(Message::text(format!("pub:{n}")))
            .await
            .unwrap();
    }
    for ws in &mut clients {
        for n in 0..20 {
            assert_eq!(
                ws.recv().await.unwrap().unwrap(),
                Message::text(n.to_string())
            );
        }
    }
    // From another thread, group messages and each member's own, one
    // after the other: each member reads them in the order they were
    // sent.
    let (group, remotes) = (
        members.group.clone(),
        members.remotes.lock().unwrap().clone(),
    );
    std::thread::spawn(move || {
        for n in 0..100 {
            assert_eq!(group.publish(Message::text(format!("g{n}"))), 30);
            for (i, remote) in remotes.iter().enumerate() {
                remote.send(Message::text(format!("d{n}:{i}"))).unwrap();
            }
        }
    })
    .join()
    .unwrap();
    let remotes = members.remotes.lock().unwrap().clone();
    for ws in &mut clients {
        let mut got = Vec::new();
        for _ in 0..200 {
            got.push(ws.recv().await.unwrap().unwrap());
        }
        // Which remote is this client's: the one its first `d` names.
        let Message::Text(first) = &got[1] else {
            panic!("{:?}", got[1])
        };
        let i: usize = first.as_str().split(':').nth(1).unwrap().parse().unwrap();
        let want: Vec<Message> = (0..100)
            .flat_map(|n| {
                [
                    Message::text(format!("g{n}")),
                    Message::text(format!("d{n}:{i}")),
                ]
            })
            .collect();
        assert_eq!(got, want);
    }
    // One leaves: it gets nothing published after (but its own still).
    clients[0].send(Message::text("leave")).await.unwrap();
    eventually("one left", || members.group.members() == 29).await;
    clients[1].send(Message::text("pub:after")).await.unwrap();
    for ws in &mut clients[1..] {
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("after"));
    }
    for remote in &remotes {
        remote.send(Message::text("last")).unwrap();
    }
    for ws in &mut clients {
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("last"));
    }
    // Members whose connections end are counted out.
    drop(clients);
    eventually("every member gone", || members.group.members() == 0).await;
    assert_eq!(members.group.publish(Message::text("nobody")), 0);
    stop(server);
}

#[tokio::test]
async fn a_member_that_falls_behind_its_group_is_closed_with_the_policys_code() {
    let members = Members::new(tidewire::QueueLimits {
        max_messages: 1024,
        max_bytes: 1 << 20,
        policy: tidewire::SlowConsumer::Close(CloseCode::TRY_AGAIN_LATER),
    });
    let server = serve_members(
        &members,
        1,
        EventLoopConfig {
            max_pending_output: 64 << 10,
            close_timeout: Duration::from_secs(1),
            ..EventLoopConfig::default()
        },
    );
    // A member that reads nothing until the flood is over, and one that
    // keeps up.
    let mut sleeper = raw_open(server.local_addr());
    let (mut reader, _) = ClientBuilder::new(url(&server, "/"))
        .connect()
        .await
        .unwrap();
    eventually("both joined", || members.group.members() == 2).await;
    let big = Message::binary(vec![7u8; 32 << 10]);
    let group = members.group.clone();
    let publisher = std::thread::spawn(move || {
        let mut closed = 0;
        for n in 0..4000 {
            group.publish(big.clone());
            closed += group.take_closed();
            if closed > 0 {
                return (n, closed);
            }
            if n % 16 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        (4000, closed)
    });
    let mut received = 0usize;
    let (n, closed) = loop {
        tokio::select! {
            message = reader.recv() => {
                assert_eq!(message.unwrap().unwrap().as_bytes().len(), 32 << 10);
                received += 1;
            }
            _ = tokio::time::sleep(Duration::from_millis(1)) => {
                if publisher.is_finished() {
                    break publisher.join().unwrap();
                }
            }
        }
    };
    assert_eq!(
        closed, 1,
        "the sleeper is closed, once, after {n} publications"
    );
    // Whatever fit, whole and in order, then the close with 1013.
    let mut all = Vec::new();
    sleeper.read_to_end(&mut all).unwrap();
    let (parsed, used) = server_frames(&all);
    let (mut frames, mut code) = (0, None);
    for (opcode, payload) in parsed {
        match opcode {
            0x2 => frames += 1,
            0x8 => code = Some(u16::from_be_bytes([payload[0], payload[1]])),
            other => panic!("opcode {other}"),
        }
    }
    assert_eq!(used, all.len(), "whole frames only");
    assert_eq!(code, Some(1013));
    assert!(frames > 0 && frames < n, "{frames} of {n} delivered");
    // The other member got every one of them.
    while received < n + 1 {
        assert_eq!(
            reader.recv().await.unwrap().unwrap().as_bytes().len(),
            32 << 10
        );
        received += 1;
    }
    eventually("the sleeper counted out", || members.group.members() == 1).await;
    stop(server);
}

#[tokio::test]
async fn a_member_that_falls_behind_with_the_drop_policy_skips_messages_and_stays() {
    // Room for a reader that keeps up to be a little behind (4 MiB).
    let members = Members::new(tidewire::QueueLimits {
        max_messages: 256,
        max_bytes: 4 << 20,
        policy: tidewire::SlowConsumer::Drop,
    });
    let server = serve_members(
        &members,
        1,
        EventLoopConfig {
            max_pending_output: 64 << 10,
            ..EventLoopConfig::default()
        },
    );
    let mut sleeper = raw_open(server.local_addr());
    let (mut reader, _) = ClientBuilder::new(url(&server, "/"))
        .connect()
        .await
        .unwrap();
    eventually("both joined", || members.group.members() == 2).await;
    let group = members.group.clone();
    let publisher = std::thread::spawn(move || {
        let mut dropped = 0;
        for n in 0..2000u32 {
            let mut data = vec![0u8; 16 << 10];
            data[..4].copy_from_slice(&n.to_be_bytes());
            group.publish(Message::binary(data));
            dropped += group.take_dropped();
            if n % 16 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        dropped
    });
    // The reader keeps up and gets every one, in order.
    for n in 0..2000u32 {
        let message = reader.recv().await.unwrap().unwrap();
        assert_eq!(message.as_bytes()[..4], n.to_be_bytes());
    }
    let dropped = publisher.join().unwrap();
    assert!(dropped > 0, "the sleeper fell behind");
    assert_eq!(members.group.members(), 2, "nobody was closed");
    // The sleeper reads what it was sent: whole frames in order, gaps
    // where it fell behind, no close.
    sleeper
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut all = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        match sleeper.read(&mut chunk) {
            Ok(0) => panic!("the sleeper was closed"),
            Ok(n) => all.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    let (mut last, mut got) = (None::<u32>, 0u32);
    for (opcode, payload) in server_frames(&all).0 {
        assert_eq!(opcode, 0x2, "binary frames only");
        assert_eq!(payload.len(), 16 << 10);
        let n = u32::from_be_bytes(payload[..4].try_into().unwrap());
        assert!(last.is_none_or(|last| n > last), "in order");
        last = Some(n);
        got += 1;
    }
    assert!(
        got > 0 && u64::from(got) + dropped <= 2000 + 1,
        "{got} got, {dropped} dropped"
    );
    assert!(got < 2000, "some were skipped");
    stop(server);
}
