//! `tidewire bench --fanout`: S subscribers on one channel, publications at
//! rate R, deliveries per second and delivery latency.
//!
//! Every subscriber speaks the server's protocol on the raw wire (as the
//! echo hot path in `wire.rs` does): frames are parsed in place out of a
//! read buffer shared by the connections of a thread, so an idle
//! subscriber holds no buffer, and a read of many pushes costs one pass.
//!
//! Each publication carries its number and its send time (microseconds
//! since the run's clock started, same process, same clock) as
//! `~SEQ~MICROS~` at the start of its data, padded to `--size` bytes; a
//! subscriber's latency sample is its receive time minus that. Protocols:
//!
//! - `tidewire`: the hub's JSON protocol. Subscribers send `connect` and
//!   `subscribe` (one batched message) and are ready at the subscribe
//!   reply. Publications go through a client connection (`publish`
//!   commands without an id: no reply) or the HTTP API (`/api/publish`,
//!   one keep-alive connection). The data is a JSON string of `--size`
//!   bytes, quotes included.
//! - `ws-broadcast`: a plain WebSocket server that sends every text message
//!   a client sends to every other client (`bench/node/fanout_ws.js`); the
//!   message is the `--size` bytes.
//! - `socketio`: Socket.IO 4 over Engine.IO 4 on a WebSocket
//!   (`bench/node/fanout_socketio.js`): open packet `0{…}`, connect `40`,
//!   join with the event `42["join","CH"]` (the server answers
//!   `42["joined"]`); the publisher sends `42["pub","CH","…"]` events,
//!   which the server emits to the room as `42["pub","…"]`; pings `2` get
//!   `3`.
//!
//! `--rate 0` publishes nothing: the subscribers are held for the duration
//! and, with `--server-pid`, the report gives the server's memory per idle
//! subscribed connection (read at the deadline, before any closes).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::ValueEnum;
use serde::Serialize;
use tidewire::proto::frame::{FrameHeader, OpCode};
use tidewire::proto::handshake::Target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Semaphore;

use super::wire::masked_frame;
use super::{
    connect_transport, cpu_seconds, cpu_seconds_of, human, new_histogram, open_raw, progress_bar,
    rss_kib, wait_until_standing, BenchArgs, Latency, Stream,
};

/// The server's protocol, for `--fanout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// The hub's JSON protocol (`tidewire serve`).
    Tidewire,
    /// Plain WebSocket: each message from one client goes to all others.
    WsBroadcast,
    /// Socket.IO 4 (Engine.IO 4 over WebSocket), room emit.
    Socketio,
}

/// How `--fanout --protocol tidewire` subscribers reach the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// WebSocket (`/connection/websocket`).
    Websocket,
    /// HTTP streaming, newline-delimited JSON (`POST /connection/http_stream`).
    HttpStream,
    /// Server-Sent Events (`GET /connection/sse`).
    Sse,
    /// Long-polling (`POST`, then `GET /connection/long_poll` again and
    /// again on one keep-alive connection).
    LongPoll,
}

/// How publications reach the server, for `--fanout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PublishVia {
    /// A publishing WebSocket client (not subscribed itself).
    Ws,
    /// The hub's HTTP API (`--api-url`, `--api-key`).
    Api,
}

#[derive(Serialize, Debug)]
struct Report {
    url: String,
    mode: &'static str,
    protocol: Protocol,
    transport: Transport,
    publish_via: PublishVia,
    channel: String,
    connections: usize,
    connected: usize,
    size: usize,
    rate: f64,
    seconds: f64,
    publications: u64,
    publications_per_sec: f64,
    /// Publications × subscribers.
    expected: u64,
    deliveries: u64,
    lost: u64,
    /// Deliveries out of order or repeated.
    out_of_order: u64,
    /// HTTP requests the subscribers made after their first (the polls
    /// of --transport long-poll; 0 for the streams).
    polls: u64,
    /// Server CPU time per delivery, in microseconds (with --server-pid).
    server_cpu_us_per_delivery: Option<f64>,
    /// Deliveries over the time from the first publication to the last
    /// delivery.
    deliveries_per_sec: f64,
    /// Seconds from the first publication to the last delivery.
    delivery_seconds: f64,
    latency: Latency,
    errors: BTreeMap<String, u64>,
    server_rss_kib_before: Option<u64>,
    server_rss_kib_after: Option<u64>,
    server_kib_per_connection: Option<f64>,
    generator_cpu_seconds: f64,
    server_cpu_seconds: Option<f64>,
    /// CPU time of the whole machine over the publishing time that was
    /// neither the generator's nor the server's (other processes; some
    /// kernel work for the sockets too), in seconds; with --server-pid.
    others_cpu_seconds: Option<f64>,
}

/// Busy time of all CPUs (everything but idle and iowait), in seconds.
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = v.iter().take(8).sum::<f64>() - v.get(3)? - v.get(4)?;
    Some(busy / 100.0)
}

/// Shared by the subscribers of a run.
struct Shared {
    /// The run's clock: timestamps in payloads are microseconds since this.
    epoch: Instant,
    ready: AtomicU64,
    delivered: AtomicU64,
    /// Latest receive time of any delivery, microseconds since `epoch`.
    last_delivery_us: AtomicU64,
    histogram: Mutex<hdrhistogram::Histogram<u64>>,
}

thread_local! {
    /// Read buffer shared by the connections of a thread.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 256 * 1024]);
    /// Latency samples of one poll, merged into the histogram at its end.
    static SAMPLES: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

fn micros_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

/// The payload of publication `seq`: `~SEQ~MICROS~` then `x` up to `len`.
fn payload(seq: u64, micros: u64, len: usize) -> String {
    let mut s = format!("~{seq}~{micros}~");
    if s.len() < len {
        s.extend(std::iter::repeat_n('x', len - s.len()));
    }
    s
}

/// Finds `~SEQ~MICROS~` in a message.
/// `text` for a query string (everything but unreserved characters
/// percent-encoded).
fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn stamp(message: &[u8]) -> Option<(u64, u64)> {
    let at = message.iter().position(|&b| b == b'~')?;
    let mut numbers = [0u64; 2];
    let mut i = at + 1;
    for n in &mut numbers {
        let start = i;
        while let Some(d) = message.get(i).filter(|b| b.is_ascii_digit()) {
            *n = *n * 10 + u64::from(d - b'0');
            i += 1;
        }
        if i == start || message.get(i) != Some(&b'~') {
            return None;
        }
        i += 1;
    }
    Some((numbers[0], numbers[1]))
}

/// Where a subscriber stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Socket.IO: waiting for the open packet.
    Open,
    /// Socket.IO: waiting for the namespace connect `40`.
    Connect,
    /// Waiting for the subscribe reply (or `joined`).
    Joining,
    Ready,
}

/// One subscriber's frame parser and counters.
struct Subscriber {
    protocol: Protocol,
    channel: String,
    phase: Phase,
    /// A partial frame carried over to the next read.
    pending: Vec<u8>,
    /// A fragmented message being assembled.
    fragments: Vec<u8>,
    fragmented: bool,
    /// Frames to write (pongs, handshake steps).
    out: Vec<u8>,
    received: u64,
    out_of_order: u64,
    next_seq: u64,
    closed: Option<String>,
    /// The hub's HTTP fallbacks instead of WebSocket frames.
    http: Option<HttpFraming>,
}

/// Reading a streamed HTTP response (chunked), message by message; or,
/// for long-polling, one whole response after another.
struct HttpFraming {
    transport: Transport,
    /// The response head was read.
    head: bool,
    /// Decoded body bytes not yet split into messages.
    body: Vec<u8>,
    /// Long-polling: the host to name, the session, the number of the
    /// last message had, and the polls made.
    host: String,
    session: Option<String>,
    ack: u64,
    polls: u64,
}

/// How long a bench poll waits on the server, in seconds.
const POLL_WAIT_SECS: u64 = 25;

impl Subscriber {
    fn new(protocol: Protocol, channel: &str) -> Subscriber {
        let phase = match protocol {
            Protocol::Tidewire => Phase::Joining,
            Protocol::WsBroadcast => Phase::Ready,
            Protocol::Socketio => Phase::Open,
        };
        let mut s = Subscriber {
            protocol,
            channel: channel.to_owned(),
            phase,
            pending: Vec::new(),
            fragments: Vec::new(),
            fragmented: false,
            out: Vec::new(),
            received: 0,
            out_of_order: 0,
            next_seq: 0,
            closed: None,
            http: None,
        };
        if protocol == Protocol::Tidewire {
            let join = format!(
                "{{\"id\":1,\"connect\":{{}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":{}}}}}",
                serde_json::to_string(channel).expect("a string")
            );
            masked_frame(OpCode::Text, join.as_bytes(), &mut s.out);
        }
        s
    }

    /// Parses what was read; deliveries are timed against `now_us`.
    /// Over an HTTP fallback: no WebSocket frames to write.
    fn over_http(mut self, transport: Transport, host: &str) -> Subscriber {
        self.out.clear();
        self.http = Some(HttpFraming {
            transport,
            head: false,
            body: Vec::new(),
            host: host.to_owned(),
            session: None,
            ack: 0,
            polls: 0,
        });
        self
    }

    /// Long-polling: the whole responses in `pending`, each answered by
    /// the next poll.
    fn feed_polls(&mut self, http: &mut HttpFraming, now_us: u64, samples: &mut Vec<u64>) {
        while self.closed.is_none() {
            let Some(end) = self.pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                return;
            };
            let head = String::from_utf8_lossy(&self.pending[..end]).into_owned();
            if !head.starts_with("HTTP/1.1 200") {
                self.closed = Some(format!("refused: {}", &head[..head.len().min(80)]));
                return;
            }
            let length = head.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            });
            let Some(length) = length else {
                self.closed = Some("protocol: a poll answer without Content-Length".into());
                return;
            };
            if self.pending.len() < end + 4 + length {
                return;
            }
            let body: Vec<u8> = self
                .pending
                .drain(..end + 4 + length)
                .skip(end + 4)
                .collect();
            let mut lines = body.split(|&b| b == b'\n').filter(|l| !l.is_empty());
            let first = lines
                .next()
                .and_then(|l| serde_json::from_slice::<serde_json::Value>(l).ok());
            let Some(emulation) = first.as_ref().map(|v| &v["emulation"]) else {
                self.closed = Some("protocol: not a poll answer".into());
                return;
            };
            let (Some(session), Some(mut seq)) =
                (emulation["session"].as_str(), emulation["first"].as_u64())
            else {
                self.closed = Some(format!("protocol: poll answer {emulation}"));
                return;
            };
            http.session.get_or_insert_with(|| session.to_owned());
            for line in lines {
                if line.starts_with(b"{\"emulation\"") {
                    self.closed = Some(format!(
                        "closed by server: {}",
                        String::from_utf8_lossy(line)
                    ));
                    return;
                }
                // What an earlier answer had is sent again until acked.
                if seq > http.ack {
                    http.ack = seq;
                    self.message(line, now_us, samples);
                }
                seq += 1;
            }
            http.polls += 1;
            let session = http.session.as_deref().unwrap_or_default();
            self.out.extend_from_slice(
                format!(
                    "GET /connection/long_poll?session={}&ack={}&wait={POLL_WAIT_SECS} HTTP/1.1\r\nHost: {}\r\n\r\n",
                    url_encode(session),
                    http.ack,
                    http.host
                )
                .as_bytes(),
            );
        }
    }

    /// The request that opens the stream, with the connect and subscribe.
    fn http_request(&self) -> Vec<u8> {
        let host = self.http.as_ref().map_or("", |h| h.host.as_str());
        let commands = format!(
            "{{\"id\":1,\"connect\":{{}}}}\n{{\"id\":2,\"subscribe\":{{\"channel\":{}}}}}",
            serde_json::to_string(&self.channel).expect("a string")
        );
        match self.http.as_ref().map(|h| h.transport) {
            Some(Transport::Sse) => {
                let query: String = url_encode(&commands);
                format!(
                    "GET /connection/sse?commands={query} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
                )
                .into_bytes()
            }
            Some(Transport::LongPoll) => format!(
                "POST /connection/long_poll?wait={POLL_WAIT_SECS} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{commands}",
                commands.len()
            )
            .into_bytes(),
            _ => format!(
                "POST /connection/http_stream HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{commands}",
                commands.len()
            )
            .into_bytes(),
        }
    }

    /// Response bytes of an HTTP fallback: the head, then chunks, then
    /// messages (lines, or the `data:` of events).
    fn feed_http(&mut self, data: &[u8], now_us: u64, samples: &mut Vec<u64>) {
        self.pending.extend_from_slice(data);
        let Some(mut http) = self.http.take() else {
            return;
        };
        if http.transport == Transport::LongPoll {
            self.feed_polls(&mut http, now_us, samples);
            self.http = Some(http);
            return;
        }
        if !http.head {
            let Some(end) = self.pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                self.http = Some(http);
                return;
            };
            if !self.pending.starts_with(b"HTTP/1.1 200") {
                let head = String::from_utf8_lossy(&self.pending[..end.min(80)]).into_owned();
                self.closed = Some(format!("refused: {head}"));
                self.http = Some(http);
                return;
            }
            self.pending.drain(..end + 4);
            http.head = true;
        }
        // Whole chunks into the body.
        while let Some(eol) = self.pending.windows(2).position(|w| w == b"\r\n") {
            let size = std::str::from_utf8(&self.pending[..eol])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok());
            let Some(size) = size else {
                self.closed = Some("protocol: bad chunk".into());
                break;
            };
            if size == 0 {
                self.closed = Some("closed by server".into());
                break;
            }
            if self.pending.len() < eol + 2 + size + 2 {
                break;
            }
            http.body
                .extend_from_slice(&self.pending[eol + 2..eol + 2 + size]);
            self.pending.drain(..eol + 2 + size + 2);
        }
        // Whole messages out of the body.
        let separator: &[u8] = if http.transport == Transport::Sse {
            b"\n\n"
        } else {
            b"\n"
        };
        let mut used = 0;
        while let Some(at) = http.body[used..]
            .windows(separator.len())
            .position(|w| w == separator)
        {
            let item = &http.body[used..used + at];
            used += at + separator.len();
            if http.transport == Transport::Sse {
                for line in item.split(|&b| b == b'\n') {
                    if let Some(data) = line.strip_prefix(b"data: ") {
                        self.message(data, now_us, samples);
                    }
                }
            } else if !item.is_empty() {
                self.message(item, now_us, samples);
            }
        }
        http.body.drain(..used);
        self.http = Some(http);
    }

    fn feed(&mut self, data: &[u8], now_us: u64, samples: &mut Vec<u64>) {
        if self.http.is_some() {
            return self.feed_http(data, now_us, samples);
        }
        if self.pending.is_empty() {
            let used = self.frames(data, now_us, samples);
            if used < data.len() {
                self.pending.extend_from_slice(&data[used..]);
            }
        } else {
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(data);
            let used = self.frames(&pending, now_us, samples);
            pending.drain(..used);
            if pending.is_empty() && pending.capacity() > 4096 {
                pending = Vec::new();
            }
            self.pending = pending;
        }
    }

    /// Handles the complete frames at the start of `data`; returns the
    /// bytes used.
    fn frames(&mut self, data: &[u8], now_us: u64, samples: &mut Vec<u64>) -> usize {
        let mut at = 0;
        while self.closed.is_none() {
            let (header, len) = match FrameHeader::decode(&data[at..]) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(_) => {
                    self.closed = Some("protocol: bad frame header".into());
                    break;
                }
            };
            let end = at + len + header.payload_len as usize;
            if end > data.len() {
                break;
            }
            let payload = &data[at + len..end];
            at = end;
            match header.opcode {
                OpCode::Ping => masked_frame(OpCode::Pong, payload, &mut self.out),
                OpCode::Pong => {}
                OpCode::Close => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    self.closed = Some(match code {
                        Some(code) => format!("closed by server: {code}"),
                        None => "closed by server".into(),
                    });
                }
                OpCode::Text | OpCode::Binary if header.fin && !self.fragmented => {
                    self.message(payload, now_us, samples)
                }
                OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                    self.fragments.extend_from_slice(payload);
                    self.fragmented = !header.fin;
                    if header.fin {
                        let message = std::mem::take(&mut self.fragments);
                        self.message(&message, now_us, samples);
                    }
                }
            }
        }
        at
    }

    fn message(&mut self, message: &[u8], now_us: u64, samples: &mut Vec<u64>) {
        if self.phase == Phase::Ready {
            if let Some((seq, sent)) = stamp(message) {
                samples.push(now_us.saturating_sub(sent).max(1));
                self.received += 1;
                if seq != self.next_seq {
                    self.out_of_order += 1;
                }
                self.next_seq = seq + 1;
                return;
            }
        }
        match self.protocol {
            Protocol::Tidewire => {
                if self.phase == Phase::Joining {
                    let text = String::from_utf8_lossy(message);
                    if text.contains("\"error\"") {
                        self.closed = Some(format!("subscribe: {text}"));
                    } else if text.contains("\"id\":2,\"subscribe\"") {
                        self.phase = Phase::Ready;
                    }
                }
            }
            Protocol::WsBroadcast => {}
            Protocol::Socketio => match (self.phase, message) {
                (_, b"2") => masked_frame(OpCode::Text, b"3", &mut self.out),
                (Phase::Open, m) if m.starts_with(b"0") => {
                    masked_frame(OpCode::Text, b"40", &mut self.out);
                    self.phase = Phase::Connect;
                }
                (Phase::Connect, m) if m.starts_with(b"40") => {
                    let join = format!(
                        "42[\"join\",{}]",
                        serde_json::to_string(&self.channel).expect("a string")
                    );
                    masked_frame(OpCode::Text, join.as_bytes(), &mut self.out);
                    self.phase = Phase::Joining;
                }
                (Phase::Connect, m) if m.starts_with(b"44") => {
                    self.closed = Some(format!(
                        "socket.io connect refused: {}",
                        String::from_utf8_lossy(m)
                    ));
                }
                (Phase::Joining, m) if m.starts_with(b"42[\"joined\"") => {
                    self.phase = Phase::Ready;
                }
                _ => {}
            },
        }
    }
}

/// Reads and writes a subscriber's connection until `stop` resolves (or the
/// phase reaches `until`, when given). Returns an I/O error, if any.
async fn drive<F: Future<Output = ()>>(
    stream: &mut Stream,
    sub: &mut Subscriber,
    shared: &Shared,
    until: Option<Phase>,
    stop: &mut Pin<&mut F>,
) -> io::Result<()> {
    poll_fn(|cx: &mut Context<'_>| loop {
        if sub.closed.is_some() || until.is_some_and(|p| sub.phase == p) {
            return Poll::Ready(Ok(()));
        }
        if stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        let mut progress = false;
        while !sub.out.is_empty() {
            match Pin::new(&mut *stream).poll_write(cx, &sub.out) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    sub.out.drain(..n);
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        let read = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => Poll::Ready(Ok(0)),
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    SAMPLES.with(|samples| {
                        let mut samples = samples.borrow_mut();
                        let before = sub.received;
                        sub.feed(&scratch[..n], micros_since(shared.epoch), &mut samples);
                        if sub.received > before {
                            shared
                                .delivered
                                .fetch_add(sub.received - before, Ordering::Relaxed);
                        }
                    });
                    Poll::Ready(Ok(n))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        });
        match read {
            Poll::Ready(Ok(0)) => {
                sub.closed.get_or_insert_with(|| "closed by server".into());
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Ok(_)) => progress = true,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        if !progress {
            flush_samples(shared);
            return Poll::Pending;
        }
    })
    .await
}

/// Merges this thread's samples into the histogram, and notes the time.
fn flush_samples(shared: &Shared) {
    SAMPLES.with(|samples| {
        let mut samples = samples.borrow_mut();
        if samples.is_empty() {
            return;
        }
        shared
            .last_delivery_us
            .fetch_max(micros_since(shared.epoch), Ordering::Relaxed);
        let mut h = shared.histogram.lock().unwrap_or_else(|p| p.into_inner());
        for v in samples.drain(..) {
            let _ = h.record(v.clamp(1, 120_000_000));
        }
    });
}

struct Outcome {
    received: u64,
    out_of_order: u64,
    polls: u64,
    error: Option<String>,
}

/// What the subscribers' tasks need.
struct Setup {
    args: BenchArgs,
    protocol: Protocol,
    addr: SocketAddr,
    target: Target,
    shared: Arc<Shared>,
    opening: Arc<Semaphore>,
    /// Subscribers are released (the run is over).
    release: tidewire::CancellationToken,
}

async fn subscriber(setup: Arc<Setup>, source: IpAddr) -> anyhow::Result<Outcome> {
    let permit = setup.opening.clone().acquire_owned().await?;
    let transport = setup.args.transport;
    let (mut stream, leftover, mut sub) = if transport == Transport::Websocket {
        let (stream, leftover) =
            open_raw(&setup.args.url, setup.addr, source, &setup.target, None).await?;
        (
            stream,
            leftover,
            Subscriber::new(setup.protocol, &setup.args.channel),
        )
    } else {
        let stream = connect_transport(setup.addr, source, &setup.target, None).await?;
        let mut sub = Subscriber::new(setup.protocol, &setup.args.channel)
            .over_http(transport, &setup.addr.to_string());
        sub.out = sub.http_request();
        (stream, Vec::new(), sub)
    };
    let mut samples = Vec::new();
    sub.feed(&leftover, 0, &mut samples);
    let release = setup.release.cancelled();
    tokio::pin!(release);
    // Join, bounded in time.
    let joined = tokio::time::timeout(
        Duration::from_secs(30),
        drive(
            &mut stream,
            &mut sub,
            &setup.shared,
            Some(Phase::Ready),
            &mut release,
        ),
    )
    .await;
    drop(permit);
    match joined {
        Err(_) => bail!("no subscribe reply within 30 s"),
        Ok(Err(e)) => return Err(e).context("subscribing"),
        Ok(Ok(())) => {}
    }
    if let Some(why) = sub.closed.take() {
        bail!("{why}");
    }
    if sub.phase != Phase::Ready {
        bail!("released before the subscription stood");
    }
    setup.shared.ready.fetch_add(1, Ordering::Relaxed);
    let result = drive(&mut stream, &mut sub, &setup.shared, None, &mut release).await;
    flush_samples(&setup.shared);
    let error = match result {
        Err(e) => Some(format!("io: {:?}", e.kind())),
        Ok(()) => sub.closed.take(),
    };
    if error.is_none() && transport == Transport::Websocket {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let mut close = Vec::new();
            masked_frame(OpCode::Close, &1000u16.to_be_bytes(), &mut close);
            stream.write_all(&close).await?;
            stream.flush().await?;
            let mut buf = [0u8; 4096];
            while stream.read(&mut buf).await? > 0 {}
            io::Result::Ok(())
        })
        .await;
    }
    Ok(Outcome {
        received: sub.received,
        out_of_order: sub.out_of_order,
        polls: sub.http.as_ref().map_or(0, |h| h.polls),
        error,
    })
}

/// The publishing side.
enum Publisher {
    /// A WebSocket client: frames are written, the input is read and
    /// checked (Socket.IO pings answered, hub errors counted).
    Ws { stream: Stream, sub: Subscriber },
    /// The hub's HTTP API over one keep-alive connection.
    Api {
        stream: Stream,
        host: String,
        path: String,
        key: String,
        response: Vec<u8>,
    },
}

impl Publisher {
    async fn open(setup: &Setup) -> anyhow::Result<Publisher> {
        let args = &setup.args;
        let source = args
            .sources
            .first()
            .copied()
            .unwrap_or_else(|| unspecified(setup.addr));
        if args.publish_via == PublishVia::Api {
            let url = args
                .api_url
                .as_deref()
                .context("--publish-via api needs --api-url")?;
            let key = args
                .api_key
                .clone()
                .context("--publish-via api needs --api-key")?;
            let rest = url
                .strip_prefix("http://")
                .context("--api-url must be http://HOST:PORT/PATH")?;
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            let addr: SocketAddr = tokio::net::lookup_host(host)
                .await?
                .next()
                .context("the API host resolves to no address")?;
            let target = Target::parse(&format!("ws://{host}/"))?;
            let stream = connect_transport(addr, source, &target, None).await?;
            let path = format!("/{}/publish", path.trim_end_matches('/')).replace("//", "/");
            return Ok(Publisher::Api {
                stream,
                host: host.to_owned(),
                path,
                key,
                response: Vec::new(),
            });
        }
        let (mut stream, leftover) =
            open_raw(&args.url, setup.addr, source, &setup.target, None).await?;
        let mut sub = Subscriber::new(setup.protocol, &args.channel);
        sub.out.clear();
        let mut samples = Vec::new();
        match setup.protocol {
            Protocol::Tidewire => {
                // Connect; the reply has id 1.
                masked_frame(OpCode::Text, b"{\"id\":1,\"connect\":{}}", &mut sub.out);
                stream.write_all(&std::mem::take(&mut sub.out)).await?;
                let mut input = leftover;
                let mut buf = vec![0u8; 16 * 1024];
                tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        if let Some(text) = find_text(&input) {
                            if text.contains("\"error\"") {
                                bail!("publisher connect: {text}");
                            }
                            if text.contains("\"id\":1") {
                                return Ok(());
                            }
                            bail!("publisher connect: unexpected {text}");
                        }
                        let n = stream.read(&mut buf).await?;
                        if n == 0 {
                            bail!("the server closed the publisher's connection");
                        }
                        input.extend_from_slice(&buf[..n]);
                    }
                })
                .await
                .context("publisher connect timed out")??;
                sub.phase = Phase::Ready;
            }
            Protocol::WsBroadcast => {}
            Protocol::Socketio => {
                sub.feed(&leftover, 0, &mut samples);
                let release = tidewire::CancellationToken::new();
                let stop = release.cancelled();
                tokio::pin!(stop);
                // Up to the namespace connect (no join: the publisher is
                // not in the room).
                let shared = Shared::new();
                tokio::time::timeout(
                    Duration::from_secs(10),
                    drive(
                        &mut stream,
                        &mut sub,
                        &shared,
                        Some(Phase::Joining),
                        &mut stop,
                    ),
                )
                .await
                .context("publisher socket.io connect timed out")??;
                if let Some(why) = sub.closed.take() {
                    bail!("publisher: {why}");
                }
                sub.out.clear(); // the join it would send
                sub.phase = Phase::Ready;
            }
        }
        Ok(Publisher::Ws { stream, sub })
    }

    /// Sends one publication with the given data.
    async fn publish(
        &mut self,
        protocol: Protocol,
        channel: &str,
        data: &str,
    ) -> anyhow::Result<()> {
        match self {
            Publisher::Ws { stream, sub } => {
                let message = match protocol {
                    Protocol::Tidewire => format!(
                        "{{\"publish\":{{\"channel\":{},\"data\":\"{data}\"}}}}",
                        serde_json::to_string(channel).expect("a string")
                    ),
                    Protocol::WsBroadcast => data.to_owned(),
                    Protocol::Socketio => format!(
                        "42[\"pub\",{},\"{data}\"]",
                        serde_json::to_string(channel).expect("a string")
                    ),
                };
                masked_frame(OpCode::Text, message.as_bytes(), &mut sub.out);
                let out = std::mem::take(&mut sub.out);
                stream.write_all(&out).await?;
                Ok(())
            }
            Publisher::Api {
                stream,
                host,
                path,
                key,
                response,
            } => {
                let body = format!(
                    "{{\"channel\":{},\"data\":\"{data}\"}}",
                    serde_json::to_string(channel).expect("a string")
                );
                let request = format!(
                    "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: apikey {key}\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(request.as_bytes()).await?;
                read_http_response(stream, response).await
            }
        }
    }

    /// Reads what the server sent the publishing client without waiting;
    /// answers pings. Returns an error message the server sent, if any.
    fn poll_input(&mut self, cx: &mut Context<'_>) -> Poll<Option<String>> {
        let Publisher::Ws { stream, sub } = self else {
            return Poll::Pending;
        };
        let mut buf = [0u8; 4096];
        loop {
            let mut read = ReadBuf::new(&mut buf);
            match Pin::new(&mut *stream).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    return Poll::Ready(Some("publisher: closed by server".into()))
                }
                Poll::Ready(Ok(())) => {
                    let data = read.filled().to_vec();
                    let mut samples = Vec::new();
                    // Hub errors come as `{"error":…}` without an id.
                    if sub.protocol == Protocol::Tidewire {
                        if let Some(text) = find_text(&data) {
                            if text.contains("\"error\"") {
                                return Poll::Ready(Some(format!("publish: {text}")));
                            }
                        }
                    }
                    sub.feed(&data, 0, &mut samples);
                    if let Some(why) = sub.closed.take() {
                        return Poll::Ready(Some(format!("publisher: {why}")));
                    }
                }
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Some(format!("publisher: io: {:?}", e.kind())))
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Writes pending control replies (pongs).
    async fn flush_control(&mut self) -> anyhow::Result<()> {
        if let Publisher::Ws { stream, sub } = self {
            if !sub.out.is_empty() {
                let out = std::mem::take(&mut sub.out);
                stream.write_all(&out).await?;
            }
        }
        Ok(())
    }
}

/// The first complete text frame in `input`, as text.
fn find_text(input: &[u8]) -> Option<String> {
    let mut at = 0;
    while let Ok(Some((header, len))) = FrameHeader::decode(&input[at..]) {
        let end = at + len + header.payload_len as usize;
        if end > input.len() {
            return None;
        }
        if header.opcode == OpCode::Text {
            return Some(String::from_utf8_lossy(&input[at + len..end]).into_owned());
        }
        at = end;
    }
    None
}

/// Reads one HTTP/1.1 response with a Content-Length; fails unless 200.
async fn read_http_response(stream: &mut Stream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned();
                buf.drain(..end + 4 + length);
                let status = head.split_whitespace().nth(1).unwrap_or("");
                if status != "200" {
                    bail!("api: {status} {body}");
                }
                return Ok(());
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("api: the server closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn unspecified(addr: SocketAddr) -> IpAddr {
    if addr.is_ipv4() {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    }
}

impl Shared {
    fn new() -> Shared {
        Shared {
            epoch: Instant::now(),
            ready: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            last_delivery_us: AtomicU64::new(0),
            histogram: Mutex::new(new_histogram()),
        }
    }
}

/// Publishes at `rate` until `deadline`; returns (publications, time of the
/// first in microseconds since the epoch, errors).
async fn publish_loop(
    publisher: &mut Publisher,
    setup: &Setup,
    deadline: Instant,
) -> (u64, Option<u64>, BTreeMap<String, u64>) {
    let args = &setup.args;
    let rate = args.rate.unwrap_or(100.0);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let shared = &setup.shared;
    let mut errors = BTreeMap::new();
    let (mut seq, mut first) = (0u64, None);
    let start = Instant::now();
    // The data fits `--size` bytes: JSON strings count their quotes.
    let data_len = match setup.protocol {
        Protocol::WsBroadcast => args.size,
        _ => args.size.saturating_sub(2),
    };
    loop {
        let due = start + interval.mul_f64(seq as f64);
        if due >= deadline {
            break;
        }
        // Wait for the next publication's time, reading the publisher's
        // input meanwhile.
        let input = tokio::time::timeout_at(
            tokio::time::Instant::from_std(due),
            poll_fn(|cx| publisher.poll_input(cx)),
        )
        .await;
        if let Ok(Some(error)) = input {
            *errors.entry(error).or_default() += 1;
            break;
        }
        if let Err(e) = publisher.flush_control().await {
            *errors.entry(format!("publisher: {e:#}")).or_default() += 1;
            break;
        }
        if Instant::now() < due {
            continue;
        }
        let now_us = micros_since(shared.epoch);
        first.get_or_insert(now_us);
        let data = payload(seq, now_us, data_len);
        if let Err(e) = publisher
            .publish(setup.protocol, &args.channel, &data)
            .await
        {
            *errors.entry(format!("publish: {e:#}")).or_default() += 1;
            break;
        }
        seq += 1;
    }
    (seq, first, errors)
}

pub(super) async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let protocol = args.protocol;
    if protocol != Protocol::Tidewire && args.publish_via == PublishVia::Api {
        bail!("--publish-via api is for --protocol tidewire");
    }
    if protocol != Protocol::Tidewire && args.transport != Transport::Websocket {
        bail!("--transport http-stream, sse and long-poll are the hub's: --protocol tidewire");
    }
    let rate = args.rate.unwrap_or(100.0);
    if !(rate >= 0.0 && rate.is_finite()) {
        bail!("--rate must be 0 (no publications) or more");
    }
    let target = Target::parse(&args.url)?;
    if target.tls {
        bail!("--fanout supports ws:// only");
    }
    let addr: SocketAddr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await?
        .next()
        .context("the host name resolves to no address")?;
    let sources: Vec<IpAddr> = if args.sources.is_empty() {
        vec![unspecified(addr)]
    } else {
        args.sources.clone()
    };
    let rss_before = args.server_pid.and_then(rss_kib);
    let server_pid = args.server_pid.map(|pid| pid.to_string());
    let shared = Arc::new(Shared::new());
    let setup = Arc::new(Setup {
        args: args.clone(),
        protocol,
        addr,
        target,
        shared: shared.clone(),
        opening: Arc::new(Semaphore::new(256)),
        release: tidewire::CancellationToken::new(),
    });
    let progress = progress_bar(&args);

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        let source = sources[i % sources.len()];
        tasks.spawn(subscriber(setup.clone(), source));
    }
    let mut outcomes = Vec::new();
    let mut errors = wait_until_standing(
        &mut tasks,
        &shared.ready,
        args.connections,
        progress.as_ref(),
        ("subscribing", "subscribe", "subscribed"),
        |outcome: Outcome| {
            // Ended before the start: counted as an error.
            let error = outcome
                .error
                .clone()
                .unwrap_or_else(|| "ended early".into());
            outcomes.push(outcome);
            error
        },
    )
    .await;
    let connected = shared.ready.load(Ordering::Relaxed) as usize;

    let mut publisher = if rate > 0.0 {
        Some(Publisher::open(&setup).await?)
    } else {
        None
    };
    // Let the server settle after the subscription storm.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let spinning = args.busy_poll.then(super::busy_poll);
    let machine_start = machine_busy_seconds();
    let cpu_start = cpu_seconds();
    let server_cpu_start = server_pid.as_deref().and_then(cpu_seconds_of);
    let t0 = Instant::now();
    let deadline = t0 + args.duration;
    if let Some(bar) = &progress {
        let (bar, shared) = (bar.clone(), shared.clone());
        let (total, connections) = (args.duration, connected);
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = shared.delivered.load(Ordering::Relaxed);
                let now = Instant::now();
                let rate = (n - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                last = (now, n);
                bar.set_message(format!(
                    "fanout: {connections} subscribers, {n} delivered, {}/s (of {total:?})",
                    human(rate)
                ));
            }
        });
    }
    let (publications, first_us) = match publisher.as_mut() {
        Some(p) => {
            let (n, first, publish_errors) = publish_loop(p, &setup, deadline).await;
            for (k, v) in publish_errors {
                *errors.entry(k).or_default() += v;
            }
            (n, first)
        }
        None => {
            tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
            (0, None)
        }
    };
    let publish_end = Instant::now();
    let generator_cpu_seconds = cpu_seconds() - cpu_start;
    let machine_busy = machine_start
        .zip(machine_busy_seconds())
        .map(|(a, b)| b - a);
    let server_cpu_seconds = server_cpu_start
        .zip(server_pid.as_deref().and_then(cpu_seconds_of))
        .map(|(start, end)| end - start);
    let rss_after = args.server_pid.and_then(rss_kib);
    // Drain: wait (bounded) for the deliveries still on their way.
    let expected = publications * connected as u64;
    let drain_until = publish_end + Duration::from_secs(5);
    while shared.delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(spinning) = spinning {
        spinning.abort();
    }
    setup.release.cancel();
    drop(publisher);
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(outcome)) => outcomes.push(outcome),
            Ok(Err(e)) => *errors.entry(format!("subscribe: {e:#}")).or_default() += 1,
            Err(e) => *errors.entry(format!("task: {e}")).or_default() += 1,
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let (mut deliveries, mut out_of_order, mut polls) = (0, 0, 0);
    for o in &outcomes {
        deliveries += o.received;
        out_of_order += o.out_of_order;
        polls += o.polls;
        if let Some(e) = &o.error {
            *errors.entry(e.clone()).or_default() += 1;
        }
    }
    let histogram = shared
        .histogram
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let last_us = shared.last_delivery_us.load(Ordering::Relaxed);
    let delivery_seconds = match first_us {
        Some(first) if last_us > first => (last_us - first) as f64 / 1e6,
        _ => 0.0,
    };
    let seconds = args.duration.as_secs_f64();
    let report = Report {
        url: args.url.clone(),
        mode: "fanout",
        protocol,
        transport: args.transport,
        publish_via: args.publish_via,
        channel: args.channel.clone(),
        connections: args.connections,
        connected,
        size: args.size,
        rate,
        seconds,
        publications,
        publications_per_sec: publications as f64 / seconds,
        expected,
        deliveries,
        lost: expected.saturating_sub(deliveries),
        out_of_order,
        polls,
        server_cpu_us_per_delivery: server_cpu_seconds
            .filter(|_| deliveries > 0)
            .map(|cpu| cpu * 1e6 / deliveries as f64),
        deliveries_per_sec: if delivery_seconds > 0.0 {
            deliveries as f64 / delivery_seconds.max(seconds)
        } else {
            0.0
        },
        delivery_seconds,
        latency: Latency::of(&histogram),
        errors,
        server_rss_kib_before: rss_before,
        server_rss_kib_after: rss_after,
        server_kib_per_connection: match (rss_before, rss_after) {
            (Some(b), Some(a)) if connected > 0 => Some((a as f64 - b as f64) / connected as f64),
            _ => None,
        },
        generator_cpu_seconds,
        server_cpu_seconds,
        others_cpu_seconds: machine_busy
            .zip(server_cpu_seconds)
            .map(|(busy, server)| (busy - server - generator_cpu_seconds).max(0.0)),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &Report) {
    println!(
        "tidewire bench fanout: {} — {:?}, {} subscribers ({} subscribed) on {:?}, {} B, {} publications/s via {:?}, {:.0} s",
        r.url, r.protocol, r.connections, r.connected, r.channel, r.size, r.rate, r.publish_via, r.seconds
    );
    if r.rate > 0.0 {
        println!(
            "  published  {} ({:.1}/s)",
            r.publications, r.publications_per_sec
        );
        println!(
            "  delivered  {} of {} expected ({} lost, {} out of order), {} deliveries/s",
            r.deliveries,
            r.expected,
            r.lost,
            r.out_of_order,
            human(r.deliveries_per_sec)
        );
        let l = &r.latency;
        println!(
            "  latency    p50 {} µs, p90 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
        );
        if r.polls > 0 {
            println!(
                "  polls      {} ({:.2} deliveries per poll)",
                r.polls,
                r.deliveries as f64 / r.polls as f64
            );
        }
        if let Some(us) = r.server_cpu_us_per_delivery {
            println!("  server CPU {us:.2} µs per delivery");
        }
    }
    if let (Some(b), Some(a)) = (r.server_rss_kib_before, r.server_rss_kib_after) {
        print!("  server RSS {b} KiB before, {a} KiB at the deadline");
        match r.server_kib_per_connection {
            Some(per) => println!(", {per:.2} KiB per subscribed connection"),
            None => println!(),
        }
    }
    super::print_cpu_and_errors(
        r.seconds,
        r.generator_cpu_seconds,
        r.server_cpu_seconds,
        &r.errors,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::wire::tests::server_frame;

    /// `body` as one HTTP chunk.
    fn chunk(body: &str) -> String {
        format!("{:x}\r\n{body}\r\n", body.len())
    }

    #[test]
    fn http_fallback_subscribers_read_chunks_lines_and_events() {
        for (transport, wrap) in [
            (
                Transport::HttpStream,
                (|m: &str| format!("{m}\n")) as fn(&str) -> String,
            ),
            (Transport::Sse, |m: &str| format!("data: {m}\n\n")),
        ] {
            let mut sub = Subscriber::new(Protocol::Tidewire, "ch").over_http(transport, "h:1");
            assert!(sub.out.is_empty(), "no WebSocket frames");
            let request = String::from_utf8(sub.http_request()).unwrap();
            assert!(request.contains("/connection/"), "{request}");
            let mut samples = Vec::new();
            let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            let reply = wrap("{\"id\":2,\"subscribe\":{}}");
            let publication = wrap("{\"push\":{\"channel\":\"ch\",\"pub\":{\"data\":\"~0~5~x\"}}}");
            let all = format!("{head}{}{}", chunk(&reply), chunk(&publication));
            // In two reads, split inside a chunk.
            let (a, b) = all.as_bytes().split_at(all.len() - 7);
            sub.feed(a, 10, &mut samples);
            assert_eq!(sub.phase, Phase::Ready, "{transport:?}");
            assert_eq!(sub.received, 0);
            sub.feed(b, 10, &mut samples);
            assert_eq!(sub.received, 1, "{transport:?}");
            assert_eq!(samples, [5]);
            sub.feed(b"0\r\n\r\n", 10, &mut samples);
            assert_eq!(sub.closed.as_deref(), Some("closed by server"));
        }
        let mut refused =
            Subscriber::new(Protocol::Tidewire, "ch").over_http(Transport::Sse, "h:1");
        refused.feed(b"HTTP/1.1 403 Forbidden\r\n\r\n", 0, &mut Vec::new());
        assert!(refused.closed.unwrap().starts_with("refused"));
    }

    /// A long-poll answer: its head and body.
    fn poll_answer(session: &str, first: u64, messages: &[&str]) -> String {
        let mut body =
            format!("{{\"emulation\":{{\"session\":\"{session}\",\"first\":{first}}}}}\n");
        for m in messages {
            body.push_str(m);
            body.push('\n');
        }
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn long_polling_subscribers_poll_again_with_their_ack_and_skip_what_they_had() {
        let mut sub =
            Subscriber::new(Protocol::Tidewire, "ch").over_http(Transport::LongPoll, "h:1");
        let request = String::from_utf8(sub.http_request()).unwrap();
        assert!(
            request.starts_with("POST /connection/long_poll?wait="),
            "{request}"
        );
        let publication = |seq: u64| {
            format!(
                "{{\"push\":{{\"channel\":\"ch\",\"pub\":{{\"data\":\"{}\"}}}}}}",
                payload(seq, 5, 30)
            )
        };
        let mut samples = Vec::new();
        let first = poll_answer(
            "n.s",
            1,
            &["{\"id\":1,\"connect\":{}}", "{\"id\":2,\"subscribe\":{}}"],
        );
        // In two reads, split inside the body.
        let (a, b) = first.as_bytes().split_at(first.len() - 9);
        sub.feed(a, 10, &mut samples);
        assert!(sub.out.is_empty(), "not answered before it is whole");
        sub.feed(b, 10, &mut samples);
        assert_eq!(sub.phase, Phase::Ready);
        let poll = String::from_utf8(std::mem::take(&mut sub.out)).unwrap();
        assert!(
            poll.starts_with("GET /connection/long_poll?session=n.s&ack=2&wait="),
            "{poll}"
        );
        // Message 3 again (its answer was lost), then 4: one delivery each.
        let again = poll_answer("n.s", 3, &[&publication(0)]);
        let next = poll_answer("n.s", 3, &[&publication(0), &publication(1)]);
        sub.feed(format!("{again}{next}").as_bytes(), 10, &mut samples);
        assert_eq!(sub.received, 2);
        assert_eq!(sub.out_of_order, 0);
        assert_eq!(sub.http.as_ref().unwrap().polls, 3);
        let polls = String::from_utf8(std::mem::take(&mut sub.out)).unwrap();
        assert!(
            polls.contains("ack=3&") && polls.ends_with("\r\n\r\n"),
            "{polls}"
        );
        assert!(polls.rfind("ack=4&").is_some(), "{polls}");
        // The session's end.
        sub.feed(
            poll_answer("n.s", 5, &["{\"emulation\":{\"close\":{\"code\":3001}}}"]).as_bytes(),
            10,
            &mut samples,
        );
        assert!(sub.closed.unwrap().starts_with("closed by server"));
        let mut refused =
            Subscriber::new(Protocol::Tidewire, "ch").over_http(Transport::LongPoll, "h:1");
        refused.feed(
            b"HTTP/1.1 409 Conflict\r\ncontent-length: 0\r\n\r\n",
            0,
            &mut Vec::new(),
        );
        assert!(refused.closed.unwrap().starts_with("refused"));
    }

    #[test]
    fn payloads_carry_their_stamp_and_size() {
        let p = payload(12, 345_678, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(stamp(p.as_bytes()), Some((12, 345_678)));
        let push = format!(
            "{{\"push\":{{\"channel\":\"bench\",\"pub\":{{\"offset\":3,\"data\":\"{p}\"}}}}}}"
        );
        assert_eq!(stamp(push.as_bytes()), Some((12, 345_678)));
        assert_eq!(stamp(b"{\"push\":{\"ping\":{}}}"), None);
        assert_eq!(stamp(b"~12~x"), None);
    }

    #[test]
    fn a_hub_subscriber_joins_then_counts_deliveries_across_reads() {
        let mut sub = Subscriber::new(Protocol::Tidewire, "bench");
        assert!(!sub.out.is_empty(), "connect and subscribe are queued");
        let mut input = server_frame(
            OpCode::Text,
            true,
            b"{\"id\":1,\"connect\":{\"client\":\"c\"}}\n",
        );
        input.extend(server_frame(
            OpCode::Text,
            true,
            b"{\"id\":2,\"subscribe\":{\"recoverable\":true}}",
        ));
        input.extend(server_frame(OpCode::Ping, true, b"hi"));
        for seq in 0..5 {
            let data = payload(seq, 100, 40);
            input.extend(server_frame(
                OpCode::Text,
                true,
                format!("{{\"push\":{{\"pub\":{{\"data\":\"{data}\"}}}}}}").as_bytes(),
            ));
        }
        let mut samples = Vec::new();
        sub.out.clear();
        for chunk in input.chunks(7) {
            sub.feed(chunk, 1100, &mut samples);
        }
        assert_eq!(sub.phase, Phase::Ready);
        assert_eq!(sub.received, 5);
        assert_eq!(sub.out_of_order, 0);
        assert_eq!(samples, vec![1000; 5]);
        assert!(!sub.out.is_empty(), "the ping is answered");
        assert!(sub.pending.is_empty());
    }

    #[test]
    fn a_socketio_subscriber_follows_the_engine_io_handshake() {
        let mut sub = Subscriber::new(Protocol::Socketio, "room");
        let mut samples = Vec::new();
        // Each message, the phase it leads to, and whether it is answered.
        let steps: [(&[u8], Phase, bool); 4] = [
            (
                b"0{\"sid\":\"x\",\"pingInterval\":25000}",
                Phase::Connect,
                true,
            ),
            (b"40{\"sid\":\"y\"}", Phase::Joining, true),
            (b"42[\"joined\"]", Phase::Ready, false),
            (b"2", Phase::Ready, true),
        ];
        for (message, phase, answered) in steps {
            sub.out.clear();
            sub.feed(&server_frame(OpCode::Text, true, message), 0, &mut samples);
            assert_eq!(sub.phase, phase);
            assert_eq!(
                !sub.out.is_empty(),
                answered,
                "{}",
                String::from_utf8_lossy(message)
            );
        }
        let data = payload(0, 5, 30);
        sub.feed(
            &server_frame(
                OpCode::Text,
                true,
                format!("42[\"pub\",\"{data}\"]").as_bytes(),
            ),
            10,
            &mut samples,
        );
        assert_eq!(sub.received, 1);
        assert_eq!(samples, vec![5]);
    }
}
