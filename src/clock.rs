//! Milliseconds on tokio's monotonic clock, small enough to keep in an atomic. Built on
//! `tokio::time::Instant`, so tests that pause time see it paused. Plus the wall clock in
//! Unix milliseconds, for times shared with other nodes.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use tokio::time::Instant;

static BASE: OnceLock<Instant> = OnceLock::new();

/// Milliseconds since the first call in this process.
pub fn now_ms() -> u64 {
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(now().saturating_duration_since(base).as_millis()).unwrap_or(u64::MAX)
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

thread_local! {
    /// The clock as read in the current turn, if a turn is on: `Some(None)` until its first
    /// read.
    static TURN: Cell<Option<Option<Instant>>> = const { Cell::new(None) };
}

/// tokio's `Instant::now()`, read at most once in a [`Turns`] task's poll: the reads a
/// request's bookkeeping makes in one go (activity, its exchange's end, the machine's idle
/// time, a pooled connection's) share one. A poll runs for microseconds, so its reads
/// differ from the clock by that much at most; outside such a poll each is a clock read.
/// For bookkeeping measured in milliseconds, not for timers.
pub fn now() -> Instant {
    TURN.with(|turn| match turn.get() {
        Some(Some(now)) => now,
        Some(None) => {
            let now = Instant::now();
            turn.set(Some(Some(now)));
            now
        }
        None => Instant::now(),
    })
}

pin_project_lite::pin_project! {
    /// A task whose polls are each a turn of [`now`].
    pub struct Turns<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Turns<F> {
    pub fn new(inner: F) -> Turns<F> {
        Turns { inner }
    }
}

impl<F: Future> Future for Turns<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _turn = Turn(TURN.replace(Some(None)));
        self.project().inner.poll(cx)
    }
}

/// Ends a turn, however its poll ends (a panic too: the worker goes on to other tasks), and
/// gives back what was before it: a turn within a turn (not expected) leaves the outer one
/// as it was.
struct Turn(Option<Option<Instant>>);

impl Drop for Turn {
    fn drop(&mut self) {
        TURN.set(self.0);
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    /// Waits (without sleeping) until the clock has moved past `t`.
    fn after(t: Instant) -> Instant {
        loop {
            let now = Instant::now();
            if now > t {
                return now;
            }
            std::hint::spin_loop();
        }
    }

    #[tokio::test]
    async fn a_turn_reads_the_clock_once_and_the_next_reads_it_again() {
        let moved = after(now());
        assert!(now() >= moved, "no turn: each read is the clock's");
        let (first, second, moved, next) = Turns::new(async {
            let first = now();
            let moved = after(first);
            let second = now();
            tokio::task::yield_now().await;
            (first, second, moved, now())
        })
        .await;
        assert_eq!(first, second, "one turn, one read");
        assert!(next >= moved, "the next poll is a turn of its own");
        assert!(now() >= next);
    }

    #[test]
    fn a_turn_ends_when_its_poll_panics() {
        let mut turn = std::pin::pin!(Turns::new(poll_fn(|_| -> Poll<()> {
            let _ = now();
            panic!("a task's poll panics")
        })));
        let waker = std::task::Waker::noop();
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = turn.as_mut().poll(&mut Context::from_waker(waker));
        }));
        assert!(polled.is_err());
        let moved = after(now());
        assert!(now() >= moved, "no turn left behind: the read after is the clock's");
    }
}
