//! A synthetic fleet: workloads come and go and IPs are reused quickly, with the ground
//! truth of who held each IP when. It feeds the synthetic exporter source and the demo.
//!
//! Sans-io and deterministic: time comes in as an argument and randomness from a seeded
//! SplitMix64, so one seed gives one fleet.
//!
//! Per region: a few `gateway` IPs held for the whole run (Netflix's Zuul: one workload
//! calling many backends), and a pool of backend IPs. Each backend tenure lasts a few
//! seconds; when it ends the IP is free for a short cool-down and then goes to another
//! backend workload. Gateways open short flows to backends (mostly of their own region,
//! some of the other, a few to external addresses and load balancers). Every tenure also
//! produces assignment events, delivered late and sometimes out of order, as a cloud IP
//! tracker does: the feed of the legacy event-only attributor.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

/// A small, fast, seeded generator (SplitMix64). Not for secrets.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `p` (0 to 1).
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// The shape of a synthetic fleet. Times in ms.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub seed: u64,
    /// Each region and the prefix its IPs come from (IPv4).
    pub regions: Vec<(String, IpNet)>,
    /// Backend IPs per region: a small pool, so IPs are reused often.
    pub backend_ips_per_region: u16,
    /// Distinct backend workloads per region.
    pub backend_workloads_per_region: u16,
    pub gateway_ips_per_region: u16,
    pub tenure_ms_min: u64,
    pub tenure_ms_max: u64,
    /// How long an IP stays free between two tenures, at most.
    pub cooldown_ms_max: u64,
    /// Flows started per second per region.
    pub flows_per_sec: u32,
    pub flow_ms_max: u64,
    /// Share of gateway flows to the other region's backends.
    pub cross_region_share: f64,
    /// Share of gateway flows to external addresses.
    pub external_share: f64,
    /// Share of gateway flows to the region's load balancer (an event-fed IP).
    pub load_balancer_share: f64,
    /// Event delivery delays: most between these bounds...
    pub event_delay_ms_min: u64,
    pub event_delay_ms_max: u64,
    /// ... and this share much later (up to `event_late_delay_ms_max`), out of order.
    pub event_late_share: f64,
    pub event_late_delay_ms_max: u64,
}

impl FleetConfig {
    /// The demo's fleet over `regions`.
    pub fn demo(seed: u64, regions: Vec<(String, IpNet)>) -> FleetConfig {
        FleetConfig {
            seed,
            regions,
            backend_ips_per_region: 24,
            backend_workloads_per_region: 40,
            gateway_ips_per_region: 2,
            tenure_ms_min: 4_000,
            tenure_ms_max: 15_000,
            cooldown_ms_max: 1_500,
            flows_per_sec: 150,
            flow_ms_max: 400,
            cross_region_share: 0.05,
            external_share: 0.02,
            load_balancer_share: 0.03,
            event_delay_ms_min: 500,
            event_delay_ms_max: 8_000,
            event_late_share: 0.2,
            event_late_delay_ms_max: 90_000,
        }
    }
}

/// A flow the fleet produced, with its truth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenFlow {
    pub flow_id: u128,
    pub local_ip: IpAddr,
    pub local_port: u16,
    pub local_workload: String,
    pub remote_ip: IpAddr,
    pub remote_port: u16,
    pub start_ms: u64,
    pub end_ms: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Who really held the remote IP: `None` for an external address.
    pub truth: Option<String>,
}

/// "Workload W has held IP since `since_ms`, as of `until_ms`."
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenClaim {
    pub ip: IpAddr,
    pub workload: String,
    pub since_ms: u64,
    pub until_ms: u64,
}

/// An assignment event as a tracker would publish it, with when it is delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenEvent {
    pub deliver_ms: u64,
    pub ip: IpAddr,
    /// `None` for an unassignment.
    pub owner: Option<String>,
    pub at_ms: u64,
}

/// What one region produced in one step.
#[derive(Clone, Debug, Default)]
pub struct RegionStep {
    pub flows: Vec<GenFlow>,
    pub claims: Vec<GenClaim>,
}

#[derive(Clone, Debug)]
struct Tenure {
    workload: String,
    since_ms: u64,
    end_ms: u64,
}

#[derive(Clone, Debug)]
struct Slot {
    ip: IpAddr,
    holder: Option<Tenure>,
    /// When a free slot gets its next tenure.
    next_start_ms: u64,
    /// Tenures that ended since the last step (their final claim is still owed).
    ended: Vec<Tenure>,
}

#[derive(Clone, Debug)]
struct Region {
    name: String,
    gateways: Vec<IpAddr>,
    load_balancer: IpAddr,
    slots: Vec<Slot>,
}

/// The fleet. See the module documentation.
#[derive(Debug)]
pub struct Fleet {
    config: FleetConfig,
    rng: SplitMix64,
    regions: Vec<Region>,
    start_ms: u64,
    last_ms: u64,
    next_flow: u64,
    events: Vec<GenEvent>,
}

/// Sub-step of the simulation, in ms: tenure changes and flow starts are placed on it.
const STEP_MS: u64 = 10;

fn ip_in(prefix: &IpNet, index: u32) -> IpAddr {
    match prefix {
        IpNet::V4(net) => IpAddr::V4(Ipv4Addr::from(u32::from(net.network()).wrapping_add(index))),
        IpNet::V6(net) => IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(net.network()).wrapping_add(u128::from(index)),
        )),
    }
}

impl Fleet {
    pub fn new(config: FleetConfig, start_ms: u64) -> Fleet {
        let mut rng = SplitMix64::new(config.seed);
        let mut regions = Vec::new();
        let mut events = Vec::new();
        for (name, prefix) in &config.regions {
            let gateways = (0..config.gateway_ips_per_region)
                .map(|i| ip_in(prefix, 10 + u32::from(i)))
                .collect();
            let load_balancer = ip_in(prefix, 5);
            let mut slots = Vec::new();
            for i in 0..config.backend_ips_per_region {
                let ip = ip_in(prefix, 100 + u32::from(i));
                slots.push(Slot {
                    ip,
                    holder: None,
                    next_start_ms: start_ms + rng.range(0, config.cooldown_ms_max),
                    ended: Vec::new(),
                });
            }
            regions.push(Region {
                name: name.clone(),
                gateways,
                load_balancer,
                slots,
            });
        }
        let _ = &mut events;
        Fleet {
            config,
            rng,
            regions,
            start_ms,
            last_ms: start_ms,
            next_flow: 1,
            events,
        }
    }

    /// The region names, in order.
    pub fn region_names(&self) -> Vec<String> {
        self.regions.iter().map(|r| r.name.clone()).collect()
    }

    /// The load balancer IP of each region and its owner name: IPs that run no exporter
    /// and are known only from the event feed.
    pub fn load_balancers(&self) -> Vec<(String, IpAddr, String)> {
        self.regions
            .iter()
            .map(|r| (r.name.clone(), r.load_balancer, format!("lb-{}", r.name)))
            .collect()
    }

    fn gateway_name(region: &str) -> String {
        format!("gateway-{region}")
    }

    /// Advances to `now_ms`: tenures change, flows happen. Returns per region the flows
    /// that ended and the claims each region's hosts would heartbeat now.
    pub fn advance(&mut self, now_ms: u64) -> Vec<RegionStep> {
        let mut steps: Vec<RegionStep> =
            self.regions.iter().map(|_| RegionStep::default()).collect();
        let mut t = self.last_ms;
        while t + STEP_MS <= now_ms {
            t += STEP_MS;
            self.change_tenures(t);
            self.start_flows(t, &mut steps);
        }
        self.last_ms = t;
        // Heartbeats: gateways since the start; every backend tenure current now or ended
        // since the last step (its final claim vouches until its end).
        for (index, region) in self.regions.iter_mut().enumerate() {
            let step = &mut steps[index];
            for ip in &region.gateways {
                step.claims.push(GenClaim {
                    ip: *ip,
                    workload: Fleet::gateway_name(&region.name),
                    since_ms: self.start_ms,
                    until_ms: t,
                });
            }
            for slot in &mut region.slots {
                for ended in slot.ended.drain(..) {
                    step.claims.push(GenClaim {
                        ip: slot.ip,
                        workload: ended.workload,
                        since_ms: ended.since_ms,
                        until_ms: ended.end_ms,
                    });
                }
                if let Some(h) = &slot.holder {
                    step.claims.push(GenClaim {
                        ip: slot.ip,
                        workload: h.workload.clone(),
                        since_ms: h.since_ms,
                        until_ms: t,
                    });
                }
            }
        }
        steps
    }

    /// Events delivered at or before `now_ms`, in delivery order.
    pub fn take_events(&mut self, now_ms: u64) -> Vec<GenEvent> {
        self.events.sort_by_key(|e| e.deliver_ms);
        let split = self.events.partition_point(|e| e.deliver_ms <= now_ms);
        self.events.drain(..split).collect()
    }

    fn event_delay(&mut self) -> u64 {
        if self.rng.chance(self.config.event_late_share) {
            self.rng.range(
                self.config.event_delay_ms_max,
                self.config.event_late_delay_ms_max,
            )
        } else {
            self.rng.range(
                self.config.event_delay_ms_min,
                self.config.event_delay_ms_max,
            )
        }
    }

    fn change_tenures(&mut self, t: u64) {
        let mut new_events = Vec::new();
        for r in 0..self.regions.len() {
            for s in 0..self.regions[r].slots.len() {
                let ends = self.regions[r].slots[s]
                    .holder
                    .as_ref()
                    .is_some_and(|h| h.end_ms <= t);
                if ends {
                    let cooldown = self.rng.range(0, self.config.cooldown_ms_max);
                    let delay = self.event_delay();
                    let slot = &mut self.regions[r].slots[s];
                    if let Some(h) = slot.holder.take() {
                        new_events.push(GenEvent {
                            deliver_ms: h.end_ms + delay,
                            ip: slot.ip,
                            owner: None,
                            at_ms: h.end_ms,
                        });
                        slot.next_start_ms = h.end_ms + cooldown + 1;
                        slot.ended.push(h);
                    }
                }
                let starts = {
                    let slot = &self.regions[r].slots[s];
                    slot.holder.is_none() && slot.next_start_ms <= t
                };
                if starts {
                    let workload_index = self.rng.range(
                        0,
                        u64::from(self.config.backend_workloads_per_region.max(1)) - 1,
                    );
                    let length = self
                        .rng
                        .range(self.config.tenure_ms_min, self.config.tenure_ms_max);
                    let delay = self.event_delay();
                    let name = format!("svc-{}-{workload_index:02}", self.regions[r].name);
                    let slot = &mut self.regions[r].slots[s];
                    slot.holder = Some(Tenure {
                        workload: name.clone(),
                        since_ms: t,
                        end_ms: t + length,
                    });
                    new_events.push(GenEvent {
                        deliver_ms: t + delay,
                        ip: slot.ip,
                        owner: Some(name),
                        at_ms: t,
                    });
                }
            }
        }
        self.events.extend(new_events);
    }

    fn start_flows(&mut self, t: u64, steps: &mut [RegionStep]) {
        let per_step = f64::from(self.config.flows_per_sec) * STEP_MS as f64 / 1_000.0;
        for (r, step) in steps.iter_mut().enumerate().take(self.regions.len()) {
            let whole = per_step.floor() as u64;
            let extra = u64::from(self.rng.chance(per_step - per_step.floor()));
            for _ in 0..whole + extra {
                if let Some(flow) = self.one_flow(r, t) {
                    step.flows.push(flow);
                }
            }
        }
    }

    fn one_flow(&mut self, r: usize, t: u64) -> Option<GenFlow> {
        let region = &self.regions[r];
        let gateway = region.gateways[self.rng.range(0, region.gateways.len() as u64 - 1) as usize];
        let local_workload = Fleet::gateway_name(&region.name);
        let duration = self.rng.range(1, self.config.flow_ms_max);
        let roll = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let (remote_ip, truth, remote_port) = if roll < self.config.external_share {
            let ip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, self.rng.range(1, 254) as u8));
            (ip, None, 443)
        } else if roll < self.config.external_share + self.config.load_balancer_share {
            let region = &self.regions[r];
            (
                region.load_balancer,
                Some(format!("lb-{}", region.name)),
                443,
            )
        } else {
            let target =
                if self.regions.len() > 1 && self.rng.chance(self.config.cross_region_share) {
                    (r + 1 + self.rng.range(0, self.regions.len() as u64 - 2) as usize)
                        % self.regions.len()
                } else {
                    r
                };
            let slots = &self.regions[target].slots;
            let pick = self.rng.range(0, slots.len() as u64 - 1) as usize;
            let slot = &slots[pick];
            // A connection lasts no longer than the tenure of the IP it reaches.
            let h = slot.holder.as_ref()?;
            if h.end_ms <= t + duration {
                return None;
            }
            (slot.ip, Some(h.workload.clone()), 8080)
        };
        let id = self.next_flow;
        self.next_flow += 1;
        let flow_id = (u128::from(self.config.seed) << 64) | u128::from(id);
        Some(GenFlow {
            flow_id,
            local_ip: gateway,
            local_port: 30_000 + (id % 30_000) as u16,
            local_workload,
            remote_ip,
            remote_port,
            start_ms: t,
            end_ms: t + duration,
            bytes_sent: self.rng.range(200, 20_000),
            bytes_received: self.rng.range(200, 200_000),
            truth,
        })
    }
}

/// Ground truth by flow id, for scoring.
pub type Truth = BTreeMap<u128, Option<String>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Fleet {
        let regions = vec![
            ("a".to_owned(), "10.1.0.0/16".parse().unwrap()),
            ("b".to_owned(), "10.2.0.0/16".parse().unwrap()),
        ];
        Fleet::new(FleetConfig::demo(7, regions), 1_000_000)
    }

    #[test]
    fn one_seed_one_fleet_and_flows_stay_inside_tenures() {
        let mut a = fleet();
        let mut b = fleet();
        let mut total = 0;
        for step in 1..=30u64 {
            let now = 1_000_000 + step * 1_000;
            let sa = a.advance(now);
            let sb = b.advance(now);
            assert_eq!(sa[0].flows, sb[0].flows);
            for region in &sa {
                total += region.flows.len();
                for flow in &region.flows {
                    if let Some(truth) = &flow.truth {
                        if truth.starts_with("svc-") {
                            let covered = region
                                .claims
                                .iter()
                                .any(|c| c.ip == flow.remote_ip && &c.workload == truth)
                                || sa.iter().flat_map(|s| &s.claims).any(|c| {
                                    c.ip == flow.remote_ip
                                        && &c.workload == truth
                                        && c.since_ms <= flow.start_ms
                                });
                            assert!(covered, "the truth of a flow is claimed by its holder");
                        }
                    }
                }
            }
        }
        assert!(total > 1_000, "flows are produced: {total}");
        assert!(!a.take_events(1_000_000 + 30_000).is_empty());
    }
}
