//! tidewire::Server on loopback: limits, slowloris, origin, authentication,
//! plain HTTP, graceful shutdown with many clients.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidewire::http::{Extensions, Response, StatusCode};
use tidewire::proto::HandshakeError;
use tidewire::{
    ClientBuilder, CloseFrame, Error, Limits, Message, OriginPolicy, Reject, Sender, Server,
    ServerBuilder, ServerConfig, ServerStats,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const LIMIT: Duration = Duration::from_secs(30);

/// Starts `server` with the echo handler; returns its address.
async fn start(
    builder: ServerBuilder,
) -> (SocketAddr, Arc<ServerStats>, tidewire::CancellationToken) {
    let server = builder.build();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stats, token) = (server.stats(), server.shutdown_token());
    let handler_stats = stats.clone();
    tokio::spawn(async move {
        server
            .serve(listener, move |session| {
                tidewire::echo(session, None, "".into(), handler_stats.clone())
            })
            .await
            .unwrap();
    });
    (addr, stats, token)
}

async fn status_of(result: Result<impl Sized, Error>) -> StatusCode {
    match result {
        Err(Error::Handshake(HandshakeError::UnexpectedStatus(status))) => status,
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(_) => panic!("connected, expected a refusal"),
    }
}

/// A raw HTTP exchange: the whole response as text.
async fn http(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn connect_from(
    source: &str,
    addr: SocketAddr,
) -> Result<tidewire::WebSocket<TcpStream>, Error> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    ClientBuilder::new(format!("ws://{addr}/"))
        .connect_on(stream)
        .await
        .map(|(ws, _)| ws)
}

#[tokio::test]
async fn overall_limit_answers_503_and_frees_the_slot() {
    let limits = Limits {
        max_connections: 2,
        ..Limits::default()
    };
    let (addr, stats, _) = start(Server::builder().limits(limits)).await;
    let url = format!("ws://{addr}/");
    let (mut a, _) = tidewire::connect(&url).await.unwrap();
    let (_b, _) = tidewire::connect(&url).await.unwrap();
    assert_eq!(
        status_of(tidewire::connect(&url).await).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let response = http(addr, "GET / HTTP/1.1\r\n\r\n").await;
    assert!(response.contains("connection limit"), "{response}");
    a.close(1000u16, "").await.unwrap();
    drop(a);
    // The slot comes back once the server side has finished.
    let mut connected = false;
    for _ in 0..100 {
        if tidewire::connect(&url).await.is_ok() {
            connected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(connected);
    assert!(stats.rejections()["limit_total"] >= 2);
}

#[tokio::test]
async fn per_ip_limit_answers_429_for_that_address_only() {
    let limits = Limits {
        max_connections_per_ip: 1,
        ..Limits::default()
    };
    let (addr, stats, _) = start(Server::builder().limits(limits)).await;
    let _first = connect_from("127.0.0.1", addr).await.unwrap();
    let second = connect_from("127.0.0.1", addr).await;
    assert_eq!(status_of(second).await, StatusCode::TOO_MANY_REQUESTS);
    let mut other = connect_from("127.0.0.2", addr).await.unwrap();
    other.send_text("hi").await.unwrap();
    assert_eq!(other.recv().await.unwrap().unwrap(), Message::text("hi"));
    assert_eq!(stats.rejections()["limit_ip"], 1);
}

#[tokio::test]
async fn slowloris_clients_are_dropped_at_the_handshake_timeout_without_blocking_others() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    let (addr, stats, _) = start(Server::builder().config(config)).await;
    const SLOW: usize = 1000;
    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        slow.push(socket.connect(addr).await.unwrap());
    }
    let started = std::time::Instant::now();
    let request = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n";
    // One byte per second from every slow client, while a normal client works.
    let dripper = tokio::spawn(async move {
        for byte in request.iter().take(4) {
            for s in slow.iter_mut() {
                let _ = s.write_all(&[*byte]).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        slow
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let normal = tokio::time::timeout(
        Duration::from_secs(1),
        tidewire::connect(&format!("ws://{addr}/")),
    )
    .await;
    let (mut ws, _) = normal.expect("a normal client connects promptly").unwrap();
    ws.send_text("still serving").await.unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::text("still serving")
    );
    let mut slow = dripper.await.unwrap();
    // Every slow client was cut off around the deadline.
    for s in slow.iter_mut() {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(LIMIT, s.read_to_end(&mut rest))
            .await
            .unwrap();
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");
    assert_eq!(stats.rejections()["timeout"], SLOW as u64);
}

#[tokio::test]
async fn origin_allow_list_refuses_other_origins_with_403() {
    let policy = OriginPolicy::allow(["https://app.example.com", "https://*.example.org"]);
    let (addr, stats, _) = start(Server::builder().origins(policy)).await;
    let url = format!("ws://{addr}/");
    for ok in ["https://app.example.com", "https://chat.example.org"] {
        let (mut ws, _) = ClientBuilder::new(&url)
            .header("Origin", ok)
            .connect()
            .await
            .unwrap();
        ws.close(1000u16, "").await.unwrap();
    }
    // Non-browser clients send no Origin and are allowed.
    tidewire::connect(&url).await.unwrap();
    for bad in [
        "https://evil.example",
        "https://example.org",
        "http://app.example.com",
    ] {
        let refused = ClientBuilder::new(&url)
            .header("Origin", bad)
            .connect()
            .await;
        assert_eq!(status_of(refused).await, StatusCode::FORBIDDEN, "{bad}");
    }
    let response = http(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(
        response.contains("origin https://evil.example is not allowed"),
        "{response}"
    );
    assert_eq!(stats.rejections()["origin"], 4);
}

#[derive(Clone, Debug, PartialEq)]
struct User(String);

#[tokio::test]
async fn auth_hook_attaches_an_identity_or_refuses_with_a_reason() {
    let server = Server::builder()
        .protocols(["chat"])
        .authenticate(|req| async move {
            // The usual token carriers, in order.
            let token = req
                .bearer_token()
                .or_else(|| req.cookie("session"))
                .or_else(|| req.query_param("token"))
                .or_else(|| req.protocols().find_map(|p| p.strip_prefix("token.")))
                .map(str::to_string);
            match token.as_deref() {
                Some("alice-token") => {
                    let mut identity = Extensions::new();
                    identity.insert(User("alice".into()));
                    Ok(identity)
                }
                Some(_) => Err(Reject::new(StatusCode::FORBIDDEN, "token not valid")),
                None => Err(Reject::new(StatusCode::UNAUTHORIZED, "a token is required")),
            }
        })
        .build();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        server
            .serve(listener, |mut session| async move {
                let user = session.identity.get::<User>().cloned().expect("identity");
                let greeting = format!("hello {} via {:?}", user.0, session.ws.protocol());
                let _ = session.ws.send_text(greeting).await;
                while session.ws.recv().await.is_some() {}
            })
            .await
            .unwrap();
    });
    let url = format!("ws://{addr}/");
    let carriers = [
        ClientBuilder::new(&url).header("Authorization", "Bearer alice-token"),
        ClientBuilder::new(&url).header("Cookie", "theme=dark; session=alice-token"),
        ClientBuilder::new(format!("{url}?token=alice-token")),
        ClientBuilder::new(&url)
            .protocol("chat")
            .protocol("token.alice-token"),
    ];
    for (i, builder) in carriers.into_iter().enumerate() {
        let (mut ws, _) = builder.connect().await.unwrap();
        let expected = if i == 3 {
            "hello alice via Some(\"chat\")"
        } else {
            "hello alice via None"
        };
        assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text(expected));
    }
    assert_eq!(
        status_of(tidewire::connect(&url).await).await,
        StatusCode::UNAUTHORIZED
    );
    let wrong = ClientBuilder::new(&url)
        .header("Authorization", "Bearer mallory")
        .connect()
        .await;
    assert_eq!(status_of(wrong).await, StatusCode::FORBIDDEN);
    let response = http(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(
        response.starts_with("HTTP/1.1 401 Unauthorized\r\n")
            && response.contains("a token is required"),
        "{response}"
    );
}

#[tokio::test]
async fn plain_http_on_the_same_port() {
    let builder = Server::builder().http(|req| async move {
        Response::builder()
            .status(if req.uri().path() == "/health" {
                200
            } else {
                404
            })
            .header("Content-Type", "text/plain")
            .body(bytes::Bytes::from_static(b"ok"))
            .unwrap()
    });
    let (addr, _, _) = start(builder).await;
    let health = http(addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        health.starts_with("HTTP/1.1 200 OK\r\n") && health.ends_with("\r\n\r\nok"),
        "{health}"
    );
    let missing = http(addr, "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    // WebSocket still works on the same port.
    let (mut ws, _) = tidewire::connect(&format!("ws://{addr}/")).await.unwrap();
    ws.send_text("x").await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text("x"));
    // Without a handler, plain requests learn that this is a WebSocket endpoint.
    let (addr, _, _) = start(Server::builder()).await;
    let plain = http(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        plain.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{plain}"
    );
}

#[tokio::test]
async fn graceful_shutdown_with_1000_clients_delivers_queued_messages_then_1001() {
    const CLIENTS: usize = 1000;
    let senders: Arc<Mutex<Vec<Sender>>> = Arc::default();
    let server = Server::builder()
        .shutdown_timeout(Duration::from_secs(20))
        .build();
    let token = server.shutdown_token();
    let stats = server.stats();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let registry = senders.clone();
    let serving = tokio::spawn(async move {
        server
            .serve(listener, move |mut session| {
                registry.lock().unwrap().push(session.ws.sender());
                async move { while session.ws.recv().await.is_some() {} }
            })
            .await
            .unwrap();
    });
    let url = format!("ws://{addr}/");
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (mut ws, _) = tidewire::connect(&url).await.unwrap();
        clients.spawn(async move {
            let mut got = Vec::new();
            while let Some(msg) = ws.recv().await {
                match msg.unwrap() {
                    Message::Text(t) => got.push(t.to_string()),
                    Message::Close(frame) => return (got, frame),
                    _ => {}
                }
            }
            panic!("ended without close");
        });
    }
    while stats.opened.load(Ordering::Relaxed) < CLIENTS as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for sender in senders.lock().unwrap().iter() {
        for i in 0..5 {
            sender
                .try_send(Message::text(format!("before shutdown {i}")))
                .unwrap();
        }
    }
    token.cancel();
    let expected: Vec<String> = (0..5).map(|i| format!("before shutdown {i}")).collect();
    let results = tokio::time::timeout(LIMIT, clients.join_all())
        .await
        .unwrap();
    assert_eq!(results.len(), CLIENTS);
    for (got, frame) in results {
        assert_eq!(got, expected);
        assert_eq!(frame, Some(CloseFrame::new(1001, "server shutting down")));
    }
    tokio::time::timeout(LIMIT, serving).await.unwrap().unwrap();
    // The listener is closed after shutdown.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn counters_count_traffic_closes_and_rejections() {
    let (addr, stats, _) = start(Server::builder()).await;
    let url = format!("ws://{addr}/");
    let (mut ws, _) = tidewire::connect(&url).await.unwrap();
    for text in ["one", "two", "three"] {
        ws.send_text(text).await.unwrap();
        ws.recv().await.unwrap().unwrap();
    }
    ws.close(4000u16, "done").await.unwrap();
    let _ = http(addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // The server side finishes right after the closing handshake.
    for _ in 0..100 {
        if stats.closed.load(Ordering::Relaxed) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let traffic = &stats.traffic;
    assert_eq!(traffic.messages_in.load(Ordering::Relaxed), 3);
    assert_eq!(traffic.bytes_in.load(Ordering::Relaxed), 11);
    assert_eq!(traffic.messages_out.load(Ordering::Relaxed), 3);
    assert_eq!(stats.opened.load(Ordering::Relaxed), 1);
    assert_eq!(stats.closed.load(Ordering::Relaxed), 1);
    assert_eq!(stats.closes().get(&4000), Some(&1));
    assert_eq!(stats.rejections().get("bad_request"), Some(&1));
}
