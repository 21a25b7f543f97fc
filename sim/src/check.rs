//! Ground truth per flow and the checks of the contract: no misattribution (checked on
//! every emitted flow, against the oracle), no accepted flow lost, the unattributed share
//! after healing, and the legacy baseline scored against the same truth.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use tenure_attribution::{Attribution, Reason, Verdict};
use tenure_gossip::wire::LocalReason;
use tenure_node::core::{EmittedFlow, Local};

use crate::fleet::Fleet;

/// Who truly holds a flow's remote IP.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Owner {
    /// An owner name index of the fleet.
    Named(u32),
    /// An address of no region.
    External,
}

/// How a verdict compares with the truth.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Class {
    /// Not scored yet.
    #[default]
    Unscored,
    Correct,
    Wrong,
    /// No owner given.
    Unattributed,
}

/// One generated flow and what became of it. Times are true times.
#[derive(Clone, Debug)]
pub struct FlowTruth {
    pub start_ms: u64,
    pub end_ms: u64,
    /// The caller's IP: the flow's local end.
    pub local: IpAddr,
    pub remote: IpAddr,
    pub owner: Owner,
    pub caller: u32,
    /// Well inside a heartbeat-covered tenure, after healing: held to the unattributed
    /// bound.
    pub bounded: bool,
    /// An exporter got an `Accepted` ack for a batch holding it.
    pub accepted: bool,
    /// When the first such ack arrived, true time.
    pub accepted_at_ms: u64,
    pub emitted: u32,
    /// When it was first emitted, true time.
    pub first_emitted_at_ms: u64,
    pub tenure: Class,
    pub reason: Option<Reason>,
    /// One class per legacy attributor.
    pub legacy: Vec<Class>,
}

/// A broken promise: the run stops.
#[derive(Clone, Debug, PartialEq)]
pub enum Violation {
    Misattributed {
        flow_id: u128,
        remote: IpAddr,
        said: String,
        truth: String,
        at_ms: u64,
    },
    /// A local end stamped with a workload that did not hold the IP for the whole flow
    /// (`count` of them; the first described).
    LocalMisattributed {
        count: u64,
        flow_id: u128,
        local: IpAddr,
        said: String,
        truth: String,
    },
    UnknownFlow {
        flow_id: u128,
    },
    Lost {
        count: u64,
        first_flow_id: u128,
    },
    /// Accepted flows emitted later than `bound_ms` after the cluster was sane again (no
    /// fault active) once they were accepted.
    Late {
        count: u64,
        first_flow_id: u128,
        late_by_ms: u64,
        bound_ms: u64,
    },
    UnattributedShare {
        share: f64,
        bound: f64,
        flows: u64,
    },
    NotConverged {
        node: String,
        what: String,
        bound_ms: u64,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Misattributed {
                flow_id,
                remote,
                said,
                truth,
                at_ms,
            } => write!(
                f,
                "misattribution: flow {flow_id:#x} to {remote} emitted at {at_ms} as {said}, truth {truth}"
            ),
            Violation::LocalMisattributed {
                count,
                flow_id,
                local,
                said,
                truth,
            } => write!(
                f,
                "local misattribution ({count} flows): flow {flow_id:#x} from {local} stamped {said}, truth {truth}"
            ),
            Violation::UnknownFlow { flow_id } => {
                write!(f, "a flow the fleet never generated was emitted: {flow_id:#x}")
            }
            Violation::Lost {
                count,
                first_flow_id,
            } => write!(
                f,
                "{count} accepted flows were never emitted (first: {first_flow_id:#x})"
            ),
            Violation::Late {
                count,
                first_flow_id,
                late_by_ms,
                bound_ms,
            } => write!(
                f,
                "{count} accepted flows were emitted more than {bound_ms} ms after the faults around their acceptance healed (first: {first_flow_id:#x}, {late_by_ms} ms past the bound)"
            ),
            Violation::UnattributedShare {
                share,
                bound,
                flows,
            } => write!(
                f,
                "unattributed share {share:.4} of {flows} well-covered healed flows is above {bound}"
            ),
            Violation::NotConverged {
                node,
                what,
                bound_ms,
            } => write!(
                f,
                "membership did not converge within {bound_ms} ms after healing: {node}: {what}"
            ),
        }
    }
}

/// Per-minute counts for the report's plots.
#[derive(Clone, Debug, Default)]
pub struct Minute {
    pub flows: u64,
    pub tenure_wrong: u64,
    pub tenure_unattributed: u64,
    pub legacy_wrong: Vec<u64>,
}

/// The truth of a run, filled as flows are generated, emitted and scored.
#[derive(Debug, Default)]
pub struct Truths {
    pub flows: Vec<FlowTruth>,
    /// The high 64 bits of every flow id of this run.
    pub id_prefix: u64,
    pub duplicates: u64,
    pub by_reason: [u64; Reason::ALL.len()],
    /// Local ends stamped with a workload, first emissions.
    pub local_stamped: u64,
    /// Local ends unattributed, by reason ([`LocalReason::ALL`]), first emissions.
    pub local_by_reason: [u64; LocalReason::ALL.len()],
    /// Local ends stamped with a workload that did not hold the IP throughout.
    pub local_misattributed: u64,
    /// The first of them.
    pub first_local_misattributed: Option<Violation>,
}

fn reason_index(r: Reason) -> usize {
    Reason::ALL.iter().position(|x| *x == r).unwrap_or(0)
}

impl Truths {
    pub fn flow_id(&self, index: usize) -> u128 {
        (u128::from(self.id_prefix) << 64) | index as u128
    }

    fn index_of(&self, flow_id: u128) -> Option<usize> {
        let index = (flow_id & u128::from(u64::MAX)) as usize;
        ((flow_id >> 64) as u64 == self.id_prefix && index < self.flows.len()).then_some(index)
    }

    /// Scores one emitted flow; a misattribution is a violation.
    pub fn on_emit(
        &mut self,
        flow: &EmittedFlow,
        fleet: &Fleet,
        now_ms: u64,
    ) -> Result<(), Violation> {
        let flow_id = flow.record.flow_id;
        let Some(index) = self.index_of(flow_id) else {
            return Err(Violation::UnknownFlow { flow_id });
        };
        let truth = &mut self.flows[index];
        truth.emitted += 1;
        if truth.emitted == 1 {
            truth.first_emitted_at_ms = now_ms;
        }
        if truth.emitted > 1 {
            self.duplicates += 1;
        }
        // The local end, against the same oracle: who held the caller's IP throughout?
        if truth.emitted == 1 {
            match &flow.record.local {
                Local::Workload(w) => {
                    self.local_stamped += 1;
                    let owner = fleet.owner_throughout(truth.local, truth.start_ms, truth.end_ms);
                    if owner.is_none_or(|o| *fleet.names[o as usize] != **w) {
                        self.local_misattributed += 1;
                        let v = Violation::LocalMisattributed {
                            count: 0,
                            flow_id,
                            local: truth.local,
                            said: w.to_string(),
                            truth: owner.map_or_else(
                                || "no single owner".to_owned(),
                                |o| fleet.names[o as usize].to_string(),
                            ),
                        };
                        self.first_local_misattributed.get_or_insert(v);
                    }
                }
                Local::Unattributed(reason) => {
                    let k = LocalReason::ALL
                        .iter()
                        .position(|r| r == reason)
                        .unwrap_or(0);
                    self.local_by_reason[k] += 1;
                }
            }
        }
        let class = match &flow.verdict {
            Verdict::Attributed(Attribution::Heartbeat(w) | Attribution::Event(w)) => {
                // The oracle, asked afresh: who held the IP throughout the flow?
                let owner = fleet.owner_throughout(truth.remote, truth.start_ms, truth.end_ms);
                match owner {
                    Some(o) if *fleet.names[o as usize] == **w => Class::Correct,
                    Some(_) | None => {
                        return Err(Violation::Misattributed {
                            flow_id,
                            remote: truth.remote,
                            said: w.to_string(),
                            truth: describe(truth.owner, fleet),
                            at_ms: now_ms,
                        })
                    }
                }
            }
            Verdict::Attributed(Attribution::External) => match truth.owner {
                Owner::External => Class::Correct,
                Owner::Named(_) => {
                    return Err(Violation::Misattributed {
                        flow_id,
                        remote: truth.remote,
                        said: "external".to_owned(),
                        truth: describe(truth.owner, fleet),
                        at_ms: now_ms,
                    })
                }
            },
            Verdict::Unattributed(reason) => {
                if truth.emitted == 1 {
                    self.by_reason[reason_index(*reason)] += 1;
                    truth.reason = Some(*reason);
                }
                Class::Unattributed
            }
        };
        // The first verdict counts; a later duplicate may only improve an unattributed one.
        if truth.tenure == Class::Unscored
            || (truth.tenure == Class::Unattributed && class == Class::Correct)
        {
            truth.tenure = class;
        }
        Ok(())
    }

    /// Scores a legacy verdict.
    pub fn on_legacy(
        &mut self,
        variant: usize,
        index: usize,
        said: Option<&Arc<str>>,
        fleet: &Fleet,
    ) {
        let truth = &mut self.flows[index];
        let class = match (said, truth.owner) {
            (Some(s), Owner::Named(o)) if **s == *fleet.names[o as usize] => Class::Correct,
            (Some(_), Owner::Named(_) | Owner::External) => Class::Wrong,
            (None, Owner::External) => Class::Correct,
            (None, Owner::Named(_)) => Class::Unattributed,
        };
        truth.legacy[variant] = class;
    }

    /// Accepted flows emitted more than `bound_ms` after `sane_after(accepted_at)`, the
    /// first moment after their acceptance when no fault was active.
    pub fn late(&self, bound_ms: u64, sane_after: impl Fn(u64) -> u64) -> Option<Violation> {
        let mut count = 0;
        let mut first = None;
        for (i, t) in self.flows.iter().enumerate() {
            if !t.accepted || t.emitted == 0 {
                continue;
            }
            let deadline = sane_after(t.accepted_at_ms).saturating_add(bound_ms);
            if t.first_emitted_at_ms > deadline {
                count += 1;
                first.get_or_insert((i, t.first_emitted_at_ms - deadline));
            }
        }
        first.map(|(i, late_by_ms)| Violation::Late {
            count,
            first_flow_id: self.flow_id(i),
            late_by_ms,
            bound_ms,
        })
    }

    /// The local misattributions, if any, as one violation with their count.
    pub fn local_misattributed(&self) -> Option<Violation> {
        match self.first_local_misattributed.clone() {
            Some(Violation::LocalMisattributed {
                flow_id,
                local,
                said,
                truth,
                ..
            }) => Some(Violation::LocalMisattributed {
                count: self.local_misattributed,
                flow_id,
                local,
                said,
                truth,
            }),
            Some(other) => Some(other),
            None => None,
        }
    }

    /// Accepted flows never emitted.
    pub fn lost(&self) -> Option<Violation> {
        let mut count = 0;
        let mut first = None;
        for (i, t) in self.flows.iter().enumerate() {
            if t.accepted && t.emitted == 0 {
                count += 1;
                first.get_or_insert(i);
            }
        }
        first.map(|i| Violation::Lost {
            count,
            first_flow_id: self.flow_id(i),
        })
    }
}

fn describe(owner: Owner, fleet: &Fleet) -> String {
    match owner {
        Owner::Named(o) => fleet.names[o as usize].to_string(),
        Owner::External => "external".to_owned(),
    }
}

/// Dependencies of the gateway workloads (all workloads when none is a gateway): the
/// edges (caller, remote owner) each attributor reported, kept as they are reported.
#[derive(Clone, Debug, Default)]
pub struct Edges {
    pub truth: BTreeSet<(u32, u32)>,
    /// Tenure first, then each legacy attributor.
    pub reported: Vec<BTreeSet<(u32, u32)>>,
}

impl Edges {
    pub fn new(attributors: usize) -> Edges {
        Edges {
            truth: BTreeSet::new(),
            reported: vec![BTreeSet::new(); attributors],
        }
    }

    /// (reported, wrong) per attributor: a reported edge is wrong when the caller never
    /// truly called that owner.
    pub fn scores(&self) -> Vec<(u64, u64)> {
        self.reported
            .iter()
            .map(|r| {
                let wrong = r.iter().filter(|e| !self.truth.contains(e)).count();
                (r.len() as u64, wrong as u64)
            })
            .collect()
    }
}
