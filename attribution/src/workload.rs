//! Workload identities interned to small integers.

use std::sync::Arc;

use crate::ip::{new_map, Map};

/// A workload identity interned by one engine. Meaningful only to the engine that issued it,
/// and only while some range or event still refers to it (see [`Interner::retain`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct WorkloadId(pub(crate) u32);

impl WorkloadId {
    /// The raw index, for diagnostics.
    pub fn index(self) -> u32 {
        self.0
    }
}

/// The longest workload identity accepted, in bytes.
pub const WORKLOAD_NAME_MAX_BYTES: usize = 256;

/// Errors interning a name. The interner is unchanged when one is returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InternError {
    /// The name is empty or longer than [`WORKLOAD_NAME_MAX_BYTES`].
    #[error("workload name must be 1 to {WORKLOAD_NAME_MAX_BYTES} bytes, got {0}")]
    BadLength(usize),
    /// The interner holds its configured maximum of names.
    #[error("workload table is full ({0} names)")]
    Full(usize),
}

/// Maps workload names to [`WorkloadId`]s and back. Names are shared `Arc<str>` so that
/// results can carry them without copying.
#[derive(Debug)]
pub(crate) struct Interner {
    ids: Map<Arc<str>, u32>,
    names: Vec<Option<Arc<str>>>,
    free: Vec<u32>,
    max: usize,
}

impl Interner {
    pub(crate) fn new(max: usize, seed: u64) -> Interner {
        Interner {
            ids: new_map(seed),
            names: Vec::new(),
            free: Vec::new(),
            max,
        }
    }

    pub(crate) fn intern(&mut self, name: &str) -> Result<WorkloadId, InternError> {
        if let Some(&id) = self.ids.get(name) {
            return Ok(WorkloadId(id));
        }
        if name.is_empty() || name.len() > WORKLOAD_NAME_MAX_BYTES {
            return Err(InternError::BadLength(name.len()));
        }
        if self.ids.len() >= self.max {
            return Err(InternError::Full(self.max));
        }
        let name: Arc<str> = Arc::from(name);
        let id = match self.free.pop() {
            Some(id) => {
                self.names[id as usize] = Some(name.clone());
                id
            }
            None => {
                // `max` is at most u32::MAX - 1 (checked in the config), so this fits.
                let id = u32::try_from(self.names.len()).expect("interner max fits in u32");
                self.names.push(Some(name.clone()));
                id
            }
        };
        self.ids.insert(name, id);
        Ok(WorkloadId(id))
    }

    pub(crate) fn name(&self, id: WorkloadId) -> Option<&Arc<str>> {
        self.names.get(id.0 as usize).and_then(Option::as_ref)
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Frees every id for which `live` is false, so that names of workloads long gone do
    /// not accumulate. Ids handed out earlier must not be used after they are freed;
    /// results carry names, not ids, for that reason.
    pub(crate) fn retain(&mut self, live: &[bool]) {
        for (index, slot) in self.names.iter_mut().enumerate() {
            let keep = live.get(index).copied().unwrap_or(false);
            if !keep {
                if let Some(name) = slot.take() {
                    self.ids.remove(&name);
                    self.free.push(index as u32);
                }
            }
        }
    }

    pub(crate) fn capacity_ids(&self) -> usize {
        self.names.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_HASH_SEED as TEST_SEED;

    #[test]
    fn interning_is_stable_and_retain_recycles() {
        let mut interner = Interner::new(2, TEST_SEED);
        let a = interner.intern("a").unwrap();
        assert_eq!(interner.intern("a").unwrap(), a);
        let b = interner.intern("b").unwrap();
        assert_eq!(interner.intern("c"), Err(InternError::Full(2)));
        let mut live = vec![false; interner.capacity_ids()];
        live[b.0 as usize] = true;
        interner.retain(&live);
        assert!(interner.name(a).is_none());
        let c = interner.intern("c").unwrap();
        assert_eq!(c, a, "freed id is reused");
        assert_eq!(interner.name(c).map(|n| &**n), Some("c"));
        assert_eq!(interner.intern(""), Err(InternError::BadLength(0)));
    }
}
