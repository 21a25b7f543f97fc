//! The Parquet sink: flows as rows of rolling Parquet files (arrow-rs writer, Snappy
//! compression), for data lakes.
//!
//! # Files
//!
//! `flows-<opened Unix ms, 13 digits>-<sequence, 4 digits>.parquet` in the configured
//! directory. A file is written as `….parquet.partial` and renamed to `….parquet` when it
//! is closed: Parquet writes its footer (the index) last, so only closed files are
//! readable, and readers that glob `*.parquet` never see a half-written one. A file is
//! closed when it is `roll_interval_ms` old, when it reaches `roll_bytes_max`, and at
//! shutdown. A `.partial` file left by a killed process has no footer and is not pruned.
//!
//! # Schema
//!
//! One row per emitted flow; the columns match the NDJSON sink's fields (nested `local` and
//! `remote` objects flattened with a prefix; times as Parquet timestamps):
//!
//! | column | Arrow type | null? | meaning |
//! |---|---|---|---|
//! | `flow_id` | Utf8 | no | 32 hex digits; duplicates of at-least-once delivery share it |
//! | `local_ip` | Utf8 | no | the exporter's side |
//! | `local_port` | UInt16 | no | |
//! | `local_workload` | Utf8 | yes | the workload that held the local IP for the whole flow; null when the exporter vouches for none |
//! | `local_reason` | Utf8 | yes | `local_changed`, `local_unknown` or `local_expired` when `local_workload` is null |
//! | `remote_ip` | Utf8 | no | the other side |
//! | `remote_port` | UInt16 | no | |
//! | `remote_workload` | Utf8 | yes | the owner at the time of the flow; null when unattributed or external |
//! | `result` | Utf8 | no | `attributed` or `unattributed` |
//! | `source` | Utf8 | yes | `heartbeat`, `event` or `external` when attributed |
//! | `reason` | Utf8 | yes | `no_owner`, `ambiguous`, `conflict`, `expired`, `overload`, `region_unreachable` when unattributed |
//! | `start_time` | Timestamp(ms, UTC) | no | when the flow started (exporter's clock) |
//! | `end_time` | Timestamp(ms, UTC) | no | when it ended, or the snapshot time if `ongoing` |
//! | `emitted_time` | Timestamp(ms, UTC) | no | when the collector decided |
//! | `waited_ms` | UInt64 | no | how long the flow waited for coverage |
//! | `bytes_sent` | UInt64 | no | payload bytes the local side sent and the peer acknowledged (no SYN or FIN) |
//! | `bytes_received` | UInt64 | no | payload bytes the local side received in order (no FIN) |
//! | `segs_in` | UInt64 | no | TCP segments the local side received, ACKs and retransmissions included |
//! | `segs_out` | UInt64 | no | TCP segments the local side sent, ACKs and retransmissions included |
//! | `retransmits` | UInt64 | no | segments the local side retransmitted |
//! | `rtt_us` | UInt32 | no | the local side's smoothed RTT at the end (or snapshot), µs; 0 = no sample |
//! | `direction` | Utf8 | no | `outbound` (local side opened it) or `inbound` |
//! | `ongoing` | Boolean | no | a snapshot of a long-lived flow |
//! | `exporter_id` | UInt64 | no | |
//! | `exporter_region` | Utf8 | no | |
//!
//! Strings are dictionary-encoded by the writer where that helps (workloads, results);
//! pages are Snappy-compressed.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use arrow_array::builder::{
    BooleanBuilder, StringBuilder, TimestampMillisecondBuilder, UInt16Builder, UInt32Builder,
    UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::{FlowLine, SinkError};
use crate::core::EmittedFlow;
use crate::report::Chain;

/// The extension of a file being written.
const PARTIAL_SUFFIX: &str = ".parquet.partial";
/// The extension of a closed, readable file.
const DONE_SUFFIX: &str = ".parquet";

/// The Arrow schema of the files (documented in the module docs).
pub fn schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let time = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
            Arc::new(Schema::new(vec![
                Field::new("flow_id", DataType::Utf8, false),
                Field::new("local_ip", DataType::Utf8, false),
                Field::new("local_port", DataType::UInt16, false),
                Field::new("local_workload", DataType::Utf8, true),
                Field::new("local_reason", DataType::Utf8, true),
                Field::new("remote_ip", DataType::Utf8, false),
                Field::new("remote_port", DataType::UInt16, false),
                Field::new("remote_workload", DataType::Utf8, true),
                Field::new("result", DataType::Utf8, false),
                Field::new("source", DataType::Utf8, true),
                Field::new("reason", DataType::Utf8, true),
                Field::new("start_time", time(), false),
                Field::new("end_time", time(), false),
                Field::new("emitted_time", time(), false),
                Field::new("waited_ms", DataType::UInt64, false),
                Field::new("bytes_sent", DataType::UInt64, false),
                Field::new("bytes_received", DataType::UInt64, false),
                Field::new("segs_in", DataType::UInt64, false),
                Field::new("segs_out", DataType::UInt64, false),
                Field::new("retransmits", DataType::UInt64, false),
                Field::new("rtt_us", DataType::UInt32, false),
                Field::new("direction", DataType::Utf8, false),
                Field::new("ongoing", DataType::Boolean, false),
                Field::new("exporter_id", DataType::UInt64, false),
                Field::new("exporter_region", DataType::Utf8, false),
            ]))
        })
        .clone()
}

/// Builds one record batch of `flows` in the order of [`schema`].
pub fn record_batch(flows: &[EmittedFlow]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = flows.len();
    let strings = || StringBuilder::with_capacity(n, n * 16);
    let (mut flow_id, mut local_ip, mut local_workload) = (strings(), strings(), strings());
    let (mut remote_ip, mut remote_workload, mut result) = (strings(), strings(), strings());
    let (mut source, mut reason, mut direction) = (strings(), strings(), strings());
    let (mut exporter_region, mut local_reason) = (strings(), strings());
    let (mut local_port, mut remote_port) = (
        UInt16Builder::with_capacity(n),
        UInt16Builder::with_capacity(n),
    );
    let time = || TimestampMillisecondBuilder::with_capacity(n).with_timezone("UTC");
    let (mut start, mut end, mut emitted) = (time(), time(), time());
    let u64s = || UInt64Builder::with_capacity(n);
    let (mut waited, mut sent, mut received, mut exporter_id) = (u64s(), u64s(), u64s(), u64s());
    let (mut segs_in, mut segs_out, mut retransmits) = (u64s(), u64s(), u64s());
    let mut rtt_us = UInt32Builder::with_capacity(n);
    let mut ongoing = BooleanBuilder::with_capacity(n);
    for flow in flows {
        let line = FlowLine::new(flow);
        flow_id.append_value(&line.flow_id);
        local_ip.append_value(&line.local.ip);
        local_port.append_value(line.local.port);
        local_workload.append_option(line.local.workload);
        local_reason.append_option(line.local.reason);
        remote_ip.append_value(&line.remote.ip);
        remote_port.append_value(line.remote.port);
        remote_workload.append_option(line.remote.workload);
        result.append_value(line.result);
        source.append_option(line.source);
        reason.append_option(line.reason);
        start.append_value(to_i64(line.start_ms));
        end.append_value(to_i64(line.end_ms));
        emitted.append_value(to_i64(line.emitted_ms));
        waited.append_value(line.waited_ms);
        sent.append_value(line.bytes_sent);
        received.append_value(line.bytes_received);
        segs_in.append_value(line.segs_in);
        segs_out.append_value(line.segs_out);
        retransmits.append_value(line.retransmits);
        rtt_us.append_value(line.rtt_us);
        direction.append_value(line.direction);
        ongoing.append_value(line.ongoing);
        exporter_id.append_value(line.exporter_id);
        exporter_region.append_value(line.exporter_region);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(flow_id.finish()),
        Arc::new(local_ip.finish()),
        Arc::new(local_port.finish()),
        Arc::new(local_workload.finish()),
        Arc::new(local_reason.finish()),
        Arc::new(remote_ip.finish()),
        Arc::new(remote_port.finish()),
        Arc::new(remote_workload.finish()),
        Arc::new(result.finish()),
        Arc::new(source.finish()),
        Arc::new(reason.finish()),
        Arc::new(start.finish()),
        Arc::new(end.finish()),
        Arc::new(emitted.finish()),
        Arc::new(waited.finish()),
        Arc::new(sent.finish()),
        Arc::new(received.finish()),
        Arc::new(segs_in.finish()),
        Arc::new(segs_out.finish()),
        Arc::new(retransmits.finish()),
        Arc::new(rtt_us.finish()),
        Arc::new(direction.finish()),
        Arc::new(ongoing.finish()),
        Arc::new(exporter_id.finish()),
        Arc::new(exporter_region.finish()),
    ];
    RecordBatch::try_new(schema(), columns)
}

/// Unix ms as Arrow's signed timestamp; times past year 292 million saturate.
fn to_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// The file being written.
struct Current {
    partial: PathBuf,
    done: PathBuf,
    writer: ArrowWriter<File>,
    opened_ms: u64,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current")
            .field("partial", &self.partial)
            .field("opened_ms", &self.opened_ms)
            .finish_non_exhaustive()
    }
}

/// Parquet files in one directory, rolled by age and size, the oldest deleted past a count.
#[derive(Debug)]
pub struct ParquetFiles {
    dir: PathBuf,
    roll_interval_ms: u64,
    roll_bytes_max: u64,
    files_max: usize,
    row_group_rows_max: usize,
    current: Option<Current>,
    sequence: u64,
    /// Rows in the current file: unreadable until it is closed.
    rows_open: u64,
}

impl ParquetFiles {
    pub fn new(
        dir: &Path,
        roll_interval_ms: u64,
        roll_bytes_max: u64,
        files_max: usize,
        row_group_rows_max: usize,
    ) -> Result<ParquetFiles, SinkError> {
        fs::create_dir_all(dir).map_err(|source| SinkError::Dir {
            dir: dir.to_owned(),
            source,
        })?;
        Ok(ParquetFiles {
            dir: dir.to_owned(),
            roll_interval_ms,
            roll_bytes_max,
            files_max: files_max.max(1),
            row_group_rows_max: row_group_rows_max.max(1),
            current: None,
            sequence: 0,
            rows_open: 0,
        })
    }

    /// Appends `flows` as rows; rolls first if the current file is old or large enough.
    pub fn write(&mut self, flows: &[EmittedFlow], now_ms: u64) -> Result<(), SinkError> {
        if flows.is_empty() {
            return Ok(());
        }
        if self.due(now_ms) {
            self.close()?;
        }
        let current = match self.current.take() {
            Some(c) => c,
            None => self.open(now_ms)?,
        };
        let current = self.current.insert(current);
        let batch = record_batch(flows).map_err(|e| SinkError::Parquet {
            path: current.partial.clone(),
            source: e.into(),
        })?;
        current
            .writer
            .write(&batch)
            .map_err(|source| SinkError::Parquet {
                path: current.partial.clone(),
                source,
            })?;
        self.rows_open += flows.len() as u64;
        Ok(())
    }

    /// Rows written to the file still open: a `kill -9` now would lose them (the file has
    /// no footer yet), so their journal entries must stay.
    pub fn rows_open(&self) -> u64 {
        self.rows_open
    }

    /// Closes the current file if its time is up.
    pub fn tick(&mut self, now_ms: u64) -> Result<(), SinkError> {
        if self.current.is_some() && self.due(now_ms) {
            self.close()?;
        }
        Ok(())
    }

    /// Writes the footer of the current file and renames it to `.parquet`.
    pub fn close(&mut self) -> Result<(), SinkError> {
        let Some(current) = self.current.take() else {
            return Ok(());
        };
        let file = current
            .writer
            .into_inner()
            .map_err(|source| SinkError::Parquet {
                path: current.partial.clone(),
                source,
            })?;
        // On disk before the journal lets its rows go.
        file.sync_data().map_err(|source| SinkError::File {
            path: current.partial.clone(),
            source,
        })?;
        self.rows_open = 0;
        fs::rename(&current.partial, &current.done).map_err(|source| SinkError::File {
            path: current.done.clone(),
            source,
        })?;
        self.prune()
    }

    fn due(&self, now_ms: u64) -> bool {
        match &self.current {
            None => false,
            Some(c) => {
                now_ms.saturating_sub(c.opened_ms) >= self.roll_interval_ms
                    || (c.writer.bytes_written() + c.writer.in_progress_size()) as u64
                        >= self.roll_bytes_max
            }
        }
    }

    fn open(&mut self, now_ms: u64) -> Result<Current, SinkError> {
        self.sequence += 1;
        let stem = format!("flows-{now_ms:013}-{:04}", self.sequence % 10_000);
        let partial = self.dir.join(format!("{stem}{PARTIAL_SUFFIX}"));
        let done = self.dir.join(format!("{stem}{DONE_SUFFIX}"));
        let file = File::create(&partial).map_err(|source| SinkError::File {
            path: partial.clone(),
            source,
        })?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(self.row_group_rows_max))
            .set_created_by(format!("tenure {}", env!("CARGO_PKG_VERSION")))
            .build();
        let writer = ArrowWriter::try_new(file, schema(), Some(props)).map_err(|source| {
            SinkError::Parquet {
                path: partial.clone(),
                source,
            }
        })?;
        Ok(Current {
            partial,
            done,
            writer,
            opened_ms: now_ms,
        })
    }

    fn prune(&self) -> Result<(), SinkError> {
        super::prune_files(&self.dir, DONE_SUFFIX, self.files_max)
    }
}

impl Drop for ParquetFiles {
    /// A sink dropped without `close` (an error path) still finishes its file, so that the
    /// rows written so far stay readable.
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(error = %Chain(&e), "closing the parquet sink file");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use tenure_attribution::{Reason, Verdict};
    use tenure_gossip::wire::Direction;

    use super::*;
    use crate::core::FlowRecord;

    fn flow(id: u128) -> EmittedFlow {
        let ip: IpAddr = "10.1.0.1".parse().unwrap();
        EmittedFlow {
            record: FlowRecord {
                flow_id: id,
                local_ip: ip,
                local_port: 1,
                remote_ip: ip,
                remote_port: 2,
                local: crate::core::Local::Workload("w".into()),
                start_ms: 1,
                end_ms: 2,
                bytes_sent: 0,
                bytes_received: 0,
                segs_in: 0,
                segs_out: 0,
                retransmits: 0,
                rtt_us: 0,
                direction: Direction::Outbound,
                ongoing: false,
                exporter_id: 1,
                exporter_region: "a".into(),
                hops: 0,
            },
            verdict: Verdict::Unattributed(Reason::NoOwner),
            waited_ms: 0,
            emitted_ms: 3,
        }
    }

    /// Rows of the open file are not readable after a crash: the journal must keep them
    /// until the file rolls.
    #[test]
    fn rows_stay_unsettled_until_their_file_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = ParquetFiles::new(dir.path(), 1_000, u64::MAX, 10, 1_000).unwrap();
        files.write(&[flow(1), flow(2)], 0).unwrap();
        files.tick(500).unwrap();
        assert_eq!(files.rows_open(), 2, "the file is still open");
        files.write(&[flow(3)], 600).unwrap();
        assert_eq!(files.rows_open(), 3);
        // A write past the roll interval closes the old file first.
        files.write(&[flow(4)], 1_200).unwrap();
        assert_eq!(files.rows_open(), 1);
        files.tick(2_300).unwrap();
        assert_eq!(files.rows_open(), 0);
        let done = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.path().to_string_lossy().ends_with(DONE_SUFFIX))
            .count();
        assert_eq!(done, 2);
    }
}
