//! tidewire mounted in a real hyper 1.x server and a real axum Router on
//! loopback, with our client (and raw sockets for the refusals).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::response::{IntoResponse, Response as AxumResponse};
use axum::routing::{any, get};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tidewire::axum::WebSocketUpgrade;
use tidewire::http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use tidewire::proto::{handshake, ServerHandshake};
use tidewire::{
    Accept, ClientBuilder, DeflateConfig, Error, Message, Reject, ServerConfig, WebSocket,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(10);

/// Every test body runs under this bound.
async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test took longer than its bound")
}

fn deflate_config() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.protocol.deflate = Some(DeflateConfig::default());
    config
}

/// Echoes data messages until the connection ends.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut ws: WebSocket<S>) {
    while let Some(Ok(msg)) = ws.recv().await {
        if let m @ (Message::Text(_) | Message::Binary(_)) = msg {
            if ws.send(m).await.is_err() {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------- hyper

async fn hyper_service(mut req: Request<Incoming>) -> Result<Response<String>, Infallible> {
    if req.uri().path() != "/ws" {
        return Ok(Response::new(format!(
            "plain {} {}\n",
            req.method(),
            req.uri()
        )));
    }
    let hook = |hs: &ServerHandshake| {
        if hs.request().headers().contains_key("x-deny") {
            return Err(Reject::new(StatusCode::FORBIDDEN, "denied by the hook"));
        }
        let mut headers = HeaderMap::new();
        headers.insert("x-mounted-in", HeaderValue::from_static("hyper"));
        Ok(Accept {
            protocol: hs.protocols().find(|p| *p == "chat").map(String::from),
            headers,
        })
    };
    match tidewire::hyper::upgrade(&mut req, deflate_config(), hook) {
        Ok((response, upgrading)) => {
            tokio::spawn(async move {
                if let Ok(ws) = upgrading.await {
                    echo(ws).await;
                }
            });
            Ok(response)
        }
        Err(err) => Ok(tidewire::hyper::error_response(&err)),
    }
}

/// A hyper 1.x HTTP/1.1 server with upgrades, as an application runs it.
async fn hyper_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(hyper_service))
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

// ----------------------------------------------------------------- axum

async fn axum_ws(ws: WebSocketUpgrade) -> AxumResponse {
    // Server preference: v2 over v1, whatever order the client offers.
    ws.protocols(["chat.v2", "chat.v1"])
        .config(deflate_config())
        .header(
            "x-mounted-in".parse().unwrap(),
            HeaderValue::from_static("axum"),
        )
        .on_upgrade(echo)
}

/// Plain HTTP and WebSocket on one route.
async fn axum_both(ws: Option<WebSocketUpgrade>) -> AxumResponse {
    match ws {
        Some(ws) => ws.on_upgrade(echo),
        None => "plain HTTP on the WebSocket route\n".into_response(),
    }
}

async fn axum_server() -> SocketAddr {
    let app = Router::new()
        .route("/", get(|| async { "hello from axum\n" }))
        .route("/ws", get(axum_ws))
        .route("/any", any(axum_ws))
        .route("/both", get(axum_both));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

// -------------------------------------------------------------- helpers

/// Sends raw request bytes and reads one response (head and
/// Content-Length body).
async fn raw_exchange(addr: SocketAddr, request: &str) -> (Response<()>, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    loop {
        if let Some((head, len)) = handshake::parse_response(&buf, 1 << 16).unwrap() {
            let body_len: usize = head
                .headers()
                .get("content-length")
                .map_or(0, |v| v.to_str().unwrap().parse().unwrap());
            while buf.len() < len + body_len {
                assert_ne!(stream.read_buf(&mut buf).await.unwrap(), 0, "EOF in body");
            }
            let body = String::from_utf8(buf[len..len + body_len].to_vec()).unwrap();
            return (head, body);
        }
        assert_ne!(stream.read_buf(&mut buf).await.unwrap(), 0, "EOF in head");
    }
}

fn upgrade_request(method: &str, path: &str, addr: SocketAddr, version: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n\r\n"
    )
}

async fn echo_round_trips<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocket<S>) {
    ws.send_text("hello through the mount").await.unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::text("hello through the mount")
    );
    ws.send_binary(vec![0u8, 1, 2, 254, 255]).await.unwrap();
    assert_eq!(
        ws.recv().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 254, 255])
    );
    // Large and compressible: exercises permessage-deflate when agreed.
    let big = "tidewire ".repeat(20_000);
    ws.send_text(big.as_str()).await.unwrap();
    assert_eq!(ws.recv().await.unwrap().unwrap(), Message::text(big));
}

async fn close<S: AsyncRead + AsyncWrite + Unpin>(mut ws: WebSocket<S>) {
    ws.close(1000u16, "done").await.unwrap();
    loop {
        match ws.recv().await {
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("close failed: {e}"),
        }
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn hyper_echo_text_and_binary() {
    bounded(async {
        let addr = hyper_server().await;
        let (mut ws, response) = tidewire::connect(&format!("ws://{addr}/ws")).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(response.headers()["x-mounted-in"], "hyper");
        assert_eq!(ws.protocol(), None);
        assert!(ws.connection().deflate_params().is_none());
        echo_round_trips(&mut ws).await;
        close(ws).await;
    })
    .await
}

#[tokio::test]
async fn hyper_subprotocol_and_deflate() {
    bounded(async {
        let addr = hyper_server().await;
        let (mut ws, response) = ClientBuilder::new(format!("ws://{addr}/ws"))
            .protocol("other")
            .protocol("chat")
            .deflate(Some(DeflateConfig::default()))
            .connect()
            .await
            .unwrap();
        assert_eq!(ws.protocol(), Some("chat"));
        assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
        let ext = response.headers()["sec-websocket-extensions"]
            .to_str()
            .unwrap();
        assert!(ext.starts_with("permessage-deflate"), "{ext}");
        assert!(ws.connection().deflate_params().is_some());
        echo_round_trips(&mut ws).await;
        close(ws).await;
    })
    .await
}

#[tokio::test]
async fn hyper_plain_http_and_refusals() {
    bounded(async {
        let addr = hyper_server().await;
        let (resp, body) =
            raw_exchange(addr, &format!("GET /page HTTP/1.1\r\nHost: {addr}\r\n\r\n")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body, "plain GET /page\n");

        let (resp, body) = raw_exchange(addr, &upgrade_request("GET", "/ws", addr, "8")).await;
        assert_eq!(resp.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(resp.headers()["sec-websocket-version"], "13");
        assert!(body.contains("unsupported Sec-WebSocket-Version"), "{body}");

        let (resp, body) = raw_exchange(addr, &upgrade_request("POST", "/ws", addr, "13")).await;
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()["allow"], "GET");
        assert!(body.contains("method POST is not allowed"), "{body}");

        let (resp, body) = raw_exchange(
            addr,
            &upgrade_request("GET", "/ws", addr, "13").replace(
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Key: c2hvcnQ=",
            ),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert!(body.contains("Sec-WebSocket-Key"), "{body}");

        let denied = ClientBuilder::new(format!("ws://{addr}/ws"))
            .header("x-deny", "1")
            .connect()
            .await
            .unwrap_err();
        assert!(
            matches!(
                denied,
                Error::Handshake(tidewire::proto::HandshakeError::UnexpectedStatus(
                    StatusCode::FORBIDDEN
                ))
            ),
            "{denied:?}"
        );
    })
    .await
}

/// Frames sent right behind the request head, in the same write, are read
/// by hyper with the head; they must reach the WebSocket.
#[tokio::test]
async fn hyper_frames_pipelined_behind_the_request() {
    bounded(async {
        let addr = hyper_server().await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut bytes = upgrade_request("GET", "/ws", addr, "13").into_bytes();
        // A masked text frame "hi" (mask 1,2,3,4).
        bytes.extend_from_slice(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
        stream.write_all(&bytes).await.unwrap();
        let mut buf = Vec::new();
        let len = loop {
            assert_ne!(stream.read_buf(&mut buf).await.unwrap(), 0);
            if let Some((head, len)) = handshake::parse_response(&buf, 1 << 16).unwrap() {
                assert_eq!(head.status(), StatusCode::SWITCHING_PROTOCOLS);
                assert_eq!(
                    head.headers()["sec-websocket-accept"],
                    "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
                );
                break len;
            }
        };
        while buf.len() < len + 4 {
            assert_ne!(stream.read_buf(&mut buf).await.unwrap(), 0);
        }
        assert_eq!(&buf[len..len + 4], &[0x81, 2, b'h', b'i']);
    })
    .await
}

#[tokio::test]
async fn axum_echo_text_and_binary() {
    bounded(async {
        let addr = axum_server().await;
        let (mut ws, response) = tidewire::connect(&format!("ws://{addr}/ws")).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(response.headers()["x-mounted-in"], "axum");
        assert_eq!(ws.protocol(), None);
        echo_round_trips(&mut ws).await;
        close(ws).await;
    })
    .await
}

#[tokio::test]
async fn axum_subprotocol_in_server_preference_and_deflate() {
    bounded(async {
        let addr = axum_server().await;
        let (mut ws, response) = ClientBuilder::new(format!("ws://{addr}/ws"))
            .protocol("chat.v1")
            .protocol("chat.v2")
            .deflate(Some(DeflateConfig::default()))
            .connect()
            .await
            .unwrap();
        assert_eq!(ws.protocol(), Some("chat.v2"));
        let ext = response.headers()["sec-websocket-extensions"]
            .to_str()
            .unwrap();
        assert!(ext.starts_with("permessage-deflate"), "{ext}");
        assert!(ws.connection().deflate_params().is_some());
        echo_round_trips(&mut ws).await;
        close(ws).await;

        let (ws, _) = ClientBuilder::new(format!("ws://{addr}/ws"))
            .protocol("chat.v1")
            .protocol("chat.v0")
            .connect()
            .await
            .unwrap();
        assert_eq!(ws.protocol(), Some("chat.v1"));
        assert!(ws.connection().deflate_params().is_none());
        close(ws).await;

        let (ws, response) = ClientBuilder::new(format!("ws://{addr}/ws"))
            .protocol("unknown")
            .connect()
            .await
            .unwrap();
        assert_eq!(ws.protocol(), None);
        assert!(response.headers().get("sec-websocket-protocol").is_none());
        close(ws).await;
    })
    .await
}

#[tokio::test]
async fn axum_plain_routes_still_work() {
    bounded(async {
        let addr = axum_server().await;
        let (resp, body) =
            raw_exchange(addr, &format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body, "hello from axum\n");

        // One route, both kinds.
        let (resp, body) =
            raw_exchange(addr, &format!("GET /both HTTP/1.1\r\nHost: {addr}\r\n\r\n")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body, "plain HTTP on the WebSocket route\n");
        let (mut ws, _) = tidewire::connect(&format!("ws://{addr}/both"))
            .await
            .unwrap();
        echo_round_trips(&mut ws).await;
        close(ws).await;
    })
    .await
}

#[tokio::test]
async fn axum_refusals() {
    bounded(async {
        let addr = axum_server().await;
        let (resp, body) = raw_exchange(addr, &upgrade_request("GET", "/ws", addr, "8")).await;
        assert_eq!(resp.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(resp.headers()["sec-websocket-version"], "13");
        assert_eq!(resp.headers()["upgrade"], "websocket");
        assert!(
            body.contains("unsupported Sec-WebSocket-Version \"8\"; supported: 13"),
            "{body}"
        );

        // Our extractor on a route that takes any method.
        let (resp, body) = raw_exchange(addr, &upgrade_request("POST", "/any", addr, "13")).await;
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()["allow"], "GET");
        assert!(body.contains("a WebSocket handshake uses GET"), "{body}");
        // axum's own method routing on a `get` route.
        let (resp, _) = raw_exchange(addr, &upgrade_request("PUT", "/ws", addr, "13")).await;
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);

        // Not an upgrade at all, on a WebSocket-only route.
        let (resp, body) =
            raw_exchange(addr, &format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\n\r\n")).await;
        assert_eq!(resp.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(resp.headers()["sec-websocket-version"], "13");
        assert!(body.contains("Upgrade header"), "{body}");

        // Invalid upgrade on the dual route: refused, not served as plain.
        let (resp, _) = raw_exchange(addr, &upgrade_request("GET", "/both", addr, "7")).await;
        assert_eq!(resp.status(), StatusCode::UPGRADE_REQUIRED);

        let (resp, body) = raw_exchange(
            addr,
            &upgrade_request("GET", "/ws", addr, "13")
                .replace("Connection: Upgrade", "Connection: keep-alive"),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert!(body.contains("Connection"), "{body}");

        let (resp, _) = raw_exchange(
            addr,
            &upgrade_request("GET", "/ws", addr, "13").replace("HTTP/1.1", "HTTP/1.0"),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::HTTP_VERSION_NOT_SUPPORTED);
    })
    .await
}
