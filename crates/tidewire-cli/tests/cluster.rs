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
#[path = "../../tidewire-hub/tests/support/nats_server.rs"]
mod nats_server;
#[path = "../../tidewire-hub/tests/support/redis_cluster.rs"]
mod redis_cluster;
#[path = "../../tidewire-hub/tests/support/redis_server.rs"]
mod redis_server;
#[path = "../../tidewire-hub/tests/support/stalling_proxy.rs"]
mod stalling_proxy;

use std::time::Duration;

use common::{start_serve, ScratchDir, Served, LIMIT};
use nats_server::NatsServer;
use redis_cluster::RedisCluster;
use redis_server::{Persistence, RedisServer};
use serde_json::{json, Value};
use stalling_proxy::StallingProxy;
use tidewire::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const API_KEY: &str = "cluster-test-key";

async fn node(redis: &RedisServer, name: &str) -> Served {
    node_with(redis, name, "").await
}

/// A node with `toml` as its configuration file.
async fn node_with(redis: &RedisServer, name: &str, toml: &str) -> Served {
    node_at(&redis.url(), &[], name, toml).await
}

/// A node on the Redis at `url`, with more flags and `toml` as its
/// configuration file.
async fn node_at(url: &str, flags: &[&str], name: &str, toml: &str) -> Served {
    let mut args = vec!["--engine", "redis", "--redis-url", url];
    if !flags.contains(&"--listen") {
        args.extend(["--listen", "127.0.0.1:0"]);
    }
    args.extend_from_slice(flags);
    node_in_scratch(&format!("cluster-{name}"), toml, &args).await
}

/// `tidewire serve ARGS` with the API key, in a folder of its own named
/// `name` holding `toml` as its configuration file (removed with it).
async fn node_in_scratch(name: &str, toml: &str, args: &[&str]) -> Served {
    let dir = ScratchDir::new(name);
    std::fs::write(dir.path().join("tidewire.toml"), toml).unwrap();
    let mut served = start_serve(
        dir.path(),
        args,
        &[("TIDEWIRE_API_KEY", API_KEY)],
        "serve.log",
    )
    .await;
    served.scratch = Some(dir);
    served
}

/// haproxy in front of `nodes`, as docs/deployment.md configures it:
/// leastconn, health checks on /health, WebSocket tunnels, connection
/// failures sent to another node.
struct Haproxy {
    addr: String,
    child: std::process::Child,
    /// Its configuration file's folder.
    _dir: ScratchDir,
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
        let dir = ScratchDir::new(&format!("haproxy-{port}"));
        let path = dir.path().join("haproxy.cfg");
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
            _dir: dir,
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

/// nginx in front of `nodes`, as docs/deployment.md configures it:
/// least_conn, WebSocket upgrades passed on, long read timeouts, a failed
/// or refusing (503: draining) node's requests passed to the next. (nginx
/// without its commercial part has no active health checks.)
struct Nginx {
    addr: String,
    dir: ScratchDir,
    child: std::process::Child,
}

impl Nginx {
    fn start(nodes: &[&Served]) -> Nginx {
        Nginx::start_buffering(nodes, false)
    }

    /// With `buffering`, nginx's default (`proxy_buffering on`): what a
    /// streamed response must turn off itself (X-Accel-Buffering: no).
    fn start_buffering(nodes: &[&Served], buffering: bool) -> Nginx {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = ScratchDir::new(&format!("nginx-{port}"));
        let d = dir.path().display();
        let servers: String = nodes
            .iter()
            .map(|n| format!("    server {} max_fails=1 fail_timeout=5s;\n", n.addr))
            .collect();
        let buffering = if buffering {
            ""
        } else {
            "proxy_buffering off;\n"
        };
        let config = format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n\
               client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n\
               upstream tidewire {{\n    least_conn;\n{servers}  }}\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
                   proxy_pass http://tidewire;\n      proxy_http_version 1.1;\n\
                   proxy_set_header Upgrade $http_upgrade;\n\
                   proxy_set_header Connection $connection_upgrade;\n\
                   proxy_set_header Host $host;\n\
                   proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
                   proxy_connect_timeout 2s;\n      proxy_read_timeout 1h;\n      proxy_send_timeout 1h;\n\
                   {buffering}\
                   proxy_next_upstream error timeout http_502 http_503;\n    }}\n  }}\n}}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), config).unwrap();
        let child = std::process::Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("nginx (scripts/install-deps installs it)");
        let proxy = Nginx {
            addr: format!("127.0.0.1:{port}"),
            dir,
            child,
        };
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return proxy;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!(
            "nginx did not listen on {port}: {}",
            std::fs::read_to_string(proxy.dir.path().join("error.log")).unwrap_or_default()
        );
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn api(addr: &str, method: &str, body: Value) -> Value {
    let (status, reply) = try_api(addr, method, body).await;
    assert_eq!(status, 200, "{method}: {reply}");
    reply
}

/// An HTTP API call: its status and JSON body.
async fn try_api(addr: &str, method: &str, body: Value) -> (u16, Value) {
    let body = body.to_string();
    let request = format!(
        "POST /api/{method} HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {API_KEY}\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, body) = http(addr, &request).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// `/health`'s status.
async fn health(addr: &str) -> u16 {
    http(
        addr,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .0
}

/// Waits until every node's `/health` answers `status`.
async fn wait_health(nodes: &[&Served], status: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut all = true;
        for node in nodes {
            all &= health(&node.addr).await == status;
        }
        if all {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            let mut seen = Vec::new();
            for node in nodes {
                let answer = http(
                    &node.addr,
                    "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )
                .await;
                let log = std::fs::read_to_string(&node.log).unwrap_or_default();
                let tail: Vec<String> = log.lines().rev().take(15).map(str::to_owned).collect();
                seen.push((node.addr.clone(), answer, tail));
            }
            panic!("/health never answered {status} on every node: {seen:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes `{"n": n}` to `channel`, again while the node refuses (an
/// engine failing over); the offset it got.
async fn publish_until_taken(addr: &str, channel: &str, n: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, reply) = try_api(
            addr,
            "publish",
            json!({"channel": channel, "data": {"n": n}}),
        )
        .await;
        if status == 200 {
            return reply["offset"].as_u64().unwrap();
        }
        assert_eq!(reply["error"]["code"], 114, "{status} {reply}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} never published"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One HTTP/1.1 exchange: the status and the body.
async fn http(addr: &str, request: &str) -> (u16, String) {
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
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{answer}"));
    (status, body.to_owned())
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

    /// Connected with a token of `user` signed with `secret`.
    async fn connect_as(addr: &str, user: &str, secret: &str) -> Client {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tidewire"))
            .args(["token", "--user", user, "--secret", secret])
            .output()
            .await
            .unwrap();
        assert!(output.status.success());
        let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();
        let url = format!("ws://{addr}/connection/websocket");
        let (ws, _) = tidewire::connect(&url).await.unwrap();
        let mut client = Client {
            ws,
            next_id: 1,
            pushes: Vec::new(),
        };
        let reply = client.call("connect", json!({ "token": token })).await;
        assert_eq!(reply["user"], user);
        client
    }

    /// The next push with a `kind` (`disconnect`, `unsubscribe`...).
    async fn push_of(&mut self, kind: &str) -> Value {
        loop {
            let push = self.push().await;
            if push["push"].get(kind).is_some() {
                return push["push"].clone();
            }
        }
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

    /// The next push.
    async fn push(&mut self) -> Value {
        if self.pushes.is_empty() {
            self.next().await
        } else {
            self.pushes.remove(0)
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
                    return (p["offset"].as_u64().unwrap_or(0), p["data"]["n"].clone());
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
    one_killed_while_publishing(nodes, &haproxy.addr).await;
    drop(haproxy);
}

/// nginx with its default `proxy_buffering on`: the fallbacks' streams
/// (unidirectional SSE, HTTP streaming) pass each message on while they
/// stay open. (nginx 1.22 here forwards a chunked response as it comes
/// even when buffering; the streams also say `X-Accel-Buffering: no` for
/// the configurations that would hold them.)
#[tokio::test]
async fn through_nginx_with_its_default_buffering_the_fallback_streams_are_not_held_back() {
    let dir = ScratchDir::new("ngx-sse");
    let node = start_serve(
        dir.path(),
        &["--listen", "127.0.0.1:0"],
        &[("TIDEWIRE_API_KEY", API_KEY)],
        "serve.log",
    )
    .await;
    let nginx = Nginx::start_buffering(&[&node], true);
    for (request, first) in [
        (
            "GET /connection/uni_sse?channel=ngx HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
                .to_owned(),
            "retry:",
        ),
        (
            {
                let body = "{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"ngx\"}}";
                format!(
                    "POST /connection/http_stream HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            },
            "\"subscribe\"",
        ),
    ] {
        let mut stream = tokio::net::TcpStream::connect(&nginx.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        // The stream's start, then a publication: each through nginx at
        // once, though the stream stays open (buffered, a few bytes would
        // wait for 4 KiB more or the end).
        for wanted in [first, "\"stamp\""] {
            let started = std::time::Instant::now();
            if wanted == "\"stamp\"" {
                api(&node.addr, "publish", json!({"channel": "ngx", "data": {"stamp": 1}})).await;
            }
            while !seen.contains(wanted) {
                let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("{wanted} held back by nginx; got {seen:?}"))
                    .unwrap();
                assert!(n > 0, "the stream ended");
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            eprintln!("{wanted} through nginx after {:?}", started.elapsed());
        }
    }
    drop(nginx);
}

#[tokio::test]
async fn three_nodes_behind_nginx_lose_nothing_when_one_is_killed() {
    let redis = RedisServer::start();
    let toml = "[client]\npresence_ttl = \"3s\"\n";
    let mut nodes = Vec::new();
    for n in 0..3 {
        nodes.push(node_with(&redis, &format!("ngx{n}"), toml).await);
    }
    let nginx = Nginx::start(&nodes.iter().collect::<Vec<_>>());
    one_killed_while_publishing(nodes, &nginx.addr).await;
    drop(nginx);
}

/// Six followers through the load balancer at `balancer` spread over the
/// three `nodes`; the third node is killed (SIGKILL) at publication 60 of
/// 200: every follower gets all of them once, in order, the killed node's
/// followers reconnect through the balancer, and its presence entries
/// expire (the nodes' presence_ttl is short).
async fn one_killed_while_publishing(mut nodes: Vec<Served>, balancer: &str) {
    const LAST: u64 = 200;
    let done = tidewire::CancellationToken::new();
    let followers: Vec<_> = (0..6)
        .map(|_| tokio::spawn(follow(balancer.to_owned(), "room", LAST, done.clone())))
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
}

#[tokio::test]
async fn redis_restarted_with_its_data_recovers_everything_and_without_it_says_so() {
    let dir = RedisServer::data_dir("cli-restart");
    let port = RedisServer::start().port;
    let mut redis = RedisServer::keeping(port, Persistence::AppendOnly, &dir);
    let a = node_at(&redis.url(), &[], "ra", "").await;
    let b = node_at(&redis.url(), &[], "rb", "").await;
    let mut client = Client::connect(&a.addr).await;
    let sub = client
        .call("subscribe", json!({"channel": "news", "recover": true}))
        .await;
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        assert_eq!(publish_until_taken(&b.addr, "news", n).await, n);
        assert_eq!(client.publication("news").await, (n, json!(n)));
    }

    // Redis away: both nodes unhealthy, publishes refused with 114.
    redis.stop();
    wait_health(&[&a, &b], 503).await;
    let (status, reply) = try_api(
        &b.addr,
        "publish",
        json!({"channel": "news", "data": {"n": 0}}),
    )
    .await;
    assert_eq!(
        (status, &reply["error"]["code"]),
        (503, &json!(114)),
        "{reply}"
    );

    // Back with its append-only file: the stream goes on, nothing missed,
    // nothing twice, no gap.
    redis = RedisServer::keeping(port, Persistence::AppendOnly, &dir);
    wait_health(&[&a, &b], 200).await;
    for n in 4..=5 {
        assert_eq!(publish_until_taken(&b.addr, "news", n).await, n);
        assert_eq!(client.push().await["push"]["pub"]["offset"], n);
    }
    let reply = client
        .call(
            "history",
            json!({"channel": "news", "since": {"offset": 3, "epoch": epoch}, "limit": 10}),
        )
        .await;
    assert_eq!(reply["epoch"], epoch.as_str(), "{reply}");

    // Back without its data: the stream is new. The subscriber is told
    // (2002) before anything of the new stream, subscribes again with its
    // position and learns that it cannot be recovered.
    redis.stop();
    let _ = std::fs::remove_dir_all(&dir);
    wait_health(&[&a, &b], 503).await;
    let _redis = RedisServer::keeping(port, Persistence::None, &dir);
    wait_health(&[&a, &b], 200).await;
    assert_eq!(publish_until_taken(&b.addr, "news", 6).await, 1);
    let push = client.push().await;
    assert_eq!(push["push"]["unsubscribe"]["code"], 2002, "{push}");
    let reply = client
        .call(
            "subscribe",
            json!({"channel": "news", "recover": true, "offset": 5, "epoch": epoch}),
        )
        .await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_ne!(reply["epoch"], epoch.as_str(), "{reply}");
    assert_eq!(reply["offset"], 1, "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_a_redis_cluster_behind_haproxy_lose_nothing_when_a_master_dies() {
    let mut cluster = RedisCluster::start("cli");
    let urls = cluster.urls();
    let mut nodes = Vec::new();
    for n in 0..3 {
        nodes.push(node_at(&urls, &["--redis-cluster"], &format!("rc{n}"), "").await);
    }
    let haproxy = Haproxy::start(&nodes.iter().collect::<Vec<_>>());
    wait_health(&nodes.iter().collect::<Vec<_>>(), 200).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    const LAST: u64 = 150;
    let done = tidewire::CancellationToken::new();
    let followers: Vec<_> = (0..6)
        .map(|_| tokio::spawn(follow(haproxy.addr.clone(), "room", LAST, done.clone())))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut counts = Vec::new();
        for node in &nodes {
            let info = api(&node.addr, "info", json!({})).await;
            counts.push(info["counts"]["subscriptions"].as_u64().unwrap_or(0));
        }
        if counts.iter().all(|&c| c >= 1) && counts.iter().sum::<u64>() == 6 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscriptions per node: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The master holding the channel's topic: the one that dies.
    let victim = cluster
        .masters()
        .into_iter()
        .map(|(port, _)| port)
        .find(|&port| {
            cluster
                .on(port, &["pubsub", "shardchannels", "tidewire:*:room:t"])
                .lines()
                .any(|l| !l.is_empty())
        })
        .expect("a master holds the room's topic");
    for n in 1..=LAST {
        let publisher = &nodes[(n % 3) as usize].addr;
        assert_eq!(publish_until_taken(publisher, "room", n).await, n);
        if n == 50 {
            // What it acknowledged is on its replica (a master that dies
            // before that is a gap: see the engine's tests).
            tokio::task::block_in_place(|| cluster.wait_replicated(victim));
            cluster.kill(victim);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    done.cancel();
    for follower in followers {
        let (got, _reconnects) = tokio::time::timeout(LIMIT, follower)
            .await
            .expect("every follower gets the last publication")
            .unwrap();
        assert_eq!(
            got,
            (1..=LAST).collect::<Vec<_>>(),
            "every publication once, in order"
        );
    }
    // Healthy again on the promoted replica; info lists the three nodes.
    wait_health(&nodes.iter().collect::<Vec<_>>(), 200).await;
    let info = api(&nodes[1].addr, "info", json!({})).await;
    assert_eq!(info["nodes"].as_array().map(Vec::len), Some(3), "{info}");
    drop(haproxy);
}

#[tokio::test]
async fn three_nodes_over_nats_behind_haproxy_lose_nothing_when_one_is_killed_and_nats_restarts() {
    let redis = RedisServer::start();
    let mut nats = NatsServer::start();
    let nats_url = nats.url();
    let flags = ["--broker", "nats", "--nats-url", nats_url.as_str()];
    let toml = "[client]\npresence_ttl = \"3s\"\n";
    let mut nodes = Vec::new();
    for n in 0..3 {
        nodes.push(node_at(&redis.url(), &flags, &format!("nats{n}"), toml).await);
    }
    let haproxy = Haproxy::start(&nodes.iter().collect::<Vec<_>>());
    wait_health(&nodes.iter().collect::<Vec<_>>(), 200).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    const LAST: u64 = 150;
    let done = tidewire::CancellationToken::new();
    let followers: Vec<_> = (0..6)
        .map(|_| tokio::spawn(follow(haproxy.addr.clone(), "room", LAST, done.clone())))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut counts = Vec::new();
        for node in &nodes {
            let info = api(&node.addr, "info", json!({})).await;
            counts.push(info["counts"]["subscriptions"].as_u64().unwrap_or(0));
        }
        if counts.iter().all(|&c| c >= 1) && counts.iter().sum::<u64>() == 6 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscriptions per node: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let port = nats.port;
    let mut victim = nodes.pop().unwrap();
    let mut restarted = None;
    for n in 1..=LAST {
        let publisher = &nodes[(n % 2) as usize].addr;
        assert_eq!(publish_until_taken(publisher, "room", n).await, n);
        match n {
            40 => victim.child.start_kill().unwrap(),
            90 => {
                // NATS away for a moment: publishes are refused (114) until
                // the nodes hear each other again.
                nats.stop();
                wait_health(&nodes.iter().collect::<Vec<_>>(), 503).await;
                let (status, reply) = try_api(
                    publisher,
                    "publish",
                    json!({"channel": "room", "data": {"n": 0}}),
                )
                .await;
                assert_eq!((status, &reply["error"]["code"]), (503, &json!(114)));
                restarted = Some(NatsServer::on(port));
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(restarted.is_some());
    let _ = victim.child.wait().await;
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
    wait_health(&nodes.iter().collect::<Vec<_>>(), 200).await;
    drop(haproxy);
}

#[tokio::test]
async fn nodes_on_the_nats_engine_deliver_to_each_other_and_refuse_history_at_start() {
    let nats = NatsServer::start();
    let url = nats.url();
    let dir = ScratchDir::new("nats-only");
    // The defaults keep history and presence: refused, saying where.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tidewire"))
        .args(["serve", "--listen", "127.0.0.1:0", "--engine", "nats"])
        .args(["--nats-url", &url])
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("keeps no history and no presence") && stderr.contains("[channels]"),
        "{stderr}"
    );

    let toml = "[channels]\nhistory_size = 0\nrecovery = false\npresence = false\n";
    let mut nodes = Vec::new();
    for name in ["na", "nb"] {
        let args = [
            "--listen",
            "127.0.0.1:0",
            "--engine",
            "nats",
            "--nats-url",
            &url,
        ];
        nodes.push(node_in_scratch(&format!("nats-{name}"), toml, &args).await);
    }
    let mut on_a = Client::connect(&nodes[0].addr).await;
    on_a.call("subscribe", json!({"channel": "feed"})).await;
    for n in 1..=5 {
        let reply = api(
            &nodes[1].addr,
            "publish",
            json!({"channel": "feed", "data": {"n": n}}),
        )
        .await;
        assert_eq!(reply, json!({}), "no position without history");
    }
    for n in 1..=5 {
        assert_eq!(on_a.publication("feed").await.1, json!(n));
    }
    wait_health(&[&nodes[0], &nodes[1]], 200).await;
}

#[tokio::test]
async fn clients_of_a_node_that_cannot_reach_redis_are_told_to_reconnect_elsewhere() {
    let mut redis = RedisServer::start();
    let toml = "[server]\nunhealthy_grace = \"2s\"\n";
    let a = node_with(&redis, "sick", toml).await;
    let mut client = Client::connect(&a.addr).await;
    client
        .call("subscribe", json!({"channel": "news", "recover": true}))
        .await;
    let lost = tokio::time::Instant::now();
    redis.stop();
    // Told within the grace (and a probe round or two), with the advice
    // to reconnect; then the close frame with the same code.
    let push = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let push = client.push().await;
            if push["push"].get("disconnect").is_some() {
                return push;
            }
        }
    })
    .await
    .expect("told in time");
    assert_eq!(
        push["push"]["disconnect"],
        json!({"code": 3005, "reason": "this node cannot reach its engine", "reconnect": true}),
        "{push}"
    );
    assert!(
        lost.elapsed() >= Duration::from_secs(2),
        "told before the grace"
    );
    let close = tokio::time::timeout(LIMIT, client.ws.recv())
        .await
        .expect("closed in time");
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 3005),
        other => panic!("expected the close frame, got {other:?}"),
    }
    // A node that works again keeps its clients.
    let _redis = RedisServer::on(redis.port);
    wait_health(&[&a], 200).await;
    let mut again = Client::connect(&a.addr).await;
    again.call("subscribe", json!({"channel": "news"})).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    api(
        &a.addr,
        "publish",
        json!({"channel": "news", "data": {"n": 1}}),
    )
    .await;
    assert_eq!(again.publication("news").await.1, json!(1));
}

#[tokio::test]
async fn the_http_api_of_any_node_reaches_the_clients_of_every_node() {
    let redis = RedisServer::start();
    let flags = ["--token-secret", "cluster-secret"];
    let mut nodes = Vec::new();
    for n in 0..3 {
        nodes.push(node_at(&redis.url(), &flags, &format!("api{n}"), "").await);
    }
    let mut clients = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let mut client = Client::connect_as(&node.addr, &format!("u{n}"), "cluster-secret").await;
        client.call("subscribe", json!({"channel": "room"})).await;
        clients.push(client);
    }
    // publish on one node: every node's client gets it.
    api(
        &nodes[0].addr,
        "publish",
        json!({"channel": "room", "data": {"n": 1}}),
    )
    .await;
    for client in &mut clients {
        assert_eq!(client.publication("room").await.1, json!(1));
    }
    // presence and channels through another: the union of the nodes.
    let present = api(&nodes[1].addr, "presence", json!({"channel": "room"})).await;
    let mut users: Vec<&str> = present["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["user"].as_str().unwrap())
        .collect();
    users.sort_unstable();
    assert_eq!(users, ["u0", "u1", "u2"], "{present}");
    // info lists the three nodes (from their heartbeats); channels asks
    // those.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let info = api(&nodes[2].addr, "info", json!({})).await;
        if info["nodes"].as_array().map(Vec::len) == Some(3) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{info}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let channels = api(&nodes[2].addr, "channels", json!({})).await;
    assert_eq!(
        channels["channels"],
        json!([{"channel": "room", "subscribers": 3}]),
        "{channels}"
    );
    // unsubscribe and disconnect through a node the client is not on.
    api(
        &nodes[0].addr,
        "unsubscribe",
        json!({"user": "u2", "channel": "room"}),
    )
    .await;
    let push = clients[2].push_of("unsubscribe").await;
    assert_eq!(push["channel"], "room");
    assert_eq!(push["unsubscribe"]["code"], 2000, "{push}");
    api(&nodes[1].addr, "disconnect", json!({"user": "u0"})).await;
    let push = clients[0].push_of("disconnect").await;
    assert_eq!(push["disconnect"]["code"], 3000, "{push}");
}

/// A publication of the randomized run: which publisher, its sequence
/// number in the channel.
type Sent = (u64, u64);

/// Publishes through `addr` until a node takes it (refusals, a load
/// balancer without a healthy node, connections that fail: all retried);
/// the offset it got.
async fn publish_retrying(addr: &str, channel: &str, data: Value) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let body = json!({"channel": channel, "data": data}).to_string();
        let request = format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: apikey {API_KEY}\r\n\
             Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
            tcp.write_all(request.as_bytes()).await.ok()?;
            let mut response = Vec::new();
            tcp.read_to_end(&mut response).await.ok()?;
            String::from_utf8(response).ok()
        })
        .await
        .ok()
        .flatten();
        if let Some(answer) = answer {
            if answer.starts_with("HTTP/1.1 200") {
                let (_, body) = answer.split_once("\r\n\r\n").unwrap();
                let reply: Value = serde_json::from_str(body).unwrap();
                return reply["offset"].as_u64().unwrap();
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "never published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A subscriber of the randomized run: through the load balancer, again
/// after every lost connection with its last position (asserting that it
/// recovers: the epoch does not change with Redis's append-only file).
/// Returns the offset its first subscribe started after and the
/// publications it got, until the end marker.
async fn follow_to_end(addr: String, channel: &'static str) -> (u64, Vec<(u64, Value)>) {
    let url = format!("ws://{addr}/connection/websocket");
    let mut got: Vec<(u64, Value)> = Vec::new();
    let mut start = None;
    let mut position: Option<(u64, String)> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "{channel}: no end");
        let Ok(Ok((mut ws, _))) =
            tokio::time::timeout(Duration::from_secs(5), tidewire::connect(&url)).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
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
            let Ok(next) = tokio::time::timeout(Duration::from_secs(30), ws.recv()).await else {
                break;
            };
            let Some(Ok(Message::Text(text))) = next else {
                break;
            };
            for line in text.as_str().lines() {
                let frame: Value = serde_json::from_str(line).unwrap();
                if frame["id"] == 2 {
                    if frame.get("error").is_some() {
                        // Refused (the node lost Redis meanwhile): again.
                        break;
                    }
                    let reply = &frame["subscribe"];
                    if position.is_some() {
                        assert_eq!(reply["recovered"], true, "{channel}: {reply}");
                    }
                    let offset = reply["offset"].as_u64().unwrap();
                    start.get_or_insert(offset);
                    position = Some((offset, reply["epoch"].as_str().unwrap().to_owned()));
                    for p in reply["publications"].as_array().into_iter().flatten() {
                        got.push((p["offset"].as_u64().unwrap(), p["data"].clone()));
                    }
                    if let (Some(last), Some(position)) = (got.last(), position.as_mut()) {
                        position.0 = last.0.max(offset);
                    }
                    subscribed = true;
                } else if frame["push"]["channel"] == channel && subscribed {
                    if let Some(p) = frame["push"].get("pub") {
                        let offset = p["offset"].as_u64().unwrap();
                        got.push((offset, p["data"].clone()));
                        if let Some(position) = position.as_mut() {
                            position.0 = offset;
                        }
                    }
                    assert!(
                        frame["push"].get("unsubscribe").is_none(),
                        "{channel}: a gap with the epoch unchanged: {frame}"
                    );
                }
            }
            if got.last().is_some_and(|(_, data)| data["end"] == true) {
                return (start.unwrap(), got);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_randomized_run_with_node_kills_redis_restarts_and_stalls_loses_nothing() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("TIDEWIRE_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fault run seed {seed} (TIDEWIRE_FAULT_SEED={seed} runs it again)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let dir = RedisServer::data_dir("fault-run");
    let redis_port = RedisServer::start().port;
    let mut redis = Some(RedisServer::keeping(
        redis_port,
        Persistence::AppendOnly,
        &dir,
    ));
    let proxy = StallingProxy::start(redis_port).await;
    let url = format!("redis://127.0.0.1:{}", proxy.port);
    let toml = "[client]\npresence_ttl = \"3s\"\n\
                [channels]\nhistory_size = 100000\nhistory_ttl = \"10m\"\n";
    let listens: Vec<String> = (0..3)
        .map(|_| {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            format!("127.0.0.1:{port}")
        })
        .collect();
    let mut nodes = Vec::new();
    for (n, listen) in listens.iter().enumerate() {
        let flags = ["--listen", listen.as_str()];
        nodes.push(Some(
            node_at(&url, &flags, &format!("fault{n}"), toml).await,
        ));
    }
    let haproxy = Haproxy::start(&nodes.iter().flatten().collect::<Vec<_>>());
    wait_health(&nodes.iter().flatten().collect::<Vec<_>>(), 200).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    const CHANNELS: [&str; 3] = ["f0", "f1", "f2"];
    let followers: Vec<_> = (0..9)
        .map(|n| tokio::spawn(follow_to_end(haproxy.addr.clone(), CHANNELS[n % 3])))
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // Publishers: each to random channels, with its own sequence per
    // channel; what was acknowledged, with its offset.
    let stop = tidewire::CancellationToken::new();
    let publishers: Vec<_> = (0..3u64)
        .map(|publisher| {
            let addr = haproxy.addr.clone();
            let stop = stop.clone();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (publisher + 1));
            tokio::spawn(async move {
                let mut acknowledged: Vec<(usize, Sent, u64)> = Vec::new();
                let mut seq = [0u64; 3];
                while !stop.is_cancelled() {
                    let channel = rng.random_range(0..3);
                    seq[channel] += 1;
                    let data = json!({"p": publisher, "s": seq[channel]});
                    let offset = publish_retrying(&addr, CHANNELS[channel], data).await;
                    acknowledged.push((channel, (publisher, seq[channel]), offset));
                    tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
                }
                acknowledged
            })
        })
        .collect();

    // Faults, one at a time, for about 40 s.
    let run = tokio::time::Instant::now();
    let mut faults = Vec::new();
    while run.elapsed() < Duration::from_secs(40) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1500..4000))).await;
        match rng.random_range(0..3) {
            0 => {
                let n = rng.random_range(0..3);
                faults.push(format!("kill node {n}"));
                if let Some(mut node) = nodes[n].take() {
                    node.child.start_kill().unwrap();
                    let _ = node.child.wait().await;
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..2000))).await;
                let flags = ["--listen", listens[n].as_str()];
                let name = format!("fault{n}-{}", faults.len());
                nodes[n] = Some(node_at(&url, &flags, &name, toml).await);
            }
            1 => {
                faults.push("restart Redis".into());
                drop(redis.take());
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
                redis = Some(RedisServer::keeping(
                    redis_port,
                    Persistence::AppendOnly,
                    &dir,
                ));
            }
            _ => {
                let stall = rng.random_range(1000..8000);
                faults.push(format!("stall PUB/SUB {stall} ms"));
                proxy.stall(true);
                tokio::time::sleep(Duration::from_millis(stall)).await;
                proxy.stall(false);
            }
        }
    }
    eprintln!("faults: {faults:?}");
    stop.cancel();
    let mut acknowledged = Vec::new();
    for publisher in publishers {
        acknowledged.extend(publisher.await.unwrap());
    }
    wait_health(&nodes.iter().flatten().collect::<Vec<_>>(), 200).await;
    let mut ends = [0u64; 3];
    for (n, channel) in CHANNELS.iter().enumerate() {
        ends[n] = publish_retrying(&haproxy.addr, channel, json!({"end": true})).await;
    }

    // The streams as Redis holds them.
    let node = nodes.iter().flatten().next().unwrap();
    let mut streams = Vec::new();
    for channel in CHANNELS {
        // In pages (the API answers at most 1000 at a time).
        let newest = api(
            &node.addr,
            "history",
            json!({"channel": channel, "limit": 1}),
        )
        .await;
        let epoch = newest["epoch"].clone();
        let mut entries: Vec<(u64, Value)> = Vec::new();
        loop {
            let after = entries.last().map_or(0, |(o, _)| *o);
            let page = api(
                &node.addr,
                "history",
                json!({"channel": channel, "limit": 1000, "since": {"offset": after, "epoch": epoch}}),
            )
            .await;
            assert_eq!(page["epoch"], epoch, "{channel}: the epoch did not change");
            let publications = page["publications"].as_array().unwrap();
            if publications.is_empty() {
                break;
            }
            entries.extend(
                publications
                    .iter()
                    .map(|p| (p["offset"].as_u64().unwrap(), p["data"].clone())),
            );
        }
        let offsets: Vec<u64> = entries.iter().map(|(o, _)| *o).collect();
        assert_eq!(
            offsets,
            (1..=offsets.len() as u64).collect::<Vec<_>>(),
            "{channel}: the stream has no holes"
        );
        streams.push(entries);
    }
    // Everything acknowledged is in its stream at its offset; each
    // publisher's sequence in a channel is in order.
    for (channel, (publisher, seq), offset) in &acknowledged {
        let (_, data) = &streams[*channel][(*offset - 1) as usize];
        assert_eq!(
            data,
            &json!({"p": publisher, "s": seq}),
            "{}",
            CHANNELS[*channel]
        );
    }
    // Every subscriber got its channel's stream from where it started to
    // the end, in order, each once.
    for (n, follower) in followers.into_iter().enumerate() {
        let (start, got) = tokio::time::timeout(LIMIT, follower)
            .await
            .expect("every follower gets to the end")
            .unwrap();
        let channel = n % 3;
        let expected: Vec<(u64, Value)> =
            streams[channel][start as usize..ends[channel] as usize].to_vec();
        if got != expected {
            let first = got
                .iter()
                .zip(&expected)
                .position(|(g, e)| g != e)
                .unwrap_or(got.len().min(expected.len()));
            let around = |v: &[(u64, Value)]| {
                v[first.saturating_sub(2)..(first + 3).min(v.len())]
                    .iter()
                    .map(|(o, d)| format!("{o}:{d}"))
                    .collect::<Vec<_>>()
            };
            eprintln!(
                "follower {n}: first difference at {first}: got {:?}, expected {:?}",
                around(&got),
                around(&expected)
            );
        }
        assert_eq!(
            got.len(),
            expected.len(),
            "follower {n} of {} from {start} (seed {seed}, faults {faults:?})",
            CHANNELS[channel]
        );
        assert!(
            got == expected,
            "follower {n}: what it got differs from the stream (seed {seed})"
        );
    }
    eprintln!(
        "{} publications acknowledged, faults {faults:?}",
        acknowledged.len()
    );
    drop(haproxy);
}
