//! The synthetic fleet: in-process exporters speaking the wire to the collectors of their
//! region, each owning one IP for the whole run, so that the ground truth of every remote
//! IP is known. Every flow sent and every flow acknowledged is recorded.

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

/// What the checks compare a sink line with.
#[derive(Clone, Debug)]
pub struct Truth {
    pub remote_ip: IpAddr,
    pub remote_workload: String,
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
    ip: IpAddr,
    workload: String,
}

/// The fleet. See the module documentation.
#[derive(Debug)]
pub struct Fleet {
    exporters: Vec<Exporter>,
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
        for r in 0..options.regions {
            for e in 0..options.exporters_per_region {
                let host = u8::try_from(e + 1).unwrap_or(u8::MAX);
                let net = u8::try_from(r + 1).unwrap_or(u8::MAX);
                exporters.push(Exporter {
                    id: (r as u64 + 1) * 1_000 + e as u64 + 1,
                    region: region_name(r),
                    ip: IpAddr::from([10, net, 0, host]),
                    workload: format!("{}-w{e}", region_name(r)),
                });
            }
        }
        Fleet {
            exporters,
            collectors: Mutex::new(cluster.addrs()),
            history: Mutex::new(History::default()),
            stop: AtomicBool::new(false),
            seed,
            // Ownership began a little before the run, as a long-lived workload's would.
            started_ms: now_ms().saturating_sub(60_000),
        }
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
        while !self.stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let now = now_ms();
            let mut flows = Vec::new();
            for _ in 0..FLOWS_PER_BATCH {
                seq += 1;
                // Most traffic stays in the region; some crosses it.
                let peers: Vec<&Exporter> = if rng.below(5) == 0 {
                    self.exporters
                        .iter()
                        .filter(|e| e.region != me.region)
                        .collect()
                } else {
                    self.exporters
                        .iter()
                        .filter(|e| e.region == me.region && e.id != me.id)
                        .collect()
                };
                let Some(peer) = peers
                    .get(usize::try_from(rng.below(peers.len() as u64)).unwrap_or(0))
                    .copied()
                else {
                    continue;
                };
                let flow_id = (u128::from(me.id) << 64) | u128::from(seq);
                let start_ms = now.saturating_sub(300);
                flows.push(wire::Flow {
                    flow_id,
                    start_ms,
                    end_ms: now.saturating_sub(100),
                    bytes_sent: 1_000,
                    bytes_received: 4_000,
                    packets: 12,
                    retransmits: 0,
                    local_workload: 0,
                    local_ip: me.ip,
                    remote_ip: peer.ip,
                    local_port: 40_000,
                    remote_port: 8_080,
                    direction: Direction::Outbound,
                    ongoing: false,
                });
                lock(&self.history).sent.insert(
                    flow_id,
                    Truth {
                        remote_ip: peer.ip,
                        remote_workload: peer.workload.clone(),
                        start_ms,
                    },
                );
            }
            let batch = wire::FlowBatch {
                batch_id: seq,
                exporter_id: me.id,
                hops: 0,
                region: me.region.clone(),
                dictionary: vec![me.workload.clone()],
                claims: vec![wire::Claim {
                    ip: me.ip,
                    workload: 0,
                    instance: 0,
                    since_ms: self.started_ms,
                    until_ms: now,
                }],
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
