//! Who the local workloads are, and since when they hold their IPs: from a host identity
//! file, or an IP → workload map file an orchestrator keeps current (re-read when it
//! changes).
//!
//! `since` is what makes a heartbeat safe: it states when the workload acquired the IP.
//! When a file gives none, the exporter uses the moment it first saw the mapping, which is
//! later than the truth, never earlier: it may leave a gap, but never claims time it
//! cannot vouch for.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::Deserialize;

use super::batcher::LocalClaim;
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

/// The current mapping of local IPs.
#[derive(Debug)]
pub struct IdentitySource {
    config: Option<IdentityConfig>,
    /// ip → (workload, since_ms)
    current: BTreeMap<IpAddr, (String, u64)>,
    modified: Option<SystemTime>,
}

impl IdentitySource {
    /// Reads the configured file now (errors are logged; the map stays empty until the file
    /// is readable).
    pub fn new(config: IdentityConfig, now_ms: u64) -> IdentitySource {
        let mut source = IdentitySource {
            config: Some(config),
            current: BTreeMap::new(),
            modified: None,
        };
        source.refresh(now_ms);
        source
    }

    /// No identity source: every local IP is `unknown` (the local `--output stdout` view).
    pub fn anonymous() -> IdentitySource {
        IdentitySource {
            config: None,
            current: BTreeMap::new(),
            modified: None,
        }
    }

    fn path(&self) -> Option<&PathBuf> {
        match self.config.as_ref()? {
            IdentityConfig::HostFile { path } | IdentityConfig::MapFile { path } => Some(path),
        }
    }

    /// Re-reads the file when it changed.
    pub fn refresh(&mut self, now_ms: u64) {
        let Some(path) = self.path().cloned() else {
            return;
        };
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified == self.modified {
            return;
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "reading the identity file");
                return;
            }
        };
        let parsed: Result<BTreeMap<IpAddr, (String, Option<u64>)>, serde_json::Error> =
            match &self.config {
                Some(IdentityConfig::HostFile { .. }) => serde_json::from_str::<HostFile>(&text)
                    .map(|h| {
                        h.ips
                            .into_iter()
                            .map(|ip| (ip.to_canonical(), (h.workload.clone(), h.since_ms)))
                            .collect()
                    }),
                Some(IdentityConfig::MapFile { .. }) => {
                    serde_json::from_str::<BTreeMap<IpAddr, MapEntry>>(&text).map(|m| {
                        m.into_iter()
                            .map(|(ip, e)| (ip.to_canonical(), (e.workload, e.since_ms)))
                            .collect()
                    })
                }
                None => return,
            };
        match parsed {
            Ok(map) => {
                let mut next = BTreeMap::new();
                for (ip, (workload, since)) in map {
                    // Keep the first-seen time of an unchanged mapping; a new or changed
                    // one starts now unless the file says when.
                    let kept = self
                        .current
                        .get(&ip)
                        .filter(|(w, _)| *w == workload)
                        .map(|(_, s)| *s);
                    let since = since.or(kept).unwrap_or(now_ms);
                    next.insert(ip, (workload, since));
                }
                self.current = next;
                self.modified = modified;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "parsing the identity file")
            }
        }
    }

    /// The workload of a local IP.
    pub fn workload_of(&self, ip: IpAddr) -> Option<String> {
        match &self.config {
            None => Some("unknown".to_owned()),
            Some(_) => self.current.get(&ip.to_canonical()).map(|(w, _)| w.clone()),
        }
    }

    /// One heartbeat per local IP, as of `now_ms`.
    pub fn claims(&self, now_ms: u64) -> Vec<LocalClaim> {
        self.current
            .iter()
            .filter(|(_, (_, since))| *since <= now_ms)
            .map(|(ip, (workload, since))| LocalClaim {
                ip: *ip,
                workload: workload.clone(),
                since_ms: *since,
                until_ms: now_ms,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_file_is_reread_and_since_defaults_to_first_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ips.json");
        std::fs::write(
            &path,
            r#"{"10.0.0.1": {"workload": "web", "since_ms": 5}, "10.0.0.2": {"workload": "db"}}"#,
        )
        .unwrap();
        let mut source = IdentitySource::new(IdentityConfig::MapFile { path: path.clone() }, 100);
        let claims = source.claims(200);
        assert_eq!(claims.len(), 2);
        assert_eq!(claims[0].since_ms, 5);
        assert_eq!(claims[1].since_ms, 100, "no since: first seen");
        std::fs::write(
            &path,
            r#"{"10.0.0.2": {"workload": "db"}, "10.0.0.3": {"workload": "x", "since_ms": 150}}"#,
        )
        .unwrap();
        source.modified = None;
        source.refresh(300);
        let claims = source.claims(400);
        assert_eq!(claims.len(), 2);
        assert_eq!(claims[0].since_ms, 100, "unchanged mapping keeps its since");
        assert_eq!(
            source.workload_of("10.0.0.3".parse().unwrap()).as_deref(),
            Some("x")
        );
        assert!(source.workload_of("10.0.0.1".parse().unwrap()).is_none());
    }
}
