//! The attribution engine: ownership ranges, events, pending flows and their verdicts.

use std::collections::VecDeque;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use crate::config::{ConfigError, EngineConfig};
use crate::events::{EventJudgement, EventTable};
use crate::ip::IpKey;
use crate::pending::{Entry, PendingQueue};
use crate::ranges::{judge, History, Judgement, Overlap, Owner, RangeTable};
use crate::snapshot::{IpRanges, SegmentOwner, SegmentSnapshot};
use crate::table::prefetch;
use crate::time::SteadyClock;
use crate::time::{UnixMillis, Window};
use crate::workload::{InternError, Interner, WorkloadId};

/// A heartbeat, or the coverage implied by a flow's local side: workload `workload` has
/// held `ip` continuously from `since` until at least `until`, by its host's clock.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Claim {
    pub ip: IpAddr,
    pub workload: WorkloadId,
    pub since: UnixMillis,
    pub until: UnixMillis,
}

/// An assignment event for a non-workload IP, from an event feed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IpEvent {
    Assign {
        ip: IpAddr,
        owner: WorkloadId,
        at: UnixMillis,
    },
    Unassign {
        ip: IpAddr,
        at: UnixMillis,
    },
}

/// A flow to attribute: its remote IP, the time it spans by its host's clock, and whatever
/// the caller needs back with the verdict.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct FlowQuery<F> {
    pub remote: IpAddr,
    pub window: Window,
    pub payload: F,
}

/// Where an attribution came from.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum Source {
    /// The owner's own heartbeats.
    Heartbeat,
    /// The event feed for non-workload IPs.
    Event,
    /// The IP is in no region's prefixes.
    External,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Heartbeat, Source::Event, Source::External];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Heartbeat => "heartbeat",
            Source::Event => "event",
            Source::External => "external",
        }
    }
}

/// Why a flow went out unattributed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum Reason {
    /// No range covered the flow: a gap, or past the last claim, when the deadline came.
    NoOwner,
    /// The flow is within δ of a boundary between two owners.
    Ambiguous,
    /// The flow touches a conflict window: two workloads claimed the same time.
    Conflict,
    /// The flow reaches before the retained history.
    Expired,
    /// A limit was reached (pending flows, ranges, batch sizes).
    Overload,
    /// The remote IP's region had no live collector to route to.
    RegionUnreachable,
    /// The exporter's clock disagreed with the other exporters' by more than δ when it
    /// sent the flow: its times cannot be held against other hosts' heartbeats.
    ExporterClock,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::NoOwner,
        Reason::Ambiguous,
        Reason::Conflict,
        Reason::Expired,
        Reason::Overload,
        Reason::RegionUnreachable,
        Reason::ExporterClock,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoOwner => "no_owner",
            Reason::Ambiguous => "ambiguous",
            Reason::Conflict => "conflict",
            Reason::Expired => "expired",
            Reason::Overload => "overload",
            Reason::RegionUnreachable => "region_unreachable",
            Reason::ExporterClock => "exporter_clock",
        }
    }

    fn index(self) -> usize {
        match self {
            Reason::NoOwner => 0,
            Reason::Ambiguous => 1,
            Reason::Conflict => 2,
            Reason::Expired => 3,
            Reason::Overload => 4,
            Reason::RegionUnreachable => 5,
            Reason::ExporterClock => 6,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a flow's remote end was.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Attribution {
    Heartbeat(Arc<str>),
    Event(Arc<str>),
    External,
}

impl Attribution {
    pub fn source(&self) -> Source {
        match self {
            Attribution::Heartbeat(_) => Source::Heartbeat,
            Attribution::Event(_) => Source::Event,
            Attribution::External => Source::External,
        }
    }

    /// The workload, or `None` for an external IP.
    pub fn workload(&self) -> Option<&Arc<str>> {
        match self {
            Attribution::Heartbeat(w) | Attribution::Event(w) => Some(w),
            Attribution::External => None,
        }
    }
}

/// The final word on a flow.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Verdict {
    Attributed(Attribution),
    Unattributed(Reason),
}

/// A flow with its verdict.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Resolved<F> {
    pub payload: F,
    pub verdict: Verdict,
    /// How long the flow waited in the pending queue, by the engine's clock.
    pub waited_ms: u64,
}

/// Two workloads claimed overlapping time for one IP: a fact to record, not to resolve.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ConflictFound {
    pub ip: IpAddr,
    pub window: Window,
    pub existing: Arc<str>,
    pub claimant: Arc<str>,
}

/// What an engine call produced. Callers drain it after each call.
#[derive(Debug)]
pub struct Outputs<F> {
    pub resolved: Vec<Resolved<F>>,
    pub conflicts: Vec<ConflictFound>,
}

impl<F> Default for Outputs<F> {
    fn default() -> Self {
        Outputs {
            resolved: Vec::new(),
            conflicts: Vec::new(),
        }
    }
}

/// The answer to "who owned this IP during this window", right now.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Lookup {
    /// One owner covers the window widened by δ. `source` is heartbeat or event.
    Attributed {
        workload: WorkloadId,
        source: Source,
    },
    /// Not covered yet; a later claim may cover it. The reason is what it would be now.
    Pending(Reason),
    /// Never coverable: a later claim cannot change this answer.
    Unattributed(Reason),
}

/// A claim or event the engine refused. The engine's state did not change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClaimError {
    /// `since` is after `until`.
    #[error("claim for {ip} has since {since} after until {until}")]
    Inverted {
        ip: IpAddr,
        since: UnixMillis,
        until: UnixMillis,
    },
    /// The claim states a time later than `now + claim_future_max_ms`.
    #[error("claim for {ip} states time {at}, later than {latest} (now + claim_future_max_ms)")]
    FromFuture {
        ip: IpAddr,
        at: UnixMillis,
        latest: UnixMillis,
    },
    /// The claim is for an IP not yet tracked and `ips_max` IPs are tracked already.
    #[error("claim for {ip} refused: {ips_max} IPs tracked already (ips_max)")]
    TableFull { ip: IpAddr, ips_max: usize },
    /// The workload id was not issued by this engine, or was freed.
    #[error("unknown workload id {0:?}")]
    UnknownWorkload(WorkloadId),
}

/// What an accepted claim did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ClaimEffect {
    /// Merged into the IP's history.
    Applied,
    /// Entirely before retained history; nothing changed.
    Expired,
    /// Merged, and the IP's oldest segments were dropped to respect `ranges_per_ip_max`.
    Overflowed,
}

/// Counters the node exports as metrics. Monotonic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub claims_applied: u64,
    pub claims_expired: u64,
    pub claims_rejected: u64,
    pub events_applied: u64,
    pub conflicts_found: u64,
    pub range_overflows: u64,
    pub flows_submitted: u64,
    pub flows_pending: u64,
    /// Flows that waited to settle before their first lookup.
    pub flows_settled: u64,
    pub attributed_heartbeat: u64,
    pub attributed_event: u64,
    unattributed: [u64; Reason::ALL.len()],
}

impl EngineStats {
    /// Flows emitted unattributed with `reason`.
    pub fn unattributed(&self, reason: Reason) -> u64 {
        self.unattributed[reason.index()]
    }
}

/// Memory held by the ownership tables.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MemoryReport {
    pub ips: usize,
    pub segments: usize,
    /// Map allocations plus segment storage, in bytes.
    pub table_bytes: usize,
    pub event_ips: usize,
    pub events: usize,
    pub pending_flows: usize,
    pub workloads: usize,
}

impl MemoryReport {
    /// Table bytes per stored segment, map overhead included.
    pub fn bytes_per_range(&self) -> f64 {
        if self.segments == 0 {
            0.0
        } else {
            self.table_bytes as f64 / self.segments as f64
        }
    }
}

/// The attribution engine. `F` is the caller's payload carried by each flow.
///
/// Sans-io: every method that depends on time takes `now`, the caller's clock.
#[derive(Debug)]
pub struct Engine<F> {
    config: EngineConfig,
    interner: Interner,
    v4: RangeTable<u32>,
    v6: RangeTable<u128>,
    events: EventTable<IpKey>,
    watermark: UnixMillis,
    pending: PendingQueue<F>,
    /// Flows not looked up yet, in arrival order (see [`EngineConfig::settle_ms`]).
    settling: VecDeque<Settling<F>>,
    /// History before this instant is gone: `now − retention` at the latest call.
    horizon: UnixMillis,
    /// When the last sweep ran, in steady time.
    last_sweep: UnixMillis,
    /// What every wait is counted in: settling, pending deadlines, sweeps.
    steady: SteadyClock,
    overlaps: Vec<Overlap>,
    stats: EngineStats,
}

impl<F> Engine<F> {
    pub fn new(config: EngineConfig) -> Result<Engine<F>, ConfigError> {
        config.validate()?;
        Ok(Engine {
            interner: Interner::new(config.workloads_max.get(), config.hash_seed),
            v4: RangeTable::new(config.hash_seed),
            v6: RangeTable::new(config.hash_seed),
            events: EventTable::new(config.hash_seed),
            watermark: UnixMillis(0),
            pending: PendingQueue::new(config.pending_flows_max.get(), config.hash_seed),
            settling: VecDeque::new(),
            horizon: UnixMillis(0),
            last_sweep: UnixMillis(0),
            steady: SteadyClock::new(),
            overlaps: Vec::new(),
            stats: EngineStats::default(),
            config,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Interns a workload name. Ids stay valid while a range or event refers to them;
    /// intern again (cheap) for each batch rather than keeping ids across sweeps.
    pub fn intern(&mut self, name: &str) -> Result<WorkloadId, InternError> {
        self.interner.intern(name)
    }

    pub fn workload_name(&self, id: WorkloadId) -> Option<&Arc<str>> {
        self.interner.name(id)
    }

    /// Flows waiting for coverage, settling ones included.
    pub fn pending_len(&self) -> usize {
        self.pending.len() + self.settling.len()
    }

    /// Flows not looked up yet (see [`EngineConfig::settle_ms`]).
    pub fn settling_len(&self) -> usize {
        self.settling.len()
    }

    /// Takes every waiting flow out of the engine without a verdict, the pending ones
    /// (oldest deadline first), then the settling ones (in arrival order): for a node that
    /// leaves the cluster and hands its waiting flows to their next owner.
    pub fn take_pending(&mut self) -> Vec<F> {
        let mut flows = Vec::with_capacity(self.pending_len());
        while let Some(slot) = self.pending.next_due(UnixMillis::MAX) {
            match self.pending.remove(slot) {
                Some(entry) => flows.push(entry.payload),
                None => break,
            }
        }
        flows.extend(self.settling.drain(..).map(|s| s.flow.payload));
        flows
    }

    /// When the next waiting flow is due (a pending flow's deadline, or a settling flow's
    /// first lookup), by the wall clock of the latest call if it keeps its pace: the caller
    /// should call [`Engine::tick`] then.
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        let settling = self.settling.front().map(|s| s.ready);
        self.pending
            .next_deadline()
            .into_iter()
            .chain(settling)
            .min()
            .map(|at| self.steady.to_wall(at))
    }

    pub fn memory(&self) -> MemoryReport {
        MemoryReport {
            ips: self.v4.ips() + self.v6.ips(),
            segments: self.v4.segments() + self.v6.segments(),
            table_bytes: self.v4.bytes() + self.v6.bytes(),
            event_ips: self.events.ips(),
            events: self.events.events(),
            pending_flows: self.pending_len(),
            workloads: self.interner.len(),
        }
    }

    /// Takes the caller's `now`: moves the retention horizon (wall clock) and returns the
    /// steady time that waits are counted in.
    fn advance(&mut self, now: UnixMillis) -> UnixMillis {
        self.horizon = self.horizon.max(now.minus(self.config.retention_ms));
        self.steady.observe(now)
    }

    /// Merges a claim into its IP's history, then retries the flows waiting on that IP.
    pub fn apply_claim(
        &mut self,
        claim: Claim,
        now: UnixMillis,
        out: &mut Outputs<F>,
    ) -> Result<ClaimEffect, ClaimError> {
        if claim.since > claim.until {
            self.stats.claims_rejected += 1;
            return Err(ClaimError::Inverted {
                ip: claim.ip,
                since: claim.since,
                until: claim.until,
            });
        }
        let latest = now.plus(self.config.claim_future_max_ms);
        if claim.until > latest {
            self.stats.claims_rejected += 1;
            return Err(ClaimError::FromFuture {
                ip: claim.ip,
                at: claim.until,
                latest,
            });
        }
        if self.interner.name(claim.workload).is_none() {
            self.stats.claims_rejected += 1;
            return Err(ClaimError::UnknownWorkload(claim.workload));
        }
        let at = self.advance(now);
        if claim.until < self.horizon {
            self.stats.claims_expired += 1;
            return Ok(ClaimEffect::Expired);
        }
        let key = IpKey::new(claim.ip);
        if self.is_new_ip_past_limit(key) {
            self.stats.claims_rejected += 1;
            return Err(ClaimError::TableFull {
                ip: claim.ip,
                ips_max: self.config.ips_max.get(),
            });
        }
        let since = claim.since.max(self.horizon);
        let overflowed = self.insert(key, since, claim.until, Owner::Workload(claim.workload));
        self.report_overlaps(key, out);
        self.stats.claims_applied += 1;
        self.retry(key, at, out);
        Ok(if overflowed {
            ClaimEffect::Overflowed
        } else {
            ClaimEffect::Applied
        })
    }

    fn is_new_ip_past_limit(&self, key: IpKey) -> bool {
        let tracked = self.v4.ips() + self.v6.ips();
        tracked >= self.config.ips_max.get() && self.segments(key).0.is_empty()
    }

    fn insert(&mut self, key: IpKey, start: UnixMillis, end: UnixMillis, owner: Owner) -> bool {
        let max = self.config.ranges_per_ip_max.get();
        let outcome = match key {
            IpKey::V4(k) => self
                .v4
                .insert(k, start, end, owner, max, &mut self.overlaps),
            IpKey::V6(k) => self
                .v6
                .insert(k, start, end, owner, max, &mut self.overlaps),
        };
        if outcome.overflowed {
            self.stats.range_overflows += 1;
        }
        outcome.overflowed
    }

    fn report_overlaps(&mut self, key: IpKey, out: &mut Outputs<F>) {
        for overlap in self.overlaps.drain(..) {
            self.stats.conflicts_found += 1;
            let name = |id| {
                self.interner
                    .name(id)
                    .cloned()
                    .unwrap_or_else(|| Arc::from("(unknown)"))
            };
            out.conflicts.push(ConflictFound {
                ip: key.addr(),
                window: overlap.window,
                existing: name(overlap.existing),
                claimant: name(overlap.claimant),
            });
        }
    }

    /// Records an assignment event for a non-workload IP, then retries its waiting flows.
    pub fn apply_event(&mut self, event: IpEvent, now: UnixMillis, out: &mut Outputs<F>) {
        let (ip, at, owner) = match event {
            IpEvent::Assign { ip, owner, at } => (ip, at, Some(owner)),
            IpEvent::Unassign { ip, at } => (ip, at, None),
        };
        let steady = self.advance(now);
        let key = IpKey::new(ip);
        self.events
            .record(key, at, owner, self.config.events_per_ip_max.get());
        self.stats.events_applied += 1;
        self.retry(key, steady, out);
    }

    /// The event feed states that every event at or before `watermark` has been delivered.
    pub fn advance_event_watermark(
        &mut self,
        watermark: UnixMillis,
        now: UnixMillis,
        out: &mut Outputs<F>,
    ) {
        let at = self.advance(now);
        if watermark <= self.watermark {
            return;
        }
        self.watermark = watermark;
        // Retry only IPs that both have events and have waiting flows; walk the smaller set.
        let keys: Vec<IpKey> = if self.events.ips() <= self.pending.ip_count() {
            let pending = &self.pending;
            self.events
                .keys()
                .filter(|k| pending.has_ip(k))
                .copied()
                .collect()
        } else {
            let events = &self.events;
            self.pending
                .ips()
                .filter(|k| events.has(k))
                .copied()
                .collect()
        };
        for key in keys {
            self.retry(key, at, out);
        }
    }

    /// Attributes `flow` now if its remote IP's history covers it, or queues it (to settle
    /// first, when [`EngineConfig::settle_ms`] says it is too recent to be covered).
    pub fn submit(&mut self, flow: FlowQuery<F>, now: UnixMillis, out: &mut Outputs<F>) {
        let at = self.advance(now);
        self.stats.flows_submitted += 1;
        let Some(flow) = self.settle(flow, now, at, out) else {
            return;
        };
        let decision = self.decide(
            IpKey::new(flow.remote),
            flow.window.widened(self.config.skew_margin_ms),
        );
        self.dispatch(flow, decision, at, at, out);
    }

    /// [`Engine::submit`] for a whole batch, with the lookups grouped as in
    /// [`Engine::lookup_many`]: the way a collector takes an exporter's batch.
    pub fn submit_many(&mut self, flows: Vec<FlowQuery<F>>, now: UnixMillis, out: &mut Outputs<F>) {
        let at = self.advance(now);
        self.stats.flows_submitted += flows.len() as u64;
        let flows = if self.config.settle_ms == 0 {
            flows
        } else {
            // Nearly every flow settles: each moves once, into the queue, and the few
            // looked up at once are gathered apart.
            let mut now_due = Vec::new();
            for flow in flows {
                if let Some(flow) = self.settle(flow, now, at, out) {
                    now_due.push(flow);
                }
            }
            now_due
        };
        if flows.is_empty() {
            return;
        }
        let queries: Vec<(IpAddr, Window)> = flows.iter().map(|f| (f.remote, f.window)).collect();
        let mut decisions = Vec::with_capacity(queries.len());
        self.lookup_many(&queries, &mut decisions);
        for (flow, decision) in flows.into_iter().zip(decisions) {
            self.dispatch(flow, decision, at, at, out);
        }
    }

    /// Queues `flow` to settle when it ended too recently to be covered (it is counted
    /// and, past `pending_flows_max`, emitted as `overload`), else gives it back to be
    /// looked up now.
    ///
    /// It settles until `settle_ms` after its end, and at most `settle_ms` after now: an
    /// end in the future (a fast clock) waits no longer than a flow ending now, so the
    /// queue's arrival order is nearly the order of the times it is due, and a flow behind
    /// one due later waits at most `settle_ms` past its arrival. The wait is measured on
    /// the wall clock (`now`, against the flow's end) and then counted in steady time
    /// (`at`), so that a clock stepped back later cannot stretch it.
    fn settle(
        &mut self,
        flow: FlowQuery<F>,
        now: UnixMillis,
        at: UnixMillis,
        out: &mut Outputs<F>,
    ) -> Option<FlowQuery<F>> {
        let settle = self.config.settle_ms;
        if settle == 0 {
            return Some(flow);
        }
        let wait_ms = flow.window.end.plus(settle).since(now).min(settle);
        if wait_ms == 0 {
            return Some(flow);
        }
        let ready = at.plus(wait_ms);
        if self.pending_len() >= self.config.pending_flows_max.get() {
            self.emit_unattributed(flow.payload, Reason::Overload, 0, out);
            return None;
        }
        self.stats.flows_settled += 1;
        self.settling.push_back(Settling {
            ready,
            arrived: at,
            flow,
        });
        None
    }

    /// Looks up the settling flows whose time has come, as one grouped batch: attributed,
    /// unattributed, or on to the pending queue with the deadline of their arrival.
    fn release_settled(&mut self, at: UnixMillis, out: &mut Outputs<F>) {
        // From the front, in arrival order: a flow behind one due later waits for it (at
        // most `settle_ms` past its own arrival, see `settle`).
        let queries: Vec<(IpAddr, Window)> = self
            .settling
            .iter()
            .take_while(|s| s.ready <= at)
            .map(|s| (s.flow.remote, s.flow.window))
            .collect();
        if queries.is_empty() {
            return;
        }
        let mut decisions = Vec::with_capacity(queries.len());
        self.lookup_many(&queries, &mut decisions);
        // Each flow leaves the queue straight for its verdict or the pending queue.
        for decision in decisions {
            let Some(settled) = self.settling.pop_front() else {
                break;
            };
            self.dispatch(settled.flow, decision, settled.arrived, at, out);
        }
    }

    /// Emits `flow` with `decision`, or queues it when pending. `arrived` is when it was
    /// submitted: its wait and its deadline count from then. Both times are steady time.
    fn dispatch(
        &mut self,
        flow: FlowQuery<F>,
        decision: Lookup,
        arrived: UnixMillis,
        at: UnixMillis,
        out: &mut Outputs<F>,
    ) {
        let waited_ms = at.since(arrived);
        match decision {
            Lookup::Attributed { workload, source } => {
                self.emit_attributed(flow.payload, workload, source, waited_ms, out);
            }
            Lookup::Unattributed(reason) => {
                self.emit_unattributed(flow.payload, reason, waited_ms, out);
            }
            Lookup::Pending(_) => {
                let entry = Entry {
                    ip: IpKey::new(flow.remote),
                    window: flow.window.widened(self.config.skew_margin_ms),
                    submitted: arrived,
                    deadline: arrived.plus(self.config.pending_deadline_ms),
                    payload: flow.payload,
                };
                match self.pending.push(entry) {
                    Ok(()) => self.stats.flows_pending += 1,
                    Err(entry) => {
                        self.emit_unattributed(entry.payload, Reason::Overload, waited_ms, out);
                    }
                }
            }
        }
    }

    /// Who owned `ip` during `window` (widened by δ here), by what is known now.
    #[inline]
    pub fn lookup(&self, ip: IpAddr, window: Window) -> Lookup {
        self.decide(IpKey::new(ip), window.widened(self.config.skew_margin_ms))
    }

    /// Looks up many flows at once, in the order given, appending to `out`.
    ///
    /// Faster than [`Engine::lookup`] in a loop: the table is far larger than the CPU
    /// caches, and each lookup is a chain of dependent memory loads (the IP's table slot,
    /// then its older segments) followed by data-dependent branches. Done one at a time, a
    /// mispredicted branch waits for each chain in turn. Here the lookups go in groups, in
    /// three phases: hash every IP of a group and start loading its slot, with no load
    /// waited for, so the group's loads overlap; answer from the latest segment, which is
    /// enough for nearly every flow, and start loading the older segments of the rest; then,
    /// one group later, apply the full rules to the rest, on data that has had a whole
    /// group's time to arrive.
    #[inline]
    pub fn lookup_many(&self, queries: &[(IpAddr, Window)], out: &mut Vec<Lookup>) {
        let margin = self.config.skew_margin_ms;
        out.reserve(queries.len());
        // The group being looked up and the one before it, waiting for phase three. They
        // take turns, so neither is ever moved.
        let mut deferred = [Deferred::default(), Deferred::default()];
        for (number, group) in queries.chunks(LOOKUP_GROUP).enumerate() {
            // Phase one.
            let mut homes = [0usize; LOOKUP_GROUP];
            for (home, (ip, _)) in homes.iter_mut().zip(group) {
                *home = match IpKey::new(*ip) {
                    IpKey::V4(k) => self.v4.probe(&k),
                    IpKey::V6(k) => self.v6.probe(&k),
                };
            }
            // Phase two: answers straight into `out`; the others keep a placeholder.
            let base = out.len();
            out.resize(base + group.len(), Lookup::Pending(Reason::NoOwner));
            let [even, odd] = &mut deferred;
            let (current, previous) = if number % 2 == 0 {
                (even, odd)
            } else {
                (odd, even)
            };
            current.base = base;
            current.group = group;
            current.len = 0;
            for (i, ((answer, (ip, window)), home)) in
                out[base..].iter_mut().zip(group).zip(&homes).enumerate()
            {
                let key = IpKey::new(*ip);
                let entry = match key {
                    IpKey::V4(k) => self.v4.entry_from(*home, &k),
                    IpKey::V6(k) => self.v6.entry_from(*home, &k),
                };
                if let Some(entry) = entry {
                    if let Some(workload) = entry.latest().covering_workload(window.widened(margin))
                    {
                        *answer = Lookup::Attributed {
                            workload,
                            source: Source::Heartbeat,
                        };
                        continue;
                    }
                    prefetch(self.history_of(key, *entry).older().as_ptr());
                }
                current.push(i, entry);
            }
            // Phase three, for the previous group.
            self.finish(previous, out);
        }
        let last = queries.chunks(LOOKUP_GROUP).len().saturating_sub(1);
        self.finish(&deferred[last % 2], out);
    }

    /// Phase three of [`Engine::lookup_many`]: the full rules for a group's lookups that
    /// the latest segment did not answer.
    fn finish(&self, deferred: &Deferred<'_, '_>, out: &mut [Lookup]) {
        let margin = self.config.skew_margin_ms;
        for (&i, entry) in deferred.rest[..deferred.len].iter().zip(&deferred.entries) {
            let i = usize::from(i);
            let Some(&(ip, window)) = deferred.group.get(i) else {
                continue;
            };
            let key = IpKey::new(ip);
            let history = entry.map_or_else(History::default, |e| self.history_of(key, *e));
            out[deferred.base + i] = self.decide_with(key, history, window.widened(margin));
        }
    }

    /// The whole history behind a map entry of `key`'s table.
    #[inline]
    fn history_of(&self, key: IpKey, entry: crate::ranges::Entry) -> History<'_> {
        match key {
            IpKey::V4(_) => self.v4.history(entry),
            IpKey::V6(_) => self.v6.history(entry),
        }
    }

    fn segments(&self, key: IpKey) -> (History<'_>, Option<UnixMillis>) {
        match key {
            IpKey::V4(k) => (self.v4.get(&k), self.v4.floor(&k)),
            IpKey::V6(k) => (self.v6.get(&k), self.v6.floor(&k)),
        }
    }

    /// The rules of docs/design.md, on a window already widened by δ.
    #[inline]
    fn decide(&self, key: IpKey, window: Window) -> Lookup {
        self.decide_with(key, self.segments(key).0, window)
    }

    #[inline]
    fn floor(&self, key: IpKey) -> Option<UnixMillis> {
        match key {
            IpKey::V4(k) => self.v4.floor(&k),
            IpKey::V6(k) => self.v6.floor(&k),
        }
    }

    #[inline]
    fn decide_with(&self, key: IpKey, segments: History<'_>, window: Window) -> Lookup {
        match judge(segments, window) {
            Judgement::Covered(workload) => Lookup::Attributed {
                workload,
                source: Source::Heartbeat,
            },
            Judgement::Conflict => Lookup::Unattributed(Reason::Conflict),
            Judgement::Ambiguous => Lookup::Unattributed(Reason::Ambiguous),
            Judgement::Gap => self.not_covered(key, window),
            // Events speak only where heartbeats say nothing: they never override them.
            Judgement::Empty => match self.events.judge(&key, window, self.watermark) {
                EventJudgement::Covered(workload) => Lookup::Attributed {
                    workload,
                    source: Source::Event,
                },
                EventJudgement::NotCovered => self.not_covered(key, window),
            },
        }
    }

    /// The answer for a window that nothing covers (yet): pending, or expired when it
    /// reaches before the retained history.
    fn not_covered(&self, key: IpKey, window: Window) -> Lookup {
        let floor = self.floor(key);
        if window.start < self.horizon.max(floor.unwrap_or(UnixMillis(0))) {
            Lookup::Unattributed(Reason::Expired)
        } else {
            Lookup::Pending(Reason::NoOwner)
        }
    }

    /// `at` is steady time (see [`SteadyClock`]).
    fn retry(&mut self, key: IpKey, at: UnixMillis, out: &mut Outputs<F>) {
        if !self.pending.has_ip(&key) {
            return;
        }
        let mut cursor = self.pending.first_for(&key);
        while let Some(slot) = cursor {
            // Taken before `slot` may leave the list. The flows of a list lie anywhere in
            // the queue: the next one loads while this one is decided.
            cursor = self.pending.next_for(slot);
            if let Some(next) = cursor {
                self.pending.prefetch(next);
            }
            let Some(entry) = self.pending.get(slot) else {
                continue;
            };
            let decision = self.decide(key, entry.window);
            if matches!(decision, Lookup::Pending(_)) {
                continue;
            }
            let Some(entry) = self.pending.remove(slot) else {
                continue;
            };
            self.resolve(entry, decision, at, out);
        }
    }

    fn resolve(&mut self, entry: Entry<F>, decision: Lookup, at: UnixMillis, out: &mut Outputs<F>) {
        let waited_ms = at.since(entry.submitted);
        match decision {
            Lookup::Attributed { workload, source } => {
                self.emit_attributed(entry.payload, workload, source, waited_ms, out);
            }
            Lookup::Pending(reason) | Lookup::Unattributed(reason) => {
                self.emit_unattributed(entry.payload, reason, waited_ms, out);
            }
        }
    }

    fn emit_attributed(
        &mut self,
        payload: F,
        workload: WorkloadId,
        source: Source,
        waited_ms: u64,
        out: &mut Outputs<F>,
    ) {
        let Some(name) = self.interner.name(workload).cloned() else {
            // A segment refers to a freed id: the sweep's marking is broken.
            debug_assert!(false, "segment refers to freed workload id {workload:?}");
            self.emit_unattributed(payload, Reason::NoOwner, waited_ms, out);
            return;
        };
        let attribution = match source {
            Source::Heartbeat => {
                self.stats.attributed_heartbeat += 1;
                Attribution::Heartbeat(name)
            }
            Source::Event => {
                self.stats.attributed_event += 1;
                Attribution::Event(name)
            }
            Source::External => Attribution::External,
        };
        out.resolved.push(Resolved {
            payload,
            verdict: Verdict::Attributed(attribution),
            waited_ms,
        });
    }

    fn emit_unattributed(
        &mut self,
        payload: F,
        reason: Reason,
        waited_ms: u64,
        out: &mut Outputs<F>,
    ) {
        self.stats.unattributed[reason.index()] += 1;
        out.resolved.push(Resolved {
            payload,
            verdict: Verdict::Unattributed(reason),
            waited_ms,
        });
    }

    /// Emits flows whose deadline has come, unattributed with the reason their IP's history
    /// gives now, and applies retention when a sweep is due.
    pub fn tick(&mut self, now: UnixMillis, out: &mut Outputs<F>) {
        let at = self.advance(now);
        self.release_settled(at, out);
        while let Some(slot) = self.pending.next_due(at) {
            let Some(entry) = self.pending.remove(slot) else {
                break;
            };
            let decision = self.decide(entry.ip, entry.window);
            self.resolve(entry, decision, at, out);
        }
        if at.since(self.last_sweep) >= self.config.sweep_interval_ms {
            self.sweep(at);
        }
    }

    /// Drops history before the horizon and frees workload names no range refers to.
    fn sweep(&mut self, at: UnixMillis) {
        self.last_sweep = at;
        self.v4.expire(self.horizon);
        self.v6.expire(self.horizon);
        self.events.expire(self.horizon);
        let mut live = vec![false; self.interner.capacity_ids()];
        let mut mark = |id: WorkloadId| {
            if let Some(slot) = live.get_mut(id.0 as usize) {
                *slot = true;
            }
        };
        let owners_v4 = self
            .v4
            .iter()
            .flat_map(|(_, s)| s.iter().map(|s| s.owner()));
        let owners_v6 = self
            .v6
            .iter()
            .flat_map(|(_, s)| s.iter().map(|s| s.owner()));
        for owner in owners_v4.chain(owners_v6) {
            if let Owner::Workload(id) = owner {
                mark(id);
            }
        }
        for id in self.events.owners() {
            mark(id);
        }
        self.interner.retain(&live);
    }

    /// The retained history of `ip`, for the HTTP API and for handoff.
    pub fn history(&self, ip: IpAddr) -> IpRanges {
        let key = IpKey::new(ip);
        let (segments, floor) = self.segments(key);
        self.snapshot(key, segments, floor)
    }

    fn snapshot(&self, key: IpKey, segments: History<'_>, floor: Option<UnixMillis>) -> IpRanges {
        IpRanges {
            ip: key.addr(),
            floor,
            segments: segments
                .iter()
                .map(|s| SegmentSnapshot {
                    owner: match s.owner() {
                        Owner::Workload(id) => SegmentOwner::Workload(
                            self.interner
                                .name(id)
                                .map(|n| n.to_string())
                                .unwrap_or_default(),
                        ),
                        Owner::Conflict => SegmentOwner::Conflict,
                    },
                    start: s.start(),
                    end: s.end(),
                })
                .collect(),
        }
    }

    /// The histories of every IP for which `wanted` is true (handoff of a ring span).
    pub fn export(&self, mut wanted: impl FnMut(IpAddr) -> bool) -> Vec<IpRanges> {
        let mut all = Vec::new();
        for (k, segments) in self.v4.iter() {
            let key = IpKey::V4(*k);
            if wanted(key.addr()) {
                all.push(self.snapshot(key, segments, self.v4.floor(k)));
            }
        }
        for (k, segments) in self.v6.iter() {
            let key = IpKey::V6(*k);
            if wanted(key.addr()) {
                all.push(self.snapshot(key, segments, self.v6.floor(k)));
            }
        }
        // Hash-map order must not reach the wire: sort by IP.
        all.sort_by_key(|r| IpKey::new(r.ip));
        all
    }

    /// Merges a history received in a handoff, by the same rules as claims: it adds
    /// coverage where nothing was known, and conflicts wherever it disagrees.
    pub fn import(
        &mut self,
        ranges: &IpRanges,
        now: UnixMillis,
        out: &mut Outputs<F>,
    ) -> Result<(), InternError> {
        let at = self.advance(now);
        let key = IpKey::new(ranges.ip);
        if self.is_new_ip_past_limit(key) && !ranges.segments.is_empty() {
            self.stats.claims_rejected += 1;
            return Ok(());
        }
        for segment in &ranges.segments {
            if segment.end < self.horizon || segment.start > segment.end {
                continue;
            }
            let start = segment.start.max(self.horizon);
            let end = segment.end.min(now.plus(self.config.claim_future_max_ms));
            if start > end {
                continue;
            }
            let owner = match &segment.owner {
                SegmentOwner::Workload(name) => Owner::Workload(self.interner.intern(name)?),
                SegmentOwner::Conflict => Owner::Conflict,
            };
            self.insert(key, start, end, owner);
            self.report_overlaps(key, out);
        }
        self.retry(key, at, out);
        Ok(())
    }
}

/// Lookups per group in [`Engine::lookup_many`]: enough to keep the loads of a group in
/// flight together, few enough that a group's entries stay in the first-level cache.
const LOOKUP_GROUP: usize = 32;

/// A flow waiting to settle: looked up first at `ready`.
#[derive(Debug)]
struct Settling<F> {
    ready: UnixMillis,
    arrived: UnixMillis,
    flow: FlowQuery<F>,
}

/// A group of [`Engine::lookup_many`] waiting for phase three: the lookups (indices into
/// `group`) that the latest segment did not answer, whose older segments are loading.
#[derive(Default)]
struct Deferred<'e, 'q> {
    /// Where the group's answers start in `out`.
    base: usize,
    group: &'q [(IpAddr, Window)],
    /// The map entries of the lookups in `rest`, in the same order.
    entries: [Option<&'e crate::ranges::Entry>; LOOKUP_GROUP],
    rest: [u8; LOOKUP_GROUP],
    /// How many of `rest` and `entries` are used: phase three is finished with them once
    /// this group's turn comes again, so they are overwritten rather than cleared.
    len: usize,
}

impl<'e> Deferred<'e, '_> {
    /// Defers the `i`th lookup of the group, whose map entry is `entry`.
    #[inline]
    fn push(&mut self, i: usize, entry: Option<&'e crate::ranges::Entry>) {
        // At most LOOKUP_GROUP lookups per group, so `len` and `i` stay below 32.
        if let (Some(slot), Some(index)) =
            (self.entries.get_mut(self.len), self.rest.get_mut(self.len))
        {
            *slot = entry;
            *index = i as u8;
            self.len += 1;
        }
    }
}
