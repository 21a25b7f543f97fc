//! HTTP on every collector (axum): metrics, health, cluster view, ownership queries,
//! dependencies, the event feed, and (only when `[admin] enable_faults`) fault injection.
//! JSON everywhere; bad parameters get a 4xx with a message, never a panic.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tenure_attribution::{Lookup, SegmentOwner, Source, UnixMillis};
use tenure_gossip::wire::{IpEvent, IpEventKind};

use super::collector::{lock, Shared};
use super::{clock, fanout};
use crate::report::Chain;
use crate::time::parse_time_ms;

/// The exporter's header read timeout (a collector uses its `http_request_timeout_ms`):
/// how long a client may take to send a request's headers before its connection is
/// closed. Without one, a client that opens connections and trickles header bytes holds
/// each one forever; the request timeout only starts once the headers are in.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `app` on `listener` (HTTP/1.1) until `shutdown` resolves, then lets the open
/// connections finish. As `axum::serve`, plus the header read timeout, which needs a
/// timer that `axum::serve` does not give hyper.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    header_read_timeout: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait, rather than spin.
                    tracing::warn!(error = %e, "http accept");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = connections.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %Chain(&e), "http connection");
            }
        });
    }
    connections.shutdown().await;
}

/// The largest event-feed body accepted, in bytes.
pub const EVENT_BODY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Events in one event-feed request.
pub const EVENTS_PER_REQUEST_MAX: usize = 16_384;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/cluster", get(cluster))
        .route("/v1/ips/{ip}/ranges", get(ranges))
        .route("/v1/ips/{ip}/owner", get(owner))
        .route("/v1/dependencies", get(dependencies))
        .route("/v1/ip-events", post(ip_events))
        .route("/admin/clock", get(admin_clock).post(admin_set_clock))
        .merge(crate::ui::router())
        .layer(axum::extract::DefaultBodyLimit::max(EVENT_BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn_with_state(
            shared.http_request_timeout_ms,
            request_timeout,
        ))
        .with_state(shared)
}

/// Answers 408 when a request takes longer than `timeout_ms` (a slow body upload, a stuck
/// fan-out), so that no request holds a task and its buffers forever.
async fn request_timeout(
    State(timeout_ms): State<u64>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match tokio::time::timeout(
        std::time::Duration::from_millis(timeout_ms),
        next.run(request),
    )
    .await
    {
        Ok(response) => response,
        Err(_) => error(StatusCode::REQUEST_TIMEOUT, "request timed out"),
    }
}

fn bad_request(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn parse_ip(raw: &str) -> Result<IpAddr, Box<Response>> {
    raw.parse::<IpAddr>()
        .map_err(|_| Box::new(bad_request(format!("{raw:?} is not an IP address"))))
}

async fn metrics() -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        super::metrics::render(),
    )
}

async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let core = lock(&shared.core);
    let pending_spans = core.handoff().pending_spans();
    let ready = core.is_ready();
    let body = Json(json!({
        "ready": ready,
        "ring_members": core.ring().members().len(),
        "handoff_pending_spans": pending_spans,
    }));
    if ready {
        body.into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn cluster(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let core = lock(&shared.core);
    let membership = core.membership();
    let member = |m: &tenure_gossip::identity::NodeIdentity| {
        json!({
            "node_id": m.node_id(),
            "region": m.region(),
            "gossip_addr": m.gossip_addr().to_string(),
            "data_addr": m.data_addr().to_string(),
            "incarnation": m.incarnation(),
        })
    };
    let regions: Vec<Value> = core
        .regions()
        .regions()
        .map(|r| {
            json!({
                "region": r,
                "prefixes": core.regions().prefixes_of(r).map(|p| p.to_string()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let roster: Vec<Value> = lock(&shared.roster)
        .iter()
        .map(|(node, (region, up))| json!({ "node_id": node, "region": region, "state": if *up { "alive" } else { "down" } }))
        .collect();
    Json(json!({
        "node_id": shared.bound.node_id,
        "region": shared.bound.region,
        "gossip_addr": shared.bound.gossip_addr.to_string(),
        "data_addr": shared.bound.data_addr.to_string(),
        "http_addr": shared.bound.http_addr.to_string(),
        "started_ms": shared.started.0,
        "ready": core.is_ready(),
        "lan_members": membership.lan_members().map(member).collect::<Vec<_>>(),
        "wan_members": membership.wan_members().map(member).collect::<Vec<_>>(),
        "members_seen": roster,
        "regions": regions,
        "ring": {
            "members": core.ring().members().iter().map(|m| m.node_id()).collect::<Vec<_>>(),
            "replication": core.ring().config().replication.get(),
            "vnodes_per_node": core.ring().config().vnodes_per_node.get(),
            "handoff_pending_spans": core.handoff().pending_spans(),
        },
        "flows": {
            "settling": core.engine().settling_len(),
            "pending": core.engine().pending_len() - core.engine().settling_len(),
            "held_for_handoff": core.held_len(),
            "gathered_for_peers": core.outbox_len(),
            "forwarded_unacknowledged": core.inflight_len(),
        },
    }))
}

async fn ranges(State(shared): State<Arc<Shared>>, Path(raw): Path<String>) -> Response {
    let ip = match parse_ip(&raw) {
        Ok(ip) => ip,
        Err(r) => return *r,
    };
    let core = lock(&shared.core);
    let owners: Vec<&str> = core.owners_of(ip).iter().map(|o| o.node_id()).collect();
    let history = core.history(ip);
    let segments: Vec<Value> = history
        .segments
        .iter()
        .map(|s| {
            let (workload, conflict) = match &s.owner {
                SegmentOwner::Workload(w) => (Some(w.as_str()), false),
                SegmentOwner::Conflict => (None, true),
            };
            json!({ "workload": workload, "conflict": conflict, "start_ms": s.start.0, "end_ms": s.end.0 })
        })
        .collect();
    Json(json!({
        "ip": ip.to_string(),
        "node_id": shared.bound.node_id,
        "owners": owners,
        "this_node_owns": owners.contains(&shared.bound.node_id.as_str()),
        "floor_ms": history.floor.map(|f| f.0),
        "segments": segments,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct AtQuery {
    at: Option<String>,
}

async fn owner(
    State(shared): State<Arc<Shared>>,
    Path(raw): Path<String>,
    Query(q): Query<AtQuery>,
) -> Response {
    let ip = match parse_ip(&raw) {
        Ok(ip) => ip,
        Err(r) => return *r,
    };
    let Some(at_raw) = q.at else {
        return bad_request("missing query parameter `at` (Unix ms or RFC 3339)");
    };
    let at = match parse_time_ms(&at_raw) {
        Ok(t) => t,
        Err(e) => return bad_request(e.to_string()),
    };
    let core = lock(&shared.core);
    let owners: Vec<&str> = core.owners_of(ip).iter().map(|o| o.node_id()).collect();
    let lookup = core.lookup(ip, UnixMillis(at));
    let (result, workload, source, reason) = match lookup {
        Lookup::Attributed { workload, source } => (
            "attributed",
            core.engine().workload_name(workload).map(|n| n.to_string()),
            Some(source_str(source)),
            None,
        ),
        Lookup::Pending(reason) => ("pending", None, None, Some(reason.as_str())),
        Lookup::Unattributed(reason) => ("unattributed", None, None, Some(reason.as_str())),
    };
    Json(json!({
        "ip": ip.to_string(),
        "at_ms": at,
        "result": result,
        "workload": workload,
        "source": source,
        "reason": reason,
        "node_id": shared.bound.node_id,
        "owners": owners,
        "this_node_owns": owners.contains(&shared.bound.node_id.as_str()),
    }))
    .into_response()
}

fn source_str(source: Source) -> &'static str {
    source.as_str()
}

/// Dependency window when `since` is not given: the last hour, in ms.
pub const DEPENDENCIES_DEFAULT_WINDOW_MS: u64 = 3_600_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DependencyQuery {
    since: Option<String>,
    until: Option<String>,
    /// Only edges that touch this workload.
    workload: Option<String>,
    /// `cluster` (default): every live member's table, merged; `local`: this node's only
    /// (what the fan-out asks for, so that it never recurses).
    scope: Option<String>,
}

/// `GET /v1/dependencies?since=&until=&workload=&scope=`.
async fn dependencies(
    State(shared): State<Arc<Shared>>,
    q: Result<Query<DependencyQuery>, QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => return bad_request(format!("{e}; parameters: since, until, workload, scope")),
    };
    let now = shared.clock.now().0;
    let since = match q.since.as_deref().map(parse_time_ms).transpose() {
        Ok(t) => t.unwrap_or(now.saturating_sub(DEPENDENCIES_DEFAULT_WINDOW_MS)),
        Err(e) => return bad_request(format!("since: {e}")),
    };
    let until = match q.until.as_deref().map(parse_time_ms).transpose() {
        Ok(t) => t.unwrap_or(now),
        Err(e) => return bad_request(format!("until: {e}")),
    };
    if until < since {
        return bad_request("until is before since");
    }
    if let Some(w) = &q.workload {
        if w.is_empty() || w.len() > fanout::WORKLOAD_FILTER_BYTES_MAX {
            return bad_request(format!(
                "workload must be 1 to {} bytes",
                fanout::WORKLOAD_FILTER_BYTES_MAX
            ));
        }
    }
    let window = fanout::Window {
        since_ms: since,
        until_ms: until,
        workload: q.workload,
    };
    match q.scope.as_deref() {
        None | Some("cluster") => Json(fanout::cluster(&shared, &window).await).into_response(),
        Some("local") => Json(fanout::local(&shared, &window)).into_response(),
        Some(other) => bad_request(format!("scope must be cluster or local, got {other:?}")),
    }
}

/// One line of the event feed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventLine {
    ip: String,
    /// `assign` or `unassign`.
    kind: String,
    /// The owner's name; required for `assign`.
    #[serde(default)]
    owner: Option<String>,
    /// When it happened: Unix ms or RFC 3339 (as a string), or a number of ms.
    at: Value,
}

#[derive(Deserialize)]
struct EventQuery {
    /// Every event at or before this time has been delivered (Unix ms or RFC 3339).
    watermark: Option<String>,
}

/// `POST /v1/ip-events`: NDJSON, one event per line, authenticated by a bearer token.
async fn ip_events(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<EventQuery>,
    body: String,
) -> Response {
    let Some(token) = shared.event_token.as_deref() else {
        return error(
            StatusCode::FORBIDDEN,
            "the event feed is disabled: set event_feed_token in the configuration",
        );
    };
    if !bearer_matches(&headers, token) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let watermark = match q.watermark.as_deref().map(parse_time_ms).transpose() {
        Ok(w) => w.unwrap_or(0),
        Err(e) => return bad_request(format!("watermark: {e}")),
    };
    let mut events = Vec::new();
    for (n, line) in body.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if events.len() >= EVENTS_PER_REQUEST_MAX {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("at most {EVENTS_PER_REQUEST_MAX} events per request"),
            );
        }
        let parsed: EventLine = match serde_json::from_str(line) {
            Ok(e) => e,
            Err(e) => return bad_request(format!("line {}: {e}", n + 1)),
        };
        match event_from_line(parsed) {
            Ok(e) => events.push(e),
            Err(message) => return bad_request(format!("line {}: {message}", n + 1)),
        }
    }
    let count = events.len();
    shared
        .with_core(|core, now, out| core.handle_events(events, watermark, now, out))
        .await;
    Json(json!({ "accepted": count, "watermark_ms": watermark })).into_response()
}

fn event_from_line(line: EventLine) -> Result<IpEvent, String> {
    let ip: IpAddr = line
        .ip
        .parse()
        .map_err(|_| format!("{:?} is not an IP address", line.ip))?;
    let at_ms = match &line.at {
        Value::Number(n) => n.as_u64().ok_or("at must be a non-negative integer")?,
        Value::String(s) => parse_time_ms(s).map_err(|e| e.to_string())?,
        Value::Null | Value::Bool(_) | Value::Array(_) | Value::Object(_) => {
            return Err("at must be Unix ms or an RFC 3339 string".into())
        }
    };
    let (kind, owner) = match line.kind.as_str() {
        "assign" => (
            IpEventKind::Assign,
            line.owner
                .filter(|o| !o.is_empty() && o.len() <= 256)
                .ok_or("assign needs an owner of 1 to 256 bytes")?,
        ),
        "unassign" => (IpEventKind::Unassign, line.owner.unwrap_or_default()),
        other => return Err(format!("kind must be assign or unassign, got {other:?}")),
    };
    Ok(IpEvent {
        at_ms,
        ip,
        kind,
        owner,
    })
}

/// Whether the request carries `Authorization: Bearer <token>`, compared in constant time
/// (the length aside), so that response times do not reveal how much of a guess was right.
fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    let Some(given) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.len() == token.len() && bool::from(given.as_bytes().ct_eq(token.as_bytes()))
}

/// The admin gate: 404 while fault injection is disabled (the surface does not exist),
/// 401 without the right bearer token.
fn admin_gate(shared: &Shared, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(token) = shared.admin_token.as_deref() else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "not found (fault injection is disabled: [admin] enable_faults)",
        )));
    };
    if !bearer_matches(headers, token) {
        return Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        )));
    }
    Ok(())
}

fn clock_state(shared: &Shared) -> Value {
    json!({
        "node_id": shared.bound.node_id,
        "offset_ms": shared.clock.offset_ms(),
        "now_ms": shared.clock.now().0,
        "system_now_ms": clock::now().0,
    })
}

/// `GET /admin/clock`: the offset in force and the time this node believes it is.
async fn admin_clock(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(r) = admin_gate(&shared, &headers) {
        return *r;
    }
    Json(clock_state(&shared)).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockBody {
    /// Added to the system clock, in ms; negative sets the clock back. Replaces the
    /// previous offset (0 heals).
    offset_ms: i64,
}

/// `POST /admin/clock` `{"offset_ms": -30000}`: sets this node's clock offset, a skew or a
/// jump. Every later input to the core carries the shifted time.
async fn admin_set_clock(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Err(r) = admin_gate(&shared, &headers) {
        return *r;
    }
    let body: ClockBody = match serde_json::from_str(&body) {
        Ok(b) => b,
        Err(e) => return bad_request(format!("expected {{\"offset_ms\": <i64>}}: {e}")),
    };
    let before = shared.clock.offset_ms();
    if let Err(e) = shared.clock.set_offset_ms(body.offset_ms) {
        return bad_request(e.to_string());
    }
    metrics::gauge!(super::metrics::CLOCK_OFFSET, "node" => shared.node.clone())
        .set(body.offset_ms as f64 / 1_000.0);
    tracing::warn!(node = %shared.node, before_ms = before, offset_ms = body.offset_ms, "clock offset set through /admin/clock");
    Json(clock_state(&shared)).into_response()
}
