//! Who a cluster member is: the foca [`Identity`] of a collector node.
//!
//! An identity carries everything a peer needs to act on membership alone: the node id
//! (what the hash ring hashes), the region (which ring the node belongs to), the gossip
//! address (where SWIM datagrams go) and the data address (where claims, flows and range
//! handoff go). Two identities with the same node id are the same node at different
//! moments; the one with the higher incarnation is the newer one.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tenure_attribution::region::REGION_NAME_MAX_BYTES;

/// The longest node id accepted, in bytes. Identities travel in every SWIM datagram, so
/// they must stay small next to the packet budget.
pub const NODE_ID_MAX_BYTES: usize = 64;

/// Errors building a [`NodeIdentity`]. Nothing is created when one is returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The node id is empty or longer than [`NODE_ID_MAX_BYTES`].
    #[error("node id {0:?} must be 1 to {NODE_ID_MAX_BYTES} bytes")]
    BadNodeId(String),
    /// The region name is empty or longer than the attribution crate's limit.
    #[error("region name {0:?} must be 1 to {REGION_NAME_MAX_BYTES} bytes")]
    BadRegion(String),
}

/// The identity of one collector node, as foca sees it.
///
/// `incarnation` is the node's *restart generation*, distinct from the SWIM incarnation
/// foca keeps internally to refute suspicion. A node that restarts must come back with a
/// higher one (the shell passes e.g. its start time in milliseconds, so no state has to
/// survive the restart); foca then prefers the new identity over the old one that the
/// cluster may still remember (see [`NodeIdentity::win_addr_conflict`]).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeIdentity {
    node_id: String,
    region: String,
    gossip_addr: SocketAddr,
    data_addr: SocketAddr,
    incarnation: u64,
}

impl NodeIdentity {
    /// A new identity, validating the lengths of the node id and the region name.
    pub fn new(
        node_id: &str,
        region: &str,
        gossip_addr: SocketAddr,
        data_addr: SocketAddr,
        incarnation: u64,
    ) -> Result<NodeIdentity, IdentityError> {
        if node_id.is_empty() || node_id.len() > NODE_ID_MAX_BYTES {
            return Err(IdentityError::BadNodeId(node_id.to_owned()));
        }
        if region.is_empty() || region.len() > REGION_NAME_MAX_BYTES {
            return Err(IdentityError::BadRegion(region.to_owned()));
        }
        Ok(NodeIdentity {
            node_id: node_id.to_owned(),
            region: region.to_owned(),
            gossip_addr,
            data_addr,
            incarnation,
        })
    }

    /// The stable name of the node; the hash ring places nodes by it.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The region whose LAN pool and hash ring this node belongs to.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Where the node receives SWIM datagrams.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.gossip_addr
    }

    /// Where the node receives data-plane frames (claims, flows, range handoff).
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// The restart generation (see the type's documentation).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The same node under the next incarnation.
    ///
    /// Saturates at `u64::MAX`: a node that got there cannot renew any more and would have
    /// to change its node id, which takes 2^64 restarts.
    pub fn renewed(&self) -> NodeIdentity {
        NodeIdentity {
            incarnation: self.incarnation.saturating_add(1),
            ..self.clone()
        }
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}#{}({})",
            self.node_id, self.region, self.incarnation, self.gossip_addr
        )
    }
}

impl fmt::Display for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.node_id, self.region, self.incarnation)
    }
}

impl foca::Identity for NodeIdentity {
    /// Foca keeps one member per address: the node id, so that a restarted node replaces
    /// its old self instead of appearing twice (this is the old `has_same_prefix`).
    type Addr = String;

    /// A node declared down comes back at once under the next incarnation.
    fn renew(&self) -> Option<NodeIdentity> {
        (self.incarnation < u64::MAX).then(|| self.renewed())
    }

    fn addr(&self) -> String {
        self.node_id.clone()
    }

    /// The higher incarnation wins. Equal incarnations with different contents (two
    /// processes started with the same node id and generation, a misconfiguration) are
    /// settled by comparing the whole identity, so every member picks the same one.
    fn win_addr_conflict(&self, adversary: &NodeIdentity) -> bool {
        (self.incarnation, self) > (adversary.incarnation, adversary)
    }
}

/// Whether two identities name the same node (same node id), whatever their incarnation.
pub fn has_same_prefix(a: &NodeIdentity, b: &NodeIdentity) -> bool {
    a.node_id == b.node_id
}

#[cfg(test)]
mod tests {
    use foca::Identity;

    use super::*;

    fn id(node: &str, incarnation: u64) -> NodeIdentity {
        NodeIdentity::new(
            node,
            "us-east",
            "10.0.0.1:7946".parse().unwrap(),
            "10.0.0.1:7947".parse().unwrap(),
            incarnation,
        )
        .unwrap()
    }

    #[test]
    fn renewed_identity_wins_over_its_old_self() {
        let old = id("a", 7);
        let new = old.renew().unwrap();
        assert_eq!(new.incarnation(), 8);
        assert_eq!(old.addr(), new.addr());
        assert!(has_same_prefix(&old, &new));
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));
    }

    #[test]
    fn equal_incarnations_are_settled_the_same_way_by_both_sides() {
        let a = id("a", 1);
        let mut b = id("a", 1);
        b.data_addr = "10.0.0.2:7947".parse().unwrap();
        assert_ne!(a.win_addr_conflict(&b), b.win_addr_conflict(&a));
    }

    #[test]
    fn bad_names_are_rejected() {
        let addr: SocketAddr = "10.0.0.1:1".parse().unwrap();
        assert!(matches!(
            NodeIdentity::new("", "r", addr, addr, 0),
            Err(IdentityError::BadNodeId(_))
        ));
        let long = "x".repeat(NODE_ID_MAX_BYTES + 1);
        assert!(NodeIdentity::new(&long, "r", addr, addr, 0).is_err());
        assert!(matches!(
            NodeIdentity::new("a", "", addr, addr, 0),
            Err(IdentityError::BadRegion(_))
        ));
        assert!(id("a", u64::MAX).renew().is_none());
    }
}
