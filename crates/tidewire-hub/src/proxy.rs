//! Optional HTTP callbacks to the application backend, so that an app can
//! validate and enrich events: on `connect` (decide the user and its info,
//! or refuse) and on client `publish` (refuse, or replace the data).
//!
//! Both are `POST` with a JSON body; the backend answers `200` with
//! `{"result":{…}}` or `{"error":{"code":N,"message":"…"}}`. Any other
//! answer, or none within the timeout, fails the command with 114
//! (unavailable). See `docs/api.md` for the bodies.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::ProxySettings;
use crate::protocol::{ErrorCode, ErrorReply};

/// The proxy callbacks that are configured.
#[derive(Debug, Clone)]
pub struct Proxy {
    connect_url: Option<String>,
    publish_url: Option<String>,
    timeout: Duration,
}

/// What the connect callback is told.
#[derive(Debug, Serialize)]
pub struct ConnectCall<'a> {
    /// The new client's id.
    pub client: &'a str,
    /// The transport (`websocket`, `sse`, `http_stream`, `long_poll`, `uni_sse`).
    pub transport: &'a str,
    /// The user from the connection token, if one was given ("" if not).
    pub user: &'a str,
    /// The `data` of the connect command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a RawValue>,
    /// The headers of `proxy.http_headers` that the opening request had
    /// (lowercase names): the browser's cookies, say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<&'a std::collections::BTreeMap<String, String>>,
}

/// What the connect callback decided.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ConnectResult {
    /// The user id (overrides the token's).
    pub user: Option<String>,
    /// Connection info (overrides the token's).
    pub info: Option<Box<RawValue>>,
    /// Expiry (seconds since the Unix epoch).
    pub expire_at: Option<u64>,
    /// Channels for `token` namespaces.
    pub channels: Option<Vec<String>>,
}

/// What the publish callback is told.
#[derive(Debug, Serialize)]
pub struct PublishCall<'a> {
    /// The publishing client.
    pub client: &'a str,
    /// Its user.
    pub user: &'a str,
    /// The channel.
    pub channel: &'a str,
    /// The data to publish.
    pub data: &'a RawValue,
}

/// What the publish callback decided.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PublishResult {
    /// Data to publish instead.
    pub data: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct Answer<T> {
    result: Option<T>,
    error: Option<AppError>,
}

#[derive(Deserialize)]
struct AppError {
    #[serde(default)]
    message: String,
}

impl Proxy {
    /// The proxy, if any callback is configured.
    pub fn new(settings: &ProxySettings) -> Option<Proxy> {
        (settings.connect_url.is_some() || settings.publish_url.is_some()).then(|| Proxy {
            connect_url: settings.connect_url.clone(),
            publish_url: settings.publish_url.clone(),
            timeout: settings.timeout,
        })
    }

    /// Calls the connect callback (`Ok(None)` when it is not configured).
    ///
    /// # Errors
    /// 107 with the backend's message when it refuses; 114 when it fails.
    pub async fn connect(
        &self,
        call: &ConnectCall<'_>,
    ) -> Result<Option<ConnectResult>, ErrorReply> {
        match &self.connect_url {
            None => Ok(None),
            Some(url) => self.call(url, call).await.map(Some),
        }
    }

    /// Calls the publish callback (`Ok(None)` when it is not configured).
    ///
    /// # Errors
    /// 107 with the backend's message when it refuses; 114 when it fails.
    pub async fn publish(
        &self,
        call: &PublishCall<'_>,
    ) -> Result<Option<PublishResult>, ErrorReply> {
        match &self.publish_url {
            None => Ok(None),
            Some(url) => self.call(url, call).await.map(Some),
        }
    }

    async fn call<T: for<'de> Deserialize<'de> + Default>(
        &self,
        url: &str,
        body: &impl Serialize,
    ) -> Result<T, ErrorReply> {
        let unavailable = |e: String| {
            tracing::warn!(url, "proxy call failed: {e}");
            ErrorReply::new(
                ErrorCode::Unavailable,
                "the application backend is unavailable",
            )
        };
        let body = serde_json::to_vec(body).map_err(|e| unavailable(e.to_string()))?;
        let (status, answer) =
            crate::http_client::request(http::Method::POST, url, Some(body), self.timeout)
                .await
                .map_err(unavailable)?;
        if !status.is_success() {
            return Err(unavailable(format!("HTTP {status}")));
        }
        let answer: Answer<T> = serde_json::from_slice(&answer)
            .map_err(|e| unavailable(format!("unexpected answer: {e}")))?;
        if let Some(error) = answer.error {
            return Err(ErrorReply::new(ErrorCode::PermissionDenied, error.message));
        }
        Ok(answer.result.unwrap_or_default())
    }
}
