//! `tidewire bench`: a load generator for WebSocket servers, like wrk.
//!
//! Echo mode opens C connections, keeps P messages in flight on each, checks
//! every echo byte for byte, and reports messages/s, bytes/s and latency
//! percentiles (HdrHistogram). Idle mode opens C connections and holds them,
//! spreading them over several source addresses to pass the ~28k ephemeral
//! ports of one address. Both raise the process's file-descriptor limit.
//! Fan-out mode (`--fanout`, in `fanout.rs`) subscribes C connections to one
//! channel and publishes to it at `--rate`.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use futures_util::FutureExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tidewire::proto::handshake::Target;
use tidewire::tls::TlsConnector;
use tidewire::{ClientBuilder, Config, DeflateConfig, Message, WebSocket};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;

use crate::server_args::duration;

mod fanout;
mod wire;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Server URL (ws:// or wss://).
    url: String,
    /// Connections to open.
    #[arg(short = 'c', long, default_value_t = 100)]
    connections: usize,
    /// Message size in bytes.
    #[arg(short = 's', long, default_value_t = 16)]
    size: usize,
    /// Messages in flight per connection.
    #[arg(short = 'p', long = "in-flight", default_value_t = 1)]
    in_flight: usize,
    /// How long to measure (after all connections are open).
    #[arg(short = 'd', long, default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Send text messages instead of binary.
    #[arg(long)]
    text: bool,
    /// Total send rate in messages per second (default: as fast as echoes
    /// come back); with --fanout, publications per second (default 100; 0:
    /// none, to measure idle subscribed connections).
    #[arg(long)]
    rate: Option<f64>,
    /// Offer permessage-deflate.
    #[arg(long)]
    compression: bool,
    /// Idle mode: open the connections and hold them; report how many stand.
    #[arg(long)]
    idle: bool,
    /// Idle mode: each connection first sends one message of --size bytes
    /// and waits for its echo (memory after use, e.g. of compression).
    #[arg(long, requires = "idle")]
    warm: bool,
    /// Fan-out mode: the connections subscribe to --channel, one more
    /// client (or the HTTP API) publishes to it at --rate; reports
    /// deliveries/s and delivery latency.
    #[arg(long, conflicts_with_all = ["idle", "compression"])]
    fanout: bool,
    /// The generator never sleeps while it measures (it polls its sockets
    /// in a loop), so that on loopback the server's writes do not pay for
    /// waking the generator's thread (see docs/benchmarks.md). The
    /// generator's CPU share then reads 100 %.
    #[arg(long, conflicts_with = "idle")]
    busy_poll: bool,
    /// The channel (or Socket.IO room) of --fanout.
    #[arg(long, default_value = "bench")]
    channel: String,
    /// The server's protocol, for --fanout.
    #[arg(long, value_enum, default_value = "tidewire")]
    protocol: fanout::Protocol,
    /// How --fanout's subscribers reach the hub (--protocol tidewire):
    /// websocket, or the HTTP fallbacks http-stream, sse and long-poll.
    #[arg(long, value_enum, default_value = "websocket")]
    transport: fanout::Transport,
    /// How --fanout publishes: a WebSocket client or the hub's HTTP API.
    #[arg(long, value_enum, default_value = "ws")]
    publish_via: fanout::PublishVia,
    /// The hub's HTTP API base, for --publish-via api
    /// (http://127.0.0.1:8080/api).
    #[arg(long)]
    api_url: Option<String>,
    /// The hub's API key, for --publish-via api.
    #[arg(long)]
    api_key: Option<String>,
    /// Source addresses to connect from, comma-separated (e.g.
    /// 127.0.0.1,127.0.0.2), round-robin: each gives ~28k ports.
    #[arg(long = "source", value_delimiter = ',')]
    sources: Vec<IpAddr>,
    /// Worker threads of the generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Report the server's memory: the PID of the server process (same machine).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
    /// For wss://: also trust this CA certificate (PEM).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// For wss://: don't verify the server's certificate.
    #[arg(long, conflicts_with = "ca_file")]
    insecure: bool,
}

#[derive(Serialize, Default, Debug)]
struct Latency {
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
}

impl Latency {
    /// The percentiles of `histogram` (all 0 when it is empty).
    fn of(histogram: &Histogram<u64>) -> Latency {
        let q = |p: f64| {
            if histogram.is_empty() {
                0
            } else {
                histogram.value_at_quantile(p)
            }
        };
        Latency {
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: if histogram.is_empty() {
                0
            } else {
                histogram.max()
            },
        }
    }
}

#[derive(Serialize, Debug)]
struct Report {
    url: String,
    mode: &'static str,
    connections: usize,
    connected: usize,
    size: usize,
    in_flight: usize,
    text: bool,
    compression: bool,
    seconds: f64,
    messages: u64,
    messages_per_sec: f64,
    bytes_per_sec: f64,
    latency: Latency,
    errors: BTreeMap<String, u64>,
    server_rss_kib_before: Option<u64>,
    server_rss_kib_after: Option<u64>,
    server_kib_per_connection: Option<f64>,
    generator_cpu_seconds: f64,
    server_cpu_seconds: Option<f64>,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn cpu_seconds() -> f64 {
    cpu_seconds_of("self").unwrap_or(0.0)
}

/// utime + stime of a process (`self` or a PID), from /proc/PID/stat.
fn cpu_seconds_of(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Clock ticks: 100 per second on Linux.
    Some((ticks(11) + ticks(12)) / 100.0)
}

/// Shared counters for the progress line.
#[derive(Default)]
struct Live {
    echoed: AtomicU64,
    open: AtomicU64,
}

/// What one connection measured. Latencies are collected in a small local
/// batch and merged into one histogram per run (a histogram of this range
/// is ~200 KiB: one per connection would not scale to thousands).
struct Outcome {
    samples: Vec<u64>,
    echoed: u64,
    errors: BTreeMap<String, u64>,
}

const SAMPLE_BATCH: usize = 512;

type SharedHistogram = Arc<std::sync::Mutex<Histogram<u64>>>;

/// The live progress line, unless `--quiet` or `--json`.
fn progress_bar(args: &BenchArgs) -> Option<indicatif::ProgressBar> {
    (!args.quiet && !args.json).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                .expect("template"),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    })
}

/// Waits until `target` connection tasks stand (counted in `standing`) or
/// have failed, showing the count on the progress line; returns the
/// failures by kind. `words`: what the progress line says it is doing,
/// the prefix of a task's error, and what a standing task is ("connecting",
/// "connect", "open"). A task that ends with `Ok` before the start is
/// handed to `ended_early`, which names its failure.
async fn wait_until_standing<T: 'static>(
    tasks: &mut tokio::task::JoinSet<anyhow::Result<T>>,
    standing: &AtomicU64,
    target: usize,
    progress: Option<&indicatif::ProgressBar>,
    (doing, verb, state): (&str, &str, &str),
    mut ended_early: impl FnMut(T) -> String,
) -> BTreeMap<String, u64> {
    let mut failures = BTreeMap::<String, u64>::new();
    loop {
        let up = standing.load(Ordering::Relaxed) as usize;
        let failed: u64 = failures.values().sum();
        if let Some(bar) = progress {
            bar.set_message(format!("{doing}: {up}/{target} {state}, {failed} failed"));
        }
        if up + failed as usize >= target {
            return failures;
        }
        tokio::select! {
            done = tasks.join_next() => match done {
                Some(Ok(Err(e))) => *failures.entry(format!("{verb}: {e:#}")).or_default() += 1,
                Some(Ok(Ok(outcome))) => *failures.entry(ended_early(outcome)).or_default() += 1,
                Some(Err(e)) => *failures.entry(format!("task: {e}")).or_default() += 1,
                None => return failures,
            },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")
}

fn merge(histogram: &SharedHistogram, samples: &mut Vec<u64>) {
    let mut h = histogram.lock().unwrap_or_else(|p| p.into_inner());
    for v in samples.drain(..) {
        let _ = h.record(v.clamp(1, 120_000_000));
    }
}

fn error_kind(e: &tidewire::Error) -> String {
    match e {
        tidewire::Error::Io(io) => format!("io: {:?}", io.kind()),
        tidewire::Error::Handshake(h) => format!("handshake: {h}"),
        tidewire::Error::Protocol(p) => format!("protocol: {p}"),
        other => other.to_string(),
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.in_flight == 0 {
        bail!("--connections and --in-flight must be at least 1");
    }
    // Raise the descriptor limit as far as the hard limit allows.
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    if (limit as usize) < args.connections + 64 {
        eprintln!(
            "warning: open-file limit is {limit}; {} connections need more",
            args.connections
        );
    }
    // One thread: a current-thread runtime (no work stealing, cheaper wake-ups).
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    if args.fanout {
        return runtime.block_on(fanout::bench(args));
    }
    let report = runtime.block_on(bench(args.clone()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

async fn bench(args: BenchArgs) -> anyhow::Result<Report> {
    let target = Target::parse(&args.url)?;
    let addr: SocketAddr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await?
        .next()
        .context("the host name resolves to no address")?;
    let tls = if target.tls {
        let mut builder = TlsConnector::builder();
        if let Some(ca) = &args.ca_file {
            builder = builder.add_ca_file(ca)?;
        }
        if args.insecure {
            builder = builder.danger_accept_invalid_certs();
        }
        Some(builder.build()?)
    } else {
        None
    };
    let sources: Vec<IpAddr> = if args.sources.is_empty() {
        vec![if addr.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        }]
    } else {
        args.sources.clone()
    };
    let rss_before = args.server_pid.and_then(rss_kib);
    let server_pid = args.server_pid.map(|pid| pid.to_string());
    let release = tidewire::CancellationToken::new();
    let live = Arc::new(Live::default());
    let progress = progress_bar(&args);

    // Open every connection first (bounded concurrency), then start the clock.
    let config = Config {
        max_message_size: args.size.max(1 << 20) * 2,
        max_frame_size: args.size.max(1 << 20) * 2,
        deflate: args.compression.then(DeflateConfig::default),
        ..Config::default()
    };
    let opening = Arc::new(Semaphore::new(256));
    let start_gate = Arc::new(tokio::sync::Notify::new());
    let started_at = Arc::new(std::sync::OnceLock::<(Instant, Instant)>::new());
    let histogram: SharedHistogram = Arc::new(std::sync::Mutex::new(new_histogram()));
    // Plain echo load takes the raw path; compression and a fixed rate use
    // the library client.
    let frames = (!args.idle && !args.compression && args.rate.is_none()).then(|| {
        Arc::new(wire::FrameSet::new(
            args.size,
            (2 * args.in_flight).max(16),
            args.text,
        ))
    });
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        let source = sources[i % sources.len()];
        let (args, config, tls, target) =
            (args.clone(), config.clone(), tls.clone(), target.clone());
        let histogram = histogram.clone();
        let (opening, live, gate, started_at) = (
            opening.clone(),
            live.clone(),
            start_gate.clone(),
            started_at.clone(),
        );
        let frames = frames.clone();
        let release = release.clone();
        tasks.spawn(async move {
            let permit = opening.acquire_owned().await.expect("semaphore open");
            if let Some(frames) = frames {
                // The hot path: raw frames (see wire.rs).
                let opened = open_raw(&args.url, addr, source, &target, tls).await;
                drop(permit);
                let (mut stream, leftover) = opened?;
                let notified = gate.notified();
                live.open.fetch_add(1, Ordering::Relaxed);
                notified.await;
                let (_, deadline) = *started_at.get().expect("clock started");
                return Ok(echo_raw(
                    &mut stream,
                    &leftover,
                    &frames,
                    &args,
                    deadline,
                    &live,
                    &histogram,
                )
                .await);
            }
            let ws = open(&args.url, addr, source, &target, config, tls).await;
            drop(permit);
            let ws = match ws {
                Ok(ws) => ws,
                Err(e) => {
                    live.open.fetch_add(0, Ordering::Relaxed);
                    return Err(e);
                }
            };
            let notified = gate.notified();
            live.open.fetch_add(1, Ordering::Relaxed);
            notified.await;
            let (_, deadline) = *started_at.get().expect("clock started");
            Ok(if args.idle {
                hold(ws, args.warm.then_some(args.size), release).await
            } else {
                echo(ws, &args, deadline, &live, &histogram).await
            })
        });
    }
    let failures = wait_until_standing(
        &mut tasks,
        &live.open,
        args.connections,
        progress.as_ref(),
        ("connecting", "connect", "open"),
        |_| unreachable!("a connection finished before the start"),
    )
    .await;
    let connected = live.open.load(Ordering::Relaxed) as usize;
    let cpu_start = cpu_seconds();
    let server_cpu_start = server_pid.as_deref().and_then(cpu_seconds_of);
    let now = Instant::now();
    started_at
        .set((now, now + args.duration))
        .expect("set once");
    start_gate.notify_waiters();
    let spinning = args.busy_poll.then(busy_poll);

    // Live progress until the deadline.
    if let Some(bar) = &progress {
        let (bar, live, mode) = (
            bar.clone(),
            live.clone(),
            if args.idle { "idle" } else { "echo" },
        );
        let total = args.duration;
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let echoed = live.echoed.load(Ordering::Relaxed);
                let now = Instant::now();
                let rate = (echoed - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                last = (now, echoed);
                bar.set_message(format!(
                    "{mode}: {} connections, {} echoed, {}/s (of {:?})",
                    live.open.load(Ordering::Relaxed),
                    echoed,
                    human(rate),
                    total
                ));
            }
        });
    }

    // Read CPU time and server memory at the deadline, before any
    // connection closes; then let the idle connections go.
    tokio::time::sleep_until(tokio::time::Instant::from_std(now + args.duration)).await;
    let generator_cpu_seconds = cpu_seconds() - cpu_start;
    let server_cpu_seconds = server_cpu_start
        .zip(server_pid.as_deref().and_then(cpu_seconds_of))
        .map(|(start, end)| end - start);
    let rss_after = args.server_pid.and_then(rss_kib);
    release.cancel();
    if let Some(spinning) = spinning {
        spinning.abort();
    }

    let mut echoed = 0;
    let mut errors = failures;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(outcome)) => {
                let mut samples = outcome.samples;
                merge(&histogram, &mut samples);
                echoed += outcome.echoed;
                for (k, v) in outcome.errors {
                    *errors.entry(k).or_default() += v;
                }
            }
            Ok(Err(e)) => *errors.entry(format!("connect: {e:#}")).or_default() += 1,
            Err(e) => *errors.entry(format!("task: {e}")).or_default() += 1,
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let (t0, _) = *started_at.get().expect("clock started");
    let seconds = t0
        .elapsed()
        .as_secs_f64()
        .min(args.duration.as_secs_f64() + 1.0);
    let seconds = seconds.max(args.duration.as_secs_f64()).max(1e-9);
    let histogram = histogram.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(Report {
        url: args.url.clone(),
        mode: if args.idle { "idle" } else { "echo" },
        connections: args.connections,
        connected,
        size: args.size,
        in_flight: args.in_flight,
        text: args.text,
        compression: args.compression,
        seconds: args.duration.as_secs_f64(),
        messages: echoed,
        messages_per_sec: echoed as f64 / seconds,
        bytes_per_sec: echoed as f64 * args.size as f64 / seconds,
        latency: Latency::of(&histogram),
        errors,
        server_rss_kib_before: rss_before,
        server_rss_kib_after: rss_after,
        server_kib_per_connection: match (rss_before, rss_after, args.idle) {
            (Some(b), Some(a), true) if connected > 0 => {
                Some((a as f64 - b as f64) / connected as f64)
            }
            _ => None,
        },
        generator_cpu_seconds,
        server_cpu_seconds,
    })
}

/// Keeps the runtime from parking in epoll_wait until the returned handle
/// aborts it: a task that always yields makes every turn of the scheduler
/// poll the sockets without sleeping, so server writes find the generator
/// awake (`--busy-poll`).
fn busy_poll() -> tokio::task::AbortHandle {
    tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    })
    .abort_handle()
}

type Stream = Box<dyn AsyncReadWrite>;
trait AsyncReadWrite: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncReadWrite for T {}

async fn open(
    url: &str,
    addr: SocketAddr,
    source: IpAddr,
    target: &Target,
    config: Config,
    tls: Option<TlsConnector>,
) -> anyhow::Result<WebSocket<Stream>> {
    let stream = connect_transport(addr, source, target, tls).await?;
    let (ws, _) = ClientBuilder::new(url)
        .config(config)
        .connect_on(stream)
        .await?;
    Ok(ws)
}

/// Opens a connection and completes the handshake without the library's
/// WebSocket; returns the transport and any bytes read past the response.
async fn open_raw(
    url: &str,
    addr: SocketAddr,
    source: IpAddr,
    target: &Target,
    tls: Option<TlsConnector>,
) -> anyhow::Result<(Stream, Vec<u8>)> {
    use tidewire::proto::handshake::{parse_response, ClientHandshake};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const MAX_RESPONSE: usize = 16 * 1024;
    let mut stream = connect_transport(addr, source, target, tls).await?;
    let (client, request) = ClientHandshake::new(
        url,
        &tidewire::http::HeaderMap::new(),
        &[],
        Config::default(),
    )?;
    let handshake = async {
        stream.write_all(&request).await?;
        stream.flush().await?;
        let mut buf = Vec::with_capacity(1024);
        loop {
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("the server closed the connection during the handshake");
            }
            if let Some((response, len)) = parse_response(&buf, MAX_RESPONSE)? {
                client.finish(response)?;
                return Ok(buf.split_off(len));
            }
        }
    };
    let leftover = tokio::time::timeout(Duration::from_secs(10), handshake)
        .await
        .context("handshake timed out")??;
    Ok((stream, leftover))
}

async fn connect_transport(
    addr: SocketAddr,
    source: IpAddr,
    target: &Target,
    tls: Option<TlsConnector>,
) -> anyhow::Result<Stream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if !source.is_unspecified() {
        socket
            .bind(SocketAddr::new(source, 0))
            .with_context(|| format!("bind {source}"))?;
    }
    let tcp = socket
        .connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    Ok(match tls {
        Some(tls) => Box::new(tls.connect(&target.host, tcp).await?),
        None => Box::new(tcp),
    })
}

/// Echo load on the raw path: see [`wire::pipeline`].
async fn echo_raw(
    stream: &mut Stream,
    leftover: &[u8],
    frames: &wire::FrameSet,
    args: &BenchArgs,
    deadline: Instant,
    live: &Live,
    histogram: &SharedHistogram,
) -> Outcome {
    let mut samples = Vec::with_capacity(SAMPLE_BATCH);
    let run = wire::pipeline(
        stream,
        leftover,
        frames,
        args.in_flight,
        deadline,
        |micros| {
            samples.push(micros);
            if samples.len() >= SAMPLE_BATCH {
                live.echoed
                    .fetch_add(samples.len() as u64, Ordering::Relaxed);
                merge(histogram, &mut samples);
            }
        },
    )
    .await;
    live.echoed
        .fetch_add(samples.len() as u64, Ordering::Relaxed);
    let mut errors = BTreeMap::new();
    if let Some(stop) = run.stop {
        errors.insert(stop.kind(), 1);
    }
    if let Some(e) = run.io_error {
        errors.insert(format!("io: {:?}", e.kind()), 1);
    }
    Outcome {
        samples,
        echoed: run.echoed,
        errors,
    }
}

/// Builds payloads: message `seq` is its number in decimal and a dash,
/// over a fixed ASCII pattern of `size` bytes (so text messages are valid
/// too, and every echo can be checked byte for byte).
struct Payloads {
    template: Vec<u8>,
}

impl Payloads {
    fn new(size: usize) -> Payloads {
        Payloads {
            template: (0..size).map(|i| b'a' + (i % 26) as u8).collect(),
        }
    }

    fn make(&self, seq: u64) -> Bytes {
        let mut buf = bytes::BytesMut::from(&self.template[..]);
        let mut digits = [0u8; 21];
        let mut at = digits.len() - 1;
        digits[at] = b'-';
        let mut n = seq;
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let prefix = &digits[at..];
        let k = prefix.len().min(buf.len());
        buf[..k].copy_from_slice(&prefix[..k]);
        buf.freeze()
    }
}

async fn echo(
    mut ws: WebSocket<Stream>,
    args: &BenchArgs,
    deadline: Instant,
    live: &Live,
    histogram: &SharedHistogram,
) -> Outcome {
    let mut outcome = Outcome {
        samples: Vec::with_capacity(SAMPLE_BATCH),
        echoed: 0,
        errors: BTreeMap::new(),
    };
    let per_connection_interval = args
        .rate
        .map(|rate| Duration::from_secs_f64(args.connections as f64 / rate.max(1e-9)));
    let mut next_send = Instant::now();
    let mut in_flight: VecDeque<(Bytes, Instant)> = VecDeque::with_capacity(args.in_flight);
    let payloads = Payloads::new(args.size);
    let mut seq = 0u64;
    let deadline_tokio = tokio::time::Instant::from_std(deadline);
    'run: loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let mut fed = false;
        while in_flight.len() < args.in_flight {
            if let Some(interval) = per_connection_interval {
                if now < next_send {
                    break;
                }
                next_send += interval;
            }
            let data = payloads.make(seq);
            seq += 1;
            let message = if args.text {
                Message::Text(tidewire::Utf8Text::try_from(data.clone()).expect("ASCII payload"))
            } else {
                Message::Binary(data.clone())
            };
            if let Err(e) = ws.feed(message) {
                *outcome.errors.entry(error_kind(&e)).or_default() += 1;
                break 'run;
            }
            in_flight.push_back((data, Instant::now()));
            fed = true;
        }
        if fed {
            if let Err(e) = ws.flush().await {
                *outcome.errors.entry(error_kind(&e)).or_default() += 1;
                break;
            }
        }
        if in_flight.is_empty() {
            // Rate-limited and nothing to wait for: sleep until the next send.
            tokio::time::sleep_until(tokio::time::Instant::from_std(next_send).min(deadline_tokio))
                .await;
            continue;
        }
        let first = match tokio::time::timeout_at(deadline_tokio, ws.recv()).await {
            Ok(m) => m,
            Err(_) => break,
        };
        let mut next = Some(first);
        while let Some(received) = next.take() {
            match received {
                None => {
                    *outcome.errors.entry("closed by server".into()).or_default() += 1;
                    break 'run;
                }
                Some(Err(e)) => {
                    *outcome.errors.entry(error_kind(&e)).or_default() += 1;
                    break 'run;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    *outcome
                        .errors
                        .entry(format!("closed by server: {frame:?}"))
                        .or_default() += 1;
                    break 'run;
                }
                Some(Ok(message)) => {
                    let Some((sent, at)) = in_flight.pop_front() else {
                        *outcome
                            .errors
                            .entry("unexpected message".into())
                            .or_default() += 1;
                        break 'run;
                    };
                    let right_type = matches!(message, Message::Text(_)) == args.text;
                    if !right_type || message.as_bytes() != &sent[..] {
                        *outcome.errors.entry("echo mismatch".into()).or_default() += 1;
                        break 'run;
                    }
                    let micros = at.elapsed().as_micros().max(1) as u64;
                    outcome.samples.push(micros);
                    if outcome.samples.len() >= SAMPLE_BATCH {
                        merge(histogram, &mut outcome.samples);
                    }
                    outcome.echoed += 1;
                    live.echoed.fetch_add(1, Ordering::Relaxed);
                }
            }
            // Take whatever else is already buffered without waiting (only
            // when more echoes are due: an empty poll costs a syscall).
            if !in_flight.is_empty() {
                next = ws.recv().now_or_never();
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(1000u16, "")).await;
    outcome
}

async fn hold(
    mut ws: WebSocket<Stream>,
    warm: Option<usize>,
    release: tidewire::CancellationToken,
) -> Outcome {
    let mut outcome = Outcome {
        samples: Vec::new(),
        echoed: 0,
        errors: BTreeMap::new(),
    };
    if let Some(size) = warm {
        let sent = Payloads::new(size).make(0);
        let echoed = async {
            ws.send(Message::Binary(sent.clone())).await?;
            loop {
                match ws.recv().await {
                    Some(Ok(Message::Binary(b))) => return Ok(b == sent),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(_)) | None => return Ok(false),
                    Some(Err(e)) => return Err(e),
                }
            }
        };
        match echoed.await {
            Ok(true) => outcome.echoed = 1,
            Ok(false) => {
                *outcome.errors.entry("echo mismatch".into()).or_default() += 1;
                return outcome;
            }
            Err(e) => {
                *outcome.errors.entry(error_kind(&e)).or_default() += 1;
                return outcome;
            }
        }
    }
    // recv answers pings; anything ending the connection early is an error.
    let ended = async {
        loop {
            match ws.recv().await {
                Some(Ok(Message::Close(f))) => return format!("closed by server: {f:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return error_kind(&e),
                None => return "closed by server".into(),
            }
        }
    };
    tokio::select! {
        kind = ended => *outcome.errors.entry(kind).or_default() += 1,
        _ = release.cancelled() => {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(1000u16, "")).await;
    outcome
}

fn human(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.2}G", v / 1e9),
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn print_report(r: &Report) {
    let kind = if r.text { "text" } else { "binary" };
    println!(
        "tidewire bench {}: {} — {} connections ({} open), {} B {kind}, {} in flight, {:.0} s{}",
        r.mode,
        r.url,
        r.connections,
        r.connected,
        r.size,
        r.in_flight,
        r.seconds,
        if r.compression {
            ", permessage-deflate"
        } else {
            ""
        }
    );
    if r.mode == "echo" {
        println!(
            "  messages   {} echoed, {} msg/s",
            r.messages,
            human(r.messages_per_sec)
        );
        println!(
            "  payload    {}B/s each way ({:.3} GiB/s)",
            human(r.bytes_per_sec),
            r.bytes_per_sec / (1u64 << 30) as f64
        );
        let l = &r.latency;
        println!(
            "  latency    p50 {} µs, p90 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
        );
    } else {
        let errors: u64 = r.errors.values().sum();
        println!(
            "  held       {} of {} connections stood for the whole run",
            r.connected as u64 - errors.min(r.connected as u64),
            r.connections
        );
    }
    if let (Some(b), Some(a)) = (r.server_rss_kib_before, r.server_rss_kib_after) {
        print!("  server RSS {b} KiB before, {a} KiB after");
        match r.server_kib_per_connection {
            Some(per) => println!(", {per:.2} KiB per connection"),
            None => println!(),
        }
    }
    print_cpu_and_errors(
        r.seconds,
        r.generator_cpu_seconds,
        r.server_cpu_seconds,
        &r.errors,
    );
}

/// The last lines of a report, the same in every mode: who used how much
/// CPU (the bottleneck is the side near 100 %), and the errors by kind.
fn print_cpu_and_errors(
    seconds: f64,
    generator_cpu_seconds: f64,
    server_cpu_seconds: Option<f64>,
    errors: &BTreeMap<String, u64>,
) {
    println!(
        "  generator  {:.2} s of CPU ({:.0}% of one core)",
        generator_cpu_seconds,
        100.0 * generator_cpu_seconds / seconds
    );
    if let Some(server) = server_cpu_seconds {
        println!(
            "  server     {:.2} s of CPU ({:.0}% of one core)",
            server,
            100.0 * server / seconds
        );
    }
    if errors.is_empty() {
        println!("  errors     none");
    } else {
        for (kind, n) in errors {
            println!("  error      {n} × {kind}");
        }
    }
}
