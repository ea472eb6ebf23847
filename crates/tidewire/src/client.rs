//! Connecting to WebSocket servers.
//!
//! [`connect`] opens `ws://` URLs with default settings;
//! [`ClientBuilder`] adds headers, subprotocols, compression and limits, and
//! can run the handshake over a transport you connected yourself.

use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response};
use tidewire_proto::handshake::{self, ClientHandshake, Target};
use tidewire_proto::{Config, DeflateConfig, HandshakeError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::server::read_head;
use crate::stream::MaybeTlsStream;
use crate::websocket::IoOptions;
use crate::{Error, WebSocket};

/// A client connection over TCP, with or without TLS.
pub type ClientStream = MaybeTlsStream<TcpStream>;

/// Connects to a `ws://` or `wss://` URL with default settings (for `wss://`,
/// the server's certificate is verified against the platform's roots).
pub async fn connect(url: &str) -> Result<(WebSocket<ClientStream>, Response<()>), Error> {
    ClientBuilder::new(url).connect().await
}

/// Builds a client connection.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    headers: HeaderMap,
    protocols: Vec<String>,
    config: Config,
    io: IoOptions,
    timeout: Duration,
    invalid_header: Option<String>,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::TlsConnector>,
}

impl ClientBuilder {
    /// A builder for `url` (`ws://host[:port]/path`).
    pub fn new(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            headers: HeaderMap::new(),
            protocols: Vec::new(),
            config: Config::default(),
            io: IoOptions::default(),
            timeout: Duration::from_secs(30),
            invalid_header: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// Adds a request header (e.g. `Authorization`, `Origin`, `Cookie`).
    /// An invalid name or value makes `connect` fail with a clear error.
    pub fn header(mut self, name: &str, value: &str) -> ClientBuilder {
        match (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            (Ok(n), Ok(v)) => {
                self.headers.append(n, v);
            }
            _ => self.invalid_header = Some(format!("{name}: {value}")),
        }
        self
    }

    /// Offers a subprotocol (call repeatedly, in order of preference).
    pub fn protocol(mut self, protocol: impl Into<String>) -> ClientBuilder {
        self.protocols.push(protocol.into());
        self
    }

    /// Offers permessage-deflate with these settings (`None`: don't offer).
    pub fn deflate(mut self, deflate: Option<DeflateConfig>) -> ClientBuilder {
        self.config.deflate = deflate;
        self
    }

    /// Replaces the protocol configuration (limits and deflate).
    pub fn config(mut self, config: Config) -> ClientBuilder {
        self.config = config;
        self
    }

    /// Replaces the I/O options (close timeout, buffer sizes).
    pub fn io_options(mut self, io: IoOptions) -> ClientBuilder {
        self.io = io;
        self
    }

    /// Deadline for TCP connect plus the opening handshake.
    pub fn timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.timeout = timeout;
        self
    }

    /// The TLS settings for `wss://` (default: the platform's roots).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, connector: crate::tls::TlsConnector) -> ClientBuilder {
        self.tls = Some(connector);
        self
    }

    /// Connects over TCP (and TLS for `wss://`) and runs the handshake.
    ///
    /// # Errors
    /// [`Error::Handshake`] for a bad URL or response ([`HandshakeError::UnexpectedStatus`]
    /// when the server refused), [`Error::HandshakeTimeout`], [`Error::Io`].
    pub async fn connect(self) -> Result<(WebSocket<ClientStream>, Response<()>), Error> {
        let target = Target::parse(&self.url)?;
        let timeout = self.timeout;
        tokio::time::timeout(timeout, async move {
            let stream = TcpStream::connect((target.host.as_str(), target.port)).await?;
            stream.set_nodelay(true)?;
            let stream = if target.tls {
                self.wrap_tls(&target.host, stream).await?
            } else {
                MaybeTlsStream::Plain(stream)
            };
            self.handshake(stream).await
        })
        .await
        .map_err(|_| Error::HandshakeTimeout)?
    }

    #[cfg(feature = "tls")]
    async fn wrap_tls(&self, host: &str, stream: TcpStream) -> Result<ClientStream, Error> {
        let connector = match &self.tls {
            Some(c) => c.clone(),
            None => crate::tls::TlsConnector::platform()?,
        };
        Ok(MaybeTlsStream::ClientTls(Box::new(
            connector.connect(host, stream).await?,
        )))
    }

    #[cfg(not(feature = "tls"))]
    async fn wrap_tls(&self, _host: &str, _stream: TcpStream) -> Result<ClientStream, Error> {
        Err(
            HandshakeError::InvalidUrl(format!("{}: wss:// needs the `tls` feature", self.url))
                .into(),
        )
    }

    /// Runs the handshake over a transport that is already connected (a TLS
    /// stream, a proxy tunnel, an in-memory pipe).
    pub async fn connect_on<S>(self, stream: S) -> Result<(WebSocket<S>, Response<()>), Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.handshake(stream))
            .await
            .map_err(|_| Error::HandshakeTimeout)?
    }

    async fn handshake<S>(self, mut stream: S) -> Result<(WebSocket<S>, Response<()>), Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if let Some(bad) = self.invalid_header {
            return Err(HandshakeError::InvalidUrl(format!("invalid header {bad:?}")).into());
        }
        let max = self.config.max_handshake_size;
        let (client, request) =
            ClientHandshake::new(&self.url, &self.headers, &self.protocols, self.config)?;
        stream.write_all(&request).await?;
        stream.flush().await?;
        let (response, buf, len) =
            read_head(&mut stream, max, |b| handshake::parse_response(b, max)).await?;
        let accepted = client.finish(response)?;
        let ws = WebSocket::from_parts(
            stream,
            accepted.connection,
            &buf[len..],
            accepted.protocol,
            self.io,
        );
        Ok((ws, accepted.response))
    }
}
