//! The core's side of the journal: which accepted flows are not settled yet, and which
//! acknowledgements wait for the caller's fsync.
//!
//! The core does no IO; it says what to write ([`JournalOp`]) and learns what is durable
//! through [`super::NodeCore::journal_synced`]. See the module documentation of
//! [`super`] for the invariants.

use std::collections::{BTreeMap, VecDeque};

use tenure_gossip::wire::{self, AckStatus, Message};

use super::{ConnId, Dest, FlowRecord, Output};
use crate::journal::codec;

/// What the caller must write to its journal.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum JournalOp {
    /// Flows accepted from an exporter or a peer, not yet emitted nor acknowledged by the
    /// peer they were forwarded to. Must be durable before the caller reports `id` (or a
    /// larger one) to [`super::NodeCore::journal_synced`]. Ids only grow within one run.
    ///
    /// `record` is the append as the journal stores it ([`crate::journal::codec`]: header,
    /// checksum, flows), encoded here rather than by the caller so that the flows are not
    /// copied into the operation; [`codec::decode_append`] reads it back.
    Append { id: u64, record: Vec<u8> },
    /// Every flow of these appends has been emitted (an [`Output::Emit`] earlier in the
    /// same output vector or before) or acknowledged by the node it was forwarded to. The
    /// caller may forget them once the emitted flows they cover are as durable as the
    /// append was; a release that is lost only causes duplicates after a restart.
    Release { ids: Vec<u64> },
}

/// A flow as the core carries it: the record and the journal append it came from, so
/// that settling it (emitting it, or a peer acknowledging it) releases the right append.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct JournaledFlow {
    /// The [`JournalOp::Append`] that holds this flow.
    pub journal_id: u64,
    pub record: FlowRecord,
}

/// An acknowledgement withheld until its append is durable.
#[derive(Debug)]
struct WithheldAck {
    journal_id: u64,
    conn: ConnId,
    batch_id: u64,
}

/// Unsettled flows per append, and acks waiting for durability.
#[derive(Debug)]
pub(super) struct Ledger {
    /// The id of the next append; starts at 1 and, after [`Ledger::recovered`], above
    /// every recovered id, so that an id still in the caller's journal is never reused.
    next_id: u64,
    /// Append id → flows of it not yet settled. An entry at zero is released at once.
    open: BTreeMap<u64, usize>,
    /// In increasing `journal_id` order (ids are issued in order).
    withheld: VecDeque<WithheldAck>,
    /// Appends settled since the last flush, released together.
    released: Vec<u64>,
    /// The largest id reported durable by [`Ledger::synced`].
    synced_upto: u64,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            next_id: 1,
            open: BTreeMap::new(),
            withheld: VecDeque::new(),
            released: Vec::new(),
            synced_upto: 0,
        }
    }
}

impl Ledger {
    /// Journals `flows` (accepted on `conn` in batch `batch_id`) and withholds the ack.
    /// The flows carry the id of this append already: [`Ledger::next_id`], read before.
    pub(super) fn append(
        &mut self,
        flows: &[JournaledFlow],
        conn: ConnId,
        batch_id: u64,
        out: &mut Vec<Output>,
    ) {
        let id = self.next_id;
        debug_assert!(
            flows.iter().all(|f| f.journal_id == id),
            "flows carry the id of their append"
        );
        self.next_id = self.next_id.saturating_add(1);
        self.open.insert(id, flows.len());
        let records = flows.iter().map(|f| &f.record);
        let first = flows.first().map(|f| &f.record);
        let mut record = Vec::with_capacity(codec::append_bytes_hint(flows.len(), first));
        codec::encode_append(id, records, &mut record);
        out.push(Output::Journal(JournalOp::Append { id, record }));
        debug_assert!(
            self.withheld.back().is_none_or(|w| w.journal_id < id),
            "withheld acks are in append order"
        );
        self.withheld.push_back(WithheldAck {
            journal_id: id,
            conn,
            batch_id,
        });
    }

    /// Tracks flows replayed from the journal under their old append id.
    pub(super) fn recovered(&mut self, id: u64, flows: usize) {
        self.next_id = self.next_id.max(id.saturating_add(1));
        *self.open.entry(id).or_default() += flows;
        if flows == 0 {
            self.settle_empty(id);
        }
    }

    fn settle_empty(&mut self, id: u64) {
        if self.open.get(&id) == Some(&0) {
            self.open.remove(&id);
            self.released.push(id);
        }
    }

    /// One flow of append `id` is settled.
    pub(super) fn settle(&mut self, id: u64) {
        match self.open.get_mut(&id) {
            Some(left) => {
                debug_assert!(*left > 0, "an open append has unsettled flows");
                *left = left.saturating_sub(1);
                if *left == 0 {
                    self.open.remove(&id);
                    self.released.push(id);
                }
            }
            None => debug_assert!(false, "flow of append {id} settled twice or never appended"),
        }
    }

    /// Acks a batch that added no append because every flow of it is held by an earlier
    /// one (a copy re-sent by a peer): at once when every append so far is durable, else
    /// once it is.
    pub(super) fn withhold_behind_last(
        &mut self,
        conn: ConnId,
        batch_id: u64,
        out: &mut Vec<Output>,
    ) {
        let last = self.next_id.saturating_sub(1);
        if last <= self.synced_upto {
            out.push(Output::Frame {
                to: Dest::Conn(conn),
                message: Message::Ack(wire::Ack {
                    batch_id,
                    status: AckStatus::Accepted,
                }),
            });
            return;
        }
        debug_assert!(
            self.withheld.back().is_none_or(|w| w.journal_id <= last),
            "withheld acks are in append order"
        );
        self.withheld.push_back(WithheldAck {
            journal_id: last,
            conn,
            batch_id,
        });
    }

    /// Acks for every append up to `upto_id`, now durable.
    pub(super) fn synced(&mut self, upto_id: u64, out: &mut Vec<Output>) {
        self.synced_upto = self.synced_upto.max(upto_id);
        while self
            .withheld
            .front()
            .is_some_and(|w| w.journal_id <= upto_id)
        {
            if let Some(w) = self.withheld.pop_front() {
                out.push(Output::Frame {
                    to: Dest::Conn(w.conn),
                    message: Message::Ack(wire::Ack {
                        batch_id: w.batch_id,
                        status: AckStatus::Accepted,
                    }),
                });
            }
        }
    }

    /// Pushes one release for the appends settled since the last call.
    pub(super) fn flush(&mut self, out: &mut Vec<Output>) {
        if !self.released.is_empty() {
            let mut ids = std::mem::take(&mut self.released);
            ids.sort_unstable();
            out.push(Output::Journal(JournalOp::Release { ids }));
        }
    }

    /// Appends with flows not yet settled.
    pub(super) fn open_len(&self) -> usize {
        self.open.len()
    }

    /// Acks waiting for [`super::NodeCore::journal_synced`].
    pub(super) fn withheld_len(&self) -> usize {
        self.withheld.len()
    }

    /// The id the next append will get.
    pub(super) fn next_id(&self) -> u64 {
        self.next_id
    }
}
