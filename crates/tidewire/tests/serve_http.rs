//! `Server::serve_http` on loopback: a hyper service behind the server's
//! limits and drain, with WebSockets upgraded by the service holding their
//! connection's slot.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use tidewire::http::{Request, Response, StatusCode};
use tidewire::hyper::ConnectionSlot;
use tidewire::{Accept, CancellationToken, Limits, Message, Server, ServerConfig, ServerStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(30);

/// A service: `/ws` upgrades to an echo WebSocket that keeps the
/// connection's slot; `/who` answers the peer address; everything else
/// "ok", or 503 once the server drains.
async fn service(
    mut request: Request<Incoming>,
    draining: CancellationToken,
) -> Result<Response<String>, Infallible> {
    let peer = request.extensions().get::<SocketAddr>().copied();
    if request.uri().path() == "/who" {
        return Ok(Response::new(format!("{}", peer.expect("peer"))));
    }
    if draining.is_cancelled() {
        let mut response = Response::new("shutting down\n".to_string());
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return Ok(response);
    }
    if request.uri().path() != "/ws" {
        return Ok(Response::new("ok\n".to_string()));
    }
    let slot = request
        .extensions()
        .get::<ConnectionSlot>()
        .cloned()
        .expect("every request carries its slot");
    let hook = |_: &tidewire::proto::ServerHandshake| Ok(Accept::default());
    match tidewire::hyper::upgrade(&mut request, ServerConfig::default(), hook) {
        Ok((response, upgrading)) => {
            tokio::spawn(async move {
                let _slot = slot;
                let Ok(mut ws) = upgrading.await else { return };
                while let Some(Ok(msg)) = ws.recv().await {
                    if let m @ (Message::Text(_) | Message::Binary(_)) = msg {
                        let _ = ws.send(m).await;
                    }
                }
            });
            Ok(response)
        }
        Err(err) => Ok(tidewire::hyper::error_response(&err)),
    }
}

struct Running {
    addr: SocketAddr,
    stats: Arc<ServerStats>,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

async fn start(limits: Limits, shutdown_timeout: Duration) -> Running {
    let server = Server::builder()
        .limits(limits)
        .shutdown_timeout(shutdown_timeout)
        .build();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stats, shutdown) = (server.stats(), server.shutdown_token());
    let draining = shutdown.clone();
    let task = tokio::spawn(async move {
        let service = hyper::service::service_fn(move |request| service(request, draining.clone()));
        server.serve_http(listener, service).await
    });
    Running {
        addr,
        stats,
        shutdown,
        task,
    }
}

/// One request on a connection of its own: the whole response as text.
async fn get(addr: SocketAddr, path: &str) -> String {
    get_from(TcpStream::connect(addr).await.unwrap(), path).await
}

async fn get_from(mut stream: TcpStream, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn echo_once(ws: &mut tidewire::WebSocket<tidewire::ClientStream>) {
    ws.send(Message::text("ping")).await.unwrap();
    let answer = tokio::time::timeout(LIMIT, ws.recv()).await.unwrap();
    assert_eq!(answer.unwrap().unwrap(), Message::text("ping"));
}

/// Retries `get` until the answer starts with `status` (a slot comes back
/// once the server side of a closed connection has finished).
async fn eventually_status(addr: SocketAddr, path: &str, status: &str) -> String {
    let mut last = String::new();
    for _ in 0..200 {
        last = get(addr, path).await;
        if last.starts_with(status) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never {status}: last answer {last:?}");
}

#[tokio::test]
async fn an_upgraded_websocket_holds_its_slot_until_it_closes() {
    let limits = Limits {
        max_connections: 1,
        ..Limits::default()
    };
    let server = start(limits, Duration::from_secs(10)).await;
    assert!(get(server.addr, "/").await.starts_with("HTTP/1.1 200"));
    let url = format!("ws://{}/ws", server.addr);
    let (mut ws, _) = eventually_connect(&url).await;
    echo_once(&mut ws).await;
    // The WebSocket is the one connection the limit allows.
    let refused = get(server.addr, "/").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("Retry-After: 1\r\n"), "{refused}");
    assert!(
        refused.ends_with("connection limit; retry later\n"),
        "{refused}"
    );
    ws.close(1000u16, "").await.unwrap();
    drop(ws);
    eventually_status(server.addr, "/", "HTTP/1.1 200").await;
    assert_eq!(server.stats.rejections().get("limit_total"), Some(&1));
    assert!(server.stats.http_requests.load(Ordering::Relaxed) >= 3);
}

async fn eventually_connect(
    url: &str,
) -> (
    tidewire::WebSocket<tidewire::ClientStream>,
    tidewire::http::Response<()>,
) {
    for _ in 0..200 {
        if let Ok(connected) = tidewire::connect(url).await {
            return connected;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("could not connect to {url}");
}

#[tokio::test]
async fn the_per_ip_limit_answers_429_to_that_address_only() {
    let limits = Limits {
        max_connections: 100,
        max_connections_per_ip: 1,
    };
    let server = start(limits, Duration::from_secs(10)).await;
    let held = TcpStream::connect(server.addr).await.unwrap();
    // Let the server admit the held connection before the next one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = get(server.addr, "/").await;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains("Retry-After: 1\r\n"), "{refused}");
    // Another loopback address is another client.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let other = socket.connect(server.addr).await.unwrap();
    let who = get_from(other, "/who").await;
    assert!(who.starts_with("HTTP/1.1 200"), "{who}");
    assert!(who.contains("127.0.0.2:"), "{who}");
    drop(held);
    eventually_status(server.addr, "/", "HTTP/1.1 200").await;
    assert_eq!(server.stats.rejections().get("limit_ip"), Some(&1));
}

#[tokio::test]
async fn the_drain_waits_for_upgraded_websockets_and_answers_new_requests() {
    let server = start(Limits::default(), Duration::from_secs(30)).await;
    let url = format!("ws://{}/ws", server.addr);
    let (mut ws, _) = tidewire::connect(&url).await.unwrap();
    echo_once(&mut ws).await;
    server.shutdown.cancel();
    // Draining: the listener still answers, and the service is asked.
    let answer = eventually_status(server.addr, "/", "HTTP/1.1 503").await;
    assert!(answer.ends_with("shutting down\n"), "{answer}");
    // The WebSocket is the service's: it keeps working, and the drain
    // waits for it.
    echo_once(&mut ws).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !server.task.is_finished(),
        "the drain must wait for the WebSocket"
    );
    ws.close(1000u16, "").await.unwrap();
    drop(ws);
    tokio::time::timeout(LIMIT, server.task)
        .await
        .expect("the drain ends once the WebSocket has closed")
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn the_drain_ends_at_the_shutdown_timeout() {
    let server = start(Limits::default(), Duration::from_millis(300)).await;
    let url = format!("ws://{}/ws", server.addr);
    let (mut ws, _) = tidewire::connect(&url).await.unwrap();
    echo_once(&mut ws).await;
    server.shutdown.cancel();
    tokio::time::timeout(LIMIT, server.task)
        .await
        .expect("serve_http returns at the shutdown timeout")
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn a_keep_alive_connection_closes_after_its_request_in_progress_at_shutdown() {
    let server = start(Limits::default(), Duration::from_secs(30)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // Two requests on one connection; shutdown after the first answer.
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 512];
    let n = tokio::time::timeout(LIMIT, stream.read(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    server.shutdown.cancel();
    // The idle keep-alive connection is closed by the drain, and then the
    // drain is over.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(LIMIT, stream.read_to_end(&mut rest))
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
