//! What each exporter may claim: the prefixes (or single IPs) it may speak for and,
//! optionally, the workload names it may use, keyed by the exporter id its credential
//! proves (see `docs/design.md`, "Exporter credentials").
//!
//! Sans-io and pure: the shell builds an [`Entitlements`] from the registry file and hands
//! it to the core, which asks it about every exporter claim before the claim is routed. An
//! exporter missing from the table, or marked revoked, may claim nothing and send nothing.
//!
//! Prefixes come from one source today, the registry file. A node's pod CIDR from an
//! orchestrator is another natural source: it would add prefixes to an exporter's
//! [`Entitlement`] before the table is handed to the core, and nothing here changes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::admission::Rejection;

/// Most prefixes one exporter may be entitled to: a claim is checked against each.
pub const ENTITLED_PREFIXES_MAX: usize = 256;

/// Most workload names one exporter may be restricted to.
pub const ENTITLED_WORKLOADS_MAX: usize = 4_096;

/// What one exporter may claim.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Entitlement {
    /// The prefixes its claims' IPs must lie in (a single IP is a /32 or /128). Empty: it
    /// may claim no IP, only send flows. At most [`ENTITLED_PREFIXES_MAX`].
    pub prefixes: Vec<IpNet>,
    /// The workload names its claims may use; `None`: any name.
    pub workloads: Option<BTreeSet<String>>,
    /// Its credential was revoked: every batch under it is refused.
    pub revoked: bool,
}

impl Entitlement {
    /// Whether a claim of `ip` for `workload` is within this entitlement.
    pub fn allows(&self, ip: IpAddr, workload: &str) -> bool {
        let ip = ip.to_canonical();
        let in_prefix = self.prefixes.iter().any(|p| p.contains(&ip));
        let name_ok = self
            .workloads
            .as_ref()
            .is_none_or(|names| names.contains(workload));
        in_prefix && name_ok
    }
}

/// The entitlements of every exporter of the region, by proven exporter id.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Entitlements {
    by_exporter: BTreeMap<u64, Entitlement>,
}

impl Entitlements {
    /// A table of the given entitlements.
    pub fn new(by_exporter: BTreeMap<u64, Entitlement>) -> Entitlements {
        Entitlements { by_exporter }
    }

    /// Exporters listed.
    pub fn len(&self) -> usize {
        self.by_exporter.len()
    }

    /// Whether no exporter is listed.
    pub fn is_empty(&self) -> bool {
        self.by_exporter.is_empty()
    }

    /// Every exporter listed and its entitlement, by id.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Entitlement)> + '_ {
        self.by_exporter.iter().map(|(id, e)| (*id, e))
    }

    /// The entitlement of `exporter_id`, if listed.
    pub fn get(&self, exporter_id: u64) -> Option<&Entitlement> {
        self.by_exporter.get(&exporter_id)
    }

    /// Whether `exporter_id` may send at all: listed and not revoked.
    pub fn check_exporter(&self, exporter_id: u64) -> Result<(), Rejection> {
        match self.by_exporter.get(&exporter_id) {
            Some(e) if !e.revoked => Ok(()),
            Some(_) | None => Err(Rejection::Revoked),
        }
    }

    /// Whether `exporter_id` may claim `ip` for `workload`.
    pub fn check_claim(
        &self,
        exporter_id: u64,
        ip: IpAddr,
        workload: &str,
    ) -> Result<(), Rejection> {
        self.check_exporter(exporter_id)?;
        match self.by_exporter.get(&exporter_id) {
            Some(e) if e.allows(ip, workload) => Ok(()),
            Some(_) | None => Err(Rejection::NotEntitled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Entitlements {
        let mut by = BTreeMap::new();
        by.insert(
            1,
            Entitlement {
                prefixes: vec![
                    "10.1.0.0/28".parse().expect("net"),
                    "10.1.9.9/32".parse().expect("net"),
                ],
                workloads: None,
                revoked: false,
            },
        );
        by.insert(
            2,
            Entitlement {
                prefixes: vec!["10.1.1.0/24".parse().expect("net")],
                workloads: Some(["db".to_owned()].into_iter().collect()),
                revoked: false,
            },
        );
        by.insert(
            3,
            Entitlement {
                prefixes: vec!["10.1.2.0/24".parse().expect("net")],
                workloads: None,
                revoked: true,
            },
        );
        Entitlements::new(by)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn claims_must_lie_in_the_exporters_prefixes_and_names() {
        let t = table();
        assert_eq!(t.check_claim(1, ip("10.1.0.15"), "web"), Ok(()));
        assert_eq!(t.check_claim(1, ip("10.1.9.9"), "any"), Ok(()));
        assert_eq!(
            t.check_claim(1, ip("10.1.0.16"), "web"),
            Err(Rejection::NotEntitled)
        );
        // Another exporter's prefix is not A's.
        assert_eq!(
            t.check_claim(1, ip("10.1.1.5"), "db"),
            Err(Rejection::NotEntitled)
        );
        // An IPv4-mapped IPv6 address is the IPv4 address.
        assert_eq!(t.check_claim(1, ip("::ffff:10.1.0.3"), "web"), Ok(()));
        // Restricted names.
        assert_eq!(t.check_claim(2, ip("10.1.1.5"), "db"), Ok(()));
        assert_eq!(
            t.check_claim(2, ip("10.1.1.5"), "web"),
            Err(Rejection::NotEntitled)
        );
    }

    #[test]
    fn revoked_and_unlisted_exporters_may_send_nothing() {
        let t = table();
        assert_eq!(t.check_exporter(1), Ok(()));
        assert_eq!(t.check_exporter(3), Err(Rejection::Revoked));
        assert_eq!(t.check_exporter(4), Err(Rejection::Revoked));
        assert_eq!(
            t.check_claim(3, ip("10.1.2.1"), "web"),
            Err(Rejection::Revoked)
        );
    }
}
