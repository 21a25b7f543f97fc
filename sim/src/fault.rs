//! Faults drawn per seed (swarm testing): each seed enables a random subset of the allowed
//! kinds, then places episodes of the enabled kinds in the fault phase. Every episode
//! ends before the healed phase begins.

use rand::rngs::StdRng;
use rand::RngExt;

use crate::fleet::Fleet;
use crate::net::{Cut, Group};
use crate::scenario::Scenario;

/// The kinds of fault.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum FaultKind {
    Loss,
    Delay,
    PartitionNode,
    PartitionRegion,
    PartitionAsymmetric,
    Pause,
    ClockJump,
    ClockStep,
    ClockSlew,
    HostClockStep,
    ExporterOutage,
    Crash,
}

impl FaultKind {
    pub const ALL: [FaultKind; 12] = [
        FaultKind::Loss,
        FaultKind::Delay,
        FaultKind::PartitionNode,
        FaultKind::PartitionRegion,
        FaultKind::PartitionAsymmetric,
        FaultKind::Pause,
        FaultKind::ClockJump,
        FaultKind::ClockStep,
        FaultKind::ClockSlew,
        FaultKind::HostClockStep,
        FaultKind::ExporterOutage,
        FaultKind::Crash,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Loss => "loss",
            FaultKind::Delay => "delay",
            FaultKind::PartitionNode => "partition-node",
            FaultKind::PartitionRegion => "partition-region",
            FaultKind::PartitionAsymmetric => "partition-asymmetric",
            FaultKind::Pause => "pause",
            FaultKind::ClockJump => "clock-jump",
            FaultKind::ClockStep => "clock-step",
            FaultKind::ClockSlew => "clock-slew",
            FaultKind::HostClockStep => "host-clock-step",
            FaultKind::ExporterOutage => "exporter-outage",
            FaultKind::Crash => "crash",
        }
    }
}

/// What an episode does while it lasts.
#[derive(Clone, Debug)]
pub enum Fault {
    /// More loss and delay on every link (reordering of datagrams follows from the
    /// random delays; frames of one connection stay in order).
    Degrade { loss: f64, delay_ms_max: u64 },
    /// Links cut.
    Cut { cuts: Vec<Cut> },
    /// A collector stops processing; what arrives waits, and is processed on resume.
    Pause { node: u16 },
    /// A collector loses its memory; it boots again at the end of the episode.
    Crash { node: u16 },
    /// Clocks jump (within the margins) at the start; they stay where they jumped.
    ClockJump {
        collector: u16,
        collector_offset_ms: i64,
        hosts: Vec<(u32, i64)>,
    },
    /// A collector's clock is stepped by `step_ms` (far beyond the margins, either way:
    /// an operator, NTP or a VM migration) at the start, and stepped back at the end.
    ClockStep { collector: u16, step_ms: i64 },
    /// A collector's clock is slewed, with no step: its offset moves steadily from zero to
    /// `peak_ms` at the episode's middle and back to zero at its end.
    ClockSlew { collector: u16, peak_ms: i64 },
    /// Some hosts' clocks are stepped by `step` (from three times δ to minutes, either
    /// way) at the start and set right at the end.
    HostClockStep { hosts: Vec<(u32, i64)> },
    /// Exporters stop (no heartbeats, no sends) and come back with what they kept.
    ExporterOutage { hosts: Vec<u32> },
}

/// One episode.
#[derive(Clone, Debug)]
pub struct Planned {
    pub kind: FaultKind,
    pub start_ms: u64,
    pub end_ms: u64,
    pub fault: Fault,
}

/// Draws the faults of one seed.
pub fn plan(
    scenario: &Scenario,
    rng: &mut StdRng,
    fault_phase_start_ms: u64,
    collectors: usize,
    fleet: &Fleet,
) -> Vec<Planned> {
    let f = &scenario.faults;
    if !f.enabled || scenario.run.fault_phase_s == 0 {
        return Vec::new();
    }
    let allowed: Vec<FaultKind> = FaultKind::ALL
        .iter()
        .copied()
        .filter(|k| *k != FaultKind::Crash || f.crash)
        .filter(|k| *k != FaultKind::PartitionRegion || scenario.regions.len() > 1)
        .filter(|k| f.kinds.is_empty() || f.kinds.iter().any(|n| n == k.as_str()))
        // Off unless a scenario sets a step: the exporter keeps its tenures' times on the
        // wall clock, so a host clock stepped while it holds a tenure restates that
        // tenure's `since` on the old clock afterwards (the collector's check catches only
        // batches sent while the clock is off).
        .filter(|k| *k != FaultKind::HostClockStep || scenario.clocks.host_step_ms_max > 0)
        .collect();
    if allowed.is_empty() {
        return Vec::new();
    }
    let mut enabled: Vec<FaultKind> = allowed
        .iter()
        .copied()
        .filter(|_| rng.random_bool(f.kind_probability))
        .collect();
    if enabled.is_empty() {
        enabled.push(allowed[rng.random_range(0..allowed.len())]);
    }
    let phase_ms = scenario.run.fault_phase_s * 1_000;
    let mut out = Vec::new();
    for _ in 0..f.episodes {
        let kind = enabled[rng.random_range(0..enabled.len())];
        let duration = rng
            .random_range(f.duration_s_min * 1_000..=f.duration_s_max * 1_000)
            .min(phase_ms);
        let start_ms = fault_phase_start_ms + rng.random_range(0..=phase_ms - duration);
        let node = rng.random_range(0..collectors) as u16;
        let fault = match kind {
            FaultKind::Loss => Fault::Degrade {
                loss: f.loss,
                delay_ms_max: 0,
            },
            FaultKind::Delay => Fault::Degrade {
                loss: 0.0,
                delay_ms_max: f.delay_ms_max,
            },
            FaultKind::PartitionNode => Fault::Cut {
                cuts: vec![
                    Cut {
                        from: Group::Collector(node),
                        to: Group::AllBut(node),
                    },
                    Cut {
                        from: Group::AllBut(node),
                        to: Group::Collector(node),
                    },
                ],
            },
            FaultKind::PartitionRegion => {
                let r = rng.random_range(0..scenario.regions.len());
                Fault::Cut {
                    cuts: vec![
                        Cut {
                            from: Group::RegionCollectors(r),
                            to: Group::OtherRegionsCollectors(r),
                        },
                        Cut {
                            from: Group::OtherRegionsCollectors(r),
                            to: Group::RegionCollectors(r),
                        },
                    ],
                }
            }
            FaultKind::PartitionAsymmetric => {
                let cut = if rng.random_bool(0.5) {
                    Cut {
                        from: Group::Collector(node),
                        to: Group::AllBut(node),
                    }
                } else {
                    Cut {
                        from: Group::AllBut(node),
                        to: Group::Collector(node),
                    }
                };
                Fault::Cut { cuts: vec![cut] }
            }
            FaultKind::Pause => Fault::Pause { node },
            FaultKind::Crash => Fault::Crash { node },
            FaultKind::ClockJump => {
                let c = scenario.clocks.collector_skew_ms_max as i64;
                let h = scenario.clocks.host_skew_ms_max as i64;
                let count = (fleet.hosts.len() / 10).max(1);
                let hosts = (0..count)
                    .map(|_| {
                        (
                            rng.random_range(0..fleet.hosts.len()) as u32,
                            rng.random_range(-h..=h),
                        )
                    })
                    .collect();
                Fault::ClockJump {
                    collector: node,
                    collector_offset_ms: rng.random_range(-c..=c),
                    hosts,
                }
            }
            FaultKind::ClockStep => Fault::ClockStep {
                collector: node,
                step_ms: either_way(rng, 1_000, scenario.clocks.collector_step_ms_max),
            },
            FaultKind::ClockSlew => Fault::ClockSlew {
                collector: node,
                peak_ms: either_way(rng, 1, scenario.clocks.collector_slew_ms_max),
            },
            FaultKind::HostClockStep => {
                let min = 3 * scenario.cluster.skew_margin_ms;
                let max = scenario.clocks.host_step_ms_max.max(min);
                let count = (fleet.hosts.len() / 10).max(1);
                let hosts = (0..count)
                    .map(|_| {
                        let step = either_way(rng, min, max);
                        (rng.random_range(0..fleet.hosts.len()) as u32, step)
                    })
                    .collect();
                Fault::HostClockStep { hosts }
            }
            FaultKind::ExporterOutage => {
                let count = (fleet.hosts.len() / 5).max(1);
                let hosts = (0..count)
                    .map(|_| rng.random_range(0..fleet.hosts.len()) as u32)
                    .collect();
                Fault::ExporterOutage { hosts }
            }
        };
        out.push(Planned {
            kind,
            start_ms,
            end_ms: start_ms + duration,
            fault,
        });
    }
    out
}

/// A magnitude drawn in `min..=max` (at least `min`), then a sign.
fn either_way(rng: &mut StdRng, min: u64, max: u64) -> i64 {
    let magnitude = rng.random_range(min..=max.max(min)) as i64;
    if rng.random_bool(0.5) {
        magnitude
    } else {
        -magnitude
    }
}

/// The kinds this seed drew, for the summary.
pub fn describe_enabled(planned: &[Planned]) -> Vec<String> {
    let mut kinds: Vec<FaultKind> = planned.iter().map(|p| p.kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    kinds.iter().map(|k| k.as_str().to_owned()).collect()
}
