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
