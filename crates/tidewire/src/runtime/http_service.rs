//! [`Server::serve_http`]: the server's accept loop, limits, TLS and drain
//! around a hyper service (feature `hyper`), for applications that answer
//! HTTP themselves (an axum router, say) and upgrade some requests to
//! WebSockets with [`crate::hyper`] or [`crate::axum`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ::hyper::body::{Body, Incoming};
use ::hyper::service::Service;
use http::{Request, Response};
#[cfg(feature = "tls")]
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::{shared_tls, Server, Shared, Slot};
use crate::stream::MaybeTlsStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connection's place in the server: its share of the connection limits,
/// and (for one accepted before shutdown) a reason for the drain to wait.
///
/// [`Server::serve_http`] puts one in every request's extensions. Keep a
/// clone for as long as something serves the connection after its request:
/// a WebSocket upgraded from it, above all. The limits then count the
/// WebSocket, and graceful shutdown waits for it to close.
#[derive(Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<Held>);

struct Held {
    _slot: Slot,
    _drain: Option<TaskTrackerToken>,
}

impl std::fmt::Debug for ConnectionSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionSlot")
    }
}

impl Server {
    /// Accepts connections until shutdown and serves HTTP/1.1 on each with
    /// `service`, upgrades enabled; the server's connection limits (503,
    /// 429), TLS, and handshake timeout (for TLS and each request head)
    /// apply as in [`Server::serve`]. Each request carries the connection's
    /// [`ConnectionSlot`] and the peer's [`SocketAddr`] in its extensions.
    ///
    /// The origin policy, authentication hook, subprotocols and plain-HTTP
    /// handler of the builder are not used: the service owns the requests.
    ///
    /// Cancelling [`Server::shutdown_token`] starts the drain: open
    /// connections finish the request in progress and close (one accepted
    /// just before, whose request was not read yet, gets it answered), and
    /// `serve_http` returns once every connection and every holder of a
    /// [`ConnectionSlot`] is gone, or at the shutdown timeout. Meanwhile
    /// the listener stays open; new connections are served one request
    /// each, and the service decides the answer (clone the token to check
    /// it: a load balancer's health check wants 503 then).
    pub async fn serve_http<S, B>(&self, listener: TcpListener, service: S) -> std::io::Result<()>
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let shutdown = self.shared.shutdown.clone();
        // Ends the connections accepted during the drain when it is over.
        let draining_over = CancellationToken::new();
        let _end_draining = draining_over.clone().drop_guard();
        // Over TLS, HTTP/2 for the clients that ask for it (ALPN h2).
        #[cfg(feature = "tls")]
        let tls = shared_tls(&self.shared).map(|acceptor| acceptor.with_http2());
        let connection = |keep_alive: bool, shutdown: &CancellationToken| Connection {
            shared: self.shared.clone(),
            service: service.clone(),
            keep_alive,
            shutdown: shutdown.clone(),
            #[cfg(feature = "tls")]
            tls: tls.clone(),
        };
        let accepted = |stream: TcpStream, peer: SocketAddr, slot: Slot, tracker: &TaskTracker| {
            let held = Held {
                _slot: slot,
                _drain: Some(tracker.token()),
            };
            tracker.spawn(connection(true, &shutdown).run(stream, peer, held));
        };
        let draining = |stream: TcpStream, peer: SocketAddr, slot: Slot| {
            let held = Held {
                _slot: slot,
                _drain: None,
            };
            tokio::spawn(connection(false, &draining_over).run(stream, peer, held));
        };
        self.accept_loop(listener, accepted, draining).await
    }
}

/// How one connection is served.
struct Connection<S> {
    shared: Arc<Shared>,
    service: S,
    /// Off during the drain: one request, then the connection closes.
    keep_alive: bool,
    /// Ends the connection gracefully (the request in progress finishes).
    shutdown: CancellationToken,
    /// The server's TLS, offering HTTP/2.
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::TlsAcceptor>,
}

impl<S, B> Connection<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    async fn run(self, tcp: TcpStream, peer: SocketAddr, held: Held) {
        let slot = ConnectionSlot(Arc::new(held));
        #[cfg(feature = "tls")]
        let tls = self.tls.clone();
        #[cfg(not(feature = "tls"))]
        let tls = shared_tls(&self.shared);
        match tls {
            #[cfg(feature = "tls")]
            Some(acceptor) => match tokio::time::timeout(
                self.shared.config.handshake_timeout,
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(tls)) => {
                    let h2 = crate::tls::TlsAcceptor::negotiated_h2(&tls);
                    let stream = MaybeTlsStream::ServerTls(Box::new(tls));
                    if h2 {
                        self.serve_h2(stream, peer, slot).await;
                    } else {
                        self.serve(stream, peer, slot).await;
                    }
                }
                Ok(Err(e)) => {
                    self.shared.stats.reject("tls");
                    debug!(%peer, "TLS handshake failed: {e}");
                }
                Err(_) => {
                    self.shared.stats.reject("timeout");
                    debug!(%peer, "TLS handshake timeout");
                }
            },
            _ => self.serve(MaybeTlsStream::Plain(tcp), peer, slot).await,
        }
    }

    /// HTTP/2 (over TLS, when the client chose it): every request of the
    /// connection is a stream of its own; no upgrades.
    #[cfg(feature = "tls")]
    async fn serve_h2<I>(self, io: I, peer: SocketAddr, slot: ConnectionSlot)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (shared, service) = (self.shared, self.service);
        let service = ::hyper::service::service_fn(move |mut request: Request<Incoming>| {
            shared
                .stats
                .http_requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            request.extensions_mut().insert(slot.clone());
            request.extensions_mut().insert(peer);
            service.call(request)
        });
        let connection = ::hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, "HTTP/2 connection: {e}");
                }
            }
            _ = self.shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
            }
        }
    }

    async fn serve<I>(self, io: I, peer: SocketAddr, slot: ConnectionSlot)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let header_timeout = self.shared.config.handshake_timeout;
        // Signalled when a request starts (a permit stays for a later wait).
        let request_started = Arc::new(tokio::sync::Notify::new());
        let started = request_started.clone();
        let (shared, service) = (self.shared, self.service);
        let service = ::hyper::service::service_fn(move |mut request: Request<Incoming>| {
            started.notify_one();
            shared
                .stats
                .http_requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            request.extensions_mut().insert(slot.clone());
            request.extensions_mut().insert(peer);
            service.call(request)
        });
        let connection = ::hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(self.keep_alive)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(connection);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    debug!(%peer, "HTTP connection: {e}");
                }
            }
            _ = self.shutdown.cancelled() => {
                // hyper closes a connection with no request in progress at
                // once, and one accepted just before shutdown (a health
                // check, say) may not have had its request read yet: it
                // would get no answer at all. It gets its first request
                // answered instead.
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
}
