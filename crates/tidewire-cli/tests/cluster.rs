//! Two `tidewire serve` nodes on one Redis (`--engine redis`), as a web
//! team runs them behind a load balancer: a client on either node gets
//! what is published on the other, recovers on one node what it missed
//! while away from the other, and `info` lists both nodes.
//!
//! The test starts its own redis-server (scripts/install-deps installs
//! it; a missing one is a failure) on a free loopback port and stops it
//! by PID.

mod common;

use std::time::Duration;

use common::{start_serve, Served, LIMIT};
use serde_json::{json, Value};
use tidewire::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const API_KEY: &str = "cluster-test-key";

struct RedisServer {
    port: u16,
    child: std::process::Child,
}

impl RedisServer {
    fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/install-deps installs it)");
        // Stopped by its drop should it never listen.
        let server = RedisServer { port, child };
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("redis-server did not listen on {port}");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn node(redis: &RedisServer, name: &str) -> Served {
    let dir = std::env::temp_dir().join(format!("tidewire-cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--engine",
        "redis",
        "--redis-url",
        &url,
    ];
    start_serve(&dir, &args, &[("TIDEWIRE_API_KEY", API_KEY)], "serve.log").await
}

async fn api(node: &Served, method: &str, body: Value) -> Value {
    let body = body.to_string();
    let request = format!(
        "POST /api/{method} HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {API_KEY}\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = tokio::time::timeout(LIMIT, async {
        let mut tcp = tokio::net::TcpStream::connect(&node.addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        tcp.read_to_end(&mut response).await.unwrap();
        String::from_utf8(response).unwrap()
    })
    .await
    .expect("the node answers in time");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{method}: {answer}");
    serde_json::from_str(body).unwrap()
}

/// A client of the hub's JSON protocol.
struct Client {
    ws: tidewire::WebSocket<tidewire::ClientStream>,
    next_id: u64,
    pushes: Vec<Value>,
}

impl Client {
    async fn connect(node: &Served) -> Client {
        let url = format!("ws://{}/connection/websocket", node.addr);
        let (ws, _) = tidewire::connect(&url).await.unwrap();
        let mut client = Client {
            ws,
            next_id: 1,
            pushes: Vec::new(),
        };
        client.call("connect", json!({})).await;
        client
    }

    async fn call(&mut self, command: &str, body: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let text = json!({"id": id, command: body}).to_string();
        self.ws.send(Message::text(text)).await.unwrap();
        loop {
            let frame = self.next().await;
            if frame["id"] == id {
                assert!(frame.get("error").is_none(), "{command}: {frame}");
                return frame[command].clone();
            }
            self.pushes.push(frame);
        }
    }

    async fn next(&mut self) -> Value {
        let message = tokio::time::timeout(LIMIT, self.ws.recv())
            .await
            .expect("a message in time")
            .expect("the connection is open")
            .unwrap();
        match message {
            Message::Text(text) => serde_json::from_str(text.as_str()).unwrap(),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The next publication in `channel`: (offset, data.n).
    async fn publication(&mut self, channel: &str) -> (u64, Value) {
        loop {
            let push = if self.pushes.is_empty() {
                self.next().await
            } else {
                self.pushes.remove(0)
            };
            if push["push"]["channel"] == channel {
                if let Some(p) = push["push"].get("pub") {
                    return (p["offset"].as_u64().unwrap(), p["data"]["n"].clone());
                }
            }
        }
    }
}

#[tokio::test]
async fn two_nodes_on_redis_deliver_recover_and_list_each_other() {
    let redis = RedisServer::start();
    let a = node(&redis, "a").await;
    let b = node(&redis, "b").await;

    // Subscribed on A, published on B (and the other way round).
    let mut on_a = Client::connect(&a).await;
    let sub = on_a
        .call("subscribe", json!({"channel": "news", "recover": true}))
        .await;
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    let mut on_b = Client::connect(&b).await;
    on_b.call("subscribe", json!({"channel": "news"})).await;
    for n in 1..=3 {
        let reply = api(&b, "publish", json!({"channel": "news", "data": {"n": n}})).await;
        assert_eq!(reply["offset"], n, "{reply}");
    }
    on_a.call("publish", json!({"channel": "news", "data": {"n": 4}}))
        .await;
    for client in [&mut on_a, &mut on_b] {
        for n in 1..=4u64 {
            assert_eq!(client.publication("news").await, (n, json!(n)));
        }
    }

    // Away from A; missed publications come back on B, exactly.
    drop(on_a);
    for n in 5..=6 {
        api(&a, "publish", json!({"channel": "news", "data": {"n": n}})).await;
    }
    let mut back = Client::connect(&b).await;
    let reply = back
        .call(
            "subscribe",
            json!({"channel": "news", "recover": true, "offset": 4, "epoch": epoch}),
        )
        .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    let missed: Vec<u64> = reply["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(missed, [5, 6]);

    // Each node learns of the other from its heartbeats.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let info = api(&a, "info", json!({})).await;
        let nodes = info["nodes"].as_array().cloned().unwrap_or_default();
        if nodes.len() == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "info never listed both nodes: {info}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
