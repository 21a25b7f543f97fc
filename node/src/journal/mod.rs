//! The collector's journal on disk: accepted flows not yet settled survive `kill -9` and
//! power loss, so that no flow acknowledged to an exporter or a peer is lost.
//!
//! The core decides what to write ([`crate::core::JournalOp`]); this module writes it.
//!
//! - **Segments.** Append-only files `journal/<seq>.seg` in the data directory, each
//!   starting with a magic and a version, holding checksummed records ([`codec`]). A new
//!   segment starts at every open and whenever the current one passes
//!   [`SEGMENT_BYTES_MAX`], or holds nothing live and passes [`SEGMENT_RECYCLE_BYTES_MIN`].
//! - **Group commit.** [`Journal::append_record`] writes (no fsync); [`Journal::sync`] fsyncs the
//!   current segment once for every append written so far and returns the largest id now
//!   durable, which the shell passes to `NodeCore::journal_synced`: acks follow the fsync.
//! - **Release.** [`Journal::release`] writes a release record (made durable by the next
//!   sync; losing it only duplicates flows after a restart) and deletes every segment
//!   other than the current one whose appends are all released. The caller releases only
//!   once the sink holds the emitted flows.
//! - **Replay.** [`Journal::open`] reads every segment in order, applies appends and
//!   releases, and returns the appends still live. A torn or corrupt record ends the read
//!   of its segment: it is counted in [`Replay::corrupt_records`], never fatal.

pub mod codec;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use codec::{Record, SEGMENT_HEADER_BYTES, SEGMENT_MAGIC, SEGMENT_VERSION, SEGMENT_VERSION_MIN};

use crate::core::FlowRecord;

/// A segment rolls once it holds this many bytes.
pub const SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// A segment with nothing live rolls (and is deleted) once it holds this many bytes, so
/// that a quiet journal does not keep a large file of released records.
pub const SEGMENT_RECYCLE_BYTES_MIN: u64 = 1024 * 1024;
/// The most segment files read at open; more means a directory that is not ours.
pub const SEGMENTS_MAX: usize = 100_000;

const SEGMENT_SUFFIX: &str = ".seg";

/// Journal errors. The journal is unusable after an IO error on append or sync (a later
/// restart replays what reached the disk).
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal directory {path} holds more than {max} segments")]
    TooManySegments { path: PathBuf, max: usize },
    /// A failpoint stopped the journal (tests).
    #[error("crash injected at {0:?}")]
    Crashed(Step),
}

/// The steps a failpoint can stop the journal at.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Step {
    /// Before an append record is written.
    AppendWrite,
    /// Halfway through writing an append record (a torn tail).
    AppendTorn,
    /// Before the fsync of a group commit.
    Fsync,
    /// Before a release record is written.
    ReleaseWrite,
    /// Before a fully released segment is deleted.
    SegmentDelete,
}

/// Decides whether to crash at a step (tests); `true` stops the journal there.
pub type Failpoint = Box<dyn FnMut(Step) -> bool + Send>;

/// What [`Journal::open`] found.
#[derive(Debug, Default)]
pub struct Replay {
    /// Appends never released, in id order: pass them to `NodeCore::recover`.
    pub entries: Vec<(u64, Vec<FlowRecord>)>,
    /// The largest append id seen in any record, released or not.
    pub max_id: u64,
    /// Records (or segment headers) found torn or corrupt; the rest of such a segment is
    /// skipped.
    pub corrupt_records: u64,
    pub segments_read: usize,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// Appends in it not yet released.
    live: BTreeSet<u64>,
    bytes: u64,
}

/// The journal of one collector. See the module documentation.
pub struct Journal {
    dir: PathBuf,
    segments: BTreeMap<u64, Segment>,
    /// Append id → the segment holding it, for live appends.
    location: BTreeMap<u64, u64>,
    current_seq: u64,
    current: File,
    /// The largest id appended, and the largest made durable by a sync.
    appended_upto: u64,
    synced_upto: u64,
    /// Bytes written to the current segment since its last fsync.
    dirty: bool,
    failpoint: Option<Failpoint>,
    crashed: Option<Step>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.dir)
            .field("segments", &self.segments.len())
            .field("live", &self.location.len())
            .field("synced_upto", &self.synced_upto)
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Journal {
    /// Opens (creating) the journal in `dir`, replays it, and starts a new segment.
    pub fn open(dir: &Path) -> Result<(Journal, Replay), JournalError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut seqs = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            seqs.push(seq);
            if seqs.len() > SEGMENTS_MAX {
                return Err(JournalError::TooManySegments {
                    path: dir.to_owned(),
                    max: SEGMENTS_MAX,
                });
            }
        }
        seqs.sort_unstable();
        let mut replay = Replay::default();
        let mut live: BTreeMap<u64, (u64, Vec<FlowRecord>)> = BTreeMap::new();
        let mut segments = BTreeMap::new();
        for &seq in &seqs {
            let path = segment_path(dir, seq);
            let mut bytes = Vec::new();
            File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(io_err(&path))?;
            replay.segments_read += 1;
            read_segment(&bytes, seq, &mut live, &mut replay);
            segments.insert(
                seq,
                Segment {
                    path,
                    live: BTreeSet::new(),
                    bytes: bytes.len() as u64,
                },
            );
        }
        let mut location = BTreeMap::new();
        for (id, (seq, _)) in &live {
            location.insert(*id, *seq);
            if let Some(s) = segments.get_mut(seq) {
                s.live.insert(*id);
            }
        }
        replay.entries = live
            .into_iter()
            .map(|(id, (_, flows))| (id, flows))
            .collect();
        let current_seq = seqs.last().map_or(1, |s| s + 1);
        let (current, path) = create_segment(dir, current_seq)?;
        segments.insert(
            current_seq,
            Segment {
                path,
                live: BTreeSet::new(),
                bytes: SEGMENT_HEADER_BYTES as u64,
            },
        );
        let mut journal = Journal {
            dir: dir.to_owned(),
            segments,
            location,
            current_seq,
            current,
            appended_upto: replay.max_id,
            synced_upto: replay.max_id,
            dirty: false,
            failpoint: None,
            crashed: None,
            scratch: Vec::new(),
        };
        // Segments with nothing live (fully released, or corrupt from the start) go now.
        journal.delete_settled()?;
        Ok((journal, replay))
    }

    /// Installs a failpoint (tests).
    pub fn set_failpoint(&mut self, failpoint: Failpoint) {
        self.failpoint = Some(failpoint);
    }

    fn check(&mut self, step: Step) -> Result<(), JournalError> {
        if let Some(step) = self.crashed {
            return Err(JournalError::Crashed(step));
        }
        if let Some(fp) = &mut self.failpoint {
            if fp(step) {
                self.crashed = Some(step);
                return Err(JournalError::Crashed(step));
            }
        }
        Ok(())
    }

    /// Writes append `id` as [`codec::encode_append`] encoded it (what the core's
    /// `JournalOp::Append` carries); durable at the next [`Journal::sync`].
    pub fn append_record(&mut self, id: u64, record: &[u8]) -> Result<(), JournalError> {
        self.check(Step::AppendWrite)?;
        self.roll_if_needed()?;
        let path = self.current_path();
        if let Err(e) = self.check(Step::AppendTorn) {
            // Leave half a record behind, as a crash in the middle of a write would.
            let _ = self.current.write_all(&record[..record.len() / 2]);
            return Err(e);
        }
        self.current.write_all(record).map_err(io_err(&path))?;
        if let Some(s) = self.segments.get_mut(&self.current_seq) {
            s.bytes += record.len() as u64;
            s.live.insert(id);
        }
        self.location.insert(id, self.current_seq);
        self.appended_upto = self.appended_upto.max(id);
        self.dirty = true;
        Ok(())
    }

    /// The group commit: fsyncs what was written and returns the largest append id now
    /// durable (for `NodeCore::journal_synced`).
    pub fn sync(&mut self) -> Result<u64, JournalError> {
        if self.dirty {
            self.check(Step::Fsync)?;
            let path = self.current_path();
            self.current.sync_data().map_err(io_err(&path))?;
            self.dirty = false;
        }
        self.synced_upto = self.appended_upto;
        Ok(self.synced_upto)
    }

    /// Releases appends whose flows are all emitted (and durable in the sink) or held by
    /// a peer; deletes segments left with nothing live.
    pub fn release(&mut self, ids: &[u64]) -> Result<(), JournalError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.check(Step::ReleaseWrite)?;
        let mut bytes = std::mem::take(&mut self.scratch);
        bytes.clear();
        codec::encode(&Record::Release { ids: ids.to_vec() }, &mut bytes);
        let path = self.current_path();
        self.current.write_all(&bytes).map_err(io_err(&path))?;
        self.dirty = true;
        if let Some(s) = self.segments.get_mut(&self.current_seq) {
            s.bytes += bytes.len() as u64;
        }
        self.scratch = bytes;
        for id in ids {
            if let Some(seq) = self.location.remove(id) {
                if let Some(s) = self.segments.get_mut(&seq) {
                    s.live.remove(id);
                }
            }
        }
        self.delete_settled()
    }

    /// Appends written and not yet released.
    pub fn live_appends(&self) -> usize {
        self.location.len()
    }

    /// Segment files, the current one included.
    pub fn segments(&self) -> usize {
        self.segments.len()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn current_path(&self) -> PathBuf {
        segment_path(&self.dir, self.current_seq)
    }

    fn roll_if_needed(&mut self) -> Result<(), JournalError> {
        let Some(current) = self.segments.get(&self.current_seq) else {
            return Ok(());
        };
        let full = current.bytes >= SEGMENT_BYTES_MAX;
        let recyclable = current.live.is_empty() && current.bytes >= SEGMENT_RECYCLE_BYTES_MIN;
        if !full && !recyclable {
            return Ok(());
        }
        // What was written to the old segment must be durable before acks can rely on
        // the new one alone.
        if self.dirty {
            self.check(Step::Fsync)?;
            let path = self.current_path();
            self.current.sync_data().map_err(io_err(&path))?;
            self.dirty = false;
            self.synced_upto = self.appended_upto;
        }
        let seq = self.current_seq + 1;
        let (file, path) = create_segment(&self.dir, seq)?;
        self.current = file;
        self.current_seq = seq;
        self.segments.insert(
            seq,
            Segment {
                path,
                live: BTreeSet::new(),
                bytes: SEGMENT_HEADER_BYTES as u64,
            },
        );
        self.delete_settled()
    }

    fn delete_settled(&mut self) -> Result<(), JournalError> {
        let settled: Vec<u64> = self
            .segments
            .iter()
            .filter(|(seq, s)| **seq != self.current_seq && s.live.is_empty())
            .map(|(seq, _)| *seq)
            .collect();
        for seq in settled {
            self.check(Step::SegmentDelete)?;
            if let Some(s) = self.segments.remove(&seq) {
                match fs::remove_file(&s.path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&s.path)(e)),
                }
            }
        }
        Ok(())
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}{SEGMENT_SUFFIX}"))
}

fn create_segment(dir: &Path, seq: u64) -> Result<(File, PathBuf), JournalError> {
    let path = segment_path(dir, seq);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let mut header = Vec::with_capacity(SEGMENT_HEADER_BYTES);
    header.extend_from_slice(&SEGMENT_MAGIC);
    header.extend_from_slice(&SEGMENT_VERSION.to_le_bytes());
    file.write_all(&header)
        .and_then(|()| file.sync_data())
        .map_err(io_err(&path))?;
    // The new name must survive too: fsync the directory.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok((file, path))
}

/// Applies the records of one segment to `live` (id → (segment, flows)).
fn read_segment(
    bytes: &[u8],
    seq: u64,
    live: &mut BTreeMap<u64, (u64, Vec<FlowRecord>)>,
    replay: &mut Replay,
) {
    let version = bytes
        .get(4..8)
        .map(|v| u32::from_le_bytes([v[0], v[1], v[2], v[3]]));
    let Some(version) = version.filter(|v| {
        bytes[..4] == SEGMENT_MAGIC && (SEGMENT_VERSION_MIN..=SEGMENT_VERSION).contains(v)
    }) else {
        // A segment created but cut before its header was written holds nothing.
        if !bytes.is_empty() {
            replay.corrupt_records += 1;
            tracing::warn!(seq, "journal segment with a bad header skipped");
        }
        return;
    };
    let mut at = SEGMENT_HEADER_BYTES;
    while at < bytes.len() {
        match codec::decode_version(&bytes[at..], version) {
            Ok((record, used)) => {
                at += used;
                match record {
                    Record::Append { id, flows } => {
                        replay.max_id = replay.max_id.max(id);
                        live.insert(id, (seq, flows));
                    }
                    Record::Release { ids } => {
                        for id in ids {
                            live.remove(&id);
                        }
                    }
                }
            }
            Err(e) => {
                replay.corrupt_records += 1;
                tracing::warn!(seq, offset = at, error = %e, "journal tail torn or corrupt; rest of the segment skipped");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
