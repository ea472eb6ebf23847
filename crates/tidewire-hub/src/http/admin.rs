//! The admin page (`GET /admin`, embedded) and its token endpoint
//! (`POST /admin/token` with `{"secret": "..."}`: an admin token for the
//! hub's WebSocket, see [`crate::admin`]).

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http::{header, StatusCode};
use serde::Deserialize;

use super::AppState;
use crate::admin::AdminTokenError;
use crate::auth::now_unix;

const PAGE: &str = include_str!("../../../../web/admin/index.html");
const SCRIPT: &str = include_str!("../../../../web/admin/admin.js");

/// Largest body of a token request.
const MAX_BODY: usize = 4096;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin", get(page))
        .route("/admin/", get(page))
        .route("/admin/admin.js", get(script))
        .route("/admin/token", post(token))
}

fn off() -> Response {
    (
        StatusCode::NOT_FOUND,
        "the admin page is off on this node\n",
    )
        .into_response()
}

async fn page(State(app): State<AppState>) -> Response {
    if !app.hub.admin_enabled() {
        return off();
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The page is not to be framed by another site.
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        PAGE,
    )
        .into_response()
}

async fn script(State(app): State<AppState>) -> Response {
    if !app.hub.admin_enabled() {
        return off();
    }
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        SCRIPT,
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    secret: String,
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

async fn token(State(app): State<AppState>, body: Bytes) -> Response {
    if body.len() > MAX_BODY {
        return json_error(StatusCode::PAYLOAD_TOO_LARGE, "the body is too large");
    }
    let request: TokenRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"secret\": \"...\"}}: {e}"),
            )
        }
    };
    match app.hub.admin_token(&request.secret) {
        Ok(token) => {
            let body = serde_json::json!({
                "token": token.token,
                "expires_in": token.expires_at.saturating_sub(now_unix()),
                "node": app.hub.node_id(),
            })
            .to_string();
            (
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                body,
            )
                .into_response()
        }
        Err(e @ AdminTokenError::Disabled) => json_error(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e) => {
            tracing::info!("admin token refused: {e}");
            json_error(StatusCode::UNAUTHORIZED, &e.to_string())
        }
    }
}
