//! Configuration files of the collector and the exporter: TOML, unknown keys rejected,
//! every field documented with its default. The doc comments double as the user docs
//! (see `deploy/README.md`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use tenure_attribution::EngineConfig;
use tenure_gossip::seal::{Keyring, SecretKey, KEY_BYTES};

/// Errors reading a configuration. Nothing was started.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// Checks a name that ends up in a path, a log or metric label, or a line another program
/// parses (node ids, regions): 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
fn plain_name(field: &'static str, name: &str) -> Result<(), ConfigError> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
    if name.is_empty() || name.len() > 64 || name.starts_with('.') || !name.bytes().all(allowed) {
        return Err(invalid(
            field,
            format!("{name:?}: must be 1 to 64 of A-Z a-z 0-9 . _ - (not starting with '.')"),
        ));
    }
    Ok(())
}

/// Reads and parses a TOML file into `T`.
pub fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Parses TOML text; `path` is for messages only.
pub fn parse<T: for<'de> Deserialize<'de>>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// A 256-bit key written as 64 hex digits.
pub fn parse_key(hex: &str) -> Result<SecretKey, ConfigError> {
    let hex = hex.trim();
    if hex.len() != KEY_BYTES * 2 {
        return Err(invalid(
            "key",
            format!("must be {} hex digits, got {}", KEY_BYTES * 2, hex.len()),
        ));
    }
    // Checked byte by byte: slicing the text could cut a multi-byte character (found by
    // the `collector_config` fuzz target).
    let digit = |b: u8| -> Result<u8, ConfigError> {
        char::from(b)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(|| invalid("key", "must be hex digits"))
    };
    let mut bytes = [0u8; KEY_BYTES];
    for (byte, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Ok(SecretKey::from_bytes(bytes))
}

/// Where a key comes from: inline hex, or a file holding the hex.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The key id stamped on sealed frames; all nodes sharing the key use the same id.
    /// Default 1.
    #[serde(default = "default_key_id")]
    pub key_id: u32,
    /// The key as 64 hex digits. Prefer `key_file` outside tests. Overridden by the
    /// environment variable `TENURE_CLUSTER_KEY`.
    #[serde(default)]
    pub key_hex: Option<String>,
    /// A file holding the key as 64 hex digits.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

fn default_key_id() -> u32 {
    1
}

impl KeyConfig {
    /// Resolves the key: the environment's `TENURE_CLUSTER_KEY`, else `key_hex`, else
    /// `key_file`.
    pub fn resolve(&self, env_override: Option<&str>) -> Result<SecretKey, ConfigError> {
        if let Some(hex) = env_override {
            return parse_key(hex);
        }
        if let Some(hex) = &self.key_hex {
            return parse_key(hex);
        }
        if let Some(path) = &self.key_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            return parse_key(&text);
        }
        Err(invalid(
            "key",
            "set key_hex, key_file or TENURE_CLUSTER_KEY",
        ))
    }
}

/// Where attributed flows are written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum SinkConfig {
    /// Rolling NDJSON files in a directory (the default).
    Files {
        /// The directory; created if missing. Default `./tenure-flows`.
        #[serde(default = "default_sink_dir")]
        dir: PathBuf,
        /// A new file is started after this many ms. Default 3,600,000 (1 h).
        #[serde(default = "default_roll_interval_ms")]
        roll_interval_ms: u64,
        /// ... or once a file reaches this many bytes. Default 268,435,456 (256 MiB).
        #[serde(default = "default_roll_bytes_max")]
        roll_bytes_max: u64,
        /// Files kept; the oldest are deleted past it. Default 168.
        #[serde(default = "default_files_max")]
        files_max: usize,
        /// Write the files with direct I/O (`O_DIRECT`), not through the page cache, where
        /// the filesystem allows it (a warning is logged where it does not). Default true:
        /// the collector never reads its sink back, and the copy into the page cache was
        /// the largest part of its CPU (README, Performance).
        #[serde(default = "yes")]
        direct_io: bool,
    },
    /// Rolling Parquet files in a directory, for data lakes. The schema is documented in
    /// `node/src/sink/parquet.rs`. A file becomes readable when it is rolled (Parquet
    /// writes its index last), so the default roll interval is shorter than for NDJSON.
    Parquet {
        /// The directory; created if missing. Default `./tenure-flows`.
        #[serde(default = "default_sink_dir")]
        dir: PathBuf,
        /// A new file is started after this many ms. Default 600,000 (10 min). Flows stay
        /// in the journal until their file is closed (a file without its footer is
        /// unreadable after a crash), so this also bounds how long the journal holds them.
        #[serde(default = "default_parquet_roll_interval_ms")]
        roll_interval_ms: u64,
        /// ... or once a file reaches this many bytes (compressed, written so far).
        /// Default 134,217,728 (128 MiB).
        #[serde(default = "default_parquet_roll_bytes_max")]
        roll_bytes_max: u64,
        /// Files kept; the oldest are deleted past it. Default 1,008 (a week of 10 min).
        #[serde(default = "default_parquet_files_max")]
        files_max: usize,
        /// Rows buffered in memory before they are written as one row group. Default
        /// 65,536.
        #[serde(default = "default_parquet_row_group_rows_max")]
        row_group_rows_max: usize,
    },
    /// One NDJSON line per flow on standard output.
    Stdout,
}

fn default_sink_dir() -> PathBuf {
    PathBuf::from("tenure-flows")
}
fn default_roll_interval_ms() -> u64 {
    3_600_000
}
fn default_roll_bytes_max() -> u64 {
    256 * 1024 * 1024
}
fn default_files_max() -> usize {
    168
}
fn default_parquet_roll_interval_ms() -> u64 {
    600_000
}
fn default_parquet_roll_bytes_max() -> u64 {
    128 * 1024 * 1024
}
fn default_parquet_files_max() -> usize {
    1_008
}
fn default_parquet_row_group_rows_max() -> usize {
    65_536
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig::Files {
            dir: default_sink_dir(),
            roll_interval_ms: default_roll_interval_ms(),
            roll_bytes_max: default_roll_bytes_max(),
            files_max: default_files_max(),
            direct_io: true,
        }
    }
}

/// `tenure collector --config collector.toml`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// This node's stable name (1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with `.`: it
    /// names the journal's folder under `data_dir`); the hash ring places nodes by it.
    /// Required.
    pub node_id: String,
    /// The region this collector serves (a name as `node_id`'s, e.g. `us-east-1`).
    /// Required.
    pub region: String,
    /// The prefixes of this region (CIDR), published to the whole cluster. Required.
    pub prefixes: Vec<IpNet>,
    /// Bump when `prefixes` change, so that the new record replaces the old. Default 1.
    #[serde(default = "one")]
    pub region_version: u64,
    /// Prefixes of other regions, known before the gossiped directory arrives:
    /// `{ "eu-west" = ["10.2.0.0/16"] }`. Default empty.
    #[serde(default)]
    pub regions: BTreeMap<String, Vec<IpNet>>,
    /// UDP address for SWIM gossip; port 0 picks one. Default `127.0.0.1:7946`.
    #[serde(default = "default_gossip_addr")]
    pub gossip_addr: SocketAddr,
    /// TCP address for the data plane (exporters and peers); port 0 picks one.
    /// Default `127.0.0.1:7947`.
    #[serde(default = "default_data_addr")]
    pub data_addr: SocketAddr,
    /// HTTP address (metrics, health, API, event feed); port 0 picks one.
    /// Default `127.0.0.1:9090`.
    #[serde(default = "default_http_addr")]
    pub http_addr: SocketAddr,
    /// HTTP addresses of other collectors by node id, for cluster-wide queries
    /// (`/v1/dependencies` asks every member). The gossip identity carries gossip and data
    /// addresses only; a member not listed here is asked at `peer_http_port` on the host
    /// of its data address. Default empty.
    #[serde(default)]
    pub peer_http_addrs: BTreeMap<String, SocketAddr>,
    /// The HTTP port of collectors not in `peer_http_addrs`. Default: this node's own
    /// HTTP port (a fleet that uses one port everywhere needs no configuration).
    #[serde(default)]
    pub peer_http_port: Option<u16>,
    /// The gossip addresses advertised to peers when binding a wildcard address.
    /// Default: the bound addresses.
    #[serde(default)]
    pub advertise_host: Option<std::net::IpAddr>,
    /// Gossip addresses of collectors to join through (any region). Default empty (the
    /// first node of a cluster).
    #[serde(default)]
    pub seeds: Vec<SocketAddr>,
    /// The cluster key: seals gossip and peer frames. Required.
    #[serde(default)]
    pub cluster_key: KeyConfig,
    /// A second cluster key, accepted but never sent with: the other half of a rotation
    /// (see `deploy/README.md`, "Rotating keys"). Reloaded on SIGHUP. Default none.
    #[serde(default)]
    pub cluster_key_also_accepted: Option<KeyConfig>,
    /// The key exporters seal their batches with; replies to an exporter are sealed with
    /// the key its batch came in with. Must differ from the cluster key, so that an
    /// exporter's key cannot speak for a collector. Required unless
    /// `dev_exporters_use_cluster_key`. Reloaded on SIGHUP.
    #[serde(default)]
    pub exporter_key: Option<KeyConfig>,
    /// A second exporter key, accepted but not used for anything else: lets exporters
    /// move to a new key one by one. Reloaded on SIGHUP. Default none.
    #[serde(default)]
    pub exporter_key_also_accepted: Option<KeyConfig>,
    /// The exporter registry: a file listing each exporter's own keys and what it may
    /// claim (`deploy/README.md`, "Exporter credentials"; format in `tenure::registry`).
    /// A batch counts as the exporter whose key opened it, and its claims must lie within
    /// that exporter's prefixes (and workload names, where listed). Holds secrets: readable
    /// by the collector only. Reloaded on SIGHUP. Set this or `exporter_key`, not both.
    /// Default none.
    #[serde(default)]
    pub exporter_registry: Option<PathBuf>,
    /// Development only: exporters seal with the cluster key, so any exporter could also
    /// speak as a collector. Logs a warning at start. Default false.
    #[serde(default)]
    pub dev_exporters_use_cluster_key: bool,
    /// How far behind the collector's clock an exporter claim's `until_ms` may be, in ms;
    /// older claims are refused (`tenure_claims_rejected_total{reason="stale"}`).
    /// Default 600,000 (10 min).
    #[serde(default = "default_claim_delay_max_ms")]
    pub claim_delay_max_ms: u64,
    /// How far ahead of the collector's clock an exporter claim may reach, in ms: the clock
    /// skew tolerated between hosts and collectors (`reason="future"`). Default 10,000.
    #[serde(default = "default_claim_skew_max_ms")]
    pub claim_skew_max_ms: u64,
    /// Claims per second one exporter may send, sustained (`reason="rate_limited"`; the
    /// batch is answered busy and retried). Default 2,000.
    #[serde(default = "default_exporter_claims_per_sec_max")]
    pub exporter_claims_per_sec_max: u32,
    /// Claims one exporter may send in a burst; at least 4,096 (one batch). Default 8,192.
    #[serde(default = "default_exporter_claims_burst_max")]
    pub exporter_claims_burst_max: u32,
    /// Flows per second one exporter may send, sustained; every batch counts as at least
    /// one flow, so floods of empty batches are limited too. Default 50,000.
    #[serde(default = "default_exporter_flows_per_sec_max")]
    pub exporter_flows_per_sec_max: u32,
    /// Flows one exporter may send in a burst; at least 16,384 (one batch).
    /// Default 65,536.
    #[serde(default = "default_exporter_flows_burst_max")]
    pub exporter_flows_burst_max: u32,
    /// Exporters whose rate budgets are tracked; idle ones are forgotten past it, and
    /// newcomers share one budget while every tracked one is busy. Default 65,536.
    #[serde(default = "default_exporters_tracked_max")]
    pub exporters_tracked_max: usize,
    /// How long a data-plane connection may stay silent, in ms; then it is closed.
    /// Default 120,000.
    #[serde(default = "default_conn_idle_timeout_ms")]
    pub conn_idle_timeout_ms: u64,
    /// How long one frame may take to arrive once it has begun, in ms (slow senders are
    /// cut off). Default 10,000.
    #[serde(default = "default_frame_read_timeout_ms")]
    pub frame_read_timeout_ms: u64,
    /// Inbound data-plane connections held at once from one IP address; past it new
    /// ones are closed. Default 256.
    #[serde(default = "default_connections_per_ip_max")]
    pub connections_per_ip_max: usize,
    /// How long an HTTP request may take, in ms: its headers must arrive within it (else
    /// the connection is closed), and its answer is 408 past it. Default 30,000 (above the
    /// cluster-wide dependency fan-out).
    #[serde(default = "default_http_request_timeout_ms")]
    pub http_request_timeout_ms: u64,
    /// Bearer token for `POST /v1/ip-events`. Default: none, and the endpoint answers 403.
    #[serde(default)]
    pub event_feed_token: Option<String>,
    /// How often exporters heartbeat, in ms; sets handoff timing. Default 10,000.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Owners of each IP on the region's ring. Default 2.
    #[serde(default = "default_replication")]
    pub replication: usize,
    /// Attribution engine limits and timings (skew margin, deadline, settling,
    /// retention...). Defaults: see the engine's documentation, except the two derived
    /// from the heartbeat interval when not written: `pending_deadline_ms`, 2 × heartbeat
    /// interval + 5,000, and `settle_ms`, heartbeat interval + δ + 250 ([`settle_ms_for`]).
    #[serde(default)]
    pub engine: Option<EngineSection>,
    /// Where attributed flows go. Default: rolling files in `./tenure-flows`.
    #[serde(default)]
    pub sink: SinkConfig,
    /// Accepted-but-unsettled flows above which exporters are told busy. Default 500,000.
    #[serde(default = "default_busy_flows_threshold")]
    pub busy_flows_threshold: usize,
    /// Flows held while a span's handoff completes. Default 200,000.
    #[serde(default = "default_held_flows_max")]
    pub held_flows_max: usize,
    /// Forwarded flows awaiting a peer's ack. Default 200,000.
    #[serde(default = "default_inflight_flows_max")]
    pub inflight_flows_max: usize,
    /// How long a forwarded batch may go unacknowledged before it is routed again, in ms.
    /// Default 5,000.
    #[serde(default = "default_forward_ack_timeout_ms")]
    pub forward_ack_timeout_ms: u64,
    /// Where the collector keeps its state: the journal of accepted flows not yet settled
    /// lives in `<data_dir>/<node_id>/journal`, so that a restarted collector (on the same
    /// directory) emits every flow it had acknowledged. Default `./tenure-data`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// How often the journal is fsynced (group commit), in ms; acknowledgements to
    /// exporters and peers wait for it, so it bounds their added latency. 1 to 1,000.
    /// Default 50: attribution does not wait for it (flows are decided whether or not
    /// their append is synced; only the ack waits), and an exporter sends once per
    /// heartbeat interval anyway. Under
    /// `tenure loadgen` a collector spent 9% less CPU per flow at 50 than at 10 (fewer
    /// fsyncs and wake-ups), and 17% less where exporters send on each ack (bigger batches).
    #[serde(default = "default_journal_fsync_interval_ms")]
    pub journal_fsync_interval_ms: u64,
    /// Flows waiting for the sink writer; when full the data plane waits. Default 65,536.
    #[serde(default = "default_sink_queue_flows_max")]
    pub sink_queue_flows_max: usize,
    /// How long a graceful shutdown waits for forwarded flows to be acknowledged, in ms.
    /// Default 5,000.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Collectors in the region / fleet, for SWIM tuning. Defaults 3 and 16.
    #[serde(default = "default_region_size")]
    pub region_size_hint: u32,
    #[serde(default = "default_fleet_size")]
    pub fleet_size_hint: u32,
    /// The admin surface (fault injection for chaos testing). Default: disabled.
    #[serde(default)]
    pub admin: AdminConfig,
}

/// `[admin]`: fault injection through HTTP (`/admin/clock`), for chaos testing only.
/// Disabled by default, and then its routes answer 404.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve `/admin/clock`, which sets an offset on this collector's clock (skew and
    /// jumps). Never in production: a wrong clock delays attribution for everyone whose
    /// flows this node judges. Default false.
    #[serde(default)]
    pub enable_faults: bool,
    /// The bearer token admin requests must carry, 16 to 256 bytes; required when
    /// `enable_faults`. Prefer `token_file` outside tests.
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the token (surrounding whitespace ignored).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// Bounds of an admin token, in bytes.
pub const ADMIN_TOKEN_BYTES_MIN: usize = 16;
pub const ADMIN_TOKEN_BYTES_MAX: usize = 256;

impl AdminConfig {
    /// The token admin requests must present: `None` when fault injection is disabled.
    pub fn resolve_token(&self) -> Result<Option<String>, ConfigError> {
        if !self.enable_faults {
            return Ok(None);
        }
        let token = match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => {
                return Err(invalid("admin", "set token or token_file, not both"));
            }
            (Some(t), None) => t.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
            (None, None) => {
                return Err(invalid(
                    "admin",
                    "enable_faults needs a token (token or token_file)",
                ));
            }
        };
        if !(ADMIN_TOKEN_BYTES_MIN..=ADMIN_TOKEN_BYTES_MAX).contains(&token.len()) {
            return Err(invalid(
                "admin.token",
                format!("must be {ADMIN_TOKEN_BYTES_MIN} to {ADMIN_TOKEN_BYTES_MAX} bytes"),
            ));
        }
        Ok(Some(token))
    }
}

fn yes() -> bool {
    true
}
fn one() -> u64 {
    1
}
fn default_gossip_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7946))
}
fn default_data_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7947))
}
fn default_http_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_heartbeat_interval_ms() -> u64 {
    10_000
}
fn default_replication() -> usize {
    2
}
fn default_busy_flows_threshold() -> usize {
    500_000
}
fn default_held_flows_max() -> usize {
    200_000
}
fn default_inflight_flows_max() -> usize {
    200_000
}
fn default_forward_ack_timeout_ms() -> u64 {
    5_000
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("tenure-data")
}
/// The values `journal_fsync_interval_ms` may take, in ms.
pub const JOURNAL_FSYNC_INTERVAL_MS: std::ops::RangeInclusive<u64> = 1..=1_000;

fn default_journal_fsync_interval_ms() -> u64 {
    50
}
fn default_sink_queue_flows_max() -> usize {
    65_536
}
fn default_shutdown_grace_ms() -> u64 {
    5_000
}
fn default_claim_delay_max_ms() -> u64 {
    600_000
}
fn default_claim_skew_max_ms() -> u64 {
    10_000
}
fn default_exporter_claims_per_sec_max() -> u32 {
    2_000
}
fn default_exporter_claims_burst_max() -> u32 {
    8_192
}
fn default_exporter_flows_per_sec_max() -> u32 {
    50_000
}
fn default_exporter_flows_burst_max() -> u32 {
    65_536
}
fn default_exporters_tracked_max() -> usize {
    65_536
}
fn default_conn_idle_timeout_ms() -> u64 {
    120_000
}
fn default_frame_read_timeout_ms() -> u64 {
    10_000
}
fn default_connections_per_ip_max() -> usize {
    256
}
fn default_http_request_timeout_ms() -> u64 {
    30_000
}
fn default_region_size() -> u32 {
    3
}
fn default_fleet_size() -> u32 {
    16
}

impl CollectorConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // The node id names the journal's folder under `data_dir`: a path of its own
        // (`/…`, `..`) would put the journal somewhere else. Regions are labels and words
        // of the `LISTENING` line, which a region with a space could forge.
        plain_name("node_id", &self.node_id)?;
        plain_name("region", &self.region)?;
        for region in self.regions.keys() {
            plain_name("regions", region)?;
        }
        if self.prefixes.is_empty() {
            return Err(invalid("prefixes", "at least one prefix is needed"));
        }
        if self.heartbeat_interval_ms == 0 {
            return Err(invalid("heartbeat_interval_ms", "must be above 0"));
        }
        if self.replication == 0 {
            return Err(invalid("replication", "must be above 0"));
        }
        if self.held_flows_max == 0
            || self.inflight_flows_max == 0
            || self.sink_queue_flows_max == 0
        {
            return Err(invalid("limits", "flow limits must be above 0"));
        }
        if let SinkConfig::Parquet {
            row_group_rows_max: 0,
            ..
        } = self.sink
        {
            return Err(invalid("sink.row_group_rows_max", "must be above 0"));
        }
        if !JOURNAL_FSYNC_INTERVAL_MS.contains(&self.journal_fsync_interval_ms) {
            return Err(invalid("journal_fsync_interval_ms", "must be 1 to 1,000"));
        }
        self.engine_config()
            .validate()
            .map_err(|e| invalid("engine", e.to_string()))?;
        if self.exporter_key.is_some() && self.exporter_registry.is_some() {
            return Err(invalid(
                "exporter_registry",
                "set exporter_registry (per-exporter credentials) or exporter_key (one shared key), not both",
            ));
        }
        if self.exporter_key.is_none()
            && self.exporter_registry.is_none()
            && !self.dev_exporters_use_cluster_key
        {
            return Err(invalid(
                "exporter_registry",
                "required: exporters need their own credentials (or exporter_key, one key they share; dev_exporters_use_cluster_key = true for development only)",
            ));
        }
        if self.exporter_claims_per_sec_max == 0 || self.exporter_flows_per_sec_max == 0 {
            return Err(invalid("exporter_*_per_sec_max", "must be above 0"));
        }
        if (self.exporter_claims_burst_max as usize)
            < tenure_gossip::wire::CLAIMS_PER_BATCH_MAX_DEFAULT
            || (self.exporter_flows_burst_max as usize)
                < tenure_gossip::wire::FLOWS_PER_BATCH_MAX_DEFAULT
        {
            return Err(invalid(
                "exporter_*_burst_max",
                "must hold one full batch (4,096 claims, 16,384 flows)",
            ));
        }
        if self.exporters_tracked_max == 0 || self.connections_per_ip_max == 0 {
            return Err(invalid(
                "exporters_tracked_max / connections_per_ip_max",
                "must be above 0",
            ));
        }
        if self.conn_idle_timeout_ms == 0
            || self.frame_read_timeout_ms == 0
            || self.http_request_timeout_ms == 0
        {
            return Err(invalid("*_timeout_ms", "must be above 0"));
        }
        if self.admin.enable_faults && self.admin.token.is_none() && self.admin.token_file.is_none()
        {
            return Err(invalid(
                "admin",
                "enable_faults needs a token (token or token_file)",
            ));
        }
        Ok(())
    }

    /// The keyrings this configuration asks for: the cluster's and (unless in development
    /// mode) the exporters', each with its second accepted key during a rotation.
    /// `cluster_env` is `TENURE_CLUSTER_KEY`, which overrides the cluster key.
    pub fn keyrings(
        &self,
        cluster_env: Option<&str>,
    ) -> Result<(Keyring, Option<Keyring>), ConfigError> {
        let cluster_key = self.cluster_key.resolve(cluster_env)?;
        let mut cluster = Keyring::new(self.cluster_key.key_id, &cluster_key);
        if let Some(also) = &self.cluster_key_also_accepted {
            cluster
                .accept(also.key_id, &also.resolve(None)?)
                .map_err(|e| invalid("cluster_key_also_accepted", e.to_string()))?;
        }
        let exporter = match &self.exporter_key {
            None => None,
            Some(k) => {
                let key = k.resolve(None)?;
                if key.same_as(&cluster_key) {
                    return Err(invalid(
                        "exporter_key",
                        "must differ from the cluster key (an exporter must not be able to speak for a collector)",
                    ));
                }
                let mut ring = Keyring::new(k.key_id, &key);
                if let Some(also) = &self.exporter_key_also_accepted {
                    let also_key = also.resolve(None)?;
                    if also_key.same_as(&cluster_key) {
                        return Err(invalid(
                            "exporter_key_also_accepted",
                            "must differ from the cluster key",
                        ));
                    }
                    ring.accept(also.key_id, &also_key)
                        .map_err(|e| invalid("exporter_key_also_accepted", e.to_string()))?;
                }
                Some(ring)
            }
        };
        Ok((cluster, exporter))
    }

    /// The limits on exporter input, for the core.
    pub fn admission(&self) -> crate::core::AdmissionConfig {
        crate::core::AdmissionConfig {
            claim_delay_max_ms: self.claim_delay_max_ms,
            claim_skew_max_ms: self.claim_skew_max_ms,
            exporter_claims_per_sec_max: self.exporter_claims_per_sec_max,
            exporter_claims_burst_max: self.exporter_claims_burst_max,
            exporter_flows_per_sec_max: self.exporter_flows_per_sec_max,
            exporter_flows_burst_max: self.exporter_flows_burst_max,
            exporters_tracked_max: self.exporters_tracked_max,
        }
    }

    /// The engine configuration: the `[engine]` section's settings (or the defaults), with
    /// the deadline and the settling time derived from the heartbeat interval unless the
    /// section writes them.
    pub fn engine_config(&self) -> EngineConfig {
        let section = self.engine.clone().unwrap_or_default();
        let mut engine = section.config;
        if !section.pending_deadline_written {
            engine.pending_deadline_ms = self
                .heartbeat_interval_ms
                .saturating_mul(2)
                .saturating_add(5_000);
        }
        if !section.settle_written {
            engine.settle_ms = settle_ms_for(self.heartbeat_interval_ms, engine.skew_margin_ms);
        }
        engine
    }
}

/// The `[engine]` section: the engine's settings, and whether the two that default to
/// values derived from the heartbeat interval were written (when not, they are derived, as
/// with no section at all).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineSection {
    pub config: EngineConfig,
    pub pending_deadline_written: bool,
    pub settle_written: bool,
}

impl<'de> Deserialize<'de> for EngineSection {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let table = toml::Table::deserialize(deserializer)?;
        let pending_deadline_written = table.contains_key("pending_deadline_ms");
        let settle_written = table.contains_key("settle_ms");
        // The engine's own field checks (unknown keys refused) on the same table.
        let config = toml::Value::Table(table)
            .try_into::<EngineConfig>()
            .map_err(serde::de::Error::custom)?;
        Ok(EngineSection {
            config,
            pending_deadline_written,
            settle_written,
        })
    }
}

/// How long a flow settles before its first lookup, for exporters heartbeating every
/// `heartbeat_interval_ms` with clocks within `skew_margin_ms` (δ): the heartbeat that
/// covers a flow's end plus δ is sent within one interval of it, and reaches the IP's
/// owners (one hop from the exporter's collector) within a few tens of ms more; 250 ms
/// leaves room for that hop and the collector's tick.
pub fn settle_ms_for(heartbeat_interval_ms: u64, skew_margin_ms: u64) -> u64 {
    heartbeat_interval_ms
        .saturating_add(skew_margin_ms)
        .saturating_add(SETTLE_SLACK_MS)
}

/// See [`settle_ms_for`].
const SETTLE_SLACK_MS: u64 = 250;

/// Where an exporter learns its local workloads.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum IdentityConfig {
    /// One workload per host: a JSON file `{"workload": "web", "ips": ["10.1.0.5"],
    /// "since_ms": 1700000000000}` (`since_ms` optional: when absent, the time the
    /// exporter first read the file, so no earlier time is ever claimed).
    HostFile { path: PathBuf },
    /// Many workloads per host: a JSON file kept current by an orchestrator,
    /// `{"10.1.0.5": {"workload": "web", "since_ms": 1700000000000}, ...}`. Re-read when
    /// it changes.
    MapFile { path: PathBuf },
    /// The pods of this node, from the Kubernetes API (list, then watch with
    /// `spec.nodeName=<node_name>`). See the deployment guide's "Kubernetes" section.
    Kubernetes {
        /// This node's name, as the API knows it. Default: the `NODE_NAME` environment
        /// variable (set from the downward API, `spec.nodeName`); one of the two is
        /// required.
        #[serde(default)]
        node_name: Option<String>,
        /// The API server's URL. Default: in-cluster (`KUBERNETES_SERVICE_HOST` and the
        /// service account's token and CA). An `http://` URL is used without credentials
        /// (`kubectl proxy`).
        #[serde(default)]
        api_server: Option<String>,
        /// How long after the watch broke the pods last known are still claimed, in ms
        /// (0 to 60,000); past it nothing is claimed until a relist. Default 5,000.
        #[serde(default = "default_staleness_limit_ms")]
        staleness_limit_ms: u64,
    },
    /// Containers of a Docker or Podman runtime, through the Docker Engine API on its unix
    /// socket: each running container's network IPs, held since the container's start or
    /// network connect, released at its die, stop or network-disconnect event.
    Containers {
        /// The API socket (`/run/docker.sock`, `/run/podman/podman.sock`). Required; it
        /// must exist when the exporter starts.
        socket: PathBuf,
        /// The container label naming its workload; without it, the compose service label
        /// (`com.docker.compose.service`), then the container's name. Default
        /// `tenure.workload`.
        #[serde(default = "default_workload_label")]
        workload_label: String,
        /// How long the last known containers are still claimed after the runtime became
        /// unreachable, in ms (at most 600,000); past it nothing new is claimed until it is
        /// back. A container that took an address meanwhile is not seen until then, so
        /// above 0 its flows can be stamped with the old owner. Default 0.
        #[serde(default = "default_stale_after_ms")]
        stale_after_ms: u64,
    },
}

fn default_staleness_limit_ms() -> u64 {
    crate::exporter::kubernetes::STALENESS_LIMIT_MS_DEFAULT
}

fn default_workload_label() -> String {
    crate::exporter::containers::WORKLOAD_LABEL_DEFAULT.to_owned()
}
fn default_stale_after_ms() -> u64 {
    crate::exporter::containers::STALE_AFTER_MS_DEFAULT
}

/// The largest `identity.stale_after_ms`.
pub const STALE_AFTER_MS_MAX: u64 = 600_000;

impl IdentityConfig {
    /// The Kubernetes node name: the config's, else `NODE_NAME` (`env`), checked as the
    /// API checks a node name (a DNS subdomain: 1 to 253 of `a-z 0-9 . -`).
    pub fn kubernetes_node_name(
        configured: Option<&str>,
        env: Option<&str>,
    ) -> Result<String, ConfigError> {
        let (field, name) = match (configured, env) {
            (Some(n), _) => ("identity.node_name", n),
            (None, Some(n)) => ("NODE_NAME", n),
            (None, None) => {
                return Err(invalid(
                    "identity.node_name",
                    "required: set it, or the NODE_NAME environment variable (downward API, spec.nodeName)",
                ))
            }
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !valid {
            return Err(invalid(
                field,
                format!("{name:?} is not a node name (1 to 253 of a-z 0-9 . -, alphanumeric at both ends)"),
            ));
        }
        Ok(name.to_string())
    }

    /// Checks what serde cannot: for containers, that the socket is there.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            IdentityConfig::HostFile { .. }
            | IdentityConfig::MapFile { .. }
            | IdentityConfig::Kubernetes { .. } => Ok(()),
            IdentityConfig::Containers {
                socket,
                workload_label,
                stale_after_ms,
            } => {
                use std::os::unix::fs::FileTypeExt as _;
                match std::fs::metadata(socket) {
                    Ok(m) if m.file_type().is_socket() => {}
                    Ok(_) => {
                        return Err(invalid(
                            "identity.socket",
                            format!("{} is not a unix socket", socket.display()),
                        ))
                    }
                    Err(e) => {
                        return Err(invalid(
                            "identity.socket",
                            format!("{}: {e}", socket.display()),
                        ))
                    }
                }
                if workload_label.is_empty() {
                    return Err(invalid("identity.workload_label", "must not be empty"));
                }
                if *stale_after_ms > STALE_AFTER_MS_MAX {
                    return Err(invalid(
                        "identity.stale_after_ms",
                        format!("must be at most {STALE_AFTER_MS_MAX}"),
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Where an exporter's flows come from.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    /// This host's TCP flows, captured with eBPF (needs root). Default.
    Ebpf {
        /// Open sockets whose start time the kernel keeps until they close: a power of two
        /// from 8 to 1,048,576, 24 bytes each. A socket whose birth was evicted (its bucket
        /// of four slots was full) is still reported, with an inexact start. Raise it on hosts with
        /// many more than 30,000 sockets open at once. Default 131,072 (3 MiB).
        #[serde(default = "default_births_max")]
        births_max: NonZeroU32,
    },
    /// A synthetic fleet (demo and load): workloads come and go and reuse IPs.
    Synthetic {
        /// Seed of the fleet model. Default 1.
        #[serde(default = "one")]
        seed: u64,
        /// The prefix whose addresses the synthetic workloads use. Required.
        prefix: IpNet,
        /// Flows per second. Default 200.
        #[serde(default = "default_flows_per_sec")]
        flows_per_sec: u32,
    },
}

fn default_flows_per_sec() -> u32 {
    200
}

fn default_births_max() -> NonZeroU32 {
    tenure_node_ebpf::CaptureOptions::default().births_max
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig::Ebpf {
            births_max: default_births_max(),
        }
    }
}

/// `tenure exporter --config exporter.toml`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExporterConfig {
    /// This exporter's id, unique in the fleet (e.g. a hash of the host name). Required.
    pub exporter_id: u64,
    /// The region this host is in (1 to 64 of `A-Z a-z 0-9 . _ -`, as the collectors'
    /// `region`). Required.
    pub region: String,
    /// Data addresses of collectors of this region; batches go to one, then the next on
    /// failure. Required unless `--output stdout`.
    #[serde(default)]
    pub collectors: Vec<SocketAddr>,
    /// How often a batch (flows + one heartbeat per local IP) is sent, in ms.
    /// Default 10,000.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// The key batches are sealed with: this exporter's own key, bound to its
    /// `exporter_id` in the collectors' `exporter_registry` (or, without a registry, the
    /// collectors' shared `exporter_key`).
    #[serde(default)]
    pub key: KeyConfig,
    /// Where local workload identities come from. Required for the eBPF source.
    #[serde(default)]
    pub identity: Option<IdentityConfig>,
    /// Where flows come from. Default: eBPF.
    #[serde(default)]
    pub source: SourceConfig,
    /// Batches kept while no collector acknowledges them; past it the oldest is dropped
    /// and counted. Default 360 (an hour at 10 s).
    #[serde(default = "default_buffer_batches_max")]
    pub buffer_batches_max: usize,
    /// Flows in one batch; more wait for the next. Default 16,384.
    #[serde(default = "default_batch_flows_max")]
    pub batch_flows_max: usize,
    /// How long to wait for an ack before trying the next collector, in ms. Default 5,000.
    #[serde(default = "default_forward_ack_timeout_ms")]
    pub ack_timeout_ms: u64,
    /// First retry delay after a failure, in ms; doubles up to `backoff_max_ms`.
    /// Default 200.
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    /// Longest retry delay, in ms. Default 10,000.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// HTTP address for `/metrics` and `/healthz`; none when absent. Default none.
    #[serde(default)]
    pub http_addr: Option<SocketAddr>,
    /// A folder where the exporter keeps its sender epoch (the file `epoch`), so that a
    /// restart stays accepted by collectors even when the host's clock was stepped back
    /// meanwhile. Default none: the epoch is the start time, and an exporter restarted
    /// with its clock behind its previous start is refused until the clock passes it.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// The most the identity source's times and the sockets' may disagree, in ms (0 to
    /// 60,000): a flow's local end is stamped with a workload only when one of its tenures
    /// covers the flow widened by this on both sides; otherwise it goes out
    /// `local_changed`. Default 100.
    #[serde(default = "default_local_margin_ms")]
    pub local_margin_ms: u64,
    /// How long the history of a local IP's owners is kept after a tenure ended, in ms (at
    /// least two heartbeat intervals); a flow reported later than that goes out
    /// `local_expired`. Default 900,000 (15 minutes).
    #[serde(default = "default_local_retention_ms")]
    pub local_retention_ms: u64,
    /// How late the identity source may learn that a local IP was released, in ms (0 to
    /// 60,000): heartbeats and stamped flows vouch for an IP only up to this long before
    /// the last read of the source, so that the host never claims time its workload may
    /// already have given the IP up in. Default 0 (an orchestrator that rewrites the map
    /// file as it releases an IP).
    #[serde(default)]
    pub local_source_lag_ms: u64,
}

fn default_local_margin_ms() -> u64 {
    crate::exporter::history::MARGIN_MS_DEFAULT
}
fn default_local_retention_ms() -> u64 {
    crate::exporter::history::RETENTION_MS_DEFAULT
}

/// The largest [`ExporterConfig::local_margin_ms`] and `local_source_lag_ms`.
pub const LOCAL_MARGIN_MS_MAX: u64 = 60_000;

fn default_buffer_batches_max() -> usize {
    360
}
fn default_batch_flows_max() -> usize {
    16_384
}
fn default_backoff_initial_ms() -> u64 {
    200
}
fn default_backoff_max_ms() -> u64 {
    10_000
}

impl ExporterConfig {
    /// The exporter core's limits.
    pub fn core_config(&self) -> crate::exporter::core::ExporterCoreConfig {
        crate::exporter::core::ExporterCoreConfig {
            history: crate::exporter::history::HistoryConfig {
                retention_ms: self.local_retention_ms,
                margin_ms: self.local_margin_ms,
                source_lag_ms: self.local_source_lag_ms,
                ..crate::exporter::history::HistoryConfig::default()
            },
            ..crate::exporter::core::ExporterCoreConfig::default()
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self, to_stdout: bool) -> Result<(), ConfigError> {
        plain_name("region", &self.region)?;
        if !to_stdout && self.collectors.is_empty() {
            return Err(invalid("collectors", "at least one collector is needed"));
        }
        if self.heartbeat_interval_ms == 0 {
            return Err(invalid("heartbeat_interval_ms", "must be above 0"));
        }
        if self.buffer_batches_max == 0 {
            return Err(invalid("buffer_batches_max", "must be above 0"));
        }
        if self.batch_flows_max == 0
            || self.batch_flows_max > tenure_gossip::wire::FLOWS_PER_BATCH_MAX_DEFAULT
        {
            return Err(invalid("batch_flows_max", "must be 1 to 16384"));
        }
        if self.local_margin_ms > LOCAL_MARGIN_MS_MAX {
            return Err(invalid(
                "local_margin_ms",
                format!("must be at most {LOCAL_MARGIN_MS_MAX}"),
            ));
        }
        if self.local_source_lag_ms > LOCAL_MARGIN_MS_MAX {
            return Err(invalid(
                "local_source_lag_ms",
                format!("must be at most {LOCAL_MARGIN_MS_MAX}"),
            ));
        }
        if self.local_retention_ms < self.heartbeat_interval_ms.saturating_mul(2) {
            return Err(invalid(
                "local_retention_ms",
                "must be at least two heartbeat intervals",
            ));
        }
        if let Some(identity) = &self.identity {
            identity.validate()?;
        }
        if let Some(IdentityConfig::Kubernetes {
            node_name,
            api_server,
            staleness_limit_ms,
        }) = &self.identity
        {
            // Without `node_name`, `NODE_NAME` is read and checked when the source starts.
            if let Some(name) = node_name {
                IdentityConfig::kubernetes_node_name(Some(name), None)?;
            }
            if let Some(url) = api_server {
                if !(url.starts_with("http://") || url.starts_with("https://"))
                    || url.parse::<axum::http::Uri>().is_err()
                {
                    return Err(invalid(
                        "identity.api_server",
                        format!("{url:?} is not an http:// or https:// URL"),
                    ));
                }
            }
            if *staleness_limit_ms > LOCAL_MARGIN_MS_MAX {
                return Err(invalid(
                    "identity.staleness_limit_ms",
                    format!("must be at most {LOCAL_MARGIN_MS_MAX}"),
                ));
            }
        }
        if let SourceConfig::Ebpf { births_max } = self.source {
            let (min, max) = (tenure_node_ebpf::BIRTHS_MIN, tenure_node_ebpf::BIRTHS_MAX);
            let births_max = births_max.get();
            if !births_max.is_power_of_two() || !(min..=max).contains(&births_max) {
                return Err(invalid(
                    "source.births_max",
                    format!("must be a power of two from {min} to {max}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Chain;

    /// What a person sees: the error and its causes.
    fn text_of(error: &ConfigError) -> String {
        Chain(error).to_string()
    }

    /// The least a collector's configuration must say.
    const MINIMAL: &str = r#"
        node_id = "a"
        region = "r"
        prefixes = ["10.0.0.0/16"]
        cluster_key = { key_hex = "0000000000000000000000000000000000000000000000000000000000000000" }
        exporter_key = { key_hex = "1111111111111111111111111111111111111111111111111111111111111111" }
    "#;

    #[test]
    fn unknown_keys_are_rejected_and_defaults_apply() {
        let text = MINIMAL;
        let config: CollectorConfig = parse(text, Path::new("t.toml")).unwrap();
        assert_eq!(config.heartbeat_interval_ms, 10_000);
        assert_eq!(config.engine_config().pending_deadline_ms, 25_000);
        assert_eq!(config.engine_config().settle_ms, 11_250);
        config.validate().unwrap();
        let bad = format!("{text}\nbogus = 1\n");
        let err = parse::<CollectorConfig>(&bad, Path::new("t.toml")).unwrap_err();
        let shown = text_of(&err);
        assert!(shown.starts_with("parsing t.toml: "), "{shown}");
        assert!(shown.contains("unknown field `bogus`"), "{shown}");
    }

    /// An `[engine]` section sets what it writes; the deadline and the settling time it
    /// leaves out are derived from the heartbeat interval (and the section's δ), as with no
    /// section; unknown keys in it are refused, and a settling time that reaches the
    /// deadline is refused.
    #[test]
    fn an_engine_section_keeps_the_derived_settings_it_does_not_write() {
        let config: CollectorConfig = parse(
            &format!("{MINIMAL}\nheartbeat_interval_ms = 2000\n[engine]\nskew_margin_ms = 250\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        let engine = config.engine_config();
        assert_eq!(engine.skew_margin_ms, 250);
        assert_eq!(engine.pending_deadline_ms, 9_000);
        assert_eq!(engine.settle_ms, 2_000 + 250 + 250);
        config.validate().unwrap();

        let written: CollectorConfig = parse(
            &format!("{MINIMAL}\n[engine]\nsettle_ms = 0\npending_deadline_ms = 7000\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(written.engine_config().settle_ms, 0);
        assert_eq!(written.engine_config().pending_deadline_ms, 7_000);

        let unknown = format!("{MINIMAL}\n[engine]\nsettle_msec = 10\n");
        let err = parse::<CollectorConfig>(&unknown, Path::new("t.toml")).unwrap_err();
        assert!(
            text_of(&err).contains("unknown field `settle_msec`"),
            "{}",
            text_of(&err)
        );

        let late: CollectorConfig = parse(
            &format!("{MINIMAL}\n[engine]\nsettle_ms = 30000\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        let err = late.validate().unwrap_err();
        assert!(
            text_of(&err).contains("settle_ms (30000) must be below pending_deadline_ms (25000)"),
            "{}",
            text_of(&err)
        );
    }

    #[test]
    fn node_ids_and_regions_are_plain_names() {
        let good = ["a", "us-east-1a", "node_07.b", &"x".repeat(64)];
        let bad = [
            "",
            "..",
            ".hidden",
            "/var/lib/x",
            "a/b",
            "a b",
            "r gossip=127.0.0.1:1",
            "\u{e9}",
            &"x".repeat(65),
        ];
        let collector = |field: &str, name: &str| -> String {
            match field {
                "node_id" => MINIMAL.replacen("node_id = \"a\"", &format!("node_id = {name:?}"), 1),
                "region" => MINIMAL.replacen("region = \"r\"", &format!("region = {name:?}"), 1),
                _ => format!("{MINIMAL}\n[regions]\n{name:?} = [\"10.9.0.0/16\"]\n"),
            }
        };
        let exporter = |name: &str| {
            format!("exporter_id = 1\nregion = {name:?}\ncollectors = [\"127.0.0.1:7947\"]\n")
        };
        for field in ["node_id", "region", "regions"] {
            for name in good {
                let config: CollectorConfig =
                    parse(&collector(field, name), Path::new("t.toml")).unwrap();
                config.validate().unwrap();
            }
            for name in bad {
                let config: CollectorConfig =
                    parse(&collector(field, name), Path::new("t.toml")).unwrap();
                let shown = text_of(&config.validate().unwrap_err());
                assert!(
                    shown.starts_with(&format!("{field}: ")),
                    "{name:?}: {shown}"
                );
            }
        }
        for name in good {
            let config: ExporterConfig = parse(&exporter(name), Path::new("e.toml")).unwrap();
            config.validate(false).unwrap();
        }
        for name in bad {
            let config: ExporterConfig = parse(&exporter(name), Path::new("e.toml")).unwrap();
            let shown = text_of(&config.validate(false).unwrap_err());
            assert!(shown.starts_with("region: "), "{name:?}: {shown}");
        }
    }

    #[test]
    fn admin_faults_are_off_by_default_and_need_a_token() {
        let base = MINIMAL;
        let config: CollectorConfig = parse(base, Path::new("t.toml")).unwrap();
        assert!(!config.admin.enable_faults);
        assert_eq!(config.admin.resolve_token().unwrap(), None);

        let no_token = format!("{base}\n[admin]\nenable_faults = true\n");
        let config: CollectorConfig = parse(&no_token, Path::new("t.toml")).unwrap();
        assert!(config.validate().is_err());
        assert!(config.admin.resolve_token().is_err());

        let short = format!("{base}\n[admin]\nenable_faults = true\ntoken = \"short\"\n");
        let config: CollectorConfig = parse(&short, Path::new("t.toml")).unwrap();
        assert!(config.admin.resolve_token().is_err());

        let good = format!(
            "{base}\n[admin]\nenable_faults = true\ntoken = \"a-long-enough-admin-token\"\n"
        );
        let config: CollectorConfig = parse(&good, Path::new("t.toml")).unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.admin.resolve_token().unwrap().as_deref(),
            Some("a-long-enough-admin-token")
        );

        let unknown = format!("{base}\n[admin]\nenable_faults = true\nbogus = 1\n");
        let err = parse::<CollectorConfig>(&unknown, Path::new("t.toml")).unwrap_err();
        let shown = text_of(&err);
        assert!(shown.starts_with("parsing t.toml: "), "{shown}");
        assert!(shown.contains("unknown field `bogus`"), "{shown}");
    }

    #[test]
    fn keys_must_be_64_hex_digits() {
        assert!(parse_key("zz").is_err());
        assert!(parse_key(&"g".repeat(64)).is_err());
        assert!(parse_key(&"a".repeat(64)).is_ok());
        assert!(parse_key(&"A".repeat(64)).is_ok());
        assert!(
            parse_key(&"+1".repeat(32)).is_err(),
            "a sign is not a digit"
        );
    }

    /// Regression (fuzz target `collector_config`, crash-a225ae6f): 64 bytes of text whose
    /// characters are not all one byte long used to panic slicing the key.
    #[test]
    fn a_key_with_multibyte_characters_is_an_error_not_a_panic() {
        assert!(parse_key(&format!("{}é", "a".repeat(62))).is_err());
        assert!(parse_key(&"é".repeat(32)).is_err());
        let crash: &[u8] = include_bytes!("../fuzz/regressions/collector_config-crash-a225ae6f");
        let text = String::from_utf8_lossy(crash);
        assert!(parse_key(&text).is_err());
        let _ = parse::<CollectorConfig>(&text, Path::new("crash.toml"));
    }

    #[test]
    fn the_engine_hash_seed_is_not_read_from_a_file() {
        // Drawn from the OS at start; a seed written in a file could be read and aimed at.
        let text = format!("{MINIMAL}\n[engine]\nhash_seed = 5\n");
        let err = parse::<CollectorConfig>(&text, Path::new("t.toml")).unwrap_err();
        let shown = text_of(&err);
        assert!(shown.starts_with("parsing t.toml: "), "{shown}");
        assert!(shown.contains("unknown field `hash_seed`"), "{shown}");
    }

    #[test]
    fn a_containers_identity_needs_an_existing_socket() {
        let base = r#"
            exporter_id = 1
            region = "r"
            collectors = ["127.0.0.1:7947"]
        "#;
        let check = |identity: &str| -> Result<ExporterConfig, ConfigError> {
            let config: ExporterConfig = parse(
                &format!("{base}\nidentity = {identity}\n"),
                Path::new("e.toml"),
            )?;
            config.validate(false)?;
            Ok(config)
        };
        let missing = text_of(&check(r#"{ kind = "containers" }"#).unwrap_err());
        assert!(missing.contains("missing field `socket`"), "{missing}");
        let absent = text_of(
            &check(r#"{ kind = "containers", socket = "/nonexistent/docker.sock" }"#).unwrap_err(),
        );
        assert!(absent.contains("identity.socket"), "{absent}");
        assert!(absent.contains("/nonexistent/docker.sock"), "{absent}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, "").unwrap();
        let plain = text_of(
            &check(&format!(
                r#"{{ kind = "containers", socket = "{}" }}"#,
                file.display()
            ))
            .unwrap_err(),
        );
        assert!(
            plain.contains("identity.socket") && plain.contains("not a unix socket"),
            "{plain}"
        );
        let socket = dir.path().join("api.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let config = check(&format!(
            r#"{{ kind = "containers", socket = "{}" }}"#,
            socket.display()
        ))
        .unwrap();
        assert_eq!(
            config.identity,
            Some(IdentityConfig::Containers {
                socket: socket.clone(),
                workload_label: "tenure.workload".into(),
                stale_after_ms: 0,
            })
        );
        let stale = text_of(
            &check(&format!(
                r#"{{ kind = "containers", socket = "{}", stale_after_ms = 600001 }}"#,
                socket.display()
            ))
            .unwrap_err(),
        );
        assert!(stale.contains("identity.stale_after_ms"), "{stale}");
    }

    #[test]
    fn exporter_births_table_is_sized_by_its_source() {
        let base = r#"
            exporter_id = 1
            region = "r"
            collectors = ["127.0.0.1:7947"]
        "#;
        let births = |text: &str| {
            let config: ExporterConfig = parse(text, Path::new("e.toml"))?;
            config.validate(false)?;
            match config.source {
                SourceConfig::Ebpf { births_max } => Ok(births_max.get()),
                SourceConfig::Synthetic { .. } => panic!("not the eBPF source"),
            }
        };
        let default = tenure_node_ebpf::CaptureOptions::default().births_max.get();
        assert_eq!(
            births(base).unwrap(),
            default,
            "no source: eBPF, default size"
        );
        let kind_only = format!("{base}\nsource = {{ kind = \"ebpf\" }}\n");
        assert_eq!(births(&kind_only).unwrap(), default);
        let sized = format!("{base}\nsource = {{ kind = \"ebpf\", births_max = 1048576 }}\n");
        assert_eq!(births(&sized).unwrap(), 1 << 20);
        let zero = format!("{base}\nsource = {{ kind = \"ebpf\", births_max = 0 }}\n");
        let shown = text_of(&births(&zero).unwrap_err());
        assert!(shown.starts_with("parsing e.toml: "), "{shown}");
        assert!(shown.contains("births_max = 0"), "{shown}");
        assert!(shown.contains("expected a nonzero u32"), "{shown}");
        for bad in [4, 100_000, 1 << 21] {
            let text = format!("{base}\nsource = {{ kind = \"ebpf\", births_max = {bad} }}\n");
            let shown = text_of(&births(&text).unwrap_err());
            assert!(shown.starts_with("source.births_max: "), "{bad}: {shown}");
        }
        let unknown = format!("{base}\nsource = {{ kind = \"ebpf\", birth_max = 8 }}\n");
        let shown = text_of(&births(&unknown).unwrap_err());
        assert!(shown.starts_with("parsing e.toml: "), "{shown}");
        assert!(shown.contains("unknown field `birth_max`"), "{shown}");
    }
}

#[cfg(test)]
mod deploy_examples {
    use super::*;

    #[test]
    fn the_shipped_example_configs_parse_and_validate() {
        for (name, text) in [
            (
                "collector-us-east-a.toml",
                include_str!("../deploy/collector-us-east-a.toml"),
            ),
            (
                "collector-eu-west-a.toml",
                include_str!("../deploy/collector-eu-west-a.toml"),
            ),
        ] {
            let config: CollectorConfig = parse(text, Path::new(name)).unwrap();
            config.validate().unwrap();
        }
        let exporter: ExporterConfig = parse(
            include_str!("../deploy/exporter.toml"),
            Path::new("exporter.toml"),
        )
        .unwrap();
        exporter.validate(false).unwrap();
    }

    #[test]
    fn the_shipped_example_registry_loads_with_its_keys_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let text = include_str!("../deploy/exporters.toml").replace(
            "/etc/tenure/exporters/",
            &format!("{}/", dir.path().display()),
        );
        for id in ["4242", "4243"] {
            crate::registry::keygen(&dir.path().join(format!("{id}.key"))).unwrap();
        }
        let cluster = parse_key(&"11".repeat(32)).unwrap();
        let registry =
            crate::registry::Registry::parse(&text, Path::new("exporters.toml"), &cluster).unwrap();
        assert_eq!(registry.keys.owner_of(424201), Some(4242));
        assert_eq!(registry.counts(), (2, 0));
    }
}
