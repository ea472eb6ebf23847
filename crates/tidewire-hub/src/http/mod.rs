//! The HTTP side of the hub: the axum [`Router`] (`/connection/websocket`,
//! the HTTP fallbacks `/connection/sse`, `/connection/http_stream` and
//! `/connection/emulation`, `/api/*`, `/health`, `/metrics`, the admin
//! page at `/admin`, the demo
//! app at `/` and the JavaScript client at `/client/tidewire.js`), and [`serve`], which serves it through
//! `tidewire::Server` (`serve.rs`: limits, TLS, graceful shutdown).

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::{header, HeaderMap, StatusCode};
use tidewire::axum::WebSocketUpgrade;
use tidewire::hyper::ConnectionSlot;
use tidewire::{
    CancellationToken, Config as WsProtocolConfig, DeflateConfig, IoOptions, OriginPolicy,
    ServerConfig,
};

use crate::fronts::emulation::Emulations;
use crate::fronts::long_poll::LongPolls;
use crate::node::Hub;
use crate::protocol::SUBPROTOCOL;

mod admin;
pub mod api;
mod fallbacks;
mod serve;
mod static_files;

pub use serve::{serve, start_on_event_loop, EventLoopServing};
use static_files::{static_file, STATIC_FILES};

/// The path of the WebSocket endpoint.
pub const WEBSOCKET_PATH: &str = "/connection/websocket";

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) hub: Hub,
    pub(crate) api_key: Arc<str>,
    ws_config: ServerConfig,
    /// `ws_config.io`, shared by every connection rather than copied into each.
    ws_io: Arc<IoOptions>,
    origins: Option<OriginPolicy>,
    shutdown: CancellationToken,
    /// The HTTP-fallback sessions of this node.
    emulations: Arc<Emulations>,
    /// Its long-polling sessions.
    long_polls: Arc<LongPolls>,
}

/// The router of a hub: mount it in an axum app, or run it with [`serve`].
/// `api_key` guards `/api`; `shutdown` ends WebSocket sessions (1001).
pub fn router(hub: Hub, api_key: &str, shutdown: CancellationToken) -> Router {
    let config = hub.config();
    let settings = &config.server;
    let ws_config = ServerConfig {
        protocol: ws_protocol(config),
        io: IoOptions {
            ping_interval: (!settings.ping_interval.is_zero()).then_some(settings.ping_interval),
            pong_timeout: settings.pong_timeout,
            idle_timeout: (!settings.idle_timeout.is_zero()).then_some(settings.idle_timeout),
            send_queue: crate::fronts::websocket::queue_limits(&config.client),
            ..IoOptions::default()
        },
        handshake_timeout: settings.handshake_timeout,
    };
    let max_body_size = config.api.max_body_size;
    let origins = origin_policy(config);
    let emulations = Arc::new(Emulations::default());
    emulations.listen(&hub);
    let long_polls = Arc::new(LongPolls::default());
    long_polls.listen(&hub);
    let state = AppState {
        emulations,
        long_polls,
        hub,
        api_key: api_key.into(),
        ws_io: Arc::new(ws_config.io.clone()),
        ws_config,
        origins: origins.clone(),
        shutdown,
    };
    let mut router = Router::new();
    for &(path, content_type, body) in STATIC_FILES {
        router = router.route(path, get(move || static_file(content_type, body)));
    }
    router
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route(WEBSOCKET_PATH, get(websocket))
        .merge(fallbacks::routes(origins))
        .merge(api::routes(max_body_size))
        .merge(admin::routes())
        .with_state(state)
}

/// The WebSocket protocol's limits and compression, from the hub's
/// configuration (both servers: tokio and the event loop).
pub(crate) fn ws_protocol(config: &crate::Config) -> WsProtocolConfig {
    let settings = &config.server;
    WsProtocolConfig {
        max_message_size: config.client.max_message_size,
        max_frame_size: config.client.max_message_size,
        deflate: settings.deflate.then(|| DeflateConfig {
            server_no_context_takeover: settings.deflate_no_context_takeover,
            client_no_context_takeover: settings.deflate_no_context_takeover,
            ..DeflateConfig::default()
        }),
        ..WsProtocolConfig::default()
    }
}

/// The origins WebSockets and the fallbacks accept (`None`: any).
fn origin_policy(config: &crate::Config) -> Option<OriginPolicy> {
    let settings = &config.server;
    (!settings.allowed_origins.is_empty())
        .then(|| OriginPolicy::allow(settings.allowed_origins.clone()))
}

async fn health(State(app): State<AppState>) -> Response {
    if app.hub.is_shutting_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match app.hub.health().await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {e}\n")).into_response(),
    }
}

async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        app.hub.metrics_text(),
    )
        .into_response()
}

async fn websocket(
    State(app): State<AppState>,
    slot: Option<Extension<ConnectionSlot>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Some(origins) = &app.origins {
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if !origins.permits(origin) {
            let text = format!("origin {} is not allowed\n", origin.unwrap_or("(none)"));
            return (StatusCode::FORBIDDEN, text).into_response();
        }
    }
    if app.hub.is_shutting_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let hub = app.hub.clone();
    let opening = hub.opening_request(&headers);
    // The server's token itself, not a child: a child is a tree node of its
    // own per connection, and no connection is cancelled on its own.
    let shutdown = app.shutdown.clone();
    let (response, upgrading) = upgrade
        .protocols([SUBPROTOCOL])
        .config(app.ws_config.clone())
        .shared_io_options(app.ws_io.clone())
        .into_response_and_future();
    // One short task waits for the upgrade, then starts the session in a
    // task of its own: an idle connection's task holds only the session,
    // not the (larger) state of the upgrade.
    tokio::spawn(async move {
        match upgrading.await {
            Ok(mut ws) => {
                ws.set_shutdown(shutdown);
                // The connection's limit slot lives as long as the WebSocket.
                tokio::spawn(crate::fronts::websocket::run_session(
                    hub, ws, opening, slot,
                ));
            }
            Err(e) => tracing::debug!("WebSocket upgrade failed: {e}"),
        }
    });
    response
}
