//! The Kubernetes identity source through the real kube client, against a local HTTP
//! server that replays API objects as the API server sends them: a `PodList`, then watch
//! streams of newline-delimited `ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK` events, a
//! `410 Gone` `ERROR` event, a connection dropped mid-stream, a line that is not JSON, and
//! pods the source must not claim. No API server runs here: the replay stands in for one.
//! What is asserted is what the exporter's local history makes of it: tenures and stamps.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tenure_node::config::IdentityConfig;
use tenure_node::exporter::history::{HistoryConfig, LocalHistory, Stamp, Tenure};
use tenure_node::exporter::identity::IdentitySource;
use tenure_node::shell::clock;
use tokio::sync::mpsc;

const NODE: &str = "node-a";
const DEADLINE: Duration = Duration::from_secs(30);

/// One piece of a watch response.
enum Chunk {
    Line(String),
    /// Drop the connection mid-stream (no final chunk).
    Abort,
}

#[derive(Default)]
struct Replay {
    /// `PodList` bodies, one per list request; none queued: 503.
    lists: VecDeque<Value>,
    /// Watch streams, one per watch request; none queued: a stream that stays open.
    watches: VecDeque<mpsc::UnboundedReceiver<Chunk>>,
    /// Every request's query string, in order.
    requests: Vec<String>,
}

type Shared = Arc<Mutex<Replay>>;

async fn pods(State(replay): State<Shared>, RawQuery(query): RawQuery) -> Response {
    let query = query.unwrap_or_default();
    let mut r = replay.lock().unwrap();
    r.requests.push(query.clone());
    if !query.contains("fieldSelector=spec.nodeName%3Dnode-a") {
        return (StatusCode::BAD_REQUEST, "no node field selector").into_response();
    }
    if query.contains("watch=true") {
        let rx = r.watches.pop_front();
        let stream = futures_util::stream::unfold(rx, |rx| async move {
            let mut rx = match rx {
                Some(rx) => rx,
                None => futures_util::future::pending().await,
            };
            match rx.recv().await {
                Some(Chunk::Line(line)) => Some((Ok(Bytes::from(line + "\n")), Some(rx))),
                Some(Chunk::Abort) => Some((Err(std::io::Error::other("dropped")), None)),
                // The test ended the stream: a clean end.
                None => None,
            }
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .unwrap();
    }
    match r.lists.pop_front() {
        Some(list) => axum::Json(list).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no list queued").into_response(),
    }
}

struct Server {
    url: String,
    replay: Shared,
}

impl Server {
    async fn start() -> Server {
        let replay = Shared::default();
        let app = axum::Router::new()
            .route("/api/v1/pods", axum::routing::get(pods))
            .with_state(replay.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Server { url, replay }
    }

    fn list(&self, version: &str, items: Vec<Value>) {
        self.replay.lock().unwrap().lists.push_back(json!({
            "apiVersion": "v1",
            "kind": "PodList",
            "metadata": {"resourceVersion": version},
            "items": items,
        }));
    }

    fn watch(&self) -> Watch {
        let (tx, rx) = mpsc::unbounded_channel();
        self.replay.lock().unwrap().watches.push_back(rx);
        Watch { tx }
    }

    fn requests(&self) -> Vec<String> {
        self.replay.lock().unwrap().requests.clone()
    }

    fn lists_served(&self) -> usize {
        self.requests()
            .iter()
            .filter(|q| !q.contains("watch=true"))
            .count()
    }
}

struct Watch {
    tx: mpsc::UnboundedSender<Chunk>,
}

impl Watch {
    fn event(&self, kind: &str, object: &Value) {
        let line = json!({"type": kind, "object": object}).to_string();
        self.tx.send(Chunk::Line(line)).unwrap();
    }

    fn raw(&self, line: &str) {
        self.tx.send(Chunk::Line(line.to_string())).unwrap();
    }

    fn bookmark(&self, version: &str) {
        self.event(
            "BOOKMARK",
            &json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": version}}),
        );
    }

    fn gone(&self) {
        self.event(
            "ERROR",
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "too old resource version: 10 (2000)", "reason": "Expired", "code": 410}),
        );
    }

    fn abort(&self) {
        self.tx.send(Chunk::Abort).unwrap();
    }
}

fn rfc3339(ms: u64) -> String {
    let ts = k8s_openapi::jiff::Timestamp::from_second(i64::try_from(ms / 1000).unwrap()).unwrap();
    ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A pod object as the API server sends it.
struct PodSpec<'a> {
    uid: &'a str,
    name: &'a str,
    owner: Option<(&'a str, &'a str)>,
    ip: Option<&'a str>,
    version: &'a str,
}

fn pod(p: &PodSpec<'_>) -> Value {
    let mut pod = json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": p.name,
            "namespace": "shop",
            "uid": p.uid,
            "resourceVersion": p.version,
            "creationTimestamp": rfc3339(clock::now().0 - 120_000),
            "labels": {"app": "x", "pod-template-hash": "5f7c9d8b4"},
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1"}],
        },
        "spec": {
            "nodeName": NODE,
            "restartPolicy": "Always",
            "serviceAccountName": "default",
            "containers": [{"name": "main", "image": "registry.example/app:1", "resources": {}}],
        },
        "status": {
            "phase": "Pending",
            "qosClass": "BestEffort",
            "conditions": [{"type": "PodScheduled", "status": "True", "lastProbeTime": null,
                "lastTransitionTime": rfc3339(clock::now().0 - 120_000)}],
        },
    });
    if let Some((kind, owner)) = p.owner {
        pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": kind,
            "name": owner, "uid": format!("{owner}-uid"), "controller": true, "blockOwnerDeletion": true}]);
    }
    if let Some(ip) = p.ip {
        pod["status"]["podIP"] = json!(ip);
        pod["status"]["podIPs"] = json!([{"ip": ip}]);
        pod["status"]["hostIP"] = json!("192.168.1.10");
    }
    pod
}

fn running(mut pod: Value, sandbox_ms: u64) -> Value {
    pod["status"]["phase"] = json!("Running");
    pod["status"]["startTime"] = json!(rfc3339(sandbox_ms - 3000));
    pod["status"]["conditions"] = json!([
        {"type": "PodReadyToStartContainers", "status": "True", "lastProbeTime": null, "lastTransitionTime": rfc3339(sandbox_ms)},
        {"type": "Initialized", "status": "True", "lastProbeTime": null, "lastTransitionTime": rfc3339(sandbox_ms - 2000)},
        {"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": rfc3339(sandbox_ms + 2000)},
        {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": rfc3339(sandbox_ms - 4000)},
    ]);
    pod["status"]["containerStatuses"] = json!([{"name": "main", "image": "registry.example/app:1",
        "imageID": "", "containerID": "containerd://abc", "ready": true, "restartCount": 0, "started": true,
        "state": {"running": {"startedAt": rfc3339(sandbox_ms + 1000)}}}]);
    pod
}

fn completed(mut pod: Value, finished_ms: u64) -> Value {
    pod["status"]["phase"] = json!("Succeeded");
    pod["status"]["containerStatuses"] = json!([{"name": "main", "image": "registry.example/app:1",
        "imageID": "", "containerID": "containerd://abc", "ready": false, "restartCount": 0, "started": false,
        "state": {"terminated": {"exitCode": 0, "reason": "Completed",
            "startedAt": rfc3339(finished_ms - 10_000), "finishedAt": rfc3339(finished_ms)}}}]);
    pod
}

/// The exporter's side: its identity source (the real kube client) and local history.
struct Exporter {
    source: IdentitySource,
    history: LocalHistory,
}

impl Exporter {
    fn start(server: &Server) -> anyhow::Result<Exporter> {
        let source = IdentitySource::new(IdentityConfig::Kubernetes {
            node_name: Some(NODE.into()),
            api_server: Some(server.url.clone()),
            staleness_limit_ms: 5_000,
        })?;
        let history = LocalHistory::new(HistoryConfig {
            margin_ms: 0,
            ..HistoryConfig::default()
        });
        Ok(Exporter { source, history })
    }

    /// Polls the source as the exporter does each heartbeat, until `done` holds.
    async fn until(
        &mut self,
        what: &str,
        mut done: impl FnMut(&LocalHistory) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(observation) = self.source.poll() {
                self.history.observe(clock::now().0, 0, observation);
            }
            if done(&self.history) {
                return Ok(());
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn tenures(&self, ip_: &str) -> Vec<Tenure> {
        self.history.tenures(ip(ip_)).to_vec()
    }

    fn stamp(&self, ip_: &str, start_ms: u64, end_ms: u64) -> Stamp {
        self.history.stamp(ip(ip_), start_ms, end_ms)
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn workload(w: &str) -> Stamp {
    Stamp::Workload(Arc::from(w))
}

/// A whole second, some time before now.
fn second_ago(s: u64) -> u64 {
    let now = clock::now().0;
    now - now % 1000 - s * 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_and_a_completed_job_pods_ip_taken_by_a_new_pod() -> anyhow::Result<()> {
    let server = Server::start().await;
    let sandbox = second_ago(60);
    let job = PodSpec {
        uid: "job-uid",
        name: "migrate-x7k2p",
        owner: Some(("Job", "migrate")),
        ip: Some("10.1.0.5"),
        version: "9",
    };
    let pending = PodSpec {
        uid: "pending-uid",
        name: "queued",
        owner: None,
        ip: None,
        version: "9",
    };
    server.list("10", vec![running(pod(&job), sandbox), pod(&pending)]);
    let watch = server.watch();
    let mut exporter = Exporter::start(&server)?;
    exporter
        .until("the job's tenure", |h| {
            !h.tenures(ip("10.1.0.5")).is_empty()
        })
        .await?;
    let job_tenure = &exporter.tenures("10.1.0.5")[0];
    assert_eq!(job_tenure.workload.as_ref(), "shop/job/migrate");
    assert_eq!(
        job_tenure.since_ms,
        sandbox + 999,
        "the sandbox condition, to the end of its second"
    );

    // The Job completes; its status keeps the IP; a Deployment's new pod is given it.
    let finished = second_ago(20);
    watch.event(
        "MODIFIED",
        &completed(
            pod(&PodSpec {
                version: "11",
                ..job
            }),
            finished,
        ),
    );
    let web = PodSpec {
        uid: "web-uid",
        name: "web-5f7c9d8b4-q9z8w",
        owner: Some(("ReplicaSet", "web-5f7c9d8b4")),
        ip: None,
        version: "12",
    };
    watch.event("ADDED", &pod(&web));
    let web_sandbox = second_ago(10);
    watch.event(
        "MODIFIED",
        &running(
            pod(&PodSpec {
                ip: Some("10.1.0.5"),
                version: "13",
                ..web
            }),
            web_sandbox,
        ),
    );
    watch.bookmark("14");
    exporter
        .until("the new pod's tenure", |h| {
            h.tenures(ip("10.1.0.5")).len() == 2
        })
        .await?;
    let tenures = exporter.tenures("10.1.0.5");
    assert_eq!(
        tenures[0].until_ms,
        Some(finished),
        "the job ends at its finishedAt"
    );
    assert_eq!(tenures[1].workload.as_ref(), "shop/deployment/web");
    assert_eq!(tenures[1].since_ms, web_sandbox + 999);
    assert_eq!(tenures[1].until_ms, None);
    assert!(exporter.tenures("10.1.0.6").is_empty());

    // Flows of the job are stamped with the job, the new pod's with the new pod, and none
    // that straddles the handover with either.
    assert_eq!(
        exporter.stamp("10.1.0.5", sandbox + 5000, finished - 1000),
        workload("shop/job/migrate")
    );
    let now = clock::now().0;
    assert_eq!(
        exporter.stamp("10.1.0.5", web_sandbox + 2000, now - 100),
        workload("shop/deployment/web")
    );
    for (start, end) in [
        (finished - 1000, finished + 1000),
        (finished + 1, web_sandbox),
        (sandbox + 5000, now - 100),
    ] {
        let stamp = exporter.stamp("10.1.0.5", start, end);
        assert!(
            matches!(stamp, Stamp::Unattributed(_)),
            "[{start}, {end}] straddles: {stamp:?}"
        );
    }
    assert_eq!(
        server.lists_served(),
        1,
        "no relist: {:?}",
        server.requests()
    );
    let watches: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|q| q.contains("watch=true"))
        .collect();
    assert!(
        watches[0].contains("resourceVersion=10")
            && watches[0].contains("allowWatchBookmarks=true"),
        "{watches:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_closes_at_arrival_and_bookmarks_move_the_watch_on() -> anyhow::Result<()> {
    let server = Server::start().await;
    let a = PodSpec {
        uid: "a-uid",
        name: "db-0",
        owner: Some(("StatefulSet", "db")),
        ip: Some("10.1.0.7"),
        version: "5",
    };
    let a_sandbox = second_ago(30);
    server.list("10", vec![running(pod(&a), a_sandbox)]);
    let first = server.watch();
    let second = server.watch();
    let mut exporter = Exporter::start(&server)?;
    exporter
        .until("db-0's tenure", |h| !h.tenures(ip("10.1.0.7")).is_empty())
        .await?;
    // A bookmark, then the server ends the stream cleanly (its timeout): the source
    // watches again from the bookmark's version, without a relist.
    first.bookmark("40");
    drop(first);
    let before = clock::now().0;
    let mut deleting = running(pod(&PodSpec { version: "41", ..a }), a_sandbox);
    deleting["metadata"]["deletionTimestamp"] = json!(rfc3339(before + 30_000));
    deleting["metadata"]["deletionGracePeriodSeconds"] = json!(30);
    second.event("MODIFIED", &deleting);
    second.event("DELETED", &deleting);
    exporter
        .until("db-0's end", |h| {
            h.tenures(ip("10.1.0.7"))
                .first()
                .is_some_and(|t| t.until_ms.is_some())
        })
        .await?;
    let until = exporter.tenures("10.1.0.7")[0].until_ms.context("closed")?;
    let after = clock::now().0;
    assert!(
        (before..=after).contains(&until),
        "the DELETED event's arrival: {before} <= {until} <= {after}"
    );
    let watches: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|q| q.contains("watch=true"))
        .collect();
    assert_eq!(watches.len(), 2, "{watches:?}");
    assert!(
        watches[1].contains("resourceVersion=40"),
        "from the bookmark: {watches:?}"
    );
    assert_eq!(server.lists_served(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_gone_relists_and_pods_gone_meanwhile_close_when_the_watch_was_last_current(
) -> anyhow::Result<()> {
    let server = Server::start().await;
    let a = PodSpec {
        uid: "a-uid",
        name: "a",
        owner: None,
        ip: Some("10.1.0.8"),
        version: "5",
    };
    let b = PodSpec {
        uid: "b-uid",
        name: "agent-x",
        owner: Some(("DaemonSet", "agent")),
        ip: Some("10.1.0.9"),
        version: "6",
    };
    let b_sandbox = second_ago(30);
    server.list(
        "10",
        vec![running(pod(&a), b_sandbox), running(pod(&b), b_sandbox)],
    );
    let first = server.watch();
    let mut exporter = Exporter::start(&server)?;
    exporter
        .until("both tenures", |h| {
            !h.tenures(ip("10.1.0.8")).is_empty() && !h.tenures(ip("10.1.0.9")).is_empty()
        })
        .await?;
    let bookmark_sent = clock::now().0;
    first.bookmark("30");
    // Let the bookmark arrive before the watch is cut off from its history.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // `a` is deleted while the watch cannot say so: the server answers 410, a relist
    // no longer has it.
    server.list("2000", vec![running(pod(&b), b_sandbox)]);
    let _second = server.watch();
    let gone_sent = clock::now().0;
    first.gone();
    exporter
        .until("a's end", |h| {
            h.tenures(ip("10.1.0.8"))
                .first()
                .is_some_and(|t| t.until_ms.is_some())
        })
        .await?;
    let until = exporter.tenures("10.1.0.8")[0].until_ms.context("closed")?;
    assert!(
        (bookmark_sent..=gone_sent).contains(&until),
        "the bookmark's arrival, the last moment the watch was current: {bookmark_sent} <= {until} <= {gone_sent}"
    );
    let b_tenures = exporter.tenures("10.1.0.9");
    assert_eq!(
        b_tenures.len(),
        1,
        "b's tenure goes on across the relist: {b_tenures:?}"
    );
    assert_eq!(b_tenures[0].until_ms, None);
    assert_eq!(server.lists_served(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_loses_no_transition() -> anyhow::Result<()> {
    let server = Server::start().await;
    let a = PodSpec {
        uid: "a-uid",
        name: "a",
        owner: None,
        ip: Some("10.1.0.10"),
        version: "5",
    };
    server.list("10", vec![running(pod(&a), second_ago(30))]);
    let first = server.watch();
    let mut exporter = Exporter::start(&server)?;
    exporter
        .until("a's tenure", |h| !h.tenures(ip("10.1.0.10")).is_empty())
        .await?;
    // A new pod, then the connection drops; `a` completes while it is down.
    let c = PodSpec {
        uid: "c-uid",
        name: "c",
        owner: None,
        ip: Some("10.1.0.11"),
        version: "11",
    };
    let c_sandbox = second_ago(5);
    first.event("ADDED", &running(pod(&c), c_sandbox));
    exporter
        .until("c's tenure", |h| !h.tenures(ip("10.1.0.11")).is_empty())
        .await?;
    let a_finished = second_ago(1);
    server.list(
        "20",
        vec![
            completed(pod(&PodSpec { version: "15", ..a }), a_finished),
            running(pod(&c), c_sandbox),
        ],
    );
    let _second = server.watch();
    first.abort();
    exporter
        .until("a's end", |h| {
            h.tenures(ip("10.1.0.10"))
                .first()
                .is_some_and(|t| t.until_ms.is_some())
        })
        .await?;
    assert_eq!(
        exporter.tenures("10.1.0.10")[0].until_ms,
        Some(a_finished),
        "the relist shows a completed"
    );
    let c_tenures = exporter.tenures("10.1.0.11");
    assert_eq!(c_tenures.len(), 1, "{c_tenures:?}");
    assert_eq!(c_tenures[0].since_ms, c_sandbox + 999);
    assert_eq!(c_tenures[0].until_ms, None);
    assert_eq!(server.lists_served(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_events_and_pods_without_ips_claim_nothing() -> anyhow::Result<()> {
    let server = Server::start().await;
    let a = PodSpec {
        uid: "a-uid",
        name: "a",
        owner: None,
        ip: Some("10.1.0.12"),
        version: "5",
    };
    let mut host = running(
        pod(&PodSpec {
            uid: "h-uid",
            name: "kube-proxy-x",
            owner: Some(("DaemonSet", "kube-proxy")),
            ip: Some("192.168.1.10"),
            version: "5",
        }),
        second_ago(300),
    );
    host["spec"]["hostNetwork"] = json!(true);
    let no_ip = PodSpec {
        uid: "n-uid",
        name: "n",
        owner: None,
        ip: None,
        version: "5",
    };
    let mut no_ip = running(pod(&no_ip), second_ago(30));
    no_ip["status"]["podIPs"] = json!([]);
    server.list("10", vec![running(pod(&a), second_ago(30)), host, no_ip]);
    let first = server.watch();
    let mut exporter = Exporter::start(&server)?;
    exporter
        .until("a's tenure", |h| !h.tenures(ip("10.1.0.12")).is_empty())
        .await?;
    assert!(
        exporter.tenures("192.168.1.10").is_empty(),
        "hostNetwork pods hold no IP"
    );
    // An update whose IP cannot be read: what `a` held is released, without a relist.
    let before = clock::now().0;
    let mut bad = running(pod(&PodSpec { version: "12", ..a }), second_ago(30));
    bad["status"]["podIPs"] = json!([{"ip": "10.1.0.999"}]);
    first.event("MODIFIED", &bad);
    exporter
        .until("a's end", |h| {
            h.tenures(ip("10.1.0.12"))
                .first()
                .is_some_and(|t| t.until_ms.is_some())
        })
        .await?;
    let until = exporter.tenures("10.1.0.12")[0]
        .until_ms
        .context("closed")?;
    assert!(
        until >= before && until <= clock::now().0,
        "the event's arrival: {before} <= {until}"
    );
    assert_eq!(server.lists_served(), 1);
    // A line that is no watch event: the watch is broken, and a relist follows.
    server.list("30", vec![]);
    let _second = server.watch();
    // (kube-client itself skips a line cut short, which only a stream's last line can be:
    // the stream then ends, and the watch resumes from the last version.)
    first.raw(r#"{"type": "MODIFIED", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"uid": 7}}}"#);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while server.lists_served() < 2 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no relist after a malformed line: {:?}",
            server.requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_node_name_is_an_error_naming_the_field() {
    // NODE_NAME is not set in the test's environment (this test needs it unset).
    if std::env::var_os("NODE_NAME").is_some() {
        eprintln!("SKIPPED (NODE_NAME is set): a_missing_node_name_is_an_error_naming_the_field");
        return;
    }
    let err = IdentitySource::new(IdentityConfig::Kubernetes {
        node_name: None,
        api_server: Some("http://127.0.0.1:1".into()),
        staleness_limit_ms: 5_000,
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("identity.node_name"), "{err:#}");
}
