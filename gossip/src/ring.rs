//! Consistent hashing of IPs onto the live members of one region.
//!
//! **Choice: virtual nodes on a ring of `u64` points**, not rendezvous hashing. Both move
//! only about 1/N of the keys when one of N nodes comes or goes; virtual nodes also cut the
//! keyspace into contiguous *spans* (the arc between two consecutive tokens), and a span is
//! what handoff names when a new owner pulls history from a previous one. With rendezvous
//! hashing every IP would be its own span.
//!
//! **The hash is fixed**: SipHash-2-4 under the constant key [`RING_HASH_KEY`], over a
//! domain byte and the bytes of the value. Every node, every build and every platform
//! computes the same points, which is what makes the owners of an IP agree cluster-wide.
//! Changing the key or the input layout is a protocol change (bump the `v1` in the key).
//!
//! The point of an IP is the hash of its canonical bytes (4 for IPv4, and IPv4-mapped
//! IPv6 is treated as IPv4, as the region map does); the owners of a point are the first
//! R distinct nodes met walking clockwise from it (the first token `>=` the point,
//! wrapping past `u64::MAX` to the smallest token).

use std::fmt;
use std::hash::Hasher;
use std::net::IpAddr;
use std::num::NonZeroUsize;

use crate::identity::NodeIdentity;

/// The SipHash key of the ring: ASCII `tenure-ring-v1\0\0`. Fixed forever for a given
/// protocol version; never random.
pub const RING_HASH_KEY: [u8; 16] = *b"tenure-ring-v1\0\0";

/// Virtual nodes per member by default. With 128 tokens per node the share of a node
/// deviates from 1/N by roughly 1/sqrt(128) ≈ 9% (relative), and a 50-node region holds
/// 6400 tokens, a few hundred KiB at most for spans.
pub const VNODES_PER_NODE_DEFAULT: NonZeroUsize = NonZeroUsize::new(128).expect("128 > 0");

/// The replication factor by default: every claim is held by two owners, so one node
/// lost loses no history.
pub const REPLICATION_DEFAULT: NonZeroUsize = NonZeroUsize::new(2).expect("2 > 0");

/// The most virtual nodes per member accepted; bounds the size of a ring.
pub const VNODES_PER_NODE_MAX: usize = 1024;

/// Domain bytes, so that an IP and a token can never hash the same input.
const DOMAIN_IPV4: u8 = 4;
const DOMAIN_IPV6: u8 = 6;
const DOMAIN_TOKEN: u8 = b't';

/// How a ring is built. Every node of a cluster must use the same values.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RingConfig {
    /// Tokens per member (at most [`VNODES_PER_NODE_MAX`]; larger values are clamped).
    pub vnodes_per_node: NonZeroUsize,
    /// How many distinct owners each point has (fewer when the region has fewer nodes).
    pub replication: NonZeroUsize,
}

impl Default for RingConfig {
    fn default() -> RingConfig {
        RingConfig {
            vnodes_per_node: VNODES_PER_NODE_DEFAULT,
            replication: REPLICATION_DEFAULT,
        }
    }
}

/// A closed range of ring points `[start, end]`, never wrapping (`start <= end`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span {
    pub start: u64,
    pub end: u64,
}

impl Span {
    /// The whole keyspace.
    pub const FULL: Span = Span {
        start: 0,
        end: u64::MAX,
    };

    /// The span `[start, end]`, or `None` when `end < start`.
    pub fn new(start: u64, end: u64) -> Option<Span> {
        (start <= end).then_some(Span { start, end })
    }

    /// Whether `point` lies in the span.
    pub fn contains(&self, point: u64) -> bool {
        self.start <= point && point <= self.end
    }

    /// Whether `other` lies entirely in this span.
    pub fn covers(&self, other: &Span) -> bool {
        self.start <= other.start && other.end <= self.end
    }
}

impl fmt::Debug for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#018x}, {:#018x}]", self.start, self.end)
    }
}

/// The ring point of an IP. Every node computes the same value (see the module docs).
pub fn point_of(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            sip_hash_2_4(&RING_HASH_KEY, &[&[DOMAIN_IPV4], &o])
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            sip_hash_2_4(&RING_HASH_KEY, &[&[DOMAIN_IPV6], &o])
        }
    }
}

/// The ring point of virtual node `index` of `node_id`.
fn token_of(node_id: &str, index: u32) -> u64 {
    sip_hash_2_4(
        &RING_HASH_KEY,
        &[
            &[DOMAIN_TOKEN],
            node_id.as_bytes(),
            &[0],
            &index.to_le_bytes(),
        ],
    )
}

/// The consistent-hash ring of one region.
///
/// Built from a set of members (duplicates by node id are collapsed, keeping the highest
/// incarnation); immutable afterwards: a membership change builds a new ring, and
/// handoff compares the two.
#[derive(Clone)]
pub struct Ring {
    /// Members sorted by node id.
    members: Vec<NodeIdentity>,
    /// `(token, index into members)`, sorted by token then node id.
    tokens: Vec<(u64, usize)>,
    /// The owners of every token's points, [`Ring::owners_per_token`] member indices each
    /// (primary first): the walk past tokens of members already chosen is done once, when
    /// the ring is built, not for every flow and claim routed.
    owner_sets: Vec<u32>,
    config: RingConfig,
}

/// The owners of a ring point, primary first: a view into the ring, so that routing a
/// flow allocates nothing.
#[derive(Clone, Copy)]
pub struct Owners<'a> {
    members: &'a [NodeIdentity],
    indices: &'a [u32],
}

impl<'a> Owners<'a> {
    /// How many owners (`min(R, members)`; 0 on an empty ring).
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether there is no owner (an empty ring).
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The primary owner.
    pub fn first(&self) -> Option<&'a NodeIdentity> {
        self.get(0)
    }

    /// The `i`-th owner, primary first.
    pub fn get(&self, i: usize) -> Option<&'a NodeIdentity> {
        let index = *self.indices.get(i)?;
        self.members.get(index as usize)
    }

    /// The owners, primary first.
    pub fn iter(&self) -> OwnersIter<'a> {
        OwnersIter {
            members: self.members,
            indices: self.indices.iter(),
        }
    }

    /// Whether the member at `index` of [`Ring::members`] is one of them (see
    /// [`Ring::index_of`]): a compare of integers, for the per-flow "is it ours?".
    pub fn contains_index(&self, index: usize) -> bool {
        self.indices.iter().any(|&i| i as usize == index)
    }

    /// The owners with their index in [`Ring::members`], primary first: for callers that
    /// deliver to the others and keep what is their own (see [`Ring::index_of`]).
    pub fn iter_indexed(&self) -> impl Iterator<Item = (usize, &'a NodeIdentity)> + 'a {
        let members = self.members;
        self.indices.iter().filter_map(move |&i| {
            let i = i as usize;
            members.get(i).map(|member| (i, member))
        })
    }

    /// The owners as a vector.
    pub fn to_vec(&self) -> Vec<&'a NodeIdentity> {
        self.iter().collect()
    }
}

impl<'a> IntoIterator for Owners<'a> {
    type Item = &'a NodeIdentity;
    type IntoIter = OwnersIter<'a>;

    fn into_iter(self) -> OwnersIter<'a> {
        self.iter()
    }
}

/// The iterator of [`Owners`].
#[derive(Clone, Debug)]
pub struct OwnersIter<'a> {
    members: &'a [NodeIdentity],
    indices: std::slice::Iter<'a, u32>,
}

impl<'a> Iterator for OwnersIter<'a> {
    type Item = &'a NodeIdentity;

    fn next(&mut self) -> Option<&'a NodeIdentity> {
        let index = *self.indices.next()?;
        self.members.get(index as usize)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.indices.size_hint()
    }
}

impl ExactSizeIterator for OwnersIter<'_> {}

/// Owners compare by who they are (the same members in the same order), whichever ring
/// they come from.
impl PartialEq for Owners<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Owners<'_> {}

impl fmt::Debug for Owners<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iter().map(NodeIdentity::node_id))
            .finish()
    }
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("members", &self.members)
            .field("tokens", &self.tokens.len())
            .field("config", &self.config)
            .finish()
    }
}

impl Ring {
    /// A ring over `members`.
    pub fn new<'a>(
        members: impl IntoIterator<Item = &'a NodeIdentity>,
        config: RingConfig,
    ) -> Ring {
        let mut sorted: Vec<NodeIdentity> = members.into_iter().cloned().collect();
        // Highest incarnation first within a node id, so dedup keeps the newest.
        sorted.sort_by(|a, b| {
            a.node_id()
                .cmp(b.node_id())
                .then(b.incarnation().cmp(&a.incarnation()))
        });
        sorted.dedup_by(|later, first| later.node_id() == first.node_id());
        let vnodes = config.vnodes_per_node.get().min(VNODES_PER_NODE_MAX);
        let mut tokens = Vec::with_capacity(sorted.len() * vnodes);
        for (index, member) in sorted.iter().enumerate() {
            for vnode in 0..vnodes {
                let vnode = u32::try_from(vnode).unwrap_or(u32::MAX);
                tokens.push((token_of(member.node_id(), vnode), index));
            }
        }
        // Members are sorted by node id, so ties between equal tokens break by node id.
        tokens.sort_unstable();
        let per_token = config.replication.get().min(sorted.len());
        let mut owner_sets = Vec::with_capacity(tokens.len() * per_token);
        for start in 0..tokens.len() {
            // The first `per_token` distinct members clockwise from this token; bounded:
            // at most once around the ring.
            let set = owner_sets.len();
            for step in 0..tokens.len() {
                if owner_sets.len() - set == per_token {
                    break;
                }
                let index = tokens[(start + step) % tokens.len()].1;
                let index = u32::try_from(index).expect("members are far fewer than 2^32");
                if !owner_sets[set..].contains(&index) {
                    owner_sets.push(index);
                }
            }
        }
        Ring {
            members: sorted,
            tokens,
            owner_sets,
            config,
        }
    }

    /// An empty ring (no members): every lookup finds no owner.
    pub fn empty(config: RingConfig) -> Ring {
        Ring::new([], config)
    }

    /// The members, sorted by node id.
    pub fn members(&self) -> &[NodeIdentity] {
        &self.members
    }

    /// Whether a member with this node id is on the ring.
    pub fn contains(&self, node_id: &str) -> bool {
        self.index_of(node_id).is_some()
    }

    /// How many owners each point has: `min(R, members)`.
    fn owners_per_token(&self) -> usize {
        self.config.replication.get().min(self.members.len())
    }

    /// The index in [`Ring::members`] of the member with this node id.
    pub fn index_of(&self, node_id: &str) -> Option<usize> {
        self.members
            .binary_search_by(|m| m.node_id().cmp(node_id))
            .ok()
    }

    /// How the ring was built.
    pub fn config(&self) -> RingConfig {
        self.config
    }

    /// The owners of `ip`, primary first: `min(R, members)` distinct nodes.
    pub fn owners(&self, ip: IpAddr) -> Owners<'_> {
        self.owners_of_point(point_of(ip))
    }

    /// The primary owner of `ip`, or `None` on an empty ring.
    pub fn primary(&self, ip: IpAddr) -> Option<&NodeIdentity> {
        self.primary_of_point(point_of(ip))
    }

    /// The primary owner of a ring point.
    pub fn primary_of_point(&self, point: u64) -> Option<&NodeIdentity> {
        let start = self.successor(point)?;
        self.tokens
            .get(start)
            .and_then(|(_, index)| self.members.get(*index))
    }

    /// The owners of a ring point, primary first.
    pub fn owners_of_point(&self, point: u64) -> Owners<'_> {
        let indices = match self.successor(point) {
            Some(token) => {
                let per_token = self.owners_per_token();
                &self.owner_sets[token * per_token..(token + 1) * per_token]
            }
            None => &[],
        };
        Owners {
            members: &self.members,
            indices,
        }
    }

    /// The index of the first token at or after `point`, wrapping; `None` when empty.
    fn successor(&self, point: u64) -> Option<usize> {
        if self.tokens.is_empty() {
            return None;
        }
        let index = self.tokens.partition_point(|(token, _)| *token < point);
        Some(if index == self.tokens.len() { 0 } else { index })
    }

    /// The points where ownership may change: the last point of every span (each token),
    /// sorted, deduplicated. Every point in `(previous boundary, boundary]` has the same
    /// owners as the boundary itself; the points above the last token belong with the
    /// first one (the ring wraps).
    pub fn boundaries(&self) -> Vec<u64> {
        let mut points: Vec<u64> = self.tokens.iter().map(|(token, _)| *token).collect();
        points.dedup();
        points
    }

    /// Every span of the ring with its owners, covering `[0, u64::MAX]` in order. The arc
    /// that wraps past `u64::MAX` is given as two spans (its tail and its head).
    pub fn spans(&self) -> Vec<(Span, Owners<'_>)> {
        split_keyspace(&self.boundaries())
            .into_iter()
            .map(|span| (span, self.owners_of_point(span.end)))
            .collect()
    }
}

/// Cuts `[0, u64::MAX]` into spans that end at each of `boundaries` (sorted, unique), plus
/// a last span up to `u64::MAX` when the last boundary is below it. Within one span, every
/// ring whose tokens are all among `boundaries` has the same owners at every point.
pub fn split_keyspace(boundaries: &[u64]) -> Vec<Span> {
    debug_assert!(
        boundaries.windows(2).all(|w| w[0] < w[1]),
        "boundaries must be sorted and unique"
    );
    let mut spans = Vec::with_capacity(boundaries.len() + 1);
    let mut start = 0u64;
    for &end in boundaries {
        spans.push(Span { start, end });
        match end.checked_add(1) {
            Some(next) => start = next,
            None => return spans,
        }
    }
    spans.push(Span {
        start,
        end: u64::MAX,
    });
    spans
}

/// SipHash-2-4 of the concatenation of `parts` under `key` (the `siphasher` crate; the
/// test below pins it to the reference vectors, since ring points must never change).
pub fn sip_hash_2_4(key: &[u8; 16], parts: &[&[u8]]) -> u64 {
    let mut hasher = siphasher::sip::SipHasher24::new_with_key(key);
    for part in parts {
        hasher.write(part);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn node(name: &str) -> NodeIdentity {
        let addr = "127.0.0.1:1".parse().unwrap();
        NodeIdentity::new(name, "r", addr, addr, 1).unwrap()
    }

    fn nodes(n: usize) -> Vec<NodeIdentity> {
        (0..n).map(|i| node(&format!("node-{i:02}"))).collect()
    }

    fn ips(n: u32) -> impl Iterator<Item = IpAddr> {
        (0..n).map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 7)))
    }

    fn owner_ids(ring: &Ring, ip: IpAddr) -> Vec<String> {
        ring.owners(ip)
            .iter()
            .map(|m| m.node_id().to_owned())
            .collect()
    }

    #[test]
    fn siphash_matches_the_reference_vectors() {
        let key: [u8; 16] = core::array::from_fn(|i| i as u8);
        assert_eq!(sip_hash_2_4(&key, &[]), 0x726f_db47_dd0e_0e31);
        let msg: Vec<u8> = (0u8..15).collect();
        assert_eq!(sip_hash_2_4(&key, &[&msg]), 0xa129_ca61_49be_45e5);
        // Splitting the input into parts does not change the hash.
        assert_eq!(
            sip_hash_2_4(&key, &[&msg[..3], &msg[3..11], &msg[11..]]),
            0xa129_ca61_49be_45e5
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_has_the_ipv4_point() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(point_of(v4), point_of(mapped));
    }

    #[test]
    fn owners_are_distinct_and_independent_of_member_order() {
        let members = nodes(5);
        let a = Ring::new(&members, RingConfig::default());
        let mut reversed = members.clone();
        reversed.reverse();
        let b = Ring::new(&reversed, RingConfig::default());
        for ip in ips(2000) {
            let owners = owner_ids(&a, ip);
            assert_eq!(owners.len(), 2);
            assert_ne!(owners[0], owners[1]);
            assert_eq!(owners, owner_ids(&b, ip));
            assert_eq!(
                a.primary(ip).map(NodeIdentity::node_id),
                Some(owners[0].as_str())
            );
        }
    }

    /// The owner sets built with the ring are what walking clockwise from the point
    /// finds: the rule every node of a cluster (and every version of tenure) must agree on.
    #[test]
    fn owners_are_the_first_distinct_members_clockwise() {
        let walk = |ring: &Ring, point: u64| -> Vec<String> {
            let tokens = &ring.tokens;
            let wanted = ring.config.replication.get().min(ring.members.len());
            let start = tokens.iter().position(|(t, _)| *t >= point).unwrap_or(0);
            let mut owners: Vec<String> = Vec::new();
            for step in 0..tokens.len() {
                let id = ring.members[tokens[(start + step) % tokens.len()].1].node_id();
                if owners.len() < wanted && !owners.iter().any(|o| o == id) {
                    owners.push(id.to_owned());
                }
            }
            owners
        };
        for (n, replication, vnodes) in [(1, 2, 8), (2, 3, 4), (3, 2, 128), (7, 3, 16)] {
            let config = RingConfig {
                vnodes_per_node: NonZeroUsize::new(vnodes).unwrap(),
                replication: NonZeroUsize::new(replication).unwrap(),
            };
            let ring = Ring::new(&nodes(n), config);
            let tokens: Vec<u64> = ring.tokens.iter().map(|(t, _)| *t).collect();
            let points = ips(3000)
                .map(point_of)
                .chain(tokens.iter().flat_map(|t| [*t, t.wrapping_add(1)]))
                .chain([0, u64::MAX]);
            for point in points {
                let owners: Vec<String> = ring
                    .owners_of_point(point)
                    .iter()
                    .map(|m| m.node_id().to_owned())
                    .collect();
                assert_eq!(owners, walk(&ring, point), "{n} nodes, R {replication}");
                for (index, owner) in ring.owners_of_point(point).iter_indexed() {
                    assert_eq!(ring.index_of(owner.node_id()), Some(index));
                }
            }
        }
    }

    #[test]
    fn small_and_empty_rings() {
        let config = RingConfig::default();
        let empty = Ring::empty(config);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(empty.owners(ip).is_empty());
        assert!(empty.primary(ip).is_none());
        let one = Ring::new(&nodes(1), config);
        assert_eq!(owner_ids(&one, ip), vec!["node-00".to_owned()]);
    }

    #[test]
    fn spans_cover_the_keyspace_and_agree_with_lookups() {
        let ring = Ring::new(&nodes(4), RingConfig::default());
        let spans = ring.spans();
        assert_eq!(spans.first().map(|(s, _)| s.start), Some(0));
        assert_eq!(spans.last().map(|(s, _)| s.end), Some(u64::MAX));
        for pair in spans.windows(2) {
            assert_eq!(pair[0].0.end + 1, pair[1].0.start);
        }
        for ip in ips(500) {
            let point = point_of(ip);
            let (span, owners) = spans.iter().find(|(s, _)| s.contains(point)).unwrap();
            assert!(span.contains(point));
            assert_eq!(owners, &ring.owners_of_point(point));
        }
    }

    /// Removing one node of N moves only the keys that node held: about 1/N of the
    /// primaries and about R/N of the owner sets; nothing else changes.
    #[test]
    fn removing_one_node_moves_about_one_nth() {
        let n = 10;
        let members = nodes(n);
        let config = RingConfig::default();
        let before = Ring::new(&members, config);
        let after = Ring::new(&members[1..], config);
        let removed = members[0].node_id();
        let keys = 20_000u32;
        let (mut primaries_moved, mut sets_changed) = (0u32, 0u32);
        for ip in ips(keys) {
            let old = owner_ids(&before, ip);
            let new = owner_ids(&after, ip);
            if old[0] != new[0] {
                primaries_moved += 1;
                assert_eq!(old[0], removed, "a primary moved off a surviving node");
            }
            if old != new {
                sets_changed += 1;
                assert!(
                    old.iter().any(|o| o == removed),
                    "replicas moved needlessly"
                );
                // The survivors of the old set stay owners.
                for o in old.iter().filter(|o| *o != removed) {
                    assert!(new.contains(o));
                }
            }
        }
        let share = f64::from(primaries_moved) / f64::from(keys);
        let expected = 1.0 / n as f64;
        assert!(
            (expected * 0.6..expected * 1.4).contains(&share),
            "primaries moved: {share}"
        );
        let set_share = f64::from(sets_changed) / f64::from(keys);
        let expected_sets = 2.0 / n as f64;
        assert!(
            (expected_sets * 0.6..expected_sets * 1.4).contains(&set_share),
            "owner sets changed: {set_share}"
        );
    }

    /// Adding one node to N moves about 1/(N+1) of the primaries, all to the new node.
    #[test]
    fn adding_one_node_moves_about_one_nth() {
        let n = 9;
        let members = nodes(n + 1);
        let config = RingConfig::default();
        let before = Ring::new(&members[..n], config);
        let after = Ring::new(&members, config);
        let added = members[n].node_id();
        let keys = 20_000u32;
        let mut moved = 0u32;
        for ip in ips(keys) {
            let old = owner_ids(&before, ip);
            let new = owner_ids(&after, ip);
            if old[0] != new[0] {
                moved += 1;
                assert_eq!(new[0], added, "a primary moved between old nodes");
            }
        }
        let share = f64::from(moved) / f64::from(keys);
        let expected = 1.0 / (n + 1) as f64;
        assert!(
            (expected * 0.6..expected * 1.4).contains(&share),
            "primaries moved: {share}"
        );
    }

    #[test]
    fn duplicate_node_ids_keep_the_newest_incarnation() {
        let addr = "127.0.0.1:1".parse().unwrap();
        let old = NodeIdentity::new("a", "r", addr, addr, 1).unwrap();
        let new = old.renewed();
        let ring = Ring::new([&old, &new], RingConfig::default());
        assert_eq!(ring.members(), std::slice::from_ref(&new));
    }
}
