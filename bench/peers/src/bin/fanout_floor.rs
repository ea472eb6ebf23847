//! fanout_floor: the floor of the fan-out benchmark (`bench/run-fanout
//! --servers floor`). A broadcast server that does nothing but the writes:
//! one thread, mio (epoll) without a runtime, every message framed once and
//! the same bytes written to every other client with one `write` each, in
//! slot order (accept order until a closed connection's slot is reused).
//! What a round of 10,000 writes costs here is the lower bound of any
//! server's fan-out round on this machine and kernel.
//!
//! It speaks the protocol of `bench/node/fanout_ws.js` (the generator's
//! `--protocol ws-broadcast`): every text or binary message a client sends
//! goes to every other open client; ping gets pong; close gets close, then
//! the connection is dropped.
//!
//! ```text
//! fanout_floor --port P        binds 127.0.0.1:P
//! ```
//!
//! There is no signal handler (no libc, no signal-hook: SIGTERM ends it
//! without a last word), so while rounds happen it prints on stderr, at most
//! once a second and when a client leaves, a line covering every round since
//! it started; the last one is the run's:
//!
//! ```text
//! fanout_floor: rounds N, clients C, writes W, queued Q, round ms p50/p99/max A/B/M
//! ```
//!
//! C is the last round's recipients; W the `write` calls made in rounds; Q
//! the deliveries that did not leave in their round's `write` (the socket
//! was full, or output was already pending) and were left in the
//! connection's pending buffer. A round's time is from before its first
//! write to after its last; a round in which a write failed (a client had
//! gone, as after the generator's exit) is not counted. Not a WebSocket
//! server for anything else: no UTF-8 check, no limits beyond a message
//! size cap.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};
use tidewire_bench_peers::{
    frame_header, port_arg, push_length, switching_protocols, unmask, websocket_key,
};

const LISTENER: Token = Token(usize::MAX);
const MAX_HEAD: usize = 8192;
const MAX_MESSAGE: u64 = 16 << 20;
const REPORT_EVERY: Duration = Duration::from_secs(1);

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xa;

#[derive(PartialEq, Eq)]
enum State {
    Handshake,
    Open,
    /// A write failed during a round: closed once the round is over.
    Doomed,
}

/// What became of one `send`.
enum Sent {
    /// One `write` took it all.
    Whole,
    /// One `write` took part or none of it; the rest is pending.
    Part,
    /// Appended behind pending output, no `write`: bytes keep their order.
    Behind,
    Failed,
}

struct Conn {
    stream: TcpStream,
    state: State,
    /// A partial request head or frame; empty (no allocation) between
    /// frames, so that an idle connection holds no buffer.
    input: Vec<u8>,
    /// Output the socket has not taken, from `sent` on.
    pending: Vec<u8>,
    sent: usize,
    /// WRITABLE is registered: only while output is pending, so that a
    /// connection with nothing to write is never woken for room.
    writable: bool,
    /// A fragmented message being assembled: its opcode and payload so far.
    fragments: Option<(u8, Vec<u8>)>,
    /// In `Server::again`: its socket may hold more input.
    again: bool,
}

impl Conn {
    /// Writes `bytes` after whatever is pending, with at most one `write`.
    fn send(&mut self, registry: &Registry, token: Token, bytes: &[u8]) -> Sent {
        if self.sent < self.pending.len() {
            self.pending.extend_from_slice(bytes);
            return Sent::Behind;
        }
        let n = loop {
            match self.stream.write(bytes) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 0,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Sent::Failed,
            }
        };
        if n == bytes.len() {
            return Sent::Whole;
        }
        self.pending.clear();
        self.sent = 0;
        self.pending.extend_from_slice(&bytes[n..]);
        if !self.writable {
            let both = Interest::READABLE | Interest::WRITABLE;
            if registry.reregister(&mut self.stream, token, both).is_err() {
                return Sent::Failed;
            }
            self.writable = true;
        }
        Sent::Part
    }

    /// Writes pending output until it is all gone or the socket is full.
    fn flush(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        while self.sent < self.pending.len() {
            match self.stream.write(&self.pending[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // A slow subscriber's backlog can be large: give the memory back.
        self.pending = Vec::new();
        self.sent = 0;
        if self.writable {
            registry.reregister(&mut self.stream, token, Interest::READABLE)?;
            self.writable = false;
        }
        Ok(())
    }
}

/// Every round's time since the start, and what was last reported.
struct Rounds {
    times: Vec<Duration>,
    writes: u64,
    queued: u64,
    clients: usize,
    reported: usize,
    last_report: Instant,
}

impl Rounds {
    /// How long the loop may sleep before a report is due.
    fn timeout(&self) -> Option<Duration> {
        (self.times.len() > self.reported)
            .then(|| REPORT_EVERY.saturating_sub(self.last_report.elapsed()))
    }

    fn report(&mut self, now: bool) {
        if self.times.len() == self.reported || !(now || self.last_report.elapsed() >= REPORT_EVERY)
        {
            return;
        }
        let mut sorted = self.times.clone();
        sorted.sort_unstable();
        // Nearest rank.
        let at = |p: usize| sorted[(sorted.len() * p).div_ceil(100).max(1) - 1];
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        eprintln!(
            "fanout_floor: rounds {}, clients {}, writes {}, queued {}, \
             round ms p50/p99/max {:.3}/{:.3}/{:.3}",
            sorted.len(),
            self.clients,
            self.writes,
            self.queued,
            ms(at(50)),
            ms(at(99)),
            ms(at(100)),
        );
        self.reported = self.times.len();
        self.last_report = Instant::now();
    }
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    /// The slab: a connection's token is its index.
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Shared by every connection's reads: what a read leaves unparsed is
    /// copied to the connection's own `input`.
    read_buf: Vec<u8>,
    /// The broadcast frame, built once per message.
    frame: Vec<u8>,
    /// Connections read once since their socket was last found empty. One
    /// read per connection per turn of the loop: a publisher faster than
    /// the rounds would otherwise keep the loop in its read forever, and
    /// no pending output would be flushed meanwhile.
    again: Vec<usize>,
    doomed: Vec<usize>,
    rounds: Rounds,
}

impl Server {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if self.again.is_empty() {
                self.rounds.timeout()
            } else {
                Some(Duration::ZERO)
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    Token(i) => {
                        if event.is_writable() {
                            self.on_writable(i);
                        }
                        let readable =
                            event.is_readable() || event.is_read_closed() || event.is_error();
                        let queued = self.conns.get(i).and_then(Option::as_ref).map(|c| c.again);
                        if readable && queued == Some(false) {
                            self.on_readable(i);
                        }
                    }
                }
            }
            for i in std::mem::take(&mut self.again) {
                if let Some(conn) = self.conns[i].as_mut() {
                    conn.again = false;
                    self.on_readable(i);
                }
            }
            self.rounds.report(false);
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    // Each delivery is one small frame: Nagle would hold it.
                    let _ = stream.set_nodelay(true);
                    let i = self.free.pop().unwrap_or_else(|| {
                        self.conns.push(None);
                        self.conns.len() - 1
                    });
                    let registry = self.poll.registry();
                    if let Err(e) = registry.register(&mut stream, Token(i), Interest::READABLE) {
                        eprintln!("fanout_floor: register: {e}");
                        self.free.push(i);
                        continue;
                    }
                    self.conns[i] = Some(Conn {
                        stream,
                        state: State::Handshake,
                        input: Vec::new(),
                        pending: Vec::new(),
                        sent: 0,
                        writable: false,
                        fragments: None,
                        again: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors, say: the next connection retries.
                    eprintln!("fanout_floor: accept: {e}");
                    return;
                }
            }
        }
    }

    fn close(&mut self, i: usize) {
        // Dropping the stream closes its descriptor, which takes it out of
        // the epoll set.
        if self.conns[i].take().is_some() {
            self.free.push(i);
            // The generator closes every connection when it is done, just
            // before it exits and the script stops this server.
            self.rounds.report(true);
        }
    }

    fn on_writable(&mut self, i: usize) {
        let registry = self.poll.registry();
        let Some(conn) = self.conns[i].as_mut() else {
            return;
        };
        if conn.flush(registry, Token(i)).is_err() {
            self.close(i);
        }
    }

    /// One read, and every message it completes. Edge-triggered: until a
    /// read finds the socket empty, the connection is read again next turn.
    fn on_readable(&mut self, i: usize) {
        let Some(conn) = self.conns[i].as_mut() else {
            return;
        };
        let n = loop {
            match conn.stream.read(&mut self.read_buf) {
                Ok(0) => return self.close(i),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(i),
            }
        };
        // Parse in the shared buffer unless a partial frame waits in
        // the connection's own; both are taken out so that parsing can
        // borrow the server.
        let mut input = std::mem::take(&mut conn.input);
        let mut shared = std::mem::take(&mut self.read_buf);
        let parsed = if input.is_empty() {
            let parsed = self.parse(i, &mut shared[..n]);
            if let Ok(used) = parsed {
                input.extend_from_slice(&shared[used..n]);
            }
            parsed
        } else {
            input.extend_from_slice(&shared[..n]);
            let parsed = self.parse(i, &mut input);
            if let Ok(used) = parsed {
                input.drain(..used);
                if input.is_empty() {
                    input = Vec::new();
                }
            }
            parsed
        };
        self.read_buf = shared;
        for j in std::mem::take(&mut self.doomed) {
            self.close(j);
        }
        match (parsed, self.conns[i].as_mut()) {
            (Ok(_), Some(conn)) => {
                conn.input = input;
                if !conn.again {
                    conn.again = true;
                    self.again.push(i);
                }
            }
            _ => self.close(i),
        }
    }

    /// Handles the request head and every complete frame at the start of
    /// `data` (unmasking them in place); the bytes used, or `Err` when the
    /// connection is to be dropped.
    fn parse(&mut self, i: usize, data: &mut [u8]) -> Result<usize, ()> {
        let mut pos = 0;
        let conn = self.conns[i].as_mut().ok_or(())?;
        if conn.state == State::Handshake {
            let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                return if data.len() > MAX_HEAD {
                    Err(())
                } else {
                    Ok(0)
                };
            };
            let Some(key) = websocket_key(&data[..end]) else {
                let _ = conn
                    .stream
                    .write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
                return Err(());
            };
            let response = switching_protocols(key);
            if let Sent::Failed = conn.send(self.poll.registry(), Token(i), response.as_bytes()) {
                return Err(());
            }
            conn.state = State::Open;
            pos = end + 4;
        }
        while let Some(header) = frame_header(&data[pos..]) {
            // Clients must mask (RFC 6455 §5.1).
            let mask = header.mask.ok_or(())?;
            if header.payload_len > MAX_MESSAGE {
                return Err(());
            }
            let start = pos + header.header_len;
            let end = start + header.payload_len as usize;
            if end > data.len() {
                break;
            }
            pos = end;
            let payload = &mut data[start..end];
            unmask(payload, mask);
            let conn = self.conns[i].as_mut().ok_or(())?;
            match header.opcode {
                TEXT | BINARY if conn.fragments.is_none() => {
                    if header.fin {
                        self.broadcast(i, header.opcode, payload);
                    } else {
                        conn.fragments = Some((header.opcode, payload.to_vec()));
                    }
                }
                CONTINUATION => {
                    let (_, message) = conn.fragments.as_mut().ok_or(())?;
                    if message.len() as u64 + header.payload_len > MAX_MESSAGE {
                        return Err(());
                    }
                    message.extend_from_slice(payload);
                    if header.fin {
                        let (opcode, message) = conn.fragments.take().ok_or(())?;
                        self.broadcast(i, opcode, &message);
                    }
                }
                PING => self.reply(i, PONG, payload)?,
                PONG => {}
                CLOSE => {
                    // Back with the status code only, then drop: the
                    // client said it is done.
                    let code = &payload[..payload.len().min(2)];
                    self.reply(i, CLOSE, code)?;
                    return Err(());
                }
                _ => return Err(()),
            }
        }
        Ok(pos)
    }

    /// Sends one control frame to connection `i`.
    fn reply(&mut self, i: usize, opcode: u8, payload: &[u8]) -> Result<(), ()> {
        let mut frame = vec![0x80 | opcode];
        push_length(&mut frame, 0, payload.len());
        frame.extend_from_slice(payload);
        let conn = self.conns[i].as_mut().ok_or(())?;
        match conn.send(self.poll.registry(), Token(i), &frame) {
            Sent::Failed => Err(()),
            _ => Ok(()),
        }
    }

    /// One round: the message framed once, then one `send` per other open
    /// connection, nothing else in the loop.
    fn broadcast(&mut self, sender: usize, opcode: u8, payload: &[u8]) {
        self.frame.clear();
        self.frame.push(0x80 | opcode);
        push_length(&mut self.frame, 0, payload.len());
        self.frame.extend_from_slice(payload);
        let registry = self.poll.registry();
        let (mut clients, mut writes, mut queued, mut failed) = (0, 0, 0, false);
        let start = Instant::now();
        for (j, slot) in self.conns.iter_mut().enumerate() {
            let Some(conn) = slot else { continue };
            if j == sender || conn.state != State::Open {
                continue;
            }
            clients += 1;
            match conn.send(registry, Token(j), &self.frame) {
                Sent::Whole => writes += 1,
                Sent::Part => {
                    writes += 1;
                    queued += 1;
                }
                Sent::Behind => queued += 1,
                Sent::Failed => {
                    failed = true;
                    conn.state = State::Doomed;
                    self.doomed.push(j);
                }
            }
        }
        let elapsed = start.elapsed();
        // A write fails when a client has gone: after the generator's
        // exit, say, which is no round of the run.
        if clients > 0 && !failed {
            let rounds = &mut self.rounds;
            rounds.times.push(elapsed);
            rounds.writes += writes;
            rounds.queued += queued;
            rounds.clients = clients;
        }
        // Rounds can keep the loop from polling for longer than a report's
        // interval when they cannot keep up.
        self.rounds.report(false);
    }
}

fn main() -> io::Result<()> {
    let port = port_arg();
    let poll = Poll::new()?;
    let mut listener = TcpListener::bind(([127, 0, 0, 1], port).into())?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let port = listener.local_addr()?.port();
    println!("fanout_floor listening on ws://127.0.0.1:{port}/");
    let mut server = Server {
        poll,
        listener,
        conns: Vec::new(),
        free: Vec::new(),
        read_buf: vec![0; 64 << 10],
        frame: Vec::new(),
        doomed: Vec::new(),
        again: Vec::new(),
        rounds: Rounds {
            times: Vec::new(),
            writes: 0,
            queued: 0,
            clients: 0,
            reported: 0,
            last_report: Instant::now(),
        },
    };
    server.run()
}
