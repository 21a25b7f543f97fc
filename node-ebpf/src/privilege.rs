//! The up-front privilege check, so that a missing capability is reported as such rather
//! than as an obscure `EPERM` from the middle of loading.

use rustix::thread::{capabilities, CapabilitySet};

use crate::error::CaptureError;

/// The capabilities that matter to loading, as observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Observed {
    pub(crate) euid: u32,
    pub(crate) bpf: bool,
    pub(crate) perfmon: bool,
    pub(crate) sys_admin: bool,
}

/// Checks that this process may load and attach the capture: it needs CAP_BPF and
/// CAP_PERFMON, or CAP_SYS_ADMIN (which implies both), in its effective set. Root
/// normally has all three. Reads only this process's credentials; changes nothing.
pub fn check_privileges() -> Result<(), CaptureError> {
    let sets = capabilities(None).map_err(|source| CaptureError::CapabilityQuery {
        source: source.into(),
    })?;
    let effective = sets.effective;
    assess(Observed {
        euid: rustix::process::geteuid().as_raw(),
        bpf: effective.contains(CapabilitySet::BPF),
        perfmon: effective.contains(CapabilitySet::PERFMON),
        sys_admin: effective.contains(CapabilitySet::SYS_ADMIN),
    })
}

/// The decision, separated from reading the credentials so that it can be tested.
pub(crate) fn assess(observed: Observed) -> Result<(), CaptureError> {
    if observed.sys_admin || (observed.bpf && observed.perfmon) {
        return Ok(());
    }
    let mut missing = Vec::new();
    if !observed.bpf {
        missing.push("CAP_BPF");
    }
    if !observed.perfmon {
        missing.push("CAP_PERFMON");
    }
    Err(CaptureError::NotPrivileged {
        euid: observed.euid,
        missing: missing.join(" and "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(bpf: bool, perfmon: bool, sys_admin: bool) -> Observed {
        Observed {
            euid: 1000,
            bpf,
            perfmon,
            sys_admin,
        }
    }

    #[test]
    fn sys_admin_or_both_capabilities_suffice() {
        assert!(assess(observed(false, false, true)).is_ok());
        assert!(assess(observed(true, true, false)).is_ok());
    }

    #[test]
    fn names_what_is_missing() {
        let err = assess(observed(true, false, false)).expect_err("must refuse");
        let text = err.to_string();
        assert!(text.contains("CAP_PERFMON"), "{text}");
        assert!(text.contains("lacks CAP_PERFMON."), "{text}");
        assert!(text.contains("uid 1000"), "{text}");
        let err = assess(observed(false, false, false)).expect_err("must refuse");
        assert!(err.to_string().contains("lacks CAP_BPF and CAP_PERFMON."));
    }
}
