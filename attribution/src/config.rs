//! The engine's configuration: every limit named, with its unit and default.

use std::num::NonZeroUsize;

use crate::ranges::RANGES_PER_IP_LIMIT;

/// Configuration of an attribution [`Engine`](crate::Engine).
///
/// Durations are in milliseconds. The defaults assume a 10 s heartbeat interval.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// δ: the most two hosts' clocks may disagree. A flow at time t is attributed to W only
    /// when one range of W covers `[t − δ, t + δ]`. Default 1,000 ms.
    pub skew_margin_ms: u64,
    /// How long a flow may wait for its remote IP's history to cover it before it is
    /// emitted unattributed. Default 25,000 ms: two heartbeat intervals plus replication.
    /// Counted from the flow's arrival, its settling time included.
    pub pending_deadline_ms: u64,
    /// How long after its end a flow is first looked up (by the engine's clock, and at
    /// most this long after it arrives). Until then it waits in arrival order, unindexed:
    /// a flow that ends now cannot be covered before its remote IP's next heartbeat, so
    /// looking it up on arrival only finds it pending, and the pending queue (indexed by IP
    /// and deadline, retried by every claim of its IP) is the costly place to wait. A flow
    /// not covered when it settles waits there as before. Set it to about one heartbeat
    /// interval plus δ to decide nearly every flow once; 0 looks every flow up on arrival.
    /// Below `pending_deadline_ms`. Default 0.
    pub settle_ms: u64,
    /// History older than this is dropped; flows before it answer `expired`.
    /// Default 3,600,000 ms (1 h). At most 40 days.
    pub retention_ms: u64,
    /// Claims that state a time later than the engine's `now` plus this are rejected.
    /// Default 60,000 ms.
    pub claim_future_max_ms: u64,
    /// Flows waiting at once, settling ones included; past it a flow is emitted
    /// unattributed with reason `overload`. Default 1,000,000.
    pub pending_flows_max: NonZeroUsize,
    /// Segments kept per IP; past it the oldest are dropped and the IP's history starts
    /// later. Default 64.
    pub ranges_per_ip_max: NonZeroUsize,
    /// IPs with history held at once; a claim for a new IP past it is rejected and
    /// counted. Default 10,000,000.
    pub ips_max: NonZeroUsize,
    /// Events kept per non-workload IP. Default 64.
    pub events_per_ip_max: NonZeroUsize,
    /// Distinct workload names held at once. Default 1,000,000.
    pub workloads_max: NonZeroUsize,
    /// How often retention is applied to the whole table. Default 10,000 ms.
    pub sweep_interval_ms: u64,
    /// Seeds the engine's hash tables. The engine draws no randomness: a collector passes
    /// one drawn from the OS, so that an exporter cannot choose IPs or workload names whose
    /// hashes collide and slow every lookup; the simulator and tests keep the default.
    /// Default [`DEFAULT_HASH_SEED`]; not read from configuration files.
    #[serde(skip)]
    pub hash_seed: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            skew_margin_ms: 1_000,
            pending_deadline_ms: 25_000,
            settle_ms: 0,
            retention_ms: 3_600_000,
            claim_future_max_ms: 60_000,
            pending_flows_max: NonZeroUsize::new(1_000_000).expect("non-zero"),
            ranges_per_ip_max: NonZeroUsize::new(64).expect("non-zero"),
            ips_max: NonZeroUsize::new(10_000_000).expect("non-zero"),
            events_per_ip_max: NonZeroUsize::new(64).expect("non-zero"),
            workloads_max: NonZeroUsize::new(1_000_000).expect("non-zero"),
            sweep_interval_ms: 10_000,
            hash_seed: DEFAULT_HASH_SEED,
        }
    }
}

/// [`EngineConfig::hash_seed`] by default: fine for tests and the simulator, whose keys
/// nobody outside picks.
pub const DEFAULT_HASH_SEED: u64 = 0x7465_6e75_7265;

/// The longest retention accepted: segments store their length in 32 bits of
/// milliseconds (49.7 days), which must hold retention plus future skew.
pub const RETENTION_MAX_MS: u64 = 40 * 24 * 3_600_000;

/// A configuration that cannot work. Nothing was built when one is returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("retention_ms must be 1 to {RETENTION_MAX_MS}, got {0}")]
    Retention(u64),
    #[error("claim_future_max_ms must be at most 86400000 (1 day), got {0}")]
    FutureMax(u64),
    #[error("skew_margin_ms must be below retention_ms")]
    SkewMargin,
    #[error("settle_ms ({settle_ms}) must be below pending_deadline_ms ({pending_deadline_ms})")]
    Settle {
        settle_ms: u64,
        pending_deadline_ms: u64,
    },
    #[error("{field} must be at most {max}, got {value}")]
    TooLarge {
        field: &'static str,
        max: usize,
        value: usize,
    },
}

impl EngineConfig {
    /// Checks the constraints documented on each field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.retention_ms == 0 || self.retention_ms > RETENTION_MAX_MS {
            return Err(ConfigError::Retention(self.retention_ms));
        }
        if self.claim_future_max_ms > 86_400_000 {
            return Err(ConfigError::FutureMax(self.claim_future_max_ms));
        }
        if self.skew_margin_ms >= self.retention_ms {
            return Err(ConfigError::SkewMargin);
        }
        if self.settle_ms > 0 && self.settle_ms >= self.pending_deadline_ms {
            return Err(ConfigError::Settle {
                settle_ms: self.settle_ms,
                pending_deadline_ms: self.pending_deadline_ms,
            });
        }
        let id_max = u32::MAX as usize - 1;
        for (field, value) in [
            ("pending_flows_max", self.pending_flows_max.get()),
            ("workloads_max", self.workloads_max.get()),
            ("ranges_per_ip_max", self.ranges_per_ip_max.get()),
            ("events_per_ip_max", self.events_per_ip_max.get()),
        ] {
            if value > id_max {
                return Err(ConfigError::TooLarge {
                    field,
                    max: id_max,
                    value,
                });
            }
        }
        if self.ranges_per_ip_max.get() > RANGES_PER_IP_LIMIT {
            return Err(ConfigError::TooLarge {
                field: "ranges_per_ip_max",
                max: RANGES_PER_IP_LIMIT,
                value: self.ranges_per_ip_max.get(),
            });
        }
        // Segments are addressed by u32 offsets in one arena per address family.
        let arena_max = u32::MAX as usize / self.ranges_per_ip_max.get();
        if self.ips_max.get() > arena_max {
            return Err(ConfigError::TooLarge {
                field: "ips_max",
                max: arena_max,
                value: self.ips_max.get(),
            });
        }
        Ok(())
    }
}
