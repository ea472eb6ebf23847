//! `tidewire serve` nodes on one Redis (`--engine redis`), as a web team
//! runs them: two side by side (a client on either node gets what is
//! published on the other, recovers on one what it missed while away from
//! the other, `info` lists both), and three behind haproxy with no sticky
//! sessions, one of them killed with SIGKILL while publications go on.
//!
//! The tests start their own redis-server and haproxy (scripts/install-deps
//! installs them; a missing one is a failure) on free loopback ports and
//! stop them by PID.

mod common;
#[path = "../../tidewire-hub/tests/support/redis_server.rs"]
mod redis_server;

use std::time::Duration;

use common::{start_serve, Served, LIMIT};
use redis_server::RedisServer;
use serde_json::{json, Value};
use tidewire::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const API_KEY: &str = "cluster-test-key";

async fn node(redis: &RedisServer, name: &str) -> Served {
    node_with(redis, name, "").await
}

/// A node with `toml` as its configuration file.
async fn node_with(redis: &RedisServer, name: &str, toml: &str) -> Served {
    let dir = std::env::temp_dir().join(format!("tidewire-cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tidewire.toml"), toml).unwrap();
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

/// haproxy in front of `nodes`, as docs/deployment.md configures it:
/// leastconn, health checks on /health, WebSocket tunnels, connection
/// failures sent to another node.
struct Haproxy {
    addr: String,
    child: std::process::Child,
}

impl Haproxy {
    fn start(nodes: &[&Served]) -> Haproxy {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut config = format!(
            "global\n  maxconn 4096\n\
             defaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  \
             timeout server 60s\n  timeout tunnel 1h\n  option redispatch\n  retries 3\n\
             frontend tidewire\n  bind 127.0.0.1:{port}\n  default_backend nodes\n\
             backend nodes\n  balance leastconn\n  option httpchk GET /health\n  \
             http-check expect status 200\n  default-server inter 300ms fall 2 rise 2\n"
        );
        for (n, node) in nodes.iter().enumerate() {
            config.push_str(&format!("  server node{n} {} check\n", node.addr));
        }
        let path = std::env::temp_dir().join(format!(
            "tidewire-haproxy-{}-{port}.cfg",
            std::process::id()
        ));
        std::fs::write(&path, config).unwrap();
        let child = std::process::Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("haproxy (scripts/install-deps installs it)");
        let proxy = Haproxy {
            addr: format!("127.0.0.1:{port}"),
            child,
        };
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return proxy;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("haproxy did not listen on {port}");
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn api(addr: &str, method: &str, body: Value) -> Value {
    let body = body.to_string();
    let request = format!(
        "POST /api/{method} HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {API_KEY}\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = tokio::time::timeout(LIMIT, async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
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
    async fn connect(addr: &str) -> Client {
        let url = format!("ws://{addr}/connection/websocket");
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
    let mut on_a = Client::connect(&a.addr).await;
    let sub = on_a
        .call("subscribe", json!({"channel": "news", "recover": true}))
        .await;
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    let mut on_b = Client::connect(&b.addr).await;
    on_b.call("subscribe", json!({"channel": "news"})).await;
    for n in 1..=3 {
        let reply = api(
            &b.addr,
            "publish",
            json!({"channel": "news", "data": {"n": n}}),
        )
        .await;
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
        api(
            &a.addr,
            "publish",
            json!({"channel": "news", "data": {"n": n}}),
        )
        .await;
    }
    let mut back = Client::connect(&b.addr).await;
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
        let info = api(&a.addr, "info", json!({})).await;
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

/// A subscriber that follows a channel through the load balancer: on a
/// lost connection it connects again (any node) and subscribes with its
/// last position. Returns the `n` of every publication, in the order
/// seen, and how many times it reconnected; it stays connected after the
/// last one until `done`.
async fn follow(
    addr: String,
    channel: &'static str,
    last: u64,
    done: tidewire::CancellationToken,
) -> (Vec<u64>, usize) {
    let url = format!("ws://{addr}/connection/websocket");
    let mut got = Vec::new();
    let mut position: Option<(u64, String)> = None;
    let mut reconnects = 0;
    loop {
        let Ok((mut ws, _)) = tidewire::connect(&url).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let subscribe = match &position {
            None => json!({"channel": channel, "recover": true}),
            Some((offset, epoch)) => {
                json!({"channel": channel, "recover": true, "offset": offset, "epoch": epoch})
            }
        };
        let batch = format!(
            "{}\n{}",
            json!({"id": 1, "connect": {}}),
            json!({"id": 2, "subscribe": subscribe})
        );
        if ws.send(Message::text(batch)).await.is_err() {
            continue;
        }
        let mut subscribed = false;
        loop {
            let next = tokio::time::timeout(LIMIT, ws.recv())
                .await
                .expect("a message in time");
            let Some(Ok(Message::Text(text))) = next else {
                break;
            };
            for line in text.as_str().lines() {
                let frame: Value = serde_json::from_str(line).unwrap();
                if frame["id"] == 2 {
                    let reply = &frame["subscribe"];
                    assert!(frame.get("error").is_none(), "{frame}");
                    if position.is_some() {
                        assert_eq!(reply["recovered"], true, "{reply}");
                    }
                    for p in reply["publications"].as_array().into_iter().flatten() {
                        got.push(p["data"]["n"].as_u64().unwrap());
                    }
                    position = Some((
                        reply["offset"].as_u64().unwrap(),
                        reply["epoch"].as_str().unwrap().to_owned(),
                    ));
                    subscribed = true;
                } else if let Some(p) = frame["push"].get("pub") {
                    if frame["push"]["channel"] == channel && subscribed {
                        got.push(p["data"]["n"].as_u64().unwrap());
                        if let Some(position) = position.as_mut() {
                            position.0 = p["offset"].as_u64().unwrap();
                        }
                    }
                }
            }
            if got.last() == Some(&last) {
                done.cancelled().await;
                return (got, reconnects);
            }
        }
        reconnects += 1;
    }
}

#[tokio::test]
async fn three_nodes_behind_haproxy_lose_nothing_when_one_is_killed() {
    let redis = RedisServer::start();
    // Short presence entries: a killed node's clients are gone quickly.
    let toml = "[client]\npresence_ttl = \"3s\"\n";
    let mut nodes = Vec::new();
    for n in 0..3 {
        nodes.push(node_with(&redis, &format!("lb{n}"), toml).await);
    }
    let haproxy = Haproxy::start(&nodes.iter().collect::<Vec<_>>());
    // Until haproxy's checks see every node up.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    const LAST: u64 = 200;
    let done = tidewire::CancellationToken::new();
    let followers: Vec<_> = (0..6)
        .map(|_| tokio::spawn(follow(haproxy.addr.clone(), "room", LAST, done.clone())))
        .collect();
    // leastconn spreads them: every node has some.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut counts = Vec::new();
        for node in &nodes {
            counts
                .push(api(&node.addr, "info", json!({})).await["counts"]["subscriptions"].clone());
        }
        if counts.iter().all(|c| c.as_u64().unwrap_or(0) >= 1)
            && counts.iter().map(|c| c.as_u64().unwrap_or(0)).sum::<u64>() == 6
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscriptions per node: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let present = api(&nodes[0].addr, "presence", json!({"channel": "room"})).await;
    assert_eq!(
        present["clients"].as_array().map(|c| c.len()),
        Some(6),
        "{present}"
    );

    // Publications go on (to a node that stays) while node 2 is killed.
    let publisher = nodes[0].addr.clone();
    let mut victim = nodes.pop().unwrap();
    for n in 1..=LAST {
        api(
            &publisher,
            "publish",
            json!({"channel": "room", "data": {"n": n}}),
        )
        .await;
        if n == 60 {
            victim.child.start_kill().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = victim.child.wait().await;
    // The killed node's presence entries expire, with no other node
    // cleaning up: the six (some reconnected, with new ids) are left.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let present = api(&nodes[0].addr, "presence", json!({"channel": "room"})).await;
        if present["clients"].as_array().map(|c| c.len()) == Some(6) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence: {present}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    done.cancel();
    let mut reconnected = 0;
    for follower in followers {
        let (got, reconnects) = tokio::time::timeout(LIMIT, follower)
            .await
            .expect("every follower gets the last publication")
            .unwrap();
        assert_eq!(
            got,
            (1..=LAST).collect::<Vec<_>>(),
            "every publication once, in order"
        );
        reconnected += reconnects;
    }
    assert!(reconnected >= 1, "the killed node's clients reconnected");
    drop(haproxy);
}
