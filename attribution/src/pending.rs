//! Flows waiting for their remote IP's history to cover them, with deadlines.
//!
//! Bounded by `pending_flows_max`. Indexed by IP, so that a claim retries only the flows
//! of its own IP, and by deadline, so that expiry visits only the flows that are due.
//!
//! Every flow a collector receives passes through here (it ends before the heartbeat
//! that covers its end arrives), so both indexes avoid allocating per flow: the flows of
//! one IP form a list threaded through the slots, and the deadline index is a binary heap
//! whose entries for flows that left early are dropped lazily, when they reach the top.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::ip::{new_map, IpKey, Map};
use crate::table::prefetch;
use crate::time::{UnixMillis, Window};

#[derive(Debug)]
pub(crate) struct Entry<F> {
    pub(crate) ip: IpKey,
    pub(crate) window: Window,
    pub(crate) submitted: UnixMillis,
    pub(crate) deadline: UnixMillis,
    pub(crate) payload: F,
}

/// No slot: the end of an IP's list.
const NIL: u32 = u32::MAX;

#[derive(Debug)]
struct Slot<F> {
    entry: Option<Entry<F>>,
    /// Arrival order of the entry now in this slot; a deadline-heap item names the slot
    /// and the sequence, so an item whose flow left (and whose slot was reused) is stale.
    sequence: u64,
    /// The neighbours in the list of flows waiting on the same IP, oldest first.
    prev: u32,
    next: u32,
}

#[derive(Debug)]
pub(crate) struct PendingQueue<F> {
    slots: Vec<Slot<F>>,
    free: Vec<u32>,
    /// The first and last slot of each IP's list.
    by_ip: Map<IpKey, (u32, u32)>,
    /// `(deadline, sequence, slot)`, earliest first: the sequence keeps equal deadlines in
    /// arrival order. May hold items of flows that left already, never at the top.
    by_deadline: BinaryHeap<Reverse<(UnixMillis, u64, u32)>>,
    live: usize,
    next_sequence: u64,
    max: usize,
}

impl<F> PendingQueue<F> {
    pub(crate) fn new(max: usize, seed: u64) -> PendingQueue<F> {
        PendingQueue {
            slots: Vec::new(),
            free: Vec::new(),
            by_ip: new_map(seed),
            by_deadline: BinaryHeap::new(),
            live: 0,
            next_sequence: 0,
            max,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// Queues `entry`, or gives it back when the queue is full.
    pub(crate) fn push(&mut self, entry: Entry<F>) -> Result<(), Entry<F>> {
        if self.live >= self.max {
            return Err(entry);
        }
        let (ip, deadline) = (entry.ip, entry.deadline);
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let tail = self.by_ip.get(&ip).map_or(NIL, |&(_, tail)| tail);
        let fresh = Slot {
            entry: Some(entry),
            sequence,
            prev: tail,
            next: NIL,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = fresh;
                slot
            }
            None => {
                self.slots.push(fresh);
                // `max` fits in u32 (checked in the config), and NIL is never reached.
                u32::try_from(self.slots.len() - 1).expect("pending slots fit in u32")
            }
        };
        match self.by_ip.get_mut(&ip) {
            Some(ends) => {
                self.slots[tail as usize].next = slot;
                ends.1 = slot;
            }
            None => {
                self.by_ip.insert(ip, (slot, slot));
            }
        }
        self.by_deadline.push(Reverse((deadline, sequence, slot)));
        self.live += 1;
        // Stale items below the top are dropped only when they surface: drop them all once they
        // outnumber the live ones, so the heap stays within twice the queue.
        if self.by_deadline.len() > 2 * self.live + 1024 {
            self.drop_stale_deadlines();
        }
        Ok(())
    }

    /// The oldest flow waiting on `ip`.
    pub(crate) fn first_for(&self, ip: &IpKey) -> Option<u32> {
        self.by_ip.get(ip).map(|&(head, _)| head)
    }

    /// The flow after `slot` in its IP's list, if `slot` holds a flow.
    pub(crate) fn next_for(&self, slot: u32) -> Option<u32> {
        let slot = self.slots.get(slot as usize)?;
        (slot.entry.is_some() && slot.next != NIL).then_some(slot.next)
    }

    /// Starts loading the flow in `slot` into the cache (a slot is a few cache lines): a
    /// retry walking an IP's list asks for the next flow while it decides the current one.
    pub(crate) fn prefetch(&self, slot: u32) {
        if let Some(held) = self.slots.get(slot as usize) {
            let start: *const u8 = std::ptr::from_ref(held).cast();
            for offset in (0..std::mem::size_of::<Slot<F>>()).step_by(64) {
                prefetch(start.wrapping_add(offset));
            }
        }
    }

    pub(crate) fn has_ip(&self, ip: &IpKey) -> bool {
        self.by_ip.contains_key(ip)
    }

    pub(crate) fn get(&self, slot: u32) -> Option<&Entry<F>> {
        self.slots.get(slot as usize)?.entry.as_ref()
    }

    pub(crate) fn remove(&mut self, slot: u32) -> Option<Entry<F>> {
        let held = self.slots.get_mut(slot as usize)?;
        let entry = held.entry.take()?;
        let (prev, next) = (held.prev, held.next);
        if prev != NIL {
            self.slots[prev as usize].next = next;
        }
        if next != NIL {
            self.slots[next as usize].prev = prev;
        }
        match (prev, next) {
            (NIL, NIL) => {
                self.by_ip.remove(&entry.ip);
            }
            _ => {
                if let Some(ends) = self.by_ip.get_mut(&entry.ip) {
                    if prev == NIL {
                        ends.0 = next;
                    }
                    if next == NIL {
                        ends.1 = prev;
                    }
                }
            }
        }
        self.free.push(slot);
        self.live -= 1;
        self.drop_stale_top();
        Some(entry)
    }

    /// The slot of the flow with the earliest deadline, if that deadline is at or before
    /// `now`.
    pub(crate) fn next_due(&self, now: UnixMillis) -> Option<u32> {
        self.by_deadline
            .peek()
            .filter(|Reverse((deadline, _, _))| *deadline <= now)
            .map(|Reverse((_, _, slot))| *slot)
    }

    pub(crate) fn next_deadline(&self) -> Option<UnixMillis> {
        self.by_deadline
            .peek()
            .map(|Reverse((deadline, _, _))| *deadline)
    }

    pub(crate) fn ips(&self) -> impl Iterator<Item = &IpKey> {
        self.by_ip.keys()
    }

    pub(crate) fn ip_count(&self) -> usize {
        self.by_ip.len()
    }

    fn is_live(&self, sequence: u64, slot: u32) -> bool {
        holds(&self.slots, sequence, slot)
    }

    /// Keeps the invariant that the heap's top, if any, is a flow still waiting.
    fn drop_stale_top(&mut self) {
        while let Some(&Reverse((_, sequence, slot))) = self.by_deadline.peek() {
            if self.is_live(sequence, slot) {
                break;
            }
            self.by_deadline.pop();
        }
    }

    /// Drops the items of flows that left, in place: the heap keeps its room, so the
    /// pushes that follow do not grow (and copy) it again.
    fn drop_stale_deadlines(&mut self) {
        let slots = &self.slots;
        self.by_deadline
            .retain(|&Reverse((_, sequence, slot))| holds(slots, sequence, slot));
    }
}

/// Whether `slot` still holds the flow that arrived as `sequence`.
fn holds<F>(slots: &[Slot<F>], sequence: u64, slot: u32) -> bool {
    slots
        .get(slot as usize)
        .is_some_and(|s| s.entry.is_some() && s.sequence == sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ip: u32, deadline: u64, payload: u32) -> Entry<u32> {
        let at = UnixMillis(1_000);
        Entry {
            ip: IpKey::V4(ip),
            window: Window::new(at, at).expect("ordered"),
            submitted: at,
            deadline: UnixMillis(deadline),
            payload,
        }
    }

    fn waiting_on(queue: &PendingQueue<u32>, ip: u32) -> Vec<u32> {
        let mut payloads = Vec::new();
        let mut cursor = queue.first_for(&IpKey::V4(ip));
        while let Some(slot) = cursor {
            payloads.push(queue.get(slot).expect("listed slots hold flows").payload);
            cursor = queue.next_for(slot);
        }
        payloads
    }

    /// Against a plain model, over pushes and removals in every position of the lists
    /// and the heap, with slots reused: the lists, the deadline order and the count agree.
    #[test]
    fn matches_a_plain_model() {
        let mut queue = PendingQueue::new(64, crate::DEFAULT_HASH_SEED);
        let mut model: Vec<(u32, u64, u32)> = Vec::new(); // (ip, deadline, payload)
        let mut rng = 7u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            rng >> 33
        };
        for payload in 0..5_000u32 {
            if next() % 3 != 0 || model.is_empty() {
                let (ip, deadline) = ((next() % 5) as u32, 2_000 + next() % 50);
                match queue.push(entry(ip, deadline, payload)) {
                    Ok(()) => model.push((ip, deadline, payload)),
                    Err(_) => assert_eq!(model.len(), 64, "refused only when full"),
                }
            } else if next() % 2 == 0 {
                // Remove a flow from the middle of an IP's list (as a retry does).
                let pick = model[(next() % model.len() as u64) as usize];
                let mut cursor = queue.first_for(&IpKey::V4(pick.0));
                while let Some(slot) = cursor {
                    cursor = queue.next_for(slot);
                    if queue.get(slot).map(|e| e.payload) == Some(pick.2) {
                        assert_eq!(queue.remove(slot).map(|e| e.payload), Some(pick.2));
                    }
                }
                model.retain(|m| m.2 != pick.2);
            } else {
                // Expire the earliest (as a tick does): earliest deadline, then arrival.
                let slot = queue.next_due(UnixMillis(u64::MAX)).expect("not empty");
                let earliest = *model.iter().min_by_key(|m| (m.1, m.2)).expect("not empty");
                assert_eq!(queue.get(slot).map(|e| e.payload), Some(earliest.2));
                queue.remove(slot);
                model.retain(|m| m.2 != earliest.2);
            }
            assert_eq!(queue.len(), model.len());
            for ip in 0..5 {
                let want: Vec<u32> = model.iter().filter(|m| m.0 == ip).map(|m| m.2).collect();
                assert_eq!(waiting_on(&queue, ip), want, "ip {ip}");
                assert_eq!(queue.has_ip(&IpKey::V4(ip)), !want.is_empty());
            }
            let earliest = model.iter().map(|m| UnixMillis(m.1)).min();
            assert_eq!(queue.next_deadline(), earliest);
            assert!(queue.by_deadline.len() <= 2 * queue.live + 1024);
        }
    }
}
