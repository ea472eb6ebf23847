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
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::hub::Hub;
use crate::metrics::MethodLabel;
use crate::protocol::{
    Disconnect, DisconnectCode, ErrorCode, ErrorReply, HistoryRequest, Position,
};
use crate::server::AppState;

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

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ErrorReply> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| ErrorReply::new(ErrorCode::BadRequest, e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    channel: String,
    data: Box<RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    channels: Vec<String>,
    data: Box<RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelBody {
    channel: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryBody {
    channel: String,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    since: Option<Position>,
    #[serde(default)]
    reverse: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct ChannelsBody {
    prefix: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    user: String,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    reconnect: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubscribeBody {
    user: String,
    channel: String,
    #[serde(default)]
    client: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Empty {}

fn position_json(position: Option<crate::engine::StreamPosition>) -> serde_json::Value {
    match position {
        Some(p) => json!({ "offset": p.offset, "epoch": &*p.epoch }),
        None => json!({}),
    }
}

async fn dispatch(hub: &Hub, method: &str, body: &[u8]) -> Result<serde_json::Value, ErrorReply> {
    Ok(match method {
        "publish" => {
            let b: PublishBody = parse(body)?;
            position_json(hub.publish(&b.channel, b.data).await?)
        }
        "broadcast" => {
            let b: BroadcastBody = parse(body)?;
            if b.channels.len() > MAX_BROADCAST {
                return Err(ErrorReply::new(
                    ErrorCode::LimitExceeded,
                    format!("at most {MAX_BROADCAST} channels in one broadcast"),
                ));
            }
            let mut results = Vec::with_capacity(b.channels.len());
            for channel in &b.channels {
                results.push(match hub.publish(channel, b.data.clone()).await {
                    Ok(position) => position_json(position),
                    Err(e) => json!({ "error": e }),
                });
            }
            json!({ "results": results })
        }
        "presence" => {
            let b: ChannelBody = parse(body)?;
            json!({ "clients": hub.presence(&b.channel).await? })
        }
        "presence_stats" => {
            let b: ChannelBody = parse(body)?;
            let stats = hub.presence_stats(&b.channel).await?;
            json!({ "clients": stats.clients, "users": stats.users })
        }
        "history" => {
            let b: HistoryBody = parse(body)?;
            let request = HistoryRequest {
                channel: b.channel,
                limit: b.limit,
                since: b.since,
                reverse: b.reverse,
            };
            serde_json::to_value(hub.history(&request).await?).unwrap_or_default()
        }
        "channels" => {
            let b: ChannelsBody = parse(body)?;
            let channels: Vec<_> = hub
                .channels(&b.prefix)
                .into_iter()
                .map(|(channel, subscribers)| json!({"channel": channel, "subscribers": subscribers}))
                .collect();
            json!({ "channels": channels })
        }
        "disconnect" => {
            let b: DisconnectBody = parse(body)?;
            let mut disconnect = Disconnect::new(
                DisconnectCode::Server,
                b.reason
                    .unwrap_or_else(|| "disconnected by the server".into()),
            );
            if let Some(code) = b.code {
                if !(3000..=4999).contains(&code) {
                    return Err(ErrorReply::new(
                        ErrorCode::BadRequest,
                        "code must be in 3000..=4999",
                    ));
                }
                disconnect.code = code;
            }
            if disconnect.reason.len() > 100 {
                return Err(ErrorReply::new(
                    ErrorCode::BadRequest,
                    "reason has at most 100 bytes",
                ));
            }
            if let Some(reconnect) = b.reconnect {
                disconnect.reconnect = reconnect;
            }
            let n = hub.disconnect_user(&b.user, b.client.as_deref(), &disconnect);
            json!({ "disconnected": n })
        }
        "unsubscribe" => {
            let b: UnsubscribeBody = parse(body)?;
            let n = hub
                .unsubscribe_user(&b.user, &b.channel, b.client.as_deref())
                .await;
            json!({ "unsubscribed": n })
        }
        "info" => {
            let _: Empty = parse(body)?;
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "protocol": crate::protocol::VERSION,
                "uptime_seconds": hub.uptime().as_secs(),
                "counts": hub.counts(),
            })
        }
        _ => unreachable!("METHODS lists every method"),
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
