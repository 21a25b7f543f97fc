//! The service-map page in a real browser: headless Chromium (Debian's `chromium`, found at
//! `/usr/bin/chromium` or `$TENURE_CHROMIUM`) driven over the DevTools protocol.
//!
//! - `service_map_shows_the_demo`: a running `tenure demo`; the cluster-wide dependency
//!   API answers from every node, rejects bad parameters with 4xx JSON, and the page loads
//!   without console errors and shows the gateway, its backends and the cluster.
//! - `service_map_draws_a_thousand_workloads`: the page against a fixed API answer of
//!   1,000 workloads, measured from navigation start to the drawn map.
//!
//! Without Chromium, the browser parts print `SKIPPED (needs chromium)` and pass; the API
//! checks still run. Screenshots go to `$CARGO_TARGET_TMPDIR/screenshots/`.

use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tenure_node::httpc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// How long `tenure demo` may take to converge and print the map's address.
const DEMO_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the demo may take to attribute the first gateway flows.
const EDGES_TIMEOUT: Duration = Duration::from_secs(40);
/// How long Chromium may take to start and print its DevTools address.
const BROWSER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a page may take to draw its map.
const PAGE_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The most the 1,000-workload page may take from navigation to a drawn map, in ms. The
/// measured time is printed; this bound only catches a page that freezes.
const THOUSAND_WORKLOADS_LOAD_MS_MAX: f64 = 5_000.0;
/// Browser viewport for screenshots, in CSS px.
const VIEWPORT: (u32, u32) = (1600, 1000);

/// Writes straight to the process's stderr: libtest captures `eprintln!`, and a skip or
/// a measurement must be seen in a normal run.
fn loud(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn screenshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots")
}

/// The Chromium binary, if installed.
fn chromium_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TENURE_CHROMIUM") {
        let path = PathBuf::from(path);
        return path.exists().then_some(path);
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A headless Chromium, killed on drop.
struct Browser {
    child: Child,
    ws_url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts Chromium, or says loudly why not and returns `None`.
    fn launch(test: &str) -> anyhow::Result<Option<Browser>> {
        let Some(binary) = chromium_binary() else {
            loud(&format!(
                "SKIPPED (needs chromium: apt-get install -y chromium): {test}: browser checks"
            ));
            return Ok(None);
        };
        let profile = tempfile::tempdir()?;
        let mut child = Command::new(&binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stderr = child.stderr.take().context("chromium stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let ws_url = rx
            .recv_timeout(BROWSER_START_TIMEOUT)
            .context("chromium did not print its DevTools address")?;
        Ok(Some(Browser {
            child,
            ws_url,
            _profile: profile,
        }))
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One tab, over the browser's DevTools websocket (flattened sessions).
struct Page {
    ws: Socket,
    session: String,
    next_id: u64,
    /// Console errors, uncaught exceptions and error log entries (CSP, network) seen.
    errors: Vec<String>,
}

impl Page {
    async fn open(browser: &Browser) -> anyhow::Result<Page> {
        let (ws, _) = tokio_tungstenite::connect_async(browser.ws_url.as_str())
            .await
            .context("connecting to chromium's DevTools")?;
        let mut page = Page {
            ws,
            session: String::new(),
            next_id: 1,
            errors: Vec::new(),
        };
        let target = page
            .call_browser("Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target["targetId"].as_str().context("targetId")?.to_owned();
        let attached = page
            .call_browser(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        page.session = attached["sessionId"]
            .as_str()
            .context("sessionId")?
            .to_owned();
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            page.call(domain, json!({})).await?;
        }
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": VIEWPORT.0, "height": VIEWPORT.1, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await?;
        Ok(page)
    }

    async fn call_browser(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.send(method, params, None).await
    }

    async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let session = self.session.clone();
        self.send(method, params, Some(&session)).await
    }

    async fn send(
        &mut self,
        method: &str,
        params: Value,
        session: Option<&str>,
    ) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            message["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(message.to_string())).await?;
        let deadline = Instant::now() + PAGE_READY_TIMEOUT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .with_context(|| format!("{method}: no answer from chromium"))?;
            let Some(frame) = next else {
                bail!("{method}: chromium closed the DevTools connection");
            };
            let text = match frame? {
                Message::Text(t) => t.to_string(),
                Message::Binary(_)
                | Message::Ping(_)
                | Message::Pong(_)
                | Message::Close(_)
                | Message::Frame(_) => continue,
            };
            let value: Value = serde_json::from_str(&text)?;
            if value["id"] == json!(id) {
                if let Some(error) = value.get("error") {
                    bail!("{method}: {error}");
                }
                return Ok(value["result"].clone());
            }
            self.on_event(&value);
        }
    }

    fn on_event(&mut self, event: &Value) {
        let params = &event["params"];
        match event["method"].as_str() {
            Some("Runtime.exceptionThrown") => self.errors.push(format!(
                "exception: {}",
                params["exceptionDetails"]["exception"]["description"]
                    .as_str()
                    .or(params["exceptionDetails"]["text"].as_str())
                    .unwrap_or("?")
            )),
            Some("Runtime.consoleAPICalled")
                if matches!(params["type"].as_str(), Some("error" | "assert")) =>
            {
                self.errors
                    .push(format!("console.error: {}", params["args"]))
            }
            Some("Log.entryAdded") if params["entry"]["level"] == "error" => {
                self.errors.push(format!(
                    "log: {} {}",
                    params["entry"]["text"].as_str().unwrap_or("?"),
                    params["entry"]["url"].as_str().unwrap_or("")
                ))
            }
            _ => {}
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(e) = result.get("exceptionDetails") {
            bail!("evaluating {expression}: {e}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Navigates and waits until the page says its map is drawn; returns the page's
    /// `data-ready-ms` (ms from navigation start).
    async fn load_map(&mut self, url: &str) -> anyhow::Result<f64> {
        self.call("Page.navigate", json!({ "url": url })).await?;
        let deadline = Instant::now() + PAGE_READY_TIMEOUT;
        loop {
            let ready = self
                .eval("document.body ? (document.body.dataset.readyMs || '') : ''")
                .await?;
            if let Some(ms) = ready.as_str().and_then(|s| s.parse::<f64>().ok()) {
                return Ok(ms);
            }
            if Instant::now() > deadline {
                let banner = self
                    .eval("document.getElementById('banner')?.textContent || ''")
                    .await
                    .unwrap_or_default();
                bail!(
                    "the map was not drawn within {PAGE_READY_TIMEOUT:?}; banner: {banner}; errors: {:?}",
                    self.errors
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().context("screenshot data")?)?;
        ensure!(data.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        std::fs::create_dir_all(path.parent().context("screenshot dir")?)?;
        std::fs::write(path, data)?;
        loud(&format!("screenshot: {}", path.display()));
        Ok(())
    }
}

/// `tenure demo`, killed on drop.
struct Demo {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tenure demo` and waits for its `service map: http://…/` line.
fn start_demo() -> anyhow::Result<(Demo, SocketAddr)> {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tenure"))
        .args(["demo", "--duration-secs", "300", "--no-capture", "--dir"])
        .arg(dir.path())
        .env("TENURE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning tenure demo")?;
    let stdout = child.stdout.take().context("demo stdout")?;
    let demo = Demo { child, _dir: dir };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("service map: http://") {
                let addr = rest.split('/').next().unwrap_or_default().to_owned();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(DEMO_READY_TIMEOUT)
        .context("tenure demo printed no `service map:` line")?;
    Ok((demo, addr.parse().context("the service map's address")?))
}

async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Value)> {
    let (status, body) =
        httpc::request(addr, "GET", path, None, None, Duration::from_secs(10)).await?;
    let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    Ok((status, value))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_map_shows_the_demo() -> anyhow::Result<()> {
    let (_demo, addr) = start_demo()?;

    // The cluster-wide answer: every node answers, and the gateway's calls show up.
    let deadline = Instant::now() + EDGES_TIMEOUT;
    let answer = loop {
        let (status, answer) = get(addr, "/v1/dependencies").await?;
        ensure!(status == 200, "dependencies: {status} {answer}");
        let has_gateway = answer["edges"].as_array().is_some_and(|edges| {
            edges
                .iter()
                .any(|e| e["from"] == "gateway-us-east" && e["to_kind"] == "workload")
        });
        if has_gateway {
            break answer;
        }
        if Instant::now() > deadline {
            bail!("no gateway-us-east edges within {EDGES_TIMEOUT:?}: {answer}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    ensure!(answer["scope"] == "cluster", "{answer}");
    ensure!(
        answer["partial"] == false,
        "every demo node should answer: {}",
        answer["nodes_missing"]
    );
    let answered = answer["nodes_answered"].as_array().map_or(0, Vec::len);
    ensure!(
        answered == 6,
        "6 demo nodes answer, got {answered}: {answer}"
    );
    let backends: Vec<String> = answer["edges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["from"] == "gateway-us-east" && e["to_kind"] == "workload")
        .filter_map(|e| e["to"].as_str().map(str::to_owned))
        .collect();
    ensure!(!backends.is_empty(), "the gateway has backends");
    for e in answer["edges"].as_array().into_iter().flatten() {
        let share = e["unattributed_share"].as_f64().context("share")?;
        ensure!((0.0..=1.0).contains(&share), "share in [0, 1]: {e}");
    }

    // One node's own table is a part of the whole.
    let (status, local) = get(addr, "/v1/dependencies?scope=local").await?;
    ensure!(status == 200 && local["scope"] == "local", "{local}");
    let local_flows = local["totals"]["flows"].as_u64().context("local flows")?;
    let all_flows = answer["totals"]["flows"].as_u64().context("flows")?;
    ensure!(local_flows <= all_flows, "{local_flows} > {all_flows}");

    // The workload filter keeps the edges that touch the workload.
    let (status, filtered) = get(addr, "/v1/dependencies?workload=gateway-us-east").await?;
    ensure!(status == 200, "{filtered}");
    for e in filtered["edges"].as_array().into_iter().flatten() {
        ensure!(
            e["from"] == "gateway-us-east" || e["to"] == "gateway-us-east",
            "filtered edge touches the workload: {e}"
        );
    }

    // Bad parameters: 400 with a JSON message, never a panic.
    for path in [
        "/v1/dependencies?since=yesterday",
        "/v1/dependencies?since=2000&until=1000",
        "/v1/dependencies?scope=everywhere",
        "/v1/dependencies?colour=blue",
        "/v1/dependencies?workload=",
    ] {
        let (status, body) = get(addr, path).await?;
        ensure!(status == 400, "{path}: {status} {body}");
        ensure!(body["error"].is_string(), "{path}: JSON error, got {body}");
    }

    // The page.
    let Some(browser) = Browser::launch("service_map_shows_the_demo")? else {
        return Ok(());
    };
    let mut page = Page::open(&browser).await?;
    let ready_ms = page.load_map(&format!("http://{addr}/")).await?;
    loud(&format!("demo map drawn {ready_ms:.0} ms after navigation"));
    let labels = page
        .eval("[...document.querySelectorAll('#nodes text')].map(t => t.textContent)")
        .await?;
    let labels: Vec<String> = serde_json::from_value(labels)?;
    ensure!(
        labels.iter().any(|l| l == "gateway-us-east"),
        "the map shows the gateway: {labels:?}"
    );
    let shown = backends.iter().filter(|b| labels.contains(b)).count();
    ensure!(
        shown == backends.len(),
        "the map shows the gateway's {} backends, found {shown}: {labels:?}",
        backends.len()
    );
    let members = page
        .eval("document.querySelectorAll('#health .pill.alive').length")
        .await?;
    ensure!(
        members == json!(6),
        "6 live members by region, got {members}"
    );
    page.screenshot(&screenshot_dir().join("demo-map.png"))
        .await?;

    // Clicking the gateway lists its callees.
    let clicked = page
        .eval(
            "(() => { const g = [...document.querySelectorAll('#nodes > g')].find(g => g.querySelector('text').textContent === 'gateway-us-east'); if (!g) return false; g.dispatchEvent(new MouseEvent('click', { bubbles: true })); return true; })()",
        )
        .await?;
    ensure!(clicked == json!(true), "the gateway's node is clickable");
    let detail = page
        .eval("document.getElementById('detail-name')?.textContent || ''")
        .await?;
    ensure!(detail == json!("gateway-us-east"), "detail shows {detail}");
    let callees = page
        .eval("document.querySelectorAll('#detail table').length ? document.querySelectorAll('#detail table')[document.querySelectorAll('#detail table').length - 1].querySelectorAll('tbody tr').length : 0")
        .await?;
    ensure!(
        callees.as_u64().unwrap_or(0) >= backends.len() as u64,
        "the callee table lists the backends: {callees}"
    );
    page.screenshot(&screenshot_dir().join("demo-gateway-selected.png"))
        .await?;
    ensure!(page.errors.is_empty(), "console errors: {:?}", page.errors);
    Ok(())
}

/// A deterministic answer of `workloads` workloads in three tiers (gateways → services →
/// leaves), some leaves' calls unattributed and some external.
fn thousand_workloads(workloads: usize) -> Value {
    let gateways = workloads / 100;
    let services = workloads / 10;
    let leaves = workloads - gateways - services;
    let mut edges = Vec::new();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut edge = |from: String, from_kind: &str, to: String, to_kind: &str, flows: u64| {
        let unattributed = if to_kind == "unattributed" { flows } else { 0 };
        edges.push(json!({
            "from": from, "from_kind": from_kind, "to": to, "to_kind": to_kind,
            "flows": flows, "bytes": flows * 4_096,
            "unattributed_flows": unattributed,
            "unattributed_share": if unattributed > 0 { 1.0 } else { 0.0 },
            "unattributed_reasons": if unattributed > 0 { json!({ "no_owner": unattributed }) } else { json!({}) },
        }));
    };
    for g in 0..gateways {
        for _ in 0..(services / gateways * 3) {
            let s = next() as usize % services;
            edge(
                format!("gateway-{g:02}"),
                "workload",
                format!("svc-{s:03}"),
                "workload",
                1 + next() % 10_000,
            );
        }
    }
    for s in 0..services {
        for _ in 0..(leaves / services * 2) {
            let l = next() as usize % leaves;
            edge(
                format!("svc-{s:03}"),
                "workload",
                format!("leaf-{l:04}"),
                "workload",
                1 + next() % 1_000,
            );
        }
    }
    for l in 0..leaves {
        // Every leaf appears even if no service happened to call it.
        edge(
            format!("svc-{:03}", l % services),
            "workload",
            format!("leaf-{l:04}"),
            "workload",
            1 + next() % 100,
        );
        if next() % 10 == 0 {
            edge(
                format!("leaf-{l:04}"),
                "workload",
                "unattributed".to_owned(),
                "unattributed",
                1 + next() % 50,
            );
        }
        if next() % 20 == 0 {
            edge(
                format!("leaf-{l:04}"),
                "workload",
                "external".to_owned(),
                "external",
                1 + next() % 50,
            );
        }
    }
    let flows: u64 = edges.iter().filter_map(|e| e["flows"].as_u64()).sum();
    let unattributed: u64 = edges
        .iter()
        .filter_map(|e| e["unattributed_flows"].as_u64())
        .sum();
    json!({
        "scope": "cluster", "node_id": "fixture-0", "since_ms": 0, "until_ms": 3_600_000,
        "workload": null, "partial": false, "nodes_answered": ["fixture-0"], "nodes_missing": [],
        "members_down": [], "edges": edges,
        "totals": { "flows": flows, "bytes": flows * 4_096, "unattributed_flows": unattributed,
                    "unattributed_share": unattributed as f64 / flows as f64,
                    "unattributed_reasons": { "no_owner": unattributed } },
        "edges_dropped": 0, "edges_truncated": 0, "edges_unreadable": 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_map_draws_a_thousand_workloads() -> anyhow::Result<()> {
    const WORKLOADS: usize = 1_000;
    let answer = thousand_workloads(WORKLOADS);
    // The answer parses as what a node sends.
    let typed: tenure_node::shell::fanout::ClusterAnswer = serde_json::from_value(answer.clone())?;
    let edge_count = typed.edges.len();
    let cluster = json!({
        "node_id": "fixture-0", "region": "us-east", "ready": true,
        "wan_members": [{ "node_id": "fixture-1", "region": "eu-west" }],
        "members_seen": [{ "node_id": "fixture-1", "region": "eu-west", "state": "alive" }],
        "ring": { "members": ["fixture-0"] },
    });
    let app = tenure_node::ui::router::<()>()
        .route(
            "/v1/dependencies",
            axum::routing::get(move || {
                let answer = answer.clone();
                async move { axum::Json(answer) }
            }),
        )
        .route(
            "/v1/cluster",
            axum::routing::get(move || {
                let cluster = cluster.clone();
                async move { axum::Json(cluster) }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let Some(browser) = Browser::launch("service_map_draws_a_thousand_workloads")? else {
        server.abort();
        return Ok(());
    };
    let mut page = Page::open(&browser).await?;
    let ready_ms = page.load_map(&format!("http://{addr}/")).await?;
    let nodes = page.eval("Number(document.body.dataset.nodes)").await?;
    let timing = page
        .eval("document.getElementById('timing').textContent")
        .await?;
    loud(&format!(
        "LOAD TIME: {WORKLOADS} workloads, {edge_count} edges: map drawn {ready_ms:.0} ms after navigation ({timing})"
    ));
    // 1,000 workloads plus the two pseudo-nodes.
    ensure!(nodes == json!(WORKLOADS + 2), "nodes on the map: {nodes}");
    ensure!(
        ready_ms < THOUSAND_WORKLOADS_LOAD_MS_MAX,
        "{WORKLOADS} workloads took {ready_ms:.0} ms (limit {THOUSAND_WORKLOADS_LOAD_MS_MAX} ms)"
    );
    // Selecting the busiest service stays quick too.
    let select_ms = page
        .eval("(() => { const g = [...document.querySelectorAll('#nodes > g')].find(g => g.querySelector('text').textContent === 'svc-000'); const t = performance.now(); g.dispatchEvent(new MouseEvent('click', { bubbles: true })); return performance.now() - t; })()")
        .await?;
    loud(&format!(
        "selecting a workload among {WORKLOADS}: {select_ms} ms"
    ));
    page.screenshot(&screenshot_dir().join("thousand-workloads.png"))
        .await?;
    ensure!(page.errors.is_empty(), "console errors: {:?}", page.errors);
    server.abort();
    Ok(())
}
