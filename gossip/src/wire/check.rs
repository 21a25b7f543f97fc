//! The checks bytecheck cannot make, run on archived messages after validation: on what a
//! node receives, and on what it has just encoded before it sends it, so that the two sides
//! cannot drift apart.

use std::net::IpAddr;

use super::message::*;
use super::{Limit, WireError, WireLimits};

fn at_most(limit: Limit, value: usize, max: usize) -> Result<(), WireError> {
    if value > max {
        return Err(WireError::OverLimit { limit, value, max });
    }
    Ok(())
}

fn window(start_ms: u64, end_ms: u64) -> Result<(), WireError> {
    if end_ms < start_ms {
        return Err(WireError::InvertedWindow { start_ms, end_ms });
    }
    Ok(())
}

fn index(index: u32, entries: usize) -> Result<(), WireError> {
    if index as usize >= entries {
        return Err(WireError::BadIndex { index, entries });
    }
    Ok(())
}

/// Checks a dictionary and returns its length.
fn dictionary<'s>(
    names: impl ExactSizeIterator<Item = &'s str>,
    limits: &WireLimits,
) -> Result<usize, WireError> {
    let entries = names.len();
    at_most(
        Limit::DictionaryEntries,
        entries,
        limits.dictionary_entries_max,
    )?;
    for name in names {
        at_most(
            Limit::WorkloadNameBytes,
            name.len(),
            limits.workload_name_bytes_max,
        )?;
    }
    Ok(entries)
}

/// Checks flows given as (local workload index if any, start_ms, end_ms).
fn flows(
    flows: impl ExactSizeIterator<Item = (Option<u32>, u64, u64)>,
    entries: usize,
    limits: &WireLimits,
) -> Result<(), WireError> {
    at_most(
        Limit::FlowsPerBatch,
        flows.len(),
        limits.flows_per_batch_max,
    )?;
    for (workload, start_ms, end_ms) in flows {
        if let Some(workload) = workload {
            index(workload, entries)?;
        }
        window(start_ms, end_ms)?;
    }
    Ok(())
}

/// Checks claims given as (workload index, since_ms, until_ms).
fn claims(
    claims: impl ExactSizeIterator<Item = (u32, u64, u64)>,
    entries: usize,
    limits: &WireLimits,
) -> Result<(), WireError> {
    at_most(
        Limit::ClaimsPerBatch,
        claims.len(),
        limits.claims_per_batch_max,
    )?;
    for (workload, since_ms, until_ms) in claims {
        index(workload, entries)?;
        window(since_ms, until_ms)?;
    }
    Ok(())
}

/// Checks flows given as (local workload index, start_ms, end_ms).
fn region(name: &str, limits: &WireLimits) -> Result<(), WireError> {
    at_most(
        Limit::RegionNameBytes,
        name.len(),
        limits.region_name_bytes_max,
    )
}

/// Checks one IP's segments given as (workload name or `None` for conflict, start_ms,
/// end_ms): each in order, sorted, disjoint.
pub(super) fn segments<'s>(
    ip: IpAddr,
    segments: impl ExactSizeIterator<Item = (Option<&'s str>, u64, u64)>,
    limits: &WireLimits,
) -> Result<(), WireError> {
    at_most(
        Limit::SegmentsPerIp,
        segments.len(),
        limits.segments_per_ip_max,
    )?;
    let mut previous_end_ms: Option<u64> = None;
    for (owner, start_ms, end_ms) in segments {
        if let Some(name) = owner {
            at_most(
                Limit::WorkloadNameBytes,
                name.len(),
                limits.workload_name_bytes_max,
            )?;
        }
        window(start_ms, end_ms)?;
        if previous_end_ms.is_some_and(|previous| start_ms <= previous) {
            return Err(WireError::UnsortedSegments { ip, start_ms });
        }
        previous_end_ms = Some(end_ms);
    }
    Ok(())
}

fn prefix(addr: IpAddr, len: u8) -> Result<(), WireError> {
    let bits = match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    if len > bits {
        return Err(WireError::BadPrefix { addr, len });
    }
    Ok(())
}

/// Checks an archived message that bytecheck accepted.
pub(super) fn archived(message: &ArchivedMessage, limits: &WireLimits) -> Result<(), WireError> {
    match message {
        ArchivedMessage::ClaimBatch(batch) => {
            let entries = dictionary(batch.dictionary.iter().map(|s| s.as_str()), limits)?;
            claims(
                batch.claims.iter().map(|c| {
                    (
                        c.workload.to_native(),
                        c.since_ms.to_native(),
                        c.until_ms.to_native(),
                    )
                }),
                entries,
                limits,
            )
        }
        ArchivedMessage::FlowBatch(batch) => {
            region(&batch.region, limits)?;
            let entries = dictionary(batch.dictionary.iter().map(|s| s.as_str()), limits)?;
            flows(
                batch.flows.iter().map(|f| {
                    (
                        match f.local {
                            ArchivedLocalEnd::Workload(i) => Some(i.to_native()),
                            ArchivedLocalEnd::Unattributed(_) => None,
                        },
                        f.start_ms.to_native(),
                        f.end_ms.to_native(),
                    )
                }),
                entries,
                limits,
            )?;
            claims(
                batch.claims.iter().map(|c| {
                    (
                        c.workload.to_native(),
                        c.since_ms.to_native(),
                        c.until_ms.to_native(),
                    )
                }),
                entries,
                limits,
            )
        }
        ArchivedMessage::IpEventBatch(batch) => {
            at_most(
                Limit::IpEventsPerBatch,
                batch.events.len(),
                limits.ip_events_per_batch_max,
            )?;
            for event in batch.events.iter() {
                at_most(
                    Limit::OwnerNameBytes,
                    event.owner.len(),
                    limits.owner_name_bytes_max,
                )?;
            }
            Ok(())
        }
        ArchivedMessage::RangeSnapshot(snapshot) => {
            region(&snapshot.region, limits)?;
            at_most(
                Limit::SnapshotIps,
                snapshot.ips.len(),
                limits.snapshot_ips_max,
            )?;
            for ip in snapshot.ips.iter() {
                segments(
                    ip.ip.as_ipaddr(),
                    ip.segments.iter().map(|s| {
                        let owner = match &s.owner {
                            ArchivedSnapshotOwner::Workload(name) => Some(name.as_str()),
                            ArchivedSnapshotOwner::Conflict => None,
                        };
                        (owner, s.start_ms.to_native(), s.end_ms.to_native())
                    }),
                    limits,
                )?;
            }
            Ok(())
        }
        ArchivedMessage::RangeRequest(request) => {
            region(&request.region, limits)?;
            at_most(
                Limit::SpansPerRequest,
                request.spans.len(),
                limits.spans_per_request_max,
            )
        }
        ArchivedMessage::Ack(_) => Ok(()),
        ArchivedMessage::RegionDirectory(directory) => {
            at_most(
                Limit::DirectoryRegions,
                directory.regions.len(),
                limits.directory_regions_max,
            )?;
            for entry in directory.regions.iter() {
                region(&entry.region, limits)?;
                at_most(
                    Limit::PrefixesPerRegion,
                    entry.prefixes.len(),
                    limits.prefixes_per_region_max,
                )?;
                for p in entry.prefixes.iter() {
                    prefix(p.addr.as_ipaddr(), p.len)?;
                }
            }
            Ok(())
        }
    }
}
