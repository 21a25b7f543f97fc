//! The synthetic fleet: in-process exporters speaking the wire to the collectors of their
//! region. Each owns a home IP for the whole run, and the IPs of a roaming set change hands
//! between the exporters of their region every [`ROAM_PERIOD_MS`], with [`ROAM_GAP_MS`]
//! unowned between two owners, so that a flow attributed to the previous or the next
//! owner is caught. Every exporter's clock is off by a fixed skew within ±δ/2 (so that two
//! hosts disagree by at most δ), which it stamps on its flows and claims; the ground truth
//! is kept in real time. Every flow sent and every flow acknowledged is recorded.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tenure_gossip::wire::{self, AckStatus, Direction, Message};
use tenure_node::exporter::Client;
use tenure_node::shell::transport::Crypto;
use tokio::task::JoinHandle;

use crate::cluster::{region_name, Cluster, KEY_HEX};
use crate::{Options, Rng};

/// How often each exporter sends a batch, in ms.
pub const BATCH_INTERVAL_MS: u64 = 250;
/// Flows per batch.
pub const FLOWS_PER_BATCH: usize = 4;
/// Collectors an exporter tries for one batch before it gives the batch up.
pub const SEND_ATTEMPTS_MAX: usize = 12;
/// How long an exporter waits for an ack.
const ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one owner holds a roaming IP, gap included, in ms.
pub const ROAM_PERIOD_MS: u64 = 4_000;
/// How long a roaming IP stays unowned between two owners, in ms (above 2δ, so that a
/// flow between two handovers can be attributed at all).
pub const ROAM_GAP_MS: u64 = 600;
/// One flow in this many goes to a roaming IP.
const ROAMING_FLOW_ONE_IN: u64 = 4;

#[allow(
    clippy::disallowed_methods,
    reason = "exporters stamp flows with the wall clock, as real ones do"
)]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `t_ms` as a clock off by `skew_ms` reads it.
fn shifted(t_ms: u64, skew_ms: i64) -> u64 {
    t_ms.saturating_add_signed(skew_ms)
}

/// What the checks compare a sink line with, in real time.
#[derive(Clone, Debug)]
pub struct Truth {
    pub remote_ip: IpAddr,
    /// Who owned the remote IP for the flow's whole window; `None` when nobody did (a
    /// handover fell inside it), and then any attribution is wrong.
    pub remote_workload: Option<String>,
    /// Whether that owner held the IP from δ before to δ after the window, so that the
    /// rules may attribute the flow: only these count toward the unattributed share.
    pub attributable: bool,
    /// Whether the remote IP is a roaming one.
    pub roaming: bool,
    pub start_ms: u64,
}

/// Sent and acknowledged flows.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub sent: BTreeMap<u128, Truth>,
    pub acked: BTreeSet<u128>,
    pub batches_given_up: u64,
}

#[derive(Clone, Debug)]
struct Exporter {
    id: u64,
    region: String,
    /// Index of the region, and of this exporter within it.
    r: usize,
    e: usize,
    ip: IpAddr,
    workload: String,
    /// This host's clock error, in ms, within ±δ/2.
    skew_ms: i64,
}

/// A roaming IP: owned in turn by the exporters of its region.
#[derive(Clone, Debug)]
struct Roaming {
    ip: IpAddr,
    r: usize,
    k: usize,
}

/// One turn of a roaming IP: exporter `e` of the region owns it in `[since_ms, until_ms)`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Turn {
    e: usize,
    since_ms: u64,
    until_ms: u64,
}

/// The fleet. See the module documentation.
#[derive(Debug)]
pub struct Fleet {
    exporters: Vec<Exporter>,
    roaming: Vec<Roaming>,
    exporters_per_region: usize,
    /// Where roaming turns are counted from (real time).
    roam_origin_ms: u64,
    collectors: Mutex<Vec<(String, SocketAddr, bool)>>,
    history: Mutex<History>,
    stop: AtomicBool,
    seed: u64,
    started_ms: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Fleet {
    pub fn new(options: &Options, cluster: &Cluster, seed: u64) -> Fleet {
        let mut exporters = Vec::new();
        let mut roaming = Vec::new();
        let mut rng = Rng::new(seed ^ 0x5eed_c10c);
        let half_delta = crate::SKEW_MARGIN_MS / 2;
        for r in 0..options.regions {
            let net = u8::try_from(r + 1).unwrap_or(u8::MAX);
            for e in 0..options.exporters_per_region {
                let host = u8::try_from(e + 1).unwrap_or(u8::MAX);
                let draw = i64::try_from(rng.below(2 * half_delta + 1)).unwrap_or(0);
                exporters.push(Exporter {
                    id: (r as u64 + 1) * 1_000 + e as u64 + 1,
                    region: region_name(r),
                    r,
                    e,
                    ip: IpAddr::from([10, net, 0, host]),
                    workload: format!("{}-w{e}", region_name(r)),
                    skew_ms: draw - i64::try_from(half_delta).unwrap_or(0),
                });
            }
            for k in 0..options.exporters_per_region / 2 {
                let host = u8::try_from(k + 1).unwrap_or(u8::MAX);
                roaming.push(Roaming {
                    ip: IpAddr::from([10, net, 1, host]),
                    r,
                    k,
                });
            }
        }
        Fleet {
            exporters,
            roaming,
            exporters_per_region: options.exporters_per_region,
            roam_origin_ms: now_ms(),
            collectors: Mutex::new(cluster.addrs()),
            history: Mutex::new(History::default()),
            stop: AtomicBool::new(false),
            seed,
            // Ownership began a little before the run, as a long-lived workload's would.
            started_ms: now_ms().saturating_sub(60_000),
        }
    }

    /// The turn of roaming IP `k` of region `r` at real time `t_ms`; `None` in a gap.
    fn turn(&self, roaming: &Roaming, t_ms: u64) -> Option<Turn> {
        let since_origin = t_ms.checked_sub(self.roam_origin_ms)?;
        let slot = since_origin / ROAM_PERIOD_MS;
        let since_ms = self.roam_origin_ms + slot * ROAM_PERIOD_MS;
        let until_ms = since_ms + ROAM_PERIOD_MS - ROAM_GAP_MS;
        let n = self.exporters_per_region.max(1) as u64;
        let e = usize::try_from((roaming.k as u64 + slot) % n).unwrap_or(0);
        (t_ms < until_ms).then_some(Turn {
            e,
            since_ms,
            until_ms,
        })
    }

    /// Who owned `roaming` for all of `[from_ms, to_ms]` (real time).
    fn owner_throughout(&self, roaming: &Roaming, from_ms: u64, to_ms: u64) -> Option<usize> {
        let turn = self.turn(roaming, from_ms)?;
        (to_ms < turn.until_ms).then_some(turn.e)
    }

    fn workload_of(&self, r: usize, e: usize) -> String {
        format!("{}-w{e}", region_name(r))
    }

    /// Collector addresses changed (a restart binds new ports) or went down.
    pub fn set_down(&self, collectors: Vec<(String, SocketAddr, bool)>) {
        *lock(&self.collectors) = collectors;
    }

    /// Starts every exporter.
    pub fn start(self: Arc<Self>) -> Vec<JoinHandle<()>> {
        (0..self.exporters.len())
            .map(|i| {
                let fleet = self.clone();
                tokio::spawn(async move { fleet.exporter(i).await })
            })
            .collect()
    }

    /// Stops the exporters (each finishes its batch in flight) and returns the history.
    pub async fn stop(&self, handles: Vec<JoinHandle<()>>) -> History {
        self.stop.store(true, Ordering::SeqCst);
        for h in handles {
            let _ = h.await;
        }
        lock(&self.history).clone()
    }

    async fn exporter(&self, index: usize) {
        let me = self.exporters[index].clone();
        let mut rng = Rng::new(self.seed ^ me.id.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut seq: u64 = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(BATCH_INTERVAL_MS));
        let delta = crate::SKEW_MARGIN_MS;
        while !self.stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let real = now_ms();
            // What this host's clock says.
            let now = shifted(real, me.skew_ms);
            let mut flows = Vec::new();
            for _ in 0..FLOWS_PER_BATCH {
                seq += 1;
                // Most traffic stays in the region; some crosses it.
                let other_region = rng.below(5) == 0;
                let (real_start, real_end) = (real.saturating_sub(300), real.saturating_sub(100));
                let truth = if rng.below(ROAMING_FLOW_ONE_IN) == 0 {
                    let candidates: Vec<&Roaming> = self
                        .roaming
                        .iter()
                        .filter(|x| (x.r != me.r) == other_region)
                        .collect();
                    let Some(roaming) = candidates
                        .get(usize::try_from(rng.below(candidates.len() as u64)).unwrap_or(0))
                        .copied()
                    else {
                        continue;
                    };
                    let owner = self.owner_throughout(roaming, real_start, real_end);
                    // Attributable when the owner's claims (stamped by a clock off by up
                    // to δ/2, sent every batch interval) cover the window widened by δ.
                    let margin = self.owner_throughout(
                        roaming,
                        real_start.saturating_sub(delta + delta / 2),
                        real_end + delta + delta / 2 + BATCH_INTERVAL_MS,
                    );
                    Truth {
                        remote_ip: roaming.ip,
                        remote_workload: owner.map(|e| self.workload_of(roaming.r, e)),
                        attributable: margin.is_some(),
                        roaming: true,
                        start_ms: real_start,
                    }
                } else {
                    let peers: Vec<&Exporter> = self
                        .exporters
                        .iter()
                        .filter(|e| (e.region != me.region) == other_region && e.id != me.id)
                        .collect();
                    let Some(peer) = peers
                        .get(usize::try_from(rng.below(peers.len() as u64)).unwrap_or(0))
                        .copied()
                    else {
                        continue;
                    };
                    Truth {
                        remote_ip: peer.ip,
                        remote_workload: Some(peer.workload.clone()),
                        attributable: true,
                        roaming: false,
                        start_ms: real_start,
                    }
                };
                let flow_id = (u128::from(me.id) << 64) | u128::from(seq);
                flows.push(wire::Flow {
                    flow_id,
                    start_ms: now.saturating_sub(300),
                    end_ms: now.saturating_sub(100),
                    bytes_sent: 1_000,
                    bytes_received: 4_000,
                    segs_in: 6,
                    segs_out: 6,
                    retransmits: 0,
                    rtt_us: 0,
                    local: wire::LocalEnd::Workload(0),
                    local_ip: me.ip,
                    remote_ip: truth.remote_ip,
                    local_port: 40_000,
                    remote_port: 8_080,
                    direction: Direction::Outbound,
                    ongoing: false,
                });
                lock(&self.history).sent.insert(flow_id, truth);
            }
            // Heartbeats: the home IP since before the run, and every roaming IP whose
            // turn is ours now, since the turn began, both by this host's clock.
            let mut claims = vec![wire::Claim {
                ip: me.ip,
                workload: 0,
                instance: 0,
                since_ms: shifted(self.started_ms, me.skew_ms),
                until_ms: now,
            }];
            for roaming in self.roaming.iter().filter(|x| x.r == me.r) {
                if let Some(turn) = self.turn(roaming, real).filter(|t| t.e == me.e) {
                    claims.push(wire::Claim {
                        ip: roaming.ip,
                        workload: 0,
                        instance: 0,
                        since_ms: shifted(turn.since_ms, me.skew_ms),
                        until_ms: now,
                    });
                }
            }
            let batch = wire::FlowBatch {
                batch_id: seq,
                exporter_id: me.id,
                hops: 0,
                sent_ms: now,
                region: me.region.clone(),
                dictionary: vec![me.workload.clone()],
                claims,
                flows,
            };
            let ids: Vec<u128> = batch.flows.iter().map(|f| f.flow_id).collect();
            if self.deliver(&me, index, batch).await {
                lock(&self.history).acked.extend(ids);
            } else {
                lock(&self.history).batches_given_up += 1;
            }
        }
    }

    /// Sends a batch to the collectors of our region in turn until one accepts it.
    async fn deliver(&self, me: &Exporter, index: usize, batch: wire::FlowBatch) -> bool {
        let Ok(key) = tenure_node::config::parse_key(KEY_HEX) else {
            return false;
        };
        for attempt in 0..SEND_ATTEMPTS_MAX {
            let targets: Vec<SocketAddr> = lock(&self.collectors)
                .iter()
                .filter(|(r, _, up)| *r == me.region && *up)
                .map(|(_, a, _)| *a)
                .collect();
            if targets.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let addr = targets[(index + attempt) % targets.len()];
            let crypto = Crypto::new(1, &key, None, me.id, now_ms());
            let sent = async {
                let mut client = Client::connect(addr, &crypto, ACK_TIMEOUT).await.ok()?;
                client
                    .send(&crypto, &Message::FlowBatch(batch.clone()))
                    .await
                    .ok()?;
                loop {
                    let message = tokio::time::timeout(ACK_TIMEOUT, client.recv(&crypto))
                        .await
                        .ok()?
                        .ok()?;
                    if let Message::Ack(a) = message {
                        if a.batch_id == batch.batch_id {
                            return Some(a.status);
                        }
                    }
                }
            };
            match sent.await {
                Some(AckStatus::Accepted) => return true,
                Some(AckStatus::Busy { .. } | AckStatus::Rejected(_)) | None => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        false
    }
}
