//! The axum 0.8 extractor for tidewire WebSockets (feature `axum`).
//!
//! Take a [`WebSocketUpgrade`] in a handler, set it up, and answer with
//! [`on_upgrade`](WebSocketUpgrade::on_upgrade): the `101` goes out, and the
//! callback runs in a task of its own with the [`UpgradedWebSocket`].
//!
//! ```no_run
//! use axum::{response::Response, routing::get, Router};
//! use tidewire::axum::WebSocketUpgrade;
//! use tidewire::{DeflateConfig, Message, ServerConfig};
//!
//! async fn chat(ws: WebSocketUpgrade) -> Response {
//!     let mut config = ServerConfig::default();
//!     config.protocol.deflate = Some(DeflateConfig::default());
//!     ws.protocols(["chat.v2", "chat.v1"])
//!         .config(config)
//!         .on_upgrade(|mut ws| async move {
//!             while let Some(Ok(msg)) = ws.recv().await {
//!                 if let m @ (Message::Text(_) | Message::Binary(_)) = msg {
//!                     if ws.send(m).await.is_err() {
//!                         break;
//!                     }
//!                 }
//!             }
//!         })
//! }
//!
//! let app: Router = Router::new().route("/chat", get(chat));
//! ```
//!
//! A request that is not a valid upgrade is refused before the handler runs,
//! with a [`WebSocketUpgradeRejection`]: its status (400, 405 with
//! `Allow: GET`, 426 with `Sec-WebSocket-Version: 13`, 505) and a plain-text
//! body saying what was wrong. To serve plain HTTP and WebSockets on one
//! route, take `Option<WebSocketUpgrade>`: it is `None` when the request does
//! not ask for an upgrade at all.
//!
//! Authentication and origin checks are ordinary axum: other extractors,
//! middleware, or returning another response instead of calling
//! `on_upgrade`. Only HTTP/1.1 upgrades are supported (not RFC 8441 over
//! HTTP/2).

use std::future::Future;
use std::sync::Arc;

use ::axum::body::Body;
use ::axum::extract::{FromRequestParts, OptionalFromRequestParts};
use ::axum::response::{IntoResponse, Response};
use ::hyper::upgrade::OnUpgrade;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tidewire_proto::{Config, HandshakeError, ServerHandshake};

use crate::hyper::{head_of, is_upgrade, take_on_upgrade, UpgradedWebSocket, Upgrading};
use crate::{Error, IoOptions, ServerConfig};

/// Extractor for a WebSocket upgrade request, validated (RFC 6455 §4.2.1).
///
/// Builder methods choose the subprotocol ([`protocols`](Self::protocols)),
/// limits and compression ([`config`](Self::config)) and response headers
/// ([`header`](Self::header)); [`on_upgrade`](Self::on_upgrade) makes the
/// response.
pub struct WebSocketUpgrade {
    handshake: ServerHandshake,
    on_upgrade: OnUpgrade,
    config: ServerConfig,
    /// Overrides `config.io`, shared by the connections of a server.
    shared_io: Option<Arc<IoOptions>>,
    protocols: Vec<String>,
    headers: HeaderMap,
    on_failed_upgrade: Option<Box<dyn FnOnce(Error) + Send>>,
}

impl std::fmt::Debug for WebSocketUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSocketUpgrade")
            .field("uri", self.handshake.request().uri())
            .field(
                "offered_protocols",
                &self.offered_protocols().collect::<Vec<_>>(),
            )
            .field("protocols", &self.protocols)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl WebSocketUpgrade {
    /// The subprotocols this endpoint speaks, in the server's order of
    /// preference: the first one the client offered is selected (none when
    /// the client offered none of them; the client then decides whether to
    /// go on).
    pub fn protocols<I>(mut self, protocols: I) -> WebSocketUpgrade
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.protocols = protocols.into_iter().map(Into::into).collect();
        self
    }

    /// Protocol limits, permessage-deflate (`config.protocol.deflate`) and
    /// I/O options of the connection (default: [`ServerConfig::default`],
    /// no compression). `handshake_timeout` does not apply: axum has read
    /// the request already.
    pub fn config(mut self, config: ServerConfig) -> WebSocketUpgrade {
        self.config = config;
        self
    }

    /// I/O options shared by many connections, instead of `config.io`: a
    /// server that holds many connections makes them once, rather than a
    /// copy per connection.
    pub fn shared_io_options(mut self, io: Arc<IoOptions>) -> WebSocketUpgrade {
        self.shared_io = Some(io);
        self
    }

    /// Adds a header to the `101` response.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> WebSocketUpgrade {
        self.headers.append(name, value);
        self
    }

    /// Called instead of the `on_upgrade` callback when hyper cannot hand
    /// over the connection after the `101` (the client went away). By
    /// default the error is logged at debug level.
    pub fn on_failed_upgrade<F>(mut self, callback: F) -> WebSocketUpgrade
    where
        F: FnOnce(Error) + Send + 'static,
    {
        self.on_failed_upgrade = Some(Box::new(callback));
        self
    }

    /// The subprotocols the client offered, in its order of preference.
    pub fn offered_protocols(&self) -> impl Iterator<Item = &str> {
        self.handshake.protocols()
    }

    /// The subprotocol the response will select: the first of
    /// [`protocols`](Self::protocols) that the client offered.
    pub fn selected_protocol(&self) -> Option<&str> {
        self.protocols
            .iter()
            .find(|p| self.handshake.protocols().any(|o| o == p.as_str()))
            .map(String::as_str)
    }

    /// The validated request head (method, URI, headers).
    pub fn request(&self) -> &http::Request<()> {
        self.handshake.request()
    }

    /// Answers `101 Switching Protocols` and runs `callback` with the
    /// WebSocket, in a task of its own, once the connection is handed over.
    pub fn on_upgrade<C, Fut>(mut self, callback: C) -> Response
    where
        C: FnOnce(UpgradedWebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_failed = self.on_failed_upgrade.take();
        let (response, upgrading) = self.into_response_and_future();
        tokio::spawn(async move {
            match upgrading.await {
                Ok(ws) => callback(ws).await,
                Err(e) => match on_failed {
                    Some(f) => f(e),
                    None => tracing::debug!(error = %e, "WebSocket upgrade failed"),
                },
            }
        });
        response
    }

    /// The `101` response and the future of the WebSocket, for a caller
    /// that awaits it itself (in another task: the response must be
    /// returned first). [`on_failed_upgrade`](Self::on_failed_upgrade) does
    /// not apply; the future's error says what went wrong.
    pub fn into_response_and_future(self) -> (Response, Upgrading) {
        let protocol = self.selected_protocol().map(str::to_owned);
        let handshake = self.handshake.with_config(self.config.protocol.clone());
        let (response, connection) = handshake.into_response(protocol.as_deref(), &self.headers);
        let io = self.shared_io.unwrap_or_else(|| Arc::new(self.config.io));
        let upgrading = Upgrading::new(self.on_upgrade, connection, protocol, io);
        (response.map(|()| Body::empty()), upgrading)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WebSocketUpgrade {
    type Rejection = WebSocketUpgradeRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let head = head_of(&parts.method, &parts.uri, parts.version, &parts.headers)?;
        // Settings come later (`config`); `with_config` applies them.
        let handshake = ServerHandshake::new(head, Config::default())?;
        let on_upgrade = take_on_upgrade(&mut parts.extensions)?;
        Ok(WebSocketUpgrade {
            handshake,
            on_upgrade,
            config: ServerConfig::default(),
            shared_io: None,
            protocols: Vec::new(),
            headers: HeaderMap::new(),
            on_failed_upgrade: None,
        })
    }
}

/// `Option<WebSocketUpgrade>`: `None` for a request that does not ask for a
/// WebSocket (no `Upgrade: websocket`), the rejection for one that asks but
/// is invalid.
impl<S: Send + Sync> OptionalFromRequestParts<S> for WebSocketUpgrade {
    type Rejection = WebSocketUpgradeRejection;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        if !is_upgrade(&parts.headers) {
            return Ok(None);
        }
        <Self as FromRequestParts<S>>::from_request_parts(parts, state)
            .await
            .map(Some)
    }
}

/// Why a request could not be taken as a WebSocket upgrade. As a response:
/// the error's status, the headers RFC 6455 asks for, and a plain-text body
/// saying what was wrong (see [`HandshakeError::to_http_response`]).
#[derive(Debug, Clone)]
pub struct WebSocketUpgradeRejection {
    error: HandshakeError,
}

impl WebSocketUpgradeRejection {
    /// What was wrong with the request.
    pub fn error(&self) -> &HandshakeError {
        &self.error
    }

    /// The HTTP status of the refusal.
    pub fn status(&self) -> StatusCode {
        self.error.status()
    }
}

impl From<HandshakeError> for WebSocketUpgradeRejection {
    fn from(error: HandshakeError) -> Self {
        WebSocketUpgradeRejection { error }
    }
}

impl std::fmt::Display for WebSocketUpgradeRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not a valid WebSocket upgrade: {}", self.error)
    }
}

impl std::error::Error for WebSocketUpgradeRejection {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl IntoResponse for WebSocketUpgradeRejection {
    fn into_response(self) -> Response {
        crate::hyper::error_response(&self.error)
    }
}
