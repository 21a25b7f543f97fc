//! Flows waiting for their remote IP's history to cover them, with deadlines.
//!
//! Bounded by `pending_flows_max`. Indexed by IP, so that a claim retries only the flows
//! of its own IP, and by deadline, so that expiry visits only the flows that are due.

use std::collections::BTreeSet;

use crate::ip::{new_map, IpKey, Map};
use crate::time::{UnixMillis, Window};

#[derive(Debug)]
pub(crate) struct Entry<F> {
    pub(crate) ip: IpKey,
    pub(crate) window: Window,
    pub(crate) submitted: UnixMillis,
    pub(crate) deadline: UnixMillis,
    pub(crate) payload: F,
}

#[derive(Debug)]
pub(crate) struct PendingQueue<F> {
    slots: Vec<Option<Entry<F>>>,
    free: Vec<u32>,
    by_ip: Map<IpKey, Vec<u32>>,
    /// `(deadline, sequence, slot)`: the sequence keeps equal deadlines in arrival order.
    by_deadline: BTreeSet<(UnixMillis, u64, u32)>,
    sequences: Vec<u64>,
    next_sequence: u64,
    max: usize,
}

impl<F> PendingQueue<F> {
    pub(crate) fn new(max: usize) -> PendingQueue<F> {
        PendingQueue {
            slots: Vec::new(),
            free: Vec::new(),
            by_ip: new_map(),
            by_deadline: BTreeSet::new(),
            sequences: Vec::new(),
            next_sequence: 0,
            max,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.by_deadline.len()
    }

    /// Queues `entry`, or gives it back when the queue is full.
    pub(crate) fn push(&mut self, entry: Entry<F>) -> Result<(), Entry<F>> {
        if self.len() >= self.max {
            return Err(entry);
        }
        let (ip, deadline) = (entry.ip, entry.deadline);
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(entry);
                slot
            }
            None => {
                self.slots.push(Some(entry));
                self.sequences.push(0);
                // `max` fits in u32 (checked in the config).
                u32::try_from(self.slots.len() - 1).expect("pending slots fit in u32")
            }
        };
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.sequences[slot as usize] = sequence;
        self.by_deadline.insert((deadline, sequence, slot));
        self.by_ip.entry(ip).or_default().push(slot);
        Ok(())
    }

    /// Slots of the flows waiting on `ip`, oldest first.
    pub(crate) fn slots_for(&self, ip: &IpKey) -> Vec<u32> {
        self.by_ip.get(ip).cloned().unwrap_or_default()
    }

    pub(crate) fn has_ip(&self, ip: &IpKey) -> bool {
        self.by_ip.contains_key(ip)
    }

    pub(crate) fn get(&self, slot: u32) -> Option<&Entry<F>> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    pub(crate) fn remove(&mut self, slot: u32) -> Option<Entry<F>> {
        let entry = self.slots.get_mut(slot as usize)?.take()?;
        let sequence = self.sequences[slot as usize];
        let removed = self.by_deadline.remove(&(entry.deadline, sequence, slot));
        debug_assert!(
            removed,
            "pending slot {slot} missing from the deadline index"
        );
        if let Some(list) = self.by_ip.get_mut(&entry.ip) {
            list.retain(|s| *s != slot);
            if list.is_empty() {
                self.by_ip.remove(&entry.ip);
            }
        }
        self.free.push(slot);
        Some(entry)
    }

    /// The slot of the flow with the earliest deadline, if that deadline is at or before
    /// `now`.
    pub(crate) fn next_due(&self, now: UnixMillis) -> Option<u32> {
        self.by_deadline
            .first()
            .filter(|(deadline, _, _)| *deadline <= now)
            .map(|(_, _, slot)| *slot)
    }

    pub(crate) fn next_deadline(&self) -> Option<UnixMillis> {
        self.by_deadline.first().map(|(deadline, _, _)| *deadline)
    }

    pub(crate) fn ips(&self) -> impl Iterator<Item = &IpKey> {
        self.by_ip.keys()
    }

    pub(crate) fn ip_count(&self) -> usize {
        self.by_ip.len()
    }
}
