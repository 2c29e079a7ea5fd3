//! Fault injection, for tests and acceptance runs only (`[debug] faults = true`): wedges the
//! watchdog must catch, made with tern's real locks and tasks so what it reports is what a
//! real wedge would show.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

/// Takes one lock and runs the closure it is given while holding it (see the
/// `hold_for_fault` methods of the locks' owners).
pub type LockTaker = Box<dyn Fn(&mut dyn FnMut()) + Send + Sync>;

/// Deadlocks two locks for good: thread `tern-fault-a` takes `first` then `second`, thread
/// `tern-fault-b` takes `second` then `first`, and a barrier makes sure each holds its
/// first before either reaches for its second. Neither thread ever returns; whatever else
/// needs either lock waits behind them until the process ends. Returns once both threads
/// are started.
pub fn deadlock(first: LockTaker, second: LockTaker) -> std::io::Result<()> {
    let (first, second) = (Arc::new(first), Arc::new(second));
    let both_hold = Arc::new(Barrier::new(2));
    let take = |name: &str, outer: Arc<LockTaker>, inner: Arc<LockTaker>, barrier: Arc<Barrier>| {
        std::thread::Builder::new().name(name.into()).spawn(move || {
            outer(&mut || {
                barrier.wait();
                inner(&mut || {});
            });
            // Unreachable while the two are deadlocked, which is the point.
            tracing::error!(target: "tern::watchdog", "the fault's locks were taken after all: no deadlock");
        })
    };
    take("tern-fault-a", first.clone(), second.clone(), both_hold.clone())?;
    take("tern-fault-b", second, first, both_hold)?;
    tracing::warn!(target: "tern::watchdog", "fault injected: two threads deadlocked on two of tern's locks");
    Ok(())
}

static SPIN_ARMED: AtomicBool = AtomicBool::new(false);

/// Makes the next guarded connection spin without progress (see `spin::Guarded`): its task
/// wakes itself and never moves a byte, until the busy-loop guard closes it.
pub fn arm_spin() {
    SPIN_ARMED.store(true, Ordering::SeqCst);
    tracing::warn!(target: "tern::watchdog", "fault armed: the next connection spins");
}

/// Whether this connection is the one to spin; disarms the fault if so.
pub(crate) fn take_spin() -> bool {
    // A plain load first: the flag is almost never set, and a swap would write to a cache
    // line every connection shares.
    SPIN_ARMED.load(Ordering::Relaxed) && SPIN_ARMED.swap(false, Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::check::{Finding, Limits, Observation, check};
    use super::super::lock::{self, Mutex};
    use super::*;

    fn taker(lock: &Arc<Mutex<u32>>) -> LockTaker {
        let lock = lock.clone();
        Box::new(move |f| {
            let mut guard = lock.lock();
            *guard += 1;
            f();
        })
    }

    #[test]
    fn two_locks_deadlocked_by_the_fault_are_seen_as_a_cycle_by_name() {
        let a = Arc::new(Mutex::new("test.fault.first", 0));
        let b = Arc::new(Mutex::new("test.fault.second", 0));
        deadlock(taker(&a), taker(&b)).unwrap();
        // Both threads block once each holds one lock; wait until the registry shows it.
        let mut snap = loop {
            let mut s = lock::snapshot(&mut lock::HoldDates::default(), super::super::now_ms());
            s.retain_locks(|n| n.starts_with("test.fault."));
            if s.waiting.len() == 2 && s.held.len() == 2 {
                break s;
            }
            std::thread::yield_now();
        };
        snap.threads.retain(|_, t| t.name.starts_with("tern-fault-"));
        let since = snap.waiting.iter().map(|w| w.since_ms).max().unwrap();
        let obs = Observation { now_ms: since + 250, locks: snap, ..Observation::default() };
        let found = check(&obs, Limits { stall_after_ms: 2_000, confirm_ms: 250, tick_ms: 0 });
        let [Finding::Deadlock { cycle }] = found.as_slice() else { panic!("{found:?}") };
        let mut seen: Vec<_> = cycle.iter().map(|l| (&*l.thread.name, l.holds, l.waits_for)).collect();
        seen.sort_unstable();
        assert_eq!(
            seen,
            [
                ("tern-fault-a", "test.fault.first", "test.fault.second"),
                ("tern-fault-b", "test.fault.second", "test.fault.first"),
            ]
        );
    }
}
