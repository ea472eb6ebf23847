//! The HTTP fallbacks' routes (see [`crate::fronts::emulation`]):
//!
//! | route | what |
//! |---|---|
//! | `GET /connection/sse?commands=TEXT` | opens a session; its messages as Server-Sent Events |
//! | `POST /connection/http_stream` (body: the first commands) | opens a session; its messages as newline-delimited JSON |
//! | `POST /connection/emulation` (`{"session","seq","text"}`) | a batch of commands for a session on any node: 204, or 404 / 400 / 413 / 429 with `{"error"}` |
//! | `POST /connection/long_poll` (body: the first commands) | opens a long-polling session ([`crate::fronts::long_poll`]); answers as a poll |
//! | `GET /connection/long_poll?session=ID&ack=N&wait=S` | waits for messages, answers them (NDJSON); 404 / 400 / 409 |
//! | `GET /connection/uni_sse?channel=NAME&token=JWT` | unidirectional SSE ([`crate::fronts::uni_sse`]): publications as events, recovered from `Last-Event-ID` |
//!
//! Both streams answer with `Cache-Control: no-cache` and
//! `X-Accel-Buffering: no`, so that nginx and other proxies pass each
//! message on at once.

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use tidewire::OriginPolicy;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use super::AppState;
use crate::fronts::emulation::{Batch, BatchError, Opening, StreamKind};
use crate::fronts::long_poll;
use crate::fronts::uni_sse::{self, UniRequest};
use std::time::Duration;

pub(super) fn routes(origins: Option<OriginPolicy>) -> Router<AppState> {
    Router::new()
        .route("/connection/sse", get(sse))
        .route("/connection/http_stream", post(http_stream))
        .route("/connection/emulation", post(emulation))
        .route("/connection/uni_sse", get(uni_sse))
        .route("/connection/long_poll", post(long_poll_open).get(long_poll))
        .layer(cors(origins))
}

/// CORS, so that a page of another origin can use the fallbacks (a
/// WebSocket needs none): with `server.allowed_origins`, those origins
/// with their cookies (`withCredentials`); without, any page but without
/// cookies, since the browser would send them whichever page asks.
/// Refused origins get no CORS headers (and 403 from the handlers).
fn cors(origins: Option<OriginPolicy>) -> CorsLayer {
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST])
        .allow_headers(AllowHeaders::mirror_request())
        .max_age(Duration::from_secs(600));
    match origins {
        Some(policy) => layer
            .allow_origin(AllowOrigin::predicate(move |origin, _| {
                policy.permits(origin.to_str().ok())
            }))
            .allow_credentials(true),
        None => layer.allow_origin(AllowOrigin::any()),
    }
}

fn json_error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({ "error": message }).to_string();
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// The origin policy: `Some(response)` refuses.
fn origin_refused(app: &AppState, headers: &HeaderMap) -> Option<Response> {
    let origins = app.origins.as_ref()?;
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    (!origins.permits(origin)).then(|| {
        let text = format!("origin {} is not allowed", origin.unwrap_or("(none)"));
        json_error(StatusCode::FORBIDDEN, &text)
    })
}

/// The origin policy, and shutdown (for requests that open a session):
/// `Some(response)` refuses.
fn refused(app: &AppState, headers: &HeaderMap) -> Option<Response> {
    if let Some(refused) = origin_refused(app, headers) {
        return Some(refused);
    }
    if app.hub.is_shutting_down() {
        return Some(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down: connect to another node",
        ));
    }
    None
}

fn too_large(app: &AppState, len: usize) -> Option<Response> {
    let max = app.hub.config().client.max_message_size;
    (len > max).then(|| {
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("at most {max} bytes of commands at a time (client.max_message_size)"),
        )
    })
}

fn stream(app: &AppState, headers: &HeaderMap, kind: StreamKind, commands: String) -> Response {
    let opening = Opening {
        commands,
        request: app.hub.opening_request(headers),
    };
    let body = Body::from_stream(app.emulations.open(&app.hub, kind, opening));
    streamed(body, kind.content_type())
}

fn streamed(body: Body, content_type: &'static str) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

async fn sse(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(refused) = refused(&app, &headers) {
        return refused;
    }
    let commands = query
        .as_deref()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| k == "commands")
                .map(|(_, v)| v.into_owned())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    if let Some(large) = too_large(&app, commands.len()) {
        return large;
    }
    stream(&app, &headers, StreamKind::Sse, commands)
}

async fn uni_sse(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(refused) = refused(&app, &headers) {
        return refused;
    }
    let query = query.unwrap_or_default();
    if let Some(large) = too_large(&app, query.len()) {
        return large;
    }
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let request = match UniRequest::parse(&query, last_event_id) {
        Ok(request) => request,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    match uni_sse::open(&app.hub, &request, app.hub.opening_request(&headers)).await {
        Ok(events) => streamed(Body::from_stream(events), "text/event-stream"),
        Err(refused) => json_error(
            StatusCode::from_u16(refused.status).unwrap_or(StatusCode::BAD_REQUEST),
            &refused.message,
        ),
    }
}

fn ndjson(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `wait=S` (seconds) of a poll, bounded.
fn wait_of(query: &str) -> Duration {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "wait")
        .and_then(|(_, v)| v.parse::<u64>().ok())
        .map_or(long_poll::DEFAULT_WAIT, |s| {
            Duration::from_secs(s).clamp(Duration::from_secs(1), long_poll::MAX_WAIT)
        })
}

async fn long_poll_open(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    if let Some(refused) = refused(&app, &headers) {
        return refused;
    }
    if let Some(large) = too_large(&app, body.len()) {
        return large;
    }
    let Ok(commands) = String::from_utf8(body.to_vec()) else {
        return json_error(StatusCode::BAD_REQUEST, "the commands are not UTF-8");
    };
    let opening = Opening {
        commands,
        request: app.hub.opening_request(&headers),
    };
    let wait = wait_of(query.as_deref().unwrap_or(""));
    ndjson(
        app.long_polls
            .open(&app.hub, &app.emulations, opening, wait)
            .await,
    )
}

async fn long_poll(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Some(refused) = origin_refused(&app, &headers) {
        return refused;
    }
    let query = query.unwrap_or_default();
    let mut session = None;
    let mut ack = 0;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*key {
            "session" => session = Some(value.into_owned()),
            "ack" => ack = value.parse().unwrap_or(0),
            _ => {}
        }
    }
    let Some(session) = session else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "name the session: ?session=ID&ack=N",
        );
    };
    match app
        .long_polls
        .poll(&app.hub, &session, ack, wait_of(&query))
        .await
    {
        Ok(body) => ndjson(body),
        Err((status, message)) => json_error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            &message,
        ),
    }
}

async fn http_stream(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refused(&app, &headers) {
        return refused;
    }
    if let Some(large) = too_large(&app, body.len()) {
        return large;
    }
    let Ok(initial) = String::from_utf8(body.to_vec()) else {
        return json_error(StatusCode::BAD_REQUEST, "the commands are not UTF-8");
    };
    stream(&app, &headers, StreamKind::Ndjson, initial)
}

async fn emulation(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = origin_refused(&app, &headers) {
        return refused;
    }
    // The envelope adds little to the commands it carries.
    if let Some(large) = too_large(&app, body.len().saturating_sub(256)) {
        return large;
    }
    let batch: Batch = match serde_json::from_slice(&body) {
        Ok(batch) => batch,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"session\": ID, \"seq\": N, \"text\": COMMANDS}}: {e}"),
            )
        }
    };
    match app.emulations.take_or_relay(&app.hub, batch).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e @ BatchError::UnknownSession) => json_error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e @ BatchError::Flooded) => json_error(StatusCode::TOO_MANY_REQUESTS, &e.to_string()),
        Err(e) => json_error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}
