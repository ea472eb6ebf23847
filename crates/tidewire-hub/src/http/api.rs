//! The server HTTP API: `POST /api/<method>` with a JSON body, guarded by
//! the API key (`Authorization: apikey <KEY>` or `X-API-Key: <KEY>`).
//! Answers are JSON: the result object with 200, or
//! `{"error":{"code":N,"message":"…"}}` with the code's HTTP status (401
//! wrong key, 400 bad JSON, 404 unknown method, …). `docs/api.md` has a
//! curl example of every method.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use http::{header, HeaderMap, StatusCode};
use serde_json::json;
use serde_json::value::RawValue;

use super::AppState;
use crate::fields::{quoted, ListError, Object};
use crate::metrics::MethodLabel;
use crate::node::Hub;
use crate::protocol::{
    ChannelRequest, Disconnect, DisconnectCode, ErrorCode, ErrorReply, HistoryRequest, Payload,
    PublishRequest,
};

/// Most channels in one `broadcast`.
pub const MAX_BROADCAST: usize = 1000;

/// The API methods.
pub const METHODS: [&str; 9] = [
    "publish",
    "broadcast",
    "presence",
    "presence_stats",
    "history",
    "channels",
    "disconnect",
    "unsubscribe",
    "info",
];

/// The `/api` routes; bodies over `max_body_size` bytes (`api.max_body_size`)
/// are refused with 413.
pub(crate) fn routes(max_body_size: usize) -> Router<AppState> {
    Router::new()
        .route("/api/{method}", post(call))
        .route("/api", post(missing_method))
        .layer(DefaultBodyLimit::max(max_body_size))
}

fn error_response(e: &ErrorReply) -> Response {
    (
        e.code.http_status(),
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "error": e }).to_string(),
    )
        .into_response()
}

async fn missing_method() -> Response {
    error_response(&ErrorReply::new(
        ErrorCode::UnknownCommand,
        "POST /api/<method>; methods: publish, broadcast, presence, presence_stats, history, \
         channels, disconnect, unsubscribe, info",
    ))
}

/// Compares without stopping at the first difference.
fn same_key(given: &str, key: &str) -> bool {
    given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let from_authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("apikey"))
        .map(|(_, k)| k.trim());
    let given = from_authorization.or_else(|| {
        headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    });
    !key.is_empty() && given.is_some_and(|g| same_key(g, key))
}

async fn call(
    State(app): State<AppState>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let hub = &app.hub;
    if !authorized(&headers, &app.api_key) {
        let e = ErrorReply::new(
            ErrorCode::Unauthorized,
            "missing or wrong API key: send Authorization: apikey <KEY> (the key is api.key \
             in tidewire.toml, TIDEWIRE_API_KEY or --api-key; printed at start when generated)",
        );
        hub.metrics().error(e.code);
        return error_response(&e);
    }
    let Some(method) = METHODS.iter().find(|m| **m == method) else {
        let e = ErrorReply::new(
            ErrorCode::UnknownCommand,
            format!("unknown API method {method:?}"),
        );
        hub.metrics().error(e.code);
        return error_response(&e);
    };
    hub.metrics()
        .api_calls
        .get_or_create(&MethodLabel { method })
        .inc();
    match dispatch(hub, method, &body).await {
        Ok(value) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            value.to_string(),
        )
            .into_response(),
        Err(e) => {
            hub.metrics().error(e.code);
            error_response(&e)
        }
    }
}

/// An API call with its body read and checked: everything a method needs
/// before it touches the hub.
#[derive(Debug)]
#[non_exhaustive]
pub enum ApiCall {
    /// `publish`.
    Publish(PublishRequest),
    /// `broadcast`: at most [`MAX_BROADCAST`] channels.
    Broadcast {
        /// The channels, in order.
        channels: Vec<String>,
        /// Any JSON value.
        data: Box<RawValue>,
    },
    /// `presence`.
    Presence(ChannelRequest),
    /// `presence_stats`.
    PresenceStats(ChannelRequest),
    /// `history`.
    History(HistoryRequest),
    /// `channels`: those whose name starts with `prefix`.
    Channels {
        /// `""` for all.
        prefix: String,
    },
    /// `disconnect`.
    Disconnect {
        /// The user whose clients go.
        user: String,
        /// Only this client of the user.
        client: Option<String>,
        /// The push and close code, reason and advice.
        disconnect: Disconnect,
    },
    /// `unsubscribe`.
    Unsubscribe {
        /// The user whose clients are unsubscribed.
        user: String,
        /// From this channel.
        channel: String,
        /// Only this client of the user.
        client: Option<String>,
    },
    /// `info`.
    Info,
}

/// Longest `reason` of a `disconnect` (it goes into the close frame, which
/// has room for 123 bytes).
pub const MAX_DISCONNECT_REASON: usize = 100;

/// Reads the body of a call to `method`: an object with that method's
/// fields (an empty body is `{}`).
///
/// # Errors
/// 102 for an unknown method; 101 with a message naming the field at fault
/// and what it must be; 113 for more than [`MAX_BROADCAST`] channels.
pub fn parse_call(method: &str, body: &[u8]) -> Result<ApiCall, ErrorReply> {
    let bad = |message: String| ErrorReply::new(ErrorCode::BadRequest, message);
    if !METHODS.contains(&method) {
        return Err(ErrorReply::new(
            ErrorCode::UnknownCommand,
            format!("unknown API method {}", quoted(method)),
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        bad(format!(
            "the body is not UTF-8 text (byte {})",
            e.valid_up_to()
        ))
    })?;
    let text = if text.trim().is_empty() { "{}" } else { text };
    let o = Object::parse(text).map_err(|e| bad(format!("the body must be a JSON object: {e}")))?;
    let call = || -> Result<ApiCall, BodyError> {
        Ok(match method {
            "publish" => ApiCall::Publish(PublishRequest::read(&o)?),
            "broadcast" => {
                o.only(&["channels", "data"])?;
                let channels = match o.required_strings("channels", MAX_BROADCAST) {
                    Ok(channels) => channels,
                    Err(ListError::Invalid(message)) => return Err(message.into()),
                    Err(ListError::TooLong(len)) => return Err(BodyError::TooManyChannels(len)),
                };
                ApiCall::Broadcast {
                    channels,
                    data: o.required_value("data")?,
                }
            }
            "presence" => ApiCall::Presence(ChannelRequest::read(&o)?),
            "presence_stats" => ApiCall::PresenceStats(ChannelRequest::read(&o)?),
            "history" => ApiCall::History(HistoryRequest::read(&o)?),
            "channels" => {
                o.only(&["prefix"])?;
                ApiCall::Channels {
                    prefix: o.string("prefix")?.unwrap_or_default(),
                }
            }
            "disconnect" => {
                o.only(&["user", "client", "code", "reason", "reconnect"])?;
                let mut disconnect = Disconnect::new(
                    DisconnectCode::Server,
                    o.string("reason")?
                        .unwrap_or_else(|| "disconnected by the server".into()),
                );
                if let Some(code) = o.u64("code")? {
                    disconnect.code = u16::try_from(code)
                        .ok()
                        .filter(|code| (3000..=4999).contains(code))
                        .ok_or("\"code\" must be an integer in 3000..=4999")?;
                }
                if disconnect.reason.len() > MAX_DISCONNECT_REASON {
                    return Err(
                        format!("\"reason\" has at most {MAX_DISCONNECT_REASON} bytes").into(),
                    );
                }
                if let Some(reconnect) = o.bool("reconnect")? {
                    disconnect.reconnect = reconnect;
                }
                ApiCall::Disconnect {
                    user: o.required_string("user")?,
                    client: o.string("client")?,
                    disconnect,
                }
            }
            "unsubscribe" => {
                o.only(&["user", "channel", "client"])?;
                ApiCall::Unsubscribe {
                    user: o.required_string("user")?,
                    channel: o.required_string("channel")?,
                    client: o.string("client")?,
                }
            }
            "info" => {
                o.only(&[])?;
                ApiCall::Info
            }
            _ => unreachable!("METHODS lists every method"),
        })
    };
    call().map_err(|e| match e {
        BodyError::Field(message) => bad(message),
        BodyError::TooManyChannels(len) => ErrorReply::new(
            ErrorCode::LimitExceeded,
            format!("at most {MAX_BROADCAST} channels in one broadcast, got {len}"),
        ),
    })
}

/// Why a body was refused.
enum BodyError {
    /// A field is missing, unknown or of the wrong kind (101).
    Field(String),
    /// A `broadcast` to more than [`MAX_BROADCAST`] channels (113).
    TooManyChannels(usize),
}

impl From<String> for BodyError {
    fn from(message: String) -> Self {
        BodyError::Field(message)
    }
}

impl From<&str> for BodyError {
    fn from(message: &str) -> Self {
        BodyError::Field(message.to_owned())
    }
}

fn position_json(position: Option<crate::engine::StreamPosition>) -> serde_json::Value {
    match position {
        Some(p) => json!({ "offset": p.offset, "epoch": &*p.epoch }),
        None => json!({}),
    }
}

async fn dispatch(hub: &Hub, method: &str, body: &[u8]) -> Result<serde_json::Value, ErrorReply> {
    Ok(match parse_call(method, body)? {
        ApiCall::Publish(p) => {
            position_json(hub.publish(&p.channel, Payload::from_json(p.data)).await?)
        }
        ApiCall::Broadcast { channels, data } => {
            let data = Payload::from_json(data);
            let mut results = Vec::with_capacity(channels.len());
            for channel in &channels {
                results.push(match hub.publish(channel, data.clone()).await {
                    Ok(position) => position_json(position),
                    Err(e) => json!({ "error": e }),
                });
            }
            json!({ "results": results })
        }
        ApiCall::Presence(c) => json!({ "clients": hub.presence(&c.channel).await? }),
        ApiCall::PresenceStats(c) => {
            let stats = hub.presence_stats(&c.channel).await?;
            json!({ "clients": stats.clients, "users": stats.users })
        }
        ApiCall::History(request) => {
            serde_json::to_value(hub.history(&request).await?).unwrap_or_default()
        }
        ApiCall::Channels { prefix } => {
            let channels: Vec<_> = hub
                .channels(&prefix)
                .await
                .into_iter()
                .map(|(channel, subscribers)| json!({"channel": channel, "subscribers": subscribers}))
                .collect();
            json!({ "channels": channels })
        }
        ApiCall::Disconnect {
            user,
            client,
            disconnect,
        } => {
            let n = hub
                .disconnect_user(&user, client.as_deref(), &disconnect)
                .await;
            json!({ "disconnected": n })
        }
        ApiCall::Unsubscribe {
            user,
            channel,
            client,
        } => {
            let n = hub
                .unsubscribe_user(&user, &channel, client.as_deref())
                .await;
            json!({ "unsubscribed": n })
        }
        ApiCall::Info => json!({
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": crate::protocol::VERSION,
            "uptime_seconds": hub.uptime().as_secs(),
            "counts": hub.counts(),
            "node": hub.node_id(),
            "nodes": hub.nodes(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_from_either_header() {
        let mut h = HeaderMap::new();
        assert!(!authorized(&h, "k1"));
        h.insert(header::AUTHORIZATION, "apikey k1".parse().unwrap());
        assert!(authorized(&h, "k1"));
        assert!(!authorized(&h, "k2"));
        assert!(!authorized(&h, ""));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer k1".parse().unwrap());
        assert!(!authorized(&h, "k1"));
        h.insert("x-api-key", "k1".parse().unwrap());
        assert!(authorized(&h, "k1"));
    }
}
