//! IP addresses as map keys: IPv4 as `u32`, IPv6 as `u128`, IPv4-mapped IPv6 as IPv4.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IP in the form the tables key by. Dual-stack sockets report IPv4 peers as
/// `::ffff:a.b.c.d`; those are folded into their IPv4 address so that both spellings find
/// the same history.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub(crate) enum IpKey {
    V4(u32),
    V6(u128),
}

impl IpKey {
    #[inline]
    pub(crate) fn new(ip: IpAddr) -> IpKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => IpKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => IpKey::V6(u128::from(v6)),
        }
    }

    pub(crate) fn addr(self) -> IpAddr {
        match self {
            IpKey::V4(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
            IpKey::V6(v6) => IpAddr::V6(Ipv6Addr::from(v6)),
        }
    }
}

/// A fast hasher with the seed given ([`crate::EngineConfig::hash_seed`]): the engine draws
/// no randomness itself, so one seed replays one run, while a collector draws its seed from
/// the OS so that nobody outside can pick keys (IPs, workload names) that collide.
pub(crate) type FixedState = foldhash::fast::FixedState;

pub(crate) type Map<K, V> = hashbrown::HashMap<K, V, FixedState>;

pub(crate) fn new_map<K, V>(seed: u64) -> Map<K, V> {
    Map::with_hasher(FixedState::with_seed(seed))
}
