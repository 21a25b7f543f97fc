//! Where a claim or a flow goes: pure functions over the region map and the rings.
//!
//! * A **heartbeat claim** for IP `a` goes to the R owners of `a` on the ring of `a`'s
//!   region, so that one lost node loses no history.
//! * A **flow** goes to the primary owner of its *remote* IP `b` on the ring of `b`'s
//!   region: that owner holds `b`'s ranges and attributes the flow.
//! * When `b`'s region is another region, the item is forwarded to one live collector of
//!   that region, chosen deterministically: the primary owner of `b` on a ring built from
//!   that region's WAN members, so it usually lands where it belongs in one hop. The
//!   receiver routes it again on its own (fresher) LAN ring.
//! * An item that was already forwarded once is never forwarded again: if the receiver
//!   places the IP in yet another region (the two directories disagree), the answer is
//!   [`Route::Misdirected`], which stops loops.
//! * An IP in no known prefix is external: nobody owns it and it needs no routing.

use std::collections::BTreeMap;
use std::net::IpAddr;

use tenure_attribution::region::{Locate, RegionMap};

use crate::identity::NodeIdentity;
use crate::ring::{Owners, Ring};

/// Whether an item comes straight from an exporter of our region or was forwarded to us
/// by a collector of another region.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Origin {
    /// From an exporter; may be forwarded once.
    Exporter,
    /// From another region's collector; must be handled here.
    Forwarded,
}

/// A routing decision.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Route<'a> {
    /// Deliver to these members of our region, primary first (for a flow: the primary
    /// alone). May include ourselves.
    Owners(Owners<'a>),
    /// Forward to `via`, a live collector of `region`.
    Forward {
        region: &'a str,
        via: &'a NodeIdentity,
    },
    /// The IP is in no known prefix: attribute it as external at once.
    External,
    /// The IP's region has no live collector we know of: the flow is unattributed with
    /// reason `region_unreachable` (a claim is dropped; its owner restates it).
    RegionUnreachable { region: &'a str },
    /// A forwarded item whose IP is not in our region by our directory; handled as
    /// unreachable rather than forwarded again.
    Misdirected { region: &'a str },
}

/// What routing needs to know; rebuilt whenever membership or the directory changes.
#[derive(Clone, Copy, Debug)]
pub struct RouteContext<'a> {
    /// Our region.
    pub local_region: &'a str,
    /// Which region serves which prefixes.
    pub regions: &'a RegionMap,
    /// The ring of our region (live LAN members and ourselves).
    pub local_ring: &'a Ring,
    /// For each other region, a ring over its live WAN members.
    pub remote_rings: &'a BTreeMap<String, Ring>,
}

/// Where the heartbeat claim for `ip` goes: all R owners of `ip` in its region.
pub fn route_claim<'a>(ctx: &RouteContext<'a>, ip: IpAddr, origin: Origin) -> Route<'a> {
    route(ctx, ip, origin, |ring| ring.owners(ip))
}

/// Where a flow whose remote side is `remote_ip` goes: to one of the R owners of
/// `remote_ip` (primary first). Every owner receives every claim for the IP and is ready
/// for it only once handed its history, so any of them attributes the flow alike: a node
/// that owns the IP keeps the flow, any other sends it to the primary.
pub fn route_flow<'a>(ctx: &RouteContext<'a>, remote_ip: IpAddr, origin: Origin) -> Route<'a> {
    route(ctx, remote_ip, origin, |ring| ring.owners(remote_ip))
}

fn route<'a>(
    ctx: &RouteContext<'a>,
    ip: IpAddr,
    origin: Origin,
    owners: impl FnOnce(&'a Ring) -> Owners<'a>,
) -> Route<'a> {
    let region = match ctx.regions.locate(ip) {
        Locate::External => return Route::External,
        Locate::Region(region) => region,
    };
    if region == ctx.local_region {
        let owners = owners(ctx.local_ring);
        // Our own ring always holds us; an empty one means we were built wrong, and the
        // safe answer is "nobody can take it here".
        if owners.is_empty() {
            return Route::RegionUnreachable { region };
        }
        return Route::Owners(owners);
    }
    match origin {
        Origin::Forwarded => Route::Misdirected { region },
        Origin::Exporter => match ctx
            .remote_rings
            .get(region)
            .and_then(|ring| ring.primary(ip))
        {
            Some(via) => Route::Forward { region, via },
            None => Route::RegionUnreachable { region },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::RingConfig;

    fn node(name: &str, region: &str) -> NodeIdentity {
        let addr = "127.0.0.1:1".parse().unwrap();
        NodeIdentity::new(name, region, addr, addr, 1).unwrap()
    }

    struct Fixture {
        regions: RegionMap,
        local: Ring,
        remote: BTreeMap<String, Ring>,
    }

    fn fixture() -> Fixture {
        let regions = RegionMap::from_prefixes([
            ("10.0.0.0/16".parse().unwrap(), "a"),
            ("10.1.0.0/16".parse().unwrap(), "b"),
            ("10.2.0.0/16".parse().unwrap(), "c"),
        ])
        .unwrap();
        let config = RingConfig::default();
        let a: Vec<_> = (0..3).map(|i| node(&format!("a{i}"), "a")).collect();
        let b: Vec<_> = (0..3).map(|i| node(&format!("b{i}"), "b")).collect();
        let mut remote = BTreeMap::new();
        remote.insert("b".to_owned(), Ring::new(&b, config));
        // Region c is known in the directory but has no live member.
        Fixture {
            regions,
            local: Ring::new(&a, config),
            remote,
        }
    }

    fn ctx(f: &Fixture) -> RouteContext<'_> {
        RouteContext {
            local_region: "a",
            regions: &f.regions,
            local_ring: &f.local,
            remote_rings: &f.remote,
        }
    }

    #[test]
    fn local_claims_and_flows_go_to_all_owners_primary_first() {
        let f = fixture();
        let ip: IpAddr = "10.0.3.4".parse().unwrap();
        let Route::Owners(claim) = route_claim(&ctx(&f), ip, Origin::Exporter) else {
            panic!("a local claim is delivered locally");
        };
        assert_eq!(claim, f.local.owners(ip));
        assert_eq!(claim.len(), 2);
        assert_eq!(claim.first(), f.local.primary(ip));
        assert_eq!(
            route_flow(&ctx(&f), ip, Origin::Exporter),
            Route::Owners(claim)
        );
    }

    #[test]
    fn remote_flows_are_forwarded_once_and_unknown_regions_are_unreachable() {
        let f = fixture();
        let ip: IpAddr = "10.1.9.9".parse().unwrap();
        let via = f.remote["b"].primary(ip).unwrap();
        assert_eq!(
            route_flow(&ctx(&f), ip, Origin::Exporter),
            Route::Forward { region: "b", via }
        );
        assert_eq!(
            route_flow(&ctx(&f), ip, Origin::Forwarded),
            Route::Misdirected { region: "b" }
        );
        assert_eq!(
            route_flow(&ctx(&f), "10.2.0.1".parse().unwrap(), Origin::Exporter),
            Route::RegionUnreachable { region: "c" }
        );
        assert_eq!(
            route_flow(&ctx(&f), "192.0.2.1".parse().unwrap(), Origin::Exporter),
            Route::External
        );
        assert_eq!(
            route_claim(&ctx(&f), "192.0.2.1".parse().unwrap(), Origin::Exporter),
            Route::External
        );
    }
}
