//! The pods of this node as an identity source, sans-io: Pod objects from a list or a
//! watch go in with the time they arrived, [`Observation`]s for the local history come
//! out. The shell (`shell.rs`) lists and watches the API server; everything it learns
//! passes through [`PodTracker::handle`].
//!
//! - A pod holds its IPs (`status.podIPs`, else `status.podIP`) from the moment its
//!   sandbox got them ([`since_ms`]) until the first of: phase `Succeeded` or `Failed`
//!   (at its containers' latest `finishedAt`), its deletion (the `DELETED` event, at the
//!   earlier of its arrival and `deletionTimestamp`), or its IPs changing. A terminal pod
//!   is released although `status.podIP` still names the IP.
//! - `hostNetwork` pods share the node's IP with every other such pod: they hold no IP
//!   tenure.
//! - The workload is `namespace/kind/name` of the pod's controller ([`workload`]); the
//!   pod's UID is kept with its tenure for the logs.
//! - After a relist (a `410 Gone`, any watch error), a pod no longer listed is released at
//!   the last moment the watch was known to be current: what the source can vouch for.
//! - While the watch is broken, the last known pods are observed for at most the
//!   staleness limit; after it, no observation comes out until the watch is current again
//!   (flows wait, claims stop advancing).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::history::{Held, Observation};

pub mod shell;

/// The longest workload name the wire carries
/// ([`tenure_gossip::wire::WORKLOAD_NAME_BYTES_MAX_DEFAULT`]).
const WORKLOAD_BYTES_MAX: usize = tenure_gossip::wire::WORKLOAD_NAME_BYTES_MAX_DEFAULT;

/// A pod as the tracker needs it, read from the API object by [`PodView::from_pod`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub uid: String,
    /// `namespace/name`, for the logs.
    pub name: String,
    pub workload: Arc<str>,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// When the pod got its IPs, if the object says ([`since_ms`]).
    pub since_ms: Option<u64>,
    /// Phase `Succeeded` or `Failed`: when its last container finished, if known.
    pub terminal: Option<Option<u64>>,
    /// `metadata.deletionTimestamp`.
    pub deletion_ms: Option<u64>,
}

/// Why a Pod object could not be read. The pod's IPs, if it held any, are released.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodError {
    #[error("pod without {field}")]
    Missing { field: &'static str },
    #[error("pod {pod}: {field} is not an IP address: {value:?}")]
    BadIp {
        pod: String,
        field: &'static str,
        value: String,
    },
    #[error("pod {pod}: workload name {workload:?} is longer than {WORKLOAD_BYTES_MAX} bytes")]
    WorkloadTooLong { pod: String, workload: String },
}

fn millis(t: &Time) -> u64 {
    u64::try_from(t.0.as_millisecond()).unwrap_or(0)
}

/// The last millisecond of the second `t` names: API times have a resolution of one second
/// (truncated), so the true instant lies in `[t, t + 999]`; a `since` must never be
/// earlier than the truth.
fn end_of_second(t: &Time) -> u64 {
    let ms = millis(t);
    ms - ms % 1000 + 999
}

/// When the pod got its IPs: the `PodReadyToStartContainers` condition's transition to
/// `True` (the kubelet sets it once the sandbox and its network are up), else the
/// earliest start of one of its containers (a container starts inside the sandbox, after
/// its network), else unknown. Rounded up to the end of the stated second. Earlier fields
/// (`status.startTime`, `PodScheduled`, `Initialized`) may predate the IP.
pub fn since_ms(pod: &Pod) -> Option<u64> {
    let status = pod.status.as_ref()?;
    let sandbox = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodReadyToStartContainers" && c.status == "True");
    if let Some(t) = sandbox.and_then(|c| c.last_transition_time.as_ref()) {
        return Some(end_of_second(t));
    }
    let statuses = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    statuses
        .filter_map(|c| {
            let state = c.state.as_ref()?;
            state
                .running
                .as_ref()
                .and_then(|r| r.started_at.as_ref())
                .or_else(|| {
                    state
                        .terminated
                        .as_ref()
                        .and_then(|t| t.started_at.as_ref())
                })
        })
        .map(end_of_second)
        .min()
}

/// The workload a pod belongs to, `namespace/kind/name`: its controller's kind and name,
/// with a ReplicaSet made by a Deployment (its name is the Deployment's plus `-` and the
/// pod's `pod-template-hash` label) named after the Deployment, and a Job made by a
/// CronJob (`<cronjob>-<scheduled minute since the epoch>`, at most a week before the
/// pod was created) after the CronJob. A pod without a controller is its own workload.
pub fn workload(pod: &Pod) -> Result<String, PodError> {
    let meta = &pod.metadata;
    let namespace = meta.namespace.as_deref().ok_or(PodError::Missing {
        field: "metadata.namespace",
    })?;
    let name = meta.name.as_deref().ok_or(PodError::Missing {
        field: "metadata.name",
    })?;
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    let (kind, owner) = match controller {
        None => ("pod", name.to_string()),
        Some(o) => match o.kind.as_str() {
            "ReplicaSet" => {
                let hash = meta
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("pod-template-hash"));
                match hash.and_then(|h| o.name.strip_suffix(h.as_str())?.strip_suffix('-')) {
                    Some(deployment) if !deployment.is_empty() => {
                        ("deployment", deployment.to_string())
                    }
                    Some(_) | None => ("replicaset", o.name.clone()),
                }
            }
            "Job" => match cronjob_of(&o.name, meta.creation_timestamp.as_ref()) {
                Some(cronjob) => ("cronjob", cronjob.to_string()),
                None => ("job", o.name.clone()),
            },
            "StatefulSet" => ("statefulset", o.name.clone()),
            "DaemonSet" => ("daemonset", o.name.clone()),
            "ReplicationController" => ("replicationcontroller", o.name.clone()),
            other => return Ok(format!("{namespace}/{}/{}", other.to_lowercase(), o.name)),
        },
    };
    Ok(format!("{namespace}/{kind}/{owner}"))
}

/// The CronJob a Job name was made from, when the name ends in a scheduled minute no
/// later than the pod's creation and at most a week before it.
fn cronjob_of<'a>(job: &'a str, created: Option<&Time>) -> Option<&'a str> {
    const WEEK_MS: u64 = 7 * 24 * 3_600_000;
    let (base, minute) = job.rsplit_once('-')?;
    if base.is_empty() || minute.is_empty() || !minute.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let scheduled_ms = minute.parse::<u64>().ok()?.checked_mul(60_000)?;
    let created_ms = millis(created?);
    (scheduled_ms <= created_ms && created_ms - scheduled_ms <= WEEK_MS).then_some(base)
}

impl PodView {
    /// Reads what the tracker needs from a Pod object.
    pub fn from_pod(pod: &Pod) -> Result<PodView, PodError> {
        let meta = &pod.metadata;
        let uid = meta.uid.clone().ok_or(PodError::Missing {
            field: "metadata.uid",
        })?;
        let workload = workload(pod)?;
        let name = format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        );
        if workload.len() > WORKLOAD_BYTES_MAX {
            return Err(PodError::WorkloadTooLong {
                pod: name,
                workload,
            });
        }
        let status = pod.status.as_ref();
        let mut ips = Vec::new();
        let listed = status
            .and_then(|s| s.pod_ips.as_ref())
            .filter(|l| !l.is_empty());
        match listed {
            Some(list) => {
                for entry in list {
                    ips.push(parse_ip(&name, "status.podIPs[].ip", &entry.ip)?);
                }
            }
            None => {
                if let Some(ip) = status
                    .and_then(|s| s.pod_ip.as_deref())
                    .filter(|s| !s.is_empty())
                {
                    ips.push(parse_ip(&name, "status.podIP", ip)?);
                }
            }
        }
        ips.sort();
        ips.dedup();
        let terminal = status
            .and_then(|s| s.phase.as_deref())
            .filter(|p| *p == "Succeeded" || *p == "Failed")
            .map(|_| {
                status
                    .and_then(|s| s.container_statuses.as_ref())
                    .into_iter()
                    .flatten()
                    .filter_map(|c| {
                        let t = c.state.as_ref()?.terminated.as_ref()?;
                        t.finished_at.as_ref().map(millis)
                    })
                    .max()
            });
        Ok(PodView {
            uid,
            name,
            workload: Arc::from(workload),
            ips,
            host_network: pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false),
            since_ms: since_ms(pod),
            terminal,
            deletion_ms: meta.deletion_timestamp.as_ref().map(millis),
        })
    }
}

fn parse_ip(pod: &str, field: &'static str, value: &str) -> Result<IpAddr, PodError> {
    value
        .parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| PodError::BadIp {
            pod: pod.to_string(),
            field,
            value: value.to_string(),
        })
}

/// What the shell learned from the API server, each with the time it arrived.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchInput {
    /// `ADDED` or `MODIFIED`.
    Applied(PodView),
    /// `DELETED`.
    Deleted(PodView),
    /// An object the shell could not read (`uid`, when it had one): whatever that pod held
    /// is released, since its state is no longer known.
    Malformed { uid: Option<String> },
    /// A `BOOKMARK`: the watch is current.
    Bookmark,
    /// A complete list, the start of a new watch: replaces everything known.
    Listed(Vec<PodView>),
    /// The watch broke (an error, a `410 Gone`, a failed connection): a list follows.
    Broken,
}

/// Limits of the tracker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackerConfig {
    /// How long after the watch broke the last known pods are still observed, in ms.
    pub staleness_limit_ms: u64,
    /// Pods tracked; past it a new pod is not tracked (counted).
    pub pods_max: usize,
}

/// Default [`TrackerConfig::staleness_limit_ms`].
pub const STALENESS_LIMIT_MS_DEFAULT: u64 = 5_000;
/// Default [`TrackerConfig::pods_max`]: far above the kubelet's 110 pods per node.
pub const PODS_MAX_DEFAULT: usize = 4_096;

impl Default for TrackerConfig {
    fn default() -> TrackerConfig {
        TrackerConfig {
            staleness_limit_ms: STALENESS_LIMIT_MS_DEFAULT,
            pods_max: PODS_MAX_DEFAULT,
        }
    }
}

/// Counters of the tracker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackerStats {
    pub lists: u64,
    pub breaks: u64,
    pub malformed: u64,
    pub host_network_pods: u64,
    /// Pods not tracked because of `pods_max`.
    pub pods_dropped: u64,
    /// Times two live pods named the same IP with no clear newest: neither was observed.
    pub ip_conflicts: u64,
}

/// A pod holding IPs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Holding {
    name: String,
    workload: Arc<str>,
    ips: Vec<IpAddr>,
    since_ms: Option<u64>,
}

/// The pods of this node and their IPs. See the module documentation.
#[derive(Debug)]
pub struct PodTracker {
    config: TrackerConfig,
    /// By pod UID.
    holding: BTreeMap<String, Holding>,
    /// Released since the last poll, with when.
    released: BTreeMap<IpAddr, u64>,
    /// The last moment the watch was known to be current.
    current_ms: Option<u64>,
    /// Whether the watch is broken (since `current_ms`) until the next list.
    broken: bool,
    stats: TrackerStats,
}

impl PodTracker {
    pub fn new(config: TrackerConfig) -> PodTracker {
        PodTracker {
            config,
            holding: BTreeMap::new(),
            released: BTreeMap::new(),
            current_ms: None,
            broken: false,
            stats: TrackerStats::default(),
        }
    }

    pub fn stats(&self) -> TrackerStats {
        self.stats
    }

    /// Whether a list has come in and the watch has not broken since.
    pub fn is_current(&self) -> bool {
        self.current_ms.is_some() && !self.broken
    }

    fn release(&mut self, ips: &[IpAddr], at_ms: u64) {
        for ip in ips {
            let at = self.released.get(ip).map_or(at_ms, |r| (*r).min(at_ms));
            self.released.insert(*ip, at);
        }
    }

    /// Takes one input that arrived at `now_ms`.
    pub fn handle(&mut self, now_ms: u64, input: WatchInput) {
        match input {
            WatchInput::Applied(pod) => {
                self.current(now_ms);
                self.apply(now_ms, pod);
            }
            WatchInput::Deleted(pod) => {
                self.current(now_ms);
                let at = [Some(now_ms), pod.deletion_ms, pod.terminal.flatten()]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(now_ms);
                if let Some(held) = self.holding.remove(&pod.uid) {
                    tracing::debug!(pod = %held.name, uid = %pod.uid, at, "pod deleted");
                    self.release(&held.ips, at);
                }
            }
            WatchInput::Malformed { uid } => {
                self.stats.malformed += 1;
                self.current(now_ms);
                let at = self.current_ms.unwrap_or(now_ms);
                if let Some(held) = uid.and_then(|u| self.holding.remove(&u)) {
                    self.release(&held.ips, at);
                }
            }
            WatchInput::Bookmark => self.current(now_ms),
            WatchInput::Listed(pods) => {
                self.stats.lists += 1;
                // Pods gone while the watch was down ended after the last moment it was
                // current, which is all the source can vouch for.
                let gone_at = self.current_ms.unwrap_or(now_ms);
                let listed: BTreeMap<&str, &PodView> =
                    pods.iter().map(|p| (p.uid.as_str(), p)).collect();
                let gone: Vec<String> = self
                    .holding
                    .keys()
                    .filter(|uid| !listed.contains_key(uid.as_str()))
                    .cloned()
                    .collect();
                for uid in gone {
                    if let Some(held) = self.holding.remove(&uid) {
                        tracing::debug!(pod = %held.name, %uid, at = gone_at, "pod gone at relist");
                        self.release(&held.ips, gone_at);
                    }
                }
                self.broken = false;
                self.current_ms = Some(self.current_ms.map_or(now_ms, |c| c.max(now_ms)));
                for pod in pods {
                    self.apply(now_ms, pod);
                }
            }
            WatchInput::Broken => {
                self.stats.breaks += 1;
                self.broken = true;
            }
        }
    }

    /// The watch delivered something: it is current as of `now_ms` (unless broken, when
    /// only a list makes it current again).
    fn current(&mut self, now_ms: u64) {
        if !self.broken {
            self.current_ms = Some(self.current_ms.map_or(now_ms, |c| c.max(now_ms)));
        }
    }

    fn apply(&mut self, now_ms: u64, pod: PodView) {
        let keeps = !pod.host_network && pod.terminal.is_none() && !pod.ips.is_empty();
        if pod.host_network {
            self.stats.host_network_pods += 1;
        }
        let previous = self.holding.remove(&pod.uid);
        if let Some(prev) = &previous {
            let end = pod.terminal.flatten().map_or(now_ms, |t| t.min(now_ms));
            let dropped: Vec<IpAddr> = prev
                .ips
                .iter()
                .filter(|ip| !keeps || !pod.ips.contains(ip))
                .copied()
                .collect();
            if !dropped.is_empty() {
                tracing::debug!(pod = %prev.name, uid = %pod.uid, at = end, "pod released IPs");
            }
            self.release(&dropped, end);
        }
        if !keeps {
            return;
        }
        if previous.is_none() && self.holding.len() >= self.config.pods_max.max(1) {
            self.stats.pods_dropped += 1;
            tracing::warn!(pod = %pod.name, limit = self.config.pods_max, "pod not tracked: too many pods");
            return;
        }
        if previous.is_none() {
            tracing::debug!(pod = %pod.name, uid = %pod.uid, workload = %pod.workload, since = ?pod.since_ms, "pod holds IPs");
        }
        self.holding.insert(
            pod.uid,
            Holding {
                name: pod.name,
                workload: pod.workload,
                ips: pod.ips,
                since_ms: pod.since_ms,
            },
        );
    }

    /// What the source knows as of `now_ms`, or `None` before the first list and once the
    /// watch has been broken for longer than the staleness limit.
    pub fn poll(&mut self, now_ms: u64) -> Option<Observation> {
        let current_ms = self.current_ms?;
        if self.broken && now_ms.saturating_sub(current_ms) > self.config.staleness_limit_ms {
            return None;
        }
        let mut by_ip: BTreeMap<IpAddr, Vec<&Holding>> = BTreeMap::new();
        for h in self.holding.values() {
            for ip in &h.ips {
                by_ip.entry(*ip).or_default().push(h);
            }
        }
        let mut held = BTreeMap::new();
        for (ip, holders) in by_ip {
            let chosen = match holders.as_slice() {
                [one] => Some(*one),
                // Two live pods name one IP (one terminating, its IP already given to a
                // new pod): the one that got it last holds it, when that is clear.
                many => {
                    let newest = many.iter().filter_map(|h| h.since_ms).max();
                    let at_newest = many.iter().filter(|h| h.since_ms == newest).count();
                    let all_known = many.iter().all(|h| h.since_ms.is_some());
                    let chosen = many.iter().find(|h| h.since_ms == newest).copied();
                    if newest.is_some() && all_known && at_newest == 1 {
                        chosen
                    } else {
                        self.stats.ip_conflicts += 1;
                        None
                    }
                }
            };
            if let Some(h) = chosen {
                held.insert(
                    ip,
                    Held {
                        workload: h.workload.clone(),
                        since_ms: h.since_ms,
                    },
                );
            }
        }
        // A released IP another pod holds now stays in `released`: the history ends the
        // old tenure there rather than just before the new one.
        Some(Observation {
            held,
            changed_ms: Some(current_ms),
            released: std::mem::take(&mut self.released),
        })
    }
}

#[cfg(test)]
mod tests;
