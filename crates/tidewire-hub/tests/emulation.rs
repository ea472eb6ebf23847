//! The HTTP fallbacks: a session over HTTP streaming (NDJSON) or
//! Server-Sent Events, its commands POSTed to any node (relayed to the
//! session's own), in order; bad input refused with the right status.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{api, http, TestServer, LIMIT};
use serde_json::{json, Value};
use tidewire_hub::{Config, MemoryEngine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn serve(config: Config, engine: Arc<MemoryEngine>) -> TestServer {
    common::start_on(config, engine).await
}

/// A streamed HTTP response read message by message (chunked transfer
/// decoded; NDJSON lines, or the `data:` of SSE events).
struct Stream {
    tcp: TcpStream,
    raw: Vec<u8>,
    body: Vec<u8>,
    messages: VecDeque<Value>,
    sse: bool,
    pub headers: String,
}

impl Stream {
    async fn open(addr: SocketAddr, request: String, sse: bool) -> Stream {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut stream = Stream {
            tcp,
            raw: Vec::new(),
            body: Vec::new(),
            messages: VecDeque::new(),
            sse,
            headers: String::new(),
        };
        while !stream.raw.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(stream.read_more().await, "no response head");
        }
        let end = stream
            .raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap();
        stream.headers = String::from_utf8_lossy(&stream.raw[..end]).into_owned();
        stream.raw.drain(..end + 4);
        stream
    }

    async fn http_stream(addr: SocketAddr, commands: &str) -> Stream {
        Stream::http_stream_with(addr, commands, "").await
    }

    /// `headers`: more header lines, each ending in CRLF.
    async fn http_stream_with(addr: SocketAddr, commands: &str, headers: &str) -> Stream {
        let request = format!(
            "POST /connection/http_stream HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n{headers}\r\n{commands}",
            commands.len()
        );
        Stream::open(addr, request, false).await
    }

    async fn sse(addr: SocketAddr, commands: &str) -> Stream {
        Stream::sse_with(addr, commands, "").await
    }

    async fn sse_with(addr: SocketAddr, commands: &str, headers: &str) -> Stream {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("commands", commands)
            .finish();
        let request = format!(
            "GET /connection/sse?{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{headers}\r\n"
        );
        Stream::open(addr, request, true).await
    }

    async fn read_more(&mut self) -> bool {
        let mut buf = [0u8; 8192];
        match tokio::time::timeout(LIMIT, self.tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.raw.extend_from_slice(&buf[..n]);
                true
            }
            Err(_) => panic!("nothing from the stream in time"),
        }
    }

    /// Moves whole chunks from `raw` to `body`; false at the last chunk.
    fn dechunk(&mut self) -> bool {
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return true;
            };
            let size = usize::from_str_radix(std::str::from_utf8(&self.raw[..eol]).unwrap(), 16)
                .expect("chunk size");
            if size == 0 {
                return false;
            }
            if self.raw.len() < eol + 2 + size + 2 {
                return true;
            }
            self.body
                .extend_from_slice(&self.raw[eol + 2..eol + 2 + size]);
            self.raw.drain(..eol + 2 + size + 2);
        }
    }

    fn split(&mut self) {
        let separator: &[u8] = if self.sse { b"\n\n" } else { b"\n" };
        while let Some(at) = self
            .body
            .windows(separator.len())
            .position(|w| w == separator)
        {
            let item: Vec<u8> = self.body.drain(..at + separator.len()).collect();
            let text = String::from_utf8(item).unwrap();
            let text = if self.sse {
                if text.starts_with(':') {
                    continue; // a keepalive comment
                }
                text.lines()
                    .filter(|l| !l.is_empty())
                    .map(|l| l.strip_prefix("data: ").expect("data lines only"))
                    .collect::<Vec<_>>()
                    .join("\n")
            } else {
                text
            };
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                self.messages.push_back(serde_json::from_str(line).unwrap());
            }
        }
    }

    /// The next message, or None when the stream ended.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(m) = self.messages.pop_front() {
                return Some(m);
            }
            let more = self.dechunk();
            self.split();
            if let Some(m) = self.messages.pop_front() {
                return Some(m);
            }
            if !more || !self.read_more().await {
                return None;
            }
        }
    }

    /// The next message that satisfies `check`.
    async fn until(&mut self, check: impl Fn(&Value) -> bool) -> Value {
        loop {
            let m = self.next().await.expect("the stream ended");
            if check(&m) {
                return m;
            }
        }
    }

    async fn session(&mut self) -> String {
        let first = self.next().await.expect("a first message");
        first["emulation"]["session"]
            .as_str()
            .unwrap_or_else(|| panic!("not a session message: {first}"))
            .to_owned()
    }
}

async fn post(addr: SocketAddr, session: &str, seq: u64, text: &str) -> (u16, String) {
    let body = json!({"session": session, "seq": seq, "text": text}).to_string();
    http(
        addr,
        "POST",
        "/connection/emulation",
        &[("Content-Type", "application/json")],
        &body,
    )
    .await
}

fn publish(id: u64, data: &str) -> String {
    json!({"id": id, "publish": {"channel": "news", "data": data}}).to_string()
}

#[tokio::test]
async fn a_session_over_http_streaming_runs_its_posted_commands_in_order() {
    let server = serve(common::config(), Arc::new(MemoryEngine::new())).await;
    let mut stream = Stream::http_stream(
        server.addr,
        "{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"news\"}}",
    )
    .await;
    assert!(
        stream.headers.contains("application/x-ndjson"),
        "{}",
        stream.headers
    );
    assert!(
        stream.headers.contains("x-accel-buffering: no"),
        "{}",
        stream.headers
    );
    assert!(
        stream.headers.contains("cache-control: no-cache"),
        "{}",
        stream.headers
    );
    let session = stream.session().await;
    assert!(session.starts_with(server.hub.node_id()), "{session}");
    let connected = stream.until(|m| m["id"] == 1).await;
    assert!(connected["connect"]["client"].is_string(), "{connected}");
    stream
        .until(|m| m["id"] == 2 && m.get("subscribe").is_some())
        .await;

    // The API reaches it like any client.
    let (status, _) = api(
        &server,
        "publish",
        json!({"channel": "news", "data": "api"}),
    )
    .await;
    assert_eq!(status, 200);
    let p = stream.until(|m| m["push"].get("pub").is_some()).await;
    assert_eq!(p["push"]["pub"]["data"], "api");

    // Its own commands, POSTed; one that comes early waits for its turn.
    assert_eq!(
        post(server.addr, &session, 2, &publish(11, "second"))
            .await
            .0,
        204
    );
    assert_eq!(
        post(server.addr, &session, 1, &publish(10, "first"))
            .await
            .0,
        204
    );
    // A retry of a batch taken already is taken again without running.
    assert_eq!(
        post(server.addr, &session, 1, &publish(10, "first"))
            .await
            .0,
        204
    );
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let m = stream.next().await.unwrap();
        if let Some(p) = m["push"].get("pub") {
            seen.push(p["data"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(seen, ["first", "second"]);

    // Bad input.
    let (status, body) = post(
        server.addr,
        &format!("{}.{}", "0".repeat(16), "0".repeat(32)),
        1,
        "",
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = post(server.addr, "not-a-session", 1, "").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(server.addr, &session, 0, "").await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = http(server.addr, "POST", "/connection/emulation", &[], "{}").await;
    assert_eq!(status, 400);
    let big = publish(12, &"x".repeat(70_000));
    let (status, body) = post(server.addr, &session, 3, &big).await;
    assert_eq!(status, 413, "{body}");
    // A flood of batches that cannot run (their turn never comes).
    let mut refused = 0;
    for seq in 100..100 + tidewire_hub::fronts::emulation::MAX_PENDING as u64 + 2 {
        if post(server.addr, &session, seq, "").await.0 == 429 {
            refused += 1;
        }
    }
    assert_eq!(refused, 2);

    // Shutdown: the stream says so and ends.
    server.hub.shutdown();
    let disconnect = stream
        .until(|m| m["push"].get("disconnect").is_some())
        .await;
    assert_eq!(
        disconnect["push"]["disconnect"]["code"], 3001,
        "{disconnect}"
    );
    let close = stream.until(|m| m.get("emulation").is_some()).await;
    assert!(close["emulation"]["close"]["code"].is_u64(), "{close}");
    assert!(stream.next().await.is_none(), "the stream ends");
}

#[tokio::test]
async fn a_post_to_another_node_reaches_the_session_over_sse() {
    let engine = Arc::new(MemoryEngine::new());
    let a = serve(common::config(), engine.clone()).await;
    let b = serve(common::config(), engine.clone()).await;
    // B knows A from its heartbeats.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while b.hub.nodes().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "B never heard of A");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stream = Stream::sse(
        a.addr,
        "{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"news\"}}",
    )
    .await;
    assert!(
        stream.headers.contains("text/event-stream"),
        "{}",
        stream.headers
    );
    let session = stream.session().await;
    stream.until(|m| m["id"] == 2).await;
    assert_eq!(post(b.addr, &session, 1, &publish(5, "via B")).await.0, 204);
    let reply = stream.until(|m| m["id"] == 5).await;
    assert!(reply.get("error").is_none(), "{reply}");
    let p = stream.until(|m| m["push"].get("pub").is_some()).await;
    assert_eq!(p["push"]["pub"]["data"], "via B");
}

#[tokio::test]
async fn a_session_whose_client_goes_away_ends() {
    let server = serve(common::config(), Arc::new(MemoryEngine::new())).await;
    let mut stream = Stream::http_stream(server.addr, "{\"id\":1,\"connect\":{}}").await;
    let session = stream.session().await;
    stream.until(|m| m["id"] == 1).await;
    assert_eq!(server.hub.counts().clients, 1);
    drop(stream);
    let deadline = tokio::time::Instant::now() + LIMIT;
    while server.hub.counts().sessions > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the session stays");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(post(server.addr, &session, 1, "").await.0, 404);
}

/// One Server-Sent Event: its id, type and data.
#[derive(Debug, Default, Clone)]
struct Event {
    id: Option<String>,
    kind: Option<String>,
    data: String,
}

/// A raw unidirectional SSE stream, event by event.
struct Events {
    stream: Stream,
    text: String,
}

impl Events {
    async fn open(addr: SocketAddr, query: &str, last_event_id: Option<&str>) -> (u16, Events) {
        let last = last_event_id
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        Events::open_with(addr, query, &last).await
    }

    /// `headers`: more header lines, each ending in CRLF.
    async fn open_with(addr: SocketAddr, query: &str, headers: &str) -> (u16, Events) {
        let request = format!(
            "GET /connection/uni_sse?{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{headers}\r\n"
        );
        let stream = Stream::open(addr, request, true).await;
        let status = stream.headers[9..12].parse().unwrap();
        (
            status,
            Events {
                stream,
                text: String::new(),
            },
        )
    }

    /// The next event (comments and `retry` skipped), None at the end.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(at) = self.text.find("\n\n") {
                let block: String = self.text.drain(..at + 2).collect();
                let mut event = Event::default();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        event.id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event.kind = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v);
                    }
                }
                if data.is_empty() {
                    continue;
                }
                event.data = data.join("\n");
                return Some(event);
            }
            let more = self.stream.dechunk();
            let body = std::mem::take(&mut self.stream.body);
            self.text.push_str(&String::from_utf8(body).unwrap());
            if self.text.contains("\n\n") {
                continue;
            }
            if !more || !self.stream.read_more().await {
                return None;
            }
        }
    }
}

impl Events {
    /// The next `message` event (publications), skipping named ones
    /// (`presence`, ...).
    async fn message(&mut self) -> Option<Event> {
        loop {
            let event = self.next().await?;
            if event.kind.is_none() {
                return Some(event);
            }
        }
    }
}

#[tokio::test]
async fn unidirectional_sse_sends_publications_and_recovers_from_last_event_id() {
    let server = serve(common::config(), Arc::new(MemoryEngine::new())).await;
    let (status, mut events) = Events::open(server.addr, "channel=feed&channel=other", None).await;
    assert_eq!(status, 200, "{}", events.stream.headers);
    assert!(events.stream.headers.contains("text/event-stream"));
    for n in 1..=3 {
        let (status, _) = api(
            &server,
            "publish",
            json!({"channel": "feed", "data": {"n": n}}),
        )
        .await;
        assert_eq!(status, 200);
    }
    let mut last_id = String::new();
    for n in 1..=3 {
        let event = events.message().await.expect("an event");
        assert_eq!(event.kind, None, "a message event");
        let data: Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(data["channel"], "feed");
        assert_eq!(data["data"]["n"], n);
        assert_eq!(data["offset"], n);
        last_id = event.id.expect("an id");
        assert!(last_id.contains(&format!("feed={n}.")), "{last_id}");
    }
    // The browser loses the stream; publications go on; it comes back
    // with the last id it saw and gets exactly what it missed.
    drop(events);
    for n in 4..=5 {
        api(
            &server,
            "publish",
            json!({"channel": "feed", "data": {"n": n}}),
        )
        .await;
    }
    api(
        &server,
        "publish",
        json!({"channel": "other", "data": {"n": 100}}),
    )
    .await;
    let (status, mut events) =
        Events::open(server.addr, "channel=feed&channel=other", Some(&last_id)).await;
    assert_eq!(status, 200);
    let mut got = Vec::new();
    while got.len() < 3 {
        let event = events.message().await.expect("an event");
        let data: Value = serde_json::from_str(&event.data).unwrap();
        got.push((
            data["channel"].as_str().unwrap().to_owned(),
            data["data"]["n"].as_u64().unwrap(),
        ));
    }
    // `other` had no position in the id (nothing seen there): it starts
    // from now, and what comes next arrives.
    assert_eq!(got[..2], [("feed".to_owned(), 4), ("feed".to_owned(), 5)]);
    api(
        &server,
        "publish",
        json!({"channel": "other", "data": {"n": 101}}),
    )
    .await;
    let mut later = Vec::new();
    while !later.contains(&101) {
        let event = events.message().await.expect("an event");
        let data: Value = serde_json::from_str(&event.data).unwrap();
        later.push(data["data"]["n"].as_u64().unwrap());
    }
    // Shutdown: a disconnect event, and the stream ends.
    server.hub.shutdown();
    let mut kinds = Vec::new();
    while let Some(event) = events.next().await {
        kinds.push(event.kind.unwrap_or_default());
    }
    assert!(kinds.contains(&"disconnect".to_owned()), "{kinds:?}");
}

#[tokio::test]
async fn unidirectional_sse_refuses_with_an_http_status() {
    let mut config = common::config();
    config.client.anonymous = false;
    config.namespaces.insert(
        "private".into(),
        tidewire_hub::config::ChannelOptions {
            subscribe: tidewire_hub::config::SubscribeRule::Token,
            ..Default::default()
        },
    );
    let server = serve(config, Arc::new(MemoryEngine::new())).await;
    let (status, events) = Events::open(server.addr, "channel=feed", None).await;
    assert_eq!(status, 401, "{}", events.stream.headers);
    let token = common::token("ann", 60, &[]);
    let (status, _) = Events::open(
        server.addr,
        &format!("channel=private:x&token={token}"),
        None,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = Events::open(server.addr, &format!("token={token}"), None).await;
    assert_eq!(status, 400);
    // A subscription token names its channel.
    let sub = common::subscription_token("ann", "private:x", 60);
    let (status, mut events) = Events::open(
        server.addr,
        &format!("token={token}&subscription_token={sub}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{}", events.stream.headers);
    api(
        &server,
        "publish",
        json!({"channel": "private:x", "data": "hi"}),
    )
    .await;
    let event = events.message().await.unwrap();
    let data: Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!(data["channel"], "private:x");
    assert_eq!(data["data"], "hi");
}

/// The lines of a long-poll answer: (first, messages).
fn poll_answer(status: u16, body: &str) -> (u64, Vec<Value>) {
    assert_eq!(status, 200, "{body}");
    let mut lines = body.lines().filter(|l| !l.is_empty());
    let head: Value = serde_json::from_str(lines.next().expect("a first line")).unwrap();
    let first = head["emulation"]["first"].as_u64().expect("first");
    (
        first,
        lines.map(|l| serde_json::from_str(l).unwrap()).collect(),
    )
}

async fn poll(addr: SocketAddr, session: &str, ack: u64, wait: u64) -> (u16, String) {
    http(
        addr,
        "GET",
        &format!("/connection/long_poll?session={session}&ack={ack}&wait={wait}"),
        &[],
        "",
    )
    .await
}

#[tokio::test]
async fn long_polling_answers_what_is_queued_resends_what_is_not_acknowledged_and_works_from_any_node(
) {
    let engine = Arc::new(MemoryEngine::new());
    let a = serve(common::config(), engine.clone()).await;
    let b = serve(common::config(), engine.clone()).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while b.hub.nodes().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "B never heard of A");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = http(
        a.addr,
        "POST",
        "/connection/long_poll?wait=2",
        &[],
        "{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"news\"}}",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let head: Value = serde_json::from_str(body.lines().next().unwrap()).unwrap();
    let session = head["emulation"]["session"].as_str().unwrap().to_owned();
    let (first, mut got) = poll_answer(status, &body);
    assert_eq!(first, 1);
    // The connect reply, perhaps the subscribe's too (else next time).
    let mut last = first + got.len() as u64 - 1;
    while !got.iter().any(|m| m["id"] == 2) {
        let (status, body) = poll(a.addr, &session, last, 2).await;
        let (first, more) = poll_answer(status, &body);
        last = first + more.len() as u64 - 1;
        got.extend(more);
    }
    assert!(got
        .iter()
        .any(|m| m["id"] == 1 && m.get("connect").is_some()));

    // A poll waits for what comes.
    let waiting = tokio::spawn({
        let session = session.clone();
        let addr = a.addr;
        async move { poll(addr, &session, last, 10).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // At most one waits per session.
    let (status, body) = poll(a.addr, &session, last, 1).await;
    assert_eq!(status, 409, "{body}");
    api(&a, "publish", json!({"channel": "news", "data": "one"})).await;
    let (status, body) = waiting.await.unwrap();
    let (first, got) = poll_answer(status, &body);
    assert_eq!(first, last + 1);
    assert_eq!(got[0]["push"]["pub"]["data"], "one");

    // That answer "was lost": the same ack again gets it again.
    let (status, body) = poll(a.addr, &session, last, 1).await;
    let (again, resent) = poll_answer(status, &body);
    assert_eq!(
        (again, resent[0]["push"]["pub"]["data"].clone()),
        (first, json!("one"))
    );
    let acked = first + resent.len() as u64 - 1;

    // Commands POSTed to B; polled on B: relayed to A both ways.
    let text = publish(9, "two");
    assert_eq!(post(b.addr, &session, 1, &text).await.0, 204);
    let mut seen = Vec::new();
    let mut ack = acked;
    while !seen
        .iter()
        .any(|m: &Value| m["push"]["pub"]["data"] == "two")
    {
        let (status, body) = poll(b.addr, &session, ack, 3).await;
        let (first, more) = poll_answer(status, &body);
        if !more.is_empty() {
            ack = first + more.len() as u64 - 1;
        }
        seen.extend(more);
    }
    assert!(
        seen.iter().any(|m| m["id"] == 9),
        "the publish reply: {seen:?}"
    );

    // Bad input.
    let (status, _) = poll(
        a.addr,
        &format!("{}.{}", "0".repeat(16), "0".repeat(32)),
        0,
        1,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = poll(a.addr, "nonsense", 0, 1).await;
    assert_eq!(status, 400);
    let (status, _) = http(a.addr, "GET", "/connection/long_poll", &[], "").await;
    assert_eq!(status, 400);

    // Shutdown: the next poll says so.
    a.hub.shutdown();
    let mut closed = false;
    for _ in 0..5 {
        let (status, body) = poll(a.addr, &session, ack, 1).await;
        if status != 200 {
            break;
        }
        let (first, more) = poll_answer(status, &body);
        if more.iter().any(|m| m["emulation"]["close"].is_object()) {
            closed = true;
            break;
        }
        if !more.is_empty() {
            ack = first + more.len() as u64 - 1;
        }
    }
    assert!(closed, "the session's end reached the client");
}

#[tokio::test]
async fn a_stream_that_is_never_read_is_closed_by_the_slow_consumer_policy() {
    let mut config = common::config();
    config.client.queue_messages = 50;
    config.client.queue_bytes = 256 * 1024;
    let server = serve(config, Arc::new(MemoryEngine::new())).await;
    // Connected and subscribed, then never read again.
    let mut stream = Stream::http_stream(
        server.addr,
        "{\"id\":1,\"connect\":{}}\n{\"id\":2,\"subscribe\":{\"channel\":\"flood\"}}",
    )
    .await;
    stream.until(|m| m["id"] == 2).await;
    assert_eq!(server.hub.counts().sessions, 1);
    let big = format!("\"{}\"", "x".repeat(16 * 1024));
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut published = 0;
    // More than the socket buffers and the queue hold: the queue fills
    // and the policy (close) ends the session; memory stays bounded.
    while server.hub.counts().sessions > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session never ended"
        );
        for _ in 0..50 {
            let data = serde_json::value::RawValue::from_string(big.clone()).unwrap();
            server
                .hub
                .publish("flood", tidewire_hub::protocol::Payload::from_json(data))
                .await
                .unwrap();
            published += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(published <= 5_000, "{published}");
    let metrics = server.hub.metrics_text();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tidewire_hub_slow_consumers_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    drop(stream);
}

/// The `connect` reply (command id 1) of a stream opened with `headers`.
async fn stream_connect_reply(addr: SocketAddr, sse: bool, headers: &str) -> Value {
    let commands = "{\"id\":1,\"connect\":{}}";
    let mut stream = if sse {
        Stream::sse_with(addr, commands, headers).await
    } else {
        Stream::http_stream_with(addr, commands, headers).await
    };
    stream.session().await;
    stream.until(|m| m["id"] == 1).await
}

/// The `connect` reply of a long-polling session opened with `headers`.
async fn long_poll_connect_reply(addr: SocketAddr, headers: &[(&str, &str)]) -> Value {
    let (status, body) = http(
        addr,
        "POST",
        "/connection/long_poll?wait=1",
        headers,
        "{\"id\":1,\"connect\":{}}",
    )
    .await;
    let (_, messages) = poll_answer(status, &body);
    messages
        .into_iter()
        .find(|m| m["id"] == 1)
        .expect("the connect reply")
}

#[tokio::test]
async fn a_connection_token_in_a_cookie_connects_over_every_transport() {
    let mut config = common::config();
    config.client.anonymous = false;
    config.client.token_cookie = Some("tw_token".into());
    let server = serve(config, Arc::new(MemoryEngine::new())).await;
    let cookie = format!("theme=dark; tw_token={}", common::token("ann", 60, &[]));
    let cookie_line = format!("Cookie: {cookie}\r\n");

    let mut ws = common::Client::open_with_headers(&server, &[("Cookie", &cookie)]).await;
    assert_eq!(ws.ok("connect", json!({})).await["user"], "ann");
    // A token in the command wins over the cookie's.
    let mut ws = common::Client::open_with_headers(&server, &[("Cookie", &cookie)]).await;
    let bob = common::token("bob", 60, &[]);
    assert_eq!(
        ws.ok("connect", json!({ "token": bob })).await["user"],
        "bob"
    );
    // No cookie, no token: refused.
    let mut ws = common::Client::open(&server).await;
    assert_eq!(ws.error_code("connect", json!({})).await, 105);

    for sse in [false, true] {
        let reply = stream_connect_reply(server.addr, sse, &cookie_line).await;
        assert_eq!(reply["connect"]["user"], "ann", "sse {sse}: {reply}");
        let reply = stream_connect_reply(server.addr, sse, "").await;
        assert_eq!(reply["error"]["code"], 105, "sse {sse}: {reply}");
    }
    let reply = long_poll_connect_reply(server.addr, &[("Cookie", &cookie)]).await;
    assert_eq!(reply["connect"]["user"], "ann", "{reply}");
    let reply = long_poll_connect_reply(server.addr, &[]).await;
    assert_eq!(reply["error"]["code"], 105, "{reply}");

    let (status, _) = Events::open_with(server.addr, "channel=feed", &cookie_line).await;
    assert_eq!(status, 200);
    let (status, _) = Events::open_with(server.addr, "channel=feed", "").await;
    assert_eq!(status, 401);

    // Without `client.token_cookie`, cookies are not read.
    let mut config = common::config();
    config.client.anonymous = false;
    let server = serve(config, Arc::new(MemoryEngine::new())).await;
    let mut ws = common::Client::open_with_headers(&server, &[("Cookie", &cookie)]).await;
    assert_eq!(ws.error_code("connect", json!({})).await, 105);
    let reply = stream_connect_reply(server.addr, false, &cookie_line).await;
    assert_eq!(reply["error"]["code"], 105, "{reply}");
}

#[tokio::test]
async fn the_connect_callback_is_given_the_headers_of_the_opening_request() {
    let calls = Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let backend = {
        let calls = calls.clone();
        axum::Router::new().route(
            "/connect",
            axum::routing::post(move |axum::Json(call): axum::Json<Value>| {
                let calls = calls.clone();
                async move {
                    calls.lock().unwrap().push(call.clone());
                    let cookie = call["headers"]["cookie"].as_str().unwrap_or("");
                    if cookie.split("; ").any(|c| c == "session=s-ann") {
                        axum::Json(json!({"result": {"user": "ann"}}))
                    } else {
                        axum::Json(json!({"error": {"message": "sign in first"}}))
                    }
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, backend).await });
    let mut config = common::config();
    config.client.anonymous = false;
    config.proxy.connect_url = Some(format!("http://{backend_addr}/connect"));
    let server = serve(config, Arc::new(MemoryEngine::new())).await;

    let headers = [
        ("Cookie", "session=s-ann"),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Private", "not for the backend"),
    ];
    let lines: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let mut ws = common::Client::open_with_headers(&server, &headers).await;
    assert_eq!(ws.ok("connect", json!({})).await["user"], "ann");
    for sse in [false, true] {
        let reply = stream_connect_reply(server.addr, sse, &lines).await;
        assert_eq!(reply["connect"]["user"], "ann", "sse {sse}: {reply}");
    }
    let reply = long_poll_connect_reply(server.addr, &headers).await;
    assert_eq!(reply["connect"]["user"], "ann", "{reply}");
    let (status, _) = Events::open_with(server.addr, "channel=feed", &lines).await;
    assert_eq!(status, 200);
    // Without the cookie the backend refuses: 107.
    let mut ws = common::Client::open(&server).await;
    assert_eq!(ws.error_code("connect", json!({})).await, 107);

    let calls = calls.lock().unwrap().clone();
    let transports: Vec<&str> = calls
        .iter()
        .map(|c| c["transport"].as_str().unwrap())
        .collect();
    assert_eq!(
        transports,
        [
            "websocket",
            "http_stream",
            "sse",
            "long_poll",
            "uni_sse",
            "websocket"
        ]
    );
    for call in &calls[..5] {
        assert_eq!(
            call["headers"],
            json!({"cookie": "session=s-ann", "x-forwarded-for": "203.0.113.7"}),
            "only the headers of proxy.http_headers: {call}"
        );
    }
    assert!(calls[5].get("headers").is_none(), "{}", calls[5]);
}

#[tokio::test]
async fn cors_lets_the_allowed_origins_use_the_fallbacks_with_their_cookies() {
    let mut config = common::config();
    config.server.allowed_origins = vec!["http://app.example".into()];
    let server = serve(config, Arc::new(MemoryEngine::new())).await;
    async fn preflight(addr: SocketAddr, origin: &str) -> (u16, String, String) {
        common::http_response(
            addr,
            "OPTIONS",
            "/connection/emulation",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "content-type"),
            ],
            "",
        )
        .await
    }
    let (status, head, _) = preflight(server.addr, "http://app.example").await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("access-control-allow-origin: http://app.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-credentials: true"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-headers: content-type"),
        "{head}"
    );
    let methods = head
        .lines()
        .find_map(|l| l.strip_prefix("access-control-allow-methods: "))
        .unwrap_or_else(|| panic!("no allowed methods: {head}"));
    assert!(
        methods.contains("POST") || methods.contains("post"),
        "{head}"
    );
    let (_, head, _) = preflight(server.addr, "http://evil.example").await;
    assert!(!head.contains("access-control-allow-origin"), "{head}");

    let commands = "{\"id\":1,\"connect\":{}}";
    let (status, head, body) = common::http_response(
        server.addr,
        "POST",
        "/connection/long_poll?wait=1",
        &[("Origin", "http://app.example")],
        commands,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        head.contains("access-control-allow-origin: http://app.example"),
        "{head}"
    );
    let (status, head, body) = common::http_response(
        server.addr,
        "POST",
        "/connection/long_poll?wait=1",
        &[("Origin", "http://evil.example")],
        commands,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("origin http://evil.example is not allowed"),
        "{body}"
    );
    assert!(!head.contains("access-control-allow-origin"), "{head}");

    // With no allowed origins, any page may use them, but not with its
    // cookies (`*` never goes with credentials).
    let server = serve(common::config(), Arc::new(MemoryEngine::new())).await;
    let (status, head, _) = common::http_response(
        server.addr,
        "POST",
        "/connection/long_poll?wait=1",
        &[("Origin", "http://any.example")],
        commands,
    )
    .await;
    assert_eq!(status, 200);
    assert!(head.contains("access-control-allow-origin: *"), "{head}");
    assert!(!head.contains("access-control-allow-credentials"), "{head}");
}
