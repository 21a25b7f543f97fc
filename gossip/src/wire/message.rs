//! The messages, as owned Rust values. `rkyv` derives an `Archived*` twin of each, which is
//! what a receiver reads in place after validation.
//!
//! Conventions: times are Unix milliseconds (`_ms`), workload identities travel once per
//! batch in a dictionary and are referred to by index, IPs are `IpAddr` (archived as a tag
//! byte and 4 or 16 octets). Fields are ordered widest first to keep archived structs free
//! of padding.

use std::net::IpAddr;

use rkyv::{Archive, Deserialize, Serialize};

/// Every message that travels between nodes, one kind per variant.
///
/// One enum rather than one archived root per kind: the archived enum's tag is the kind, so
/// a receiver validates once and matches on [`ArchivedMessage`], and adding a kind is a
/// compile error wherever messages are handled.
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub enum Message {
    /// Ownership heartbeats forwarded to the owners of their IPs.
    ClaimBatch(ClaimBatch),
    /// Flows (and the exporter's heartbeats) from an exporter, or forwarded between
    /// collectors.
    FlowBatch(FlowBatch),
    /// Assignment events for IPs that run no exporter.
    IpEventBatch(IpEventBatch),
    /// Ranges handed to a new owner of some hash-ring spans.
    RangeSnapshot(RangeSnapshot),
    /// A new owner asking for the ranges of some hash-ring spans.
    RangeRequest(RangeRequest),
    /// The answer to a batch: accepted, rejected or busy.
    Ack(Ack),
    /// Which CIDR prefixes each region serves.
    RegionDirectory(RegionDirectory),
}

/// "Workload W (instance i) has owned this IP continuously since `since_ms`, as of
/// `until_ms`": one ownership heartbeat.
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub struct Claim {
    /// The claimed IP.
    pub ip: IpAddr,
    /// The workload, as an index into the batch's dictionary.
    pub workload: u32,
    /// The instance of the workload (a restart of it is another instance): claims of one
    /// instance that touch are merged, claims of two are not.
    pub instance: u64,
    /// Since when the instance has held the IP without interruption, Unix ms.
    pub since_ms: u64,
    /// Until when the claim vouches, Unix ms; at least `since_ms`.
    pub until_ms: u64,
}

/// Heartbeats forwarded by a collector to the R owners of their IPs.
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub struct ClaimBatch {
    /// Chosen by the sender, unique among its unacknowledged batches; echoed in [`Ack`].
    pub batch_id: u64,
    /// Workload identities referred to by index, each once.
    pub dictionary: Vec<String>,
    /// The claims.
    pub claims: Vec<Claim>,
}

/// Which side opened a flow, seen from the exporter's host.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum Direction {
    /// The local side connected out.
    Outbound,
    /// The remote side connected in.
    Inbound,
}

/// Why an exporter vouches for no workload on a flow's local end.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum LocalReason {
    /// The local IP changed owner during the flow, or too close to it to tell (within the
    /// exporter's margin): no one tenure covers the whole flow.
    Changed,
    /// No workload held the local IP during the flow, as far as the exporter knows.
    Unknown,
    /// The flow is older than the exporter's retained history of the local IP.
    Expired,
}

impl LocalReason {
    /// Every reason, in a fixed order (for counters and reports).
    pub const ALL: [LocalReason; 3] = [
        LocalReason::Changed,
        LocalReason::Unknown,
        LocalReason::Expired,
    ];

    /// The name in sinks and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            LocalReason::Changed => "local_changed",
            LocalReason::Unknown => "local_unknown",
            LocalReason::Expired => "local_expired",
        }
    }
}

/// Who the exporter says held a flow's local end.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum LocalEnd {
    /// One tenure of this workload (an index into the batch's dictionary) covered the
    /// whole flow.
    Workload(u32),
    /// No workload is vouched for, for this reason.
    Unattributed(LocalReason),
}

/// One TCP flow as an exporter saw it.
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub struct Flow {
    /// Stable across re-sends (snapshots of an ongoing flow, retries), so that duplicates
    /// of at-least-once delivery can be found.
    pub flow_id: u128,
    /// When the flow started, Unix ms by the exporter's clock.
    pub start_ms: u64,
    /// When it ended (or was last seen, if `ongoing`), Unix ms; at least `start_ms`.
    pub end_ms: u64,
    /// Payload bytes the local side sent and the peer acknowledged (SYN and FIN, which
    /// take one sequence number each, are not counted).
    pub bytes_sent: u64,
    /// Payload bytes the local side received in order (a FIN is not counted).
    pub bytes_received: u64,
    /// TCP segments the local side received, retransmissions and pure ACKs included.
    pub segs_in: u64,
    /// TCP segments the local side sent, retransmissions and pure ACKs included.
    pub segs_out: u64,
    /// Segments the local side retransmitted.
    pub retransmits: u64,
    /// The local side's smoothed round-trip time at the end of the flow (or at the
    /// snapshot), microseconds; 0 when the exporter had no RTT sample.
    pub rtt_us: u32,
    /// The local end's workload, or why there is none.
    pub local: LocalEnd,
    /// The exporter's side.
    pub local_ip: IpAddr,
    /// The peer's side, the one to attribute.
    pub remote_ip: IpAddr,
    /// Local TCP port.
    pub local_port: u16,
    /// Remote TCP port.
    pub remote_port: u16,
    /// Which side connected.
    pub direction: Direction,
    /// A snapshot of a flow still open: a later batch carries it again with the same id.
    pub ongoing: bool,
}

/// What an exporter sends each heartbeat interval (and what collectors forward to each
/// other): flows plus the exporter's ownership heartbeats, sharing one dictionary.
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub struct FlowBatch {
    /// Chosen by the sender, increasing per sender; echoed in [`Ack`].
    pub batch_id: u64,
    /// The exporter the flows came from (kept when a collector forwards them).
    pub exporter_id: u64,
    /// How many times collectors forwarded this batch; routers drop it past a limit, so
    /// disagreeing directories cannot bounce it forever.
    pub hops: u8,
    /// The sender's clock when it sent this copy, Unix ms (an exporter stamps every
    /// attempt); 0 when not stated. A collector compares an exporter's with the other
    /// exporters' to find a clock that disagrees with the fleet's.
    pub sent_ms: u64,
    /// The exporter's region.
    pub region: String,
    /// Workload identities referred to by index, each once.
    pub dictionary: Vec<String>,
    /// The flows.
    pub flows: Vec<Flow>,
    /// The exporter's heartbeats (one per local IP), sent even without flows.
    pub claims: Vec<Claim>,
}

/// Whether an IP was given to an owner or taken away.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum IpEventKind {
    /// The owner got the IP.
    Assign,
    /// The owner gave it up.
    Unassign,
}

/// One assignment event for an IP that runs no exporter (load balancer, NAT gateway).
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub struct IpEvent {
    /// When it happened, Unix ms.
    pub at_ms: u64,
    /// The IP.
    pub ip: IpAddr,
    /// Assigned or unassigned.
    pub kind: IpEventKind,
    /// The owner's name (a load balancer's, a database's).
    pub owner: String,
}

/// Events from the event feed, with how far the feed is complete.
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub struct IpEventBatch {
    /// Chosen by the sender; echoed in [`Ack`].
    pub batch_id: u64,
    /// Every event up to this instant, Unix ms, has been delivered.
    pub watermark_ms: u64,
    /// The events.
    pub events: Vec<IpEvent>,
}

/// Who a snapshot segment belongs to; mirrors `tenure_attribution::SegmentOwner`.
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub enum SnapshotOwner {
    /// One workload held the IP.
    Workload(String),
    /// Two or more workloads claimed it: never attributed.
    Conflict,
}

/// One segment `[start_ms, end_ms]` (both included) of an IP's history; mirrors
/// `tenure_attribution::SegmentSnapshot`.
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub struct SnapshotSegment {
    /// First instant, Unix ms.
    pub start_ms: u64,
    /// Last instant, Unix ms; at least `start_ms`.
    pub end_ms: u64,
    /// Whose it was.
    pub owner: SnapshotOwner,
}

/// The retained history of one IP; mirrors `tenure_attribution::IpRanges`.
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub struct SnapshotIp {
    /// History before this instant, Unix ms, was dropped; `None` when only retention applies.
    pub floor_ms: Option<u64>,
    /// The IP.
    pub ip: IpAddr,
    /// Sorted by start, never overlapping (checked on decode).
    pub segments: Vec<SnapshotSegment>,
}

/// Ranges sent to a new owner in answer to a [`RangeRequest`]. A large answer is split into
/// several snapshots (each under the frame limit); the final one has `last` set.
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub struct RangeSnapshot {
    /// The request answered.
    pub request_id: u64,
    /// The region whose ring the spans belong to.
    pub region: String,
    /// The last part of the answer.
    pub last: bool,
    /// The IPs, each once.
    pub ips: Vec<SnapshotIp>,
}

/// A span of the hash ring, carried as the `ring` module defines spans (both ends are ring
/// positions of IP hashes; a span with `start_hash > end_hash` wraps past `u64::MAX`).
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub struct HashSpan {
    /// Where the span starts on the ring.
    pub start_hash: u64,
    /// Where it ends.
    pub end_hash: u64,
}

/// "Send me your ranges of IPs in these spans": the pull of a handoff.
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub struct RangeRequest {
    /// Chosen by the requester; echoed in each [`RangeSnapshot`] of the answer.
    pub request_id: u64,
    /// The region whose ring the spans belong to.
    pub region: String,
    /// The spans.
    pub spans: Vec<HashSpan>,
}

/// Why a batch was refused for good (retrying the same bytes will not help).
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum RejectReason {
    /// It decoded but broke a rule the wire cannot check (an unknown exporter, say).
    Invalid,
    /// The receiver is not in the batch's region and cannot forward it.
    WrongRegion,
    /// Forwarded more times than allowed.
    TooManyHops,
    /// Sealed with an exporter credential the collectors' registry lists as revoked.
    Revoked,
}

/// The answer to a batch.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum AckStatus {
    /// Taken (journaled): the sender may forget it.
    Accepted,
    /// Refused for good: the sender drops it and counts it.
    Rejected(RejectReason),
    /// Not taken because a queue is full (backpressure): send it again after the delay.
    Busy {
        /// How long to wait before re-sending, in ms.
        retry_after_ms: u64,
    },
}

/// The answer to a [`FlowBatch`], [`ClaimBatch`] or [`IpEventBatch`].
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub struct Ack {
    /// The batch answered.
    pub batch_id: u64,
    /// What became of it.
    pub status: AckStatus,
}

/// One CIDR prefix: an address and how many leading bits count.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub struct Prefix {
    /// The network address.
    pub addr: IpAddr,
    /// Prefix length in bits: at most 32 for IPv4, 128 for IPv6 (checked on decode).
    pub len: u8,
}

/// The prefixes one region serves, as of its own version.
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub struct RegionPrefixes {
    /// This region's record version: a higher one replaces a lower one.
    pub version: u64,
    /// The region's name.
    pub region: String,
    /// Its prefixes.
    pub prefixes: Vec<Prefix>,
}

/// The region directory, whole (the answer to a pull on join).
#[derive(Archive, Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
#[rkyv(derive(Debug))]
pub struct RegionDirectory {
    /// The sender's directory version, for logs and metrics.
    pub version: u64,
    /// Each region once.
    pub regions: Vec<RegionPrefixes>,
}
