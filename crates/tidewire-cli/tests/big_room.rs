//! A big room on the embedded defaults: thousands of clients join
//! `chat:lobby` (the demo's room, with presence and join/leave) at once,
//! then all reconnect at once to a restarted hub on the same port. Every
//! client reads all it gets as fast as it can, so none may be closed as a
//! slow consumer, and presence must list exactly the clients in the room.
//! Also: `serve` and `echo` raise their open-file limit to the hard limit,
//! which such a room needs.
//!
//! Run with `--nocapture --test-threads 1` to see the times and the hub's
//! memory (docs/benchmarks.md).

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{start_serve, Served, LIMIT};
use serde_json::{json, Value};
use tidewire::{ClientBuilder, Message};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

const API_KEY: &str = "big-room-test-key";
const ROOM: &str = "chat:lobby";
/// Connection attempts (TCP connect and WebSocket handshake) in flight at
/// once: enough that the whole room joins within a few seconds.
const CONNECTS_IN_FLIGHT: usize = 256;
/// Everyone subscribed within this, or the test fails.
const JOIN_LIMIT: Duration = Duration::from_secs(60);
/// After everyone is subscribed: no push for this long is "quiet".
const QUIET: Duration = Duration::from_millis(750);
/// The quiet period ends within this, or the test fails (a push storm).
const QUIET_LIMIT: Duration = Duration::from_secs(30);

/// One client in the room, as its task saw it.
#[derive(Default)]
struct Member {
    /// The client id from the connect reply.
    client: OnceLock<String>,
    subscribed: AtomicBool,
    /// Messages without id (pushes) received.
    pushes: AtomicU64,
    /// `presence_diff` pushes of the room among them.
    presence_diffs: AtomicU64,
    /// The `disconnect` push, if one came.
    disconnect: Mutex<Option<Value>>,
    /// How the connection ended (close frame, error), if it did.
    ended: Mutex<Option<String>>,
    /// The close code received, if the connection ended with one.
    close_code: Mutex<Option<u16>>,
}

impl Member {
    fn end(&self, how: String) {
        self.ended.lock().unwrap().get_or_insert(how);
    }

    fn ended(&self) -> Option<String> {
        self.ended.lock().unwrap().clone()
    }

    /// Takes one line of a text message from the hub.
    fn take(&self, line: &str) {
        if line.starts_with("{\"push\"") {
            self.pushes.fetch_add(1, Ordering::Relaxed);
            if line.contains("\"presence_diff\"") {
                self.presence_diffs.fetch_add(1, Ordering::Relaxed);
            }
            // Cheap test first: pushes of the room are the bulk.
            if line.contains("\"disconnect\"") {
                let push: Value = serde_json::from_str(line).unwrap_or(Value::Null);
                if push["push"].get("disconnect").is_some() {
                    self.disconnect.lock().unwrap().get_or_insert(push);
                }
            }
            return;
        }
        let reply: Value = match serde_json::from_str(line) {
            Ok(reply) => reply,
            Err(e) => return self.end(format!("not JSON ({e}): {line}")),
        };
        match reply["id"].as_u64() {
            Some(1) => match reply["connect"]["client"].as_str() {
                Some(client) => {
                    let _ = self.client.set(client.to_owned());
                }
                None => self.end(format!("connect failed: {line}")),
            },
            Some(2) if reply.get("subscribe").is_some() => {
                self.subscribed.store(true, Ordering::Release);
            }
            _ => self.end(format!("unexpected reply: {line}")),
        }
    }
}

/// One session of a member: connect, send `connect`, and when `join`
/// says so, `subscribe`; reading everything all along, until the
/// connection ends.
async fn member_session(
    url: Arc<str>,
    member: Arc<Member>,
    connects: Arc<Semaphore>,
    mut join: watch::Receiver<bool>,
) {
    let permit = connects.acquire_owned().await.unwrap();
    let connected = ClientBuilder::new(&*url)
        .protocol("tidewire.v1.json")
        .timeout(JOIN_LIMIT)
        .connect()
        .await;
    drop(permit);
    let mut ws = match connected {
        Ok((ws, _)) => ws,
        Err(e) => return member.end(format!("connecting: {e}")),
    };
    if let Err(e) = ws.send_text("{\"id\":1,\"connect\":{}}").await {
        return member.end(format!("sending connect: {e}"));
    }
    let mut subscribe_sent = false;
    loop {
        let received = tokio::select! {
            received = ws.recv() => received,
            true = async { join.wait_for(|go| *go).await.is_ok() }, if !subscribe_sent => {
                subscribe_sent = true;
                let subscribe = format!("{{\"id\":2,\"subscribe\":{{\"channel\":\"{ROOM}\"}}}}");
                if let Err(e) = ws.send_text(subscribe).await {
                    return member.end(format!("sending subscribe: {e}"));
                }
                continue;
            }
        };
        match received {
            Some(Ok(Message::Text(text))) => {
                for line in text.as_str().lines().filter(|l| !l.is_empty()) {
                    member.take(line);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                if let Some(frame) = &frame {
                    *member.close_code.lock().unwrap() = Some(frame.code.0);
                }
                return member.end(format!("close {frame:?}"));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return member.end(format!("error: {e}")),
            None => return member.end("ended without a close frame".into()),
        }
    }
}

/// `n` members that connect, then join the room all at once; their tasks
/// run until the connections end (or the set is dropped).
struct Room {
    members: Vec<Arc<Member>>,
    tasks: JoinSet<()>,
    join: watch::Sender<bool>,
}

impl Room {
    fn connect(addr: &str, n: usize) -> Room {
        let url: Arc<str> = format!("ws://{addr}/connection/websocket").into();
        let connects = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
        let (join, joining) = watch::channel(false);
        let members: Vec<Arc<Member>> = (0..n).map(|_| Arc::default()).collect();
        let mut tasks = JoinSet::new();
        for member in &members {
            tasks.spawn(member_session(
                url.clone(),
                member.clone(),
                connects.clone(),
                joining.clone(),
            ));
        }
        Room {
            members,
            tasks,
            join,
        }
    }

    /// Waits until every member has its connect reply; fails as soon as
    /// one ends.
    async fn all_connected(&self, served: &Served) {
        self.wait_for_all(served, "connected", |m| m.client.get().is_some())
            .await;
    }

    /// Every member subscribes now; waits until all are subscribed.
    async fn all_join(&self, served: &Served) {
        self.join.send_replace(true);
        self.wait_for_all(served, "subscribed", |m| {
            m.subscribed.load(Ordering::Acquire)
        })
        .await;
    }

    fn pushes(&self) -> u64 {
        self.members
            .iter()
            .map(|m| m.pushes.load(Ordering::Relaxed))
            .sum()
    }

    fn ended_count(&self) -> usize {
        self.members.iter().filter(|m| m.ended().is_some()).count()
    }

    /// Problems so far: members whose connection ended, or that got a
    /// disconnect push (at most a few shown, with the count).
    fn problems(&self) -> Option<String> {
        let ended: Vec<String> = self.members.iter().filter_map(|m| m.ended()).collect();
        let disconnected = self
            .members
            .iter()
            .filter(|m| m.disconnect.lock().unwrap().is_some())
            .count();
        if ended.is_empty() && disconnected == 0 {
            return None;
        }
        let closed_1013 = self
            .members
            .iter()
            .filter(|m| *m.close_code.lock().unwrap() == Some(1013))
            .count();
        Some(format!(
            "{} of {} ended ({closed_1013} with close 1013), {disconnected} got a disconnect push; \
             first: {:?}",
            ended.len(),
            self.members.len(),
            &ended[..ended.len().min(3)]
        ))
    }

    async fn wait_for_all(&self, served: &Served, what: &str, done: impl Fn(&Member) -> bool) {
        let deadline = Instant::now() + JOIN_LIMIT;
        loop {
            if self.problems().is_some() {
                // The whole damage, not the first casualty: wait until no
                // more connections end for a second (15 s at most; a
                // closed client reads its full queue before the close).
                let settle = Instant::now() + Duration::from_secs(15);
                let (mut ended, mut since) = (self.ended_count(), Instant::now());
                while since.elapsed() < Duration::from_secs(1) && Instant::now() < settle {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let now = self.ended_count();
                    if now != ended {
                        (ended, since) = (now, Instant::now());
                    }
                }
                let problems = self.problems().unwrap_or_default();
                fail(served, &format!("until all {what}: {problems}")).await;
            }
            let count = self.members.iter().filter(|m| done(m)).count();
            if count == self.members.len() {
                return;
            }
            if Instant::now() > deadline {
                fail(
                    served,
                    &format!(
                        "{count} of {} {what} within {JOIN_LIMIT:?}",
                        self.members.len()
                    ),
                )
                .await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until no push arrived for [`QUIET`]; the pushes so far.
    async fn quiet(&self, served: &Served) -> u64 {
        let deadline = Instant::now() + QUIET_LIMIT;
        let mut pushes = self.pushes();
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.pushes();
            if now != pushes {
                (pushes, since) = (now, Instant::now());
            } else if since.elapsed() >= QUIET {
                return pushes;
            }
            if Instant::now() > deadline {
                fail(
                    served,
                    &format!("pushes still coming after {QUIET_LIMIT:?}: {pushes}"),
                )
                .await;
            }
        }
    }

    fn clients(&self) -> BTreeSet<String> {
        self.members
            .iter()
            .map(|m| m.client.get().expect("subscribed after connect").clone())
            .collect()
    }
}

/// Panics with `message`, the hub's memory and the end of its log.
async fn fail(served: &Served, message: &str) -> ! {
    // The hub may be gone: a failed look-up must not hide the message.
    let addr = served.addr.clone();
    let metrics =
        tokio::spawn(async move { metric(&addr, "tidewire_hub_slow_consumers_total").await })
            .await
            .ok()
            .flatten();
    let log = std::fs::read_to_string(&served.log).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(10).collect();
    panic!(
        "{message}\nhub: {}, tidewire_hub_slow_consumers_total {metrics:?}\nlog (last lines, newest first):\n{}",
        memory(served),
        tail.join("\n")
    );
}

/// The hub's VmRSS and VmHWM (peak), as `/proc/PID/status` says.
fn memory(served: &Served) -> String {
    let Some(pid) = served.child.id() else {
        return "exited".into();
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    format!("VmRSS {}, VmHWM {}", field("VmRSS:"), field("VmHWM:"))
}

/// One HTTP/1.1 exchange with `Connection: close`: the status and body.
async fn http(addr: &str, request: String) -> (u16, String) {
    tokio::time::timeout(LIMIT, async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        tcp.read_to_end(&mut response).await.unwrap();
        let response = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        (head[9..12].parse().unwrap(), body.to_owned())
    })
    .await
    .expect("the hub answers HTTP in time")
}

async fn api(served: &Served, method: &str, body: Value) -> Value {
    let body = body.to_string();
    let (status, answer) = http(
        &served.addr,
        format!(
            "POST /api/{method} HTTP/1.1\r\nHost: {}\r\nAuthorization: apikey {API_KEY}\r\n\
             Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
            served.addr,
            body.len()
        ),
    )
    .await;
    assert_eq!(status, 200, "{method}: {answer}");
    serde_json::from_str(&answer).unwrap()
}

/// The value of an unlabelled metric on `/metrics`.
async fn metric(addr: &str, name: &str) -> Option<f64> {
    let (status, text) = http(
        addr,
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    text.lines().find_map(|line| {
        let (metric, value) = line.split_once(' ')?;
        (metric == name).then(|| value.trim().parse().ok())?
    })
}

/// Everyone is still there, nobody was closed or told to go, and the hub
/// agrees: no slow consumer, presence lists exactly the room's clients.
async fn check_room(room: &Room, served: &Served) {
    if let Some(problems) = room.problems() {
        fail(served, &problems).await;
    }
    assert_eq!(
        metric(&served.addr, "tidewire_hub_slow_consumers_total").await,
        Some(0.0),
        "slow consumers"
    );
    // Joins are gathered, not dropped: each member heard of its own.
    let unaware = room
        .members
        .iter()
        .filter(|m| m.presence_diffs.load(Ordering::Relaxed) == 0)
        .count();
    assert_eq!(unaware, 0, "members that got no presence_diff push");
    let expected = room.clients();
    assert_eq!(expected.len(), room.members.len(), "client ids are unique");
    let presence = api(served, "presence", json!({ "channel": ROOM })).await;
    let listed: Vec<&str> = presence["clients"]
        .as_array()
        .unwrap_or_else(|| panic!("presence: {presence}"))
        .iter()
        .map(|c| c["client"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), expected.len(), "clients in presence");
    let listed: BTreeSet<String> = listed.into_iter().map(String::from).collect();
    assert!(listed == expected, "presence lists other clients");
    let stats = api(served, "presence_stats", json!({ "channel": ROOM })).await;
    assert_eq!(stats["clients"], expected.len(), "presence_stats: {stats}");
}

/// A fresh empty folder: no tidewire.toml, the embedded defaults.
fn empty_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tidewire-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn sigterm(served: &Served) {
    let pid = served.child.id().unwrap().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap()
        .success());
}

/// `n` clients connect, then all subscribe at once: the room's burst of
/// joins does not depend on how fast the hub takes connections (a debug
/// build takes them ten times slower than a release build). The times
/// both steps took.
async fn connect_and_join(served: &Served, n: usize) -> (Room, Duration, Duration) {
    let started = Instant::now();
    let room = Room::connect(&served.addr, n);
    room.all_connected(served).await;
    let connected = started.elapsed();
    let started = Instant::now();
    room.all_join(served).await;
    (room, connected, started.elapsed())
}

/// `n` clients join the room at once; the hub restarts on the same port
/// and they all reconnect at once.
async fn big_room(n: usize) {
    // Each client is a file here, and each connection one in the hub.
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap();
    assert!(limit as usize > n + 100, "open-file limit {limit}");
    let dir = empty_dir(&format!("big-room-{n}"));
    let env = [("TIDEWIRE_API_KEY", API_KEY)];
    let served = start_serve(&dir, &["--listen", "127.0.0.1:0"], &env, "first.log").await;
    let addr = served.addr.clone();

    let (room, connected, joined) = connect_and_join(&served, n).await;
    let pushes = room.quiet(&served).await;
    check_room(&room, &served).await;
    println!(
        "{n} clients connected in {connected:.2?}, joined {ROOM} at once in {joined:.2?} \
         ({pushes} pushes in all); hub: {}",
        memory(&served)
    );

    // A restart: the hub says goodbye to everyone (disconnect 3001, close
    // 1001), a new one takes the port, and everyone comes back at once.
    let stopping = Instant::now();
    sigterm(&served).await;
    let mut served = served;
    let exit = tokio::time::timeout(LIMIT, served.child.wait())
        .await
        .expect("the hub stops in time")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let stopped = stopping.elapsed();
    let mut room = room;
    tokio::time::timeout(LIMIT, async {
        while room.tasks.join_next().await.is_some() {}
    })
    .await
    .expect("every connection ends with the hub");
    for member in &room.members {
        let disconnect = member.disconnect.lock().unwrap().clone();
        assert_eq!(
            disconnect
                .as_ref()
                .map(|d| d["push"]["disconnect"]["code"].clone()),
            Some(json!(3001)),
            "{:?}",
            member.ended()
        );
        assert_eq!(
            *member.close_code.lock().unwrap(),
            Some(1001),
            "{:?}",
            member.ended()
        );
    }
    drop(room);

    let served = start_serve(&dir, &["--listen", &addr], &env, "second.log").await;
    assert_eq!(served.addr, addr);
    let (room, reconnected, rejoined) = connect_and_join(&served, n).await;
    let pushes = room.quiet(&served).await;
    check_room(&room, &served).await;
    println!(
        "{n} clients stopped with the hub in {stopped:.2?}, reconnected to the new hub in \
         {reconnected:.2?}, joined again at once in {rejoined:.2?} ({pushes} pushes in all); \
         new hub: {}",
        memory(&served)
    );
    drop(room);
    drop(served);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_clients_join_and_reconnect_at_once() {
    tokio::time::timeout(Duration::from_secs(240), big_room(2_000))
        .await
        .expect("the test finishes in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_clients_join_and_reconnect_at_once() {
    tokio::time::timeout(Duration::from_secs(240), big_room(10_000))
        .await
        .expect("the test finishes in time");
}

/// The soft and hard open-file limits of a running process.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut values = line["Max open files".len()..].split_whitespace();
    (
        values.next().unwrap().to_owned(),
        values.next().unwrap().to_owned(),
    )
}

/// Started with a low soft limit (as a shell usually gives), `serve` and
/// `echo` raise it to the hard limit before they listen.
#[tokio::test]
async fn serve_and_echo_raise_their_open_file_limit() {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    let low = (hard / 2).min(1024);
    assert!(low < hard);
    let dir = empty_dir("open-files");
    for (command, ready) in [
        ("serve --listen 127.0.0.1:0", "tidewire serve listening on"),
        ("echo --port 0", "tidewire echo listening on"),
    ] {
        // `exec`: the shell becomes tidewire, with the lowered soft limit.
        let script = format!("ulimit -Sn {low} && exec \"$0\" {command}");
        let mut child = Command::new("sh")
            .args(["-c", &script, env!("CARGO_BIN_EXE_tidewire")])
            .current_dir(&dir)
            .env("RUST_LOG", "warn")
            .env_remove("TIDEWIRE_API_KEY")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::time::timeout(LIMIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.starts_with(ready) {
                    return;
                }
            }
            panic!("{command}: exited before listening");
        })
        .await
        .expect("started in time");
        let (soft, hard_seen) = open_file_limits(child.id().unwrap());
        assert_eq!(hard_seen, hard.to_string(), "{command}");
        assert_eq!(soft, hard_seen, "{command}: the soft limit stayed {soft}");
        child.kill().await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
