//! The region directory as it spreads through the cluster: which CIDR prefixes each region
//! serves, with a version per region.
//!
//! A region's record is published by its own nodes (from their configuration) and travels
//! as a foca custom broadcast on the WAN pool; a node that joins late, or missed broadcasts
//! during a partition, pulls the whole directory from a peer. Records are merged by
//! version: a higher version replaces a lower one. Two different records with the same
//! version (two nodes of one region configured differently) are a misconfiguration; every
//! node settles it the same way, keeping the record whose encoding is larger, and counts
//! it, so the cluster converges on one directory instead of flapping.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tenure_attribution::region::{RegionError, RegionMap, REGION_NAME_MAX_BYTES};

/// The most prefixes one region's record may carry. A record must fit in one SWIM packet
/// next to the header (two identities); 32 IPv6 prefixes encode to about 600 bytes.
pub const REGION_PREFIXES_MAX: usize = 32;

/// The most regions a directory holds. Bounds memory and the size of a pull response.
pub const DIRECTORY_REGIONS_MAX: usize = 256;

/// One region's record: the prefixes it serves, as of `version`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RegionRecord {
    pub region: String,
    /// Higher versions replace lower ones. Operators bump it when they change prefixes.
    pub version: u64,
    pub prefixes: Vec<IpNet>,
}

/// Errors decoding or checking a [`RegionRecord`]. The directory is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The bytes are not a postcard-encoded record.
    #[error("malformed region record")]
    Decode(#[source] postcard::Error),
    /// The record could not be encoded (it does not fit the encoder).
    #[error("cannot encode region record")]
    Encode(#[source] postcard::Error),
    /// The region name is empty or too long.
    #[error("region name {0:?} must be 1 to {REGION_NAME_MAX_BYTES} bytes")]
    BadRegion(String),
    /// More than [`REGION_PREFIXES_MAX`] prefixes.
    #[error("region {region:?} has {count} prefixes, the limit is {REGION_PREFIXES_MAX}")]
    TooManyPrefixes { region: String, count: usize },
    /// A prefix length longer than the address allows.
    #[error("bad prefix {addr}/{len}")]
    BadPrefix { addr: IpAddr, len: u8 },
    /// The directory already holds [`DIRECTORY_REGIONS_MAX`] regions.
    #[error("the directory is full ({DIRECTORY_REGIONS_MAX} regions)")]
    Full,
}

impl RegionRecord {
    /// Checks the limits of a record.
    pub fn validate(&self) -> Result<(), DirectoryError> {
        if self.region.is_empty() || self.region.len() > REGION_NAME_MAX_BYTES {
            return Err(DirectoryError::BadRegion(self.region.clone()));
        }
        if self.prefixes.len() > REGION_PREFIXES_MAX {
            return Err(DirectoryError::TooManyPrefixes {
                region: self.region.clone(),
                count: self.prefixes.len(),
            });
        }
        Ok(())
    }

    /// The record as bytes (postcard), as it travels in broadcasts and pull responses.
    pub fn encode(&self) -> Result<Vec<u8>, DirectoryError> {
        postcard::to_allocvec(&WireRecord::from(self)).map_err(DirectoryError::Encode)
    }

    /// Decodes and validates a record.
    pub fn decode(bytes: &[u8]) -> Result<RegionRecord, DirectoryError> {
        let wire: WireRecord = postcard::from_bytes(bytes).map_err(DirectoryError::Decode)?;
        let record = RegionRecord::try_from(wire)?;
        record.validate()?;
        Ok(record)
    }
}

/// The encoded form: prefixes as `(address, length)` so that no serde feature of `ipnet`
/// is needed; an invalid length is refused when decoding.
#[derive(Serialize, Deserialize)]
struct WireRecord {
    region: String,
    version: u64,
    prefixes: Vec<(IpAddr, u8)>,
}

impl From<&RegionRecord> for WireRecord {
    fn from(record: &RegionRecord) -> WireRecord {
        WireRecord {
            region: record.region.clone(),
            version: record.version,
            prefixes: record
                .prefixes
                .iter()
                .map(|net| (net.addr(), net.prefix_len()))
                .collect(),
        }
    }
}

impl TryFrom<WireRecord> for RegionRecord {
    type Error = DirectoryError;

    fn try_from(wire: WireRecord) -> Result<RegionRecord, DirectoryError> {
        if wire.prefixes.len() > REGION_PREFIXES_MAX {
            return Err(DirectoryError::TooManyPrefixes {
                region: wire.region,
                count: wire.prefixes.len(),
            });
        }
        let mut prefixes = Vec::with_capacity(wire.prefixes.len());
        for (addr, len) in wire.prefixes {
            match IpNet::new(addr, len) {
                Ok(net) => prefixes.push(net.trunc()),
                Err(_) => return Err(DirectoryError::BadPrefix { addr, len }),
            }
        }
        Ok(RegionRecord {
            region: wire.region,
            version: wire.version,
            prefixes,
        })
    }
}

/// What merging a record did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Merge {
    /// The record was new or newer and replaced what the directory held.
    Updated,
    /// The directory already held this record or a newer one.
    Stale,
    /// Same version, different contents: settled by the larger encoding (see the module
    /// documentation); `replaced` says whether the incoming one won.
    Conflict { replaced: bool },
}

/// The directory: the latest record of every region, ordered by region name.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    records: BTreeMap<String, (RegionRecord, Vec<u8>)>,
    conflicts: u64,
}

impl Directory {
    /// An empty directory.
    pub fn new() -> Directory {
        Directory::default()
    }

    /// Merges `record`, checking its limits first.
    pub fn merge(&mut self, record: RegionRecord) -> Result<Merge, DirectoryError> {
        record.validate()?;
        let encoded = record.encode()?;
        let Some((current, current_bytes)) = self.records.get(&record.region) else {
            if self.records.len() >= DIRECTORY_REGIONS_MAX {
                return Err(DirectoryError::Full);
            }
            self.records
                .insert(record.region.clone(), (record, encoded));
            return Ok(Merge::Updated);
        };
        if record.version < current.version
            || (record.version == current.version && *current == record)
        {
            return Ok(Merge::Stale);
        }
        if record.version > current.version {
            self.records
                .insert(record.region.clone(), (record, encoded));
            return Ok(Merge::Updated);
        }
        self.conflicts += 1;
        let replaced = encoded > *current_bytes;
        if replaced {
            self.records
                .insert(record.region.clone(), (record, encoded));
        }
        Ok(Merge::Conflict { replaced })
    }

    /// The record of `region`, if known.
    pub fn get(&self, region: &str) -> Option<&RegionRecord> {
        self.records.get(region).map(|(record, _)| record)
    }

    /// Every record, by region name.
    pub fn records(&self) -> impl Iterator<Item = &RegionRecord> {
        self.records.values().map(|(record, _)| record)
    }

    /// Every record's encoding, by region name (for pull responses).
    pub fn encoded_records(&self) -> impl Iterator<Item = &[u8]> {
        self.records.values().map(|(_, bytes)| bytes.as_slice())
    }

    /// How many same-version conflicts were settled since start.
    pub fn conflicts(&self) -> u64 {
        self.conflicts
    }

    /// The CIDR trie of all known regions. Fails when two regions claim the same prefix
    /// (the directory itself cannot tell which is right).
    pub fn region_map(&self) -> Result<RegionMap, RegionError> {
        RegionMap::from_prefixes(self.records().flat_map(|record| {
            record
                .prefixes
                .iter()
                .map(move |net| (*net, record.region.as_str()))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(region: &str, version: u64, prefixes: &[&str]) -> RegionRecord {
        RegionRecord {
            region: region.to_owned(),
            version,
            prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn records_round_trip_through_bytes() {
        let r = record("eu-west", 3, &["10.1.0.0/16", "fd00:1::/32"]);
        assert_eq!(RegionRecord::decode(&r.encode().unwrap()).unwrap(), r);
        assert!(RegionRecord::decode(&[0xff, 0xff]).is_err());
    }

    #[test]
    fn newer_versions_replace_and_conflicts_settle_the_same_way_everywhere() {
        let mut a = Directory::new();
        assert_eq!(
            a.merge(record("r", 1, &["10.0.0.0/8"])).unwrap(),
            Merge::Updated
        );
        assert_eq!(
            a.merge(record("r", 1, &["10.0.0.0/8"])).unwrap(),
            Merge::Stale
        );
        assert_eq!(
            a.merge(record("r", 2, &["11.0.0.0/8"])).unwrap(),
            Merge::Updated
        );
        assert_eq!(
            a.merge(record("r", 1, &["12.0.0.0/8"])).unwrap(),
            Merge::Stale
        );

        let x = record("q", 5, &["20.0.0.0/8"]);
        let y = record("q", 5, &["21.0.0.0/8"]);
        let mut d1 = Directory::new();
        d1.merge(x.clone()).unwrap();
        d1.merge(y.clone()).unwrap();
        let mut d2 = Directory::new();
        d2.merge(y).unwrap();
        d2.merge(x).unwrap();
        assert_eq!(d1.get("q"), d2.get("q"));
        assert_eq!(d1.conflicts(), 1);
    }

    #[test]
    fn limits_are_enforced() {
        let many: Vec<String> = (0..=REGION_PREFIXES_MAX)
            .map(|i| format!("10.{i}.0.0/16"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            Directory::new().merge(record("r", 1, &many)),
            Err(DirectoryError::TooManyPrefixes { .. })
        ));
        assert!(matches!(
            Directory::new().merge(record("", 1, &[])),
            Err(DirectoryError::BadRegion(_))
        ));
    }

    #[test]
    fn region_map_is_built_from_all_records() {
        let mut d = Directory::new();
        d.merge(record("a", 1, &["10.0.0.0/16"])).unwrap();
        d.merge(record("b", 1, &["10.1.0.0/16"])).unwrap();
        let map = d.region_map().unwrap();
        assert_eq!(
            map.locate("10.1.2.3".parse().unwrap()),
            tenure_attribution::Locate::Region("b")
        );
    }
}
