//! The HTTP API, /health, /metrics, graceful shutdown, proxy callbacks,
//! slow consumers and connection limits, against a real hub on loopback.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use common::engine::TestEngine;
use common::*;
use serde_json::{json, Value};
use tidewire_hub::config::{ChannelOptions, SlowConsumer, UnknownNamespaces};
use tidewire_hub::{Hub, MemoryEngine};

#[tokio::test]
async fn publish_broadcast_history_and_channels() {
    let mut cfg = config();
    cfg.unknown_namespaces = UnknownNamespaces::Reject;
    cfg.namespaces
        .insert("news".into(), ChannelOptions::default());
    let server = start(cfg).await;
    let (mut c, _) = Client::connect(&server, None).await;
    c.ok("subscribe", json!({"channel": "news:eu"})).await;
    c.ok("subscribe", json!({"channel": "lobby"})).await;

    let (status, ack) = api(
        &server,
        "publish",
        json!({"channel": "news:eu", "data": {"h": 1}}),
    )
    .await;
    assert_eq!(status, 200, "{ack}");
    assert_eq!(ack["offset"], 1);
    let epoch = ack["epoch"].clone();
    let p = c.publication("news:eu").await;
    assert_eq!(p["data"], json!({"h": 1}));
    assert!(
        p.get("info").is_none(),
        "server publications carry no client info"
    );

    let (status, reply) = api(
        &server,
        "broadcast",
        json!({"channels": ["news:eu", "lobby", "nope:x", "bad name"], "data": "all"}),
    )
    .await;
    assert_eq!(status, 200);
    let results = reply["results"].as_array().unwrap();
    assert_eq!(results[0], json!({"offset": 2, "epoch": epoch}));
    assert_eq!(results[1]["offset"], 1);
    assert_eq!(results[2]["error"]["code"], 108);
    assert_eq!(results[3]["error"]["code"], 109);
    assert_eq!(c.publication("news:eu").await["data"], "all");
    assert_eq!(c.publication("lobby").await["data"], "all");

    let (status, h) = api(
        &server,
        "history",
        json!({"channel": "news:eu", "limit": 10}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(h["offset"], 2);
    assert_eq!(h["publications"].as_array().unwrap().len(), 2);
    let (_, h) = api(
        &server,
        "history",
        json!({"channel": "news:eu", "since": {"offset": 1, "epoch": epoch}}),
    )
    .await;
    assert_eq!(h["publications"][0]["data"], "all");
    // A channel nobody subscribed or published to has no stream, and
    // reading it starts none.
    let streams = server.hub.engine_stats().streams;
    let (status, h) = api(&server, "history", json!({"channel": "news:quiet"})).await;
    assert_eq!(status, 200);
    assert_eq!(h, json!({"publications": [], "offset": 0, "epoch": ""}));
    assert_eq!(server.hub.engine_stats().streams, streams);

    let (_, channels) = api(&server, "channels", json!({})).await;
    assert_eq!(
        channels,
        json!({"channels": [
            {"channel": "lobby", "subscribers": 1},
            {"channel": "news:eu", "subscribers": 1}
        ]})
    );
    let (_, channels) = api(&server, "channels", json!({"prefix": "news:"})).await;
    assert_eq!(channels["channels"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn presence_disconnect_unsubscribe_and_info() {
    let server = start(config()).await;
    let (mut a, ra) = Client::connect(&server, Some(&token("ann", 600, &[]))).await;
    let (mut a2, _) = Client::connect(&server, Some(&token("ann", 600, &[]))).await;
    let (mut b, _) = Client::connect(&server, Some(&token("bob", 600, &[]))).await;
    for c in [&mut a, &mut a2, &mut b] {
        c.ok("subscribe", json!({"channel": "room"})).await;
    }
    let (status, presence) = api(&server, "presence", json!({"channel": "room"})).await;
    assert_eq!(status, 200);
    assert_eq!(presence["clients"].as_array().unwrap().len(), 3);
    let (_, stats) = api(&server, "presence_stats", json!({"channel": "room"})).await;
    assert_eq!(stats, json!({"clients": 3, "users": 2}));

    let (_, info) = api(&server, "info", json!({})).await;
    assert_eq!(info["counts"]["clients"], 3);
    assert_eq!(info["counts"]["users"], 2);
    assert_eq!(info["counts"]["channels"], 1);
    assert_eq!(info["protocol"], 1);

    // Unsubscribe one of ann's clients from the channel.
    let client_id = ra["client"].as_str().unwrap();
    let (_, n) = api(
        &server,
        "unsubscribe",
        json!({"user": "ann", "channel": "room", "client": client_id}),
    )
    .await;
    assert_eq!(n, json!({"unsubscribed": 1}));
    let push = loop {
        let p = a.push().await;
        if p.get("unsubscribe").is_some() {
            break p;
        }
    };
    assert_eq!(push["channel"], "room");
    assert_eq!(push["unsubscribe"]["code"], 2000);
    assert_eq!(
        a.error_code("unsubscribe", json!({"channel": "room"}))
            .await,
        111
    );
    let (_, stats) = api(&server, "presence_stats", json!({"channel": "room"})).await;
    assert_eq!(stats["clients"], 2);

    // Disconnect all of ann's clients, with a custom code.
    let (_, n) = api(
        &server,
        "disconnect",
        json!({"user": "ann", "code": 4001, "reason": "banned", "reconnect": false}),
    )
    .await;
    assert_eq!(n, json!({"disconnected": 2}));
    for c in [&mut a, &mut a2] {
        assert_eq!(c.closed().await, Some(4001));
        let p = loop {
            let p = c.push().await;
            if p.get("disconnect").is_some() {
                break p;
            }
        };
        assert_eq!(
            p["disconnect"],
            json!({"code": 4001, "reason": "banned", "reconnect": false})
        );
    }
    // Default code: 3000, no reconnect.
    let (_, n) = api(&server, "disconnect", json!({"user": "bob"})).await;
    assert_eq!(n["disconnected"], 1);
    assert_eq!(b.closed().await, Some(3000));
    // All gone but the channel's stream, which their subscribes started:
    // the engine keeps it for the namespace's history TTL.
    let hub = server.hub.clone();
    let stream_only = tidewire_hub::HubCounts {
        history_streams: 1,
        ..Default::default()
    };
    eventually("all gone", || hub.counts() == stream_only).await;
    let (_, n) = api(&server, "disconnect", json!({"user": "nobody"})).await;
    assert_eq!(n["disconnected"], 0);
}

#[tokio::test]
async fn api_errors_have_codes_and_statuses() {
    let mut cfg = config();
    cfg.namespaces.insert(
        "quiet".into(),
        ChannelOptions {
            presence: false,
            history_size: 0,
            ..ChannelOptions::default()
        },
    );
    let server = start(cfg).await;
    let post = |path: &'static str, headers: Vec<(&'static str, String)>, body: &'static str| {
        let addr = server.addr;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let (status, body) = http(addr, "POST", path, &h, body).await;
            (
                status,
                serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
            )
        }
    };
    let key = vec![("Authorization", format!("apikey {API_KEY}"))];
    let (status, body) = post("/api/publish", vec![], "{}").await;
    assert_eq!((status, body["error"]["code"].clone()), (401, json!(105)));
    let wrong = vec![("Authorization", "apikey nope".to_string())];
    assert_eq!(post("/api/publish", wrong, "{}").await.0, 401);
    let x_api_key = vec![("X-API-Key", API_KEY.to_string())];
    assert_eq!(post("/api/info", x_api_key, "").await.0, 200);
    let (status, body) = post("/api/publish", key.clone(), "{not json").await;
    assert_eq!((status, body["error"]["code"].clone()), (400, json!(101)));
    let (status, body) = post("/api/publish", key.clone(), r#"{"channel":"a"}"#).await;
    assert_eq!((status, body["error"]["code"].clone()), (400, json!(101)));
    let (status, body) = post(
        "/api/publish",
        key.clone(),
        r#"{"channel":"a","data":1,"x":1}"#,
    )
    .await;
    assert_eq!((status, body["error"]["code"].clone()), (400, json!(101)));
    let (status, body) = post("/api/dance", key.clone(), "{}").await;
    assert_eq!((status, body["error"]["code"].clone()), (404, json!(102)));
    let (status, _) = post("/api", key.clone(), "{}").await;
    assert_eq!(status, 404);
    let (status, body) = post("/api/presence", key.clone(), r#"{"channel":"quiet:a"}"#).await;
    assert_eq!((status, body["error"]["code"].clone()), (400, json!(112)));
    let (status, body) = post("/api/history", key.clone(), r#"{"channel":"quiet:a"}"#).await;
    assert_eq!((status, body["error"]["code"].clone()), (400, json!(112)));
    let (status, body) = post(
        "/api/disconnect",
        key.clone(),
        r#"{"user":"u","code":1000}"#,
    )
    .await;
    assert_eq!((status, body["error"]["code"].clone()), (400, json!(101)));
    let (status, _) = http(server.addr, "GET", "/api/info", &[], "").await;
    assert_eq!(status, 405);
    let many: Vec<String> = (0..1001).map(|i| format!("c{i}")).collect();
    let (status, body) = api(&server, "broadcast", json!({"channels": many, "data": 1})).await;
    assert_eq!((status, body["error"]["code"].clone()), (413, json!(113)));
}

/// HTTP API body errors name the field and what it must be, never the
/// JSON parser's internals.
#[tokio::test]
async fn api_body_errors_name_the_field_not_the_parser() {
    let server = start(config()).await;
    let key = format!("apikey {API_KEY}");
    let cases: [(&str, &str, u16, u64, &str); 12] = [
        (
            "history",
            r#"{"channel":"a","limit":"ten"}"#,
            400,
            101,
            r#""limit" must be a non-negative integer"#,
        ),
        (
            "history",
            r#"{"channel":"a","since":{"offset":1,"epoch":2}}"#,
            400,
            101,
            r#""since.epoch" must be a string"#,
        ),
        (
            "publish",
            r#"{"channel":"a"}"#,
            400,
            101,
            r#""data" is required (any JSON value)"#,
        ),
        (
            "publish",
            r#"{"channel":"a","data":1,"x":1}"#,
            400,
            101,
            r#"unknown field "x"; fields: channel, data"#,
        ),
        (
            "publish",
            "{\n  \"channel\": \"a\",\n  \"data\": }",
            400,
            101,
            "the body must be a JSON object: not valid JSON (at line 3, column 11)",
        ),
        (
            "publish",
            "[1]",
            400,
            101,
            "the body must be a JSON object: not a JSON object: got an array",
        ),
        (
            "broadcast",
            r#"{"channels":"a","data":1}"#,
            400,
            101,
            r#""channels" must be an array of strings"#,
        ),
        (
            "broadcast",
            r#"{"channels":["a",2],"data":1}"#,
            400,
            101,
            r#""channels" must be an array of strings"#,
        ),
        (
            "disconnect",
            r#"{"user":"u","code":70000}"#,
            400,
            101,
            r#""code" must be an integer in 3000..=4999"#,
        ),
        (
            "disconnect",
            r#"{"user":"u","reconnect":"no"}"#,
            400,
            101,
            r#""reconnect" must be true or false"#,
        ),
        (
            "channels",
            r#"{"prefix":1}"#,
            400,
            101,
            r#""prefix" must be a string"#,
        ),
        (
            "info",
            r#"{"verbose":true}"#,
            400,
            101,
            r#"unknown field "verbose"; it takes no fields"#,
        ),
    ];
    for (method, body, status, code, message) in cases {
        let (got_status, text) = http(
            server.addr,
            "POST",
            &format!("/api/{method}"),
            &[("Authorization", &key)],
            body,
        )
        .await;
        let reply: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            (got_status, reply["error"]["code"].as_u64()),
            (status, Some(code)),
            "{method} {body}: {reply}"
        );
        assert_eq!(reply["error"]["message"], message, "{method} {body}");
    }
    let many: Vec<String> = (0..5000).map(|i| format!("c{i}")).collect();
    let (status, body) = api(&server, "broadcast", json!({"channels": many, "data": 1})).await;
    assert_eq!(status, 413);
    assert_eq!(
        body["error"]["message"],
        "at most 1000 channels in one broadcast, got 5000"
    );
}

#[tokio::test]
async fn api_bodies_are_bounded_by_api_max_body_size() {
    let mut cfg = config();
    cfg.api.max_body_size = 1024;
    let server = start(cfg).await;
    let auth = format!("apikey {API_KEY}");
    let headers = [("Authorization", auth.as_str())];
    let publish =
        |text_len: usize| json!({"channel": "lobby", "data": "x".repeat(text_len)}).to_string();
    let fits = publish(900);
    assert!(fits.len() <= 1024);
    let (status, body) = http(server.addr, "POST", "/api/publish", &headers, &fits).await;
    assert_eq!(status, 200, "{body}");
    let too_big = publish(1100);
    let (status, _) = http(server.addr, "POST", "/api/publish", &headers, &too_big).await;
    assert_eq!(status, 413);
}

#[tokio::test]
async fn health_fails_with_the_engine_and_metrics_count_what_happens() {
    let engine = Arc::new(TestEngine::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hub = Hub::new(config(), engine.clone()).unwrap();
    let shutdown = tidewire::CancellationToken::new();
    let server = TestServer {
        addr,
        hub: hub.clone(),
        shutdown: shutdown.clone(),
        task: tokio::spawn(tidewire_hub::http::serve(
            hub, listener, API_KEY, None, shutdown,
        )),
    };
    assert_eq!(
        http(addr, "GET", "/health", &[], "").await,
        (200, "ok\n".into())
    );

    let (mut c, _) = Client::connect(&server, None).await;
    c.ok("subscribe", json!({"channel": "m"})).await;
    c.ok("publish", json!({"channel": "m", "data": 1})).await;
    c.publication("m").await;
    assert_eq!(
        c.error_code("publish", json!({"channel": "other", "data": 1}))
            .await,
        107
    );
    api(&server, "publish", json!({"channel": "m", "data": 2})).await;
    c.publication("m").await;
    let (status, text) = http(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    for line in [
        "tidewire_hub_connections 1",
        "tidewire_hub_clients 1",
        "tidewire_hub_subscriptions 1",
        "tidewire_hub_channels 1",
        "tidewire_hub_publications_total 2",
        "tidewire_hub_errors_total{code=\"107\",name=\"permission_denied\"} 1",
        "tidewire_hub_commands_total{method=\"publish\"} 2",
        "tidewire_hub_api_calls_total{method=\"publish\"} 1",
        "tidewire_hub_history_streams 1",
        "tidewire_hub_queue_depth",
        "tidewire_hub_dropped_total 0",
    ] {
        assert!(text.contains(line), "{line} missing in\n{text}");
    }
    // Deliveries: joins, and both publications, to the one subscriber.
    let deliveries: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tidewire_hub_deliveries_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(deliveries >= 2, "{deliveries}");

    engine.broken.store(true, Ordering::Relaxed);
    let (status, body) = http(addr, "GET", "/health", &[], "").await;
    assert_eq!(status, 503);
    assert!(body.contains("store unreachable"), "{body}");
    assert_eq!(
        c.error_code("publish", json!({"channel": "m", "data": 3}))
            .await,
        114
    );
    let (status, body) = api(&server, "publish", json!({"channel": "m", "data": 3})).await;
    assert_eq!((status, body["error"]["code"].clone()), (503, json!(114)));
}

#[tokio::test]
async fn graceful_shutdown_tells_every_client_to_reconnect() {
    let server = start(config()).await;
    let (mut a, _) = Client::connect(&server, None).await;
    let mut b = Client::open(&server).await;
    a.ok("subscribe", json!({"channel": "x"})).await;
    server.shutdown.cancel();
    for c in [&mut a, &mut b] {
        assert_eq!(c.closed().await, Some(1001));
        let push = loop {
            let p = c.push().await;
            if p.get("disconnect").is_some() {
                break p;
            }
        };
        assert_eq!(push["disconnect"]["code"], 3001);
        assert_eq!(push["disconnect"]["reconnect"], true);
    }
    let result = tokio::time::timeout(LIMIT, server.task)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_ok());
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err());
    // Nothing left but the stream the subscribe started (kept for the
    // history TTL: the engine may outlive this node).
    assert_eq!(
        server.hub.counts(),
        tidewire_hub::HubCounts {
            history_streams: 1,
            ..Default::default()
        }
    );
}

#[tokio::test]
async fn a_connection_accepted_before_shutdown_still_gets_its_answer() {
    // A health check whose connection was accepted just before shutdown,
    // its request not read yet: answered (503), not closed unanswered.
    let server = start(config()).await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.shutdown.cancel();
    let hub = server.hub.clone();
    eventually("shutdown", || hub.is_shutting_down()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tcp
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(LIMIT, tcp.read_to_end(&mut response))
        .await
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 503"), "{response:?}");
    assert!(
        response.ends_with("\r\n\r\nshutting down\n"),
        "{response:?}"
    );
}

/// Records what the hub hands a client connection.
#[derive(Default)]
struct RecordingSink(std::sync::Mutex<Vec<String>>);

impl tidewire_hub::node::ClientSink for RecordingSink {
    fn transport(&self) -> tidewire_hub::node::Transport {
        tidewire_hub::node::Transport::WEBSOCKET
    }
    fn send(
        &self,
        frame: tidewire_hub::protocol::Frame,
        _: tidewire_hub::node::FrameKind,
    ) -> tidewire_hub::node::SendOutcome {
        self.0
            .lock()
            .unwrap()
            .push(frame.as_text().expect("JSON is text").to_owned());
        tidewire_hub::node::SendOutcome::Queued
    }
    fn close(&self, code: u16, reason: &str) {
        self.0
            .lock()
            .unwrap()
            .push(format!("close {code} {reason}"));
    }
    fn queued(&self) -> usize {
        0
    }
}

#[tokio::test]
async fn a_session_opening_during_shutdown_is_told_to_reconnect() {
    // Its upgrade was under way when shutdown began: it must not be left
    // open until the shutdown timeout, missing the notice the others got.
    let hub = Hub::new(config(), Arc::new(MemoryEngine::new())).unwrap();
    let before = Arc::new(RecordingSink::default());
    let _open = hub.open(before.clone());
    hub.shutdown();
    let late = Arc::new(RecordingSink::default());
    let session = hub.open(late.clone());
    let notice = before.0.lock().unwrap().clone();
    assert_eq!(notice.len(), 2, "{notice:?}");
    assert!(
        notice[0].contains(r#""disconnect":{"code":3001"#),
        "{notice:?}"
    );
    assert_eq!(notice[1], "close 1001 server shutting down");
    assert_eq!(*late.0.lock().unwrap(), notice);
    session.close().await;
}

#[tokio::test]
async fn proxy_callbacks_decide_connect_and_publish() {
    let backend = axum::Router::new()
        .route(
            "/connect",
            post(|axum::Json(call): axum::Json<Value>| async move {
                assert_eq!(call["transport"], "websocket");
                assert_eq!(call["client"].as_str().unwrap().len(), 16);
                if call["data"]["password"] == "open sesame" {
                    axum::Json(json!({"result": {"user": "proxied", "info": {"role": "admin"}}}))
                } else {
                    axum::Json(json!({"error": {"code": 1000, "message": "wrong password"}}))
                }
            }),
        )
        .route(
            "/publish",
            post(|axum::Json(call): axum::Json<Value>| async move {
                if call["data"] == "spam" {
                    axum::Json(json!({"error": {"message": "no spam"}}))
                } else {
                    axum::Json(
                        json!({"result": {"data": {"checked": call["data"], "by": call["user"]}}}),
                    )
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, backend).await });

    let mut cfg = config();
    cfg.client.anonymous = false;
    cfg.proxy.connect_url = Some(format!("http://{backend_addr}/connect"));
    cfg.proxy.publish_url = Some(format!("http://{backend_addr}/publish"));
    let server = start(cfg).await;
    let mut c = Client::open(&server).await;
    let refused = c
        .call("connect", json!({"data": {"password": "guess"}}))
        .await;
    assert_eq!(refused["error"]["code"], 107);
    assert_eq!(refused["error"]["message"], "wrong password");
    let reply = c
        .ok("connect", json!({"data": {"password": "open sesame"}}))
        .await;
    assert_eq!(reply["user"], "proxied");
    c.ok("subscribe", json!({"channel": "chat:x"})).await;
    assert_eq!(
        c.error_code("publish", json!({"channel": "chat:x", "data": "spam"}))
            .await,
        107
    );
    c.ok("publish", json!({"channel": "chat:x", "data": "hello"}))
        .await;
    let p = c.publication("chat:x").await;
    assert_eq!(p["data"], json!({"checked": "hello", "by": "proxied"}));
    assert_eq!(p["info"]["info"], json!({"role": "admin"}));

    // A backend that is down: 114, the connection survives.
    let mut cfg = config();
    cfg.proxy.connect_url = Some("http://127.0.0.1:1/connect".into());
    let server = start(cfg).await;
    let mut c = Client::open(&server).await;
    assert_eq!(c.error_code("connect", json!({})).await, 114);
    assert_eq!(c.error_code("ping", json!({})).await, 103);
}

/// Publishes big messages until the policy acts on a client that reads
/// nothing; returns how many were published.
async fn flood(server: &TestServer, channel: &str, until: impl Fn(&Hub) -> bool) -> usize {
    let data = "x".repeat(32 * 1024);
    for n in 1..=3000 {
        let (status, _) = api(server, "publish", json!({"channel": channel, "data": data})).await;
        assert_eq!(status, 200);
        if until(&server.hub) {
            return n;
        }
    }
    panic!("the slow-consumer policy never acted");
}

fn metric(hub: &Hub, name: &str) -> u64 {
    hub.metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_slow_consumer_is_closed_with_1013_and_others_go_on() {
    let mut cfg = config();
    cfg.client.queue_messages = 8;
    let server = start(cfg).await;
    let (mut slow, _) = Client::connect(&server, None).await;
    slow.ok("subscribe", json!({"channel": "firehose"})).await;
    let (mut fast, _) = Client::connect(&server, None).await;
    fast.ok("subscribe", json!({"channel": "firehose"})).await;
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while fast.next_message().await.is_some() {
            n += 1;
        }
        n
    });
    flood(&server, "firehose", |hub| {
        metric(hub, "tidewire_hub_slow_consumers_total") == 1
    })
    .await;
    // The slow client gets what was queued, then 1013, and can recover.
    let mut last_offset = 0;
    let code = loop {
        match tokio::time::timeout(LIMIT, slow.ws.recv()).await.unwrap() {
            Some(Ok(tidewire::Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if let Some(o) = v["push"]["pub"]["offset"].as_u64() {
                    assert_eq!(o, last_offset + 1, "no gap before the close");
                    last_offset = o;
                }
            }
            Some(Ok(tidewire::Message::Close(f))) => break f.map(|f| f.code.0),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, Some(1013));
    assert!(last_offset > 0);
    server.shutdown.cancel();
    assert!(reader.await.unwrap() > last_offset);
}

#[tokio::test]
async fn the_drop_policy_drops_publications_and_keeps_the_connection() {
    let mut cfg = config();
    cfg.client.queue_messages = 8;
    cfg.client.slow_consumer = SlowConsumer::Drop;
    let server = start(cfg).await;
    let (mut slow, _) = Client::connect(&server, None).await;
    slow.ok("subscribe", json!({"channel": "firehose"})).await;
    let published = flood(&server, "firehose", |hub| {
        metric(hub, "tidewire_hub_dropped_total") > 0
    })
    .await;
    // Still connected: it reads what was kept (with gaps), then answers.
    let mut offsets = Vec::new();
    while let Ok(Some(Ok(tidewire::Message::Text(t)))) =
        tokio::time::timeout(Duration::from_millis(500), slow.ws.recv()).await
    {
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        if let Some(o) = v["push"]["pub"]["offset"].as_u64() {
            offsets.push(o);
        }
    }
    assert!(offsets.len() < published, "some were dropped");
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(slow.ok("ping", json!({})).await, json!({}));
    assert_eq!(metric(&server.hub, "tidewire_hub_slow_consumers_total"), 0);
}

#[tokio::test]
async fn connection_limits_and_origins() {
    let mut cfg = config();
    cfg.server.max_connections = 3;
    cfg.server.max_connections_per_ip = 2;
    cfg.server.allowed_origins = vec!["https://app.example.com".into()];
    let server = start(cfg).await;
    let refused = tidewire::ClientBuilder::new(server.url())
        .header("Origin", "https://evil.example.com")
        .connect()
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");
    let (ws1, _) = tidewire::ClientBuilder::new(server.url())
        .header("Origin", "https://app.example.com")
        .connect()
        .await
        .unwrap();
    let (ws2, _) = tidewire::connect(&server.url()).await.unwrap();
    let third = tidewire::connect(&server.url()).await.unwrap_err();
    assert!(third.to_string().contains("429"), "{third}");
    drop((ws1, ws2));
    let hub = server.hub.clone();
    eventually("slots released", || hub.counts().sessions == 0).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_ws, _) = tidewire::connect(&server.url()).await.unwrap();

    // The overall limit: 503 for the connection beyond it.
    let mut cfg = config();
    cfg.server.max_connections = 2;
    let server = start(cfg).await;
    let (_a, _) = tidewire::connect(&server.url()).await.unwrap();
    let (_b, _) = tidewire::connect(&server.url()).await.unwrap();
    let third = tidewire::connect(&server.url()).await.unwrap_err();
    assert!(third.to_string().contains("503"), "{third}");

    // Every connection counts, plain HTTP ones too (on the event loop:
    // those it hands over to tokio, for as long as they are open).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = config();
    cfg.server.max_connections = 2;
    let server = start(cfg).await;
    let (_a, _) = tidewire::connect(&server.url()).await.unwrap();
    let mut kept = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    kept.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let third = tidewire::connect(&server.url()).await.unwrap_err();
    assert!(third.to_string().contains("503"), "{third}");
    drop(kept);
    let deadline = tokio::time::Instant::now() + LIMIT;
    while tidewire::connect(&server.url()).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the HTTP connection's place never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn wss_and_https_with_a_tls_acceptor() {
    let (acceptor, pem) = tidewire::tls::TlsAcceptor::self_signed(&["localhost"]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hub = Hub::new(config(), Arc::new(MemoryEngine::new())).unwrap();
    let shutdown = tidewire::CancellationToken::new();
    let task = tokio::spawn(tidewire_hub::http::serve(
        hub,
        listener,
        API_KEY,
        Some(acceptor),
        shutdown.clone(),
    ));
    let connector = tidewire::tls::TlsConnector::builder()
        .without_platform_roots()
        .add_ca_pem(pem.cert_pem.as_bytes())
        .unwrap()
        .build()
        .unwrap();
    let url = format!("wss://localhost:{port}/connection/websocket");
    let (mut ws, _) = tidewire::ClientBuilder::new(url)
        .tls(connector)
        .connect()
        .await
        .unwrap();
    ws.send_text(r#"{"id":1,"connect":{}}"#).await.unwrap();
    let Some(Ok(tidewire::Message::Text(reply))) = ws.recv().await else {
        panic!("no reply over wss")
    };
    assert!(reply.as_str().contains("\"client\""), "{reply}");
    // Plain HTTP on the TLS port gets no answer: the handshake fails.
    let (status, _) = tokio::time::timeout(LIMIT, async {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = tcp.read_to_end(&mut buf).await;
        (buf.starts_with(b"HTTP/1.1 200"), buf.len())
    })
    .await
    .unwrap();
    assert!(!status);
    shutdown.cancel();
    let close = loop {
        match tokio::time::timeout(LIMIT, ws.recv()).await.unwrap() {
            Some(Ok(tidewire::Message::Close(frame))) => break frame.map(|f| f.code.0),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(close, Some(1001));
    tokio::time::timeout(LIMIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
