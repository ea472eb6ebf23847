//! A hub on loopback, protocol clients over `tidewire::connect`, and a
//! plain HTTP client for the API.

#![allow(dead_code)]

pub mod engine;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tidewire::{CancellationToken, ClientStream, Message, WebSocket};
use tidewire_hub::{Config, Hub, MemoryEngine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every wait in the tests is bounded by this.
pub const LIMIT: Duration = Duration::from_secs(10);

pub const API_KEY: &str = "test-api-key";
pub const SECRET: &str = "test-secret";

pub struct TestServer {
    pub addr: SocketAddr,
    pub hub: Hub,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("ws://{}/connection/websocket", self.addr)
    }
}

/// The embedded defaults, with an HS256 secret for tokens; with
/// `TIDEWIRE_TEST_EVENT_LOOP=1`, WebSockets on the event loop
/// (`server.event_loop`): the same tests for both fronts.
pub fn config() -> Config {
    let mut config = Config::default();
    config.token.hmac_secret = Some(SECRET.into());
    config.server.event_loop = Some(on_event_loop());
    config
}

/// Whether the tests run with WebSockets on the event loop.
pub fn on_event_loop() -> bool {
    std::env::var("TIDEWIRE_TEST_EVENT_LOOP").is_ok_and(|v| v == "1")
}

pub async fn start(config: Config) -> TestServer {
    start_on(config, Arc::new(MemoryEngine::new())).await
}

/// A hub over `engine` (shared by several hubs: nodes of one cluster).
pub async fn start_on(config: Config, engine: Arc<MemoryEngine>) -> TestServer {
    if config.server.event_loop == Some(true) {
        let config = Config {
            server: tidewire_hub::config::ServerSettings {
                // Two threads: connections of one test on both.
                event_loop_threads: 2,
                ..config.server.clone()
            },
            ..config
        };
        let hub = Hub::new(config, engine).unwrap();
        let serving = tidewire_hub::http::start_on_event_loop(
            hub.clone(),
            "127.0.0.1:0".parse().unwrap(),
            API_KEY,
        )
        .unwrap();
        let addr = serving.local_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serving.run(shutdown.clone()));
        return TestServer {
            addr,
            hub,
            shutdown,
            task,
        };
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hub = Hub::new(config, engine).unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(tidewire_hub::http::serve(
        hub.clone(),
        listener,
        API_KEY,
        None,
        shutdown.clone(),
    ));
    TestServer {
        addr,
        hub,
        shutdown,
        task,
    }
}

pub struct Client {
    pub ws: WebSocket<ClientStream>,
    next_id: u64,
    /// Pushes received while waiting for a reply.
    pushes: VecDeque<Value>,
    /// Replies received while waiting for a push.
    replies: VecDeque<Value>,
}

impl Client {
    /// Opens a WebSocket (no `connect` yet).
    pub async fn open(server: &TestServer) -> Client {
        Client::open_with_headers(server, &[]).await
    }

    /// Opens a WebSocket whose upgrade request has these headers too.
    pub async fn open_with_headers(server: &TestServer, headers: &[(&str, &str)]) -> Client {
        let mut builder = tidewire::ClientBuilder::new(server.url());
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        let (ws, response) = builder
            .protocol(tidewire_hub::protocol::SUBPROTOCOL)
            .connect()
            .await
            .expect("WebSocket connect");
        assert_eq!(
            response
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok()),
            Some(tidewire_hub::protocol::SUBPROTOCOL)
        );
        Client {
            ws,
            next_id: 0,
            pushes: VecDeque::new(),
            replies: VecDeque::new(),
        }
    }

    /// Opens and connects (anonymous, or with a token); returns the reply.
    pub async fn connect(server: &TestServer, token: Option<&str>) -> (Client, Value) {
        let mut client = Client::open(server).await;
        let body = match token {
            Some(t) => json!({ "token": t }),
            None => json!({}),
        };
        let reply = client.call("connect", body).await;
        assert!(reply.get("connect").is_some(), "connect failed: {reply}");
        (client, reply["connect"].clone())
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send_text(text.to_string()).await.expect("send");
    }

    /// The next JSON message (skipping application pings), or None when
    /// the connection ended; panics after LIMIT.
    pub async fn next_message(&mut self) -> Option<Value> {
        loop {
            let msg = tokio::time::timeout(LIMIT, self.ws.recv())
                .await
                .expect("no message in time")?;
            match msg {
                Ok(Message::Text(text)) => {
                    let value: Value = serde_json::from_str(text.as_str()).expect("JSON");
                    if value["push"].get("ping").is_some() {
                        continue;
                    }
                    return Some(value);
                }
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Sends a command and waits for its reply (pushes are kept).
    pub async fn call(&mut self, command: &str, body: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut object = serde_json::Map::new();
        object.insert("id".into(), id.into());
        object.insert(command.into(), body);
        self.send_raw(&Value::Object(object).to_string()).await;
        self.reply_to(id).await
    }

    pub async fn reply_to(&mut self, id: u64) -> Value {
        if let Some(at) = self.replies.iter().position(|r| r["id"] == id) {
            return self.replies.remove(at).unwrap();
        }
        loop {
            let msg = self
                .next_message()
                .await
                .expect("connection ended before the reply");
            if msg.get("push").is_some() {
                self.pushes.push_back(msg["push"].clone());
            } else if msg["id"] == id {
                return msg;
            } else {
                self.replies.push_back(msg);
            }
        }
    }

    /// A command's result (panics on an error reply).
    pub async fn ok(&mut self, command: &str, body: Value) -> Value {
        let reply = self.call(command, body).await;
        assert!(reply.get("error").is_none(), "{command} failed: {reply}");
        reply[command].clone()
    }

    /// A command's error code (panics on success).
    pub async fn error_code(&mut self, command: &str, body: Value) -> u64 {
        let reply = self.call(command, body).await;
        reply["error"]["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("{command} should fail: {reply}"))
    }

    /// The next push (the `push` object).
    pub async fn push(&mut self) -> Value {
        if let Some(p) = self.pushes.pop_front() {
            return p;
        }
        loop {
            let msg = self
                .next_message()
                .await
                .expect("connection ended before a push");
            if msg.get("push").is_some() {
                return msg["push"].clone();
            }
            self.replies.push_back(msg);
        }
    }

    /// The next publication push of `channel` (skipping join/leave).
    pub async fn publication(&mut self, channel: &str) -> Value {
        loop {
            let p = self.push().await;
            if p["channel"] == channel && p.get("pub").is_some() {
                return p["pub"].clone();
            }
        }
    }

    /// The next `presence_diff` push of `channel` (its body), skipping
    /// other pushes.
    pub async fn presence_diff(&mut self, channel: &str) -> Value {
        loop {
            let p = self.push().await;
            if p["channel"] == channel && p.get("presence_diff").is_some() {
                return p["presence_diff"].clone();
            }
        }
    }

    /// Asserts nothing (but pings) arrives for a while.
    pub async fn expect_silence(&mut self, wait: Duration) {
        assert!(self.pushes.is_empty(), "unexpected push {:?}", self.pushes);
        if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(wait, self.ws.recv()).await {
            assert!(t.as_str().contains("\"ping\""), "unexpected message {t}");
        }
    }

    /// Waits for the end of the connection: the close frame's code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(LIMIT, self.ws.recv())
                .await
                .expect("connection did not end in time")
            {
                None => return None,
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code.0),
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v.get("push").is_some() {
                        self.pushes.push_back(v["push"].clone());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) => return None,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = tokio::time::timeout(LIMIT, self.ws.close(1000u16, "bye")).await;
    }
}

/// An HTTP request over a fresh connection; returns status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let (status, _, body) = http_response(addr, method, path, headers, body).await;
    (status, body)
}

/// An HTTP request: status, response head (lowercase) and body.
pub async fn http_response(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    tokio::time::timeout(LIMIT, async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let response = String::from_utf8_lossy(&response).to_string();
        let status = response[9..12].parse().unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        (status, head.to_ascii_lowercase(), body.to_string())
    })
    .await
    .expect("HTTP request did not finish in time")
}

/// `POST /api/<method>` with the test key; status and JSON body.
pub async fn api(server: &TestServer, method: &str, body: Value) -> (u16, Value) {
    let auth = format!("apikey {API_KEY}");
    let (status, text) = http(
        server.addr,
        "POST",
        &format!("/api/{method}"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &body.to_string(),
    )
    .await;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// An HS256 connection token.
pub fn token(user: &str, ttl_secs: i64, channels: &[&str]) -> String {
    let exp = tidewire_hub::auth::now_unix() as i64 + ttl_secs;
    tidewire_hub::auth::sign_hs256(
        SECRET,
        &tidewire_hub::auth::TokenClaims {
            sub: user.into(),
            exp: Some(exp.max(0) as u64),
            channels: channels.iter().map(|c| c.to_string()).collect(),
            channel: None,
            info: Some(json!({ "name": format!("user {user}") })),
        },
    )
    .unwrap()
}

/// An HS256 subscription token.
pub fn subscription_token(user: &str, channel: &str, ttl_secs: i64) -> String {
    let exp = tidewire_hub::auth::now_unix() as i64 + ttl_secs;
    tidewire_hub::auth::sign_hs256(
        SECRET,
        &tidewire_hub::auth::TokenClaims {
            sub: user.into(),
            exp: Some(exp.max(0) as u64),
            channel: Some(channel.into()),
            ..Default::default()
        },
    )
    .unwrap()
}

/// Waits until `check` holds (polling), at most LIMIT.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
