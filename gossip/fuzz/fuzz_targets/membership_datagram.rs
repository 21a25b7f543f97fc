//! `Membership::handle_datagram` over arbitrary (already opened) datagrams: refused or
//! handled, never a panic, and the member count stays bounded.
#![no_main]

use std::net::SocketAddr;
use std::num::NonZeroU32;

use libfuzzer_sys::fuzz_target;
use tenure_gossip::identity::NodeIdentity;
use tenure_gossip::membership::{Membership, MembershipConfig};

fuzz_target!(|data: &[u8]| {
    let addr: SocketAddr = "127.0.0.1:7000".parse().expect("an address");
    let identity = NodeIdentity::new("fuzz", "r", addr, addr, 1).expect("an identity");
    let config = MembershipConfig::new(identity, 1, NonZeroU32::MIN, NonZeroU32::MIN);
    let mut membership = Membership::new(config);
    let mut out = Vec::new();
    let from: SocketAddr = "127.0.0.2:7000".parse().expect("an address");
    // The input split in two: two datagrams in a row exercise state across messages.
    let half = data.len() / 2;
    let _ = membership.handle_datagram(&data[..half], from, &mut out);
    let _ = membership.handle_datagram(&data[half..], from, &mut out);
});
