//! Per-IP ownership history: sorted, non-overlapping segments, and the merge of claims.
//!
//! Invariants, checked by `debug_assert!` after every change and by property tests:
//! - segments of one IP are sorted by start and never overlap;
//! - two neighbouring segments with the same owner never touch (they are coalesced);
//! - a conflict segment only ever grows: no claim turns conflict back into ownership.
//!
//! Times are integer milliseconds and segments are closed intervals, so `[0, 9]` and
//! `[10, 19]` touch.

use std::hash::Hash;

use crate::ip::{new_map, Map};
use crate::table::Table;
use crate::time::{UnixMillis, Window};
use crate::workload::WorkloadId;

/// The owner code of a conflict segment.
const CONFLICT: u32 = u32::MAX;

/// One segment of an IP's history, 16 bytes: the start, the length and the owner.
///
/// The length is bounded by retention plus the largest future skew accepted (see
/// `EngineConfig::validate`), far below `u32::MAX` milliseconds (49 days).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(crate) struct Segment {
    start: u64,
    len: u32,
    owner: u32,
}

const _: () = assert!(std::mem::size_of::<Segment>() == 16);

/// What a segment says.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Owner {
    Workload(WorkloadId),
    Conflict,
}

impl Owner {
    fn code(self) -> u32 {
        match self {
            Owner::Workload(id) => id.0,
            Owner::Conflict => CONFLICT,
        }
    }

    #[inline]
    fn from_code(code: u32) -> Owner {
        if code == CONFLICT {
            Owner::Conflict
        } else {
            Owner::Workload(WorkloadId(code))
        }
    }
}

impl Segment {
    fn new(start: u64, end: u64, owner: u32) -> Segment {
        debug_assert!(start <= end, "segment start {start} after end {end}");
        let len = u32::try_from(end - start).unwrap_or(u32::MAX);
        // A segment longer than u32::MAX ms cannot arise from validated claims; if one did,
        // keep its end and drop its oldest part: losing coverage is safe, inventing it is not.
        let start = end - u64::from(len);
        Segment { start, len, owner }
    }

    pub(crate) fn start(&self) -> UnixMillis {
        UnixMillis(self.start)
    }

    #[inline]
    pub(crate) fn end(&self) -> UnixMillis {
        UnixMillis(self.end_raw())
    }

    #[inline]
    fn end_raw(&self) -> u64 {
        self.start + u64::from(self.len)
    }

    /// The workload of this segment if it covers all of `window`.
    #[inline]
    pub(crate) fn covering_workload(&self, window: Window) -> Option<WorkloadId> {
        let covers = self.start <= window.start.0 && window.end.0 <= self.end_raw();
        (covers && self.owner != CONFLICT).then_some(WorkloadId(self.owner))
    }

    #[inline]
    pub(crate) fn owner(&self) -> Owner {
        Owner::from_code(self.owner)
    }
}

/// A workload that claimed time another workload had already claimed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Overlap {
    pub(crate) existing: WorkloadId,
    pub(crate) claimant: WorkloadId,
    pub(crate) window: Window,
}

/// What the segments say about a window.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Judgement {
    /// One workload's segment covers the whole window.
    Covered(WorkloadId),
    /// A conflict segment intersects the window. Final: conflicts never shrink.
    Conflict,
    /// Two or more owners intersect the window. Final: no single segment can ever cover it.
    Ambiguous,
    /// One owner intersects part of the window and the rest is a gap that a later claim
    /// may still fill.
    Gap,
    /// Nothing intersects the window.
    Empty,
}

/// Judges `window` against an IP's history.
#[inline]
pub(crate) fn judge(history: History<'_>, window: Window) -> Judgement {
    let first = history.partition_point(|s| s.end_raw() < window.start.0);
    // The first segment that reaches the window covers all of it: the usual answer, found
    // without walking the history.
    if let Some(segment) = history.get(first) {
        if segment.start <= window.start.0 && segment.end_raw() >= window.end.0 {
            return match segment.owner() {
                Owner::Workload(id) => Judgement::Covered(id),
                Owner::Conflict => Judgement::Conflict,
            };
        }
    }
    let mut intersecting = history
        .iter()
        .skip(first)
        .take_while(|s| s.start <= window.end.0);
    let Some(segment) = intersecting.next() else {
        return Judgement::Empty;
    };
    // It does not cover all of the window (else the answer came above).
    let one = segment.owner;
    let mut judgement = if one == CONFLICT {
        Judgement::Conflict
    } else {
        Judgement::Gap
    };
    for other in intersecting.map(|s| s.owner) {
        if other == CONFLICT {
            return Judgement::Conflict;
        }
        if other != one {
            judgement = Judgement::Ambiguous;
        }
    }
    judgement
}

/// One IP's history: the older segments, from the arena, then the latest, kept inline in
/// the map entry because nearly every lookup and every heartbeat lands on it.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct History<'a> {
    older: &'a [Segment],
    latest: Option<Segment>,
}

impl<'a> History<'a> {
    #[inline]
    pub(crate) fn latest(&self) -> Option<Segment> {
        self.latest
    }

    /// The segments before the latest, in the arena.
    #[inline]
    pub(crate) fn older(&self) -> &'a [Segment] {
        self.older
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.latest.is_none()
    }

    pub(crate) fn len(&self) -> usize {
        self.older.len() + usize::from(self.latest.is_some())
    }

    #[inline]
    pub(crate) fn iter(&self) -> impl Iterator<Item = Segment> + 'a {
        self.older.iter().copied().chain(self.latest)
    }

    /// The `index`th segment, oldest first.
    #[inline]
    fn get(&self, index: usize) -> Option<Segment> {
        match self.older.get(index) {
            Some(segment) => Some(*segment),
            None if index == self.older.len() => self.latest,
            None => None,
        }
    }

    /// The number of leading segments for which `pred` holds (`pred` must be monotone).
    #[inline]
    fn partition_point(&self, pred: impl Fn(&Segment) -> bool) -> usize {
        match self.latest {
            Some(latest) if !pred(&latest) => self.older.partition_point(pred),
            Some(_) => self.older.len() + 1,
            None => 0,
        }
    }

    fn to_vec_into(self, out: &mut Vec<Segment>) {
        out.clear();
        out.extend(self.iter());
    }
}

/// Merges the claim `[start, end]` by `owner` into `segments`, writing the result to
/// `out` and overlaps with other workloads to `overlaps`.
///
/// Time nobody claimed becomes `owner`'s; time `owner` already held stays so; time another
/// workload held becomes a conflict; conflicts stay conflicts. A conflict claim (from a
/// handoff snapshot) turns everything it spans into conflict.
fn merge_into(
    segments: History<'_>,
    start: u64,
    end: u64,
    owner: Owner,
    out: &mut Vec<Segment>,
    overlaps: &mut Vec<Overlap>,
) {
    out.clear();
    let new = owner.code();
    let mut cursor = Some(start); // the next instant of the claim not yet written
    for s in segments.iter() {
        let (s_start, s_end) = (s.start, s.end_raw());
        if s_end < start || s_start > end {
            if s_start > end {
                if let Some(c) = cursor.take() {
                    push(out, c, end, new);
                }
            }
            push(out, s_start, s_end, s.owner);
            continue;
        }
        if s_start < start {
            push(out, s_start, start - 1, s.owner);
        }
        let (is, ie) = (s_start.max(start), s_end.min(end));
        if let Some(c) = cursor {
            if c < is {
                push(out, c, is - 1, new);
            }
        }
        let combined = if s.owner == new {
            new
        } else {
            if let (Owner::Workload(existing), Owner::Workload(claimant)) = (s.owner(), owner) {
                overlaps.push(Overlap {
                    existing,
                    claimant,
                    window: Window {
                        start: UnixMillis(is),
                        end: UnixMillis(ie),
                    },
                });
            }
            CONFLICT
        };
        push(out, is, ie, combined);
        cursor = ie.checked_add(1).filter(|&c| c <= end);
        if s_end > end {
            push(out, end + 1, s_end, s.owner);
        }
    }
    if let Some(c) = cursor {
        push(out, c, end, new);
    }
}

/// Appends `[start, end]` to `out`, coalescing with the last segment when both have the
/// same owner and touch.
fn push(out: &mut Vec<Segment>, start: u64, end: u64, owner: u32) {
    if let Some(last) = out.last_mut() {
        debug_assert!(last.end_raw() < start, "segments written out of order");
        if last.owner == owner && last.end_raw() + 1 >= start {
            *last = Segment::new(last.start, end, owner);
            return;
        }
    }
    out.push(Segment::new(start, end, owner));
}

pub(crate) fn is_well_formed(segments: &[Segment]) -> bool {
    segments.windows(2).all(|pair| {
        let (a, b) = (pair[0], pair[1]);
        a.end_raw() < b.start && !(a.owner == b.owner && a.end_raw() + 1 == b.start)
    })
}

/// How a claim changed an IP's history.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(crate) struct InsertOutcome {
    /// The oldest segments were dropped to stay within the per-IP limit.
    pub(crate) overflowed: bool,
    /// The claim was for time before the IP's floor and changed nothing.
    pub(crate) below_floor: bool,
}

/// Where an IP's older segments live in the arena: `len` used of `cap` reserved from
/// `offset`. Empty (`cap` 0) for an IP with one segment.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
struct Run {
    offset: u32,
    len: u16,
    cap: u16,
}

/// A map entry: the latest segment inline, the older ones in the arena.
///
/// 24 bytes, so that an IPv4 key and its entry fill one 32-byte table slot. A lookup that
/// lands on the latest segment (nearly all do: flows are attributed seconds after they end)
/// reads that one slot; older segments cost one more read, in one contiguous arena rather
/// than a million separate allocations.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(crate) struct Entry {
    latest: Segment,
    older: Run,
}

/// An IPv4 key beside its entry fills half a cache line.
const _: () = assert!(std::mem::size_of::<crate::table::Slot<u32, Entry>>() == 32);

impl Entry {
    #[inline]
    pub(crate) fn latest(&self) -> Segment {
        self.latest
    }
}

/// One vector holding every IP's older segments, with free lists per run size.
#[derive(Debug, Default)]
struct Arena {
    slots: Vec<Segment>,
    /// `free[n]`: offsets of free runs of capacity `n`.
    free: Vec<Vec<u32>>,
}

impl Arena {
    fn alloc(&mut self, cap: u16) -> u32 {
        if let Some(offset) = self.free.get_mut(usize::from(cap)).and_then(Vec::pop) {
            return offset;
        }
        let offset = self.slots.len();
        let filler = Segment {
            start: 0,
            len: 0,
            owner: CONFLICT,
        };
        self.slots.resize(offset + usize::from(cap), filler);
        // The arena is bounded by ips_max × ranges_per_ip_max, checked at configuration.
        u32::try_from(offset).expect("arena offsets fit in u32")
    }

    fn release(&mut self, run: Run) {
        if run.cap == 0 {
            return;
        }
        let cap = usize::from(run.cap);
        if self.free.len() <= cap {
            self.free.resize_with(cap + 1, Vec::new);
        }
        self.free[cap].push(run.offset);
    }

    #[inline]
    fn get(&self, run: Run) -> &[Segment] {
        let start = run.offset as usize;
        &self.slots[start..start + usize::from(run.len)]
    }

    fn get_mut(&mut self, run: Run) -> &mut [Segment] {
        let start = run.offset as usize;
        &mut self.slots[start..start + usize::from(run.len)]
    }

    /// Stores `segments` for a run, moving it when it does not fit.
    fn store(&mut self, run: Run, segments: &[Segment]) -> Run {
        // ranges_per_ip_max is at most RANGES_PER_IP_LIMIT (checked at configuration), and
        // the limit is enforced before storing.
        let len = u16::try_from(segments.len()).expect("segments per IP fit in u16");
        let run = if run.cap >= len {
            Run { len, ..run }
        } else {
            self.release(run);
            Run {
                offset: self.alloc(len),
                len,
                cap: len,
            }
        };
        self.get_mut(run).copy_from_slice(segments);
        run
    }
}

/// The most segments one IP may hold (`ranges_per_ip_max` is checked against it).
pub(crate) const RANGES_PER_IP_LIMIT: usize = 4_096;

/// The ownership history of every IP of one address family.
#[derive(Debug)]
pub(crate) struct RangeTable<K> {
    map: Table<K, Entry>,
    arena: Arena,
    /// Per-IP floors, set when the oldest segments were dropped to respect
    /// `ranges_per_ip_max`: history before the floor is gone for that IP. Rare.
    floors: Map<K, UnixMillis>,
    segments: usize,
    scratch: Vec<Segment>,
}

impl<K: Copy + Eq + Hash + Default> RangeTable<K> {
    pub(crate) fn new(seed: u64) -> RangeTable<K> {
        RangeTable {
            map: Table::new(seed),
            arena: Arena::default(),
            floors: new_map(seed),
            segments: 0,
            scratch: Vec::new(),
        }
    }

    #[inline]
    pub(crate) fn get(&self, key: &K) -> History<'_> {
        match self.map.get(key) {
            Some(entry) => History {
                older: self.arena.get(entry.older),
                latest: Some(entry.latest),
            },
            None => History::default(),
        }
    }

    /// The first slot where `key`'s entry can be, which starts loading into the cache: the
    /// first half of a lookup, for [`RangeTable::entry_from`].
    #[inline]
    pub(crate) fn probe(&self, key: &K) -> usize {
        let home = self.map.home(key);
        self.map.prefetch(home);
        home
    }

    /// The map entry of `key` (its latest segment, and where the older ones are), with
    /// `home` from [`RangeTable::probe`].
    #[inline]
    pub(crate) fn entry_from(&self, home: usize, key: &K) -> Option<&Entry> {
        self.map.get_from(home, key)
    }

    /// The whole history behind an entry of this table.
    #[inline]
    pub(crate) fn history(&self, entry: Entry) -> History<'_> {
        History {
            older: self.arena.get(entry.older),
            latest: Some(entry.latest),
        }
    }

    #[inline]
    pub(crate) fn floor(&self, key: &K) -> Option<UnixMillis> {
        if self.floors.is_empty() {
            return None;
        }
        self.floors.get(key).copied()
    }

    /// Merges the claim `[start, end]` (already clipped to retention) into `key`'s history.
    pub(crate) fn insert(
        &mut self,
        key: K,
        start: UnixMillis,
        end: UnixMillis,
        owner: Owner,
        ranges_per_ip_max: usize,
        overlaps: &mut Vec<Overlap>,
    ) -> InsertOutcome {
        debug_assert!(start <= end);
        let mut outcome = InsertOutcome::default();
        let start = match self.floors.get(&key) {
            Some(floor) if end < *floor => {
                outcome.below_floor = true;
                return outcome;
            }
            Some(floor) => start.max(*floor),
            None => start,
        };
        let (start, end) = (start.0, end.0);
        let code = owner.code();
        let entry = match self.map.get_mut(&key) {
            // The common case by far: a heartbeat that extends the owner's latest segment.
            Some(Entry { latest, .. })
                if latest.owner == code
                    && start >= latest.start
                    && start <= latest.end_raw() + 1 =>
            {
                if end > latest.end_raw() {
                    *latest = Segment::new(latest.start, end, code);
                }
                return outcome;
            }
            entry => entry.copied(),
        };
        let current = match entry {
            Some(entry) => History {
                older: self.arena.get(entry.older),
                latest: Some(entry.latest),
            },
            None => History::default(),
        };
        let old_len = current.len();
        let appends = current.latest().is_none_or(|last| {
            start > last.end_raw() + 1 || (start > last.end_raw() && last.owner != code)
        });
        if appends {
            current.to_vec_into(&mut self.scratch);
            self.scratch.push(Segment::new(start, end, code));
        } else {
            merge_into(current, start, end, owner, &mut self.scratch, overlaps);
        }
        debug_assert!(
            is_well_formed(&self.scratch),
            "merge broke ordering: {:?}",
            self.scratch
        );
        if self.scratch.len() > ranges_per_ip_max {
            // Drop the oldest segments and raise the floor past them.
            let excess = self.scratch.len() - ranges_per_ip_max;
            let floor = UnixMillis(self.scratch[excess - 1].end_raw() + 1);
            self.scratch.drain(..excess);
            let slot = self.floors.entry(key).or_insert(floor);
            *slot = (*slot).max(floor);
            outcome.overflowed = true;
        }
        let Some((&latest, older)) = self.scratch.split_last() else {
            debug_assert!(false, "a claim always leaves at least one segment");
            return outcome;
        };
        let run = entry.map(|e| e.older).unwrap_or_default();
        let older = if older.is_empty() {
            self.arena.release(run);
            Run::default()
        } else {
            self.arena.store(run, older)
        };
        self.map.insert(key, Entry { latest, older });
        self.segments = self.segments - old_len + self.scratch.len();
        outcome
    }

    /// Drops history that ended before `horizon`, and compacts the arena when more than a
    /// quarter of it holds no live segment.
    pub(crate) fn expire(&mut self, horizon: UnixMillis) {
        let mut removed = 0;
        let arena = &mut self.arena;
        self.map.retain(|_, entry| {
            if entry.latest.end_raw() < horizon.0 {
                removed += 1 + usize::from(entry.older.len);
                arena.release(entry.older);
                return false;
            }
            let older = arena.get(entry.older);
            let keep_from = older.partition_point(|s| s.end_raw() < horizon.0);
            if keep_from > 0 {
                removed += keep_from;
                let start = entry.older.offset as usize;
                let end = start + usize::from(entry.older.len);
                arena.slots.copy_within(start + keep_from..end, start);
                // keep_from ≤ len, which is a u16.
                entry.older.len -= u16::try_from(keep_from).expect("within a u16 length");
            }
            true
        });
        self.segments -= removed;
        self.floors.retain(|_, floor| *floor >= horizon);
        // Free runs and the slack inside live runs both count as waste.
        let live_older = self.segments - self.map.len();
        let waste = self.arena.slots.len() - live_older;
        if waste * 4 > self.arena.slots.len() {
            self.compact();
        }
    }

    /// Rewrites the arena densely, every run's capacity equal to its length.
    fn compact(&mut self) {
        let mut slots = Vec::with_capacity(self.segments - self.map.len());
        for entry in self.map.values_mut() {
            let older = self.arena.get(entry.older);
            entry.older = if older.is_empty() {
                Run::default()
            } else {
                let offset = u32::try_from(slots.len()).expect("arena offsets fit in u32");
                slots.extend_from_slice(older);
                Run {
                    offset,
                    len: entry.older.len,
                    cap: entry.older.len,
                }
            };
        }
        self.arena = Arena {
            slots,
            free: Vec::new(),
        };
    }

    pub(crate) fn ips(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn segments(&self) -> usize {
        self.segments
    }

    /// Bytes held: the maps' own allocations plus the whole arena, free runs included.
    pub(crate) fn bytes(&self) -> usize {
        self.map.allocation_size()
            + self.floors.allocation_size()
            + self.arena.slots.capacity() * std::mem::size_of::<Segment>()
            + self
                .arena
                .free
                .iter()
                .map(|f| f.capacity() * 4)
                .sum::<usize>()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, History<'_>)> {
        self.map.iter().map(|(k, entry)| {
            (
                k,
                History {
                    older: self.arena.get(entry.older),
                    latest: Some(entry.latest),
                },
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_HASH_SEED as TEST_SEED;

    fn w(id: u32) -> Owner {
        Owner::Workload(WorkloadId(id))
    }

    fn claim(t: &mut RangeTable<u32>, s: u64, e: u64, o: Owner) -> Vec<Overlap> {
        let mut overlaps = Vec::new();
        t.insert(1, UnixMillis(s), UnixMillis(e), o, 64, &mut overlaps);
        let mut segments = Vec::new();
        t.get(&1).to_vec_into(&mut segments);
        assert!(is_well_formed(&segments));
        overlaps
    }

    fn shape(t: &RangeTable<u32>) -> Vec<(u64, u64, Owner)> {
        t.get(&1)
            .iter()
            .map(|s| (s.start, s.end_raw(), s.owner()))
            .collect()
    }

    fn win(s: u64, e: u64) -> Window {
        Window::new(UnixMillis(s), UnixMillis(e)).unwrap()
    }

    #[test]
    fn repeated_heartbeats_extend_one_segment() {
        let mut t = RangeTable::new(TEST_SEED);
        claim(&mut t, 100, 110, w(1));
        claim(&mut t, 100, 120, w(1));
        claim(&mut t, 100, 115, w(1)); // a late, older heartbeat changes nothing
        assert_eq!(shape(&t), vec![(100, 120, w(1))]);
        assert_eq!(t.segments(), 1);
    }

    #[test]
    fn a_new_since_leaves_the_gap_uncovered() {
        let mut t = RangeTable::new(TEST_SEED);
        claim(&mut t, 100, 120, w(1));
        claim(&mut t, 200, 210, w(1));
        assert_eq!(shape(&t), vec![(100, 120, w(1)), (200, 210, w(1))]);
        assert_eq!(judge(t.get(&1), win(150, 160)), Judgement::Empty);
        assert_eq!(judge(t.get(&1), win(110, 205)), Judgement::Gap);
    }

    #[test]
    fn a_lost_heartbeat_leaves_no_hole_because_since_is_restated() {
        let mut t = RangeTable::new(TEST_SEED);
        claim(&mut t, 100, 110, w(1));
        // the heartbeat for 110..120 was lost; the next restates since=100
        claim(&mut t, 100, 130, w(1));
        assert_eq!(shape(&t), vec![(100, 130, w(1))]);
    }

    #[test]
    fn overlapping_claims_of_two_workloads_become_a_conflict_window() {
        let mut t = RangeTable::new(TEST_SEED);
        claim(&mut t, 100, 200, w(1));
        let overlaps = claim(&mut t, 150, 300, w(2));
        assert_eq!(
            shape(&t),
            vec![
                (100, 149, w(1)),
                (150, 200, Owner::Conflict),
                (201, 300, w(2))
            ]
        );
        assert_eq!(overlaps.len(), 1);
        assert_eq!(overlaps[0].window, win(150, 200));
        // Nothing inside the window is attributed, whatever is claimed later.
        claim(&mut t, 100, 250, w(1));
        assert_eq!(judge(t.get(&1), win(160, 170)), Judgement::Conflict);
        assert_eq!(
            judge(t.get(&1), win(120, 130)),
            Judgement::Covered(WorkloadId(1))
        );
    }

    #[test]
    fn handoff_conflict_overrides_everything() {
        let mut t = RangeTable::new(TEST_SEED);
        claim(&mut t, 100, 200, w(1));
        claim(&mut t, 150, 160, Owner::Conflict);
        assert_eq!(
            shape(&t),
            vec![
                (100, 149, w(1)),
                (150, 160, Owner::Conflict),
                (161, 200, w(1))
            ]
        );
    }

    #[test]
    fn claims_filling_a_gap_between_two_owners() {
        let mut t = RangeTable::new(TEST_SEED);
        claim(&mut t, 100, 200, w(1));
        claim(&mut t, 300, 400, w(2));
        claim(&mut t, 201, 299, w(3));
        assert_eq!(
            shape(&t),
            vec![(100, 200, w(1)), (201, 299, w(3)), (300, 400, w(2))]
        );
        assert_eq!(judge(t.get(&1), win(190, 210)), Judgement::Ambiguous);
        assert_eq!(judge(t.get(&1), win(50, 150)), Judgement::Gap);
    }

    #[test]
    fn the_limit_drops_the_oldest_and_raises_the_floor() {
        let mut t = RangeTable::new(TEST_SEED);
        let mut overlaps = Vec::new();
        for i in 0..5u64 {
            t.insert(
                1,
                UnixMillis(i * 100),
                UnixMillis(i * 100 + 10),
                w(1),
                3,
                &mut overlaps,
            );
        }
        assert_eq!(t.get(&1).len(), 3);
        assert_eq!(t.floor(&1), Some(UnixMillis(111)));
        let out = t.insert(1, UnixMillis(0), UnixMillis(50), w(2), 3, &mut overlaps);
        assert!(out.below_floor);
        assert_eq!(t.segments(), 3);
    }

    #[test]
    fn expire_drops_old_segments_and_empty_ips() {
        let mut t = RangeTable::new(TEST_SEED);
        claim(&mut t, 100, 200, w(1));
        claim(&mut t, 300, 400, w(2));
        t.expire(UnixMillis(250));
        assert_eq!(shape(&t), vec![(300, 400, w(2))]);
        t.expire(UnixMillis(401));
        assert_eq!(t.ips(), 0);
        assert_eq!(t.segments(), 0);
    }

    #[test]
    fn compaction_keeps_every_ips_history() {
        let mut t = RangeTable::new(TEST_SEED);
        let mut overlaps = Vec::new();
        for key in 0..100u32 {
            for i in 0..4u64 {
                let start = UnixMillis(i * 1_000 + u64::from(key));
                t.insert(
                    key,
                    start,
                    start.plus(10),
                    w(key % 7 + 1),
                    64,
                    &mut overlaps,
                );
            }
        }
        t.expire(UnixMillis(1_500)); // frees half of every run: compaction is due
        assert!(t.arena.free.iter().all(Vec::is_empty), "compacted");
        assert_eq!(
            t.arena.slots.len(),
            100,
            "one older segment per IP; the latest is inline"
        );
        for key in 0..100u32 {
            let starts: Vec<u64> = t.get(&key).iter().map(|s| s.start).collect();
            assert_eq!(
                starts,
                vec![2_000 + u64::from(key), 3_000 + u64::from(key)],
                "key {key}"
            );
            assert!(t.get(&key).iter().all(|s| s.owner() == w(key % 7 + 1)));
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Owner 0 stands for a conflict claim (handoff), 1..=3 for workloads.
        fn claims() -> impl Strategy<Value = Vec<(u64, u64, u32)>> {
            prop::collection::vec((0u64..200, 0u64..60, 0u32..4), 0..24)
                .prop_map(|v| v.into_iter().map(|(s, len, o)| (s, s + len, o)).collect())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(crate::proptest_cases()))]

            /// Whatever the order of claims, the history is sorted, non-overlapping and
            /// coalesced, and every instant says exactly what a per-instant model says:
            /// nobody, the one workload that claimed it, or conflict.
            #[test]
            fn history_matches_the_per_instant_model(claims in claims()) {
                let mut table = RangeTable::new(TEST_SEED);
                let mut overlaps = Vec::new();
                let mut model: Vec<(bool, Vec<u32>)> = vec![(false, Vec::new()); 300];
                for &(start, end, owner) in &claims {
                    let owner_enum = if owner == 0 { Owner::Conflict } else { w(owner) };
                    table.insert(1u32, UnixMillis(start), UnixMillis(end), owner_enum, 1_000, &mut overlaps);
                    for slot in &mut model[start as usize..=end as usize] {
                        if owner == 0 { slot.0 = true } else if !slot.1.contains(&owner) { slot.1.push(owner) }
                    }
                }
                let mut segments = Vec::new();
                table.get(&1).to_vec_into(&mut segments);
                prop_assert!(is_well_formed(&segments), "{segments:?}");
                prop_assert_eq!(table.segments(), segments.len());
                for (instant, (conflict, owners)) in model.iter().enumerate() {
                    let expected = match (conflict, owners.len()) {
                        (true, _) | (false, 2..) => Some(Owner::Conflict),
                        (false, 1) => Some(w(owners[0])),
                        (false, _) => None,
                    };
                    let at = instant as u64;
                    let actual = segments.iter().find(|s| s.start <= at && at <= s.end_raw()).map(|s| s.owner());
                    prop_assert_eq!(actual, expected, "instant {}", instant);
                }
            }
        }
    }
}
