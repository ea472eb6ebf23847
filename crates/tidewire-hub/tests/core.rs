//! The hub core without a socket: sessions over an in-memory transport
//! (a [`ClientSink`] that keeps what it is given), so that connect,
//! subscribe, publish, recovery, presence, disconnect, shutdown and the
//! slow-consumer outcomes are checked with no network and no front.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use common::engine::TestEngine;
use serde_json::{json, Value};
use tidewire_hub::config::ChannelOptions;
use tidewire_hub::node::{ClientSink, FrameKind, SendOutcome, Session, Transport};
use tidewire_hub::node::{HEARTBEAT, NODE_TIMEOUT, SURVEY_TIMEOUT};
use tidewire_hub::protocol::{
    Batch, Codec, Disconnect, DisconnectCode, ErrorReply, Frame, HistoryRequest, Incoming, Payload,
    Push, Reply, JSON,
};
use tidewire_hub::{Config, Hub, MemoryEngine, ResumeError};

/// An in-memory transport: frames queue up to `capacity`, like a
/// front's send queue; past it a publication is dropped and anything
/// else closes the connection (1013), as the WebSocket front does with
/// its `drop` policy.
struct MemorySink {
    codec: &'static dyn Codec,
    /// Frames as text (a binary codec's JSON bytes too), in order.
    frames: Mutex<VecDeque<String>>,
    /// How many of them came as binary frames.
    binary: AtomicUsize,
    closed: Mutex<Option<(u16, String)>>,
    capacity: usize,
}

impl MemorySink {
    fn new(capacity: usize) -> Arc<MemorySink> {
        MemorySink::with_codec(capacity, &JSON)
    }

    fn with_codec(capacity: usize, codec: &'static dyn Codec) -> Arc<MemorySink> {
        Arc::new(MemorySink {
            codec,
            frames: Mutex::new(VecDeque::new()),
            binary: AtomicUsize::new(0),
            closed: Mutex::new(None),
            capacity,
        })
    }

    fn take(&self) -> Vec<Value> {
        self.frames
            .lock()
            .unwrap()
            .drain(..)
            .map(|f| serde_json::from_str(&f).unwrap())
            .collect()
    }

    fn closed(&self) -> Option<(u16, String)> {
        self.closed.lock().unwrap().clone()
    }
}

impl ClientSink for MemorySink {
    fn transport(&self) -> Transport {
        Transport {
            name: "memory",
            codec: self.codec,
            unidirectional: false,
        }
    }

    fn send(&self, frame: Frame, kind: FrameKind) -> SendOutcome {
        if self.closed().is_some() {
            return SendOutcome::Closed;
        }
        let mut frames = self.frames.lock().unwrap();
        if frames.len() >= self.capacity {
            drop(frames);
            if kind == FrameKind::Publication {
                return SendOutcome::Dropped;
            }
            self.close(1013, "send queue full");
            return SendOutcome::Closed;
        }
        if let Frame::Binary(_) = frame {
            self.binary.fetch_add(1, Ordering::Relaxed);
        }
        frames.push_back(String::from_utf8(frame.as_bytes().to_vec()).expect("JSON in the frame"));
        SendOutcome::Queued
    }

    fn close(&self, code: u16, reason: &str) {
        self.closed
            .lock()
            .unwrap()
            .get_or_insert_with(|| (code, reason.to_owned()));
    }

    fn queued(&self) -> usize {
        self.frames.lock().unwrap().len()
    }

    fn is_closing(&self) -> bool {
        self.closed().is_some()
    }
}

/// One client over the in-memory transport.
struct Conn {
    session: Session,
    sink: Arc<MemorySink>,
    next_id: u64,
}

impl Conn {
    fn open(hub: &Hub, capacity: usize) -> Conn {
        let sink = MemorySink::new(capacity);
        let session = hub.open(sink.clone());
        Conn::over(session, sink)
    }

    fn over(session: Session, sink: Arc<MemorySink>) -> Conn {
        Conn {
            session,
            sink,
            next_id: 1_000,
        }
    }

    /// Runs one command; returns its reply (the frames before it that are
    /// not replies stay for [`pushes`](Self::pushes)).
    async fn call(&mut self, command: &str, body: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.session
            .handle_text(&json!({"id": id, command: body}).to_string())
            .await;
        settle().await;
        let mut frames = self.sink.frames.lock().unwrap();
        let at = frames
            .iter()
            .position(|f| f.starts_with(&format!("{{\"id\":{id},")))
            .unwrap_or_else(|| panic!("no reply to {command}: {frames:?}"));
        serde_json::from_str(&frames.remove(at).unwrap()).unwrap()
    }

    async fn ok(&mut self, command: &str, body: Value) -> Value {
        let reply = self.call(command, body).await;
        assert!(reply.get("error").is_none(), "{command}: {reply}");
        reply[command].clone()
    }

    async fn connected(hub: &Hub) -> (Conn, String) {
        let mut conn = Conn::open(hub, 1024);
        let reply = conn.ok("connect", json!({})).await;
        (conn, reply["client"].as_str().unwrap().to_owned())
    }

    /// The pushes received so far (the `push` objects).
    fn pushes(&self) -> Vec<Value> {
        self.sink
            .take()
            .into_iter()
            .map(|f| f["push"].clone())
            .collect()
    }

    /// Waits (up to 5 s: a diff may wait for its interval) for a
    /// `presence_diff` push that satisfies `want`.
    async fn wait_diff(&self, what: &str, want: impl Fn(&Value) -> bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let found = {
                let mut frames = self.sink.frames.lock().unwrap();
                let at = frames.iter().position(|f| {
                    let v: Value = serde_json::from_str(f).unwrap();
                    v["push"].get("presence_diff").is_some_and(&want)
                });
                at.and_then(|at| frames.remove(at)).is_some()
            };
            if found {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what} never came");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    fn publications(&self) -> Vec<Value> {
        self.pushes()
            .into_iter()
            .filter_map(|p| p.get("pub").cloned())
            .collect()
    }
}

/// Lets the memory engine's delivery tasks run: a publication reaches the
/// subscribers from a task of its own, not the publisher's. On the
/// current-thread runtime of these tests a yield runs every task that is
/// ready before the yielding one again.
async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

/// Whether a presence diff lists `client` in `list` (`joins`, `leaves`).
fn names(diff: &Value, list: &str, client: &str) -> bool {
    diff[list]
        .as_array()
        .is_some_and(|l| l.iter().any(|c| c["client"] == client))
}

fn hub() -> Hub {
    Hub::new(Config::default(), Arc::new(MemoryEngine::new())).unwrap()
}

#[tokio::test]
async fn connect_subscribe_and_publish_reach_every_subscriber_once() {
    let hub = hub();
    let (mut a, a_id) = Conn::connected(&hub).await;
    let (mut b, _) = Conn::connected(&hub).await;
    let sub = a.ok("subscribe", json!({"channel": "room"})).await;
    assert_eq!(sub["offset"], 0);
    b.ok("subscribe", json!({"channel": "room"})).await;
    let ack = a
        .ok(
            "publish",
            json!({"channel": "room", "data": {"text": "hi"}}),
        )
        .await;
    assert_eq!(ack["offset"], 1);
    for conn in [&a, &b] {
        let pubs = conn.publications();
        assert_eq!(pubs.len(), 1, "{pubs:?}");
        assert_eq!(pubs[0]["data"], json!({"text": "hi"}));
        assert_eq!(pubs[0]["offset"], 1);
        assert_eq!(pubs[0]["info"]["client"], a_id.as_str());
    }
    // Before connect, nothing but connect runs.
    let mut c = Conn::open(&hub, 16);
    let reply = c.call("subscribe", json!({"channel": "room"})).await;
    assert_eq!(reply["error"]["code"], 103);
}

#[tokio::test]
async fn a_reconnecting_client_recovers_exactly_what_it_missed() {
    let hub = hub();
    let (mut a, _) = Conn::connected(&hub).await;
    let sub = a.ok("subscribe", json!({"channel": "feed"})).await;
    let epoch = sub["epoch"].as_str().unwrap().to_owned();
    a.ok("publish", json!({"channel": "feed", "data": 1})).await;
    a.session.close().await;
    for n in 2..=4 {
        hub.publish(
            "feed",
            Payload::from_json(serde_json::value::to_raw_value(&n).unwrap()),
        )
        .await
        .unwrap();
    }
    let (mut again, _) = Conn::connected(&hub).await;
    let sub = again
        .ok(
            "subscribe",
            json!({"channel": "feed", "recover": true, "offset": 1, "epoch": epoch}),
        )
        .await;
    assert_eq!(sub["recovered"], true);
    let missed: Vec<(u64, u64)> = sub["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["offset"].as_u64().unwrap(), p["data"].as_u64().unwrap()))
        .collect();
    assert_eq!(missed, [(2, 2), (3, 3), (4, 4)]);
    // Another epoch: not recovered.
    let (mut late, _) = Conn::connected(&hub).await;
    let sub = late
        .ok(
            "subscribe",
            json!({"channel": "feed", "recover": true, "offset": 1, "epoch": "other"}),
        )
        .await;
    assert_eq!(sub["recovered"], false);
}

#[tokio::test]
async fn presence_lists_the_subscribers_and_diffs_name_who_joined_and_left() {
    let hub = hub();
    let (mut a, a_id) = Conn::connected(&hub).await;
    let (mut b, b_id) = Conn::connected(&hub).await;
    a.ok("subscribe", json!({"channel": "lobby"})).await;
    b.ok("subscribe", json!({"channel": "lobby"})).await;
    let presence = a.ok("presence", json!({"channel": "lobby"})).await;
    let mut ids: Vec<&str> = presence["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    let mut want = [a_id.as_str(), b_id.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want);
    assert_eq!(
        a.ok("presence_stats", json!({"channel": "lobby"})).await,
        json!({"clients": 2, "users": 1})
    );
    // a's own join went out at once (a quiet channel), b's at once or
    // when the interval ends; then b leaves.
    a.wait_diff("a's own join", |d| names(d, "joins", &a_id))
        .await;
    a.wait_diff("b's join", |d| names(d, "joins", &b_id)).await;
    b.session.close().await;
    a.wait_diff("b's leave", |d| names(d, "leaves", &b_id))
        .await;
    assert_eq!(
        a.ok("presence_stats", json!({"channel": "lobby"})).await,
        json!({"clients": 1, "users": 1})
    );
}

#[tokio::test]
async fn disconnect_and_shutdown_tell_the_client_then_close() {
    let hub = hub();
    let (a, a_id) = Conn::connected(&hub).await;
    let (b, _) = Conn::connected(&hub).await;
    let gone = hub
        .disconnect_user(
            "",
            Some(&a_id),
            &Disconnect::new(DisconnectCode::Server, "bye"),
        )
        .await;
    assert_eq!(gone, 1);
    let pushes = a.pushes();
    assert_eq!(
        pushes.last().unwrap()["disconnect"]["code"],
        3000,
        "{pushes:?}"
    );
    assert_eq!(a.sink.closed(), Some((3000, "bye".into())));
    assert_eq!(b.sink.closed(), None, "only the one asked for");
    hub.shutdown();
    let pushes = b.pushes();
    assert_eq!(pushes.last().unwrap()["disconnect"]["code"], 3001);
    assert_eq!(pushes.last().unwrap()["disconnect"]["reconnect"], true);
    assert_eq!(b.sink.closed().unwrap().0, 1001);
    // A session opened during shutdown is told to leave at once.
    let late = Conn::open(&hub, 16);
    assert_eq!(late.sink.closed().unwrap().0, 1001);
}

#[tokio::test]
async fn a_slow_consumer_loses_publications_not_replies_and_an_overflowing_reply_ends_it() {
    // Publications only (no presence diffs in the queue).
    let mut config = Config::default();
    config.channels.join_leave = false;
    let hub = Hub::new(config, Arc::new(MemoryEngine::new())).unwrap();
    let (mut publisher, _) = Conn::connected(&hub).await;
    publisher.ok("subscribe", json!({"channel": "fast"})).await;
    let mut slow = Conn::open(&hub, 4);
    slow.ok("connect", json!({})).await;
    slow.ok("subscribe", json!({"channel": "fast"})).await;
    slow.sink.take();
    for n in 0..10 {
        publisher
            .ok("publish", json!({"channel": "fast", "data": n}))
            .await;
        publisher.sink.take();
    }
    // Four fit; the other six were dropped by the policy and counted.
    let kept: Vec<u64> = slow
        .publications()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(kept.len(), 4, "{kept:?}");
    assert_eq!(kept, [1, 2, 3, 4]);
    assert!(
        hub.metrics_text().contains("tidewire_hub_dropped_total 6"),
        "{}",
        hub.metrics_text()
    );
    assert_eq!(slow.sink.closed(), None);
    // A reply that does not fit ends the connection, and the rest of
    // its batch does not run.
    slow.sink.take();
    let batch: Vec<String> = (1..=6)
        .map(|id| format!(r#"{{"id":{id},"ping":{{}}}}"#))
        .chain([r#"{"id":7,"publish":{"channel":"fast","data":"never"}}"#.to_owned()])
        .collect();
    slow.session.handle_text(&batch.join("\n")).await;
    assert_eq!(slow.sink.closed().unwrap().0, 1013);
    let history = hub
        .history(&HistoryRequest {
            channel: "fast".into(),
            limit: Some(0),
            since: None,
            reverse: false,
        })
        .await
        .unwrap();
    assert_eq!(
        history.offset, 10,
        "the publish after the overflow never ran"
    );
}

#[tokio::test]
async fn the_engine_is_subscribed_before_the_history_is_read() {
    let engine = Arc::new(TestEngine::default());
    let hub = Hub::new(Config::default(), engine.clone()).unwrap();
    let (mut a, _) = Conn::connected(&hub).await;
    a.ok("subscribe", json!({"channel": "feed"})).await;
    // With a broker, what is published between the two would be lost the
    // other way round.
    assert_eq!(engine.calls(), ["+feed", "history feed"]);
}

#[tokio::test]
async fn a_subscribe_the_engine_refuses_is_not_confirmed_with_or_without_history() {
    let engine = Arc::new(TestEngine::default());
    let mut config = Config::default();
    config.namespaces.insert(
        "quiet".into(),
        ChannelOptions {
            history_size: 0,
            recovery: false,
            ..ChannelOptions::default()
        },
    );
    let hub = Hub::new(config, engine.clone()).unwrap();
    let (mut a, _) = Conn::connected(&hub).await;
    engine.refuse_subscribe.store(true, Ordering::Relaxed);
    for channel in ["feed", "quiet:room"] {
        let reply = a.call("subscribe", json!({ "channel": channel })).await;
        assert_eq!(reply["error"]["code"], 114, "{channel}: {reply}");
    }
    // Nothing left behind: the engine is asked again on the next try,
    // and the client can subscribe once it answers.
    engine.refuse_subscribe.store(false, Ordering::Relaxed);
    for channel in ["feed", "quiet:room"] {
        a.ok("subscribe", json!({ "channel": channel })).await;
        a.ok("publish", json!({ "channel": channel, "data": 1 }))
            .await;
    }
    settle().await;
    assert_eq!(a.publications().len(), 2);
    let subscribes = engine.calls().iter().filter(|c| c.starts_with('+')).count();
    assert_eq!(subscribes, 4, "{:?}", engine.calls());
}

#[tokio::test]
async fn a_last_leave_racing_a_first_join_leaves_the_engine_subscribed() {
    let engine = Arc::new(TestEngine::default());
    // An unsubscribe slower than a subscribe: unordered, b's subscribe
    // would finish first and a's unsubscribe would then undo it.
    *engine.delays.lock().unwrap() = (
        std::time::Duration::from_millis(10),
        std::time::Duration::from_millis(100),
    );
    let hub = Hub::new(Config::default(), engine.clone()).unwrap();
    let (mut a, _) = Conn::connected(&hub).await;
    let (mut b, _) = Conn::connected(&hub).await;
    a.ok("subscribe", json!({"channel": "race"})).await;
    engine.calls.lock().unwrap().clear();
    // a leaves while b joins.
    let (left, joined) = tokio::join!(
        a.ok("unsubscribe", json!({"channel": "race"})),
        b.ok("subscribe", json!({"channel": "race"})),
    );
    assert_eq!((left, joined.get("epoch").is_some()), (json!({}), true));
    let calls: Vec<String> = engine
        .calls()
        .into_iter()
        .filter(|c| !c.starts_with("history"))
        .collect();
    // One at a time, each on the state it found: unsubscribed, then
    // subscribed again for b (or nothing at all had b come first).
    assert!(calls == ["-race", "+race"] || calls.is_empty(), "{calls:?}");
    // Whatever the order, b is subscribed and gets what is published.
    a.ok("subscribe", json!({"channel": "race"})).await;
    a.ok("publish", json!({"channel": "race", "data": 1})).await;
    assert_eq!(b.publications().len(), 1);
}

/// A resumable session over the in-memory transport, connected and
/// subscribed to `channel`.
async fn resumable(hub: &Hub, channel: &str) -> (Conn, String) {
    let sink = MemorySink::new(1024);
    let mut conn = Conn::over(hub.open_resumable(sink.clone()), sink);
    let id = conn.ok("connect", json!({})).await["client"]
        .as_str()
        .unwrap()
        .to_owned();
    conn.ok("subscribe", json!({"channel": channel})).await;
    conn.sink.take();
    (conn, id)
}

fn diffs(conn: &Conn) -> Vec<Value> {
    conn.pushes()
        .into_iter()
        .filter_map(|p| p.get("presence_diff").cloned())
        .collect()
}

#[tokio::test]
async fn a_detached_session_stays_subscribed_and_gets_what_was_published_meanwhile() {
    let hub = hub();
    let (mut watcher, _) = Conn::connected(&hub).await;
    watcher.ok("subscribe", json!({"channel": "room"})).await;
    let (conn, id) = resumable(&hub, "room").await;
    let key = conn
        .session
        .detach(Duration::from_secs(30))
        .expect("resumable");
    assert!(key.starts_with(&id), "{key}");
    assert_eq!(hub.counts().detached_sessions, 1);
    for n in 1..=3 {
        watcher
            .ok("publish", json!({"channel": "room", "data": n}))
            .await;
    }
    // Still present: nobody was told it left.
    assert_eq!(
        watcher
            .ok("presence_stats", json!({"channel": "room"}))
            .await["clients"],
        2
    );
    // The next transport: what waited comes first, in order.
    let sink = MemorySink::new(1024);
    let session = hub.resume(&key, sink.clone()).expect("resumed");
    assert_eq!(session.client_id(), id);
    let mut back = Conn::over(session, sink);
    let offsets: Vec<u64> = back
        .publications()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [1, 2, 3]);
    assert_eq!(back.ok("ping", json!({})).await, json!({}));
    watcher
        .ok("publish", json!({"channel": "room", "data": 4}))
        .await;
    assert_eq!(back.publications().len(), 1, "live again");
    assert_eq!(hub.counts().detached_sessions, 0);
    assert_eq!(
        hub.resume(&key, MemorySink::new(8)).unwrap_err(),
        ResumeError::Unknown,
        "a key resumes once"
    );
    assert!(
        !diffs(&watcher).iter().any(|d| names(d, "leaves", &id)),
        "no leave while detached"
    );
}

#[tokio::test(start_paused = true)]
async fn a_detached_session_not_resumed_in_time_ends_like_a_closed_connection() {
    let hub = hub();
    let (mut watcher, _) = Conn::connected(&hub).await;
    watcher.ok("subscribe", json!({"channel": "room"})).await;
    let (conn, id) = resumable(&hub, "room").await;
    let key = conn.session.detach(Duration::from_secs(2)).unwrap();
    // The node's maintenance reaps it once the deadline passed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(hub.counts().detached_sessions, 0);
    watcher
        .wait_diff("its leave", |d| names(d, "leaves", &id))
        .await;
    assert_eq!(
        watcher
            .ok("presence_stats", json!({"channel": "room"}))
            .await["clients"],
        1
    );
    let err = hub.resume(&key, MemorySink::new(8)).unwrap_err();
    assert!(
        matches!(err, ResumeError::Expired | ResumeError::Unknown),
        "{err}"
    );
}

#[tokio::test]
async fn a_detached_sessions_buffer_is_bounded_like_a_send_queue() {
    let mut config = Config::default();
    config.client.queue_messages = 3;
    config.channels.join_leave = false;
    let hub = Hub::new(config, Arc::new(MemoryEngine::new())).unwrap();
    let (mut publisher, _) = Conn::connected(&hub).await;
    publisher.ok("subscribe", json!({"channel": "feed"})).await;
    let (conn, id) = resumable(&hub, "feed").await;
    let key = conn.session.detach(Duration::from_secs(30)).unwrap();
    for n in 1..=5 {
        publisher
            .ok("publish", json!({"channel": "feed", "data": n}))
            .await;
    }
    // Three waited; the other two were dropped (the client sees the gap in
    // offsets and recovers from history).
    let sink = MemorySink::new(1024);
    let back = Conn::over(hub.resume(&key, sink.clone()).unwrap(), sink);
    let offsets: Vec<u64> = back
        .publications()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [1, 2, 3]);
    assert!(hub.metrics_text().contains("tidewire_hub_dropped_total 2"));
    // A control frame that does not fit ends the session.
    let key = back.session.detach(Duration::from_secs(30)).unwrap();
    for n in 6..=8 {
        publisher
            .ok("publish", json!({"channel": "feed", "data": n}))
            .await;
    }
    let told = hub
        .disconnect_user(
            "",
            Some(&id),
            &Disconnect::new(DisconnectCode::Server, "bye"),
        )
        .await;
    assert_eq!(told, 1);
    assert_eq!(
        hub.resume(&key, MemorySink::new(8)).unwrap_err(),
        ResumeError::Closed
    );
}

#[tokio::test]
async fn only_a_resumable_session_detaches() {
    let hub = hub();
    let (mut plain, _) = Conn::connected(&hub).await;
    plain.ok("subscribe", json!({"channel": "room"})).await;
    assert_eq!(plain.session.resume_key(), None);
    assert_eq!(plain.session.detach(Duration::from_secs(30)), None);
    // It ended: its subscription is cleaned up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while hub.counts().subscriptions > 0 {
        assert!(tokio::time::Instant::now() < deadline, "not cleaned up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_node_refreshes_its_clients_presence_before_it_expires() {
    let mut config = Config::default();
    config.client.presence_ttl = Duration::from_secs(3);
    let hub = Hub::new(config, Arc::new(MemoryEngine::new())).unwrap();
    let (mut a, _) = Conn::connected(&hub).await;
    a.ok("subscribe", json!({"channel": "room"})).await;
    // Three times the TTL: without the node's refreshes the entry is gone.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        a.ok("presence_stats", json!({"channel": "room"})).await,
        json!({"clients": 1, "users": 1})
    );
}

#[tokio::test]
async fn a_hub_takes_its_broker_and_presence_store_from_two_engines() {
    use tidewire_hub::{Broker, PresenceStore};
    let broker = Arc::new(MemoryEngine::new());
    let presence = Arc::new(MemoryEngine::new());
    let hub = Hub::with_engines(Config::default(), broker.clone(), presence.clone()).unwrap();
    let (mut a, _) = Conn::connected(&hub).await;
    a.ok("subscribe", json!({"channel": "room"})).await;
    a.ok("publish", json!({"channel": "room", "data": 1})).await;
    assert_eq!(a.publications().len(), 1);
    // Streams in the broker, presence in the store.
    assert_eq!((broker.stats().streams, presence.stats().streams), (1, 0));
    assert_eq!(
        (broker.presence_channels(), presence.presence_channels()),
        (0, 1)
    );
    assert_eq!(
        a.ok("presence_stats", json!({"channel": "room"})).await["clients"],
        1
    );
    assert_eq!(hub.counts().presence_channels, 1);
}

#[tokio::test]
async fn two_nodes_over_one_engine_share_publications_presence_and_joins() {
    let engine = Arc::new(MemoryEngine::new());
    let node_a = Hub::new(Config::default(), engine.clone()).unwrap();
    let node_b = Hub::new(Config::default(), engine.clone()).unwrap();
    let (mut on_a, a_id) = Conn::connected(&node_a).await;
    let (mut on_b, b_id) = Conn::connected(&node_b).await;
    on_b.ok("subscribe", json!({"channel": "room"})).await;
    on_a.ok("subscribe", json!({"channel": "room"})).await;
    // A's join reaches B's subscriber through the engine.
    on_b.wait_diff("a's join", |d| names(d, "joins", &a_id))
        .await;
    let ack = on_a
        .ok("publish", json!({"channel": "room", "data": "from a"}))
        .await;
    let got = on_b.publications();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0]["data"].clone(), got[0]["offset"].clone()),
        (json!("from a"), ack["offset"].clone())
    );
    assert_eq!(on_a.publications().len(), 1, "and A's own subscriber");
    // Presence is the engine's: both nodes' clients, from either node.
    let mut ids: Vec<String> = node_b
        .presence("room")
        .await
        .unwrap()
        .iter()
        .map(|c| c.client.clone())
        .collect();
    ids.sort();
    let mut want = vec![a_id.clone(), b_id.clone()];
    want.sort();
    assert_eq!(ids, want);
    // A node that goes away stops receiving; the other goes on.
    drop(on_b);
    drop(node_b);
    on_a.ok("publish", json!({"channel": "room", "data": 2}))
        .await;
    assert_eq!(on_a.publications().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_api_disconnects_and_unsubscribes_on_every_node_and_info_lists_the_nodes() {
    let engine = Arc::new(MemoryEngine::new());
    let node_a = Hub::new(Config::default(), engine.clone()).unwrap();
    let node_b = Hub::new(Config::default(), engine.clone()).unwrap();
    let (_on_a, _) = Conn::connected(&node_a).await;
    let (mut on_b, b_id) = Conn::connected(&node_b).await;
    on_b.ok("subscribe", json!({"channel": "room"})).await;
    on_b.ok("subscribe", json!({"channel": "other"})).await;
    on_b.sink.take();
    // Through node A, for a client of node B.
    let here = node_a.unsubscribe_user("", "room", Some(&b_id)).await;
    assert_eq!(here, 0, "none on A itself");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if on_b
            .pushes()
            .iter()
            .any(|p| p["channel"] == "room" && p.get("unsubscribe").is_some())
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "B's client was not unsubscribed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let here = node_a
        .disconnect_user(
            "",
            Some(&b_id),
            &Disconnect::new(DisconnectCode::Server, "bye"),
        )
        .await;
    assert_eq!(here, 0);
    assert_eq!(on_b.sink.closed(), Some((3000, "bye".into())));
    // Heartbeats: each node lists both, itself first.
    tokio::time::sleep(HEARTBEAT + Duration::from_secs(1)).await;
    let listed: Vec<String> = node_a.nodes().into_iter().map(|n| n.node).collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0], node_a.node_id());
    assert!(listed.contains(&node_b.node_id().to_owned()));
    // A node that stops is dropped once unheard of for NODE_TIMEOUT.
    drop(on_b);
    drop(node_b);
    tokio::time::sleep(NODE_TIMEOUT + HEARTBEAT).await;
    assert_eq!(node_a.nodes().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn channels_counts_the_subscribers_of_every_node() {
    let engine = Arc::new(MemoryEngine::new());
    let node_a = Hub::new(Config::default(), engine.clone()).unwrap();
    let (mut on_a, _) = Conn::connected(&node_a).await;
    on_a.ok("subscribe", json!({"channel": "news:eu"})).await;
    // Alone as far as it knows: its own channels, at once.
    assert_eq!(node_a.channels("news:").await, [("news:eu".to_owned(), 1)]);
    let node_b = Hub::new(Config::default(), engine.clone()).unwrap();
    let (mut on_b, _) = Conn::connected(&node_b).await;
    let (mut also_b, _) = Conn::connected(&node_b).await;
    on_b.ok("subscribe", json!({"channel": "news:eu"})).await;
    also_b.ok("subscribe", json!({"channel": "news:us"})).await;
    also_b.ok("subscribe", json!({"channel": "sport"})).await;
    // Once the nodes know each other, the survey adds B's.
    tokio::time::sleep(HEARTBEAT + Duration::from_secs(1)).await;
    assert_eq!(
        node_a.channels("news:").await,
        [("news:eu".to_owned(), 2), ("news:us".to_owned(), 1)]
    );
    assert_eq!(node_b.channels("").await.len(), 3);
    // A node that does not answer is left out after the survey's timeout.
    drop((on_b, also_b));
    drop(node_b);
    let started = tokio::time::Instant::now();
    assert_eq!(node_a.channels("news:").await, [("news:eu".to_owned(), 1)]);
    assert!(started.elapsed() <= SURVEY_TIMEOUT);
}

#[tokio::test]
async fn a_publication_stored_before_a_subscribe_but_delivered_after_it_is_not_seen_twice() {
    let engine = Arc::new(TestEngine::default());
    let hub = Hub::new(Config::default(), engine.clone()).unwrap();
    let (mut a, _) = Conn::connected(&hub).await;
    a.ok("subscribe", json!({"channel": "feed"})).await;
    // Stored at offset 1, still on its way to the node...
    engine.hold();
    a.ok("publish", json!({"channel": "feed", "data": 1})).await;
    // ...when b subscribes: b's position includes it.
    let (mut b, _) = Conn::connected(&hub).await;
    let sub = b.ok("subscribe", json!({"channel": "feed"})).await;
    assert_eq!(sub["offset"], 1);
    b.sink.take();
    engine.release();
    let offsets = |conn: &Conn| -> Vec<u64> {
        conn.publications()
            .iter()
            .map(|p| p["offset"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(offsets(&a), [1]);
    assert_eq!(
        offsets(&b),
        [] as [u64; 0],
        "b has it in its position already"
    );
    // From the next one on, b is live.
    a.ok("publish", json!({"channel": "feed", "data": 2})).await;
    assert_eq!(offsets(&a), [2]);
    assert_eq!(offsets(&b), [2]);
    // Pushes other than publications reach it while it catches up too.
    let (mut c, c_id) = Conn::connected(&hub).await;
    engine.hold();
    a.ok("publish", json!({"channel": "feed", "data": 3})).await;
    c.ok("subscribe", json!({"channel": "feed"})).await;
    b.wait_diff("c's join", |d| names(d, "joins", &c_id)).await;
    c.wait_diff("its own join", |d| names(d, "joins", &c_id))
        .await;
    engine.release();
    assert_eq!(offsets(&c), [] as [u64; 0]);
}

/// A second codec for the fan-out tests: JSON v1 in binary frames, which
/// counts the publications it encodes.
struct BinaryJson;

static BINARY_PUBLICATIONS: AtomicUsize = AtomicUsize::new(0);

impl Codec for BinaryJson {
    fn name(&self) -> &'static str {
        "binary-json"
    }
    fn decode_batch<'a>(
        &self,
        message: Incoming<'a>,
        max_batch: usize,
    ) -> Result<Batch<'a>, ErrorReply> {
        match message {
            Incoming::Binary(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => JSON.decode_batch(Incoming::Text(text), max_batch),
                Err(_) => JSON.decode_batch(Incoming::Binary(bytes), max_batch),
            },
            text => JSON.decode_batch(text, max_batch),
        }
    }
    fn encode_reply(&self, id: u64, reply: &Reply) -> Frame {
        binary(JSON.encode_reply(id, reply))
    }
    fn encode_error(&self, id: u64, error: &ErrorReply) -> Frame {
        binary(JSON.encode_error(id, error))
    }
    fn encode_push(&self, push: &Push<'_>) -> Frame {
        if let Push::Publication { .. } = push {
            BINARY_PUBLICATIONS.fetch_add(1, Ordering::Relaxed);
        }
        binary(JSON.encode_push(push))
    }
}

fn binary(frame: Frame) -> Frame {
    Frame::Binary(bytes::Bytes::copy_from_slice(frame.as_bytes()))
}

#[tokio::test]
async fn subscribers_of_two_codecs_each_get_a_publication_in_their_own_once_encoded() {
    static CODEC: BinaryJson = BinaryJson;
    let hub = hub();
    let (mut text, _) = Conn::connected(&hub).await;
    let mut binaries = Vec::new();
    for _ in 0..3 {
        let sink = MemorySink::with_codec(1024, &CODEC);
        let mut conn = Conn::over(hub.open(sink.clone()), sink);
        conn.ok("connect", json!({})).await;
        conn.ok("subscribe", json!({"channel": "room"})).await;
        binaries.push(conn);
    }
    text.ok("subscribe", json!({"channel": "room"})).await;
    let before = BINARY_PUBLICATIONS.load(Ordering::Relaxed);
    text.ok("publish", json!({"channel": "room", "data": {"n": 1}}))
        .await;
    // One encoding for the three binary subscribers.
    assert_eq!(BINARY_PUBLICATIONS.load(Ordering::Relaxed) - before, 1);
    let expected = text.publications();
    assert_eq!(expected.len(), 1, "{expected:?}");
    assert_eq!(expected[0]["data"], json!({"n": 1}));
    assert_eq!(text.sink.binary.load(Ordering::Relaxed), 0);
    for conn in &binaries {
        // Replies and pushes alike in the session's codec.
        assert_eq!(conn.publications(), expected);
        assert!(conn.sink.binary.load(Ordering::Relaxed) >= 3);
    }
}

#[tokio::test]
async fn subscribers_are_told_to_subscribe_again_when_publications_were_lost() {
    let engine = Arc::new(TestEngine::default());
    let hub = Hub::new(Config::default(), engine.clone()).unwrap();
    let (mut a, _) = Conn::connected(&hub).await;
    let (mut b, _) = Conn::connected(&hub).await;
    let sub = a.ok("subscribe", json!({"channel": "feed"})).await;
    b.ok("subscribe", json!({"channel": "feed"})).await;
    a.ok("publish", json!({"channel": "feed", "data": 1})).await;
    assert_eq!(a.publications().len(), 1);
    assert_eq!(b.publications().len(), 1);
    engine.lose("feed");
    settle().await;
    for conn in [&a, &b] {
        let pushes = conn.pushes();
        assert_eq!(pushes.len(), 1, "{pushes:?}");
        assert_eq!(pushes[0]["channel"], "feed");
        assert_eq!(pushes[0]["unsubscribe"]["code"], 2002);
    }
    // No longer subscribed: nothing more arrives, the engine is let go.
    let data = serde_json::value::RawValue::from_string("2".into()).unwrap();
    hub.publish("feed", Payload::from_json(data)).await.unwrap();
    settle().await;
    assert!(a.publications().is_empty());
    assert!(b.publications().is_empty());
    assert_eq!(hub.counts().subscriptions, 0);
    assert_eq!(engine.calls().last().map(String::as_str), Some("-feed"));
    // Subscribing again recovers from the last position seen.
    let again = a
        .ok(
            "subscribe",
            json!({"channel": "feed", "recover": true, "offset": 1, "epoch": sub["epoch"]}),
        )
        .await;
    assert_eq!(again["recovered"], true);
    assert_eq!(again["publications"][0]["offset"], 2);
}

#[tokio::test(start_paused = true)]
async fn a_drain_window_spreads_the_shutdown_disconnects() {
    let mut config = Config::default();
    config.server.drain_window = Duration::from_secs(1);
    let hub = Hub::new(config, Arc::new(MemoryEngine::new())).unwrap();
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(Conn::connected(&hub).await.0);
    }
    let told = |conns: &[Conn]| conns.iter().filter(|c| c.sink.closed().is_some()).count();
    hub.shutdown();
    assert!(hub.is_shutting_down());
    settle().await;
    // Ten steps of 100 ms: two clients per step, the first at once.
    assert_eq!(told(&conns), 2);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(told(&conns), 10);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(told(&conns), 20);
    for conn in &conns {
        let pushes = conn.pushes();
        assert_eq!(pushes[0]["disconnect"]["code"], 3001, "{pushes:?}");
        assert_eq!(
            conn.sink.closed(),
            Some((1001, "server shutting down".into()))
        );
    }
    // One that opens meanwhile is told at once.
    let late = Conn::open(&hub, 16);
    assert!(late.sink.closed().is_some());
    // The window must fit in the shutdown's wait.
    let mut bad = Config::default();
    bad.server.drain_window = bad.server.shutdown_timeout;
    assert!(bad.validate().is_err());
}
