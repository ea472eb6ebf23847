//! A small HTTP/1.1 client for the proxy callbacks and the JWKS fetch:
//! one request per connection, http:// or https:// (rustls through
//! tidewire's connector), a deadline, a bounded response body.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Largest response body read.
const MAX_RESPONSE: usize = 1 << 20;

fn tls() -> Result<&'static tidewire::tls::TlsConnector, String> {
    static CONNECTOR: OnceLock<Result<tidewire::tls::TlsConnector, String>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| tidewire::tls::TlsConnector::platform().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

/// Sends a request and reads the response, within `timeout`.
///
/// # Errors
/// A message saying what failed (URL, connection, TLS, HTTP, timeout).
pub async fn request(
    method: Method,
    url: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), String> {
    tokio::time::timeout(timeout, request_inner(method, url, body))
        .await
        .map_err(|_| format!("{url}: no answer within {timeout:?}"))?
}

async fn request_inner(
    method: Method,
    url: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("{url}: only http:// and https:// URLs")),
    };
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let host_for_tls = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((host_for_tls, port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, "tidewire-hub");
    if body.is_some() {
        builder = builder.header(http::header::CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| format!("{url}: {e}"))?;
    if https {
        let stream = tls()?
            .connect(host_for_tls, tcp)
            .await
            .map_err(|e| format!("{url}: TLS: {e}"))?;
        send(TokioIo::new(stream), request, url).await
    } else {
        send(TokioIo::new(tcp), request, url).await
    }
}

async fn send<I>(
    io: I,
    request: Request<Full<Bytes>>,
    url: &str,
) -> Result<(StatusCode, Bytes), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| format!("{url}: reading the response: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}
