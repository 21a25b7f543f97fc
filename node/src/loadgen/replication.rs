//! What replicating claims costs between collectors of one region: tenure's ring (each
//! claim goes to its R owners) against a broadcast to every node of the region (Kafka's
//! pattern: every node consumes every learned range). Counted, not timed: the real ring
//! decides the owners, and every batch is encoded and sealed exactly as a collector sends
//! it, so the bytes are the bytes on the wire.
//!
//! One heartbeat round: `claims` claims (distinct IPs of the region) arrive at the region's
//! collectors, spread evenly (each exporter talks to one collector). Each collector then
//! sends, per destination, the claims that destination needs, in batches of at most
//! `FORWARD_CLAIMS_PER_BATCH_MAX` (as `NodeCore` does): under the ring, to the owners of
//! each claim other than itself; under broadcast, all its claims to every other node. The
//! exporter-to-collector hop is the same under both and is left out.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;

use tenure_gossip::identity::NodeIdentity;
use tenure_gossip::ring::{Ring, RingConfig};
use tenure_gossip::seal::{SecretKey, KEY_BYTES};
use tenure_gossip::wire::{self, Message};

use crate::fleet::SplitMix64;
use crate::shell::transport::Crypto;

/// Claims per forwarded batch, as the core batches them.
const FORWARD_CLAIMS_PER_BATCH_MAX: usize = wire::CLAIMS_PER_BATCH_MAX_DEFAULT;
/// Distinct workload names the claims are spread over.
const WORKLOADS: u64 = 500;

/// The cost of one heartbeat round in a region of `nodes` collectors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReplicationRow {
    pub nodes: usize,
    /// Sealed bytes between collectors per claim.
    pub ring_bytes_per_claim: f64,
    /// Copies of a claim sent to other collectors, per claim.
    pub ring_copies_per_claim: f64,
    /// Frames between collectors per claim.
    pub ring_frames_per_claim: f64,
    pub broadcast_bytes_per_claim: f64,
    pub broadcast_copies_per_claim: f64,
    pub broadcast_frames_per_claim: f64,
}

impl ReplicationRow {
    /// Ring bytes over broadcast bytes.
    pub fn bytes_ratio(&self) -> f64 {
        if self.broadcast_bytes_per_claim == 0.0 {
            0.0
        } else {
            self.ring_bytes_per_claim / self.broadcast_bytes_per_claim
        }
    }
}

#[derive(Default)]
struct Cost {
    bytes: u64,
    copies: u64,
    frames: u64,
}

impl Cost {
    fn send(
        &mut self,
        crypto: &Crypto,
        claims: &[&(IpAddr, u64)],
        times: u64,
    ) -> anyhow::Result<()> {
        for chunk in claims.chunks(FORWARD_CLAIMS_PER_BATCH_MAX) {
            let mut dictionary: Vec<String> = Vec::new();
            let mut index: BTreeMap<u64, u32> = BTreeMap::new();
            let claims = chunk
                .iter()
                .map(|(ip, w)| {
                    let next = dictionary.len() as u32;
                    let workload = *index.entry(*w).or_insert_with(|| {
                        dictionary.push(format!("svc-region-{w:04}"));
                        next
                    });
                    wire::Claim {
                        ip: *ip,
                        workload,
                        instance: 0,
                        since_ms: 1_764_000_000_000,
                        until_ms: 1_764_000_060_000,
                    }
                })
                .collect();
            let frame = crypto.frame(&Message::ClaimBatch(wire::ClaimBatch {
                batch_id: 1,
                dictionary,
                claims,
            }))?;
            self.bytes += frame.len() as u64 * times;
            self.frames += times;
            self.copies += chunk.len() as u64 * times;
        }
        Ok(())
    }
}

/// The ring (`replication` owners) against broadcast, for each region size in `sizes`,
/// over one heartbeat round of `claims` claims.
pub fn compare(
    sizes: &[usize],
    replication: usize,
    claims: usize,
    seed: u64,
) -> anyhow::Result<Vec<ReplicationRow>> {
    let crypto = Crypto::new(1, &SecretKey::from_bytes([7; KEY_BYTES]), None, 1, 1);
    let mut rng = SplitMix64::new(seed);
    let round: Vec<(IpAddr, u64)> = (0..claims)
        .map(|i| {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a10_0010u32.wrapping_add(i as u32)));
            (ip, rng.range(0, WORKLOADS - 1))
        })
        .collect();
    let mut rows = Vec::new();
    for &nodes in sizes {
        let members: Vec<NodeIdentity> = (0..nodes)
            .map(|i| {
                let port = 20_000 + i as u16;
                NodeIdentity::new(
                    &format!("collector-{i:03}"),
                    "region",
                    SocketAddr::from(([127, 0, 0, 1], port)),
                    SocketAddr::from(([127, 0, 0, 1], port)),
                    1,
                )
            })
            .collect::<Result<_, _>>()?;
        let ring = Ring::new(
            &members,
            RingConfig {
                replication: NonZeroUsize::new(replication).unwrap_or(NonZeroUsize::MIN),
                ..RingConfig::default()
            },
        );
        let mut ring_cost = Cost::default();
        let mut broadcast_cost = Cost::default();
        for (receiver_index, receiver) in members.iter().enumerate() {
            let mine: Vec<&(IpAddr, u64)> = round
                .iter()
                .enumerate()
                .filter(|(i, _)| i % nodes == receiver_index)
                .map(|(_, c)| c)
                .collect();
            let mut by_owner: BTreeMap<&str, Vec<&(IpAddr, u64)>> = BTreeMap::new();
            for claim in &mine {
                for owner in ring.owners(claim.0) {
                    if owner.node_id() != receiver.node_id() {
                        by_owner.entry(owner.node_id()).or_default().push(claim);
                    }
                }
            }
            for claims in by_owner.values() {
                ring_cost.send(&crypto, claims, 1)?;
            }
            broadcast_cost.send(&crypto, &mine, nodes as u64 - 1)?;
        }
        let per = |x: u64| x as f64 / claims.max(1) as f64;
        rows.push(ReplicationRow {
            nodes,
            ring_bytes_per_claim: per(ring_cost.bytes),
            ring_copies_per_claim: per(ring_cost.copies),
            ring_frames_per_claim: per(ring_cost.frames),
            broadcast_bytes_per_claim: per(broadcast_cost.bytes),
            broadcast_copies_per_claim: per(broadcast_cost.copies),
            broadcast_frames_per_claim: per(broadcast_cost.frames),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_sends_r_copies_and_broadcast_n_minus_one() {
        let rows = compare(&[3, 30], 2, 6_000, 1).unwrap();
        let three = rows[0];
        // With 3 nodes and R = 2, a claim reaches 2 owners, one of them the receiver a
        // third of the time: 2 − 2/3 copies on average.
        assert!(
            (three.ring_copies_per_claim - 4.0 / 3.0).abs() < 0.1,
            "{three:?}"
        );
        assert_eq!(three.broadcast_copies_per_claim, 2.0);
        let thirty = rows[1];
        assert_eq!(thirty.broadcast_copies_per_claim, 29.0);
        assert!(thirty.ring_copies_per_claim < 2.0);
        assert!(thirty.bytes_ratio() < 0.1, "{thirty:?}");
        assert!(
            thirty.ring_bytes_per_claim > 20.0,
            "a claim is not free on the wire"
        );
    }
}
