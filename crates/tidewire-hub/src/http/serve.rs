//! Serving the hub's router on a listener, through `tidewire::Server`:
//! its connection limits (503 overall, 429 per IP), TLS with one deadline
//! for the TLS handshake and each request head, and its drain.
//!
//! Shutdown: every client gets a `disconnect` push (3001, reconnect) and
//! close 1001; wait for the sessions to end, at most the shutdown timeout,
//! then close those left. Meanwhile the listener stays open, so that load
//! balancers see the hub leave: `/health` answers 503 "shutting down",
//! WebSocket upgrades 503, the rest as usual; each of these connections
//! serves one request.

use std::convert::Infallible;

use axum::body::Body;
use axum::response::Response;
use http::Request;
use tidewire::{CancellationToken, Limits, Server, ServerConfig};
use tokio::net::TcpListener;
use tower_service::Service;

use super::router;
use crate::node::Hub;

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
    let settings = &hub.config().server;
    let mut server = Server::builder()
        .config(ServerConfig {
            handshake_timeout: settings.handshake_timeout,
            ..ServerConfig::default()
        })
        .limits(Limits {
            max_connections: settings.max_connections,
            max_connections_per_ip: settings.max_connections_per_ip,
        })
        .shutdown_timeout(settings.shutdown_timeout);
    if let Some(tls) = tls {
        server = server.tls(tls);
    }
    let server = server.build();
    // Closes the sessions still open at the end of the drain (1001); the
    // hub itself tells them to reconnect when the drain starts.
    let sessions = CancellationToken::new();
    let router = router(hub.clone(), api_key, sessions.clone());
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let mut router = router.clone();
        async move {
            let response: Result<Response<Body>, Infallible> = router.call(request).await;
            response
        }
    });
    let serving = server.serve_http(listener, service);
    tokio::pin!(serving);
    tokio::select! {
        served = &mut serving => return served,
        () = shutdown.cancelled() => {}
    }
    tracing::info!(sessions = hub.counts().sessions, "shutting down");
    // The hub first: a WebSocket upgraded from now on is told at once.
    hub.shutdown();
    server.shutdown_token().cancel();
    let served = serving.await;
    if hub.counts().sessions > 0 {
        tracing::warn!(
            sessions = hub.counts().sessions,
            "shutdown timeout: closing the remaining sessions"
        );
        sessions.cancel();
    }
    served
}

/// The hub with its WebSockets on tidewire's event loop
/// (`server.event_loop`), started: its port is bound. Every request other
/// than a WebSocket upgrade of [`super::WEBSOCKET_PATH`] is handed over to
/// tokio and served by the hub's router there (see
/// [`crate::fronts::event_loop`]).
pub struct EventLoopServing {
    hub: Hub,
    server: tidewire::event_loop::EventLoopServer,
    handed: tokio::sync::mpsc::UnboundedReceiver<crate::fronts::event_loop::HandedOff>,
    router: axum::Router,
    sessions: CancellationToken,
}

impl std::fmt::Debug for EventLoopServing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoopServing")
            .field("server", &self.server)
            .finish()
    }
}

/// Binds `addr` for the hub on the event loop (call it inside the tokio
/// runtime that is to run the hub).
///
/// # Errors
/// The address cannot be bound, or a thread cannot start.
pub fn start_on_event_loop(
    hub: Hub,
    addr: std::net::SocketAddr,
    api_key: &str,
) -> std::io::Result<EventLoopServing> {
    let config = hub.config();
    let settings = &config.server;
    let loop_config = tidewire::event_loop::EventLoopConfig {
        protocol: super::ws_protocol(config),
        threads: settings.event_loop_threads,
        handshake_timeout: settings.handshake_timeout,
        ping_interval: (!settings.ping_interval.is_zero()).then_some(settings.ping_interval),
        pong_timeout: settings.pong_timeout,
        idle_timeout: (!settings.idle_timeout.is_zero()).then_some(settings.idle_timeout),
        shutdown_timeout: settings.shutdown_timeout,
        max_connections: settings.max_connections,
        max_connections_per_ip: settings.max_connections_per_ip,
        max_pending_output: config.client.queue_bytes.max(64 << 10),
        origins: super::origin_policy(config),
        protocols: vec![crate::protocol::SUBPROTOCOL.to_owned()],
        ..tidewire::event_loop::EventLoopConfig::default()
    };
    let (to_tokio, handed) = tokio::sync::mpsc::unbounded_channel();
    let front = crate::fronts::event_loop::LoopFront::new(
        hub.clone(),
        tokio::runtime::Handle::current(),
        to_tokio,
    );
    let server = tidewire::event_loop::serve(addr, loop_config, move || front.clone())?;
    let sessions = CancellationToken::new();
    let router = router(hub.clone(), api_key, sessions.clone());
    Ok(EventLoopServing {
        hub,
        server,
        handed,
        router,
        sessions,
    })
}

impl EventLoopServing {
    /// The address it listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.server.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then shuts down gracefully:
    /// every client is told to reconnect (as with [`serve`]), the sessions
    /// get the shutdown timeout to end (meanwhile the port stays open:
    /// `/health` answers 503, each HTTP connection one request), then the
    /// event loop closes those left (1001) and its threads end. Dropping
    /// the future stops the event loop too.
    ///
    /// # Errors
    /// An event-loop thread ended with an error.
    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let EventLoopServing {
            hub,
            server,
            mut handed,
            router,
            sessions,
        } = self;
        // Dropped (its task aborted, say): the event loop stops too, and
        // with it every handle its threads hold on the hub.
        struct StopOnDrop(tidewire::event_loop::ShutdownHandle);
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                self.0.shutdown();
            }
        }
        let _stop = StopOnDrop(server.shutdown_handle());
        let header_timeout = hub.config().server.handshake_timeout;
        let http_shutdown = CancellationToken::new();
        let serving_http = http_shutdown.clone();
        tokio::spawn(async move {
            while let Some(handed) = handed.recv().await {
                serve_handed_off(handed, router.clone(), header_timeout, &serving_http);
            }
        });
        shutdown.cancelled().await;
        tracing::info!(sessions = hub.counts().sessions, "shutting down");
        // The hub first (WebSocket upgrades from now on are told at once),
        // then the HTTP connections: each finishes its request and closes;
        // those handed over from now on are served one request each.
        hub.shutdown();
        http_shutdown.cancel();
        let deadline = tokio::time::Instant::now() + hub.config().server.shutdown_timeout;
        while hub.counts().sessions > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if hub.counts().sessions > 0 {
            tracing::warn!(
                sessions = hub.counts().sessions,
                "shutdown timeout: closing the remaining sessions"
            );
        }
        sessions.cancel();
        server.shutdown();
        tokio::task::spawn_blocking(move || server.join())
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }
}

/// Serves a connection the event loop handed over with the hub's router
/// (HTTP/1.1, keep-alive, upgrades), starting with the bytes it read.
fn serve_handed_off(
    handed: crate::fronts::event_loop::HandedOff,
    router: axum::Router,
    header_timeout: std::time::Duration,
    shutdown: &CancellationToken,
) {
    let crate::fronts::event_loop::HandedOff {
        stream,
        received,
        slot,
    } = handed;
    let peer = stream.peer_addr().ok();
    let Ok(tcp) = tokio::net::TcpStream::from_std(stream) else {
        return;
    };
    let io = hyper_util::rt::TokioIo::new(Replayed {
        received: bytes::Bytes::from(received),
        tcp,
    });
    let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        if let Some(peer) = peer {
            request.extensions_mut().insert(peer);
        }
        let mut router = router.clone();
        async move {
            let response: Result<Response<Body>, Infallible> = router.call(request).await;
            response
        }
    });
    let shutdown = shutdown.clone();
    // Handed over during the drain: one request (its bytes are here
    // already), answered, then closed. A graceful shutdown before hyper
    // read it would close it unanswered.
    let draining = shutdown.is_cancelled();
    tokio::spawn(async move {
        // Counted as long as it is served.
        let _slot = slot;
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(!draining)
            .serve_connection(io, service)
            .with_upgrades();
        tokio::pin!(connection);
        if draining {
            if let Err(e) = connection.await {
                tracing::debug!("HTTP connection: {e}");
            }
            return;
        }
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("HTTP connection: {e}");
                }
            }
            () = shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), connection).await;
            }
        }
    });
}

/// A socket whose first bytes were already read (by the event loop): they
/// are read again first.
struct Replayed {
    received: bytes::Bytes,
    tcp: tokio::net::TcpStream,
}

impl tokio::io::AsyncRead for Replayed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.received.is_empty() {
            let n = self.received.len().min(buf.remaining());
            let head = self.received.split_to(n);
            buf.put_slice(&head);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Replayed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tcp).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
