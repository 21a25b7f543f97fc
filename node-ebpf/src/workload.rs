//! Planning a replacement of a workload map's contents, without touching the kernel.
//!
//! The exporter hands over the complete desired table each time; the loader applies
//! only the difference. Stale keys are removed *before* new ones are written, so a full
//! map never rejects an insert that the final state has room for, and a key that stays
//! is overwritten in place, never briefly absent.

use std::collections::BTreeMap;

/// What to do to a map to make its contents equal to the desired table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan<K> {
    /// Keys present now and absent from the desired table.
    pub(crate) remove: Vec<K>,
    /// Every desired entry (inserting an unchanged entry is harmless and cheaper than
    /// reading it back first).
    pub(crate) upsert: Vec<(K, u32)>,
}

/// Why a desired table was refused. The map was not changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooMany {
    /// Distinct keys in the desired table.
    pub(crate) given: usize,
    /// The map's capacity.
    pub(crate) max: usize,
}

/// Plans the replacement. Duplicate keys in `desired`: the last one wins.
pub(crate) fn plan<K: Ord + Copy>(
    current: impl IntoIterator<Item = K>,
    desired: impl IntoIterator<Item = (K, u32)>,
    max_entries: usize,
) -> Result<Plan<K>, TooMany> {
    let desired: BTreeMap<K, u32> = desired.into_iter().collect();
    if desired.len() > max_entries {
        return Err(TooMany {
            given: desired.len(),
            max: max_entries,
        });
    }
    let remove = current
        .into_iter()
        .filter(|key| !desired.contains_key(key))
        .collect();
    Ok(Plan {
        remove,
        upsert: desired.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_stale_and_upserts_desired() {
        let plan = plan([1u8, 2, 3], [(2u8, 20), (4, 40), (2, 21)], 10).expect("fits");
        assert_eq!(plan.remove, vec![1, 3]);
        assert_eq!(plan.upsert, vec![(2, 21), (4, 40)]);
    }

    #[test]
    fn empty_desired_clears() {
        let plan = plan([7u8], std::iter::empty(), 10).expect("fits");
        assert_eq!(plan.remove, vec![7]);
        assert!(plan.upsert.is_empty());
    }

    #[test]
    fn refuses_more_than_capacity() {
        assert_eq!(
            plan([], [(1u8, 1), (2, 2), (3, 3)], 2),
            Err(TooMany { given: 3, max: 2 })
        );
        // Duplicates do not count twice.
        assert!(plan([], [(1u8, 1), (1, 2)], 1).is_ok());
    }
}
