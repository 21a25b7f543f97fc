//! Ranges as they leave and enter an engine: for handoff to a new owner of an IP, and for
//! the HTTP API. Plain data with owned strings, independent of any engine's interning.

use std::net::IpAddr;

use crate::time::UnixMillis;

/// Who a segment of an IP's history belongs to.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum SegmentOwner {
    /// One workload held the IP throughout the segment (learned from heartbeats).
    Workload(String),
    /// Two or more workloads claimed the segment: nothing in it is ever attributed.
    Conflict,
}

/// One segment `[start, end]` (both included) of an IP's ownership history.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SegmentSnapshot {
    pub owner: SegmentOwner,
    pub start: UnixMillis,
    pub end: UnixMillis,
}

/// The whole retained history of one IP: segments sorted by start, never overlapping.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct IpRanges {
    pub ip: IpAddr,
    /// History before this instant was dropped (per-IP range limit); lookups that reach
    /// before it answer `expired`. `None` when only global retention applies.
    pub floor: Option<UnixMillis>,
    pub segments: Vec<SegmentSnapshot>,
}
