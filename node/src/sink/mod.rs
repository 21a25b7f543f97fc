//! Sinks: where attributed flows are written. Rolling NDJSON files (the default), rolling
//! Parquet files ([`parquet`]) for data lakes, or stdout, one JSON object per line.
//! [`Writer`] is the one entry point the collector's sink task uses.

pub mod parquet;

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

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
                lines: Vec::with_capacity(64 * 1024),
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

    /// Flushes and closes the current file (at shutdown).
    pub fn close(&mut self) -> Result<(), SinkError> {
        match self {
            Writer::Files { files, .. } => files.flush(),
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

/// Appends the NDJSON line of `flow` (with its newline) to `out`.
pub fn write_line(flow: &EmittedFlow, out: &mut Vec<u8>) {
    // Serializing plain strings and numbers cannot fail.
    if serde_json::to_writer(&mut *out, &FlowLine::new(flow)).is_ok() {
        out.push(b'\n');
    }
}

/// Errors writing a sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink directory {dir}: {source}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("sink file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Encoding or writing a Parquet file failed; the current file is abandoned (left as
    /// `*.parquet.partial`).
    #[error("parquet sink file {path}: {source}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: ::parquet::errors::ParquetError,
    },
}

/// NDJSON files in one directory, rolled by age and size, the oldest deleted past a count.
#[derive(Debug)]
pub struct RollingFiles {
    dir: PathBuf,
    roll_interval_ms: u64,
    roll_bytes_max: u64,
    files_max: usize,
    current: Option<(PathBuf, BufWriter<File>, u64, u64)>,
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

    /// Flushes, then syncs the file's data to disk.
    pub fn sync(&mut self) -> Result<(), SinkError> {
        self.flush()?;
        if let Some((path, file, _, _)) = self.current.as_mut() {
            file.get_ref()
                .sync_data()
                .map_err(|source| SinkError::File {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), SinkError> {
        if let Some((path, file, _, _)) = self.current.as_mut() {
            file.flush().map_err(|source| SinkError::File {
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
        self.current = Some((path, BufWriter::new(file), now_ms, 0));
        self.prune()
    }

    fn prune(&self) -> Result<(), SinkError> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.dir)
            .map_err(|source| SinkError::Dir {
                dir: self.dir.clone(),
                source,
            })?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("flows-") && n.ends_with(".ndjson"))
            })
            .collect();
        files.sort();
        while files.len() > self.files_max {
            let oldest = files.remove(0);
            if let Err(e) = fs::remove_file(&oldest) {
                tracing::warn!(path = %oldest.display(), error = %e, "deleting an old sink file");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_roll_by_size_and_keep_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = RollingFiles::new(dir.path(), 1_000_000, 10, 2).unwrap();
        for i in 0..5u64 {
            sink.write(b"{\"a\":1}\n{\"b\":2}\n", 1_000 + i).unwrap();
        }
        sink.flush().unwrap();
        let count = fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(count, 2, "older files are pruned");
    }
}
