//! Conversions between the wire's messages and the plain types other crates use: range
//! snapshots (`tenure_attribution::snapshot`) and CIDR prefixes (`ipnet`), plus readers on
//! archived batches.

use ipnet::IpNet;
use tenure_attribution::{IpRanges, SegmentOwner, SegmentSnapshot, UnixMillis};

use super::check;
use super::message::*;
use super::{WireError, WireLimits};

/// Limits that only check order, for conversions of values that passed (or will pass)
/// the size limits elsewhere.
fn order_only() -> WireLimits {
    WireLimits {
        segments_per_ip_max: usize::MAX,
        workload_name_bytes_max: usize::MAX,
        ..WireLimits::default()
    }
}

impl From<&SegmentOwner> for SnapshotOwner {
    fn from(owner: &SegmentOwner) -> Self {
        match owner {
            SegmentOwner::Workload(name) => SnapshotOwner::Workload(name.clone()),
            SegmentOwner::Conflict => SnapshotOwner::Conflict,
        }
    }
}

impl From<SnapshotOwner> for SegmentOwner {
    fn from(owner: SnapshotOwner) -> Self {
        match owner {
            SnapshotOwner::Workload(name) => SegmentOwner::Workload(name),
            SnapshotOwner::Conflict => SegmentOwner::Conflict,
        }
    }
}

impl From<&ArchivedSnapshotOwner> for SegmentOwner {
    fn from(owner: &ArchivedSnapshotOwner) -> Self {
        match owner {
            ArchivedSnapshotOwner::Workload(name) => {
                SegmentOwner::Workload(name.as_str().to_owned())
            }
            ArchivedSnapshotOwner::Conflict => SegmentOwner::Conflict,
        }
    }
}

impl From<&SegmentSnapshot> for SnapshotSegment {
    fn from(segment: &SegmentSnapshot) -> Self {
        SnapshotSegment {
            start_ms: segment.start.0,
            end_ms: segment.end.0,
            owner: SnapshotOwner::from(&segment.owner),
        }
    }
}

impl TryFrom<SnapshotSegment> for SegmentSnapshot {
    type Error = WireError;

    /// Fails with [`WireError::InvertedWindow`] when the segment ends before it starts.
    fn try_from(segment: SnapshotSegment) -> Result<Self, WireError> {
        if segment.end_ms < segment.start_ms {
            return Err(WireError::InvertedWindow {
                start_ms: segment.start_ms,
                end_ms: segment.end_ms,
            });
        }
        Ok(SegmentSnapshot {
            owner: segment.owner.into(),
            start: UnixMillis(segment.start_ms),
            end: UnixMillis(segment.end_ms),
        })
    }
}

impl From<&IpRanges> for SnapshotIp {
    fn from(ranges: &IpRanges) -> Self {
        SnapshotIp {
            floor_ms: ranges.floor.map(|t| t.0),
            ip: ranges.ip,
            segments: ranges.segments.iter().map(SnapshotSegment::from).collect(),
        }
    }
}

impl From<IpRanges> for SnapshotIp {
    fn from(ranges: IpRanges) -> Self {
        SnapshotIp::from(&ranges)
    }
}

impl TryFrom<SnapshotIp> for IpRanges {
    type Error = WireError;

    /// Fails with [`WireError::InvertedWindow`] or [`WireError::UnsortedSegments`] unless
    /// the segments are in order and disjoint, as `IpRanges` promises.
    fn try_from(ip: SnapshotIp) -> Result<Self, WireError> {
        check::segments(
            ip.ip,
            ip.segments.iter().map(|s| (None, s.start_ms, s.end_ms)),
            &order_only(),
        )?;
        Ok(IpRanges {
            ip: ip.ip,
            floor: ip.floor_ms.map(UnixMillis),
            segments: ip
                .segments
                .into_iter()
                .map(SegmentSnapshot::try_from)
                .collect::<Result<_, _>>()?,
        })
    }
}

impl TryFrom<&ArchivedSnapshotIp> for IpRanges {
    type Error = WireError;

    /// Reads an IP's ranges straight from a received snapshot. Fails as the conversion from
    /// [`SnapshotIp`] does, which cannot happen for a snapshot that `wire::decode` returned.
    fn try_from(ip: &ArchivedSnapshotIp) -> Result<Self, WireError> {
        let addr = ip.ip.as_ipaddr();
        check::segments(
            addr,
            ip.segments
                .iter()
                .map(|s| (None, s.start_ms.to_native(), s.end_ms.to_native())),
            &order_only(),
        )?;
        Ok(IpRanges {
            ip: addr,
            floor: ip.floor_ms.as_ref().map(|t| UnixMillis(t.to_native())),
            segments: ip
                .segments
                .iter()
                .map(|s| SegmentSnapshot {
                    owner: SegmentOwner::from(&s.owner),
                    start: UnixMillis(s.start_ms.to_native()),
                    end: UnixMillis(s.end_ms.to_native()),
                })
                .collect(),
        })
    }
}

impl From<IpNet> for Prefix {
    fn from(net: IpNet) -> Self {
        Prefix {
            addr: net.addr(),
            len: net.prefix_len(),
        }
    }
}

impl TryFrom<Prefix> for IpNet {
    type Error = WireError;

    /// Fails with [`WireError::BadPrefix`] when the length is longer than the address.
    fn try_from(prefix: Prefix) -> Result<Self, WireError> {
        IpNet::new(prefix.addr, prefix.len).map_err(|_| WireError::BadPrefix {
            addr: prefix.addr,
            len: prefix.len,
        })
    }
}

impl TryFrom<&ArchivedPrefix> for IpNet {
    type Error = WireError;

    /// As the conversion from [`Prefix`]; cannot fail for a message `wire::decode` returned.
    fn try_from(prefix: &ArchivedPrefix) -> Result<Self, WireError> {
        IpNet::try_from(Prefix {
            addr: prefix.addr.as_ipaddr(),
            len: prefix.len,
        })
    }
}

impl ArchivedFlowBatch {
    /// The workload identity at `index` in this batch's dictionary, or `None` past its end
    /// (which `wire::decode` has ruled out for every index in the batch).
    pub fn workload(&self, index: u32) -> Option<&str> {
        self.dictionary.get(index as usize).map(|s| s.as_str())
    }
}

impl ArchivedClaimBatch {
    /// The workload identity at `index` in this batch's dictionary, or `None` past its end
    /// (which `wire::decode` has ruled out for every index in the batch).
    pub fn workload(&self, index: u32) -> Option<&str> {
        self.dictionary.get(index as usize).map(|s| s.as_str())
    }
}

impl ArchivedDirection {
    /// The owned direction.
    pub fn to_native(self) -> Direction {
        match self {
            ArchivedDirection::Outbound => Direction::Outbound,
            ArchivedDirection::Inbound => Direction::Inbound,
        }
    }
}
