//! A ready server: the accept loop with every policy a server on the
//! internet needs.
//!
//! [`Server`] owns the listener and, per connection: the connection limits
//! (overall: 503; per IP: 429), TLS, the handshake deadline (slowloris), plain
//! HTTP requests on the same port, the origin allow-list (403), the
//! authentication hook (401/403 with a reason, or an identity attached to the
//! connection), subprotocol choice, and graceful shutdown (1001 to everyone,
//! bounded wait; meanwhile the listener stays open and every new request,
//! health checks and upgrades alike, gets 503 "shutting down"). Counters of
//! all of it are in [`ServerStats`].

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use http::{Extensions, Request, Response, StatusCode};
use tidewire_proto::handshake::{self, http_response, ServerHandshake};
use tidewire_proto::HandshakeError;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, debug_span, info, warn, Instrument};

use crate::policy::{HandshakeRequest, OriginPolicy};
use crate::server::{read_head, Reject};
use crate::stream::MaybeTlsStream;
use crate::{Error, Message, ServerConfig, WebSocket};

/// The transport of a server connection: TCP, with or without TLS.
pub type ServerStream = MaybeTlsStream<TcpStream>;

#[cfg(feature = "hyper")]
mod http_service;
#[cfg(feature = "hyper")]
pub use self::http_service::ConnectionSlot;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The authentication hook: sees the request before the upgrade; returns
/// values to attach to the connection (e.g. the user), or a refusal.
pub type AuthHook =
    Arc<dyn Fn(HandshakeRequest) -> BoxFuture<Result<Extensions, Reject>> + Send + Sync>;

/// Answers plain HTTP requests (anything that is not a WebSocket upgrade).
pub type HttpHandler = Arc<dyn Fn(Request<()>) -> BoxFuture<Response<bytes::Bytes>> + Send + Sync>;

/// An accepted WebSocket connection, handed to the connection handler.
#[derive(Debug)]
pub struct Session {
    /// The connection. Keep calling `recv` until it returns `None`.
    pub ws: WebSocket<ServerStream>,
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The handshake request (method, path, headers).
    pub request: Request<()>,
    /// What the authentication hook attached (e.g. the user identity).
    pub identity: Extensions,
}

/// Counters of a server, for logs and metrics.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted at the TCP level.
    pub tcp_accepted: AtomicU64,
    /// WebSocket connections opened.
    pub opened: AtomicU64,
    /// WebSocket connections closed.
    pub closed: AtomicU64,
    /// Connections open now (TCP, including handshakes in progress).
    pub current: AtomicUsize,
    /// Plain HTTP requests answered.
    pub http_requests: AtomicU64,
    /// Messages and bytes in and out, over all connections.
    pub traffic: Arc<crate::websocket::TrafficCounters>,
    rejections: Mutex<HashMap<&'static str, u64>>,
    closes: Mutex<HashMap<u16, u64>>,
}

impl ServerStats {
    fn reject(&self, reason: &'static str) {
        *self
            .rejections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    fn closed_with(&self, code: u16) {
        *self
            .closes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(code)
            .or_default() += 1;
    }

    /// Refused handshakes by reason (`limit_total`, `limit_ip`, `timeout`,
    /// `bad_request`, `origin`, `auth`, `tls`, `shutting_down`).
    pub fn rejections(&self) -> HashMap<&'static str, u64> {
        self.rejections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Closed connections by close code (1006 for abnormal ends).
    pub fn closes(&self) -> HashMap<u16, u64> {
        self.closes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most simultaneous connections (beyond: 503).
    pub max_connections: usize,
    /// Most simultaneous connections from one IP address (beyond: 429);
    /// 0 for no limit.
    pub max_connections_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_connections_per_ip: 0,
        }
    }
}

/// Builds a [`Server`].
pub struct ServerBuilder {
    config: ServerConfig,
    limits: Limits,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::TlsAcceptor>,
    origins: Option<OriginPolicy>,
    protocols: Vec<String>,
    auth: Option<AuthHook>,
    http: Option<HttpHandler>,
    shutdown_timeout: Duration,
}

/// A WebSocket server with its policies; see the module docs.
pub struct Server {
    shared: Arc<Shared>,
}

struct Shared {
    config: ServerConfig,
    /// `config.io`, shared by every connection rather than copied into each.
    io: Arc<crate::websocket::IoOptions>,
    limits: Limits,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::TlsAcceptor>,
    origins: Option<OriginPolicy>,
    protocols: Vec<String>,
    auth: Option<AuthHook>,
    http: Option<HttpHandler>,
    shutdown_timeout: Duration,
    stats: Arc<ServerStats>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    shutdown: CancellationToken,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        ServerBuilder {
            config: ServerConfig::default(),
            limits: Limits::default(),
            #[cfg(feature = "tls")]
            tls: None,
            origins: None,
            protocols: Vec::new(),
            auth: None,
            http: None,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

impl ServerBuilder {
    /// Protocol limits, deflate, I/O options, handshake timeout.
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Connection limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Serve `wss://`.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, acceptor: crate::tls::TlsAcceptor) -> Self {
        self.tls = Some(acceptor);
        self
    }

    /// Refuse (403) browsers from origins not in the list.
    pub fn origins(mut self, policy: OriginPolicy) -> Self {
        self.origins = Some(policy);
        self
    }

    /// Subprotocols this server speaks, in its order of preference; the
    /// first one the client also offers is chosen.
    pub fn protocols<I: IntoIterator<Item = T>, T: Into<String>>(mut self, protocols: I) -> Self {
        self.protocols = protocols.into_iter().map(Into::into).collect();
        self
    }

    /// The authentication hook (see [`AuthHook`]).
    pub fn authenticate<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(HandshakeRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Extensions, Reject>> + Send + 'static,
    {
        self.auth = Some(Arc::new(move |req| Box::pin(hook(req))));
        self
    }

    /// Answers plain HTTP requests on the same port (health checks, pages).
    /// Without it they get 426 Upgrade Required. During graceful shutdown
    /// it is not called: every request gets 503 "shutting down".
    pub fn http<F, Fut>(mut self, handler: F) -> Self
    where
        F: Fn(Request<()>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<bytes::Bytes>> + Send + 'static,
    {
        self.http = Some(Arc::new(move |req| Box::pin(handler(req))));
        self
    }

    /// How long graceful shutdown waits for closing handshakes.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// The server.
    pub fn build(self) -> Server {
        Server {
            shared: Arc::new(Shared {
                io: Arc::new(self.config.io.clone()),
                config: self.config,
                limits: self.limits,
                #[cfg(feature = "tls")]
                tls: self.tls,
                origins: self.origins,
                protocols: self.protocols,
                auth: self.auth,
                http: self.http,
                shutdown_timeout: self.shutdown_timeout,
                stats: Arc::default(),
                per_ip: Mutex::default(),
                shutdown: CancellationToken::new(),
            }),
        }
    }
}

/// Releases a connection's slots when the connection ends.
struct Slot {
    shared: Arc<Shared>,
    ip: Option<IpAddr>,
}

pin_project_lite::pin_project! {
    /// A connection's handler and its slot, as one task's future. Not an
    /// `async` block: one that awaited a captured future would store it
    /// twice (as the capture and as the awaited value).
    struct Running<F> {
        #[pin]
        handler: F,
        slot: Option<Slot>,
    }
}

impl<F: Future<Output = ()>> Future for Running<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let this = self.project();
        std::task::ready!(this.handler.poll(cx));
        if let Some(slot) = this.slot.take() {
            slot.shared.stats.closed.fetch_add(1, Ordering::Relaxed);
        }
        std::task::Poll::Ready(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.stats.current.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.ip {
            let mut per_ip = self.shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    // No growth with churn: forget addresses with no connection.
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

impl Server {
    /// A builder with safe defaults (10,000 connections, 10 s handshake
    /// timeout, no origin check, no authentication).
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// The counters.
    pub fn stats(&self) -> Arc<ServerStats> {
        self.shared.stats.clone()
    }

    /// Cancelling this token starts graceful shutdown: every connection
    /// gets close 1001 after its queued messages, and `serve` returns when
    /// all have closed or the shutdown timeout passed. Until then the
    /// listener stays open and answers every new request (plain HTTP,
    /// `/health`, WebSocket upgrades) with 503 "shutting down", so that load
    /// balancers see the server leave; it closes when `serve` returns.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Accepts connections until shutdown, running `handler` for each
    /// WebSocket connection in its own task.
    pub async fn serve<H, Fut>(&self, listener: TcpListener, handler: H) -> std::io::Result<()>
    where
        H: Fn(Session) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let accepted = |stream: TcpStream, peer: SocketAddr, slot: Slot, tracker: &TaskTracker| {
            let (shared, handler) = (self.shared.clone(), handler.clone());
            // The handshake's state (TLS, head parsing, auth hook) is large
            // and short-lived: boxed, it is freed once the connection is
            // open. The handler's future is boxed too: moving the session
            // through nested futures would copy it into each. The task
            // itself then holds little more than two pointers.
            let opening = Box::pin(open(shared, stream, peer));
            let handlers = tracker.clone();
            tracker.spawn(async move {
                let Some((session, span)) = opening.await else {
                    drop(slot);
                    return;
                };
                // The handler gets a task of its own, its future stored in
                // the task's allocation: the handshake's task and state are
                // gone once it runs. A span is attached only when enabled
                // (an enabled one is boxed with the future).
                let handler = if span.is_disabled() {
                    Either::Left(handler(session))
                } else {
                    Either::Right(Box::pin(handler(session).instrument(span)))
                };
                handlers.spawn(Running {
                    handler,
                    slot: Some(slot),
                });
            });
        };
        let draining = |stream: TcpStream, peer: SocketAddr, slot: Slot| {
            let shared = self.shared.clone();
            tokio::spawn(async move {
                answer_draining(&shared, stream, peer).await;
                drop(slot);
            });
        };
        self.accept_loop(listener, accepted, draining).await
    }

    /// The accept loop every way of serving shares: connection limits,
    /// counters, and the drain (see [`Server::shutdown_token`]).
    ///
    /// `accepted` starts an admitted connection; the tasks it spawns on the
    /// tracker (or that hold one of its tokens) are what the drain waits
    /// for. `draining` answers a connection accepted during the drain; the
    /// drain does not wait for it.
    async fn accept_loop<A, D>(
        &self,
        listener: TcpListener,
        mut accepted: A,
        mut draining: D,
    ) -> std::io::Result<()>
    where
        A: FnMut(TcpStream, SocketAddr, Slot, &TaskTracker),
        D: FnMut(TcpStream, SocketAddr, Slot),
    {
        let tracker = TaskTracker::new();
        let shutdown = self.shared.shutdown.clone();
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                conn = accept_next(&listener) => conn,
            };
            if let Some((stream, slot)) = self.admit(stream, peer) {
                accepted(stream, peer, slot, &tracker);
            }
        }
        tracker.close();
        info!(
            connections = tracker.len(),
            "shutting down: waiting for open connections"
        );
        // The listener stays open until the drain ends: health checks and
        // new clients get an answer (503 "shutting down" from `serve`), so
        // that a load balancer takes this server out, rather than
        // connection refused.
        let refuse_while_draining = async {
            loop {
                let (stream, peer) = accept_next(&listener).await;
                // The connection limits hold during the drain too.
                if let Some((stream, slot)) = self.admit(stream, peer) {
                    draining(stream, peer, slot);
                }
            }
        };
        tokio::select! {
            drained = tokio::time::timeout(self.shared.shutdown_timeout, tracker.wait()) => {
                if drained.is_err() {
                    warn!(
                        remaining = tracker.len(),
                        "shutdown timeout: leaving the remaining connections"
                    );
                }
            }
            () = refuse_while_draining => {}
        }
        drop(listener);
        Ok(())
    }

    /// Applies the connection limits; refused connections get their HTTP
    /// status at once (without reading the request).
    fn admit(&self, mut stream: TcpStream, peer: SocketAddr) -> Option<(TcpStream, Slot)> {
        let _ = stream.set_nodelay(true);
        let shared = &self.shared;
        shared.stats.tcp_accepted.fetch_add(1, Ordering::Relaxed);
        let current = shared.stats.current.fetch_add(1, Ordering::Relaxed) + 1;
        let mut slot = Slot {
            shared: shared.clone(),
            ip: None,
        };
        let refusal = if current > shared.limits.max_connections {
            Some((
                "limit_total",
                StatusCode::SERVICE_UNAVAILABLE,
                "server at its connection limit; retry later",
            ))
        } else if shared.limits.max_connections_per_ip > 0 {
            let mut per_ip = shared.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = per_ip.entry(peer.ip()).or_default();
            *n += 1;
            slot.ip = Some(peer.ip());
            (*n > shared.limits.max_connections_per_ip).then_some((
                "limit_ip",
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from your address",
            ))
        } else {
            None
        };
        if let Some((reason, status, text)) = refusal {
            shared.stats.reject(reason);
            debug!(%peer, reason, "connection refused");
            // Answer without waiting on the peer; a stalled one loses the answer.
            let response = http_response(status, "Retry-After: 1\r\n", text);
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    stream.write_all(&response).await?;
                    stream.shutdown().await
                })
                .await;
                drop(slot);
            });
            return None;
        }
        Some((stream, slot))
    }
}

/// The next connection; accept errors (out of file descriptors and the
/// like) are logged and retried after a pause, not spun on.
async fn accept_next(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn refuse(
    stream: &mut ServerStream,
    stats: &ServerStats,
    reason: &'static str,
    err: &HandshakeError,
) {
    stats.reject(reason);
    debug!(reason, "handshake refused: {err}");
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(&err.to_response()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Takes a connection through TLS and reads its request head, within the
/// handshake deadline; failures are counted and answered (400) here.
/// Returns the stream, the request, and the bytes read after its head.
async fn read_request(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<(ServerStream, Request<()>, BytesMut)> {
    let stats = &shared.stats;
    let config = &shared.config;
    let max = config.protocol.max_handshake_size;
    // TLS and the request head share one deadline (slowloris).
    let opened = tokio::time::timeout(config.handshake_timeout, async {
        let mut stream = match &shared_tls(shared) {
            #[cfg(feature = "tls")]
            Some(acceptor) => match acceptor.accept(stream).await {
                Ok(tls) => MaybeTlsStream::ServerTls(Box::new(tls)),
                Err(e) => return Err((None, e.into())),
            },
            _ => MaybeTlsStream::Plain(stream),
        };
        match read_head(&mut stream, max, |buf| handshake::parse_request(buf, max)).await {
            Ok(head) => Ok((stream, head)),
            Err(e) => Err((Some(stream), e)),
        }
    })
    .await;
    let (stream, (request, buf, len)) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err((None, e))) => {
            stats.reject("tls");
            debug!(%peer, "TLS handshake failed: {e}");
            return None;
        }
        Ok(Err((Some(mut stream), Error::Handshake(e)))) => {
            refuse(&mut stream, stats, "bad_request", &e).await;
            return None;
        }
        Ok(Err((_, e))) => {
            debug!(%peer, "connection ended during the handshake: {e}");
            return None;
        }
        Err(_) => {
            stats.reject("timeout");
            debug!(%peer, "handshake timeout");
            return None;
        }
    };
    // Only the bytes after the head are kept (the head buffer is dropped
    // here, not held for the connection's lifetime).
    let leftover = BytesMut::from(&buf[len..]);
    drop(buf);
    Some((stream, request, leftover))
}

/// Answers a connection accepted during the drain: 503 "shutting down" to
/// its request, whatever it asks for.
async fn answer_draining(shared: &Shared, stream: TcpStream, peer: SocketAddr) {
    let Some((mut stream, request, _)) = read_request(shared, stream, peer).await else {
        return;
    };
    let stats = &shared.stats;
    if handshake::is_upgrade_request(&request) {
        stats.reject("shutting_down");
        debug!(%peer, "handshake refused: shutting down");
    } else {
        stats.http_requests.fetch_add(1, Ordering::Relaxed);
    }
    let response = http_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "Retry-After: 1\r\n",
        "shutting down",
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await;
}

/// Takes a connection through TLS, the opening handshake, the origin policy
/// and the authentication hook (or serves plain HTTP); returns the session
/// and its tracing span when it opened as a WebSocket.
async fn open(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<(Session, tracing::Span)> {
    let stats = shared.stats.clone();
    let config = &shared.config;
    let (mut stream, request, leftover) = read_request(&shared, stream, peer).await?;

    if !handshake::is_upgrade_request(&request) {
        if let Some(http) = &shared.http {
            stats.http_requests.fetch_add(1, Ordering::Relaxed);
            let response = http(request).await;
            let _ = write_response(&mut stream, response).await;
            return None;
        }
    }
    if let Some(origins) = &shared.origins {
        let origin = request
            .headers()
            .get(http::header::ORIGIN)
            .and_then(|v| v.to_str().ok());
        if !origins.permits(origin) {
            let err = HandshakeError::Rejected {
                status: StatusCode::FORBIDDEN,
                reason: format!("origin {} is not allowed", origin.unwrap_or("(none)")),
            };
            refuse(&mut stream, &stats, "origin", &err).await;
            return None;
        }
    }
    let hs = match ServerHandshake::new(request, config.protocol.clone()) {
        Ok(hs) => hs,
        Err(e) => {
            refuse(&mut stream, &stats, "bad_request", &e).await;
            return None;
        }
    };
    let identity = match &shared.auth {
        None => Extensions::new(),
        Some(auth) => {
            let view = HandshakeRequest {
                method: hs.request().method().clone(),
                uri: hs.request().uri().clone(),
                headers: hs.request().headers().clone(),
                peer,
            };
            match auth(view).await {
                Ok(identity) => identity,
                Err(reject) => {
                    let err = HandshakeError::Rejected {
                        status: reject.status,
                        reason: reject.reason,
                    };
                    refuse(&mut stream, &stats, "auth", &err).await;
                    return None;
                }
            }
        }
    };
    let protocol = shared
        .protocols
        .iter()
        .find(|p| hs.protocols().any(|o| o == p.as_str()))
        .cloned();
    let request = clone_request(hs.request());
    let (response, conn) = hs.accept(protocol.as_deref(), &http::HeaderMap::new());
    if stream.write_all(&response).await.is_err() || stream.flush().await.is_err() {
        return None;
    }
    let mut ws =
        WebSocket::from_parts(stream, conn, &leftover, protocol.clone(), shared.io.clone());
    drop(leftover);
    // The server's own token, not a child: a child token is a node of its
    // own per connection, and nothing cancels one connection through it.
    ws.set_shutdown(shared.shutdown.clone());
    ws.set_counters(stats.traffic.clone());
    stats.opened.fetch_add(1, Ordering::Relaxed);
    // A debug span: at the default level it is disabled and costs nothing;
    // an enabled span keeps its formatted fields (~450 bytes per connection).
    let span = debug_span!("ws", %peer, path = %request.uri().path(), protocol = protocol.as_deref().unwrap_or(""));
    let session = Session {
        ws,
        peer,
        request,
        identity,
    };
    Some((session, span))
}

#[cfg(feature = "tls")]
fn shared_tls(shared: &Shared) -> Option<crate::tls::TlsAcceptor> {
    shared.tls.clone()
}

#[cfg(not(feature = "tls"))]
fn shared_tls(_: &Shared) -> Option<()> {
    None
}

fn clone_request(request: &Request<()>) -> Request<()> {
    let mut copy = Request::new(());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

async fn write_response(
    stream: &mut ServerStream,
    response: Response<bytes::Bytes>,
) -> std::io::Result<()> {
    let (parts, body) = response.into_parts();
    let head = closing_response_head(parts.status, &parts.headers, body.len());
    stream.write_all(&head).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

/// The head of an HTTP/1.1 response after which the connection closes:
/// `status`, `headers` (less any `Content-Length` and `Connection`), then
/// `Content-Length: body_len` and `Connection: close`.
pub(crate) fn closing_response_head(
    status: http::StatusCode,
    headers: &http::HeaderMap,
    body_len: usize,
) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in headers {
        if name == http::header::CONTENT_LENGTH || name == http::header::CONNECTION {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(
        format!("Content-Length: {body_len}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    head
}

/// Records how a connection ended in the server's counters; call it with
/// each final `recv` outcome (handlers built on [`Server`] get this for
/// free through [`echo`]).
pub fn record_close(stats: &ServerStats, outcome: &Option<Result<Message, Error>>) {
    stats.closed_with(outcome.as_ref().map_or(1006, close_code));
}

/// The close code a connection's last outcome stands for (1006: none).
fn close_code(outcome: &Result<Message, Error>) -> u16 {
    match outcome {
        Ok(Message::Close(Some(frame))) => frame.code.0,
        Ok(Message::Close(None)) => 1005,
        Err(Error::Protocol(e)) => e.close_code().0,
        Err(Error::SlowConsumer(code)) => code.0,
        _ => 1006,
    }
}

/// A handler that echoes every data message, after an optional welcome
/// message. Used by `tidewire echo`.
///
/// Without a prefix, each message comes back as it came, with its own type.
/// With a prefix, every answer is a text message: the prefix, then the
/// text, or for a binary message its bytes decoded as UTF-8 (invalid
/// sequences become U+FFFD), as the classic tutorial's server does with
/// ``ws.send(`Echo: ${message}`)``.
#[allow(clippy::manual_async_fn)] // on purpose: see the comment in the body
pub fn echo(
    session: Session,
    welcome: Option<Arc<str>>,
    prefix: Arc<str>,
    stats: Arc<ServerStats>,
) -> impl Future<Output = ()> + Send {
    // Not an `async fn`: its arguments would be stored in the future for
    // its whole life. The echo needs only the socket: the request headers
    // are freed here, and the future holds the socket alone.
    let mut ws = session.ws;
    async move {
        if let Some(welcome) = welcome {
            // Fed, not sent: recv writes it before it waits for input (an
            // awaited send would add its future's size to every connection).
            if ws.feed(Message::text(welcome.to_string())).is_err() {
                return;
            }
        }
        let mut code = 1006;
        while let Some(msg) = ws.recv().await {
            match msg {
                // Replies are fed, not flushed: recv writes them in one go when
                // it runs out of input, so a burst costs one write.
                Ok(Message::Text(text)) if !prefix.is_empty() => {
                    let _ = ws.feed(Message::text(format!("{prefix}{text}")));
                }
                Ok(Message::Binary(data)) if !prefix.is_empty() => {
                    let text = String::from_utf8_lossy(&data);
                    let _ = ws.feed(Message::text(format!("{prefix}{text}")));
                }
                Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                    // A failed feed means the connection is ending; recv reports how.
                    let _ = ws.feed(m);
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                other => code = close_code(&other),
            }
        }
        stats.closed_with(code);
    }
}
