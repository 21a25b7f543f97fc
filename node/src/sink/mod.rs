//! Sinks: where attributed flows are written. Rolling NDJSON files (the default), rolling
//! Parquet files ([`parquet`]) for data lakes, or stdout, one JSON object per line.
//! [`Writer`] is the one entry point the collector's sink task uses.

pub mod parquet;

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tenure_attribution::Verdict;

use crate::config::SinkConfig;
use crate::core::EmittedFlow;

pub use self::parquet::ParquetFiles;

/// The configured sink, opened.
#[derive(Debug)]
pub enum Writer {
    Files {
        files: RollingFiles,
        /// Reused between writes so that a batch is formatted without allocating.
        lines: Vec<u8>,
    },
    /// Boxed: the Arrow writer's state is large and this enum lives on a task's stack.
    Parquet(Box<ParquetFiles>),
    Stdout,
}

impl Writer {
    /// Opens the sink `config` describes (creates its directory).
    pub fn open(config: &SinkConfig) -> Result<Writer, SinkError> {
        Ok(match config {
            SinkConfig::Files {
                dir,
                roll_interval_ms,
                roll_bytes_max,
                files_max,
            } => Writer::Files {
                files: RollingFiles::new(dir, *roll_interval_ms, *roll_bytes_max, *files_max)?,
                lines: Vec::with_capacity(SINK_WRITE_CHUNK_BYTES + LINE_BYTES_TYPICAL),
            },
            SinkConfig::Parquet {
                dir,
                roll_interval_ms,
                roll_bytes_max,
                files_max,
                row_group_rows_max,
            } => Writer::Parquet(Box::new(ParquetFiles::new(
                dir,
                *roll_interval_ms,
                *roll_bytes_max,
                *files_max,
                *row_group_rows_max,
            )?)),
            SinkConfig::Stdout => Writer::Stdout,
        })
    }

    /// Writes `flows`; `now_ms` decides rolling.
    pub fn write(&mut self, flows: &[EmittedFlow], now_ms: u64) -> Result<(), SinkError> {
        if flows.is_empty() {
            return Ok(());
        }
        match self {
            Writer::Files { files, lines } => {
                lines.clear();
                for flow in flows {
                    write_line(flow, lines);
                    if lines.len() >= SINK_WRITE_CHUNK_BYTES {
                        files.write(lines, now_ms)?;
                        lines.clear();
                    }
                }
                if lines.is_empty() {
                    return Ok(());
                }
                files.write(lines, now_ms)
            }
            Writer::Parquet(files) => files.write(flows, now_ms),
            Writer::Stdout => {
                let mut lines = Vec::with_capacity(flows.len() * 512);
                for flow in flows {
                    write_line(flow, &mut lines);
                }
                let mut out = io::stdout().lock();
                out.write_all(&lines)
                    .and_then(|()| out.flush())
                    .map_err(|source| SinkError::File {
                        path: PathBuf::from("<stdout>"),
                        source,
                    })
            }
        }
    }

    /// Called periodically: flushes and syncs buffers, and rolls a Parquet file whose time
    /// is up (a Parquet file is readable only once closed, so it must not wait for the
    /// next flow to roll).
    pub fn tick(&mut self, now_ms: u64) -> Result<(), SinkError> {
        match self {
            Writer::Files { files, .. } => files.sync(),
            Writer::Parquet(files) => files.tick(now_ms),
            Writer::Stdout => Ok(()),
        }
    }

    /// Flows handed to [`Writer::write`] that a `kill -9` or a power loss could still take
    /// away: the collector releases journal entries only for the flows before them. Files:
    /// none right after [`Writer::tick`] (it flushes and syncs); Parquet: the rows of the
    /// open file, until it rolls; stdout: none (what left the process is the reader's).
    pub fn unsettled_flows(&self) -> u64 {
        match self {
            Writer::Files { .. } | Writer::Stdout => 0,
            Writer::Parquet(files) => files.rows_open(),
        }
    }

    /// Syncs and closes the current file (at shutdown).
    pub fn close(&mut self) -> Result<(), SinkError> {
        match self {
            Writer::Files { files, .. } => files.sync(),
            Writer::Parquet(files) => files.close(),
            Writer::Stdout => Ok(()),
        }
    }
}

/// One side of a flow, as written.
#[derive(Serialize, Debug)]
pub struct EndLine<'a> {
    pub ip: String,
    pub port: u16,
    pub workload: Option<&'a str>,
}

/// One line of a sink: a flow, both ends, and its verdict.
#[derive(Serialize, Debug)]
pub struct FlowLine<'a> {
    /// 32 hex digits; duplicates of at-least-once delivery share it.
    pub flow_id: String,
    pub local: EndLine<'a>,
    pub remote: EndLine<'a>,
    /// `attributed` or `unattributed`.
    pub result: &'static str,
    /// `heartbeat`, `event` or `external` when attributed.
    pub source: Option<&'static str>,
    /// Why, when unattributed.
    pub reason: Option<&'static str>,
    pub start_ms: u64,
    pub end_ms: u64,
    pub emitted_ms: u64,
    pub waited_ms: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub direction: &'static str,
    pub ongoing: bool,
    pub exporter_id: u64,
    pub exporter_region: &'a str,
}

impl<'a> FlowLine<'a> {
    pub fn new(flow: &'a EmittedFlow) -> FlowLine<'a> {
        let r = &flow.record;
        FlowLine {
            flow_id: format!("{:032x}", r.flow_id),
            local: EndLine {
                ip: r.local_ip.to_string(),
                port: r.local_port,
                workload: Some(&r.local_workload),
            },
            remote: EndLine {
                ip: r.remote_ip.to_string(),
                port: r.remote_port,
                workload: flow.remote_workload().map(|w| &**w),
            },
            result: flow.result(),
            source: flow.source(),
            reason: flow.reason().map(|r| r.as_str()),
            start_ms: r.start_ms,
            end_ms: r.end_ms,
            emitted_ms: flow.emitted_ms,
            waited_ms: flow.waited_ms,
            bytes_sent: r.bytes_sent,
            bytes_received: r.bytes_received,
            direction: match r.direction {
                tenure_gossip::wire::Direction::Outbound => "outbound",
                tenure_gossip::wire::Direction::Inbound => "inbound",
            },
            ongoing: r.ongoing,
            exporter_id: r.exporter_id,
            exporter_region: &r.exporter_region,
        }
    }
}

/// Appends the NDJSON line of `flow` (with its newline) to `out`: the JSON of
/// [`FlowLine`], byte for byte as `serde_json` writes it, formatted straight into `out`.
/// Every emitted flow passes here, and building a `FlowLine` (three `String`s) and
/// serializing it was a tenth of a collector's CPU under `tenure loadgen`.
pub fn write_line(flow: &EmittedFlow, out: &mut Vec<u8>) {
    let r = &flow.record;
    // A line is about 400 bytes: one reservation, not one check per piece that grows.
    out.reserve(LINE_BYTES_TYPICAL);
    out.extend_from_slice(b"{\"flow_id\":\"");
    push_hex128(out, r.flow_id);
    out.extend_from_slice(b"\",\"local\":{\"ip\":\"");
    push_ip(out, r.local_ip);
    out.extend_from_slice(b"\",\"port\":");
    push_u64(out, u64::from(r.local_port));
    out.extend_from_slice(b",\"workload\":");
    json_str(out, &r.local_workload);
    out.extend_from_slice(b"},\"remote\":{\"ip\":\"");
    push_ip(out, r.remote_ip);
    out.extend_from_slice(b"\",\"port\":");
    push_u64(out, u64::from(r.remote_port));
    out.extend_from_slice(b",\"workload\":");
    match flow.remote_workload() {
        Some(w) => json_str(out, w),
        None => out.extend_from_slice(b"null"),
    }
    // Results, sources and reasons are fixed lowercase words: written as they are, not
    // scanned for characters to escape.
    match &flow.verdict {
        Verdict::Attributed(attribution) => {
            out.extend_from_slice(b"},\"result\":\"attributed\",\"source\":\"");
            out.extend_from_slice(attribution.source().as_str().as_bytes());
            out.extend_from_slice(b"\",\"reason\":null");
        }
        Verdict::Unattributed(reason) => {
            out.extend_from_slice(b"},\"result\":\"unattributed\",\"source\":null,\"reason\":\"");
            out.extend_from_slice(reason.as_str().as_bytes());
            out.push(b'"');
        }
    }
    for (name, value) in [
        (&b",\"start_ms\":"[..], r.start_ms),
        (b",\"end_ms\":", r.end_ms),
        (b",\"emitted_ms\":", flow.emitted_ms),
        (b",\"waited_ms\":", flow.waited_ms),
        (b",\"bytes_sent\":", r.bytes_sent),
        (b",\"bytes_received\":", r.bytes_received),
    ] {
        out.extend_from_slice(name);
        push_u64(out, value);
    }
    out.extend_from_slice(match r.direction {
        tenure_gossip::wire::Direction::Outbound => b",\"direction\":\"outbound\"",
        tenure_gossip::wire::Direction::Inbound => b",\"direction\":\"inbound\"",
    });
    out.extend_from_slice(if r.ongoing {
        b",\"ongoing\":true"
    } else {
        b",\"ongoing\":false"
    });
    out.extend_from_slice(b",\"exporter_id\":");
    push_u64(out, r.exporter_id);
    out.extend_from_slice(b",\"exporter_region\":");
    json_str(out, &r.exporter_region);
    out.extend_from_slice(b"}\n");
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";
/// About the length of one NDJSON line, workload names included.
const LINE_BYTES_TYPICAL: usize = 512;

/// Appends `n` in decimal.
fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends `n` as 32 lowercase hex digits.
fn push_hex128(out: &mut Vec<u8>, n: u128) {
    let mut digits = [0u8; 32];
    for (i, digit) in digits.iter_mut().enumerate() {
        *digit = HEX_DIGITS[((n >> ((31 - i) * 4)) & 0xf) as usize];
    }
    out.extend_from_slice(&digits);
}

/// Appends `ip` as its `Display` writes it.
fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_u64(out, u64::from(octet));
            }
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write as _;
            // The compressed form has rules of its own; `Display` knows them. Writing into
            // a Vec cannot fail.
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends `s` as a JSON string, escaped as `serde_json` escapes it.
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Workload names and regions nearly never need escaping: one copy. The check reads
    // every byte without an early exit, so that it compiles to vector instructions.
    let needs_escape = bytes.iter().fold(false, |any, &b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !needs_escape {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => &[],
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX_DIGITS[usize::from(b >> 4)]);
            out.push(HEX_DIGITS[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Errors writing a sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink directory {dir}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sink file {path}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Encoding or writing a Parquet file failed; the current file is abandoned (left as
    /// `*.parquet.partial`).
    #[error("parquet sink file {path}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: ::parquet::errors::ParquetError,
    },
}

/// Lines are formatted into a buffer of about this size, which is then written to the file
/// with one system call (a line is ~460 bytes: one call per ~280 flows). The file itself is
/// not buffered: a `BufWriter` in between only copied every line once more.
pub const SINK_WRITE_CHUNK_BYTES: usize = 128 * 1024;

/// NDJSON files in one directory, rolled by age and size, the oldest deleted past a count.
#[derive(Debug)]
pub struct RollingFiles {
    dir: PathBuf,
    roll_interval_ms: u64,
    roll_bytes_max: u64,
    files_max: usize,
    /// The open file, its path, when it was opened and the bytes written to it. Not
    /// buffered: [`Writer`] hands it whole chunks of lines.
    current: Option<(PathBuf, File, u64, u64)>,
    sequence: u64,
}

impl RollingFiles {
    pub fn new(
        dir: &Path,
        roll_interval_ms: u64,
        roll_bytes_max: u64,
        files_max: usize,
    ) -> Result<RollingFiles, SinkError> {
        fs::create_dir_all(dir).map_err(|source| SinkError::Dir {
            dir: dir.to_owned(),
            source,
        })?;
        Ok(RollingFiles {
            dir: dir.to_owned(),
            roll_interval_ms,
            roll_bytes_max,
            files_max: files_max.max(1),
            current: None,
            sequence: 0,
        })
    }

    /// Writes already-formatted lines; `now_ms` decides rolling.
    pub fn write(&mut self, lines: &[u8], now_ms: u64) -> Result<(), SinkError> {
        let roll = match &self.current {
            None => true,
            Some((_, _, opened_ms, bytes)) => {
                now_ms.saturating_sub(*opened_ms) >= self.roll_interval_ms
                    || *bytes >= self.roll_bytes_max
            }
        };
        if roll {
            self.roll(now_ms)?;
        }
        if let Some((path, file, _, bytes)) = self.current.as_mut() {
            file.write_all(lines).map_err(|source| SinkError::File {
                path: path.clone(),
                source,
            })?;
            *bytes += lines.len() as u64;
        }
        Ok(())
    }

    /// Syncs the file's data to disk.
    pub fn sync(&mut self) -> Result<(), SinkError> {
        if let Some((path, file, _, _)) = self.current.as_mut() {
            file.sync_data().map_err(|source| SinkError::File {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    fn roll(&mut self, now_ms: u64) -> Result<(), SinkError> {
        self.sync()?;
        self.sequence += 1;
        let path = self.dir.join(format!(
            "flows-{now_ms:013}-{:04}.ndjson",
            self.sequence % 10_000
        ));
        let file = File::create(&path).map_err(|source| SinkError::File {
            path: path.clone(),
            source,
        })?;
        self.current = Some((path, file, now_ms, 0));
        self.prune()
    }

    fn prune(&self) -> Result<(), SinkError> {
        prune_files(&self.dir, ".ndjson", self.files_max)
    }
}

/// Deletes the oldest finished sink files (`flows-*<suffix>` in `dir`, oldest first by
/// name) until at most `files_max` are left. A file that cannot be deleted is logged.
fn prune_files(dir: &Path, suffix: &str, files_max: usize) -> Result<(), SinkError> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|source| SinkError::Dir {
            dir: dir.to_owned(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("flows-") && n.ends_with(suffix))
        })
        .collect();
    files.sort();
    let excess = files.len().saturating_sub(files_max);
    for oldest in files.into_iter().take(excess) {
        if let Err(e) = fs::remove_file(&oldest) {
            tracing::warn!(path = %oldest.display(), error = %e, "deleting an old sink file");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(workload: &str, verdict: tenure_attribution::Verdict) -> EmittedFlow {
        use std::sync::Arc;
        EmittedFlow {
            record: crate::core::FlowRecord {
                flow_id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
                local_ip: "10.1.2.3".parse().unwrap(),
                local_port: 40_000,
                remote_ip: "2001:db8::7".parse().unwrap(),
                remote_port: 443,
                local_workload: Arc::from(workload),
                start_ms: 1_700_000_000_000,
                end_ms: 1_700_000_000_250,
                bytes_sent: 12,
                bytes_received: u64::MAX,
                packets: 3,
                retransmits: 0,
                direction: tenure_gossip::wire::Direction::Inbound,
                ongoing: true,
                exporter_id: 77,
                exporter_region: Arc::from("eu-\u{e9}st"),
                hops: 1,
            },
            verdict,
            waited_ms: 900,
            emitted_ms: 1_700_000_001_000,
        }
    }

    #[test]
    fn lines_are_byte_for_byte_what_serde_json_writes() {
        use tenure_attribution::{Attribution, Reason, Verdict};
        let names = [
            "svc-a".to_owned(),
            "quote\"back\\slash\nnew\rret\ttab\u{8}\u{c}\u{1}\u{1f}\u{7f}\u{e9}\u{1f600}"
                .to_owned(),
            String::new(),
        ];
        for name in &names {
            for verdict in [
                Verdict::Attributed(Attribution::Heartbeat(std::sync::Arc::from(name.as_str()))),
                Verdict::Attributed(Attribution::External),
                Verdict::Unattributed(Reason::Ambiguous),
            ] {
                let mut f = flow(name, verdict);
                if name.is_empty() {
                    f.record.local_ip = "0.0.0.0".parse().unwrap();
                    f.record.remote_ip = "::ffff:10.0.0.1".parse().unwrap();
                    f.record.flow_id = 0;
                    f.record.local_port = 0;
                    f.record.bytes_sent = 0;
                    f.record.direction = tenure_gossip::wire::Direction::Outbound;
                    f.record.ongoing = false;
                }
                let mut ours = Vec::new();
                write_line(&f, &mut ours);
                let mut theirs = serde_json::to_vec(&FlowLine::new(&f)).unwrap();
                theirs.push(b'\n');
                assert_eq!(
                    String::from_utf8_lossy(&ours),
                    String::from_utf8_lossy(&theirs)
                );
            }
        }
    }

    #[test]
    fn files_roll_by_size_and_keep_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = RollingFiles::new(dir.path(), 1_000_000, 10, 2).unwrap();
        for i in 0..5u64 {
            sink.write(b"{\"a\":1}\n{\"b\":2}\n", 1_000 + i).unwrap();
        }
        sink.sync().unwrap();
        let count = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(count, 2, "older files are pruned");
    }
}
