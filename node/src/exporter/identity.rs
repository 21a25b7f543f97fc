//! Who the local workloads are, and since when they hold their IPs: from a host identity
//! file, or an IP → workload map file an orchestrator keeps current (re-read when it
//! changes).
//!
//! `since` is what makes a heartbeat safe: it states when the workload acquired the IP.
//! When a file gives none, the exporter uses the moment it first saw the mapping, which is
//! later than the truth, never earlier: it may leave a gap, but never claims time it
//! cannot vouch for.
//!
//! A containers source (`kind = "containers"`) is followed by its own task
//! ([`super::containers`]); polling it takes what that task has learned.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;

use super::containers::shell::ContainerSource;
use super::containers::{ContainersConfig, CONTAINERS_MAX_DEFAULT};
use super::history::{Held, Observation};
use super::kubernetes::shell::KubernetesSource;
use super::kubernetes::TrackerConfig;
use crate::config::IdentityConfig;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFile {
    workload: String,
    ips: Vec<IpAddr>,
    #[serde(default)]
    since_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MapEntry {
    workload: String,
    #[serde(default)]
    since_ms: Option<u64>,
}

/// An identity file, read into [`Observation`]s for the exporter core: the mapping, and
/// the file's modification time as the time the source states for its last change; or
/// the Kubernetes source ([`super::kubernetes`]).
#[derive(Debug)]
pub struct IdentitySource {
    config: IdentityConfig,
    kubernetes: Option<KubernetesSource>,
    /// The containers source's task, for `kind = "containers"`.
    containers: Option<ContainerSource>,
    current: Observation,
    modified: Option<SystemTime>,
    /// Whether `current` is what the file says now (false until a first good read, and
    /// after a failed one).
    fresh: bool,
}

impl IdentitySource {
    /// A source for `config`; the Kubernetes and containers sources start their tasks
    /// here (on the current tokio runtime).
    pub fn new(config: IdentityConfig) -> Result<IdentitySource, anyhow::Error> {
        let mut kubernetes = None;
        let mut containers = None;
        match &config {
            IdentityConfig::HostFile { .. } | IdentityConfig::MapFile { .. } => {}
            IdentityConfig::Kubernetes {
                node_name,
                api_server,
                staleness_limit_ms,
            } => {
                let node = IdentityConfig::kubernetes_node_name(
                    node_name.as_deref(),
                    std::env::var("NODE_NAME").ok().as_deref(),
                )?;
                let tracker = TrackerConfig {
                    staleness_limit_ms: *staleness_limit_ms,
                    ..TrackerConfig::default()
                };
                kubernetes = Some(KubernetesSource::start(
                    &node,
                    api_server.as_deref(),
                    tracker,
                )?);
            }
            IdentityConfig::Containers {
                socket,
                workload_label,
                stale_after_ms,
            } => {
                containers = Some(ContainerSource::start(
                    socket.clone(),
                    ContainersConfig {
                        workload_label: workload_label.clone(),
                        stale_after_ms: *stale_after_ms,
                        containers_max: CONTAINERS_MAX_DEFAULT,
                    },
                ));
            }
        }
        Ok(IdentitySource {
            config,
            kubernetes,
            containers,
            current: Observation::default(),
            modified: None,
            fresh: false,
        })
    }

    fn path(&self) -> Option<&PathBuf> {
        match &self.config {
            IdentityConfig::HostFile { path } | IdentityConfig::MapFile { path } => Some(path),
            IdentityConfig::Kubernetes { .. } | IdentityConfig::Containers { .. } => None,
        }
    }

    /// What the source says now (a file re-read when it changed), or `None` when it cannot
    /// be read or parsed (logged), or the Kubernetes watch is not current: then nothing is
    /// confirmed, and flows wait.
    pub fn poll(&mut self) -> Option<&Observation> {
        if let Some(kubernetes) = &self.kubernetes {
            self.current = kubernetes.poll()?;
            return Some(&self.current);
        }
        if let Some(containers) = &mut self.containers {
            self.current = containers.poll()?;
            return Some(&self.current);
        }
        let path = self.path()?.clone();
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if self.fresh && modified.is_some() && modified == self.modified {
            return Some(&self.current);
        }
        self.fresh = false;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "reading the identity file");
                return None;
            }
        };
        let parsed: Result<BTreeMap<IpAddr, Held>, serde_json::Error> = match &self.config {
            IdentityConfig::HostFile { .. } => serde_json::from_str::<HostFile>(&text).map(|h| {
                let workload: Arc<str> = Arc::from(h.workload);
                h.ips
                    .into_iter()
                    .map(|ip| {
                        (
                            ip.to_canonical(),
                            Held {
                                workload: workload.clone(),
                                since_ms: h.since_ms,
                            },
                        )
                    })
                    .collect()
            }),
            // The Kubernetes and containers sources were polled above; they have no file.
            IdentityConfig::Containers { .. } => return None,
            IdentityConfig::MapFile { .. } | IdentityConfig::Kubernetes { .. } => {
                serde_json::from_str::<BTreeMap<IpAddr, MapEntry>>(&text).map(|m| {
                    m.into_iter()
                        .map(|(ip, e)| {
                            (
                                ip.to_canonical(),
                                Held {
                                    workload: Arc::from(e.workload),
                                    since_ms: e.since_ms,
                                },
                            )
                        })
                        .collect()
                })
            }
        };
        match parsed {
            Ok(held) => {
                let changed_ms = modified
                    .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                self.current = Observation {
                    held,
                    changed_ms,
                    released: BTreeMap::new(),
                };
                self.modified = modified;
                self.fresh = true;
                Some(&self.current)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "parsing the identity file");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exporter::history::{HistoryConfig, LocalHistory};

    #[test]
    fn map_file_is_reread_and_since_defaults_to_first_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ips.json");
        std::fs::write(
            &path,
            r#"{"10.0.0.1": {"workload": "web", "since_ms": 5}, "10.0.0.2": {"workload": "db"}}"#,
        )
        .unwrap();
        let mut source =
            IdentitySource::new(IdentityConfig::MapFile { path: path.clone() }).unwrap();
        let mut history = LocalHistory::new(HistoryConfig::default());
        history.observe(100, 0, source.poll().unwrap());
        let claims = history.claims();
        assert_eq!(claims.len(), 2);
        assert_eq!(claims[0].since_ms, 5);
        assert_eq!(claims[1].since_ms, 100, "no since: first seen");
        std::fs::write(
            &path,
            r#"{"10.0.0.2": {"workload": "db"}, "10.0.0.3": {"workload": "x", "since_ms": 150}}"#,
        )
        .unwrap();
        source.modified = None;
        let observation = source.poll().unwrap().clone();
        assert!(observation.changed_ms.is_some(), "the file's mtime");
        history.observe(300, 0, &observation);
        let claims = history.claims();
        let db = claims.iter().find(|c| c.workload == "db").unwrap();
        assert_eq!(db.since_ms, 100, "unchanged mapping keeps its since");
        let web = claims.iter().find(|c| c.workload == "web").unwrap();
        assert_eq!(
            web.until_ms,
            300.min(observation.changed_ms.unwrap()),
            "web's last claim"
        );
        assert_eq!(
            history.tenures("10.0.0.3".parse().unwrap())[0].since_ms,
            150
        );
    }
}
