//! The region directory: which region serves which IP prefixes.
//!
//! A longest-prefix-match trie (the `prefix-trie` crate) over IPv4 and IPv6 prefixes. An IP
//! that falls in no prefix is [`Locate::External`]: it belongs to nobody in the fleet and
//! is attributed as external at once.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

/// Where an IP lives.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Locate<'a> {
    /// Inside a prefix served by this region.
    Region(&'a str),
    /// Outside every known prefix.
    External,
}

/// Errors building a [`RegionMap`]. The map is unchanged when one is returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegionError {
    /// The same prefix was given to two regions.
    #[error("prefix {prefix} is claimed by both region {first:?} and region {second:?}")]
    DuplicatePrefix {
        prefix: IpNet,
        first: String,
        second: String,
    },
    /// A region name that is empty or longer than [`REGION_NAME_MAX_BYTES`].
    #[error("region name {0:?} must be 1 to {REGION_NAME_MAX_BYTES} bytes")]
    BadName(String),
}

/// The longest region name accepted, in bytes.
pub const REGION_NAME_MAX_BYTES: usize = 64;

/// Maps IPs to the region whose prefix holds them, by longest prefix match.
///
/// Nested prefixes are allowed (a /16 of one region inside a /8 of another): the longest
/// match wins, as in routing.
#[derive(Clone, Default)]
pub struct RegionMap {
    v4: PrefixMap<Ipv4Net, u16>,
    v6: PrefixMap<Ipv6Net, u16>,
    names: Vec<String>,
    prefixes: Vec<(IpNet, u16)>,
}

impl std::fmt::Debug for RegionMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.prefixes().map(|(net, name)| (net.to_string(), name)))
            .finish()
    }
}

impl RegionMap {
    /// An empty map: every IP is external.
    pub fn new() -> RegionMap {
        RegionMap::default()
    }

    /// Assigns `prefix` to `region`. Host bits of the prefix are cleared.
    pub fn insert(&mut self, prefix: IpNet, region: &str) -> Result<(), RegionError> {
        if region.is_empty() || region.len() > REGION_NAME_MAX_BYTES {
            return Err(RegionError::BadName(region.to_owned()));
        }
        let prefix = prefix.trunc();
        if let Some((_, existing)) = self.prefixes.iter().find(|(p, _)| *p == prefix) {
            let first = self.names[usize::from(*existing)].clone();
            if first == region {
                return Ok(());
            }
            return Err(RegionError::DuplicatePrefix {
                prefix,
                first,
                second: region.to_owned(),
            });
        }
        let index = match self.names.iter().position(|n| n == region) {
            Some(i) => i,
            None => {
                self.names.push(region.to_owned());
                self.names.len() - 1
            }
        };
        let index = u16::try_from(index).map_err(|_| RegionError::BadName(region.to_owned()))?;
        match prefix {
            IpNet::V4(net) => {
                self.v4.insert(net, index);
            }
            IpNet::V6(net) => {
                self.v6.insert(net, index);
            }
        }
        self.prefixes.push((prefix, index));
        Ok(())
    }

    /// Builds a map from `(prefix, region)` pairs.
    pub fn from_prefixes<'a>(
        pairs: impl IntoIterator<Item = (IpNet, &'a str)>,
    ) -> Result<RegionMap, RegionError> {
        let mut map = RegionMap::new();
        for (prefix, region) in pairs {
            map.insert(prefix, region)?;
        }
        Ok(map)
    }

    /// The region of `ip` by longest prefix match, or [`Locate::External`].
    ///
    /// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is looked up as the IPv4 address it
    /// carries, since dual-stack sockets report IPv4 peers that way.
    pub fn locate(&self, ip: IpAddr) -> Locate<'_> {
        let index = match ip.to_canonical() {
            IpAddr::V4(v4) => self.v4.get_lpm(&Ipv4Net::from(v4)).map(|(_, index)| *index),
            IpAddr::V6(v6) => self.v6.get_lpm(&Ipv6Net::from(v6)).map(|(_, index)| *index),
        };
        match index {
            Some(index) => Locate::Region(&self.names[usize::from(index)]),
            None => Locate::External,
        }
    }

    /// The names of all regions, in the order they were first given.
    pub fn regions(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// Every prefix and its region, in the order they were inserted.
    pub fn prefixes(&self) -> impl Iterator<Item = (IpNet, &str)> {
        self.prefixes
            .iter()
            .map(|(net, index)| (*net, self.names[usize::from(*index)].as_str()))
    }

    /// The prefixes served by `region`.
    pub fn prefixes_of<'a>(&'a self, region: &'a str) -> impl Iterator<Item = IpNet> + 'a {
        self.prefixes()
            .filter(move |(_, r)| *r == region)
            .map(|(net, _)| net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_unknown_is_external() {
        let map = RegionMap::from_prefixes([
            (net("10.0.0.0/8"), "us-east"),
            (net("10.1.0.0/16"), "eu-west"),
            (net("fd00::/8"), "eu-west"),
        ])
        .unwrap();
        assert_eq!(
            map.locate("10.2.3.4".parse().unwrap()),
            Locate::Region("us-east")
        );
        assert_eq!(
            map.locate("10.1.3.4".parse().unwrap()),
            Locate::Region("eu-west")
        );
        assert_eq!(
            map.locate("fd00::1".parse().unwrap()),
            Locate::Region("eu-west")
        );
        assert_eq!(map.locate("192.0.2.1".parse().unwrap()), Locate::External);
        assert_eq!(map.locate("2001:db8::1".parse().unwrap()), Locate::External);
    }

    #[test]
    fn ipv4_mapped_ipv6_is_located_as_ipv4() {
        let map = RegionMap::from_prefixes([(net("10.0.0.0/8"), "us-east")]).unwrap();
        assert_eq!(
            map.locate("::ffff:10.9.9.9".parse().unwrap()),
            Locate::Region("us-east")
        );
    }

    #[test]
    fn duplicate_prefix_for_another_region_is_an_error() {
        let mut map = RegionMap::from_prefixes([(net("10.0.0.0/8"), "a")]).unwrap();
        assert!(map.insert(net("10.0.0.0/8"), "a").is_ok());
        assert!(matches!(
            map.insert(net("10.0.0.0/8"), "b"),
            Err(RegionError::DuplicatePrefix { .. })
        ));
        assert_eq!(map.locate("10.0.0.1".parse().unwrap()), Locate::Region("a"));
        assert!(matches!(
            map.insert(net("11.0.0.0/8"), ""),
            Err(RegionError::BadName(_))
        ));
    }
}
