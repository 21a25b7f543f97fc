//! `wire::decode` over arbitrary bytes: validation must refuse or accept, never panic, and
//! whatever it accepts must convert to an owned message and encode again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenure_gossip::wire::{self, AlignedVec, WireLimits};

fuzz_target!(|data: &[u8]| {
    let mut aligned = AlignedVec::new();
    aligned.extend_from_slice(data);
    if let Ok(archived) = wire::decode(&aligned, &WireLimits::default()) {
        if let Ok(message) = wire::to_owned(archived) {
            let _ = wire::encode(&message);
        }
    }
});
