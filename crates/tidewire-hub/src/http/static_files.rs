//! The files `tidewire serve` serves as they are, embedded in the binary:
//! the demo app (`web/demo`), the JavaScript client (`clients/js`) and the
//! page about the server.

use axum::response::IntoResponse;
use http::header;

/// The page that says what this server is and shows the raw protocol,
/// served at `/about.html` (the demo chat is at `/`).
const LANDING_PAGE: &str = include_str!("../landing.html");

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

/// The files served as they are, embedded in the binary so that a
/// `tidewire serve` in an empty folder serves them: the demo app
/// (`web/demo`) and the JavaScript client (`clients/js`). Path, content
/// type, body.
pub(super) const STATIC_FILES: &[(&str, &str, &str)] = &[
    ("/", HTML, include_str!("../../../../web/demo/index.html")),
    (
        "/ticker.html",
        HTML,
        include_str!("../../../../web/demo/ticker.html"),
    ),
    ("/about.html", HTML, LANDING_PAGE),
    (
        "/feed.html",
        HTML,
        include_str!("../../../../web/demo/feed.html"),
    ),
    (
        "/demo/chat.js",
        JS,
        include_str!("../../../../web/demo/chat.js"),
    ),
    (
        "/demo/ticker.js",
        JS,
        include_str!("../../../../web/demo/ticker.js"),
    ),
    (
        "/demo/style.css",
        "text/css; charset=utf-8",
        include_str!("../../../../web/demo/style.css"),
    ),
    (
        "/client/tidewire.js",
        JS,
        include_str!("../../../../clients/js/src/index.js"),
    ),
    (
        "/client/tidewire.d.ts",
        "text/plain; charset=utf-8",
        include_str!("../../../../clients/js/src/index.d.ts"),
    ),
];

pub(super) async fn static_file(
    content_type: &'static str,
    body: &'static str,
) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}
