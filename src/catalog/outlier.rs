//! Passive ejection (outlier detection): a machine whose connects fail is taken out of
//! selection for a while, without waiting for a health check to notice, or for an app
//! that has none.
//!
//! Why it matters: least-in-flight prefers a dead machine (a refused connect ends at once,
//! so it never has anything in flight), and a blackholed one costs every request that
//! picks it the whole `connect_timeout`. Envoy (`consecutive_gateway_failure`, by default
//! 5 failures, then 30 s times the number of ejections) and HAProxy (`observe layer4` with
//! `error-limit`, by default 10) count failures before acting. tern ejects on the first
//! failed connect: a connect, unlike a response, fails only when the machine cannot take
//! the request at all, the request itself is retried on another machine, and a wrong
//! ejection costs little (it ends after a second, and when every machine is ejected they
//! are all tried anyway, see `routing::select`).
//!
//! The states of one machine, all in one atomic word (no lock on the request path):
//!
//! ```text
//!  in rotation ──connect fails──▶ ejected for back-off(n) ──back-off over──▶ on probation
//!   (n = 0)        (n += 1)            │                                      │
//!      ▲                               │ a connect to it succeeds,            │ the next request
//!      │                               │ its checks pass, or it is            │ to pick it is the
//!      └───────────────────────────────┴─ started again ◀── succeeds ── probe ◀┘ one probe:
//!                                                                  fails: ejected for back-off(n+1)
//! ```
//!
//! The back-off is 1 s, doubling with each consecutive ejection up to 30 s. While it is
//! probed, the machine counts as ejected for other requests, so a blackholed machine costs
//! one request a connect timeout per back-off, not every request that arrives meanwhile.
//! A failure reported while the machine is already ejected (a request that picked it
//! before the ejection, and waited out its connect) changes nothing: it is the same fault
//! seen twice, and must not lengthen the back-off.
//!
//! Times are [`crate::clock::now_ms`] values, passed in, so the logic is pure.

use std::sync::atomic::{AtomicU64, Ordering};

/// The first ejection's length.
pub const BASE_BACKOFF_MS: u64 = 1_000;
/// The longest ejection: a machine that comes back is tried again within this.
pub const MAX_BACKOFF_MS: u64 = 30_000;

const UNTIL_BITS: u32 = 56;
const UNTIL_MASK: u64 = (1 << UNTIL_BITS) - 1;

/// A machine's ejection state: `failures << 56 | ejected_until_ms`, 0 while it is in
/// rotation with no failure since its last success.
#[derive(Debug, Default)]
pub struct Outlier(AtomicU64);

/// Whether a request that picked the machine may use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// In rotation.
    Yes,
    /// Its back-off is over and this request is the one that tries it.
    Probe,
    /// Ejected, or another request is probing it.
    No,
}

/// A new ejection: the consecutive failures so far and how long it lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejected {
    pub failures: u32,
    pub for_ms: u64,
}

/// What `/v1/apps` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub ejected: bool,
    pub left_ms: u64,
    /// Consecutive failed connects that ejected it since its last success.
    pub failures: u32,
}

/// How long the `failures`-th consecutive ejection lasts: 1 s, 2 s, 4 s, … up to 30 s.
pub fn backoff_ms(failures: u32) -> u64 {
    let doublings = failures.saturating_sub(1).min(16);
    BASE_BACKOFF_MS.saturating_mul(1 << doublings).min(MAX_BACKOFF_MS)
}

fn pack(failures: u32, until_ms: u64) -> u64 {
    (u64::from(failures.min(255)) << UNTIL_BITS) | (until_ms & UNTIL_MASK)
}

fn unpack(v: u64) -> (u32, u64) {
    ((v >> UNTIL_BITS) as u32, v & UNTIL_MASK)
}

impl Outlier {
    /// Whether the machine is out of selection at `now`. `now` is asked only for a machine
    /// that has failed, so a healthy catalog never reads the clock for it.
    pub fn ejected(&self, now: impl FnOnce() -> u64) -> bool {
        let v = self.0.load(Ordering::Acquire);
        v != 0 && unpack(v).1 > now()
    }

    /// Lets a request that picked the machine use it. A machine on probation takes one
    /// request, and stays out for the others for another back-off, until that request
    /// reports how it went (or never does: its client left, and the next one tries).
    /// In rotation with no failure since its last success: the state of almost every
    /// machine, told without reading the clock.
    pub fn is_clear(&self) -> bool {
        self.0.load(Ordering::Acquire) == 0
    }

    pub fn admit(&self, now: u64) -> Admit {
        let mut v = self.0.load(Ordering::Acquire);
        loop {
            if v == 0 {
                return Admit::Yes;
            }
            let (failures, until) = unpack(v);
            if until > now {
                return Admit::No;
            }
            let hold = pack(failures, now + backoff_ms(failures));
            match self.0.compare_exchange_weak(v, hold, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Admit::Probe,
                Err(current) => v = current,
            }
        }
    }

    /// A connect to the machine failed at `now`; `probe` says whether the request was the
    /// one admitted as its probe. Returns the new ejection, or `None` when the machine was
    /// already ejected by an earlier failure.
    pub fn failed(&self, now: u64, probe: bool) -> Option<Ejected> {
        let mut ejected = None;
        let _ = self.0.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            let (failures, until) = unpack(v);
            if v != 0 && until > now && !probe {
                ejected = None;
                return None;
            }
            let failures = (failures + 1).min(255);
            let for_ms = backoff_ms(failures);
            ejected = Some(Ejected { failures, for_ms });
            Some(pack(failures, now + for_ms))
        });
        ejected
    }

    /// The machine answered (a connect succeeded, its checks passed, it started again):
    /// back in rotation with a clean record. Returns whether it had been failing.
    pub fn clear(&self) -> bool {
        // A load first: the request path calls this on every connect, and a store would
        // make every core's copy of the line dirty for nothing.
        self.0.load(Ordering::Relaxed) != 0 && self.0.swap(0, Ordering::AcqRel) != 0
    }

    pub fn status(&self, now: u64) -> Status {
        let (failures, until) = unpack(self.0.load(Ordering::Acquire));
        let left_ms = until.saturating_sub(now);
        Status { ejected: left_ms > 0, left_ms, failures }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_thirty() {
        let steps: Vec<u64> = (1..=8).map(backoff_ms).collect();
        assert_eq!(steps, [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]);
        assert_eq!(backoff_ms(u32::MAX), MAX_BACKOFF_MS);
    }

    #[test]
    fn a_failed_connect_ejects_until_the_backoff_is_over() {
        let o = Outlier::default();
        assert_eq!(o.admit(5_000), Admit::Yes);
        assert_eq!(o.failed(5_000, false), Some(Ejected { failures: 1, for_ms: 1_000 }));
        assert!(o.ejected(|| 5_999));
        assert_eq!(o.admit(5_999), Admit::No);
        assert_eq!(o.status(5_400), Status { ejected: true, left_ms: 600, failures: 1 });
        // Another request that had picked it before reports its failure too: same fault.
        assert_eq!(o.failed(5_500, false), None);
        assert_eq!(o.status(5_500).failures, 1);
        assert!(!o.ejected(|| 6_000), "the back-off is over");
        assert_eq!(o.status(6_000), Status { ejected: false, left_ms: 0, failures: 1 });
    }

    #[test]
    fn one_probe_after_the_backoff_and_a_failed_probe_ejects_for_longer() {
        let o = Outlier::default();
        o.failed(0, false);
        assert_eq!(o.admit(1_000), Admit::Probe);
        // The others keep away while the probe is out.
        assert_eq!(o.admit(1_000), Admit::No);
        assert!(o.ejected(|| 1_500));
        assert_eq!(o.failed(1_400, true), Some(Ejected { failures: 2, for_ms: 2_000 }));
        assert_eq!(o.admit(3_399), Admit::No);
        assert_eq!(o.admit(3_400), Admit::Probe);
        assert_eq!(o.failed(3_500, true).map(|e| e.for_ms), Some(4_000));
    }

    #[test]
    fn a_probe_that_never_reports_lets_another_try_after_a_backoff() {
        let o = Outlier::default();
        o.failed(0, false);
        assert_eq!(o.admit(1_000), Admit::Probe);
        assert_eq!(o.admit(1_999), Admit::No);
        assert_eq!(o.admit(2_000), Admit::Probe);
    }

    #[test]
    fn success_clears_at_once() {
        let o = Outlier::default();
        assert!(!o.clear(), "nothing to clear");
        o.failed(0, false);
        o.failed(2_000, false);
        assert_eq!(o.status(2_000).failures, 2);
        assert!(o.clear());
        assert_eq!(o.status(2_001), Status { ejected: false, left_ms: 0, failures: 0 });
        assert_eq!(o.admit(2_001), Admit::Yes);
        assert_eq!(o.failed(2_002, false).map(|e| e.for_ms), Some(1_000), "the back-off starts over");
    }
}
