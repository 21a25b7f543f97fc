//! The node's core: a sans-io state machine composing the attribution engine with the
//! cluster layer (membership, ring, routing, handoff).
//!
//! It never reads a clock, never touches a socket, never spawns a task and draws no OS
//! randomness: every method takes `now` (Unix ms, the caller's clock) and appends
//! [`Output`]s to a vector the caller then acts on. The tokio shell (`crate::shell`) and the
//! simulator drive the very same core.
//!
//! Inputs, one method each:
//! - [`NodeCore::start`]: join the cluster through the seeds.
//! - [`NodeCore::handle_message`]: a decoded data-plane message from an exporter or a peer
//!   (flow batches, claim batches, event batches, range requests and snapshots, acks).
//! - [`NodeCore::handle_datagram`]: an opened gossip datagram.
//! - [`NodeCore::handle_timer`]: a membership timer set by an earlier [`Output::Timer`].
//! - [`NodeCore::handle_events`]: IP events from the HTTP event feed.
//! - [`NodeCore::tick`]: time passed. Call it every [`TICK_INTERVAL_MS`] (and at
//!   [`NodeCore::next_deadline`] when sooner): deadlines of pending flows, handoff pulls,
//!   the flows gathered for peers since the last tick, retries of unacknowledged
//!   forwards.
//! - [`NodeCore::leave`]: graceful shutdown: leave both pools and hand pending flows to
//!   the next owners (or emit them when there is none).
//!
//! Outputs: frames for a peer or for the connection a message came on, gossip datagrams,
//! timers, attributed flows for the sinks, journal operations, and notices for logs and
//! metrics.
//!
//! # The journal: no accepted flow is lost
//!
//! A collector acknowledges a flow batch only once the flows are on disk, so that a
//! `kill -9` loses nothing an exporter (or a peer) was told is safe. The core does no IO;
//! it speaks through [`Output::Journal`] and two inputs:
//!
//! - Every flow batch accepted from an exporter or a peer with at least one flow yields
//!   [`JournalOp::Append`] `{ id, flows }` *before* any output that emits or forwards
//!   those flows. Ids grow by one per append.
//! - The batch's `Accepted` ack is **withheld** until the caller reports, with
//!   [`NodeCore::journal_synced`]`(upto_id)`, that every append up to `upto_id` is durable
//!   (group commit: one fsync covers many appends). Refusals (`busy`, `rejected`), claim
//!   and event batches are acknowledged at once: they carry nothing to lose.
//! - Each journaled flow carries its append id ([`JournaledFlow`]) wherever it waits
//!   (pending, held for handoff, forwarded). It is *settled* when it is emitted (an
//!   [`Output::Emit`], whatever the verdict) or when the peer it was forwarded to
//!   acknowledges it (the peer acks only after its own journal holds it). When every flow
//!   of an append is settled, [`JournalOp::Release`] names it, after the emits that settled
//!   it. The caller must make those emits durable before it makes the release durable.
//! - After a restart, [`NodeCore::recover`] takes the unreleased appends and routes their
//!   flows again like new ones. Emission is therefore **at least once**: a flow emitted
//!   before the crash whose release did not reach the disk comes out again, with the same
//!   `flow_id`, and so may a flow forwarded to a peer that took it before our release.
//!
//! Invariants: an ack for a batch never precedes the sync of its append; an append is
//! released only when none of its flows can still be lost by this node; ids issued after
//! [`NodeCore::recover`] are above every recovered id (a journal that still holds
//! released appends passes its largest id as an entry with no flows, so that no id it
//! holds is issued again).
//!
//! Routing: a flow goes to an owner of its *remote* IP: kept here when this node is one of
//! the R owners (each holds the IP's whole history), else sent to the primary (forwarded
//! across regions once; `external` attributed at once; an unreachable region gives
//! `region_unreachable`, never a drop); claims go to the R owners of their IP; a flow
//! whose IP is on a span that handoff has not completed waits here until it is ready.
//! Flows for a peer are gathered until the next tick (one batch per exporter and peer, at
//! most a tick late) rather than sent as a slice of each exporter batch: a frame, its ack
//! and their journal writes cost far more than the flows in it; a membership change
//! routes the gathered flows again.

mod admission;
pub mod clocks;
pub mod entitlement;
mod flow;
mod journal;
mod recent;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;

use admission::Admission;
pub use admission::{
    AdmissionConfig, AdmissionStats, RefusalTally, Rejection, REFUSAL_LOG_INTERVAL_MS,
};
use clocks::{ClockVerdict, ExporterClocks};
pub use entitlement::{Entitlement, Entitlements};
use flow::{DictionaryBuilder, Names};
pub use flow::{EmittedFlow, FlowRecord, Local};
use ipnet::IpNet;
use journal::Ledger;
pub use journal::{JournalOp, JournaledFlow};
use recent::Recent;
pub use recent::RECENT_FLOWS_MAX;
use tenure_attribution::{
    Attribution, Claim, ConflictFound, Engine, EngineConfig, IpEvent, IpRanges, Locate, Lookup,
    Reason, RegionMap, SegmentOwner, SegmentSnapshot, SteadyClock, UnixMillis, Verdict, Window,
};
use tenure_gossip::directory::RegionRecord;
use tenure_gossip::handoff::{Handoff, HandoffConfig, Pull, Readiness};
use tenure_gossip::identity::NodeIdentity;
use tenure_gossip::membership::{self, Membership, MembershipConfig, Pool};
use tenure_gossip::ring::{point_of, Ring, RingConfig, Span};
use tenure_gossip::route::{route_claim, route_flow, Origin, Route, RouteContext};
use tenure_gossip::wire::{self, AckStatus, LocalEnd, Message, RejectReason};

use crate::report::Chain;

/// How often the caller should call [`NodeCore::tick`], in milliseconds.
pub const TICK_INTERVAL_MS: u64 = 100;

/// The most times a flow batch may be forwarded between collectors: one cross-region hop
/// plus a few re-routes inside a region while rings disagree.
pub const HOPS_MAX: u8 = 4;

/// IPs per range snapshot frame: at 64 ranges per IP, well under the 4 MiB frame limit.
pub const SNAPSHOT_IPS_PER_FRAME_MAX: usize = 512;

/// Flows per forwarded batch (the wire's default limit is 16,384).
pub const FORWARD_FLOWS_PER_BATCH_MAX: usize = 4_096;

/// Events per forwarded event batch.
pub const FORWARD_EVENTS_PER_BATCH_MAX: usize = 4_096;

/// Claims per forwarded claim batch (the wire's default limit is 4,096).
pub const FORWARD_CLAIMS_PER_BATCH_MAX: usize = 4_096;

/// Set in the `batch_id` of event batches a collector relays to the other owners, so that
/// the receiver applies them without relaying them again. An event feed sending over the
/// data plane must leave it clear.
pub const RELAYED_BATCH_BIT: u64 = 1 << 63;

/// Identifies a connection of the shell (or the simulator): where a reply goes.
pub type ConnId = u64;

/// Who sealed a data-plane message, as the transport authenticated it: the key that opened
/// the frame says whether an exporter or a collector sent it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Sender {
    /// Opened with the shared exporter key: only fresh flow batches (`hops == 0`) are
    /// allowed, and nothing proves which exporter sent them.
    Exporter,
    /// Opened with the credential of exporter `0` (a key bound to it in the registry):
    /// only fresh flow batches, which count as that exporter's whatever their
    /// `exporter_id` says, and whose claims must lie within its entitlement.
    ProvenExporter(u64),
    /// Opened with the cluster key: any message.
    Collector,
}

/// Where a frame goes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Dest {
    /// Back on the connection the message came in on (acks, range snapshots).
    Conn(ConnId),
    /// To a peer collector's data address.
    Peer {
        node_id: String,
        region: String,
        data_addr: SocketAddr,
    },
}

impl Dest {
    fn peer(member: &NodeIdentity) -> Dest {
        Dest::Peer {
            node_id: member.node_id().to_owned(),
            region: member.region().to_owned(),
            data_addr: member.data_addr(),
        }
    }
}

/// Something that happened in the cluster, for logs and metrics.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Notice {
    MemberUp {
        node_id: String,
        region: String,
        pool: Pool,
    },
    MemberDown {
        node_id: String,
        region: String,
        pool: Pool,
    },
    RingChanged {
        members: usize,
        pending_spans: usize,
    },
    RegionUpdated {
        region: String,
        version: u64,
    },
    Conflict(ConflictFound),
    /// A claim or event was refused (engine limits, bad names) or had nowhere to go.
    ClaimDropped {
        ip: IpAddr,
        why: String,
    },
    /// Our identity must be renewed by a restart.
    Defunct,
}

/// What the caller must do after an input.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Output {
    /// Encode, seal and send `message` as one data-plane frame.
    Frame { to: Dest, message: Message },
    /// Seal and send a gossip datagram.
    Datagram { to: SocketAddr, bytes: Vec<u8> },
    /// Call [`NodeCore::handle_timer`] with `timer` after `after_ms`.
    Timer {
        after_ms: u64,
        timer: membership::Timer,
    },
    /// A flow with its verdict, for the sinks.
    Emit(EmittedFlow),
    /// For logs and metrics.
    Notice(Notice),
    /// Write to (or release from) the journal; see the module documentation.
    Journal(JournalOp),
}

/// Errors building a core. Nothing was built.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("engine configuration")]
    Engine(#[from] tenure_attribution::ConfigError),
    #[error("region map")]
    Region(#[from] tenure_attribution::RegionError),
    #[error("region record")]
    Record(#[from] tenure_gossip::directory::DirectoryError),
}

/// How a core is set up. Every node of a region must agree on `ring`.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub identity: NodeIdentity,
    /// Gossip addresses to join through (any region).
    pub seeds: Vec<SocketAddr>,
    /// Seeds membership's random choices; one seed, one run.
    pub rng_seed: u64,
    /// About how many collectors the region and the fleet have (tunes SWIM timeouts).
    pub region_size_hint: NonZeroU32,
    pub fleet_size_hint: NonZeroU32,
    /// The prefixes our region serves, published to the cluster with `region_version`.
    pub region_prefixes: Vec<IpNet>,
    pub region_version: u64,
    /// Prefixes of every region known from configuration, so that routing is right before
    /// the gossiped directory arrives. Gossiped records are merged over them.
    pub static_regions: Vec<(IpNet, String)>,
    pub engine: EngineConfig,
    pub ring: RingConfig,
    pub handoff: HandoffConfig,
    /// How long a forwarded batch may go unacknowledged before its flows are routed again.
    pub forward_ack_timeout_ms: u64,
    /// Flows held while their span's handoff completes; past it: `overload`.
    pub held_flows_max: usize,
    /// Forwarded flows not yet acknowledged; past it exporters are told `busy`.
    pub inflight_flows_max: usize,
    /// Pending plus held plus in-flight flows above which exporters are told `busy`.
    pub busy_flows_threshold: usize,
    /// The delay a `busy` ack asks for, in ms.
    pub busy_retry_after_ms: u64,
}

/// A forwarded batch awaiting its ack.
#[derive(Debug)]
struct Inflight {
    to: Dest,
    node_id: String,
    /// Steady time (see [`SteadyClock`]): the ack timeout counts from here.
    sent_at: UnixMillis,
    flows: Vec<JournaledFlow>,
}

/// A range request we sent, awaiting its snapshots.
#[derive(Debug)]
struct Request {
    spans: Vec<Span>,
}

/// Counters of the core, monotonic, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub batches_accepted: u64,
    pub batches_busy: u64,
    pub batches_rejected: u64,
    pub flows_received: u64,
    pub flows_forwarded: u64,
    pub flows_rerouted: u64,
    pub claims_received: u64,
    pub claims_dropped: u64,
    pub events_received: u64,
    pub snapshots_sent: u64,
    pub snapshots_merged: u64,
    /// Journal appends issued, and flows replayed from the journal by
    /// [`NodeCore::recover`].
    pub journal_appends: u64,
    pub flows_recovered: u64,
    /// Flows in forwarded batches already journaled here (a peer's re-sent copies), not
    /// taken again.
    pub flows_already_held: u64,
    /// Exporter batches whose `sent_ms` was more than δ off the fleet's: claims refused,
    /// flows unattributed (`exporter_clock`).
    pub batches_clock_off: u64,
}

/// The node's core. See the module documentation.
#[derive(Debug)]
pub struct NodeCore {
    config: CoreConfig,
    region: String,
    engine: Engine<JournaledFlow>,
    membership: Membership,
    handoff: Handoff,
    ring: Ring,
    remote_rings: BTreeMap<String, Ring>,
    regions: RegionMap,
    held: VecDeque<JournaledFlow>,
    inflight: BTreeMap<u64, Inflight>,
    inflight_flows: usize,
    /// Flows routed to peers and not sent yet: gathered per peer until the next tick (or
    /// a full batch), so that a peer gets a few large batches instead of a slice of every
    /// exporter batch; frames, not flows, are what forwarding costs most.
    outbox: Vec<(Dest, String, Vec<JournaledFlow>)>,
    requests: BTreeMap<u64, Request>,
    next_id: u64,
    left: bool,
    stats: CoreStats,
    journal: Ledger,
    /// Flows journaled lately, to drop copies that peers re-send.
    recent: Recent,
    /// Workload and region names of incoming batches, shared across batches.
    names: Names,
    scratch: tenure_attribution::Outputs<JournaledFlow>,
    admission: Admission,
    /// What ack timeouts and the exporters' token buckets count in: a wall clock stepped
    /// back must not hold forwarded flows, nor refuse exporters, for the length of the
    /// step. The engine and the handoff keep their own.
    steady: SteadyClock,
    /// Exporters' clocks against the fleet's.
    clocks: ExporterClocks,
}

impl NodeCore {
    /// A core that has joined nothing yet; call [`NodeCore::start`].
    pub fn new(config: CoreConfig, now: UnixMillis) -> Result<NodeCore, CoreError> {
        let engine = Engine::new(config.engine.clone())?;
        let mut membership_config = MembershipConfig::new(
            config.identity.clone(),
            config.rng_seed,
            config.region_size_hint,
            config.fleet_size_hint,
        );
        let record = RegionRecord {
            region: config.identity.region().to_owned(),
            version: config.region_version,
            prefixes: config.region_prefixes.clone(),
        };
        record.validate()?;
        membership_config.region_record = Some(record);
        let membership = Membership::new(membership_config);
        let ring = membership.local_ring(config.ring);
        let handoff = Handoff::new(config.identity.clone(), &ring, now, config.handoff);
        let regions = RegionMap::from_prefixes(
            config
                .static_regions
                .iter()
                .map(|(net, r)| (*net, r.as_str()))
                .chain(
                    config
                        .region_prefixes
                        .iter()
                        .map(|net| (*net, config.identity.region())),
                ),
        )?;
        Ok(NodeCore {
            region: config.identity.region().to_owned(),
            engine,
            membership,
            handoff,
            ring,
            remote_rings: BTreeMap::new(),
            regions,
            held: VecDeque::new(),
            inflight: BTreeMap::new(),
            inflight_flows: 0,
            outbox: Vec::new(),
            requests: BTreeMap::new(),
            // Ids only need to be unique among this node's unacknowledged messages; the
            // seed keeps two restarts of a node from reusing them in one peer's view.
            next_id: (config.rng_seed & 0xffff_ffff) << 20,
            left: false,
            stats: CoreStats::default(),
            journal: Ledger::default(),
            recent: Recent::new(config.engine.hash_seed),
            names: Names::new(config.engine.hash_seed),
            scratch: tenure_attribution::Outputs::default(),
            admission: Admission::new(AdmissionConfig::default()),
            steady: SteadyClock::new(),
            clocks: exporter_clocks(&config, &AdmissionConfig::default()),
            config,
        })
    }

    /// Joins the cluster through the configured seeds.
    pub fn start(&mut self, now: UnixMillis, out: &mut Vec<Output>) {
        let mut mo = Vec::new();
        let seeds = self.config.seeds.clone();
        if let Err(e) = self.membership.join(&seeds, &mut mo) {
            tracing::warn!(error = %Chain(&e), "joining the cluster");
        }
        self.after_membership(mo, now, out);
        self.pull(now, out);
    }

    /// Our identity.
    pub fn identity(&self) -> &NodeIdentity {
        &self.config.identity
    }

    pub fn engine(&self) -> &Engine<JournaledFlow> {
        &self.engine
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn regions(&self) -> &RegionMap {
        &self.regions
    }

    pub fn handoff(&self) -> &Handoff {
        &self.handoff
    }

    pub fn stats(&self) -> &CoreStats {
        &self.stats
    }

    /// Replaces the limits on exporter input (the default is [`AdmissionConfig::default`]).
    /// Kept apart from [`CoreConfig`] so that every driver gets the checks without having to
    /// opt in.
    pub fn set_admission(&mut self, config: AdmissionConfig) {
        self.clocks = exporter_clocks(&self.config, &config);
        let entitlements = self.admission.entitlements().cloned();
        self.admission = Admission::new(config);
        self.admission.set_entitlements(entitlements);
    }

    /// The limits on exporter input in force.
    pub fn admission_config(&self) -> &AdmissionConfig {
        self.admission.config()
    }

    /// Replaces what each exporter may claim, by the exporter id its credential proves
    /// (a registry reload takes effect with the next batch). `None`: exporters share a key
    /// and nothing is checked beyond the region's prefixes.
    pub fn set_entitlements(&mut self, entitlements: Option<Entitlements>) {
        self.admission.set_entitlements(entitlements);
    }

    /// Exporter input refused, by reason.
    pub fn admission_stats(&self) -> &AdmissionStats {
        self.admission.stats()
    }

    /// Flows held for handoff.
    pub fn held_len(&self) -> usize {
        self.held.len()
    }

    /// Forwarded flows awaiting their ack.
    pub fn inflight_len(&self) -> usize {
        self.inflight_flows
    }

    /// Forwarded flows gathered for their peer, not sent yet (they go at the next tick).
    pub fn outbox_len(&self) -> usize {
        // A few peers at most: summed when asked rather than kept beside the outboxes.
        self.outbox.iter().map(|(_, _, flows)| flows.len()).sum()
    }

    /// Flows accepted and not yet emitted or acknowledged by a peer.
    pub fn unsettled_flows(&self) -> usize {
        self.engine.pending_len() + self.held.len() + self.outbox_len() + self.inflight_flows
    }

    /// Journal appends with flows not yet settled.
    pub fn journal_open_appends(&self) -> usize {
        self.journal.open_len()
    }

    /// Batches whose ack waits for [`NodeCore::journal_synced`].
    pub fn journal_withheld_acks(&self) -> usize {
        self.journal.withheld_len()
    }

    /// The id the next [`JournalOp::Append`] will carry.
    pub fn journal_next_id(&self) -> u64 {
        self.journal.next_id()
    }

    /// Whether the core has left the cluster.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// When [`NodeCore::tick`] must be called at the latest (besides every
    /// [`TICK_INTERVAL_MS`]).
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        self.engine.next_deadline()
    }

    /// The owners of `ip` in our region (empty when the IP is of another region or
    /// external).
    pub fn owners_of(&self, ip: IpAddr) -> Vec<&NodeIdentity> {
        match self.regions.locate(ip) {
            Locate::Region(r) if r == self.region => self.ring.owners(ip).to_vec(),
            Locate::Region(_) | Locate::External => Vec::new(),
        }
    }

    /// Who owned `ip` at `at`, by what this node knows now (HTTP).
    pub fn lookup(&self, ip: IpAddr, at: UnixMillis) -> Lookup {
        self.engine.lookup(ip, Window::at(at))
    }

    /// The retained history of `ip` held here (HTTP).
    pub fn history(&self, ip: IpAddr) -> IpRanges {
        self.engine.history(ip)
    }

    /// Whether the core is ready to answer: joined a ring and no handoff pending.
    pub fn is_ready(&self) -> bool {
        !self.left && self.handoff.pending_spans() == 0
    }

    fn next_id(&mut self) -> u64 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    fn is_busy(&self) -> bool {
        self.unsettled_flows() >= self.config.busy_flows_threshold
            || self.outbox_len() + self.inflight_flows >= self.config.inflight_flows_max
    }

    // ----- inputs -----

    /// Handles a decoded data-plane message that arrived on connection `conn`, sealed with
    /// the cluster key (a driver that has one key for everything, like the simulator).
    /// Fresh flow batches (`hops == 0`) pass the exporter checks all the same.
    pub fn handle_message(
        &mut self,
        conn: ConnId,
        message: Message,
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        self.handle_message_from(conn, Sender::Collector, message, now, out);
    }

    /// Handles a decoded data-plane message that arrived on connection `conn` from
    /// `sender`. An exporter may send fresh flow batches only: anything else it sends is
    /// refused (acknowledged `rejected` when it has a batch id) and counted.
    pub fn handle_message_from(
        &mut self,
        conn: ConnId,
        sender: Sender,
        message: Message,
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        let proven = match sender {
            Sender::ProvenExporter(id) => Some(id),
            Sender::Exporter | Sender::Collector => None,
        };
        if sender != Sender::Collector {
            let refused = match &message {
                Message::FlowBatch(b) if b.hops == 0 => None,
                Message::FlowBatch(b) => Some((Rejection::Relayed, Some(b.batch_id))),
                Message::ClaimBatch(b) => Some((Rejection::PeerOnly, Some(b.batch_id))),
                Message::IpEventBatch(b) => Some((Rejection::PeerOnly, Some(b.batch_id))),
                Message::RangeRequest(_)
                | Message::RangeSnapshot(_)
                | Message::Ack(_)
                | Message::RegionDirectory(_) => Some((Rejection::PeerOnly, None)),
            };
            if let Some((reason, batch_id)) = refused {
                self.admission.count_message(reason);
                self.stats.batches_rejected += 1;
                if let Some(id) = batch_id {
                    ack(out, conn, id, AckStatus::Rejected(RejectReason::Invalid));
                }
                return;
            }
        }
        match message {
            Message::FlowBatch(mut batch) => {
                if let Some(id) = proven {
                    // The credential says who sent it; the batch's field is only a claim.
                    batch.exporter_id = id;
                    if let Some(Err(reason)) =
                        self.admission.entitlements().map(|e| e.check_exporter(id))
                    {
                        self.admission.count_message(reason);
                        self.admission
                            .count_claims(reason, batch.claims.len() as u64);
                        self.admission.note_refusal(id, reason, None);
                        self.stats.batches_rejected += 1;
                        ack(
                            out,
                            conn,
                            batch.batch_id,
                            AckStatus::Rejected(RejectReason::Revoked),
                        );
                        return;
                    }
                }
                self.on_flow_batch(conn, batch, proven, now, out)
            }
            Message::ClaimBatch(batch) => self.on_claim_batch(conn, batch, now, out),
            Message::IpEventBatch(batch) => {
                let id = batch.batch_id;
                let relayed = id & RELAYED_BATCH_BIT != 0;
                self.on_event_batch(batch, relayed, now, out);
                ack(out, conn, id, AckStatus::Accepted);
            }
            Message::RangeRequest(request) => self.on_range_request(conn, request, out),
            Message::RangeSnapshot(snapshot) => self.on_range_snapshot(snapshot, now, out),
            Message::Ack(a) => self.on_ack(a, now, out),
            // Directories travel over gossip; a data-plane copy adds nothing.
            Message::RegionDirectory(_) => {}
        }
        self.journal.flush(out);
    }

    /// Handles an opened gossip datagram from `from`.
    pub fn handle_datagram(
        &mut self,
        from: SocketAddr,
        bytes: &[u8],
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) -> Result<(), membership::MembershipError> {
        let mut mo = Vec::new();
        let result = self.membership.handle_datagram(bytes, from, &mut mo);
        self.after_membership(mo, now, out);
        self.journal.flush(out);
        result
    }

    /// Handles a membership timer that expired.
    pub fn handle_timer(
        &mut self,
        timer: membership::Timer,
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        if self.left {
            return;
        }
        let mut mo = Vec::new();
        if let Err(e) = self.membership.handle_timer(timer, &mut mo) {
            tracing::debug!(error = %Chain(&e), "membership timer");
        }
        self.after_membership(mo, now, out);
        self.journal.flush(out);
    }

    /// Events from the event feed (HTTP), with the feed's watermark: every event at or
    /// before it has been delivered. Each event goes to the owners of its IP.
    pub fn handle_events(
        &mut self,
        events: Vec<wire::IpEvent>,
        watermark_ms: u64,
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        let batch = wire::IpEventBatch {
            batch_id: 0,
            watermark_ms,
            events,
        };
        self.on_event_batch(batch, false, now, out);
        self.journal.flush(out);
    }

    /// Time passed: emit flows whose deadline came, retry held flows, pull handoff spans,
    /// send the flows gathered for peers, re-route forwards whose ack is overdue.
    pub fn tick(&mut self, now: UnixMillis, out: &mut Vec<Output>) {
        self.log_refusals(now);
        self.engine.tick(now, &mut self.scratch);
        self.drain_engine(now, out);
        self.pull(now, out);
        self.retry_held(now, out);
        let gathered = std::mem::take(&mut self.outbox);
        self.send_grouped(gathered, now, out);
        let timeout = self.config.forward_ack_timeout_ms;
        let at = self.steady.observe(now);
        let overdue: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, f)| at.since(f.sent_at) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            self.reroute_inflight(id, now, out);
        }
        self.journal.flush(out);
    }

    /// Leaves the cluster: peers learn at once, and every flow waiting here is handed to
    /// the next owner of its IP (or emitted, when there is none). Afterwards the core
    /// only settles what is in flight: call [`NodeCore::tick`] until
    /// [`NodeCore::unsettled_flows`] is zero or the caller's grace period ends, then
    /// [`NodeCore::abandon_inflight`].
    pub fn leave(&mut self, now: UnixMillis, out: &mut Vec<Output>) {
        if self.left {
            return;
        }
        // The ring without us: where our flows go now.
        let me = self.config.identity.node_id().to_owned();
        let survivors: Vec<NodeIdentity> = self
            .ring
            .members()
            .iter()
            .filter(|m| m.node_id() != me)
            .cloned()
            .collect();
        let mut mo = Vec::new();
        if let Err(e) = self.membership.leave(&mut mo) {
            tracing::debug!(error = %Chain(&e), "leaving");
        }
        // Set first: leaving makes foca report us defunct, which is expected now.
        self.left = true;
        self.after_membership(mo, now, out);
        self.ring = Ring::new(&survivors, self.config.ring);
        // Take every pending flow out of the engine: a tick past every deadline returns
        // them all (their verdicts are ignored: the next owner decides).
        let past = now.plus(self.config.engine.pending_deadline_ms.saturating_add(1));
        self.engine.tick(past, &mut self.scratch);
        let pending: Vec<JournaledFlow> =
            self.scratch.resolved.drain(..).map(|r| r.payload).collect();
        self.scratch.conflicts.clear();
        let held: Vec<JournaledFlow> = self.held.drain(..).collect();
        let gathered = self.take_outbox();
        let mut handed = Vec::new();
        for flow in pending.into_iter().chain(held).chain(gathered) {
            match self.ring.primary(flow.record.remote_ip) {
                Some(next) => handed.push((Dest::peer(next), next.node_id().to_owned(), flow)),
                None => self.emit(flow, Verdict::Unattributed(Reason::NoOwner), 0, now, out),
            }
        }
        self.send_flows(handed, now, out);
        self.journal.flush(out);
    }

    /// The caller's journal is durable up to append `upto_id` (every [`JournalOp::Append`]
    /// with an id at most `upto_id` was fsynced): the acks withheld for those batches go
    /// out now. A caller without a journal calls it with `u64::MAX` after every input,
    /// which gives up durability but not correctness.
    pub fn journal_synced(&mut self, upto_id: u64, _now: UnixMillis, out: &mut Vec<Output>) {
        self.journal.synced(upto_id, out);
    }

    /// Replays flows journaled before a restart: `entries` are the appends (id, flows)
    /// never released, in any order. Each is tracked under its old id (released again
    /// when its flows settle, with no new append) and its flows are routed like new ones.
    /// Appends issued afterwards get larger ids. Call it once, after
    /// [`NodeCore::start`]; a flow emitted before the crash whose release was lost is
    /// emitted again, with the same `flow_id`.
    pub fn recover(
        &mut self,
        entries: Vec<(u64, Vec<FlowRecord>)>,
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        let mut flows = Vec::new();
        for (journal_id, records) in entries {
            self.journal.recovered(journal_id, records.len());
            self.stats.flows_recovered += records.len() as u64;
            for r in &records {
                self.recent.insert(r.exporter_id, r.flow_id);
            }
            flows.extend(
                records
                    .into_iter()
                    .map(|record| JournaledFlow { journal_id, record }),
            );
        }
        self.route_flows(flows, now, out);
        self.journal.flush(out);
    }

    /// Emits every forwarded flow still unacknowledged, unattributed with reason
    /// `overload` (the shutdown grace period was the limit). Its receiver may have taken
    /// it too: duplicates share the flow id.
    pub fn abandon_inflight(&mut self, now: UnixMillis, out: &mut Vec<Output>) {
        let all = std::mem::take(&mut self.inflight);
        self.inflight_flows = 0;
        let unsent = self.take_outbox();
        for flow in all
            .into_values()
            .flat_map(|inflight| inflight.flows)
            .chain(unsent)
        {
            self.emit(flow, Verdict::Unattributed(Reason::Overload), 0, now, out);
        }
        self.journal.flush(out);
    }

    // ----- flows -----

    fn on_flow_batch(
        &mut self,
        conn: ConnId,
        batch: wire::FlowBatch,
        proven: Option<u64>,
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        let id = batch.batch_id;
        if batch.hops == 0 && batch.region != self.region {
            self.stats.batches_rejected += 1;
            return ack(
                out,
                conn,
                id,
                AckStatus::Rejected(RejectReason::WrongRegion),
            );
        }
        if batch.hops > HOPS_MAX {
            self.stats.batches_rejected += 1;
            return ack(
                out,
                conn,
                id,
                AckStatus::Rejected(RejectReason::TooManyHops),
            );
        }
        if self.left || (batch.hops == 0 && self.is_busy()) {
            self.stats.batches_busy += 1;
            let retry_after_ms = self.config.busy_retry_after_ms;
            return ack(out, conn, id, AckStatus::Busy { retry_after_ms });
        }
        let mut clock_off = false;
        let dictionary = self.names.dictionary(&batch.dictionary);
        let claims = if batch.hops == 0 {
            // Straight from an exporter: its budget first, its clock, then every claim on
            // its own.
            let taken = self.admission.take(
                batch.exporter_id,
                batch.claims.len(),
                batch.flows.len(),
                self.steady.observe(now),
            );
            if let Err(reason) = taken {
                self.admission.count_message(reason);
                self.admission
                    .count_claims(reason, batch.claims.len() as u64);
                self.stats.batches_busy += 1;
                let retry_after_ms = self.config.busy_retry_after_ms;
                return ack(out, conn, id, AckStatus::Busy { retry_after_ms });
            }
            let at = self.steady.observe(now);
            match self.clocks.judge(batch.exporter_id, batch.sent_ms, now, at) {
                ClockVerdict::Agrees => self.admit_claims(batch.claims, &dictionary, proven, now),
                ClockVerdict::Disagrees { off_ms } => {
                    self.stats.batches_clock_off += 1;
                    self.admission
                        .count_claims(Rejection::ExporterClock, batch.claims.len() as u64);
                    tracing::debug!(exporter = batch.exporter_id, off_ms, "exporter clock off the fleet's; its claims are refused and its flows unattributed");
                    clock_off = true;
                    Vec::new()
                }
            }
        } else {
            batch.claims
        };
        self.stats.batches_accepted += 1;
        let origin = if batch.hops == 0 {
            Origin::Exporter
        } else {
            Origin::Forwarded
        };
        // Claims first: a flow of this batch may need them.
        self.route_claims(&claims, &dictionary, origin, now, out);
        let region = self.names.get(&batch.region);
        // Each flow is built where it stays until routed, already carrying the id of the
        // append that journals it below (nothing is appended when none is left).
        let journal_id = self.journal.next_id();
        // Remembered as journaled here (the append follows below). A peer's copy of flows
        // we journaled already (it re-sent them while its ack was late) is dropped: they go
        // out from that append. An exporter's flows are all taken.
        let from_peer = batch.hops > 0;
        let mut received = 0;
        let mut flows: Vec<JournaledFlow> = Vec::with_capacity(batch.flows.len());
        for f in &batch.flows {
            let Some(record) =
                FlowRecord::from_wire(f, &dictionary, batch.exporter_id, &region, batch.hops)
            else {
                continue;
            };
            received += 1;
            if self.recent.insert(record.exporter_id, record.flow_id) || !from_peer {
                flows.push(JournaledFlow { journal_id, record });
            }
        }
        self.stats.flows_received += received as u64;
        let already_held = received - flows.len();
        self.stats.flows_already_held += already_held as u64;
        if flows.is_empty() {
            if already_held > 0 {
                // Acked once the appends holding them are durable.
                self.journal.withhold_behind_last(conn, id, out);
                return;
            }
            // Nothing to make durable: claims are restated by every heartbeat.
            return ack(out, conn, id, AckStatus::Accepted);
        }
        // Journaled before anything else happens to the flows; the ack waits for
        // `journal_synced`.
        self.stats.journal_appends += 1;
        self.journal.append(&flows, conn, id, out);
        if clock_off {
            // Their times cannot be held against other hosts' heartbeats.
            for flow in flows {
                self.emit(
                    flow,
                    Verdict::Unattributed(Reason::ExporterClock),
                    0,
                    now,
                    out,
                );
            }
            return;
        }
        self.route_flows(flows, now, out);
    }

    /// Routes flows to the owners of their remote IPs: here, a peer, another region, or a
    /// verdict at once.
    ///
    /// Every accepted flow passes here, so peers are told apart by the address of their
    /// identity in the ring (stable while routing) and each peer's `Dest` is built once per
    /// call, not once per flow.
    fn route_flows(&mut self, flows: Vec<JournaledFlow>, now: UnixMillis, out: &mut Vec<Output>) {
        let mut local: Vec<JournaledFlow> = Vec::with_capacity(flows.len());
        let mut peers: Vec<(Dest, String, Vec<JournaledFlow>)> = Vec::new();
        let mut verdicts: Vec<(JournaledFlow, Verdict)> = Vec::new();
        {
            // Our place on our ring, so that "do we own it?" is a compare of integers.
            let me = self.ring.index_of(self.config.identity.node_id());
            let ctx = RouteContext {
                local_region: &self.region,
                regions: &self.regions,
                local_ring: &self.ring,
                remote_rings: &self.remote_rings,
            };
            // Identity address → index in `peers`.
            let mut peer_index: Vec<(*const NodeIdentity, usize)> = Vec::new();
            for flow in flows {
                let origin = if flow.record.hops == 0 {
                    Origin::Exporter
                } else {
                    Origin::Forwarded
                };
                let target = match route_flow(&ctx, flow.record.remote_ip, origin) {
                    // Any owner attributes it alike: kept when we are one, else to the
                    // primary.
                    Route::Owners(owners) => match owners.first() {
                        Some(_) if flow.record.hops >= HOPS_MAX => Ok(None),
                        Some(_) if me.is_some_and(|i| owners.contains_index(i)) => Ok(None),
                        Some(primary) => Ok(Some(primary)),
                        None => Err(Verdict::Unattributed(Reason::RegionUnreachable)),
                    },
                    Route::Forward { via, .. } => Ok(Some(via)),
                    Route::External => Err(Verdict::Attributed(Attribution::External)),
                    Route::RegionUnreachable { .. } | Route::Misdirected { .. } => {
                        Err(Verdict::Unattributed(Reason::RegionUnreachable))
                    }
                };
                match target {
                    Ok(None) => local.push(flow),
                    Ok(Some(member)) => {
                        let key: *const NodeIdentity = member;
                        let index = match peer_index.iter().find(|(k, _)| std::ptr::eq(*k, key)) {
                            Some((_, i)) => *i,
                            None => {
                                peers.push((
                                    Dest::peer(member),
                                    member.node_id().to_owned(),
                                    Vec::new(),
                                ));
                                peer_index.push((key, peers.len() - 1));
                                peers.len() - 1
                            }
                        };
                        peers[index].2.push(flow);
                    }
                    Err(verdict) => verdicts.push((flow, verdict)),
                }
            }
        }
        for (flow, verdict) in verdicts {
            self.emit(flow, verdict, 0, now, out);
        }
        self.deliver_local(local, now, out);
        self.gather(peers, now, out);
    }

    /// Adds flows routed to peers to their outboxes. An outbox holding a full batch goes
    /// at once; the rest go at the next tick.
    fn gather(
        &mut self,
        peers: Vec<(Dest, String, Vec<JournaledFlow>)>,
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        for (dest, node_id, flows) in peers {
            match self.outbox.iter_mut().find(|(d, _, _)| *d == dest) {
                Some((_, _, gathered)) => gathered.extend(flows),
                None => self.outbox.push((dest, node_id, flows)),
            }
        }
        if self
            .outbox
            .iter()
            .any(|(_, _, f)| f.len() >= FORWARD_FLOWS_PER_BATCH_MAX)
        {
            let (full, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.outbox)
                .into_iter()
                .partition(|(_, _, f)| f.len() >= FORWARD_FLOWS_PER_BATCH_MAX);
            self.outbox = rest;
            self.send_grouped(full, now, out);
        }
    }

    /// Takes every flow gathered for peers and not sent, to be routed anew.
    fn take_outbox(&mut self) -> Vec<JournaledFlow> {
        std::mem::take(&mut self.outbox)
            .into_iter()
            .flat_map(|(_, _, flows)| flows)
            .collect()
    }

    /// Sends flows to peers, one batch per peer, tracked until acknowledged.
    fn send_flows(
        &mut self,
        flows: Vec<(Dest, String, JournaledFlow)>,
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        let mut by_peer: BTreeMap<(Dest, String), Vec<JournaledFlow>> = BTreeMap::new();
        for (dest, node_id, flow) in flows {
            by_peer.entry((dest, node_id)).or_default().push(flow);
        }
        let grouped = by_peer
            .into_iter()
            .map(|((dest, node_id), flows)| (dest, node_id, flows))
            .collect();
        self.send_grouped(grouped, now, out);
    }

    /// Sends each peer its flows, in batches of at most `FORWARD_FLOWS_PER_BATCH_MAX`
    /// that share hops, exporter and region (as the wire wants), tracked until
    /// acknowledged. The flows move into the in-flight table; none is copied.
    fn send_grouped(
        &mut self,
        peers: Vec<(Dest, String, Vec<JournaledFlow>)>,
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        let sent_at = self.steady.observe(now);
        for (dest, node_id, flows) in peers {
            let mut flows = flows.into_iter().peekable();
            while flows.peek().is_some() {
                let chunk: Vec<JournaledFlow> =
                    flows.by_ref().take(FORWARD_FLOWS_PER_BATCH_MAX).collect();
                self.stats.flows_forwarded += chunk.len() as u64;
                let batch_id = self.next_id();
                // Flows of one batch share hops and region on the wire; group by them.
                // Nearly always there is one group (one exporter's batch); check first.
                let first = &chunk[0].record;
                let one_group = chunk.iter().all(|f| {
                    f.record.hops == first.hops
                        && f.record.exporter_id == first.exporter_id
                        && f.record.exporter_region == first.exporter_region
                });
                let groups: Vec<Vec<JournaledFlow>> = if one_group {
                    vec![chunk]
                } else {
                    let mut by_key: BTreeMap<(u8, u64, Arc<str>), Vec<JournaledFlow>> =
                        BTreeMap::new();
                    for f in chunk {
                        let r = &f.record;
                        by_key
                            .entry((r.hops, r.exporter_id, r.exporter_region.clone()))
                            .or_default()
                            .push(f);
                    }
                    by_key.into_values().collect()
                };
                let many = groups.len() > 1;
                for group in groups {
                    let id = if many { self.next_id() } else { batch_id };
                    let head = &group[0].record;
                    let (hops, exporter_id, region) = (
                        head.hops,
                        head.exporter_id,
                        head.exporter_region.to_string(),
                    );
                    let mut dict = DictionaryBuilder::new(self.config.engine.hash_seed);
                    let wire_flows = group
                        .iter()
                        .map(|f| {
                            let local = match &f.record.local {
                                Local::Workload(w) => LocalEnd::Workload(dict.index_of(w)),
                                Local::Unattributed(reason) => LocalEnd::Unattributed(*reason),
                            };
                            f.record.to_wire(local)
                        })
                        .collect();
                    out.push(Output::Frame {
                        to: dest.clone(),
                        message: Message::FlowBatch(wire::FlowBatch {
                            batch_id: id,
                            exporter_id,
                            hops: hops.saturating_add(1),
                            sent_ms: now.0,
                            region,
                            dictionary: dict.finish(),
                            flows: wire_flows,
                            claims: Vec::new(),
                        }),
                    });
                    self.inflight_flows += group.len();
                    self.inflight.insert(
                        id,
                        Inflight {
                            to: dest.clone(),
                            node_id: node_id.clone(),
                            sent_at,
                            flows: group,
                        },
                    );
                }
            }
        }
    }

    /// Flows whose remote IP we own: to the engine when their span is ready, else held.
    /// The ready ones go in as one batch, so that the engine groups their lookups.
    fn deliver_local(&mut self, flows: Vec<JournaledFlow>, now: UnixMillis, out: &mut Vec<Output>) {
        let mut queries = Vec::with_capacity(flows.len());
        for flow in flows {
            match self.handoff.readiness(flow.record.remote_ip) {
                Readiness::Pending => {
                    if self.held.len() >= self.config.held_flows_max {
                        self.emit(flow, Verdict::Unattributed(Reason::Overload), 0, now, out);
                    } else {
                        self.held.push_back(flow);
                    }
                }
                Readiness::Ready { history_floor } => {
                    let earliest = flow
                        .record
                        .start_ms
                        .saturating_sub(self.config.engine.skew_margin_ms);
                    if history_floor.is_some_and(|floor| earliest < floor.0) {
                        // The history before the floor was never fetched: it cannot be told.
                        self.emit(flow, Verdict::Unattributed(Reason::Expired), 0, now, out);
                        continue;
                    }
                    let r = &flow.record;
                    let window = Window::new(UnixMillis(r.start_ms), UnixMillis(r.end_ms))
                        .unwrap_or(Window::at(UnixMillis(r.start_ms)));
                    queries.push(tenure_attribution::FlowQuery {
                        remote: r.remote_ip,
                        window,
                        payload: flow,
                    });
                }
            }
        }
        if !queries.is_empty() {
            self.engine.submit_many(queries, now, &mut self.scratch);
            self.drain_engine(now, out);
        }
    }

    fn retry_held(&mut self, now: UnixMillis, out: &mut Vec<Output>) {
        if self.held.is_empty() {
            return;
        }
        let held: Vec<JournaledFlow> = self.held.drain(..).collect();
        for flow in held {
            if self.left {
                self.held.push_back(flow);
                continue;
            }
            // Ownership may have moved while it waited: route again.
            self.route_flows(vec![flow], now, out);
        }
    }

    fn on_ack(&mut self, a: wire::Ack, now: UnixMillis, out: &mut Vec<Output>) {
        match a.status {
            AckStatus::Accepted => {
                if let Some(done) = self.inflight.remove(&a.batch_id) {
                    self.inflight_flows = self.inflight_flows.saturating_sub(done.flows.len());
                    // The peer made them durable before acknowledging: ours may go.
                    for flow in &done.flows {
                        self.journal.settle(flow.journal_id);
                    }
                }
            }
            AckStatus::Busy { .. } => {
                // Leave it in flight: the ack timeout re-sends it (possibly elsewhere).
            }
            AckStatus::Rejected(reason) => {
                if let Some(done) = self.inflight.remove(&a.batch_id) {
                    self.inflight_flows = self.inflight_flows.saturating_sub(done.flows.len());
                    tracing::warn!(?reason, peer = %done.node_id, flows = done.flows.len(), "peer rejected forwarded flows");
                    for flow in done.flows {
                        self.emit(
                            flow,
                            Verdict::Unattributed(Reason::RegionUnreachable),
                            0,
                            now,
                            out,
                        );
                    }
                }
            }
        }
    }

    fn reroute_inflight(&mut self, id: u64, now: UnixMillis, out: &mut Vec<Output>) {
        let Some(inflight) = self.inflight.remove(&id) else {
            return;
        };
        self.inflight_flows = self.inflight_flows.saturating_sub(inflight.flows.len());
        self.stats.flows_rerouted += inflight.flows.len() as u64;
        tracing::debug!(to = ?inflight.to, flows = inflight.flows.len(), "re-routing unacknowledged flows");
        if self.left {
            // Only survivors remain on our ring: send there again.
            let mut again = Vec::new();
            for flow in inflight.flows {
                match self.ring.primary(flow.record.remote_ip) {
                    Some(next) => again.push((Dest::peer(next), next.node_id().to_owned(), flow)),
                    None => self.emit(flow, Verdict::Unattributed(Reason::NoOwner), 0, now, out),
                }
            }
            self.send_flows(again, now, out);
        } else {
            self.route_flows(inflight.flows, now, out);
        }
    }

    fn drain_engine(&mut self, now: UnixMillis, out: &mut Vec<Output>) {
        for conflict in self.scratch.conflicts.drain(..) {
            tracing::warn!(ip = %conflict.ip, existing = %conflict.existing, claimant = %conflict.claimant, "conflicting claims");
            out.push(Output::Notice(Notice::Conflict(conflict)));
        }
        // Taken out and put back, so that the flows move once and the vector keeps its room.
        let mut resolved = std::mem::take(&mut self.scratch.resolved);
        // A claim batch resolves thousands of flows at once: one reservation, not a
        // vector that doubles (and copies every flow so far) as it grows.
        out.reserve(resolved.len());
        for r in resolved.drain(..) {
            self.emit(r.payload, r.verdict, r.waited_ms, now, out);
        }
        self.scratch.resolved = resolved;
    }

    /// Emits a flow and settles it in the journal (the release follows the emit in `out`).
    fn emit(
        &mut self,
        flow: JournaledFlow,
        verdict: Verdict,
        waited_ms: u64,
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        self.journal.settle(flow.journal_id);
        out.push(Output::Emit(EmittedFlow {
            record: flow.record,
            verdict,
            waited_ms,
            emitted_ms: now.0,
        }));
    }

    // ----- claims and events -----

    /// The claims of an exporter batch that pass the admission checks: timestamps near
    /// `now`, IP in our region's prefixes, and, for an exporter whose credential proved it
    /// (`proven`) while entitlements are loaded, IP and workload name within its
    /// entitlement. The rest are counted and dropped here, before routing, so that no owner
    /// ever sees them.
    fn admit_claims(
        &mut self,
        claims: Vec<wire::Claim>,
        dictionary: &[Arc<str>],
        proven: Option<u64>,
        now: UnixMillis,
    ) -> Vec<wire::Claim> {
        let mut admitted = Vec::with_capacity(claims.len());
        for claim in claims {
            let in_region = match self.regions.locate(claim.ip) {
                Locate::Region(r) => r == self.region,
                Locate::External => false,
            };
            let entitled = match (proven, self.admission.entitlements()) {
                (Some(id), Some(entitlements)) => {
                    // A name outside the dictionary is dropped later in any case; here it
                    // is judged as the empty name, which no restricted list holds.
                    let name = dictionary.get(claim.workload as usize).map_or("", |n| &**n);
                    entitlements.check_claim(id, claim.ip, name)
                }
                (None, _) | (Some(_), None) => Ok(()),
            };
            let checked = if !in_region {
                Err(Rejection::ForeignCidr)
            } else if let Err(reason) = entitled {
                Err(reason)
            } else {
                self.admission
                    .check_times(claim.since_ms, claim.until_ms, now)
            };
            match checked {
                Ok(()) => admitted.push(claim),
                Err(reason) => {
                    self.admission.count_claims(reason, 1);
                    if let Some(id) = proven {
                        self.admission.note_refusal(id, reason, Some(claim.ip));
                    }
                    tracing::debug!(ip = %claim.ip, %reason, "exporter claim refused");
                }
            }
        }
        admitted
    }

    /// Logs the exporters whose batches or claims were refused for their credential, once
    /// per exporter and [`REFUSAL_LOG_INTERVAL_MS`].
    fn log_refusals(&mut self, now: UnixMillis) {
        for (exporter, tally) in self.admission.refusals_to_log(now) {
            tracing::warn!(
                node = %self.config.identity.node_id(),
                exporter,
                claims_not_entitled = tally.claims_not_entitled,
                batches_revoked = tally.batches_revoked,
                example_ip = ?tally.example_ip,
                "exporter refused for its credential: claims outside its entitlement, or batches under a revoked credential"
            );
        }
    }

    fn route_claims(
        &mut self,
        claims: &[wire::Claim],
        dictionary: &[Arc<str>],
        origin: Origin,
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        self.stats.claims_received += claims.len() as u64;
        // Our place on our ring, so that "is this owner us?" is a compare of integers.
        let me = self.ring.index_of(self.config.identity.node_id());
        let mut local = Vec::new();
        let mut remote: BTreeMap<Dest, Vec<&wire::Claim>> = BTreeMap::new();
        for claim in claims {
            let ctx = RouteContext {
                local_region: &self.region,
                regions: &self.regions,
                local_ring: &self.ring,
                remote_rings: &self.remote_rings,
            };
            match route_claim(&ctx, claim.ip, origin) {
                Route::Owners(owners) => {
                    for (index, owner) in owners.iter_indexed() {
                        if me == Some(index) {
                            local.push(claim);
                        } else {
                            remote.entry(Dest::peer(owner)).or_default().push(claim);
                        }
                    }
                }
                Route::Forward { via, .. } => {
                    remote.entry(Dest::peer(via)).or_default().push(claim);
                }
                Route::External => {
                    self.stats.claims_dropped += 1;
                }
                Route::RegionUnreachable { .. } | Route::Misdirected { .. } => {
                    self.stats.claims_dropped += 1;
                }
            }
        }
        for claim in local {
            self.apply_claim(claim, dictionary, now, out);
        }
        for (dest, claims) in remote {
            for chunk in claims.chunks(FORWARD_CLAIMS_PER_BATCH_MAX) {
                let mut dict = DictionaryBuilder::new(self.config.engine.hash_seed);
                let claims = chunk
                    .iter()
                    .filter_map(|c| {
                        let name = dictionary.get(c.workload as usize)?;
                        Some(wire::Claim {
                            workload: dict.index_of(name),
                            ..(*c).clone()
                        })
                    })
                    .collect();
                let batch_id = self.next_id();
                out.push(Output::Frame {
                    to: dest.clone(),
                    message: Message::ClaimBatch(wire::ClaimBatch {
                        batch_id,
                        dictionary: dict.finish(),
                        claims,
                    }),
                });
            }
        }
    }

    fn apply_claim(
        &mut self,
        claim: &wire::Claim,
        dictionary: &[Arc<str>],
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        let Some(name) = dictionary.get(claim.workload as usize) else {
            self.stats.claims_dropped += 1;
            return;
        };
        let workload = match self.engine.intern(name) {
            Ok(w) => w,
            Err(e) => {
                self.stats.claims_dropped += 1;
                out.push(Output::Notice(Notice::ClaimDropped {
                    ip: claim.ip,
                    why: e.to_string(),
                }));
                return;
            }
        };
        let result = self.engine.apply_claim(
            Claim {
                ip: claim.ip,
                workload,
                since: UnixMillis(claim.since_ms),
                until: UnixMillis(claim.until_ms),
            },
            now,
            &mut self.scratch,
        );
        if let Err(e) = result {
            self.stats.claims_dropped += 1;
            out.push(Output::Notice(Notice::ClaimDropped {
                ip: claim.ip,
                why: e.to_string(),
            }));
        }
        self.drain_engine(now, out);
    }

    /// Claims from a peer that routed them to us: applied here (the sender judged us an
    /// owner; a claim is a fact, so holding it where it is not needed is harmless).
    fn on_claim_batch(
        &mut self,
        conn: ConnId,
        batch: wire::ClaimBatch,
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        let dictionary = self.names.dictionary(&batch.dictionary);
        self.stats.claims_received += batch.claims.len() as u64;
        for claim in &batch.claims {
            self.apply_claim(claim, &dictionary, now, out);
        }
        ack(out, conn, batch.batch_id, AckStatus::Accepted);
    }

    /// Events: applied here for IPs we own; the rest go to their owners. The watermark
    /// applies region-wide, so an event batch from the feed (not from a peer) passes it to
    /// every member of the region.
    fn on_event_batch(
        &mut self,
        batch: wire::IpEventBatch,
        from_peer: bool, // relayed by a peer
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        self.stats.events_received += batch.events.len() as u64;
        // Our place on our ring, so that "is this owner us?" is a compare of integers.
        let me = self.ring.index_of(self.config.identity.node_id());
        let mut remote: BTreeMap<Dest, Vec<wire::IpEvent>> = BTreeMap::new();
        for event in batch.events {
            // Whether we are one of the event's owners, and the other owners to send it to
            // (a relayed event is ours and goes no further).
            let (mine, owners): (bool, Vec<Dest>) = if from_peer {
                (true, Vec::new())
            } else {
                let ctx = RouteContext {
                    local_region: &self.region,
                    regions: &self.regions,
                    local_ring: &self.ring,
                    remote_rings: &self.remote_rings,
                };
                match route_claim(&ctx, event.ip, Origin::Exporter) {
                    Route::Owners(owners) => (
                        me.is_some_and(|i| owners.contains_index(i)),
                        owners
                            .iter_indexed()
                            .filter(|&(index, _)| me != Some(index))
                            .map(|(_, owner)| Dest::peer(owner))
                            .collect(),
                    ),
                    Route::Forward { via, .. } => (false, vec![Dest::peer(via)]),
                    Route::External
                    | Route::RegionUnreachable { .. }
                    | Route::Misdirected { .. } => (false, Vec::new()),
                }
            };
            if mine {
                self.apply_event(&event, now, out);
            }
            for dest in owners {
                remote.entry(dest).or_default().push(event.clone());
            }
        }
        self.engine
            .advance_event_watermark(UnixMillis(batch.watermark_ms), now, &mut self.scratch);
        self.drain_engine(now, out);
        if from_peer {
            return;
        }
        // Every LAN member learns the watermark, with or without events for it.
        for member in self.membership.lan_members() {
            remote.entry(Dest::peer(member)).or_default();
        }
        for (dest, events) in remote {
            let mut chunks: Vec<Vec<wire::IpEvent>> = events
                .chunks(FORWARD_EVENTS_PER_BATCH_MAX)
                .map(<[wire::IpEvent]>::to_vec)
                .collect();
            if chunks.is_empty() {
                chunks.push(Vec::new());
            }
            for events in chunks {
                let batch_id = self.next_id() | RELAYED_BATCH_BIT;
                out.push(Output::Frame {
                    to: dest.clone(),
                    message: Message::IpEventBatch(wire::IpEventBatch {
                        batch_id,
                        watermark_ms: batch.watermark_ms,
                        events,
                    }),
                });
            }
        }
    }

    fn apply_event(&mut self, event: &wire::IpEvent, now: UnixMillis, out: &mut Vec<Output>) {
        let at = UnixMillis(event.at_ms);
        let engine_event = match event.kind {
            wire::IpEventKind::Assign => match self.engine.intern(&event.owner) {
                Ok(owner) => IpEvent::Assign {
                    ip: event.ip,
                    owner,
                    at,
                },
                Err(e) => {
                    out.push(Output::Notice(Notice::ClaimDropped {
                        ip: event.ip,
                        why: e.to_string(),
                    }));
                    return;
                }
            },
            wire::IpEventKind::Unassign => IpEvent::Unassign { ip: event.ip, at },
        };
        self.engine
            .apply_event(engine_event, now, &mut self.scratch);
        self.drain_engine(now, out);
    }

    // ----- handoff -----

    fn pull(&mut self, now: UnixMillis, out: &mut Vec<Output>) {
        let pulls = self.handoff.tick(now);
        self.send_pulls(pulls, out);
    }

    fn send_pulls(&mut self, pulls: Vec<Pull>, out: &mut Vec<Output>) {
        for pull in pulls {
            let request_id = self.next_id();
            out.push(Output::Frame {
                to: Dest::peer(&pull.from),
                message: Message::RangeRequest(wire::RangeRequest {
                    request_id,
                    region: self.region.clone(),
                    spans: pull
                        .spans
                        .iter()
                        .map(|s| wire::HashSpan {
                            start_hash: s.start,
                            end_hash: s.end,
                        })
                        .collect(),
                }),
            });
            self.requests
                .insert(request_id, Request { spans: pull.spans });
        }
        // Requests nobody answers are retried by handoff under new ids; keep the table
        // bounded by dropping the oldest.
        while self.requests.len() > 4_096 {
            self.requests.pop_first();
        }
    }

    /// Answers a pull only when every span asked for is complete here: a snapshot ends
    /// the asker's wait, so partial history must never be sent as if whole.
    fn on_range_request(
        &mut self,
        conn: ConnId,
        request: wire::RangeRequest,
        out: &mut Vec<Output>,
    ) {
        if request.region != self.region {
            return;
        }
        let spans: Vec<Span> = request
            .spans
            .iter()
            .filter_map(|s| Span::new(s.start_hash, s.end_hash))
            .collect();
        if spans.iter().any(|s| !self.handoff.is_span_ready(*s)) {
            return;
        }
        let ranges = self
            .engine
            .export(|ip| spans.iter().any(|s| s.contains(point_of(ip))));
        let mut chunks: Vec<&[IpRanges]> = ranges.chunks(SNAPSHOT_IPS_PER_FRAME_MAX).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last_index = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            self.stats.snapshots_sent += 1;
            out.push(Output::Frame {
                to: Dest::Conn(conn),
                message: Message::RangeSnapshot(wire::RangeSnapshot {
                    request_id: request.request_id,
                    region: self.region.clone(),
                    last: i == last_index,
                    ips: chunk.iter().map(snapshot_to_wire).collect(),
                }),
            });
        }
    }

    fn on_range_snapshot(
        &mut self,
        snapshot: wire::RangeSnapshot,
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        if !self.requests.contains_key(&snapshot.request_id) {
            return;
        }
        for ip in &snapshot.ips {
            let ranges = snapshot_from_wire(ip);
            if let Err(e) = self.engine.import(&ranges, now, &mut self.scratch) {
                tracing::warn!(ip = %ranges.ip, error = %e, "importing handed-off ranges");
            }
        }
        self.drain_engine(now, out);
        if snapshot.last {
            if let Some(request) = self.requests.remove(&snapshot.request_id) {
                self.stats.snapshots_merged += 1;
                for span in request.spans {
                    self.handoff.on_snapshot(span);
                }
                self.retry_held(now, out);
            }
        }
    }

    // ----- membership -----

    fn after_membership(
        &mut self,
        outputs: Vec<membership::Output>,
        now: UnixMillis,
        out: &mut Vec<Output>,
    ) {
        let mut lan_changed = false;
        let mut wan_changed = false;
        let mut regions_changed = false;
        let mut down = Vec::new();
        for output in outputs {
            match output {
                membership::Output::Send { to, bytes } => out.push(Output::Datagram { to, bytes }),
                membership::Output::SetTimer { after, timer } => out.push(Output::Timer {
                    after_ms: u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
                    timer,
                }),
                membership::Output::MemberUp { member, pool } => {
                    lan_changed |= pool == Pool::Lan;
                    wan_changed |= pool == Pool::Wan;
                    out.push(Output::Notice(Notice::MemberUp {
                        node_id: member.node_id().to_owned(),
                        region: member.region().to_owned(),
                        pool,
                    }));
                }
                membership::Output::MemberDown { member, pool } => {
                    lan_changed |= pool == Pool::Lan;
                    wan_changed |= pool == Pool::Wan;
                    down.push(member.node_id().to_owned());
                    out.push(Output::Notice(Notice::MemberDown {
                        node_id: member.node_id().to_owned(),
                        region: member.region().to_owned(),
                        pool,
                    }));
                }
                membership::Output::MemberRenamed { pool, .. } => {
                    lan_changed |= pool == Pool::Lan;
                    wan_changed |= pool == Pool::Wan;
                }
                membership::Output::Rejoined { .. } => {}
                membership::Output::Defunct { .. } => {
                    if !self.left {
                        out.push(Output::Notice(Notice::Defunct));
                    }
                }
                membership::Output::RegionUpdated { record } => {
                    regions_changed = true;
                    out.push(Output::Notice(Notice::RegionUpdated {
                        region: record.region,
                        version: record.version,
                    }));
                }
            }
        }
        if self.left {
            return;
        }
        if regions_changed {
            self.rebuild_regions();
        }
        if wan_changed {
            self.remote_rings = self.membership.remote_rings(self.config.ring);
        }
        if lan_changed {
            let new_ring = self.membership.local_ring(self.config.ring);
            let pulls = self.handoff.on_ring_change(&self.ring, &new_ring, now);
            self.ring = new_ring;
            self.send_pulls(pulls, out);
            out.push(Output::Notice(Notice::RingChanged {
                members: self.ring.members().len(),
                pending_spans: self.handoff.pending_spans(),
            }));
            self.retry_held(now, out);
        }
        if lan_changed || wan_changed || regions_changed || !down.is_empty() {
            // Gathered flows were routed by the old view: route them by the new one.
            let gathered = self.take_outbox();
            if !gathered.is_empty() {
                self.route_flows(gathered, now, out);
            }
        }
        for node_id in down {
            let ids: Vec<u64> = self
                .inflight
                .iter()
                .filter(|(_, f)| f.node_id == node_id)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                self.reroute_inflight(id, now, out);
            }
        }
    }

    /// Configured prefixes, with gossiped records merged over them.
    fn rebuild_regions(&mut self) {
        let records = self.membership.regions();
        let mut pairs: Vec<(IpNet, String)> = Vec::new();
        for record in &records {
            for net in &record.prefixes {
                pairs.push((*net, record.region.clone()));
            }
        }
        for (net, region) in &self.config.static_regions {
            if !pairs.iter().any(|(n, _)| n.trunc() == net.trunc()) {
                pairs.push((*net, region.clone()));
            }
        }
        match RegionMap::from_prefixes(pairs.iter().map(|(n, r)| (*n, r.as_str()))) {
            Ok(map) => self.regions = map,
            Err(e) => {
                tracing::warn!(error = %e, "region directory disagrees with itself; keeping the previous map")
            }
        }
    }
}

fn ack(out: &mut Vec<Output>, conn: ConnId, batch_id: u64, status: AckStatus) {
    out.push(Output::Frame {
        to: Dest::Conn(conn),
        message: Message::Ack(wire::Ack { batch_id, status }),
    });
}

fn snapshot_to_wire(ranges: &IpRanges) -> wire::SnapshotIp {
    wire::SnapshotIp {
        floor_ms: ranges.floor.map(|f| f.0),
        ip: ranges.ip,
        segments: ranges
            .segments
            .iter()
            .map(|s| wire::SnapshotSegment {
                start_ms: s.start.0,
                end_ms: s.end.0,
                owner: match &s.owner {
                    SegmentOwner::Workload(name) => wire::SnapshotOwner::Workload(name.clone()),
                    SegmentOwner::Conflict => wire::SnapshotOwner::Conflict,
                },
            })
            .collect(),
    }
}

fn snapshot_from_wire(ip: &wire::SnapshotIp) -> IpRanges {
    IpRanges {
        ip: ip.ip,
        floor: ip.floor_ms.map(UnixMillis),
        segments: ip
            .segments
            .iter()
            .map(|s| SegmentSnapshot {
                owner: match &s.owner {
                    wire::SnapshotOwner::Workload(name) => SegmentOwner::Workload(name.clone()),
                    wire::SnapshotOwner::Conflict => SegmentOwner::Conflict,
                },
                start: UnixMillis(s.start_ms),
                end: UnixMillis(s.end_ms),
            })
            .collect(),
    }
}

/// The exporter clock check of a core: δ from the engine, samples kept for three
/// heartbeat intervals, as many exporters as admission tracks.
fn exporter_clocks(config: &CoreConfig, admission: &AdmissionConfig) -> ExporterClocks {
    ExporterClocks::new(
        config.engine.skew_margin_ms,
        3 * config.handoff.heartbeat_interval_ms.max(1_000),
        admission.exporters_tracked_max,
    )
}
