//! Collector configuration: TOML parsing, validation and key loading over arbitrary text.
//! A bad file is an error, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tenure_node::config::{self, CollectorConfig, ExporterConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = config::parse::<CollectorConfig>(text, Path::new("fuzz.toml")) {
        if c.validate().is_ok() {
            // Key files are not read: only inline keys resolve here.
            if c.cluster_key.key_file.is_none() {
                let _ = c.keyrings(None);
            }
            let _ = c.engine_config();
            let _ = c.admission();
        }
    }
    if let Ok(e) = config::parse::<ExporterConfig>(text, Path::new("fuzz.toml")) {
        let _ = e.validate(false);
    }
    let _ = config::parse_key(text);
});
