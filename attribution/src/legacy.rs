//! The legacy event-only attributor: the method tenure replaces, kept as the baseline.
//!
//! It is what Netflix's FlowCollector did before heartbeats: consume a stream of IP
//! assignment and unassignment events, keep an in-memory map IP → current owner, and
//! attribute each flow's remote IP by that map, optionally after holding flows back (Netflix
//! held them 15 minutes) so that late events have a chance to arrive. It answers "who owns
//! this IP *now*?", not "who owned it *then*?".
//!
//! It is implemented as well as that method allows, not as a strawman: events carry their
//! own time and an older event that arrives after a newer one does not overwrite it (last
//! writer wins by event time), duplicates are harmless, and unassignments clear the map.
//! What it cannot do is know that a flow happened before an assignment it already applied,
//! or after an unassignment it has not yet received.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;

use crate::ip::{new_map, IpKey, Map};
use crate::time::UnixMillis;

/// An event as the legacy attributor consumes it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum LegacyEvent {
    Assign {
        ip: IpAddr,
        owner: Arc<str>,
        at: UnixMillis,
    },
    Unassign {
        ip: IpAddr,
        at: UnixMillis,
    },
}

/// Configuration of the legacy attributor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LegacyConfig {
    /// How long each flow is held before it is attributed. Netflix used 15 minutes.
    pub hold_back_ms: u64,
    /// Flows held at once; past it a flow is attributed at once, and counted.
    pub held_flows_max: usize,
}

impl Default for LegacyConfig {
    fn default() -> Self {
        LegacyConfig {
            hold_back_ms: 0,
            held_flows_max: 1_000_000,
        }
    }
}

/// The event-only attributor. `F` is the caller's payload carried by each flow.
#[derive(Debug)]
pub struct LegacyAttributor<F> {
    config: LegacyConfig,
    /// IP → (owner, or none after an unassignment; time of the event that set it).
    owners: Map<IpKey, (Option<Arc<str>>, UnixMillis)>,
    held: VecDeque<(UnixMillis, IpKey, F)>,
    held_overflows: u64,
}

impl<F> LegacyAttributor<F> {
    pub fn new(config: LegacyConfig) -> LegacyAttributor<F> {
        LegacyAttributor {
            config,
            owners: new_map(crate::DEFAULT_HASH_SEED),
            held: VecDeque::new(),
            held_overflows: 0,
        }
    }

    /// Applies an event as it arrives.
    pub fn apply(&mut self, event: &LegacyEvent) {
        let (ip, owner, at) = match event {
            LegacyEvent::Assign { ip, owner, at } => (ip, Some(owner.clone()), *at),
            LegacyEvent::Unassign { ip, at } => (ip, None, *at),
        };
        let slot = self.owners.entry(IpKey::new(*ip)).or_insert((None, at));
        if at >= slot.1 {
            *slot = (owner, at);
        }
    }

    /// Who the map says owns `ip` now.
    pub fn owner_now(&self, ip: IpAddr) -> Option<&Arc<str>> {
        self.owners
            .get(&IpKey::new(ip))
            .and_then(|(owner, _)| owner.as_ref())
    }

    /// Takes a flow with remote IP `remote` arriving at `now`. With no hold-back it is
    /// attributed at once into `out`; otherwise it waits for [`LegacyAttributor::tick`].
    pub fn submit(
        &mut self,
        remote: IpAddr,
        payload: F,
        now: UnixMillis,
        out: &mut Vec<(F, Option<Arc<str>>)>,
    ) {
        if self.config.hold_back_ms == 0 || self.held.len() >= self.config.held_flows_max {
            if self.config.hold_back_ms != 0 {
                self.held_overflows += 1;
            }
            out.push((payload, self.owner_now(remote).cloned()));
            return;
        }
        let release = now.plus(self.config.hold_back_ms);
        self.held.push_back((release, IpKey::new(remote), payload));
    }

    /// Attributes the held flows whose hold-back has passed, by the map as it is now.
    pub fn tick(&mut self, now: UnixMillis, out: &mut Vec<(F, Option<Arc<str>>)>) {
        while self
            .held
            .front()
            .is_some_and(|(release, _, _)| *release <= now)
        {
            let Some((_, key, payload)) = self.held.pop_front() else {
                break;
            };
            out.push((payload, self.owner_now(key.addr()).cloned()));
        }
    }

    /// Attributes every held flow now (end of a run).
    pub fn flush(&mut self, out: &mut Vec<(F, Option<Arc<str>>)>) {
        while let Some((_, key, payload)) = self.held.pop_front() {
            out.push((payload, self.owner_now(key.addr()).cloned()));
        }
    }

    pub fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Flows attributed early because the hold-back buffer was full.
    pub fn held_overflows(&self) -> u64 {
        self.held_overflows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip() -> IpAddr {
        "10.0.0.1".parse().unwrap()
    }

    #[test]
    fn a_delayed_reassignment_misattributes_as_the_method_does() {
        let mut legacy = LegacyAttributor::new(LegacyConfig::default());
        let mut out = Vec::new();
        legacy.apply(&LegacyEvent::Assign {
            ip: ip(),
            owner: "x".into(),
            at: UnixMillis(0),
        });
        // The IP moved to y at 100, but that event is still in flight at 150.
        legacy.submit(ip(), 1, UnixMillis(150), &mut out);
        assert_eq!(out[0].1.as_deref(), Some("x"));
    }

    #[test]
    fn hold_back_waits_for_late_events_and_old_events_do_not_overwrite() {
        let config = LegacyConfig {
            hold_back_ms: 1_000,
            ..LegacyConfig::default()
        };
        let mut legacy = LegacyAttributor::new(config);
        let mut out = Vec::new();
        legacy.apply(&LegacyEvent::Assign {
            ip: ip(),
            owner: "x".into(),
            at: UnixMillis(0),
        });
        legacy.submit(ip(), 1, UnixMillis(150), &mut out);
        assert!(out.is_empty());
        legacy.apply(&LegacyEvent::Assign {
            ip: ip(),
            owner: "y".into(),
            at: UnixMillis(100),
        });
        legacy.apply(&LegacyEvent::Unassign {
            ip: ip(),
            at: UnixMillis(50),
        }); // stale
        legacy.tick(UnixMillis(1_150), &mut out);
        assert_eq!(out[0].1.as_deref(), Some("y"));
    }
}
