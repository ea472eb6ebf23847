//! The opening handshake (RFC 6455 §4), both sides, without I/O.
//!
//! Server: [`parse_request`] reads an HTTP/1.1 request from a buffer (bounded
//! in size), [`ServerHandshake::new`] validates it and negotiates
//! permessage-deflate, and [`ServerHandshake::accept`] produces the `101`
//! response and the [`Connection`]. Every refusal is a [`HandshakeError`]
//! that knows its HTTP status and renders a response saying what was wrong.
//!
//! Client: [`ClientHandshake::new`] builds the request, [`parse_response`]
//! reads the answer and [`ClientHandshake::finish`] checks it.

use base64::Engine as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use sha1::{Digest, Sha1};

use crate::connection::{Config, Connection, Role};
use crate::deflate::{self, DeflateParams};

/// The GUID of RFC 6455 §1.3.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Most headers accepted in a request or response.
const MAX_HEADERS: usize = 64;

/// Why a handshake was refused. Server-side variants map to an HTTP status
/// ([`status`](Self::status)); client-side variants describe a bad response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The request line or headers are not valid HTTP/1.1.
    #[error("malformed HTTP request: {0}")]
    MalformedRequest(String),
    /// The handshake grew past the size limit without ending.
    #[error("handshake larger than {0} bytes")]
    TooLarge(usize),
    /// More than 64 headers.
    #[error("too many headers")]
    TooManyHeaders,
    /// HTTP/1.0 or another version.
    #[error("HTTP/1.1 or later is required")]
    WrongHttpVersion,
    /// Not a GET request.
    #[error("method {0} is not allowed; a WebSocket handshake uses GET")]
    MethodNotAllowed(String),
    /// No Host header.
    #[error("missing Host header")]
    MissingHost,
    /// No `Upgrade: websocket`.
    #[error("missing or wrong Upgrade header: expected \"websocket\"")]
    NotWebSocketUpgrade,
    /// No `upgrade` token in Connection.
    #[error("missing \"upgrade\" in Connection header")]
    MissingConnectionUpgrade,
    /// Sec-WebSocket-Version missing or not 13.
    #[error("unsupported Sec-WebSocket-Version {}; supported: 13", .0.as_deref().map_or("(missing)".to_string(), |v| format!("{v:?}")))]
    UnsupportedVersion(Option<String>),
    /// Sec-WebSocket-Key missing, repeated, or not 16 bytes in base64.
    #[error("missing or invalid Sec-WebSocket-Key: it must be 16 random bytes in base64")]
    InvalidKey,
    /// The application refused the request (its own status and reason).
    #[error("{status}: {reason}")]
    Rejected {
        /// Status to answer with.
        status: StatusCode,
        /// Reason shown in the response body.
        reason: String,
    },
    /// Client side: the response is not valid HTTP.
    #[error("malformed HTTP response: {0}")]
    MalformedResponse(String),
    /// Client side: the server answered with another status than 101.
    #[error("server answered {0} instead of 101 Switching Protocols")]
    UnexpectedStatus(StatusCode),
    /// Client side: Sec-WebSocket-Accept missing or wrong.
    #[error("wrong Sec-WebSocket-Accept")]
    WrongAccept,
    /// Client side: a subprotocol that was not offered, or several.
    #[error("server chose subprotocol {0:?} that was not offered")]
    UnexpectedProtocol(String),
    /// Client side: an extension that was not offered, or bad parameters.
    #[error("bad Sec-WebSocket-Extensions in response: {0}")]
    BadExtension(String),
    /// Client side: a subprotocol name that is not an HTTP token (RFC 6455
    /// §4.1: tokens only, so no header can be smuggled through one).
    #[error("invalid subprotocol name {0:?}: it must be an HTTP token")]
    InvalidProtocol(String),
    /// Client side: the URL cannot be used for a WebSocket connection.
    #[error("invalid WebSocket URL: {0}")]
    InvalidUrl(String),
}

impl HandshakeError {
    /// The HTTP status a server answers this error with.
    pub fn status(&self) -> StatusCode {
        match self {
            HandshakeError::TooLarge(_) | HandshakeError::TooManyHeaders => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            HandshakeError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            HandshakeError::UnsupportedVersion(_) | HandshakeError::NotWebSocketUpgrade => {
                StatusCode::UPGRADE_REQUIRED
            }
            HandshakeError::WrongHttpVersion => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            HandshakeError::Rejected { status, .. } => *status,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The full HTTP response a server sends for this error: its status,
    /// the headers the RFC asks for, and a plain-text body saying what was
    /// wrong. The connection is closed after it.
    pub fn to_response(&self) -> Vec<u8> {
        let mut extra = Vec::new();
        write_headers(&mut extra, &self.rfc_headers());
        let extra = String::from_utf8_lossy(&extra);
        http_response(self.status(), &extra, &self.reason())
    }

    /// The same answer as [`to_response`](Self::to_response), as an
    /// [`http::Response`] for an HTTP server that writes the response
    /// itself (hyper, axum): the status, the headers the RFC asks for
    /// (`Upgrade` and `Sec-WebSocket-Version: 13` with 426, `Allow: GET`
    /// with 405), `Content-Type: text/plain`, and the reason as the body.
    /// The server decides about `Content-Length` and keep-alive.
    pub fn to_http_response(&self) -> Response<String> {
        let mut response = Response::new(format!("{}\n", self.reason()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.extend(self.rfc_headers());
        response
    }

    /// The headers RFC 6455 (§4.2.2, §4.4) and RFC 9110 ask for with this
    /// error's status.
    fn rfc_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        match self {
            HandshakeError::UnsupportedVersion(_) | HandshakeError::NotWebSocketUpgrade => {
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            HandshakeError::MethodNotAllowed(_) => {
                headers.insert(header::ALLOW, HeaderValue::from_static("GET"));
            }
            _ => {}
        }
        headers
    }

    /// The text of the response body.
    fn reason(&self) -> String {
        match self {
            HandshakeError::Rejected { reason, .. } => reason.clone(),
            other => other.to_string(),
        }
    }
}

/// The spelling RFC 6455 uses for the headers of the handshake (HTTP header
/// names are case-insensitive, but some peers and many humans read them).
fn canonical_name(name: &HeaderName) -> &str {
    match name.as_str() {
        "upgrade" => "Upgrade",
        "connection" => "Connection",
        "allow" => "Allow",
        "sec-websocket-accept" => "Sec-WebSocket-Accept",
        "sec-websocket-protocol" => "Sec-WebSocket-Protocol",
        "sec-websocket-extensions" => "Sec-WebSocket-Extensions",
        "sec-websocket-version" => "Sec-WebSocket-Version",
        other => other,
    }
}

/// Appends `Name: value\r\n` lines for every header, in the map's order.
fn write_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(canonical_name(name).as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Whether `s` is an HTTP token (RFC 7230 §3.2.6).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Renders a small `Connection: close` response with a text body.
pub fn http_response(status: StatusCode, extra_headers: &str, body: &str) -> Vec<u8> {
    let body = format!("{body}\n");
    format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n{}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        extra_headers,
        body
    )
    .into_bytes()
}

/// `Sec-WebSocket-Accept` for a key (§4.2.2 step 5.4).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

fn header_list(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
}

fn to_header_map(parsed: &[httparse::Header<'_>]) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| e.to_string())?;
        let value = HeaderValue::from_bytes(h.value).map_err(|e| e.to_string())?;
        map.append(name, value);
    }
    Ok(map)
}

/// Parses an HTTP request from the start of `buf`. Returns the request and
/// the number of bytes it took, or `Ok(None)` when more bytes are needed.
/// Once `buf` holds `max_size` bytes without a complete request, fails with
/// [`HandshakeError::TooLarge`]. An HTTP/1.0 request parses (a load
/// balancer's health check, say); [`ServerHandshake::new`] refuses it as
/// an upgrade.
pub fn parse_request(
    buf: &[u8],
    max_size: usize,
) -> Result<Option<(Request<()>, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let window = &buf[..buf.len().min(max_size)];
    let len = match req.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if window.len() >= max_size => {
            return Err(HandshakeError::TooLarge(max_size))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
        Err(e) => return Err(HandshakeError::MalformedRequest(e.to_string())),
    };
    let version = match req.version {
        Some(1) => http::Version::HTTP_11,
        Some(0) => http::Version::HTTP_10,
        _ => return Err(HandshakeError::WrongHttpVersion),
    };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|e| HandshakeError::MalformedRequest(e.to_string()))?;
    let uri: Uri = req
        .path
        .unwrap_or("/")
        .parse()
        .map_err(|e: http::uri::InvalidUri| HandshakeError::MalformedRequest(e.to_string()))?;
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() =
        to_header_map(req.headers).map_err(HandshakeError::MalformedRequest)?;
    Ok(Some((request, len)))
}

/// Whether a request asks for a WebSocket upgrade at all (used to route
/// ordinary HTTP requests elsewhere).
pub fn is_upgrade_request(request: &Request<()>) -> bool {
    header_has_token(request.headers(), header::UPGRADE, "websocket")
}

/// The permessage-deflate agreement for the client's offers, if `config`
/// enables it: the parameters and the response header value.
fn negotiate_deflate(headers: &HeaderMap, config: &Config) -> Option<(DeflateParams, String)> {
    let cfg = config.deflate.as_ref()?;
    let offers = deflate::parse_extensions(header_list(headers, header::SEC_WEBSOCKET_EXTENSIONS));
    deflate::negotiate_server(&offers, cfg)
}

/// A validated client request, ready to be accepted or rejected.
#[derive(Debug)]
pub struct ServerHandshake {
    request: Request<()>,
    accept: String,
    deflate: Option<(DeflateParams, String)>,
    config: Config,
}

impl ServerHandshake {
    /// Validates a request (§4.2.1) and negotiates permessage-deflate when
    /// `config.deflate` enables it.
    pub fn new(request: Request<()>, config: Config) -> Result<ServerHandshake, HandshakeError> {
        // §4.1: "The method of the request MUST be GET, and the HTTP
        // version MUST be at least 1.1."
        if request.version() < http::Version::HTTP_11 {
            return Err(HandshakeError::WrongHttpVersion);
        }
        if request.method() != Method::GET {
            return Err(HandshakeError::MethodNotAllowed(
                request.method().to_string(),
            ));
        }
        let headers = request.headers();
        if headers.get(header::HOST).is_none() {
            return Err(HandshakeError::MissingHost);
        }
        if !header_has_token(headers, header::UPGRADE, "websocket") {
            return Err(HandshakeError::NotWebSocketUpgrade);
        }
        if !header_has_token(headers, header::CONNECTION, "upgrade") {
            return Err(HandshakeError::MissingConnectionUpgrade);
        }
        let mut versions = headers.get_all(header::SEC_WEBSOCKET_VERSION).iter();
        match (versions.next(), versions.next()) {
            (Some(v), None) if v.as_bytes() == b"13" => {}
            (v, _) => {
                return Err(HandshakeError::UnsupportedVersion(
                    v.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
                ))
            }
        }
        let mut keys = headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
        let key = match (keys.next(), keys.next()) {
            (Some(k), None) => k.as_bytes().trim_ascii(),
            _ => return Err(HandshakeError::InvalidKey),
        };
        match base64::engine::general_purpose::STANDARD.decode(key) {
            Ok(raw) if raw.len() == 16 => {}
            _ => return Err(HandshakeError::InvalidKey),
        }
        let accept = accept_key(key);
        let deflate = negotiate_deflate(headers, &config);
        Ok(ServerHandshake {
            request,
            accept,
            deflate,
            config,
        })
    }

    /// The validated request, for routing, origin and authentication checks.
    pub fn request(&self) -> &Request<()> {
        &self.request
    }

    /// Subprotocols the client offered, in its order of preference.
    pub fn protocols(&self) -> impl Iterator<Item = &str> {
        header_list(self.request.headers(), header::SEC_WEBSOCKET_PROTOCOL)
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
    }

    /// The agreed permessage-deflate parameters, if any.
    pub fn deflate(&self) -> Option<DeflateParams> {
        self.deflate.as_ref().map(|(p, _)| *p)
    }

    /// Replaces the configuration, negotiating permessage-deflate again
    /// under the new one: for a server that validates the request before it
    /// knows its settings (an extractor whose settings come later).
    pub fn with_config(mut self, config: Config) -> ServerHandshake {
        self.deflate = negotiate_deflate(self.request.headers(), &config);
        self.config = config;
        self
    }

    /// Accepts the handshake. `protocol` must be one the client offered (or
    /// `None`); `extra_headers` are added to the response. Returns the
    /// `101` response bytes and the server-side connection.
    ///
    /// # Panics
    /// When `protocol` is not among [`protocols`](Self::protocols): that is a
    /// bug in the caller, which the browser would reject anyway.
    pub fn accept(
        self,
        protocol: Option<&str>,
        extra_headers: &HeaderMap,
    ) -> (Vec<u8>, Connection) {
        let (response, connection) = self.into_response(protocol, extra_headers);
        let mut bytes = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
        write_headers(&mut bytes, response.headers());
        bytes.extend_from_slice(b"\r\n");
        (bytes, connection)
    }

    /// Accepts the handshake for an HTTP server that writes the response
    /// itself (hyper, axum): as [`accept`](Self::accept), but the `101`
    /// comes as an [`http::Response`] with `Upgrade`, `Connection`,
    /// `Sec-WebSocket-Accept`, the chosen `Sec-WebSocket-Protocol`, the
    /// agreed `Sec-WebSocket-Extensions` and then `extra_headers`.
    ///
    /// # Panics
    /// As [`accept`](Self::accept), when `protocol` was not offered.
    pub fn into_response(
        self,
        protocol: Option<&str>,
        extra_headers: &HeaderMap,
    ) -> (Response<()>, Connection) {
        if let Some(p) = protocol {
            assert!(
                self.protocols().any(|o| o == p),
                "subprotocol {p:?} was not offered by the client"
            );
        }
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *response.version_mut() = http::Version::HTTP_11;
        let headers = response.headers_mut();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&self.accept).expect("base64 is a valid header value"),
        );
        if let Some(p) = protocol {
            // An offered token, taken from a valid header value.
            headers.insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(p).expect("offered subprotocol is a valid header value"),
            );
        }
        if let Some((_, ext)) = &self.deflate {
            headers.insert(
                header::SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_str(ext).expect("extension response is a valid header value"),
            );
        }
        for (name, value) in extra_headers {
            headers.append(name, value.clone());
        }
        let connection = Connection::new(Role::Server, self.config, self.deflate.map(|(p, _)| p));
        (response, connection)
    }
}

/// The client's side of the handshake: the request it sent and what it
/// expects back.
#[derive(Debug)]
pub struct ClientHandshake {
    expected_accept: String,
    protocols: Vec<String>,
    config: Config,
}

/// What the server agreed to, besides the connection itself.
#[derive(Debug)]
pub struct Accepted {
    /// The server's response.
    pub response: Response<()>,
    /// The subprotocol the server chose.
    pub protocol: Option<String>,
    /// The connection, ready for messages.
    pub connection: Connection,
}

impl ClientHandshake {
    /// Builds the opening request for a `ws://` or `wss://` URL with
    /// additional headers and offered subprotocols. Returns the handshake
    /// state and the request bytes to send.
    pub fn new(
        url: &str,
        extra_headers: &HeaderMap,
        protocols: &[String],
        config: Config,
    ) -> Result<(ClientHandshake, Vec<u8>), HandshakeError> {
        let target = Target::parse(url)?;
        if let Some(bad) = protocols.iter().find(|p| !is_token(p)) {
            return Err(HandshakeError::InvalidProtocol(bad.clone()));
        }
        let key_bytes: [u8; 16] = rand::random();
        let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
        let mut request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
            target.path_and_query, target.host_header, key
        );
        if !protocols.is_empty() {
            request.push_str(&format!(
                "Sec-WebSocket-Protocol: {}\r\n",
                protocols.join(", ")
            ));
        }
        if let Some(cfg) = &config.deflate {
            request.push_str(&format!(
                "Sec-WebSocket-Extensions: {}\r\n",
                deflate::client_offer(cfg)
            ));
        }
        let mut request = request.into_bytes();
        for (name, value) in extra_headers {
            request.extend_from_slice(name.as_str().as_bytes());
            request.extend_from_slice(b": ");
            request.extend_from_slice(value.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        Ok((
            ClientHandshake {
                expected_accept: accept_key(key.as_bytes()),
                protocols: protocols.to_vec(),
                config,
            },
            request,
        ))
    }

    /// Checks the server's response (§4.1, the client's requirements).
    pub fn finish(self, response: Response<()>) -> Result<Accepted, HandshakeError> {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(HandshakeError::UnexpectedStatus(response.status()));
        }
        let headers = response.headers();
        if !header_has_token(headers, header::UPGRADE, "websocket") {
            return Err(HandshakeError::NotWebSocketUpgrade);
        }
        if !header_has_token(headers, header::CONNECTION, "upgrade") {
            return Err(HandshakeError::MissingConnectionUpgrade);
        }
        let accept = headers
            .get(header::SEC_WEBSOCKET_ACCEPT)
            .map(|v| v.as_bytes());
        if accept != Some(self.expected_accept.as_bytes()) {
            return Err(HandshakeError::WrongAccept);
        }
        let chosen: Vec<&str> = header_list(headers, header::SEC_WEBSOCKET_PROTOCOL).collect();
        let protocol = match chosen.as_slice() {
            [] => None,
            [p] if self.protocols.iter().any(|o| o == p.trim()) => Some(p.trim().to_string()),
            other => return Err(HandshakeError::UnexpectedProtocol(other.join(","))),
        };
        let extensions =
            deflate::parse_extensions(header_list(headers, header::SEC_WEBSOCKET_EXTENSIONS));
        let deflate = match (extensions.as_slice(), &self.config.deflate) {
            ([], _) => None,
            ([ext], Some(cfg)) if ext.name == deflate::EXTENSION_NAME => Some(
                deflate::accept_client_response(ext, cfg)
                    .map_err(|e| HandshakeError::BadExtension(e.to_string()))?,
            ),
            (exts, _) => {
                let names: Vec<&str> = exts.iter().map(|e| e.name.as_str()).collect();
                return Err(HandshakeError::BadExtension(format!(
                    "not offered: {}",
                    names.join(", ")
                )));
            }
        };
        let connection = Connection::new(Role::Client, self.config, deflate);
        Ok(Accepted {
            response,
            protocol,
            connection,
        })
    }
}

/// Parses an HTTP response from the start of `buf`; `Ok(None)` when more
/// bytes are needed. Fails once `max_size` bytes hold no complete response.
pub fn parse_response(
    buf: &[u8],
    max_size: usize,
) -> Result<Option<(Response<()>, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let window = &buf[..buf.len().min(max_size)];
    let len = match resp.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if window.len() >= max_size => {
            return Err(HandshakeError::TooLarge(max_size))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HandshakeError::MalformedResponse(e.to_string())),
    };
    let status = StatusCode::from_u16(resp.code.unwrap_or(0))
        .map_err(|e| HandshakeError::MalformedResponse(e.to_string()))?;
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() =
        to_header_map(resp.headers).map_err(HandshakeError::MalformedResponse)?;
    Ok(Some((response, len)))
}

/// Where a WebSocket URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `true` for `wss://`.
    pub tls: bool,
    /// Host name or address, without brackets for IPv6.
    pub host: String,
    /// Port, defaulted from the scheme.
    pub port: u16,
    /// Value for the Host header (port omitted when it is the default).
    pub host_header: String,
    /// Request target: path and query, at least `/`.
    pub path_and_query: String,
}

impl Target {
    /// Parses `ws://host[:port][/path][?query]` or `wss://...`.
    pub fn parse(url: &str) -> Result<Target, HandshakeError> {
        let bad = |why: &str| HandshakeError::InvalidUrl(format!("{url}: {why}"));
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let tls = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("ws") | Some("http") => false,
            Some("wss") | Some("https") => true,
            _ => return Err(bad("the scheme must be ws:// or wss://")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information in the URL is not supported"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let default_port = if tls { 443 } else { 80 };
        let port = authority.port_u16().unwrap_or(default_port);
        let host_header = if port == default_port {
            authority.host().to_string()
        } else {
            format!("{}:{}", authority.host(), port)
        };
        let path_and_query = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/");
        let path_and_query = if path_and_query.starts_with('/') {
            path_and_query.to_string()
        } else {
            format!("/{path_and_query}")
        };
        Ok(Target {
            tls,
            host,
            port,
            host_header,
            path_and_query,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn server(req: &[u8]) -> Result<ServerHandshake, HandshakeError> {
        let (request, len) = parse_request(req, 8192)?.expect("complete");
        assert_eq!(len, req.len());
        ServerHandshake::new(request, Config::default())
    }

    fn replace(from: &str, to: &str) -> Vec<u8> {
        String::from_utf8(RFC_REQUEST.to_vec())
            .unwrap()
            .replace(from, to)
            .into_bytes()
    }

    #[test]
    fn rfc6455_1_3_accept_key() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn rfc6455_4_2_2_server_accepts_the_rfc_request() {
        let hs = server(RFC_REQUEST).unwrap();
        assert_eq!(hs.protocols().collect::<Vec<_>>(), ["chat", "superchat"]);
        let (response, _conn) = hs.accept(Some("chat"), &HeaderMap::new());
        let text = String::from_utf8(response).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: chat\r\n"));
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn into_response_and_accept_carry_the_same_headers() {
        let cfg = Config {
            deflate: Some(Default::default()),
            ..Config::default()
        };
        let req = replace(
            "Sec-WebSocket-Version: 13\r\n",
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n",
        );
        let (request, _) = parse_request(&req, 8192).unwrap().unwrap();
        let mut extra = HeaderMap::new();
        extra.insert("x-served-by", HeaderValue::from_static("tidewire"));
        let hs = ServerHandshake::new(request.clone(), cfg.clone()).unwrap();
        let (response, conn) = hs.into_response(Some("superchat"), &extra);
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        let h = response.headers();
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "Upgrade");
        assert_eq!(h["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(h["sec-websocket-protocol"], "superchat");
        assert_eq!(h["sec-websocket-extensions"], "permessage-deflate");
        assert_eq!(h["x-served-by"], "tidewire");
        assert!(conn.deflate_params().is_some());

        let hs = ServerHandshake::new(request.clone(), Config::default()).unwrap();
        assert!(hs.deflate().is_none());
        let hs = hs.with_config(cfg.clone());
        assert!(hs.deflate().is_some());
        assert!(ServerHandshake::new(request.clone(), cfg.clone())
            .unwrap()
            .with_config(Config::default())
            .deflate()
            .is_none());
        let hs = ServerHandshake::new(request, cfg).unwrap();
        let (bytes, _) = hs.accept(Some("superchat"), &extra);
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: superchat\r\n\
             Sec-WebSocket-Extensions: permessage-deflate\r\nx-served-by: tidewire\r\n\r\n"
        );
    }

    #[test]
    fn to_http_response_matches_to_response() {
        let cases = [
            HandshakeError::UnsupportedVersion(Some("8".into())),
            HandshakeError::NotWebSocketUpgrade,
            HandshakeError::MethodNotAllowed("POST".into()),
            HandshakeError::InvalidKey,
            HandshakeError::Rejected {
                status: StatusCode::FORBIDDEN,
                reason: "no entry".into(),
            },
        ];
        for err in cases {
            let response = err.to_http_response();
            assert_eq!(response.status(), err.status());
            let raw = String::from_utf8(err.to_response()).unwrap();
            assert!(
                raw.ends_with(&format!("\r\n\r\n{}", response.body())),
                "{raw}"
            );
            for (name, value) in response.headers() {
                let line = format!("{}: {}\r\n", canonical_name(name), value.to_str().unwrap());
                assert!(
                    raw.to_ascii_lowercase()
                        .contains(&line.to_ascii_lowercase()),
                    "{raw} lacks {line}"
                );
            }
        }
        let version = HandshakeError::UnsupportedVersion(None).to_http_response();
        assert_eq!(version.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(version.headers()["sec-websocket-version"], "13");
        assert_eq!(version.headers()["upgrade"], "websocket");
        let method = HandshakeError::MethodNotAllowed("POST".into()).to_http_response();
        assert_eq!(method.headers()["allow"], "GET");
        assert!(method.body().contains("method POST is not allowed"));
    }

    #[test]
    fn rfc6455_4_2_1_header_tokens_are_case_insensitive_lists() {
        let req = replace("Upgrade: websocket", "upgrade: WebSocket");
        let req = String::from_utf8(req)
            .unwrap()
            .replace("Connection: Upgrade", "connection: keep-alive, UPGRADE");
        assert!(server(req.as_bytes()).is_ok());
    }

    #[test]
    fn rfc6455_4_2_1_rejections_say_what_was_wrong() {
        let cases: &[(Vec<u8>, HandshakeError, u16)] = &[
            (
                replace("GET", "POST"),
                HandshakeError::MethodNotAllowed("POST".into()),
                405,
            ),
            (
                replace("Host: server.example.com\r\n", ""),
                HandshakeError::MissingHost,
                400,
            ),
            (
                replace("Upgrade: websocket\r\n", ""),
                HandshakeError::NotWebSocketUpgrade,
                426,
            ),
            (
                replace("Connection: Upgrade", "Connection: keep-alive"),
                HandshakeError::MissingConnectionUpgrade,
                400,
            ),
            (
                replace("Version: 13", "Version: 8"),
                HandshakeError::UnsupportedVersion(Some("8".into())),
                426,
            ),
            (
                replace("Sec-WebSocket-Version: 13\r\n", ""),
                HandshakeError::UnsupportedVersion(None),
                426,
            ),
            (
                replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="),
                HandshakeError::InvalidKey,
                400,
            ),
            (
                replace("dGhlIHNhbXBsZSBub25jZQ==", "not base64!"),
                HandshakeError::InvalidKey,
                400,
            ),
        ];
        for (req, expected, status) in cases {
            let err = server(req).unwrap_err();
            assert_eq!(&err, expected);
            assert_eq!(err.status().as_u16(), *status);
            let response = String::from_utf8(err.to_response()).unwrap();
            assert!(
                response.starts_with(&format!("HTTP/1.1 {status} ")),
                "{response}"
            );
            assert!(response.contains(&err.to_string()));
        }
        let version = String::from_utf8(
            server(&replace("Version: 13", "Version: 8"))
                .unwrap_err()
                .to_response(),
        )
        .unwrap();
        assert!(version.contains("Sec-WebSocket-Version: 13\r\n"));
    }

    #[test]
    fn http_1_0_upgrades_and_garbage_are_rejected() {
        // An HTTP/1.0 request parses (for a server's other routes) but is
        // no upgrade.
        let req = replace("HTTP/1.1", "HTTP/1.0");
        let (request, _) = parse_request(&req, 8192).unwrap().unwrap();
        assert_eq!(request.version(), http::Version::HTTP_10);
        assert_eq!(
            ServerHandshake::new(request, Config::default()).unwrap_err(),
            HandshakeError::WrongHttpVersion
        );

        assert!(matches!(
            parse_request(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 8192),
            Err(HandshakeError::MalformedRequest(_))
        ));
    }

    #[test]
    fn handshake_size_is_bounded() {
        for len in 0..RFC_REQUEST.len() {
            assert!(parse_request(&RFC_REQUEST[..len], 8192).unwrap().is_none());
        }
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 10_000));
        assert_eq!(
            parse_request(&huge, 8192).unwrap_err(),
            HandshakeError::TooLarge(8192)
        );
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend(format!("X-{i}: y\r\n").bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(
            parse_request(&many, 8192).unwrap_err(),
            HandshakeError::TooManyHeaders
        );
    }

    #[test]
    fn client_and_server_agree() {
        let cfg = Config {
            deflate: Some(Default::default()),
            ..Config::default()
        };
        let (client, request) = ClientHandshake::new(
            "ws://localhost:9001/chat?room=1",
            &HeaderMap::new(),
            &["chat".into()],
            cfg.clone(),
        )
        .unwrap();
        let text = String::from_utf8(request.clone()).unwrap();
        assert!(text.starts_with("GET /chat?room=1 HTTP/1.1\r\nHost: localhost:9001\r\n"));
        let (req, _) = parse_request(&request, 8192).unwrap().unwrap();
        let hs = ServerHandshake::new(req, cfg).unwrap();
        assert!(hs.deflate().is_some());
        let (response, _) = hs.accept(Some("chat"), &HeaderMap::new());
        let (resp, len) = parse_response(&response, 8192).unwrap().unwrap();
        assert_eq!(len, response.len());
        let accepted = client.finish(resp).unwrap();
        assert_eq!(accepted.protocol.as_deref(), Some("chat"));
        assert!(accepted.connection.deflate_params().is_some());
    }

    #[test]
    fn client_rejects_a_wrong_accept_or_unoffered_protocol() {
        let (client, _) =
            ClientHandshake::new("ws://h/", &HeaderMap::new(), &[], Config::default()).unwrap();
        let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        let (resp, _) = parse_response(resp, 8192).unwrap().unwrap();
        assert_eq!(
            client.finish(resp).unwrap_err(),
            HandshakeError::WrongAccept
        );
        let (client, _) =
            ClientHandshake::new("ws://h/", &HeaderMap::new(), &[], Config::default()).unwrap();
        let resp = b"HTTP/1.1 404 Not Found\r\n\r\n";
        let (resp, _) = parse_response(resp, 8192).unwrap().unwrap();
        assert_eq!(
            client.finish(resp).unwrap_err(),
            HandshakeError::UnexpectedStatus(StatusCode::NOT_FOUND)
        );
    }

    #[test]
    fn rfc6455_4_1_subprotocols_must_be_tokens() {
        for bad in ["chat\r\nX-Injected: 1", "two words", "", "a,b"] {
            let err = ClientHandshake::new(
                "ws://h/",
                &HeaderMap::new(),
                &[bad.to_string()],
                Config::default(),
            )
            .unwrap_err();
            assert_eq!(err, HandshakeError::InvalidProtocol(bad.to_string()));
        }
        assert!(ClientHandshake::new(
            "ws://h/",
            &HeaderMap::new(),
            &["v2.chat".into(), "token.abc-1_2".into()],
            Config::default()
        )
        .is_ok());
    }

    #[test]
    fn urls() {
        let t = Target::parse("wss://[::1]:8443/a?b=c").unwrap();
        assert_eq!(
            (
                t.tls,
                t.host.as_str(),
                t.port,
                t.host_header.as_str(),
                t.path_and_query.as_str()
            ),
            (true, "::1", 8443, "[::1]:8443", "/a?b=c")
        );
        let t = Target::parse("ws://example.com").unwrap();
        assert_eq!(
            (t.port, t.host_header.as_str(), t.path_and_query.as_str()),
            (80, "example.com", "/")
        );
        assert!(Target::parse("ftp://x/").is_err());
        assert!(Target::parse("ws://user:pw@x/").is_err());
    }
}
