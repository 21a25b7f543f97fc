use serde_json::{json, Value};

use super::*;
use crate::exporter::history::{HistoryConfig, LocalHistory, Stamp};
use tenure_gossip::wire::LocalReason;

/// 2026-12-08T03:00:00Z.
const T0_MS: u64 = 1_796_698_800_000;

fn rfc3339(ms: u64) -> String {
    // The API's format: whole seconds, truncated.
    let ts = k8s_openapi::jiff::Timestamp::from_second(i64::try_from(ms / 1000).unwrap()).unwrap();
    ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A pod object shaped as the API server sends it (the fields the source reads, and a
/// few it does not).
fn pod_json(uid: &str, name: &str, owner: Option<(&str, &str)>, ip: Option<&str>) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": uid,
            "resourceVersion": "100",
            "creationTimestamp": rfc3339(T0_MS),
            "labels": {"app": "web", "pod-template-hash": "7d9f8b6c5d"},
        },
        "spec": {
            "nodeName": "node-a",
            "containers": [{"name": "main", "image": "busybox"}],
        },
        "status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": rfc3339(T0_MS)}],
        },
    });
    if let Some((kind, owner)) = owner {
        pod["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": kind, "name": owner, "uid": "owner-uid",
            "controller": true, "blockOwnerDeletion": true,
        }]);
    }
    if let Some(ip) = ip {
        pod["status"]["podIP"] = json!(ip);
        pod["status"]["podIPs"] = json!([{"ip": ip}]);
    }
    pod
}

fn running(mut pod: Value, sandbox_ms: u64) -> Value {
    pod["status"]["phase"] = json!("Running");
    pod["status"]["conditions"] = json!([
        {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": rfc3339(sandbox_ms)},
        {"type": "Ready", "status": "True", "lastTransitionTime": rfc3339(sandbox_ms + 2000)},
    ]);
    pod["status"]["containerStatuses"] = json!([{
        "name": "main", "image": "busybox", "imageID": "", "ready": true, "restartCount": 0,
        "state": {"running": {"startedAt": rfc3339(sandbox_ms + 1000)}},
    }]);
    pod
}

fn succeeded(mut pod: Value, finished_ms: u64) -> Value {
    pod["status"]["phase"] = json!("Succeeded");
    pod["status"]["containerStatuses"] = json!([{
        "name": "main", "image": "busybox", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": 0, "reason": "Completed",
            "startedAt": rfc3339(finished_ms - 5000), "finishedAt": rfc3339(finished_ms)}},
    }]);
    pod
}

fn view(pod: &Value) -> PodView {
    let pod: Pod = serde_json::from_value(pod.clone()).unwrap();
    PodView::from_pod(&pod).unwrap()
}

fn workload_of(pod: &Value) -> String {
    view(pod).workload.to_string()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A tracker and the exporter's history it feeds, polled like the exporter polls.
struct Node {
    tracker: PodTracker,
    history: LocalHistory,
}

impl Node {
    fn new() -> Node {
        Node {
            tracker: PodTracker::new(TrackerConfig::default()),
            history: LocalHistory::new(HistoryConfig {
                margin_ms: 0,
                ..HistoryConfig::default()
            }),
        }
    }

    fn input(&mut self, now_ms: u64, input: WatchInput) {
        self.tracker.handle(now_ms, input);
    }

    fn poll(&mut self, now_ms: u64) -> bool {
        match self.tracker.poll(now_ms) {
            Some(observation) => {
                self.history.observe(now_ms, 0, &observation);
                true
            }
            None => false,
        }
    }

    fn stamp(&self, ip_: &str, start_ms: u64, end_ms: u64) -> Stamp {
        self.history.stamp(ip(ip_), start_ms, end_ms)
    }
}

fn stamped(w: &str) -> Stamp {
    Stamp::Workload(Arc::from(w))
}

#[test]
fn workloads_are_named_after_controllers() {
    let deployment = pod_json(
        "u1",
        "web-7d9f8b6c5d-x2x9q",
        Some(("ReplicaSet", "web-7d9f8b6c5d")),
        None,
    );
    assert_eq!(workload_of(&deployment), "shop/deployment/web");
    let bare_rs = pod_json("u2", "rs-abcde", Some(("ReplicaSet", "rs")), None);
    assert_eq!(
        workload_of(&bare_rs),
        "shop/replicaset/rs",
        "no hash suffix: the ReplicaSet"
    );
    let sts = pod_json("u3", "db-0", Some(("StatefulSet", "db")), None);
    assert_eq!(workload_of(&sts), "shop/statefulset/db");
    let ds = pod_json("u4", "agent-abcde", Some(("DaemonSet", "agent")), None);
    assert_eq!(workload_of(&ds), "shop/daemonset/agent");
    let job = pod_json("u5", "migrate-abcde", Some(("Job", "migrate")), None);
    assert_eq!(workload_of(&job), "shop/job/migrate");
    let minute = T0_MS / 60_000;
    let cron = pod_json("u6", "x", Some(("Job", &format!("backup-{minute}"))), None);
    assert_eq!(workload_of(&cron), "shop/cronjob/backup");
    let dated = pod_json("u7", "x", Some(("Job", "report-20240101")), None);
    assert_eq!(
        workload_of(&dated),
        "shop/job/report-20240101",
        "digits that are no scheduled minute"
    );
    let bare = pod_json("u8", "debug", None, None);
    assert_eq!(workload_of(&bare), "shop/pod/debug");
}

#[test]
fn since_is_the_sandbox_condition_rounded_up_else_the_first_container_start() {
    let pod = running(pod_json("u", "p", None, Some("10.1.0.5")), T0_MS + 10_000);
    assert_eq!(view(&pod).since_ms, Some(T0_MS + 10_999));
    let mut no_condition = pod.clone();
    no_condition["status"]["conditions"] = json!([]);
    assert_eq!(
        view(&no_condition).since_ms,
        Some(T0_MS + 11_999),
        "container start"
    );
    let pending = pod_json("u", "p", None, Some("10.1.0.5"));
    assert_eq!(
        view(&pending).since_ms,
        None,
        "PodScheduled predates the IP"
    );
}

#[test]
fn bad_objects_are_errors_naming_the_field() {
    let mut no_uid = pod_json("u", "p", None, None);
    no_uid["metadata"].as_object_mut().unwrap().remove("uid");
    let pod: Pod = serde_json::from_value(no_uid).unwrap();
    assert_eq!(
        PodView::from_pod(&pod),
        Err(PodError::Missing {
            field: "metadata.uid"
        })
    );
    let bad_ip = pod_json("u", "p", None, Some("10.1.0.300"));
    let pod: Pod = serde_json::from_value(bad_ip).unwrap();
    let err = PodView::from_pod(&pod).unwrap_err().to_string();
    assert!(
        err.contains("status.podIPs[].ip") && err.contains("10.1.0.300"),
        "{err}"
    );
}

#[test]
fn a_pod_holds_its_ip_from_its_sandbox_until_it_completes() {
    let mut node = Node::new();
    let job = pod_json("job-1", "migrate-abcde", Some(("Job", "migrate")), None);
    node.input(T0_MS, WatchInput::Listed(vec![view(&job)]));
    assert!(node.poll(T0_MS + 1000));
    assert!(node.history.tenures(ip("10.1.0.5")).is_empty(), "no IP yet");
    let job = pod_json(
        "job-1",
        "migrate-abcde",
        Some(("Job", "migrate")),
        Some("10.1.0.5"),
    );
    node.input(
        T0_MS + 3000,
        WatchInput::Applied(view(&running(job.clone(), T0_MS + 2000))),
    );
    assert!(node.poll(T0_MS + 4000));
    node.input(
        T0_MS + 9000,
        WatchInput::Applied(view(&succeeded(job, T0_MS + 8000))),
    );
    assert!(node.poll(T0_MS + 10_000));
    let tenures = node.history.tenures(ip("10.1.0.5"));
    assert_eq!(tenures.len(), 1);
    assert_eq!(tenures[0].workload.as_ref(), "shop/job/migrate");
    assert_eq!(tenures[0].since_ms, T0_MS + 2999);
    assert_eq!(
        tenures[0].until_ms,
        Some(T0_MS + 8000),
        "the container's finishedAt"
    );
    assert_eq!(
        node.stamp("10.1.0.5", T0_MS + 3500, T0_MS + 7000),
        stamped("shop/job/migrate")
    );
    assert_eq!(
        node.stamp("10.1.0.5", T0_MS + 7000, T0_MS + 9500),
        Stamp::Unattributed(LocalReason::Changed),
        "past the completion"
    );
}

#[test]
fn a_completed_job_pods_ip_taken_by_a_new_pod_is_never_stamped_with_the_job() {
    let mut node = Node::new();
    let job = pod_json(
        "job-1",
        "migrate-abcde",
        Some(("Job", "migrate")),
        Some("10.1.0.5"),
    );
    node.input(
        T0_MS,
        WatchInput::Listed(vec![view(&running(job.clone(), T0_MS - 10_000))]),
    );
    assert!(node.poll(T0_MS + 500));
    // Between two polls: the Job completes, then a new pod gets its IP while the Job pod's
    // status still shows it.
    node.input(
        T0_MS + 5000,
        WatchInput::Applied(view(&succeeded(job, T0_MS + 4000))),
    );
    let web = pod_json(
        "web-1",
        "web-7d9f8b6c5d-x",
        Some(("ReplicaSet", "web-7d9f8b6c5d")),
        Some("10.1.0.5"),
    );
    node.input(
        T0_MS + 7000,
        WatchInput::Applied(view(&running(web, T0_MS + 6000))),
    );
    assert!(node.poll(T0_MS + 8000));
    let tenures = node.history.tenures(ip("10.1.0.5"));
    assert_eq!(tenures.len(), 2);
    assert_eq!(
        tenures[0].until_ms,
        Some(T0_MS + 4000),
        "the job's end, not the new pod's start"
    );
    assert_eq!(tenures[1].workload.as_ref(), "shop/deployment/web");
    assert_eq!(tenures[1].since_ms, T0_MS + 6999);
    assert_eq!(
        node.stamp("10.1.0.5", T0_MS - 5000, T0_MS + 3000),
        stamped("shop/job/migrate")
    );
    assert_eq!(
        node.stamp("10.1.0.5", T0_MS + 7000, T0_MS + 7500),
        stamped("shop/deployment/web")
    );
    for (start, end, reason) in [
        (T0_MS + 3000, T0_MS + 4500, LocalReason::Changed),
        (T0_MS + 4500, T0_MS + 6500, LocalReason::Unknown),
        (T0_MS + 3000, T0_MS + 7500, LocalReason::Changed),
    ] {
        assert_eq!(
            node.stamp("10.1.0.5", start, end),
            Stamp::Unattributed(reason),
            "[{start}, {end}] is not within one tenure"
        );
    }
}

#[test]
fn deletion_releases_at_the_earlier_of_arrival_and_deletion_timestamp() {
    let mut node = Node::new();
    let pod = running(pod_json("p-1", "debug", None, Some("10.1.0.6")), T0_MS);
    node.input(T0_MS + 1000, WatchInput::Listed(vec![view(&pod)]));
    assert!(node.poll(T0_MS + 1000));
    let mut deleting = pod.clone();
    deleting["metadata"]["deletionTimestamp"] = json!(rfc3339(T0_MS + 40_000));
    node.input(T0_MS + 10_000, WatchInput::Applied(view(&deleting)));
    assert!(node.poll(T0_MS + 11_000));
    assert_eq!(
        node.history.tenures(ip("10.1.0.6"))[0].until_ms,
        None,
        "terminating still holds"
    );
    node.input(T0_MS + 13_000, WatchInput::Deleted(view(&deleting)));
    assert!(node.poll(T0_MS + 14_000));
    assert_eq!(
        node.history.tenures(ip("10.1.0.6"))[0].until_ms,
        Some(T0_MS + 13_000)
    );
}

#[test]
fn a_relist_closes_pods_gone_at_the_last_moment_the_watch_was_current() {
    let mut node = Node::new();
    let a = running(pod_json("a", "a", None, Some("10.1.0.7")), T0_MS);
    let b = running(pod_json("b", "b", None, Some("10.1.0.8")), T0_MS);
    node.input(T0_MS + 1000, WatchInput::Listed(vec![view(&a), view(&b)]));
    node.input(T0_MS + 2000, WatchInput::Bookmark);
    assert!(node.poll(T0_MS + 2000));
    node.input(T0_MS + 3000, WatchInput::Broken);
    assert!(
        node.poll(T0_MS + 4000),
        "within the staleness limit: the last known pods"
    );
    assert!(
        !node.poll(T0_MS + 2000 + STALENESS_LIMIT_MS_DEFAULT + 1),
        "stale: nothing"
    );
    assert!(!node.tracker.is_current());
    // Events while broken do not make the watch current: only a list does.
    node.input(T0_MS + 7500, WatchInput::Bookmark);
    assert!(!node.poll(T0_MS + 7600));
    node.input(T0_MS + 9000, WatchInput::Listed(vec![view(&b)]));
    assert!(node.poll(T0_MS + 9000));
    assert_eq!(
        node.history.tenures(ip("10.1.0.7"))[0].until_ms,
        Some(T0_MS + 2000)
    );
    assert_eq!(node.history.tenures(ip("10.1.0.8"))[0].until_ms, None);
    assert_eq!(node.tracker.stats().lists, 2);
}

#[test]
fn host_network_pods_and_pods_without_ips_hold_nothing() {
    let mut node = Node::new();
    let mut host = running(
        pod_json(
            "h",
            "kube-proxy-x",
            Some(("DaemonSet", "kube-proxy")),
            Some("192.168.1.10"),
        ),
        T0_MS,
    );
    host["spec"]["hostNetwork"] = json!(true);
    let pending = pod_json("p", "pending", None, None);
    node.input(T0_MS, WatchInput::Listed(vec![view(&host), view(&pending)]));
    assert!(node.poll(T0_MS + 1000));
    assert_eq!(
        node.stamp("192.168.1.10", T0_MS, T0_MS + 500),
        Stamp::NotLocal
    );
    assert_eq!(node.tracker.stats().host_network_pods, 1);
}

#[test]
fn a_malformed_update_releases_what_the_pod_held() {
    let mut node = Node::new();
    let a = running(pod_json("a", "a", None, Some("10.1.0.9")), T0_MS);
    node.input(T0_MS + 1000, WatchInput::Listed(vec![view(&a)]));
    assert!(node.poll(T0_MS + 1000));
    node.input(
        T0_MS + 4000,
        WatchInput::Malformed {
            uid: Some("a".into()),
        },
    );
    assert!(node.poll(T0_MS + 5000));
    assert_eq!(
        node.history.tenures(ip("10.1.0.9"))[0].until_ms,
        Some(T0_MS + 4000)
    );
    assert_eq!(node.tracker.stats().malformed, 1);
}

#[test]
fn two_live_pods_on_one_ip_give_it_to_the_newest_or_to_nobody() {
    let mut node = Node::new();
    let old = running(pod_json("old", "old", None, Some("10.1.0.10")), T0_MS);
    let new = running(
        pod_json("new", "new", None, Some("10.1.0.10")),
        T0_MS + 5000,
    );
    node.input(
        T0_MS + 6000,
        WatchInput::Listed(vec![view(&old), view(&new)]),
    );
    assert!(node.poll(T0_MS + 6000));
    assert_eq!(
        node.history.tenures(ip("10.1.0.10"))[0].workload.as_ref(),
        "shop/pod/new"
    );
    let mut unknown = pod_json("u", "unknown", None, Some("10.1.0.11"));
    unknown["status"]["phase"] = json!("Running");
    let other = running(pod_json("o", "other", None, Some("10.1.0.11")), T0_MS);
    node.input(
        T0_MS + 7000,
        WatchInput::Listed(vec![view(&unknown), view(&other)]),
    );
    assert!(node.poll(T0_MS + 7000));
    assert!(
        node.history.tenures(ip("10.1.0.11")).is_empty(),
        "unclear: nobody"
    );
    assert_eq!(node.tracker.stats().ip_conflicts, 1);
}
