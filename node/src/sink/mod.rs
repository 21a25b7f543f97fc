//! Sinks: where attributed flows are written. Rolling NDJSON files (the default), rolling
//! Parquet files ([`parquet`]) for data lakes, or stdout, one JSON object per line.
//! [`Writer`] is the one entry point the collector's sink task uses.

pub mod parquet;

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tenure_attribution::Verdict;

use crate::config::SinkConfig;
use crate::core::{EmittedFlow, Local};

pub use self::parquet::ParquetFiles;

/// The configured sink, opened.
#[derive(Debug)]
pub enum Writer {
    Files(RollingFiles),
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
                direct_io,
            } => Writer::Files(RollingFiles::new(
                dir,
                *roll_interval_ms,
                *roll_bytes_max,
                *files_max,
                *direct_io,
            )?),
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
            Writer::Files(files) => {
                files.start(now_ms)?;
                for flow in flows {
                    write_line(flow, files.lines());
                    files.written_lines(now_ms)?;
                }
                Ok(())
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
            Writer::Files(files) => files.sync(),
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
            Writer::Files(_) | Writer::Stdout => 0,
            Writer::Parquet(files) => files.rows_open(),
        }
    }

    /// Syncs and closes the current file (at shutdown).
    pub fn close(&mut self) -> Result<(), SinkError> {
        match self {
            Writer::Files(files) => files.sync(),
            Writer::Parquet(files) => files.close(),
            Writer::Stdout => Ok(()),
        }
    }
}

/// The remote side of a flow, as written.
#[derive(Serialize, Debug)]
pub struct EndLine<'a> {
    pub ip: String,
    pub port: u16,
    pub workload: Option<&'a str>,
}

/// The local side of a flow, as written: the workload the exporter vouched for, or `null`
/// and why not (`local_changed`, `local_unknown`, `local_expired`).
#[derive(Serialize, Debug)]
pub struct LocalLine<'a> {
    pub ip: String,
    pub port: u16,
    pub workload: Option<&'a str>,
    pub reason: Option<&'static str>,
}

/// One line of a sink: a flow, both ends, and its verdict.
#[derive(Serialize, Debug)]
pub struct FlowLine<'a> {
    /// 32 hex digits; duplicates of at-least-once delivery share it.
    pub flow_id: String,
    pub local: LocalLine<'a>,
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
    /// Payload bytes the local side sent and the peer acknowledged.
    pub bytes_sent: u64,
    /// Payload bytes the local side received in order.
    pub bytes_received: u64,
    /// Segments the local side received (ACKs and retransmissions included).
    pub segs_in: u64,
    /// Segments the local side sent (ACKs and retransmissions included).
    pub segs_out: u64,
    /// Segments the local side retransmitted.
    pub retransmits: u64,
    /// The local side's smoothed RTT at the end (or snapshot), µs; 0 = no sample.
    pub rtt_us: u32,
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
            local: LocalLine {
                ip: r.local_ip.to_string(),
                port: r.local_port,
                workload: r.local_workload().map(|w| &**w),
                reason: r.local_reason().map(|r| r.as_str()),
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
            segs_in: r.segs_in,
            segs_out: r.segs_out,
            retransmits: r.retransmits,
            rtt_us: r.rtt_us,
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
    match &r.local {
        Local::Workload(w) => {
            json_str(out, w);
            out.extend_from_slice(b",\"reason\":null");
        }
        Local::Unattributed(reason) => {
            out.extend_from_slice(b"null,\"reason\":\"");
            out.extend_from_slice(reason.as_str().as_bytes());
            out.push(b'"');
        }
    }
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
        (b",\"segs_in\":", r.segs_in),
        (b",\"segs_out\":", r.segs_out),
        (b",\"retransmits\":", r.retransmits),
        (b",\"rtt_us\":", u64::from(r.rtt_us)),
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
/// Room past [`SINK_WRITE_CHUNK_BYTES`] in the sink's buffer, so that formatting the line
/// that crosses it does not move the buffer: far more than a line takes (two workload names
/// of at most 256 bytes, escaped to at most six bytes per byte, and a region name).
const LINE_BYTES_MAX: usize = 64 * 1024;

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

/// Lines wait in memory until about this many bytes, then their whole blocks go to the file
/// in one call (a line is ~460 bytes: one call per ~2,300 flows). Direct I/O costs per call,
/// not per byte: 1 MiB calls took a third of the CPU of 128 KiB ones (`dd`, this machine).
pub const SINK_WRITE_CHUNK_BYTES: usize = 1 << 20;

/// Direct I/O writes whole blocks, at offsets that are multiples of a block, from memory
/// aligned to one: Linux requires all three to be multiples of the device's logical block
/// size, at most 4 KiB on the devices a collector writes to.
const BLOCK: usize = 4096;

/// NDJSON files in one directory, rolled by age and size, the oldest deleted past a count.
///
/// **Written with direct I/O** (`O_DIRECT`) where the filesystem allows it and the
/// configuration does not turn it off. A collector never reads its sink back, so writing
/// through the page cache only copied every line into fresh kernel pages that nobody read:
/// under `tenure loadgen` that copy was a third of the collectors' CPU (each new page a
/// fault in the kernel, on the VM it was measured on most likely in the host too), and a
/// sink written past the page cache's free memory evicts what the collector does read.
/// With direct I/O the device reads the lines from [`Pending`]'s memory, which is reused.
/// The last partial block, written at each [`RollingFiles::sync`] so that it is durable,
/// goes through the page cache (one page per sync) and is written again, whole, by the
/// next direct write. A file holds its lines in order and nothing else; between syncs it
/// may end inside a line (a direct write ends on a block), after a sync it ends on one.
#[derive(Debug)]
pub struct RollingFiles {
    dir: PathBuf,
    roll_interval_ms: u64,
    roll_bytes_max: u64,
    files_max: usize,
    /// Whether to try direct I/O for new files.
    direct_io: bool,
    current: Option<Current>,
    /// Lines formatted but not yet written (whole or in part) to `current`.
    pending: Pending,
    sequence: u64,
}

/// The open file.
#[derive(Debug)]
struct Current {
    path: PathBuf,
    /// The file opened for direct I/O, when the filesystem allows it.
    direct: Option<File>,
    /// The file through the page cache: the last partial block at a sync, and everything
    /// when `direct` is `None`.
    buffered: File,
    opened_ms: u64,
    /// Bytes written for good: where `pending`'s first byte goes. A multiple of [`BLOCK`]
    /// while `direct` is open.
    flushed: u64,
}

impl RollingFiles {
    pub fn new(
        dir: &Path,
        roll_interval_ms: u64,
        roll_bytes_max: u64,
        files_max: usize,
        direct_io: bool,
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
            direct_io,
            current: None,
            pending: Pending::with_capacity(SINK_WRITE_CHUNK_BYTES + LINE_BYTES_MAX),
            sequence: 0,
        })
    }

    /// Called before lines are added at `now_ms`: opens the first file, and rolls one whose
    /// time or size is up.
    pub fn start(&mut self, now_ms: u64) -> Result<(), SinkError> {
        let roll = match &self.current {
            None => true,
            Some(current) => {
                now_ms.saturating_sub(current.opened_ms) >= self.roll_interval_ms
                    || current.flushed + self.pending.len() as u64 >= self.roll_bytes_max
            }
        };
        if roll {
            self.roll(now_ms)?;
        }
        Ok(())
    }

    /// Where lines are appended (after [`RollingFiles::start`]); call
    /// [`RollingFiles::written_lines`] after each.
    pub fn lines(&mut self) -> &mut Vec<u8> {
        self.pending.lines()
    }

    /// Writes the whole blocks of the pending lines once there are enough of them, and
    /// rolls the file if that filled it.
    pub fn written_lines(&mut self, now_ms: u64) -> Result<(), SinkError> {
        if self.pending.len() < SINK_WRITE_CHUNK_BYTES {
            return Ok(());
        }
        self.write_blocks()?;
        self.start(now_ms)
    }

    /// Writes already-formatted lines (whole lines, each with its newline); `now_ms`
    /// decides rolling.
    pub fn write(&mut self, lines: &[u8], now_ms: u64) -> Result<(), SinkError> {
        self.start(now_ms)?;
        self.lines().extend_from_slice(lines);
        self.written_lines(now_ms)
    }

    /// Writes every pending line and syncs the file's data to disk: what was written before
    /// is then durable and readable.
    pub fn sync(&mut self) -> Result<(), SinkError> {
        self.write_blocks()?;
        let Some(current) = self.current.as_mut() else {
            return Ok(());
        };
        // With direct I/O, the last partial block is still pending: through the page cache
        // now, and again, whole, by the next direct write. Without, nothing is.
        let tail = self.pending.bytes();
        current
            .buffered
            .write_all_at(tail, current.flushed)
            .and_then(|()| current.buffered.sync_data())
            .map_err(|source| SinkError::File {
                path: current.path.clone(),
                source,
            })
    }

    /// Whether the open file is written with direct I/O (tests: whether that path ran).
    #[cfg(test)]
    fn direct(&self) -> bool {
        self.current.as_ref().is_some_and(|c| c.direct.is_some())
    }

    /// Writes the pending lines' whole blocks (all of them without direct I/O).
    fn write_blocks(&mut self) -> Result<(), SinkError> {
        let Some(current) = self.current.as_mut() else {
            return Ok(());
        };
        let bytes = self.pending.bytes();
        let (written, result) = match &current.direct {
            Some(direct) => {
                let whole = bytes.len() / BLOCK * BLOCK;
                (whole, direct.write_all_at(&bytes[..whole], current.flushed))
            }
            None => (
                bytes.len(),
                current.buffered.write_all_at(bytes, current.flushed),
            ),
        };
        match result {
            Ok(()) => {}
            Err(e) if current.direct.is_some() && e.kind() == io::ErrorKind::InvalidInput => {
                // The device wants larger blocks than ours: the page cache, from now on.
                tracing::warn!(
                    path = %current.path.display(),
                    error = %e,
                    "direct I/O refused: writing the sink through the page cache"
                );
                current.direct = None;
                self.direct_io = false;
                return self.write_blocks();
            }
            Err(source) => {
                return Err(SinkError::File {
                    path: current.path.clone(),
                    source,
                });
            }
        }
        current.flushed += written as u64;
        self.pending.consume(written);
        Ok(())
    }

    /// Finishes the open file (every pending line, synced) and starts the next.
    fn roll(&mut self, now_ms: u64) -> Result<(), SinkError> {
        self.sync()?;
        // The last partial block is in the file now, for good.
        self.pending.clear();
        self.sequence += 1;
        let path = self.dir.join(format!(
            "flows-{now_ms:013}-{:04}.ndjson",
            self.sequence % 10_000
        ));
        let buffered = File::create(&path).map_err(|source| SinkError::File {
            path: path.clone(),
            source,
        })?;
        let direct = if self.direct_io {
            open_direct(&path)
        } else {
            None
        };
        self.current = Some(Current {
            path,
            direct,
            buffered,
            opened_ms: now_ms,
            flushed: 0,
        });
        self.prune()
    }

    fn prune(&self) -> Result<(), SinkError> {
        prune_files(&self.dir, ".ndjson", self.files_max)
    }
}

/// Opens `path` again for direct I/O; `None` where the filesystem refuses it (logged).
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(file) => Some(file),
        Err(e) => {
            tracing::warn!(
                path = %path.display(),
                error = %e,
                "direct I/O refused: writing the sink through the page cache"
            );
            None
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}

/// Lines not yet written, in a vector whose bytes from `head` on start at a [`BLOCK`]
/// boundary, so that direct I/O can write them from where they were formatted.
#[derive(Debug)]
struct Pending {
    /// `buf[..head]` is padding.
    buf: Vec<u8>,
    head: usize,
}

impl Pending {
    fn with_capacity(capacity: usize) -> Pending {
        let mut buf = Vec::<u8>::with_capacity(capacity + BLOCK);
        let head = buf.as_ptr().align_offset(BLOCK);
        buf.resize(head, 0);
        Pending { buf, head }
    }

    /// Where lines are appended.
    fn lines(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    fn len(&self) -> usize {
        self.buf.len() - self.head
    }

    /// The pending bytes, block-aligned in memory.
    fn bytes(&mut self) -> &[u8] {
        if !(self.buf.as_ptr() as usize + self.head).is_multiple_of(BLOCK) {
            // Lines outgrew the capacity and the vector moved (a batch of unusually long
            // lines): copy them into an aligned one.
            let mut moved = Pending::with_capacity(self.buf.capacity());
            moved.buf.extend_from_slice(&self.buf[self.head..]);
            *self = moved;
        }
        &self.buf[self.head..]
    }

    fn clear(&mut self) {
        self.buf.truncate(self.head);
    }

    /// Drops the first `n` pending bytes (written), keeping the rest at the aligned start.
    fn consume(&mut self, n: usize) {
        let end = self.buf.len();
        self.buf.copy_within(self.head + n..end, self.head);
        self.buf.truncate(end - n);
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
                local: crate::core::Local::Workload(Arc::from(workload)),
                start_ms: 1_700_000_000_000,
                end_ms: 1_700_000_000_250,
                bytes_sent: 12,
                bytes_received: u64::MAX,
                segs_in: 1,
                segs_out: 2,
                retransmits: 0,
                rtt_us: 0,
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
                if name.starts_with('q') {
                    f.record.local = Local::Unattributed(tenure_gossip::wire::LocalReason::Changed);
                }
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
        let mut sink = RollingFiles::new(dir.path(), 1_000_000, 10, 2, true).unwrap();
        for i in 0..5u64 {
            sink.write(b"{\"a\":1}\n{\"b\":2}\n", 1_000 + i).unwrap();
        }
        sink.sync().unwrap();
        let count = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(count, 2, "older files are pruned");
    }

    /// The files' bytes, oldest first.
    fn read_all(dir: &Path) -> Vec<u8> {
        let mut paths: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        paths.iter().flat_map(|p| fs::read(p).unwrap()).collect()
    }

    /// Lines of many lengths, written in batches of many sizes with syncs and rolls between
    /// them: after every sync the files hold exactly the lines written so far, in order,
    /// nothing else (no padding, no block written twice in the wrong place), with direct
    /// I/O and without.
    #[test]
    fn files_hold_exactly_the_lines_written_synced_or_not() {
        for direct_io in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            // Rolls by size about every 3 MiB and once by time.
            let mut sink =
                RollingFiles::new(dir.path(), 60_000, 3 << 20, 1_000, direct_io).unwrap();
            let mut expected = Vec::new();
            let mut now_ms = 1_000;
            let mut line_no = 0u64;
            for batch in 0..150u64 {
                // 0 to ~2,500 lines of 20 to ~1,100 bytes: batches below a block, across
                // it, and across the 1 MiB write threshold.
                let lines = (batch * 7_919) % 2_500 * (batch % 3) / 2;
                let mut bytes = Vec::new();
                for _ in 0..lines {
                    line_no += 1;
                    let pad = "x".repeat((line_no * 31 % 1_080) as usize);
                    bytes.extend_from_slice(
                        format!("{{\"n\":{line_no},\"p\":\"{pad}\"}}\n").as_bytes(),
                    );
                }
                sink.write(&bytes, now_ms).unwrap();
                expected.extend_from_slice(&bytes);
                if batch % 5 == 0 || batch % 7 == 0 {
                    sink.sync().unwrap();
                    if batch % 7 == 0 {
                        // A sync with nothing new writes the same tail again.
                        sink.sync().unwrap();
                    }
                    let on_disk = read_all(dir.path());
                    assert!(
                        on_disk == expected,
                        "direct_io={direct_io} batch {batch}: {} bytes on disk, {} written",
                        on_disk.len(),
                        expected.len()
                    );
                }
                now_ms += if batch == 75 { 60_000 } else { 10 };
            }
            if direct_io && !sink.direct() {
                eprintln!(
                    "SKIPPED (direct I/O part): the filesystem of the temporary directory \
                     refused O_DIRECT; only the page-cache path was tested"
                );
            }
            sink.sync().unwrap();
            assert!(read_all(dir.path()) == expected);
            let files = fs::read_dir(dir.path()).unwrap().count();
            assert!(files >= 3, "{files} files: rolled by size and by time");
        }
    }

    /// A batch of lines longer than the buffer's room moves the vector; the bytes handed
    /// to direct I/O are aligned again, and none is lost.
    #[test]
    fn pending_lines_stay_block_aligned_when_the_buffer_grows() {
        let mut pending = Pending::with_capacity(100);
        let line: Vec<u8> = (0..=255u8).cycle().take(50_000).collect();
        pending.lines().extend_from_slice(&line);
        assert_eq!(pending.len(), line.len());
        let bytes = pending.bytes();
        assert!((bytes.as_ptr() as usize).is_multiple_of(BLOCK));
        assert_eq!(bytes, &line[..]);
        pending.consume(BLOCK * 3);
        assert_eq!(pending.bytes(), &line[BLOCK * 3..]);
        assert!((pending.bytes().as_ptr() as usize).is_multiple_of(BLOCK));
    }
}
