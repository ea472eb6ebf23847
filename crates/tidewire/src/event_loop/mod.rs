//! A second server runtime for the hot path: one thread per core, each an
//! epoll loop (mio) over its own `SO_REUSEPORT` listener, every connection
//! plain state in a slab rather than a task. What uWebSockets does, over the
//! same sans-I/O core as the tokio server ([`crate::Server`]).
//!
//! Each ready socket is read into one buffer per thread, its messages are
//! parsed there in place and handed to the [`Handler`] borrowed, in the
//! same pass, and what the handler sent is
//! written with one (vectored) write: no task to wake, no channel, no
//! reactor between the socket and the protocol. An idle connection holds
//! its socket, its protocol state and a few timestamps, and no buffer.
//!
//! Callbacks are synchronous and run on the connection's thread: a
//! handler that must wait for something else (a database, another
//! connection's thread) belongs on the tokio server. Timers (handshake
//! timeout, keepalive pings, idle timeout, the closing handshake's
//! deadline) are checked once a second, so they fire up to a second late.
//! Plain `ws://` only; `wss://` is the tokio server's.
//!
//! ```no_run
//! use tidewire::event_loop::{EventLoopConfig, Handler, Incoming, Socket};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     type State = ();
//!     fn open(&mut self, _: &mut Socket<'_>, _: &tidewire::http::Request<()>) {}
//!     fn message(&mut self, socket: &mut Socket<'_>, _: &mut (), message: Incoming<'_>) {
//!         match message {
//!             Incoming::Text(text) => socket.send_text(text),
//!             Incoming::Binary(data) => socket.send_binary(data),
//!             _ => {}
//!         }
//!     }
//! }
//!
//! let server = tidewire::event_loop::serve(
//!     "127.0.0.1:9001".parse().unwrap(),
//!     EventLoopConfig::default(),
//!     || Echo,
//! )?;
//! server.join()?;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use tidewire_proto::{CloseCode, CloseFrame, Config, Connection, State};

use crate::{Message, OriginPolicy, QueueLimits};

/// A message as a [`Handler`] gets it, borrowed from the bytes just read.
pub use tidewire_proto::EventRef as Incoming;

mod group;
mod remote;
mod sys;
mod worker;

pub use group::Group;
pub use remote::{Remote, Wakes};

/// How an event-loop server runs.
#[derive(Debug, Clone)]
pub struct EventLoopConfig {
    /// Protocol limits and permessage-deflate.
    pub protocol: Config,
    /// Worker threads, each with its own listener on the port (0: one per
    /// CPU this process may run on).
    pub threads: usize,
    /// Deadline for the opening handshake's request head.
    pub handshake_timeout: Duration,
    /// Ping a connection that has sent nothing for this long.
    pub ping_interval: Option<Duration>,
    /// Drop a connection that has not answered a ping within this.
    pub pong_timeout: Duration,
    /// Close (1001) a connection that has sent no message for this long.
    pub idle_timeout: Option<Duration>,
    /// How long to wait for the peer's close frame, or for its end of the
    /// TCP connection, once the closing handshake has started.
    pub close_timeout: Duration,
    /// On shutdown, how long connections get to finish their closing
    /// handshake (1001) before they are dropped.
    pub shutdown_timeout: Duration,
    /// Most open connections (all threads together); beyond, 503.
    pub max_connections: usize,
    /// Most open connections from one IP address (0: no limit); beyond,
    /// 429.
    pub max_connections_per_ip: usize,
    /// Output waiting for a slow reader beyond which its connection is not
    /// read any more until it drains (backpressure through TCP).
    pub max_pending_output: usize,
    /// Browser origins allowed (403 for the others); `None`: any.
    pub origins: Option<OriginPolicy>,
    /// Subprotocols this server speaks, in its order of preference.
    pub protocols: Vec<String>,
}

impl Default for EventLoopConfig {
    fn default() -> Self {
        EventLoopConfig {
            protocol: Config::default(),
            threads: 0,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Some(Duration::from_secs(30)),
            pong_timeout: Duration::from_secs(20),
            idle_timeout: None,
            close_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_connections_per_ip: 0,
            max_pending_output: 4 << 20,
            origins: None,
            protocols: Vec::new(),
        }
    }
}

/// What the application does with connections, one instance per worker
/// thread (from the factory given to [`serve`]).
pub trait Handler: Send + 'static {
    /// What the application keeps per connection.
    type State: 'static;

    /// A WebSocket opened (the handshake is answered).
    fn open(&mut self, socket: &mut Socket<'_>, request: &Request<()>) -> Self::State;

    /// A message arrived (pings come too, already answered; the peer's
    /// close frame too, already answered). It is borrowed from the bytes
    /// just read: copy what must outlive the call.
    fn message(&mut self, socket: &mut Socket<'_>, state: &mut Self::State, message: Incoming<'_>);

    /// A message that came through the connection's buffer (a large or
    /// fragmented or compressed one), owned: override it to keep or send
    /// on its bytes without a copy ([`Socket::send`] queues a large one by
    /// reference). By default, [`message`](Self::message) with it borrowed.
    fn message_owned(
        &mut self,
        socket: &mut Socket<'_>,
        state: &mut Self::State,
        message: Message,
    ) {
        let borrowed = match &message {
            Message::Text(text) => Incoming::Text(text.as_str()),
            Message::Binary(data) => Incoming::Binary(data),
            Message::Ping(data) => Incoming::Ping(data),
            Message::Pong(data) => Incoming::Pong(data),
            Message::Close(frame) => Incoming::Close(frame.as_ref()),
        };
        self.message(socket, state, borrowed);
    }

    /// The connection ended: the peer's close code, ours, or 1006 when it
    /// ended without a closing handshake.
    fn closed(&mut self, state: Self::State, code: CloseCode) {
        let _ = (state, code);
    }

    /// A request that is not a WebSocket upgrade; `None` answers 426.
    fn http(&mut self, request: &Request<()>) -> Option<Response<Bytes>> {
        let _ = request;
        None
    }

    /// Whether a request (an upgrade or not) leaves the event loop for
    /// [`handed_off`](Self::handed_off), before anything is answered: to
    /// serve the rest of an application's HTTP (streamed answers, other
    /// WebSocket paths) with another server on the same port.
    fn hand_off(&mut self, request: &Request<()>) -> bool {
        let _ = request;
        false
    }

    /// A connection [`hand_off`](Self::hand_off) asked for: the socket
    /// (non-blocking, out of the event loop), its request, every byte read
    /// from it so far (the request head, and whatever followed it), to be
    /// read again by its new owner, and its place in the server's
    /// connection count, to be kept as long as the connection lives.
    fn handed_off(
        &mut self,
        stream: std::net::TcpStream,
        request: Request<()>,
        received: Vec<u8>,
        slot: ConnectionSlot,
    ) {
        let _ = (stream, request, received, slot);
    }
}

/// A connection as the handler sees it: what it sends is written once the
/// callback returns (with whatever else is due, in one write).
pub struct Socket<'a> {
    conn: &'a mut Connection,
    remote: &'a mut Option<Arc<remote::RemoteInner>>,
    key: usize,
    inbox: &'a Arc<remote::Inbox>,
}

impl Socket<'_> {
    /// Queues a message (a close message starts the closing handshake).
    /// Nothing happens once the connection is closing.
    pub fn send(&mut self, message: Message) {
        let _ = match message {
            Message::Text(text) => self.conn.send_text_bytes(text),
            Message::Binary(data) => self.conn.send_binary_bytes(data),
            Message::Ping(data) => self.conn.send_ping(&data),
            Message::Pong(data) => self.conn.send_pong(&data),
            Message::Close(frame) => self.conn.send_close(frame),
        };
    }

    /// Queues a text message.
    pub fn send_text(&mut self, text: &str) {
        let _ = self.conn.send_text(text);
    }

    /// Queues a binary message.
    pub fn send_binary(&mut self, data: &[u8]) {
        let _ = self.conn.send_binary(data);
    }

    /// Starts the closing handshake.
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        let reason = reason.get(..reason.len().min(123)).unwrap_or("");
        let _ = self.conn.send_close(Some(CloseFrame::new(code, reason)));
    }

    /// Whether the closing handshake has started (nothing more is sent).
    pub fn is_closing(&self) -> bool {
        self.conn.close_sent() || self.conn.state() != State::Open
    }

    /// Bytes queued and not yet written (a slow reader's backlog).
    pub fn buffered(&self) -> usize {
        self.conn.pending_output_len()
    }

    /// A handle to send to this connection from other threads (or from
    /// another connection's callback), its queue bounded by `limits`; made
    /// on the first call, the same one after (with the first limits).
    pub fn remote(&mut self, limits: QueueLimits) -> Remote {
        let inner = self
            .remote
            .get_or_insert_with(|| remote::RemoteInner::new(self.key, self.inbox.clone(), limits));
        Remote {
            inner: inner.clone(),
        }
    }
}

/// What the worker threads share.
struct Shared {
    shutdown: AtomicBool,
    /// Threads whose WebSockets are not all closed yet, during a shutdown:
    /// every thread keeps its listener until none is left (a listener
    /// closed early resets the connections in its accept queue).
    draining: AtomicUsize,
    connections: AtomicUsize,
    /// Open connections per peer address (only with a per-IP limit).
    per_ip: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

impl Shared {
    /// A connection (counted for its address when `ip` is given) ended.
    fn uncount(&self, ip: Option<std::net::IpAddr>) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
        let Some(ip) = ip else { return };
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }
}

/// A handed-off connection's place in its server's connection count (and
/// its address's, for the per-IP limit), given to its new owner with it:
/// the connection counts toward `max_connections` until this is dropped,
/// wherever it is served.
pub struct ConnectionSlot {
    shared: Arc<Shared>,
    ip: Option<std::net::IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.shared.uncount(self.ip);
    }
}

impl std::fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionSlot").finish_non_exhaustive()
    }
}

/// A running event-loop server.
pub struct EventLoopServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    wakers: Vec<Arc<mio::Waker>>,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl std::fmt::Debug for EventLoopServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoopServer")
            .field("local_addr", &self.local_addr)
            .field("threads", &self.threads.len())
            .finish()
    }
}

/// Binds `addr` (once per worker thread, `SO_REUSEPORT`) and serves it
/// with a handler from `make_handler` on each thread.
///
/// # Errors
/// The address cannot be bound, or a thread cannot start.
pub fn serve<H, F>(
    addr: SocketAddr,
    config: EventLoopConfig,
    make_handler: F,
) -> io::Result<EventLoopServer>
where
    H: Handler,
    F: Fn() -> H,
{
    let threads = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // SO_REUSEPORT would let this server share a port another server of
    // the same user listens on, each getting part of the connections: a
    // plain bind first says "address in use" as any server does, and
    // fixes the port when 0 was asked for; the listeners then share it.
    let free = worker::probe_free(addr)?;
    let first = worker::reuseport_listener(free)?;
    let local_addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..threads {
        listeners.push(worker::reuseport_listener(local_addr)?);
    }
    let shared = Arc::new(Shared {
        shutdown: AtomicBool::new(false),
        draining: AtomicUsize::new(threads),
        connections: AtomicUsize::new(0),
        per_ip: Default::default(),
    });
    let config = Arc::new(config);
    let mut server = EventLoopServer {
        local_addr,
        shared: shared.clone(),
        wakers: Vec::new(),
        threads: Vec::new(),
    };
    for (n, listener) in listeners.into_iter().enumerate() {
        let poll = mio::Poll::new()?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), worker::WAKER)?);
        let handler = make_handler();
        let (config, shared) = (config.clone(), shared.clone());
        let inbox = remote::Inbox::new(waker.clone());
        // Made on its thread: the connections' states never cross threads.
        let thread = std::thread::Builder::new()
            .name(format!("tidewire-loop-{n}"))
            .spawn(move || {
                worker::Worker::new(poll, listener, config, shared, handler, inbox)?.run()
            });
        match thread {
            Ok(thread) => {
                server.wakers.push(waker);
                server.threads.push(thread);
            }
            Err(e) => {
                server.shutdown();
                return Err(e);
            }
        }
    }
    Ok(server)
}

impl EventLoopServer {
    /// The address it listens on (the port chosen, when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Open connections (WebSockets and requests being answered).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Starts a graceful shutdown: every WebSocket gets a close frame
    /// (1001), and the threads end (their listeners close) once those are
    /// closed or the shutdown timeout has passed. Meanwhile the listeners
    /// stay open and every new request that is not handed off, health
    /// checks and upgrades alike, gets 503 "shutting down", as from
    /// [`crate::Server`]: a load balancer takes the server out rather than
    /// seeing connections refused.
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for waker in &self.wakers {
            let _ = waker.wake();
        }
    }

    /// A handle that starts the shutdown from elsewhere (a signal handler's
    /// thread, say).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
            wakers: self.wakers.clone(),
        }
    }

    /// Waits for every thread to end.
    ///
    /// # Errors
    /// The first error a thread ended with (its poll failed).
    pub fn join(self) -> io::Result<()> {
        let mut result = Ok(());
        for thread in self.threads {
            let ended = thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("an event-loop thread panicked")));
            if result.is_ok() {
                result = ended;
            }
        }
        result
    }
}

/// Starts the shutdown of an [`EventLoopServer`] (see
/// [`EventLoopServer::shutdown`]).
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
    wakers: Vec<Arc<mio::Waker>>,
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShutdownHandle")
    }
}

impl ShutdownHandle {
    /// See [`EventLoopServer::shutdown`].
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for waker in &self.wakers {
            let _ = waker.wake();
        }
    }
}
