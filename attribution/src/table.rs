//! `Table`, the hash table behind the ownership ranges: open addressing with linear probing,
//! each key beside its value in one slot, so that a key's slot is known from its hash alone.
//!
//! Why not hashbrown: a hashbrown lookup is two dependent loads (the control bytes, then the
//! bucket they point to), and its API cannot start loading a key's bucket before probing the
//! control bytes. Here the first slot a key can be in (its *home*) is `hash & mask`, so
//! `Engine::lookup_many` computes the homes of a whole group of lookups and prefetches them
//! before reading any: the group's memory loads overlap, and each lookup then finds its slot
//! in the cache. On the lookup benchmark (`benches/lookup.rs`: 1,000,000 IPs, the table 48%
//! full) that took the ratio to a bare hashbrown `get` from 0.47–0.51 to 0.62–0.70, and
//! claim ingest from ~6.5 to ~10 million per second, in interleaved runs of both builds.
//!
//! The price: a key that is neither at home nor in the next slot costs a mispredicted
//! branch, and there are more of those the fuller the table. Near the growth threshold
//! (1,500,000 IPs, 72% full) the ratio is only on par with the hashbrown version's, and at
//! 10,000 IPs (61% full, every lookup in the cache) it is below it (0.39 against 0.45).
//!
//! Invariants, checked by the model test below:
//! - the number of slots is a power of two and at most three quarters of them are full, so
//!   every probe sequence reaches an empty slot;
//! - a key sits at its home or after it, with no empty slot between the two (deletion
//!   shifts the rest of a cluster back instead of leaving tombstones).

use std::hash::{BuildHasher, Hash};

use crate::ip::FixedState;

/// Slots of a new table. A power of two.
const SLOTS_MIN: usize = 8;

/// One slot: a value, its key, and whether the slot holds them. Aligned to 32 bytes so that
/// a slot of a 4-byte key and a 24-byte value (an IPv4 entry) never straddles two cache lines;
/// an IPv6 entry's slot (16-byte key) takes 64.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(32))]
pub(crate) struct Slot<K, V> {
    value: V,
    key: K,
    full: bool,
}

/// A hash map from `K` to `V`, with a fixed-seed hasher (lookups cost the same on every run
/// and every node). Iteration order is the slots' order: it must not reach output.
#[derive(Debug)]
pub(crate) struct Table<K, V> {
    /// A power of two, at least `SLOTS_MIN`.
    slots: Vec<Slot<K, V>>,
    len: usize,
    hasher: FixedState,
}

impl<K: Copy + Eq + Hash + Default, V: Copy + Default> Table<K, V> {
    pub(crate) fn new(seed: u64) -> Table<K, V> {
        Table {
            slots: vec![Slot::default(); SLOTS_MIN],
            len: 0,
            hasher: FixedState::with_seed(seed),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    /// The first slot `key` can be in.
    #[inline]
    pub(crate) fn home(&self, key: &K) -> usize {
        // Truncation is the point: the low bits of the hash pick the slot.
        self.hasher.hash_one(key) as usize & self.mask()
    }

    /// Starts loading the slot `home` into the cache; `home` comes from [`Table::home`].
    #[inline]
    pub(crate) fn prefetch(&self, home: usize) {
        let slot = self.slots.as_ptr().wrapping_add(home);
        prefetch(slot);
        // The next slot too: the same cache line for half the homes, and for the other half
        // the line a probe that does not stop at home goes on to.
        prefetch(slot.wrapping_add(1));
    }

    #[inline]
    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.get_from(self.home(key), key)
    }

    /// [`Table::get`] with `key`'s home already computed by [`Table::home`].
    #[inline]
    pub(crate) fn get_from(&self, home: usize, key: &K) -> Option<&V> {
        // Most keys are at home or in the next slot. Which of the two is a coin toss for
        // the branch predictor, so it is chosen by index arithmetic, not by a branch.
        let at_home = self
            .slots
            .get(home)
            .is_some_and(|s| s.full & (s.key == *key));
        let slot = self
            .slots
            .get((home + usize::from(!at_home)) & self.mask())?;
        if slot.full & (slot.key == *key) {
            return Some(&slot.value);
        }
        // Neither holds the key. Going on past an empty slot costs time, never correctness:
        // keys are unique, so whatever the probe finds is the key's.
        self.get_after(home + 2, key)
    }

    /// The rest of [`Table::get_from`]: the probe from `from` on.
    fn get_after(&self, from: usize, key: &K) -> Option<&V> {
        let mask = self.mask();
        // Bounded by the table's size; an empty slot ends it long before.
        for index in from..from + self.slots.len() {
            let slot = self.slots.get(index & mask)?;
            if !slot.full {
                return None;
            }
            if slot.key == *key {
                return Some(&slot.value);
            }
        }
        None
    }

    /// Where `key` is (`Ok`), or the empty slot where it would go (`Err`).
    fn find(&self, key: &K) -> Result<usize, usize> {
        let mask = self.mask();
        let mut index = self.home(key);
        for _ in 0..self.slots.len() {
            let slot = &self.slots[index];
            if !slot.full {
                return Err(index);
            }
            if slot.key == *key {
                return Ok(index);
            }
            index = (index + 1) & mask;
        }
        unreachable!("a table at most three quarters full has an empty slot")
    }

    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        match self.find(key) {
            Ok(index) => Some(&mut self.slots[index].value),
            Err(_) => None,
        }
    }

    /// Sets `key`'s value, returning the value it replaced.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(index) => Some(std::mem::replace(&mut self.slots[index].value, value)),
            Err(mut index) => {
                if (self.len + 1) * 4 > self.slots.len() * 3 {
                    self.grow();
                    index = self.find(&key).unwrap_err();
                }
                self.slots[index] = Slot {
                    value,
                    key,
                    full: true,
                };
                self.len += 1;
                None
            }
        }
    }

    /// Doubles the slots and places every key again.
    fn grow(&mut self) {
        let slots = vec![Slot::default(); self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, slots);
        for slot in old.into_iter().filter(|s| s.full) {
            let Err(index) = self.find(&slot.key) else {
                unreachable!("keys are unique");
            };
            self.slots[index] = slot;
        }
    }

    /// Keeps the entries for which `keep` returns true; `keep` sees each entry once.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        // Start after an empty slot: no cluster wraps past it, so removing an entry only
        // shifts back entries that are still ahead of the walk.
        let Some(start) = self.slots.iter().position(|s| !s.full) else {
            unreachable!("a table at most three quarters full has an empty slot");
        };
        let mask = self.mask();
        let mut step = 1;
        while step <= self.slots.len() {
            let index = (start + step) & mask;
            let slot = &mut self.slots[index];
            if slot.full && !keep(&slot.key, &mut slot.value) {
                // The slot now holds the next entry of its cluster, not yet seen, or nothing.
                self.remove_at(index);
                continue;
            }
            step += 1;
        }
    }

    /// Empties slot `hole` and shifts back the entries after it that may move closer to
    /// their home: backward-shift deletion, which keeps every key reachable from its home.
    fn remove_at(&mut self, mut hole: usize) {
        let mask = self.mask();
        let mut next = (hole + 1) & mask;
        for _ in 0..mask {
            let slot = self.slots[next];
            if !slot.full {
                break;
            }
            let home = self.home(&slot.key);
            // The entry may fill the hole when the hole lies on its way from its home.
            if next.wrapping_sub(home) & mask >= next.wrapping_sub(hole) & mask {
                self.slots[hole] = slot;
                hole = next;
            }
            next = (next + 1) & mask;
        }
        self.slots[hole] = Slot::default();
        self.len -= 1;
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.slots
            .iter()
            .filter(|s| s.full)
            .map(|s| (&s.key, &s.value))
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.slots
            .iter_mut()
            .filter(|s| s.full)
            .map(|s| &mut s.value)
    }

    /// Bytes allocated for the slots.
    pub(crate) fn allocation_size(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot<K, V>>()
    }
}

/// Asks the CPU to start loading the cache line at `data`: a hint, with no visible effect.
#[inline]
#[allow(
    unsafe_code,
    reason = "a prefetch instruction reads nothing the program observes"
)]
pub(crate) fn prefetch<T>(data: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: _mm_prefetch is only a hint to the cache. It never faults, even for an
    // invalid address, and its result is not observable; the callers pass addresses inside
    // live allocations anyway. SSE is part of the x86_64 baseline, so the target feature is
    // present.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(data.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::DEFAULT_HASH_SEED as TEST_SEED;

    impl<K: Copy + Eq + Hash + Default + std::fmt::Debug, V: Copy + Default> Table<K, V> {
        /// Every key is reachable from its home, the count is right, the load is bounded.
        fn check(&self) {
            let mask = self.mask();
            assert!(self.slots.len().is_power_of_two());
            assert!(
                self.len * 4 <= self.slots.len() * 3,
                "over three quarters full"
            );
            assert_eq!(self.slots.iter().filter(|s| s.full).count(), self.len);
            for (index, slot) in self.slots.iter().enumerate().filter(|(_, s)| s.full) {
                let mut at = self.home(&slot.key);
                while at != index {
                    assert!(self.slots[at].full, "{:?} cut off from its home", slot.key);
                    at = (at + 1) & mask;
                }
            }
        }
    }

    #[test]
    fn slots_are_one_cache_line_half() {
        assert_eq!(std::mem::size_of::<Slot<u32, [u64; 3]>>(), 32);
        assert_eq!(std::mem::align_of::<Slot<u32, [u64; 3]>>(), 32);
    }

    #[test]
    fn insert_get_replace() {
        let mut table = Table::new(TEST_SEED);
        assert_eq!(table.get(&7u32), None);
        assert_eq!(table.insert(7, 70u64), None);
        assert_eq!(table.insert(7, 71), Some(70));
        assert_eq!(table.get(&7), Some(&71));
        *table.get_mut(&7).unwrap() = 72;
        assert_eq!(table.get(&7), Some(&72));
        assert_eq!(table.get_mut(&8), None);
        assert_eq!(table.len(), 1);
        table.check();
    }

    #[test]
    fn grows_past_three_quarters() {
        let mut table = Table::new(TEST_SEED);
        for key in 0..10_000u32 {
            table.insert(key, u64::from(key) * 3);
        }
        table.check();
        assert_eq!(table.len(), 10_000);
        assert_eq!(table.slots.len(), 16_384);
        assert!((0..10_000u32).all(|k| table.get(&k) == Some(&(u64::from(k) * 3))));
        assert_eq!(table.get(&10_000), None);
    }

    #[test]
    fn retain_sees_each_entry_once() {
        // Six keys in eight slots: long clusters, likely one that wraps past the last slot.
        let mut table = Table::new(TEST_SEED);
        for key in 0..6u32 {
            table.insert(key, key);
        }
        table.check();
        let mut seen = Vec::new();
        table.retain(|k, _| {
            seen.push(*k);
            k % 2 == 0
        });
        seen.sort_unstable();
        assert_eq!(seen, vec![0, 1, 2, 3, 4, 5], "each entry seen once");
        table.check();
        let mut left: Vec<u32> = table.iter().map(|(k, _)| *k).collect();
        left.sort_unstable();
        assert_eq!(left, vec![0, 2, 4]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u32, u32),
        Get(u32),
        Update(u32, u32),
        Remove(u32),
        RetainEvenValues,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few keys, so that clusters, collisions and reinsertions after removal are common.
        let key = 0u32..48;
        prop_oneof![
            4 => (key.clone(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => key.clone().prop_map(Op::Get),
            1 => (key.clone(), any::<u32>()).prop_map(|(k, v)| Op::Update(k, v)),
            2 => key.prop_map(Op::Remove),
            1 => Just(Op::RetainEvenValues),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases()))]

        /// Any sequence of inserts, updates, removals and retains leaves the table holding
        /// exactly what an ordered map holds, with every key reachable from its home.
        #[test]
        fn table_matches_a_model(ops in prop::collection::vec(op(), 0..200)) {
            let mut table: Table<u32, u32> = Table::new(TEST_SEED);
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => prop_assert_eq!(table.insert(k, v), model.insert(k, v)),
                    Op::Get(k) => prop_assert_eq!(table.get(&k), model.get(&k)),
                    Op::Update(k, v) => {
                        if let Some(value) = table.get_mut(&k) {
                            *value = v;
                        }
                        if let Some(value) = model.get_mut(&k) {
                            *value = v;
                        }
                    }
                    Op::Remove(k) => {
                        table.retain(|key, _| *key != k);
                        model.remove(&k);
                    }
                    Op::RetainEvenValues => {
                        table.retain(|_, v| *v % 2 == 0);
                        model.retain(|_, v| *v % 2 == 0);
                    }
                }
                table.check();
                prop_assert_eq!(table.len(), model.len());
            }
            for k in 0..48u32 {
                prop_assert_eq!(table.get(&k), model.get(&k));
            }
            let mut all: Vec<(u32, u32)> = table.iter().map(|(k, v)| (*k, *v)).collect();
            all.sort_unstable();
            prop_assert_eq!(all, model.into_iter().collect::<Vec<_>>());
        }
    }
}
