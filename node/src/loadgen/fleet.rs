//! The load generator's fleet: who holds which IP when, as a pure function of the seed, the
//! IP and the time, so that every exporter task can produce flows and heartbeats on its
//! own and the report can check any emitted flow against the truth afterwards, with no
//! shared state and no history kept.
//!
//! Per region, `ips_per_region` IPs; IP `i` belongs to the host of exporter
//! `i % exporters_per_region`. Each IP is held by a sequence of tenures: its own period
//! `P` (drawn between `tenure_ms_min` and `tenure_ms_max`) and phase cut time into epochs;
//! in each epoch the IP is free for `gap_ms`, then held by one of `workloads_per_region`
//! workloads until the epoch ends. So IPs are reused all the time, and every heartbeat
//! restates `since`, as the design's claims do.
//!
//! Sans-io and deterministic: time comes in as an argument, randomness from a seeded
//! SplitMix64.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use tenure_gossip::wire::{self, Direction};

use crate::fleet::SplitMix64;

/// The first host offset used inside a region's prefix (skips the network address).
const IP_OFFSET: u32 = 16;

/// The shape of the load. Times in ms.
#[derive(Clone, Debug)]
pub struct LoadFleetConfig {
    pub seed: u64,
    /// Region names and their IPv4 prefixes.
    pub regions: Vec<(String, Ipv4Net)>,
    pub ips_per_region: u32,
    pub exporters_per_region: u32,
    /// Distinct workloads per region; at most the wire's dictionary size.
    pub workloads_per_region: u32,
    pub tenure_ms_min: u64,
    pub tenure_ms_max: u64,
    /// How long an IP is free between two tenures.
    pub gap_ms: u64,
    /// Share of flows whose remote IP is in another region.
    pub cross_region_share: f64,
    /// Longest flow.
    pub flow_ms_max: u64,
    /// Remote IPs each workload calls (its dependencies, per region); 0: any IP. A
    /// service calls a bounded set of others, so the dependency graph stays sparse, as a
    /// real one is.
    pub fanout: u32,
    /// The run's start: epochs are placed relative to it.
    pub start_ms: u64,
}

/// One tenure of an IP: `workload` held it during `[since_ms, end_ms)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tenure {
    pub workload: u32,
    pub since_ms: u64,
    pub end_ms: u64,
}

/// A claim as an exporter heartbeats it (workload by index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadClaim {
    pub ip: IpAddr,
    pub workload: u32,
    pub since_ms: u64,
    pub until_ms: u64,
}

/// A generated flow; `local_workload` by index in the exporter's region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadFlow {
    pub seq: u64,
    pub local_ip: IpAddr,
    pub local_workload: u32,
    pub remote_ip: IpAddr,
    pub start_ms: u64,
    pub end_ms: u64,
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The fleet's schedule. Cheap to clone; every exporter task holds one.
#[derive(Clone, Debug)]
pub struct LoadFleet {
    config: LoadFleetConfig,
    /// Workload names per region, by index.
    names: Vec<Vec<String>>,
}

impl LoadFleet {
    pub fn new(config: LoadFleetConfig) -> LoadFleet {
        let names = config
            .regions
            .iter()
            .map(|(region, _)| {
                (0..config.workloads_per_region.max(1))
                    .map(|w| format!("svc-{region}-{w:04}"))
                    .collect()
            })
            .collect();
        LoadFleet { config, names }
    }

    pub fn config(&self) -> &LoadFleetConfig {
        &self.config
    }

    /// The name of workload `w` of region `r`.
    pub fn name(&self, r: usize, w: u32) -> &str {
        self.names
            .get(r)
            .and_then(|n| n.get(w as usize))
            .map_or("", String::as_str)
    }

    pub fn ip(&self, r: usize, index: u32) -> IpAddr {
        let base = self
            .config
            .regions
            .get(r)
            .map_or(0, |(_, p)| u32::from(p.network()));
        IpAddr::V4(Ipv4Addr::from(base.wrapping_add(IP_OFFSET + index)))
    }

    /// The region and index of a fleet IP, or `None` for any other address.
    pub fn locate(&self, ip: IpAddr) -> Option<(usize, u32)> {
        let IpAddr::V4(v4) = ip else { return None };
        for (r, (_, prefix)) in self.config.regions.iter().enumerate() {
            if prefix.contains(&v4) {
                let index = (u32::from(v4) - u32::from(prefix.network())).checked_sub(IP_OFFSET)?;
                return (index < self.config.ips_per_region).then_some((r, index));
            }
        }
        None
    }

    fn key(&self, r: usize, index: u32) -> u64 {
        self.config.seed ^ ((r as u64) << 40) ^ u64::from(index)
    }

    /// The period and phase of an IP's epochs.
    fn epochs(&self, r: usize, index: u32) -> (u64, u64) {
        let key = self.key(r, index);
        let c = &self.config;
        let span = c.tenure_ms_max.saturating_sub(c.tenure_ms_min) + 1;
        let period = (c.tenure_ms_min + mix(key ^ 0x5151) % span).max(c.gap_ms + 2);
        (period, mix(key ^ 0xa7a7) % period)
    }

    /// Epoch `k` of an IP: `[start, end)` and its tenure (after the gap).
    fn epoch(&self, r: usize, index: u32, k: i64) -> Tenure {
        let (period, phase) = self.epochs(r, index);
        let origin = i128::from(self.config.start_ms) + i128::from(phase);
        let start = origin + i128::from(k) * i128::from(period);
        let end = start + i128::from(period);
        let workload = (mix(self.key(r, index) ^ (k as u64).wrapping_mul(0x2545_f491_4f6c_dd1d))
            % u64::from(self.config.workloads_per_region.max(1))) as u32;
        let clamp = |t: i128| u64::try_from(t.max(0)).unwrap_or(u64::MAX);
        Tenure {
            workload,
            since_ms: clamp(start + i128::from(self.config.gap_ms)),
            end_ms: clamp(end),
        }
    }

    fn epoch_at(&self, r: usize, index: u32, t: u64) -> i64 {
        let (period, phase) = self.epochs(r, index);
        let origin = i128::from(self.config.start_ms) + i128::from(phase);
        let k = (i128::from(t) - origin).div_euclid(i128::from(period));
        i64::try_from(k).unwrap_or(0)
    }

    /// Who held the IP at `t`, if anyone (free during the gap).
    pub fn holder(&self, r: usize, index: u32, t: u64) -> Option<Tenure> {
        let tenure = self.epoch(r, index, self.epoch_at(r, index, t));
        (t >= tenure.since_ms).then_some(tenure)
    }

    /// The workload that held `ip` through the whole of `[start_ms, end_ms]`, if one did:
    /// the truth against which attributed flows are checked.
    pub fn truth(&self, ip: IpAddr, start_ms: u64, end_ms: u64) -> Option<(usize, u32)> {
        let (r, index) = self.locate(ip)?;
        let tenure = self.holder(r, index, start_ms)?;
        (end_ms < tenure.end_ms).then_some((r, tenure.workload))
    }

    /// The IPs of exporter `e` of region `r`.
    pub fn ips_of(&self, e: u32) -> impl Iterator<Item = u32> + '_ {
        let step = self.config.exporters_per_region.max(1);
        (e..self.config.ips_per_region).step_by(step as usize)
    }

    /// Exporter `e`'s heartbeats at `now`: each IP's current tenure, and the final claim
    /// of a tenure that ended since `last_ms` (the previous heartbeat).
    pub fn claims(
        &self,
        r: usize,
        e: u32,
        last_ms: Option<u64>,
        now: u64,
        out: &mut Vec<LoadClaim>,
    ) {
        for index in self.ips_of(e) {
            let k = self.epoch_at(r, index, now);
            let current = self.epoch(r, index, k);
            let previous = self.epoch(r, index, k - 1);
            let ip = self.ip(r, index);
            if last_ms.is_none_or(|last| previous.end_ms > last) {
                out.push(LoadClaim {
                    ip,
                    workload: previous.workload,
                    since_ms: previous.since_ms,
                    until_ms: previous.end_ms.saturating_sub(1),
                });
            }
            if now >= current.since_ms {
                out.push(LoadClaim {
                    ip,
                    workload: current.workload,
                    since_ms: current.since_ms,
                    until_ms: now,
                });
            }
        }
    }

    /// One flow of exporter `e` of region `r` that ended at `now`: from one of its own IPs
    /// to an IP of its region (or, with `cross_region_share`, of another) held by one
    /// workload for the whole flow. `None` when a few draws found none.
    pub fn flow(
        &self,
        r: usize,
        e: u32,
        seq: u64,
        now: u64,
        rng: &mut SplitMix64,
    ) -> Option<LoadFlow> {
        let c = &self.config;
        let exporters = c.exporters_per_region.max(1);
        let own = c.ips_per_region.saturating_sub(e).div_ceil(exporters);
        if own == 0 {
            return None;
        }
        let duration = rng.range(1, c.flow_ms_max.max(1));
        let end = now;
        let start = end.saturating_sub(duration);
        for _ in 0..8 {
            let local_index = e + exporters * (rng.range(0, u64::from(own) - 1) as u32);
            let Some(local) = self.holder(r, local_index, start) else {
                continue;
            };
            if end >= local.end_ms {
                continue;
            }
            let target = if c.regions.len() > 1 && rng.chance(c.cross_region_share) {
                (r + 1 + rng.range(0, c.regions.len() as u64 - 2) as usize) % c.regions.len()
            } else {
                r
            };
            let remote_index = if c.fanout == 0 {
                rng.range(0, u64::from(c.ips_per_region) - 1) as u32
            } else {
                let j = rng.range(0, u64::from(c.fanout) - 1);
                let callee =
                    mix(c.seed ^ (u64::from(local.workload) << 20) ^ (target as u64) << 50 ^ j);
                (callee % u64::from(c.ips_per_region)) as u32
            };
            let Some(remote) = self.holder(target, remote_index, start) else {
                continue;
            };
            if end >= remote.end_ms || remote_index == local_index && target == r {
                continue;
            }
            return Some(LoadFlow {
                seq,
                local_ip: self.ip(r, local_index),
                local_workload: local.workload,
                remote_ip: self.ip(target, remote_index),
                start_ms: start,
                end_ms: end,
            });
        }
        None
    }
}

/// Builds one exporter batch's dictionary: workload indexes of one region to dictionary
/// positions, reset per batch.
#[derive(Debug)]
pub struct BatchDictionary {
    slot: Vec<u32>,
    names: Vec<String>,
}

impl BatchDictionary {
    pub fn new(workloads: u32) -> BatchDictionary {
        BatchDictionary {
            slot: vec![u32::MAX; workloads.max(1) as usize],
            names: Vec::new(),
        }
    }

    pub fn index(&mut self, fleet: &LoadFleet, r: usize, w: u32) -> u32 {
        let Some(slot) = self.slot.get_mut(w as usize) else {
            return 0;
        };
        if *slot == u32::MAX {
            *slot = self.names.len() as u32;
            self.names.push(fleet.name(r, w).to_owned());
        }
        *slot
    }

    /// The dictionary of the batch, and a fresh start for the next.
    pub fn take(&mut self) -> Vec<String> {
        self.slot.iter_mut().for_each(|s| *s = u32::MAX);
        std::mem::take(&mut self.names)
    }
}

/// The wire form of a generated flow.
pub fn wire_flow(flow: &LoadFlow, exporter_id: u64, local_workload: u32) -> wire::Flow {
    wire::Flow {
        flow_id: flow_id(exporter_id, flow.seq),
        start_ms: flow.start_ms,
        end_ms: flow.end_ms,
        bytes_sent: 1_000 + flow.seq % 9_000,
        bytes_received: 4_000 + flow.seq % 60_000,
        segs_in: 6,
        segs_out: 6,
        retransmits: 0,
        rtt_us: 0,
        local: wire::LocalEnd::Workload(local_workload),
        local_ip: flow.local_ip,
        remote_ip: flow.remote_ip,
        local_port: 30_000 + (flow.seq % 30_000) as u16,
        remote_port: 8080,
        direction: Direction::Outbound,
        ongoing: false,
    }
}

/// A flow's id: the exporter in the high half, its sequence number in the low half.
pub fn flow_id(exporter_id: u64, seq: u64) -> u128 {
    (u128::from(exporter_id) << 64) | u128::from(seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> LoadFleet {
        LoadFleet::new(LoadFleetConfig {
            seed: 3,
            regions: vec![
                ("a".into(), "10.16.0.0/12".parse().unwrap()),
                ("b".into(), "10.32.0.0/12".parse().unwrap()),
            ],
            ips_per_region: 500,
            exporters_per_region: 3,
            workloads_per_region: 50,
            tenure_ms_min: 2_000,
            tenure_ms_max: 6_000,
            gap_ms: 200,
            cross_region_share: 0.01,
            flow_ms_max: 1_000,
            fanout: 0,
            start_ms: 1_000_000,
        })
    }

    #[test]
    fn flows_lie_inside_one_tenure_and_heartbeats_state_it() {
        let f = fleet();
        let mut rng = SplitMix64::new(9);
        let mut made = 0;
        let mut cross = 0;
        for step in 0..2_000u64 {
            let now = 1_000_000 + step * 7;
            let Some(flow) = f.flow(0, 1, step, now, &mut rng) else {
                continue;
            };
            made += 1;
            let (r, w) = f
                .truth(flow.remote_ip, flow.start_ms, flow.end_ms)
                .expect("held");
            cross += usize::from(r != 0);
            let (lr, li) = f.locate(flow.local_ip).unwrap();
            assert_eq!((lr, li % 3), (0, 1), "the local IP is the exporter's own");
            // The remote IP's owner heartbeats a claim that covers the flow.
            let (rr, ri) = f.locate(flow.remote_ip).unwrap();
            let mut claims = Vec::new();
            f.claims(rr, ri % 3, None, flow.end_ms, &mut claims);
            assert!(claims.iter().any(|c| c.ip == flow.remote_ip
                && c.workload == w
                && c.since_ms <= flow.start_ms
                && c.until_ms >= flow.end_ms));
        }
        assert!(made > 1_800, "most draws find a flow: {made}");
        assert!(cross > 0 && cross < 100, "about 1% cross-region: {cross}");
    }

    #[test]
    fn with_a_fanout_each_workload_calls_a_few_ips() {
        let mut config = fleet().config().clone();
        config.fanout = 4;
        let f = LoadFleet::new(config);
        let mut rng = SplitMix64::new(5);
        let mut callees: std::collections::BTreeMap<u32, std::collections::BTreeSet<IpAddr>> =
            Default::default();
        for step in 0..3_000u64 {
            if let Some(flow) = f.flow(0, 0, step, 1_000_000 + step, &mut rng) {
                callees
                    .entry(flow.local_workload)
                    .or_default()
                    .insert(flow.remote_ip);
            }
        }
        assert!(!callees.is_empty());
        for (w, ips) in &callees {
            // Four in-region callees, plus the odd cross-region one.
            assert!(ips.len() <= 4 + 3, "workload {w} called {} IPs", ips.len());
        }
    }

    #[test]
    fn ips_are_reused_by_other_workloads_after_a_gap() {
        let f = fleet();
        let first = f.holder(0, 7, 1_000_000).map(|t| t.end_ms);
        let end = first.unwrap_or(1_000_000);
        assert!(f.holder(0, 7, end).is_none(), "free during the gap");
        let next = f.holder(0, 7, end + 200).expect("held after the gap");
        assert_eq!(next.since_ms, end + 200);
        assert!(
            f.truth(f.ip(0, 7), end - 10, end + 300).is_none(),
            "no truth across a change"
        );
    }
}
