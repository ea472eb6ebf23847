//! epoll_generator: the machine's ceiling, independent of tidewire.
//!
//! A second echo load generator, as small as one can be: one thread, mio
//! (epoll) without an async runtime, pre-masked frames written with one
//! `write` per refill, every echo checked byte for byte against what was
//! sent (one `memcmp` per read), no latency clock. Paired with `sink_echo` it shows what this
//! kernel's loopback allows a server that does nothing; paired with the real
//! servers it measures them without `tidewire bench` in the loop.
//!
//! It speaks `tidewire bench`'s flags and `--json` report for plain echo
//! runs (`bench/run --generator epoll`):
//!
//! ```text
//! epoll_generator ws://127.0.0.1:PORT/ -c CONNS -s SIZE -p IN_FLIGHT -d SECONDSs [--busy-poll] [--json] [--quiet]
//! ```
//!
//! Every echo must be one unfragmented binary frame with the payload sent
//! (what every echo server here does): anything else is counted as a
//! "wrong echo" error, and the connection's echoes stop counting.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream as StdStream;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use tidewire_bench_peers::push_length;

struct Args {
    host_port: String,
    connections: usize,
    size: usize,
    in_flight: usize,
    seconds: f64,
    busy_poll: bool,
    json: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: epoll_generator ws://HOST:PORT/ -c CONNS -s SIZE -p IN_FLIGHT -d SECONDS[s] \
         [--busy-poll] [--json] [--quiet]"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args = Args {
        host_port: String::new(),
        connections: 100,
        size: 16,
        in_flight: 1,
        seconds: 10.0,
        busy_poll: false,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "-c" => args.connections = value().parse().unwrap_or_else(|_| usage()),
            "-s" => args.size = value().parse().unwrap_or_else(|_| usage()),
            "-p" => args.in_flight = value().parse().unwrap_or_else(|_| usage()),
            "-d" => {
                args.seconds = value()
                    .trim_end_matches('s')
                    .parse()
                    .unwrap_or_else(|_| usage())
            }
            "--busy-poll" => args.busy_poll = true,
            "--json" => args.json = true,
            "--quiet" => {}
            url if url.starts_with("ws://") => {
                args.host_port = url["ws://".len()..].trim_end_matches('/').to_string();
            }
            _ => usage(),
        }
    }
    if args.host_port.is_empty() || args.connections == 0 || args.in_flight == 0 {
        usage();
    }
    args
}

/// The payload of every frame: letters, so that a shifted or mixed-up
/// echo shows.
fn payload_byte(j: usize) -> u8 {
    b'a' + (j % 26) as u8
}

/// `in_flight` masked binary frames of `size` bytes, back to back.
fn client_frames(size: usize, in_flight: usize) -> Vec<u8> {
    let mut frames = Vec::new();
    let key = [0x37, 0xfa, 0x21, 0x3d];
    for _ in 0..in_flight {
        frames.push(0x82);
        push_length(&mut frames, 0x80, size);
        frames.extend_from_slice(&key);
        frames.extend((0..size).map(|j| payload_byte(j) ^ key[j % 4]));
    }
    frames
}

/// The server's echoes of frames, unmasked, back to back: at least `len`
/// bytes of them past any start within an echo, so that a read (at most
/// `len`) is compared in one go.
fn expected_echoes(size: usize, len: usize) -> Vec<u8> {
    let mut one = vec![0x82];
    push_length(&mut one, 0, size);
    one.extend((0..size).map(payload_byte));
    let mut all = Vec::with_capacity(len + 2 * one.len());
    while all.len() < len + one.len() {
        all.extend_from_slice(&one);
    }
    all
}

/// The length of the server's unmasked echo of one frame.
fn echo_len(size: usize) -> usize {
    size + match size {
        0..=125 => 2,
        126..=0xffff => 4,
        _ => 10,
    }
}

/// Opens a connection and completes the opening handshake, blocking.
fn open(host_port: &str) -> io::Result<TcpStream> {
    let stream = StdStream::connect(host_port)?;
    stream.set_nodelay(true)?;
    (&stream).write_all(
        format!(
            "GET / HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )?;
    // Read the response head byte by byte, so nothing after it is consumed.
    let mut reader = BufReader::with_capacity(1, &stream);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 101") {
        return Err(io::Error::other(format!(
            "handshake: {}",
            status.trim_end()
        )));
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
    }
    stream.set_nonblocking(true)?;
    Ok(TcpStream::from_std(stream))
}

struct Conn {
    stream: TcpStream,
    /// Bytes of echoes received, modulo one echo.
    partial: usize,
    /// Frames due to be written, and how much of the first is already out.
    due_frames: usize,
    written: usize,
    echoed: u64,
    /// A byte differed from the echo expected: counting stopped.
    wrong: bool,
}

/// This thread's CPU time so far (the process has one thread).
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns / 1e9)
}

fn main() -> io::Result<()> {
    let args = parse_args();
    let frame = client_frames(args.size, 1).len();
    let frames = client_frames(args.size, args.in_flight);
    let echo = echo_len(args.size);
    let mut poll = Poll::new()?;
    let mut conns = Vec::with_capacity(args.connections);
    let mut errors: Vec<(String, u64)> = Vec::new();
    let mut error = |kind: String| match errors.iter_mut().find(|(k, _)| *k == kind) {
        Some((_, n)) => *n += 1,
        None => errors.push((kind, 1)),
    };
    for _ in 0..args.connections {
        match open(&args.host_port) {
            Ok(mut stream) => {
                poll.registry().register(
                    &mut stream,
                    Token(conns.len()),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                conns.push(Conn {
                    stream,
                    partial: 0,
                    due_frames: args.in_flight,
                    written: 0,
                    echoed: 0,
                    wrong: false,
                });
            }
            Err(e) => error(format!("connect: {e}")),
        }
    }
    let connected = conns.len();
    let mut events = Events::with_capacity(1024);
    let mut input = vec![0u8; 1 << 20];
    let expected = expected_echoes(args.size, input.len());
    let cpu_start = cpu_seconds();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let timeout = if args.busy_poll {
        Some(Duration::ZERO)
    } else {
        Some(Duration::from_millis(50))
    };
    // The first window goes out before the first wait.
    let mut ready: Vec<usize> = (0..connected).collect();
    let mut turns = 0u32;
    'run: loop {
        for &i in &ready {
            let conn = &mut conns[i];
            // Read everything there is, then refill as many frames as echoed.
            loop {
                match conn.stream.read(&mut input) {
                    Ok(0) => {
                        error("closed by server".into());
                        break;
                    }
                    Ok(n) => {
                        if conn.wrong {
                            continue;
                        }
                        if input[..n] != expected[conn.partial..conn.partial + n] {
                            conn.wrong = true;
                            error("wrong echo: not the bytes sent".into());
                            continue;
                        }
                        let bytes = conn.partial + n;
                        let done = bytes / echo;
                        conn.partial = bytes % echo;
                        conn.echoed += done as u64;
                        conn.due_frames += done;
                        if n < input.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        error(format!("io: {e}"));
                        break;
                    }
                }
            }
            while conn.due_frames > 0 {
                // Up to in_flight frames in one write; the first may be
                // partly written already.
                let count = conn.due_frames.min(args.in_flight);
                let bytes = &frames[conn.written..count * frame];
                match conn.stream.write(bytes) {
                    Ok(n) => {
                        let total = conn.written + n;
                        conn.due_frames -= total / frame;
                        conn.written = total % frame;
                        if n < bytes.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        error(format!("io: {e}"));
                        conn.due_frames = 0;
                        break;
                    }
                }
            }
        }
        turns = turns.wrapping_add(1);
        if turns.is_multiple_of(64) && Instant::now() >= deadline {
            break 'run;
        }
        poll.poll(&mut events, timeout)?;
        ready.clear();
        ready.extend(events.iter().map(|event| event.token().0));
        if ready.is_empty() && Instant::now() >= deadline {
            break 'run;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_start;
    let messages: u64 = conns.iter().map(|c| c.echoed).sum();
    let rate = messages as f64 / seconds;
    if args.json {
        let errors = errors
            .iter()
            .map(|(k, n)| format!("{k:?}: {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{{\"generator\": \"epoll_generator\", \"mode\": \"echo\", \"checked\": true, \"connections\": {}, \
             \"connected\": {connected}, \"size\": {}, \"in_flight\": {}, \"seconds\": {seconds}, \
             \"messages\": {messages}, \"messages_per_sec\": {rate}, \"bytes_per_sec\": {}, \
             \"latency\": {{\"p50_us\": null, \"p99_us\": null}}, \"errors\": {{{errors}}}, \
             \"generator_cpu_seconds\": {cpu}}}",
            args.connections,
            args.size,
            args.in_flight,
            rate * args.size as f64,
        );
    } else {
        println!(
            "{messages} echoes in {seconds:.2} s: {rate:.0} msg/s, {:.2} GiB/s, \
             generator CPU {:.0} %, {connected}/{} connected, errors {errors:?}",
            rate * args.size as f64 / (1u64 << 30) as f64,
            cpu / seconds * 100.0,
            args.connections
        );
    }
    Ok(())
}
