//! Reading the collectors' NDJSON sink files back after a load run: every flow emitted,
//! once or more, checked against the fleet's truth, with its attribution delay.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use serde::Deserialize;

use super::fleet::LoadFleet;

/// The longest attribution delay the histogram tells apart, in ms; longer ones count here.
const DELAY_MS_MAX: usize = 600_000;

#[derive(Deserialize)]
struct End<'a> {
    #[serde(borrow)]
    ip: &'a str,
    #[serde(borrow, default)]
    workload: Option<&'a str>,
}

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    flow_id: &'a str,
    #[serde(borrow)]
    remote: End<'a>,
    #[serde(borrow)]
    result: &'a str,
    #[serde(borrow, default)]
    source: Option<&'a str>,
    #[serde(borrow, default)]
    reason: Option<&'a str>,
    start_ms: u64,
    end_ms: u64,
    emitted_ms: u64,
}

/// Which sequence numbers of each exporter were seen.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    bits: std::collections::BTreeMap<u64, Vec<u64>>,
}

impl Seen {
    /// Marks `(exporter, seq)`; returns whether it was new.
    pub fn insert(&mut self, exporter: u64, seq: u64) -> bool {
        let words = self.bits.entry(exporter).or_default();
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if words.len() <= word {
            words.resize(word + 1, 0);
        }
        let new = words[word] & (1 << bit) == 0;
        words[word] |= 1 << bit;
        new
    }

    pub fn contains(&self, exporter: u64, seq: u64) -> bool {
        self.bits
            .get(&exporter)
            .and_then(|w| w.get((seq / 64) as usize))
            .is_some_and(|w| w & (1 << (seq % 64)) != 0)
    }

    fn count(&self) -> u64 {
        self.bits
            .values()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    fn union(&mut self, other: &Seen) {
        for (exporter, words) in &other.bits {
            let mine = self.bits.entry(*exporter).or_default();
            if mine.len() < words.len() {
                mine.resize(words.len(), 0);
            }
            for (m, w) in mine.iter_mut().zip(words) {
                *m |= *w;
            }
        }
    }
}

/// What the sinks hold.
#[derive(Clone, Debug, Default)]
pub struct SinkTally {
    pub lines: u64,
    pub malformed: u64,
    /// Distinct flows of the run's exporters.
    pub flows: u64,
    pub duplicates: u64,
    /// Lines of flows the run's exporters did not send.
    pub foreign: u64,
    /// Distinct or not: every attributed line from heartbeat ranges.
    pub attributed_heartbeat: u64,
    /// Attributed lines emitted inside the measured window.
    pub attributed_in_window: u64,
    pub attributed_other: u64,
    pub unattributed: u64,
    pub unattributed_by_reason: std::collections::BTreeMap<String, u64>,
    /// Attributed lines whose workload is not the truth.
    pub misattributed: u64,
    pub misattributed_examples: Vec<String>,
    /// Attribution delays (flow end to emission) of the window's attributed flows, per ms.
    delays: Vec<u64>,
    pub seen: Seen,
}

impl SinkTally {
    /// The delay below which `q` (0 to 1) of the window's attributed flows were emitted, in
    /// ms; `None` with no flows.
    pub fn delay_quantile_ms(&self, q: f64) -> Option<u64> {
        let total: u64 = self.delays.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (ms, n) in self.delays.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(ms as u64);
            }
        }
        Some(DELAY_MS_MAX as u64)
    }

    fn merge(&mut self, other: SinkTally) {
        self.lines += other.lines;
        self.malformed += other.malformed;
        self.foreign += other.foreign;
        self.attributed_heartbeat += other.attributed_heartbeat;
        self.attributed_in_window += other.attributed_in_window;
        self.attributed_other += other.attributed_other;
        self.unattributed += other.unattributed;
        for (k, v) in other.unattributed_by_reason {
            *self.unattributed_by_reason.entry(k).or_default() += v;
        }
        self.misattributed += other.misattributed;
        for e in other.misattributed_examples {
            if self.misattributed_examples.len() < 5 {
                self.misattributed_examples.push(e);
            }
        }
        if self.delays.len() < other.delays.len() {
            self.delays.resize(other.delays.len(), 0);
        }
        for (m, o) in self.delays.iter_mut().zip(&other.delays) {
            *m += o;
        }
        // Distinct flows: what one file saw twice is counted there; what two files both
        // saw is found when the sets are joined.
        let before = self.seen.count() + other.seen.count();
        self.seen.union(&other.seen);
        self.duplicates += other.duplicates + (before - self.seen.count());
        self.flows = self.seen.count();
    }

    fn line(&mut self, fleet: &LoadFleet, exporters: &[u64], window: (u64, u64), bytes: &[u8]) {
        self.lines += 1;
        let Ok(line) = serde_json::from_slice::<Line<'_>>(bytes) else {
            self.malformed += 1;
            return;
        };
        let Ok(id) = u128::from_str_radix(line.flow_id, 16) else {
            self.malformed += 1;
            return;
        };
        let (exporter, seq) = ((id >> 64) as u64, id as u64);
        if !exporters.contains(&exporter) {
            self.foreign += 1;
            return;
        }
        if !self.seen.insert(exporter, seq) {
            self.duplicates += 1;
        }
        match (line.result, line.source) {
            ("attributed", Some("heartbeat")) => {
                self.attributed_heartbeat += 1;
                let truth = line
                    .remote
                    .ip
                    .parse()
                    .ok()
                    .and_then(|ip| fleet.truth(ip, line.start_ms, line.end_ms));
                let right = match (truth, line.remote.workload) {
                    (Some((r, w)), Some(said)) => fleet.name(r, w) == said,
                    (None, _) | (Some(_), None) => false,
                };
                if !right {
                    self.misattributed += 1;
                    if self.misattributed_examples.len() < 5 {
                        self.misattributed_examples.push(format!(
                            "{} at [{}, {}]: said {:?}, truth {:?}",
                            line.remote.ip,
                            line.start_ms,
                            line.end_ms,
                            line.remote.workload,
                            truth.map(|(r, w)| fleet.name(r, w).to_owned())
                        ));
                    }
                }
                if line.emitted_ms >= window.0 && line.emitted_ms < window.1 {
                    self.attributed_in_window += 1;
                    let delay =
                        (line.emitted_ms.saturating_sub(line.end_ms) as usize).min(DELAY_MS_MAX);
                    if self.delays.len() <= delay {
                        self.delays.resize(delay + 1, 0);
                    }
                    self.delays[delay] += 1;
                }
            }
            ("attributed", _) => self.attributed_other += 1,
            _ => {
                self.unattributed += 1;
                *self
                    .unattributed_by_reason
                    .entry(line.reason.unwrap_or("none").to_owned())
                    .or_default() += 1;
            }
        }
    }
}

/// Every `*.ndjson` file under `dirs`.
fn files(dirs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|x| x == "ndjson") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn read_file(
    path: &Path,
    fleet: &LoadFleet,
    exporters: &[u64],
    window: (u64, u64),
) -> anyhow::Result<SinkTally> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut tally = SinkTally::default();
    for line in bytes.split(|b| *b == b'\n') {
        if !line.is_empty() {
            tally.line(fleet, exporters, window, line);
        }
    }
    let flows = tally.seen.count();
    tally.flows = flows;
    Ok(tally)
}

/// Reads every sink file under `dirs`, on as many threads as there are cores. `window` is
/// the measured interval `[from, to)` in Unix ms.
pub fn read(
    dirs: &[PathBuf],
    fleet: &LoadFleet,
    exporters: &[u64],
    window: (u64, u64),
) -> anyhow::Result<SinkTally> {
    let files = files(dirs)?;
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, 8);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<anyhow::Result<SinkTally>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<SinkTally> {
                    let mut tally = SinkTally::default();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(path) = files.get(i) else {
                            return Ok(tally);
                        };
                        tally.merge(read_file(path, fleet, exporters, window)?);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a sink reader panicked")))
            })
            .collect()
    });
    let mut total = SinkTally::default();
    for r in results {
        total.merge(r?);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_flows_and_duplicates_survive_merging() {
        let mut a = SinkTally::default();
        a.seen.insert(1, 5);
        a.seen.insert(1, 6);
        a.flows = 2;
        let mut b = SinkTally::default();
        b.seen.insert(1, 6);
        b.seen.insert(2, 200);
        b.flows = 2;
        let mut total = SinkTally::default();
        total.merge(a);
        total.merge(b);
        assert_eq!(total.flows, 3);
        assert_eq!(total.duplicates, 1);
        assert!(total.seen.contains(2, 200) && !total.seen.contains(2, 199));
    }
}
