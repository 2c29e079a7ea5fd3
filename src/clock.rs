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

/// Unix milliseconds as `2026-11-29T08:15:02Z` (UTC, proleptic Gregorian).
pub fn utc_seconds(unix_ms: i64) -> String {
    let (date, (h, m, s, _)) = civil(unix_ms);
    format!("{date}T{h:02}:{m:02}:{s:02}Z")
}

/// Unix milliseconds as `2026-11-29T08:15:02.345Z`.
pub fn utc_millis(unix_ms: i64) -> String {
    let (date, (h, m, s, milli)) = civil(unix_ms);
    format!("{date}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

/// The date (`2026-11-29`) and time of day (hours, minutes, seconds, milliseconds) of Unix
/// milliseconds: days to civil date by Howard Hinnant's algorithm, exact for the proleptic
/// Gregorian calendar.
fn civil(unix_ms: i64) -> (String, (i64, i64, i64, i64)) {
    let (days, ms) = (unix_ms.div_euclid(86_400_000), unix_ms.rem_euclid(86_400_000));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (format!("{year:04}-{month:02}-{day:02}"), (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000))
}
