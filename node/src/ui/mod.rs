//! The service-map page at `/`: workloads as nodes, dependencies as edges sized by
//! traffic, a time-window picker, a workload's callers and callees on click, unattributed
//! traffic drawn as its own node, and the cluster's members by region.
//!
//! The page is three static files compiled into the binary (`include_str!`), plain
//! JavaScript and SVG with no library and no CDN: a node serves it with no internet
//! access, and what the page runs is exactly what was reviewed. It reads the node's own
//! JSON API (`/v1/dependencies`, `/v1/cluster`), so it shows the whole cluster from any
//! node.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// The page.
pub const INDEX_HTML: &str = include_str!("index.html");
/// Its script: fetching, layout, rendering.
pub const APP_JS: &str = include_str!("app.js");
/// Its style sheet.
pub const STYLE_CSS: &str = include_str!("style.css");

/// Every response of the page forbids loading anything from elsewhere, so a workload name
/// that slipped through escaping still could not pull in a script.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'";

/// The page's routes, for merging into a node's router (stateless, so any state type).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/ui/app.js", get(app_js))
        .route("/ui/style.css", get(style_css))
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            // The files change only with the binary; a short cache keeps upgrades visible.
            (header::CACHE_CONTROL, "max-age=60"),
        ],
        body,
    )
}

async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE_CSS)
}
