//! The HTTP API's parameters: times (`at`, `since`, `until`, `watermark`: Unix ms or
//! RFC 3339) and IPs in paths. Bad input is an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tenure_node::time::parse_time_ms;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ms) = parse_time_ms(text) {
        // Digits only round-trip exactly.
        if text.trim().bytes().all(|b| b.is_ascii_digit()) {
            assert_eq!(text.trim().parse::<u64>().ok(), Some(ms));
        }
    }
    let _ = text.parse::<std::net::IpAddr>();
});
