//! Mounting tidewire WebSockets in a hyper 1.x server (feature `hyper`).
//!
//! hyper reads the request and writes the response itself, so the upgrade
//! comes in two steps: [`upgrade`] validates the request and returns the
//! `101 Switching Protocols` response for the service to answer with,
//! together with an [`Upgrading`] future. Once hyper has sent the `101`, the
//! future resolves to a [`WebSocket`] over the upgraded connection; spawn a
//! task that awaits it, since the service must return the response first.
//!
//! ```no_run
//! use std::convert::Infallible;
//!
//! use hyper::body::Incoming;
//! use hyper::{Request, Response};
//! use tidewire::{Accept, Message, ServerConfig};
//!
//! async fn service(mut req: Request<Incoming>) -> Result<Response<String>, Infallible> {
//!     if !tidewire::hyper::is_upgrade_request(&req) {
//!         return Ok(Response::new("plain HTTP\n".to_string()));
//!     }
//!     let hook = |_: &tidewire::proto::ServerHandshake| Ok(Accept::default());
//!     match tidewire::hyper::upgrade(&mut req, ServerConfig::default(), hook) {
//!         Ok((response, upgrading)) => {
//!             tokio::spawn(async move {
//!                 let mut ws = upgrading.await?;
//!                 while let Some(msg) = ws.recv().await {
//!                     if let m @ (Message::Text(_) | Message::Binary(_)) = msg? {
//!                         ws.send(m).await?;
//!                     }
//!                 }
//!                 Ok::<_, tidewire::Error>(())
//!             });
//!             Ok(response)
//!         }
//!         // 400, 405, 426 ... with the headers the RFC asks for.
//!         Err(err) => Ok(tidewire::hyper::error_response(&err)),
//!     }
//! }
//! ```
//!
//! The connection must be served with upgrades enabled:
//! `hyper::server::conn::http1::Builder::new().serve_connection(io, svc).with_upgrades()`
//! (hyper-util's `auto::Builder::serve_connection_with_upgrades` and
//! `axum::serve` do this). Only HTTP/1.1 upgrades are supported; a request
//! on an HTTP/2 connection (RFC 8441) is refused with 426.
//!
//! [`ServerConfig::handshake_timeout`] does not apply here: hyper reads the
//! request, with its own header timeout.
//!
//! [`Server::serve_http`](crate::Server::serve_http) serves such a service
//! with the server's connection limits, TLS, header deadline and drain;
//! keep the request's [`ConnectionSlot`] with the WebSocket upgraded from
//! it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use ::hyper::upgrade::{OnUpgrade, Upgraded};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tidewire_proto::handshake::ServerHandshake;
use tidewire_proto::{Connection, HandshakeError};

use crate::websocket::IoOptions;
use crate::{Accept, Error, Reject, ServerConfig, WebSocket};

pub use crate::runtime::ConnectionSlot;

/// The transport of a WebSocket mounted in hyper or axum: hyper's upgraded
/// connection, adapted to tokio's I/O traits.
pub type UpgradedStream = TokioIo<Upgraded>;

/// A WebSocket mounted in hyper or axum.
pub type UpgradedWebSocket = WebSocket<UpgradedStream>;

/// Whether a request asks for a WebSocket upgrade (`Upgrade: websocket`),
/// to route the other requests to ordinary HTTP handling. It does not
/// validate the request: [`upgrade`] does.
pub fn is_upgrade_request<B>(request: &Request<B>) -> bool {
    is_upgrade(request.headers())
}

pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
}

/// Validates a WebSocket upgrade request, consults `hook` (as
/// [`accept_with`](crate::accept_with) does: pick a subprotocol, add
/// response headers, or refuse with a status) and negotiates
/// permessage-deflate when `config.protocol.deflate` enables it.
///
/// Returns the `101` response, which the service must answer with (its body
/// is `R::default()`), and the future of the WebSocket. The request's
/// upgrade handle is taken out of its extensions, so call this on the
/// request hyper handed to the service.
///
/// # Errors
/// The reason the request cannot be upgraded; answer with
/// [`error_response`], which gives its status (400, 405, 426, 505, or the
/// hook's) and the headers the RFC asks for.
pub fn upgrade<B, R, F>(
    request: &mut Request<B>,
    config: ServerConfig,
    hook: F,
) -> Result<(Response<R>, Upgrading), HandshakeError>
where
    R: Default,
    F: FnOnce(&ServerHandshake) -> Result<Accept, Reject>,
{
    let head = head_of(
        request.method(),
        request.uri(),
        request.version(),
        request.headers(),
    )?;
    let handshake = ServerHandshake::new(head, config.protocol.clone())?;
    let (handshake, accept) = crate::server::run_hook(handshake, hook)?;
    let (response, connection) =
        handshake.into_response(accept.protocol.as_deref(), &accept.headers);
    let protocol = accept.protocol;
    let on_upgrade = take_on_upgrade(request.extensions_mut())?;
    Ok((
        response.map(|()| R::default()),
        Upgrading::new(on_upgrade, connection, protocol, Arc::new(config.io)),
    ))
}

/// The HTTP answer to a refused upgrade, with any body type that can be
/// made from a `String` (`String`, `http_body_util::Full<Bytes>`, axum's
/// `Body`): see [`HandshakeError::to_http_response`].
pub fn error_response<R: From<String>>(error: &HandshakeError) -> Response<R> {
    error.to_http_response().map(R::from)
}

/// The request head as the handshake validator takes it; refuses what only
/// a server that parses requests itself would otherwise catch (HTTP/1.0).
pub(crate) fn head_of(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
) -> Result<Request<()>, HandshakeError> {
    if version < Version::HTTP_11 {
        return Err(HandshakeError::WrongHttpVersion);
    }
    let mut head = Request::new(());
    *head.method_mut() = method.clone();
    *head.uri_mut() = uri.clone();
    *head.version_mut() = version;
    *head.headers_mut() = headers.clone();
    Ok(head)
}

/// Takes hyper's upgrade handle out of the request extensions.
pub(crate) fn take_on_upgrade(
    extensions: &mut http::Extensions,
) -> Result<OnUpgrade, HandshakeError> {
    extensions
        .remove::<OnUpgrade>()
        .ok_or_else(|| HandshakeError::Rejected {
            status: StatusCode::UPGRADE_REQUIRED,
            reason: "this connection cannot be upgraded: a WebSocket needs HTTP/1.1 \
                     (and a server that enables upgrades)"
                .into(),
        })
}

/// Resolves to the [`UpgradedWebSocket`] once hyper has sent the `101` and
/// handed over the connection. Returned by [`upgrade`]; await it in a task
/// of its own.
///
/// Fails with [`Error::Io`] when hyper could not upgrade the connection
/// (the client went away, or the server does not enable upgrades).
#[must_use = "the WebSocket is only available by awaiting the future"]
pub struct Upgrading {
    on_upgrade: OnUpgrade,
    parts: Option<(Connection, Option<String>, Arc<IoOptions>)>,
}

impl Upgrading {
    pub(crate) fn new(
        on_upgrade: OnUpgrade,
        connection: Connection,
        protocol: Option<String>,
        io: Arc<IoOptions>,
    ) -> Upgrading {
        Upgrading {
            on_upgrade,
            parts: Some((connection, protocol, io)),
        }
    }

    /// The subprotocol the `101` selects, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.parts.as_ref().and_then(|(_, p, _)| p.as_deref())
    }
}

impl std::fmt::Debug for Upgrading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrading")
            .field("protocol", &self.protocol())
            .finish_non_exhaustive()
    }
}

impl Future for Upgrading {
    type Output = Result<UpgradedWebSocket, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let upgraded = ready!(Pin::new(&mut this.on_upgrade).poll(cx))
            .map_err(|e| Error::Io(std::io::Error::other(e)))?;
        let (connection, protocol, io) = this
            .parts
            .take()
            .expect("Upgrading polled after it resolved");
        // Bytes the client sent after the request head stay inside
        // `Upgraded`, which hands them out first: nothing is left over here.
        Poll::Ready(Ok(WebSocket::from_parts(
            TokioIo::new(upgraded),
            connection,
            &[],
            protocol,
            io,
        )))
    }
}
