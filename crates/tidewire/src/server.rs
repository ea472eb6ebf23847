//! Accepting WebSocket connections on any transport.
//!
//! [`accept`] runs the server side of the opening handshake on a stream that
//! is already connected (TCP, TLS, a Unix socket, an in-memory duplex).
//! [`accept_with`] adds a hook that sees the validated request before the
//! upgrade, picks a subprotocol, adds response headers, or rejects the
//! request with a status and a reason.

use std::time::Duration;

use bytes::BytesMut;
use http::{HeaderMap, Request, StatusCode};
use tidewire_proto::handshake::{self, ServerHandshake};
use tidewire_proto::{Config, HandshakeError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::websocket::IoOptions;
use crate::{Error, WebSocket};

/// Server-side settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Protocol limits and permessage-deflate.
    pub protocol: Config,
    /// I/O loop options (close timeout, buffer sizes).
    pub io: IoOptions,
    /// The whole opening handshake must arrive within this time.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            protocol: Config::default(),
            io: IoOptions::default(),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// What the accept hook decided to accept with.
#[derive(Debug, Clone, Default)]
pub struct Accept {
    /// Subprotocol to select; must be one the client offered.
    pub protocol: Option<String>,
    /// Extra headers for the `101` response.
    pub headers: HeaderMap,
}

/// A refusal from the accept hook, sent as an HTTP response.
#[derive(Debug, Clone)]
pub struct Reject {
    /// The HTTP status (e.g. 401, 403, 404).
    pub status: StatusCode,
    /// A reason, sent as the response body.
    pub reason: String,
}

impl Reject {
    /// A refusal with a status and reason.
    pub fn new(status: StatusCode, reason: impl Into<String>) -> Reject {
        Reject {
            status,
            reason: reason.into(),
        }
    }
}

/// Accepts a WebSocket connection with default settings (no compression).
pub async fn accept<S>(stream: S) -> Result<WebSocket<S>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    accept_with(stream, ServerConfig::default(), |_| Ok(Accept::default())).await
}

/// Accepts a WebSocket connection. `hook` sees the validated handshake
/// (request, offered subprotocols) and accepts or rejects it.
///
/// # Errors
/// [`Error::Handshake`] for an invalid or rejected request (the error
/// response has been sent), [`Error::HandshakeTimeout`], [`Error::Io`].
pub async fn accept_with<S, F>(
    mut stream: S,
    config: ServerConfig,
    hook: F,
) -> Result<WebSocket<S>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&ServerHandshake) -> Result<Accept, Reject>,
{
    let (request, leftover) = read_request(&mut stream, &config).await?;
    accept_request(stream, request, &leftover, config, hook).await
}

/// Reads one HTTP request head within the handshake timeout, so the caller
/// can route it: a WebSocket upgrade goes to [`accept_request`], anything
/// else can be answered as ordinary HTTP on the same port. Returns the
/// request and the bytes read after its head.
///
/// # Errors
/// As [`accept_with`]; a malformed, oversized or late request has already
/// been answered with its HTTP error.
pub async fn read_request<S>(
    stream: &mut S,
    config: &ServerConfig,
) -> Result<(Request<()>, BytesMut), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max = config.protocol.max_handshake_size;
    let read = tokio::time::timeout(
        config.handshake_timeout,
        read_head(stream, max, |buf| handshake::parse_request(buf, max)),
    )
    .await;
    match read {
        Err(_) => {
            let err = HandshakeError::Rejected {
                status: StatusCode::REQUEST_TIMEOUT,
                reason: "handshake timed out".into(),
            };
            let _ = send_and_close(stream, &err.to_response()).await;
            Err(Error::HandshakeTimeout)
        }
        Ok(Err(Error::Handshake(err))) => {
            let _ = send_and_close(stream, &err.to_response()).await;
            Err(Error::Handshake(err))
        }
        Ok(Err(e)) => Err(e),
        Ok(Ok((request, mut buf, len))) => {
            let _ = buf.split_to(len);
            Ok((request, buf))
        }
    }
}

/// Completes the handshake for a request read by [`read_request`] (or by
/// another HTTP server): validates it, consults `hook`, and answers `101` or
/// the error.
pub async fn accept_request<S, F>(
    mut stream: S,
    request: Request<()>,
    leftover: &[u8],
    config: ServerConfig,
    hook: F,
) -> Result<WebSocket<S>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnOnce(&ServerHandshake) -> Result<Accept, Reject>,
{
    let result =
        ServerHandshake::new(request, config.protocol.clone()).and_then(|hs| run_hook(hs, hook));
    let (hs, accept) = match result {
        Ok(ok) => ok,
        Err(err) => {
            let _ = send_and_close(&mut stream, &err.to_response()).await;
            return Err(Error::Handshake(err));
        }
    };
    let (response, conn) = hs.accept(accept.protocol.as_deref(), &accept.headers);
    stream.write_all(&response).await?;
    stream.flush().await?;
    Ok(WebSocket::from_parts(
        stream,
        conn,
        leftover,
        accept.protocol,
        config.io,
    ))
}

/// Consults the application's hook and checks that the subprotocol it chose
/// was offered (shared by every way of accepting).
pub(crate) fn run_hook<F>(
    handshake: ServerHandshake,
    hook: F,
) -> Result<(ServerHandshake, Accept), HandshakeError>
where
    F: FnOnce(&ServerHandshake) -> Result<Accept, Reject>,
{
    let accept = hook(&handshake).map_err(|reject| HandshakeError::Rejected {
        status: reject.status,
        reason: reject.reason,
    })?;
    if let Some(p) = &accept.protocol {
        if !handshake.protocols().any(|o| o == p) {
            return Err(HandshakeError::Rejected {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                reason: format!("server chose subprotocol {p:?} that the client did not offer"),
            });
        }
    }
    Ok((handshake, accept))
}

async fn send_and_close<S: AsyncWrite + Unpin>(
    stream: &mut S,
    response: &[u8],
) -> std::io::Result<()> {
    stream.write_all(response).await?;
    stream.flush().await?;
    stream.shutdown().await
}

/// Reads until `parse` finds a complete HTTP head. Returns the parsed head,
/// the buffer, and the head's length (bytes after it belong to the
/// WebSocket stream).
pub(crate) async fn read_head<S, T, P>(
    stream: &mut S,
    max: usize,
    parse: P,
) -> Result<(T, BytesMut, usize), Error>
where
    S: AsyncRead + Unpin,
    P: Fn(&[u8]) -> Result<Option<(T, usize)>, HandshakeError>,
{
    use tokio::io::AsyncReadExt;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if let Some((head, len)) = parse(&buf)? {
            return Ok((head, buf, len));
        }
        buf.reserve(1024.min(max + 1 - buf.len().min(max)));
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed during the opening handshake",
            )));
        }
    }
}
