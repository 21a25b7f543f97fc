//! Ownership ranges per IP, learned from heartbeats, and the attribution of flows by them.
//!
//! This crate is a sans-io library: it never reads a clock, never does IO and never draws
//! randomness. Every operation takes the current time as an argument.
//!
//! - [`Engine`]: ownership ranges, the event source for non-workload IPs, and the pending
//!   queue; flows in, verdicts out.
//! - [`LegacyAttributor`]: the event-only method tenure replaces, kept as the baseline.
//! - [`RegionMap`]: which region serves an IP, or `external`.

mod config;
mod engine;
mod events;
mod ip;
mod legacy;
mod pending;
mod ranges;
pub mod region;
pub mod snapshot;
mod table;
pub mod time;
mod workload;

pub use config::{ConfigError, EngineConfig, DEFAULT_HASH_SEED, RETENTION_MAX_MS};
pub use engine::{
    Attribution, Claim, ClaimEffect, ClaimError, ConflictFound, Engine, EngineStats, FlowQuery,
    IpEvent, Lookup, MemoryReport, Outputs, Reason, Resolved, Source, Verdict,
};
pub use legacy::{LegacyAttributor, LegacyConfig, LegacyEvent};
pub use region::{Locate, RegionError, RegionMap};
pub use snapshot::{IpRanges, SegmentOwner, SegmentSnapshot};
pub use time::{SteadyClock, UnixMillis, Window};
pub use workload::{InternError, WorkloadId, WORKLOAD_NAME_MAX_BYTES};

/// Property-test cases: `PROPTEST_CASES`, else 10,000 (what CI runs).
#[cfg(test)]
fn proptest_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}
