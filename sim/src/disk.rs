//! A collector's simulated disk: where the core's journal ([`JournalOp`]) lives.
//!
//! This is the environment, not a mock of our code: the real shell writes the same
//! operations to segment files (`tenure_node::journal`), and what matters to the core is
//! only what a disk does with them. Writes land in the page cache at once; an fsync,
//! after a delay the scenario draws, makes every write so far durable, and only then does
//! the simulator call `NodeCore::journal_synced`. A crash keeps every durable write and
//! a random prefix of the unsynced ones (a `kill -9` keeps the page cache, a power loss
//! keeps whatever reached the platter, in order: the journal's replay stops at the first
//! torn record). On restart, [`Disk::replay`] gives what `NodeCore::recover` takes.

use std::collections::BTreeMap;

use tenure_node::core::{FlowRecord, JournalOp};
use tenure_node::journal::codec;

/// The disk of one collector. It outlives the collector's crashes.
#[derive(Debug, Default)]
pub struct Disk {
    /// Durable appends not released: append id → its record, as the core encoded it.
    live: BTreeMap<u64, Vec<u8>>,
    /// The largest append id that ever became durable, released or not: passed to
    /// `recover` so that a restarted core never issues an id the disk still holds.
    max_id: u64,
    /// Written since the last fsync, in write order.
    unsynced: Vec<JournalOp>,
    /// An fsync is scheduled (one covers every write made before it completes).
    sync_pending: bool,
}

/// What a crash did to the unsynced writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashLoss {
    pub kept: usize,
    pub lost: usize,
}

impl Disk {
    /// Writes one operation (not durable yet). Returns `true` when no fsync is scheduled:
    /// the caller schedules one.
    pub fn write(&mut self, op: JournalOp) -> bool {
        self.unsynced.push(op);
        !std::mem::replace(&mut self.sync_pending, true)
    }

    /// An fsync completed: every write so far is durable. Returns the largest durable
    /// append id (for `journal_synced`), or `None` when no append was ever durable.
    pub fn fsync(&mut self) -> Option<u64> {
        self.sync_pending = false;
        let writes = std::mem::take(&mut self.unsynced);
        self.apply(writes);
        (self.max_id > 0).then_some(self.max_id)
    }

    /// The collector crashed: the first `kept` unsynced writes reach the disk, the rest
    /// are gone, and the pending fsync with them.
    pub fn crash(&mut self, kept: usize) -> CrashLoss {
        self.sync_pending = false;
        let mut writes = std::mem::take(&mut self.unsynced);
        let kept = kept.min(writes.len());
        let lost = writes.len() - kept;
        writes.truncate(kept);
        self.apply(writes);
        CrashLoss { kept, lost }
    }

    /// Unsynced writes (what a crash now may lose).
    pub fn unsynced_len(&self) -> usize {
        self.unsynced.len()
    }

    /// What a restarted collector passes to `NodeCore::recover`: the unreleased appends in
    /// id order, then the largest id ever durable as an entry with no flows (as the real
    /// shell does), so that no id the disk holds is issued again.
    pub fn replay(&self) -> Vec<(u64, Vec<FlowRecord>)> {
        let mut entries: Vec<(u64, Vec<FlowRecord>)> = self
            .live
            .iter()
            .map(|(id, record)| {
                // Read back as the real journal's replay does.
                let (_, flows) = codec::decode_append(record)
                    .expect("an append record the core encoded decodes");
                (*id, flows)
            })
            .collect();
        if self.max_id > 0 {
            entries.push((self.max_id, Vec::new()));
        }
        entries
    }

    fn apply(&mut self, writes: Vec<JournalOp>) {
        for op in writes {
            match op {
                JournalOp::Append { id, record } => {
                    self.max_id = self.max_id.max(id);
                    self.live.insert(id, record);
                }
                JournalOp::Release { ids } => {
                    for id in ids {
                        self.live.remove(&id);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(id: u64) -> JournalOp {
        let mut record = Vec::new();
        codec::encode_append(id, [].iter(), &mut record);
        JournalOp::Append { id, record }
    }

    #[test]
    fn a_crash_keeps_the_durable_writes_and_a_prefix_of_the_rest() {
        let mut disk = Disk::default();
        assert!(disk.write(append(1)), "the first write schedules an fsync");
        assert!(!disk.write(append(2)), "one fsync covers both");
        assert_eq!(disk.fsync(), Some(2));
        assert!(disk.write(JournalOp::Release { ids: vec![1] }));
        disk.write(append(3));
        let loss = disk.crash(1);
        assert_eq!(loss, CrashLoss { kept: 1, lost: 1 });
        let ids: Vec<u64> = disk.replay().iter().map(|(id, _)| *id).collect();
        assert_eq!(
            ids,
            vec![2, 2],
            "append 2 live, then the largest id with no flows"
        );
        assert_eq!(disk.unsynced_len(), 0);
    }
}
