//! The exporter registry: TOML parsing and its rules (unique ids and key ids, key counts,
//! limits, no cluster key) over arbitrary text, then every entitlement it yields asked
//! about a few IPs and names. A bad file is an error naming the entry, never a panic.
#![no_main]

use std::net::IpAddr;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tenure_node::config::parse_key;
use tenure_node::registry::Registry;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Key files are not read here: an entry naming one fails on the missing file.
    if text.contains("key_file") {
        return;
    }
    let Ok(cluster) = parse_key(&"11".repeat(32)) else {
        return;
    };
    let Ok(registry) = Registry::parse(text, Path::new("fuzz.toml"), &cluster) else {
        return;
    };
    let ips: [IpAddr; 3] = [
        IpAddr::from([10, 1, 0, 7]),
        IpAddr::from([0u16, 0, 0, 0, 0, 0xffff, 0x0a01, 0x0007]),
        IpAddr::from([0x2001u16, 0xdb8, 0, 0, 0, 0, 0, 1]),
    ];
    let (listed, revoked) = registry.counts();
    assert!(revoked <= listed);
    for (id, entitlement) in registry.entitlements.iter() {
        for ip in ips {
            for name in ["", "web"] {
                let allowed = registry.entitlements.check_claim(id, ip, name).is_ok();
                assert!(!allowed || (!entitlement.revoked && entitlement.allows(ip, name)));
            }
        }
    }
    // Every bound key belongs to a listed exporter.
    for (_, owner) in registry.keys.bindings() {
        assert!(registry.entitlements.get(owner).is_some());
    }
});
