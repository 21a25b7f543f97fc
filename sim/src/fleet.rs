//! The simulated fleet and its oracle: regions with hosts and a small IP pool, workloads
//! whose instances come and go on hosts and take IPs from the pool, and the ground truth
//! of who held every IP at every instant.
//!
//! The demo's fleet (`tenure_node::fleet`) is fixed in shape (gateways and backends, no
//! hosts, no clocks); the simulator needs hosts with their own exporters and clocks,
//! workloads from a scenario file and per-instance lifetimes, so it has its own model.
//! Times here are true times (the oracle's), in Unix ms.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::RngExt;

use crate::scenario::{ip_in, Scenario};

/// A time that never comes: the end of a tenure still running.
pub const NEVER_MS: u64 = u64::MAX;

/// Offset in a region's CIDR of the first non-workload IP.
const NON_WORKLOAD_IP_OFFSET: u64 = 16;
/// Offset in a region's CIDR of the first pool IP, after the non-workload IPs.
fn pool_offset(non_workload_ips: u32) -> u64 {
    NON_WORKLOAD_IP_OFFSET + u64::from(non_workload_ips) + 16
}

/// A workload.
#[derive(Clone, Debug)]
pub struct Workload {
    pub name: Arc<str>,
    pub region: usize,
    pub instances: u32,
    /// Lifetime bounds in ms; `None`: the whole run.
    pub lifetime_ms: Option<(u64, u64)>,
    pub gateway: bool,
    /// Live instances.
    pub live: Vec<u32>,
}

/// One instance: a workload on a host, holding one IP for its lifetime.
#[derive(Clone, Debug)]
pub struct Instance {
    pub workload: u32,
    pub ip: u32,
    pub host: u32,
    pub start_ms: u64,
    /// When it ends (known at its start: the fleet decides lifetimes up front).
    pub end_ms: u64,
    /// `start_ms` by its host's clock when it took the IP: the claims' `since`.
    pub since_stamped_ms: u64,
    /// `end_ms` by its host's clock, once it ended.
    pub end_stamped_ms: Option<u64>,
}

/// An IP of a region's pool or a non-workload IP.
#[derive(Clone, Debug)]
pub struct IpSlot {
    pub addr: IpAddr,
    pub region: usize,
    /// Free from this time on, when not held.
    pub free_at_ms: u64,
    pub holder: Option<u32>,
    /// The oracle: `(start, end, owner name index)`, in order, never overlapping.
    pub history: Vec<(u64, u64, u32)>,
}

/// A host: one exporter.
#[derive(Clone, Debug)]
pub struct Host {
    pub region: usize,
    /// Instances running here.
    pub instances: Vec<u32>,
    /// Instances that ended since the last heartbeat (their final claim is owed).
    pub ended: Vec<u32>,
}

/// The fleet. See the module documentation.
#[derive(Debug)]
pub struct Fleet {
    pub workloads: Vec<Workload>,
    /// Every owner name: workloads first, then non-workload owners.
    pub names: Vec<Arc<str>>,
    pub instances: Vec<Instance>,
    pub ips: Vec<IpSlot>,
    pub by_addr: BTreeMap<IpAddr, u32>,
    pub hosts: Vec<Host>,
    /// Per region: first host index and count.
    pub region_hosts: Vec<(u32, u32)>,
    /// Per region: free pool IPs.
    pub free: Vec<Vec<u32>>,
    /// Per region: the non-workload IPs.
    pub non_workload: Vec<Vec<u32>>,
    reuse_delay_ms_min: Vec<u64>,
}

/// An event the fleet asks the simulator to schedule.
#[derive(Clone, Debug)]
pub enum FleetChange {
    /// An instance took an IP; schedule its end and the feed's assignment event.
    Started { instance: u32 },
    /// No free IP: try again later.
    NoIp { workload: u32 },
}

impl Fleet {
    pub fn new(scenario: &Scenario, start_ms: u64) -> Fleet {
        let mut workloads = Vec::new();
        let mut names: Vec<Arc<str>> = Vec::new();
        for w in &scenario.workloads {
            let region = scenario
                .regions
                .iter()
                .position(|r| r.name == w.region)
                .unwrap_or(0);
            let lifetime_ms = (w.lifetime_s_max > 0)
                .then(|| (w.lifetime_s_min.max(1) * 1_000, w.lifetime_s_max * 1_000));
            for k in 0..w.count {
                let name: Arc<str> = if w.count == 1 {
                    Arc::from(w.name.as_str())
                } else {
                    Arc::from(format!("{}-{k:03}", w.name).as_str())
                };
                names.push(name.clone());
                workloads.push(Workload {
                    name,
                    region,
                    instances: w.instances,
                    lifetime_ms,
                    gateway: w.gateway,
                    live: Vec::new(),
                });
            }
        }
        let mut ips = Vec::new();
        let mut by_addr = BTreeMap::new();
        let mut free = Vec::new();
        let mut non_workload = Vec::new();
        let mut hosts = Vec::new();
        let mut region_hosts = Vec::new();
        for (r, region) in scenario.regions.iter().enumerate() {
            let mut nw = Vec::new();
            for k in 0..region.non_workload_ips {
                let addr = ip_in(&region.cidr, NON_WORKLOAD_IP_OFFSET + u64::from(k));
                let owner = names.len() as u32;
                names.push(Arc::from(format!("lb-{}-{k}", region.name).as_str()));
                let index = ips.len() as u32;
                ips.push(IpSlot {
                    addr,
                    region: r,
                    free_at_ms: NEVER_MS,
                    holder: None,
                    history: vec![(0, NEVER_MS, owner)],
                });
                by_addr.insert(addr, index);
                nw.push(index);
            }
            non_workload.push(nw);
            let mut pool = Vec::new();
            for k in 0..region.ip_pool {
                let addr = ip_in(
                    &region.cidr,
                    pool_offset(region.non_workload_ips) + u64::from(k),
                );
                let index = ips.len() as u32;
                ips.push(IpSlot {
                    addr,
                    region: r,
                    free_at_ms: start_ms,
                    holder: None,
                    history: Vec::new(),
                });
                by_addr.insert(addr, index);
                pool.push(index);
            }
            free.push(pool);
            region_hosts.push((hosts.len() as u32, region.hosts));
            for _ in 0..region.hosts {
                hosts.push(Host {
                    region: r,
                    instances: Vec::new(),
                    ended: Vec::new(),
                });
            }
        }
        Fleet {
            workloads,
            names,
            instances: Vec::new(),
            ips,
            by_addr,
            hosts,
            region_hosts,
            free,
            non_workload,
            reuse_delay_ms_min: scenario
                .regions
                .iter()
                .map(|r| r.reuse_delay_ms_min)
                .collect(),
        }
    }

    /// Starts an instance of `workload` at `now_ms` on a random host of its region, with
    /// a random free IP. `first` instances of a churning workload get a random share of a
    /// lifetime, so that ends are spread out. `offset_of` gives a host's clock offset.
    pub fn start_instance(
        &mut self,
        workload: u32,
        now_ms: u64,
        first: bool,
        rng: &mut StdRng,
        offset_of: impl Fn(u32) -> i64,
    ) -> FleetChange {
        let w = &self.workloads[workload as usize];
        let region = w.region;
        let free = &mut self.free[region];
        // Any free IP whose reuse delay has passed, chosen at random.
        let eligible: Vec<usize> = (0..free.len())
            .filter(|&i| self.ips[free[i] as usize].free_at_ms <= now_ms)
            .collect();
        if eligible.is_empty() {
            return FleetChange::NoIp { workload };
        }
        let pick = eligible[rng.random_range(0..eligible.len())];
        let ip = free.swap_remove(pick);
        let (first_host, hosts) = self.region_hosts[region];
        let host = first_host + rng.random_range(0..hosts);
        let end_ms = match w.lifetime_ms {
            None => NEVER_MS,
            Some((lo, hi)) => {
                let life = rng.random_range(lo..=hi);
                if first {
                    now_ms + rng.random_range(1..=life)
                } else {
                    now_ms + life
                }
            }
        };
        let instance = self.instances.len() as u32;
        let since_stamped_ms = now_ms.saturating_add_signed(offset_of(host));
        self.instances.push(Instance {
            workload,
            ip,
            host,
            start_ms: now_ms,
            end_ms,
            since_stamped_ms,
            end_stamped_ms: None,
        });
        let slot = &mut self.ips[ip as usize];
        slot.holder = Some(instance);
        slot.history.push((now_ms, NEVER_MS, workload));
        self.workloads[workload as usize].live.push(instance);
        self.hosts[host as usize].instances.push(instance);
        FleetChange::Started { instance }
    }

    /// Ends `instance` at its end time: the IP is freed (reusable after the region's
    /// reuse delay), and its host owes a final claim.
    pub fn end_instance(&mut self, instance: u32, host_offset_ms: i64) {
        let inst = &mut self.instances[instance as usize];
        let end = inst.end_ms;
        inst.end_stamped_ms = Some(end.saturating_add_signed(host_offset_ms));
        let (ip, workload, host) = (inst.ip, inst.workload, inst.host);
        let slot = &mut self.ips[ip as usize];
        slot.holder = None;
        slot.free_at_ms = end + 1 + self.reuse_delay_ms_min[slot.region];
        if let Some(last) = slot.history.last_mut() {
            last.1 = end;
        }
        let region = slot.region;
        self.free[region].push(ip);
        self.workloads[workload as usize]
            .live
            .retain(|&i| i != instance);
        let h = &mut self.hosts[host as usize];
        h.instances.retain(|&i| i != instance);
        h.ended.push(instance);
    }

    /// The oracle: who held `ip` for the whole of `[start_ms, end_ms]` (one tenure), as an
    /// owner name index; `None` when no single tenure covers it, or the IP is not ours.
    pub fn owner_throughout(&self, ip: IpAddr, start_ms: u64, end_ms: u64) -> Option<u32> {
        let slot = &self.ips[*self.by_addr.get(&ip)? as usize];
        let i = slot.history.partition_point(|(s, _, _)| *s <= start_ms);
        let (s, e, owner) = *slot.history.get(i.checked_sub(1)?)?;
        (s <= start_ms && end_ms <= e).then_some(owner)
    }
}

/// An address outside every region (TEST-NET-3), for external flows.
pub fn external_ip(rng: &mut StdRng) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, rng.random_range(1..=254)))
}
