//! The simulated network: who can reach whom (partitions, including one node, one region
//! and one direction only), and per-link delay, loss and duplication, healed values plus
//! whatever the active faults add.

use rand::rngs::StdRng;
use rand::RngExt;

use crate::scenario::NetworkConfig;

/// One end of a link.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Endpoint {
    Collector(u16),
    Exporter(u32),
}

/// A set of endpoints a cut applies to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Group {
    /// One collector.
    Collector(u16),
    /// Every endpoint but that collector.
    AllBut(u16),
    /// The collectors of a region.
    RegionCollectors(usize),
    /// The collectors of every other region.
    OtherRegionsCollectors(usize),
}

/// Traffic from a member of `from` to a member of `to` is dropped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Cut {
    pub from: Group,
    pub to: Group,
}

/// What the network does to one message now.
#[derive(Clone, Copy, Debug)]
pub struct LinkState {
    pub extra_delay_ms_max: u64,
    pub loss_extra: f64,
}

/// The network: healed config, active cuts and degradations.
#[derive(Debug)]
pub struct Network {
    pub config: NetworkConfig,
    /// Active cuts, by fault id.
    pub cuts: Vec<(u32, Cut)>,
    /// Active degradations, by fault id.
    pub degraded: Vec<(u32, LinkState)>,
    /// Region of each collector.
    pub collector_region: Vec<usize>,
    /// Region of each exporter.
    pub exporter_region: Vec<usize>,
}

impl Network {
    fn region_of(&self, e: Endpoint) -> usize {
        match e {
            Endpoint::Collector(i) => self.collector_region[i as usize],
            Endpoint::Exporter(h) => self.exporter_region[h as usize],
        }
    }

    fn member(&self, g: Group, e: Endpoint) -> bool {
        match (g, e) {
            (Group::Collector(i), Endpoint::Collector(j)) => i == j,
            (Group::Collector(_), Endpoint::Exporter(_)) => false,
            (Group::AllBut(i), Endpoint::Collector(j)) => i != j,
            (Group::AllBut(_), Endpoint::Exporter(_)) => true,
            (Group::RegionCollectors(r), Endpoint::Collector(_)) => self.region_of(e) == r,
            (Group::OtherRegionsCollectors(r), Endpoint::Collector(_)) => self.region_of(e) != r,
            (
                Group::RegionCollectors(_) | Group::OtherRegionsCollectors(_),
                Endpoint::Exporter(_),
            ) => false,
        }
    }

    /// Whether `from` can reach `to` now.
    pub fn reachable(&self, from: Endpoint, to: Endpoint) -> bool {
        !self
            .cuts
            .iter()
            .any(|(_, c)| self.member(c.from, from) && self.member(c.to, to))
    }

    /// The one-way delay of a message now, in ms.
    pub fn delay_ms(&self, from: Endpoint, to: Endpoint, rng: &mut StdRng) -> u64 {
        let c = &self.config;
        let base = if self.region_of(from) == self.region_of(to) {
            rng.random_range(c.delay_ms_min..=c.delay_ms_max)
        } else {
            rng.random_range(c.cross_region_delay_ms_min..=c.cross_region_delay_ms_max)
        };
        let extra = self
            .degraded
            .iter()
            .map(|(_, s)| s.extra_delay_ms_max)
            .max()
            .unwrap_or(0);
        base + if extra > 0 {
            rng.random_range(0..=extra)
        } else {
            0
        }
    }

    fn extra_loss(&self) -> f64 {
        self.degraded
            .iter()
            .map(|(_, s)| s.loss_extra)
            .fold(0.0, f64::max)
    }

    /// Whether a gossip datagram is lost.
    pub fn datagram_lost(&self, rng: &mut StdRng) -> bool {
        let p = (self.config.datagram_loss + self.extra_loss()).min(1.0);
        p > 0.0 && rng.random_bool(p)
    }

    /// Whether a gossip datagram is delivered twice.
    pub fn datagram_duplicated(&self, rng: &mut StdRng) -> bool {
        self.config.datagram_duplication > 0.0 && rng.random_bool(self.config.datagram_duplication)
    }

    /// Whether a frame's connection breaks (the frame is lost; the sender's timeouts
    /// recover).
    pub fn frame_lost(&self, rng: &mut StdRng) -> bool {
        let p = (self.config.frame_loss + self.extra_loss()).min(1.0);
        p > 0.0 && rng.random_bool(p)
    }
}
