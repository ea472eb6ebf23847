//! The accept loop around the hub's router: connection limits (503 overall, 429 per IP), TLS with one deadline for
//! the TLS handshake and the request head, and graceful shutdown.
//!
//! Shutdown: every client gets a `disconnect` push (3001, reconnect) and
//! close 1001; wait for the sessions to end, at most the shutdown timeout.
//! Meanwhile the listener stays open, so that load balancers see the hub
//! leave: `/health` answers 503 "shutting down", WebSocket upgrades 503,
//! the rest as usual; each of these connections serves one request.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use axum::Router;
use http::{Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tidewire::CancellationToken;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use super::router;
use crate::config::Config;
use crate::node::Hub;
use crate::shards::lock;

/// Counts connections for the limits, and for the drain; dropped when the
/// connection (and any WebSocket upgraded from it) ends.
#[derive(Clone)]
pub(crate) struct ConnectionSlot(#[allow(dead_code)] Arc<Slot>);

struct Slot {
    limiter: Arc<Limiter>,
    ip: IpAddr,
    /// Held by connections accepted before shutdown: the drain waits for
    /// them, WebSockets being upgraded included (their session may open
    /// after shutdown began, when no task of the tracker is left).
    _drained: Option<TaskTrackerToken>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter.current.fetch_sub(1, Ordering::Relaxed);
        let mut per_ip = lock(&self.limiter.per_ip);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

#[derive(Default)]
struct Limiter {
    max: usize,
    max_per_ip: usize,
    current: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl Limiter {
    fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        drain: Option<&TaskTracker>,
    ) -> Result<Slot, (StatusCode, &'static str)> {
        let current = self.current.fetch_add(1, Ordering::Relaxed) + 1;
        *lock(&self.per_ip).entry(ip).or_default() += 1;
        let slot = Slot {
            limiter: self.clone(),
            ip,
            _drained: drain.map(TaskTracker::token),
        };
        if current > self.max {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "server at its connection limit; retry later",
            ));
        }
        if self.max_per_ip > 0
            && lock(&self.per_ip).get(&ip).copied().unwrap_or(0) > self.max_per_ip
        {
            return Err((
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from your address",
            ));
        }
        Ok(slot)
    }
}

/// What an accepted connection needs; shared by the accept loop and the
/// drain's.
#[derive(Clone)]
struct Front {
    router: Router,
    tls: Option<tidewire::tls::TlsAcceptor>,
    limiter: Arc<Limiter>,
    handshake_timeout: Duration,
}

impl Front {
    /// The task that serves one connection, or `None` when the connection
    /// limits refuse it (answered here). `drain` waits for the connection
    /// and its WebSocket to end; `shutdown` ends the connection gracefully;
    /// without `keep_alive` it serves one request and closes.
    fn connection(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        drain: Option<&TaskTracker>,
        keep_alive: bool,
        shutdown: CancellationToken,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let _ = tcp.set_nodelay(true);
        let slot = match self.limiter.admit(peer.ip(), drain) {
            Ok(slot) => slot,
            Err((status, text)) => {
                tracing::debug!(%peer, %status, "connection refused");
                tokio::spawn(refuse(tcp, status, text));
                return None;
            }
        };
        let front = self.clone();
        Some(async move {
            let slot = ConnectionSlot(Arc::new(slot));
            let deadline = front.handshake_timeout;
            let http = Http {
                router: front.router,
                header_timeout: deadline,
                keep_alive,
                shutdown,
            };
            match front.tls {
                None => serve_connection(tcp, peer, slot, http).await,
                Some(acceptor) => {
                    match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(stream, peer, slot, http).await,
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timeout"),
                    }
                }
            }
        })
    }
}

/// The next connection; accept errors (out of file descriptors and the
/// like) are logged and retried after a pause, not spun on.
async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves the hub on `listener` until `shutdown` is cancelled, then shuts
/// down gracefully (see the module docs).
///
/// # Errors
/// Only when the listener itself fails for good.
pub async fn serve(
    hub: Hub,
    listener: TcpListener,
    api_key: &str,
    tls: Option<tidewire::tls::TlsAcceptor>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let config: Arc<Config> = Arc::new(hub.config().clone());
    let sessions_token = CancellationToken::new();
    let front = Front {
        router: router(hub.clone(), api_key, sessions_token.clone()),
        tls,
        limiter: Arc::new(Limiter {
            max: config.server.max_connections,
            max_per_ip: config.server.max_connections_per_ip,
            ..Limiter::default()
        }),
        handshake_timeout: config.server.handshake_timeout,
    };
    let tracker = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            conn = accept(&listener) => conn,
        };
        if let Some(connection) =
            front.connection(tcp, peer, Some(&tracker), true, shutdown.clone())
        {
            tokio::spawn(connection);
        }
    }
    tracing::info!(sessions = hub.counts().sessions, "shutting down");
    hub.shutdown();
    tracker.close();
    let deadline = tokio::time::Instant::now() + config.server.shutdown_timeout;
    let drained = async {
        tracker.wait().await;
        while hub.counts().sessions > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // The listener stays open during the drain (503 on /health and on
    // upgrades, see the module docs). The drain does not wait for the
    // connections accepted now: each serves one request, bounded by the
    // header timeout; the guard ends those still open when this returns.
    let draining = CancellationToken::new();
    let _end_draining = draining.clone().drop_guard();
    let answer_while_draining = async {
        loop {
            let (tcp, peer) = accept(&listener).await;
            if let Some(connection) = front.connection(tcp, peer, None, false, draining.clone()) {
                tokio::spawn(connection);
            }
        }
    };
    tokio::select! {
        drained = tokio::time::timeout_at(deadline, drained) => {
            if drained.is_err() {
                tracing::warn!(
                    sessions = hub.counts().sessions,
                    "shutdown timeout: dropping the remaining connections"
                );
                sessions_token.cancel();
            }
        }
        () = answer_while_draining => {}
    }
    drop(listener);
    Ok(())
}

async fn refuse(mut tcp: TcpStream, status: StatusCode, text: &str) {
    let response = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{text}\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        text.len() + 1,
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await
    })
    .await;
}

/// How [`serve_connection`] serves HTTP on a connection.
struct Http {
    router: Router,
    header_timeout: Duration,
    /// Off during the drain: one request, then the connection closes.
    keep_alive: bool,
    /// Ends the connection gracefully (the request in progress finishes).
    shutdown: CancellationToken,
}

async fn serve_connection<I>(io: I, peer: SocketAddr, slot: ConnectionSlot, http: Http)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Http {
        router,
        header_timeout,
        keep_alive,
        shutdown,
    } = http;
    // Signalled when a request starts (a permit stays for a later wait).
    let request_started = Arc::new(tokio::sync::Notify::new());
    let started = request_started.clone();
    let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        started.notify_one();
        request.extensions_mut().insert(slot.clone());
        request.extensions_mut().insert(peer);
        let mut router = router.clone();
        async move {
            let response: Result<Response<Body>, Infallible> = router.call(request).await;
            response
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(keep_alive)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, "HTTP connection: {e}");
            }
        }
        _ = shutdown.cancelled() => {
            // hyper closes a connection with no request in progress at once,
            // and one accepted just before shutdown (a health check, say)
            // may not have had its request read yet: it would get no
            // answer at all. It gets its first request answered instead.
            tokio::select! {
                _ = request_started.notified() => {}
                _ = tokio::time::sleep(header_timeout) => {}
                _ = connection.as_mut() => return,
            }
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
        }
    }
}
