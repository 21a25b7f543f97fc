//! The one place the node reads the wall clock. Everything else takes `now` as an argument.

use tenure_attribution::UnixMillis;

/// The system clock, in Unix milliseconds.
#[allow(
    clippy::disallowed_methods,
    reason = "the shell's single wall-clock read; cores take `now` from here"
)]
pub fn now() -> UnixMillis {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    UnixMillis(u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX))
}
