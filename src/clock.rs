//! Milliseconds on tokio's monotonic clock, small enough to keep in an atomic. Built on
//! `tokio::time::Instant`, so tests that pause time see it paused. Plus the wall clock in
//! Unix milliseconds, for times shared with other nodes.

use std::sync::OnceLock;

use tokio::time::Instant;

static BASE: OnceLock<Instant> = OnceLock::new();

/// Milliseconds since the first call in this process.
pub fn now_ms() -> u64 {
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(Instant::now().saturating_duration_since(base).as_millis()).unwrap_or(u64::MAX)
}

/// Wall-clock milliseconds since the Unix epoch: for times other nodes must read the same
/// way (RIB timestamps, session key retirement), which the monotonic clock above is not.
pub fn unix_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
