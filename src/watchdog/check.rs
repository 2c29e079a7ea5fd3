//! The watchdog's judgement: a pure function of what it saw (heartbeat times, tracked locks)
//! and the time, so tests drive it with made-up observations and a fake clock.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use super::lock::LockSnapshot;

/// One look at the process.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    /// [`super::now_ms`] when it was taken.
    pub now_ms: u64,
    /// When the previous look was taken, if there was one.
    pub previous_ms: Option<u64>,
    pub beats: Vec<BeatSeen>,
    pub locks: LockSnapshot,
}

/// A heartbeat and its last tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BeatSeen {
    pub id: u64,
    pub what: Arc<str>,
    pub last_ms: u64,
    /// What ticks it is parked (waiting, with nothing to do): idle, not stuck.
    pub parked: bool,
}

impl BeatSeen {
    /// How stale it is: 0 while parked (it would answer at once), else since its last tick.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        if self.parked { 0 } else { now_ms.saturating_sub(self.last_ms) }
    }
}

impl Observation {
    /// Nothing busy: every heartbeat parked, no tracked lock held or waited for. The
    /// watchdog may look less often then.
    pub fn is_idle(&self) -> bool {
        self.beats.iter().all(|b| b.parked) && self.locks.held.is_empty() && self.locks.waiting.is_empty()
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A heartbeat or lock making no progress this long is a wedge.
    pub stall_after_ms: u64,
    /// How long every thread of a lock cycle must have been waiting before it is called a
    /// deadlock: a waiter that was just given its lock may not have left the registry yet.
    pub confirm_ms: u64,
    /// How often heartbeats tick. A heartbeat last heard `age` ago stopped somewhere in the
    /// tick period after that, so it is called stale once `age + tick_ms` passes
    /// `stall_after_ms`: a runtime that blocks is then reported `stall_after` after it
    /// stopped, not up to a tick later.
    pub tick_ms: u64,
}

/// A thread, by name (and kernel id when it is known).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    pub name: Arc<str>,
    pub tid: Option<i32>,
}

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tid {
            Some(tid) => write!(f, "{} (tid {tid})", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

/// One thread of a deadlock: it holds `holds` (which the previous thread of the cycle waits
/// for) and waits for `waits_for` (which the next one holds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub thread: Named,
    pub holds: &'static str,
    pub waits_for: &'static str,
    pub waiting_ms: u64,
    holds_lock: u64,
    token: u32,
}

/// Something wedged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// A heartbeat older than `stall_after`: the runtime or loop that ticks it is stuck.
    Heartbeat { what: Arc<str>, age_ms: u64, id: u64, last_ms: u64 },
    /// Threads each holding a lock the next one waits for, in a ring: none will ever move.
    Deadlock { cycle: Vec<Link> },
    /// A lock held longer than `stall_after` (or its own allowance).
    LockHeld {
        name: &'static str,
        holder: Named,
        held_ms: u64,
        waiters: Vec<Named>,
        lock: u64,
        since_ms: u64,
    },
}

impl Finding {
    /// The `what` label of `tern_watchdog_stalls_total`.
    pub fn what(&self) -> &'static str {
        match self {
            Finding::Heartbeat { .. } => "heartbeat",
            Finding::Deadlock { .. } => "deadlock",
            Finding::LockHeld { .. } => "lock_held",
        }
    }

    /// Stays the same while this one wedge goes on, and differs for the next: a heartbeat
    /// that ticks and stalls again, a lock taken again, a new cycle. Reports are made once
    /// per key.
    pub fn key(&self) -> String {
        match self {
            Finding::Heartbeat { id, last_ms, .. } => format!("heartbeat:{id}:{last_ms}"),
            Finding::Deadlock { cycle } => {
                let mut ids: Vec<_> = cycle.iter().map(|l| (l.holds_lock, l.token)).collect();
                ids.sort_unstable();
                let mut key = String::from("deadlock");
                for (lock, token) in ids {
                    let _ = write!(key, ":{lock}/{token}");
                }
                key
            }
            Finding::LockHeld { lock, since_ms, .. } => format!("lock_held:{lock}:{since_ms}"),
        }
    }

    /// One line for a log or a status page.
    pub fn summary(&self) -> String {
        match self {
            Finding::Heartbeat { what, age_ms, .. } => {
                format!("heartbeat {what} is stale: last tick {age_ms} ms ago")
            }
            Finding::Deadlock { cycle } => {
                let mut s = String::from("deadlock:");
                for (i, l) in cycle.iter().enumerate() {
                    let sep = if i == 0 { " " } else { "; " };
                    let _ = write!(
                        s,
                        "{sep}{} holds {} and waits for {} ({} ms)",
                        l.thread, l.holds, l.waits_for, l.waiting_ms
                    );
                }
                s
            }
            Finding::LockHeld { name, holder, held_ms, waiters, .. } => {
                let mut s = format!("lock {name} held by {holder} for {held_ms} ms");
                if !waiters.is_empty() {
                    let names: Vec<String> = waiters.iter().map(ToString::to_string).collect();
                    let _ = write!(s, "; waiting: {}", names.join(", "));
                }
                s
            }
        }
    }
}

/// Everything wedged in `obs`: deadlocks first (the cause), then locks held too long, then
/// stale heartbeats (often the symptom).
pub fn check(obs: &Observation, limits: Limits) -> Vec<Finding> {
    let mut found = deadlocks(obs, limits);
    let in_cycles: BTreeSet<u64> = found
        .iter()
        .flat_map(|f| match f {
            Finding::Deadlock { cycle } => cycle.iter().map(|l| l.holds_lock).collect(),
            _ => Vec::new(),
        })
        .collect();
    // After a gap much longer than the watchdog's own period, the whole process was
    // paused (SIGSTOP, a debugger, CPU throttling): every age is inflated alike, and the
    // next look, a period later, tells a pause from a stall.
    let paused = obs.previous_ms.is_some_and(|p| obs.now_ms.saturating_sub(p) > limits.stall_after_ms / 2);
    if paused {
        return found;
    }
    for h in &obs.locks.held {
        let held_ms = obs.now_ms.saturating_sub(h.since_ms);
        if held_ms > limits.stall_after_ms.max(h.may_hold_ms) && !in_cycles.contains(&h.lock) {
            let waiters = obs
                .locks
                .waiting
                .iter()
                .filter(|w| w.lock == h.lock)
                .map(|w| named(&obs.locks, w.thread))
                .collect();
            found.push(Finding::LockHeld {
                name: h.name,
                holder: named(&obs.locks, h.holder),
                held_ms,
                waiters,
                lock: h.lock,
                since_ms: h.since_ms,
            });
        }
    }
    for b in &obs.beats {
        let age_ms = b.age_ms(obs.now_ms);
        if age_ms + limits.tick_ms > limits.stall_after_ms {
            found.push(Finding::Heartbeat { what: b.what.clone(), age_ms, id: b.id, last_ms: b.last_ms });
        }
    }
    found
}

fn named(locks: &LockSnapshot, token: u32) -> Named {
    Named { name: locks.thread_name(token), tid: locks.threads.get(&token).map(|t| t.tid) }
}

/// Cycles in "thread waits for a lock held by thread": each thread waits for at most one
/// lock, so following the one edge out of each thread finds every cycle.
fn deadlocks(obs: &Observation, limits: Limits) -> Vec<Finding> {
    let locks = &obs.locks;
    let holder: BTreeMap<u64, u32> = locks.held.iter().map(|h| (h.lock, h.holder)).collect();
    // thread -> (the lock it waits for, how long, the thread holding that lock)
    let next: BTreeMap<u32, (&super::lock::Waiter, u32)> = locks
        .waiting
        .iter()
        .filter(|w| obs.now_ms.saturating_sub(w.since_ms) >= limits.confirm_ms)
        .filter_map(|w| Some((w.thread, (w, *holder.get(&w.lock)?))))
        .collect();
    let mut done = BTreeSet::new();
    let mut found = Vec::new();
    for &start in next.keys() {
        let mut path: Vec<u32> = Vec::new();
        let mut at = start;
        while !done.contains(&at) {
            if let Some(i) = path.iter().position(|&t| t == at) {
                found.push(Finding::Deadlock { cycle: cycle(obs, &next, &path[i..]) });
                break;
            }
            path.push(at);
            match next.get(&at) {
                Some(&(_, h)) => at = h,
                None => break,
            }
        }
        done.extend(path);
    }
    found
}

/// The links of a cycle of threads, each `path[i]` waiting for a lock `path[i + 1]` holds.
fn cycle(obs: &Observation, next: &BTreeMap<u32, (&super::lock::Waiter, u32)>, path: &[u32]) -> Vec<Link> {
    path.iter()
        .enumerate()
        .filter_map(|(i, &t)| {
            let prev = path[(i + path.len() - 1) % path.len()];
            let (held, _) = next.get(&prev)?;
            let (waits, _) = next.get(&t)?;
            Some(Link {
                thread: named(&obs.locks, t),
                holds: held.name,
                waits_for: waits.name,
                waiting_ms: obs.now_ms.saturating_sub(waits.since_ms),
                holds_lock: held.lock,
                token: t,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::lock::{HeldLock, ThreadInfo, Waiter};
    use super::*;

    const LIMITS: Limits = Limits { stall_after_ms: 2000, confirm_ms: 250, tick_ms: 0 };

    fn threads(names: &[(u32, &str)]) -> BTreeMap<u32, ThreadInfo> {
        names
            .iter()
            .map(|&(t, n)| (t, ThreadInfo { name: Arc::from(n), tid: 1000 + i32::try_from(t).unwrap() }))
            .collect()
    }

    fn held(lock: u64, name: &'static str, holder: u32, since_ms: u64) -> HeldLock {
        HeldLock { lock, name, holder, since_ms, may_hold_ms: 0 }
    }

    fn waiter(thread: u32, lock: u64, name: &'static str, since_ms: u64) -> Waiter {
        Waiter { thread, lock, name, since_ms }
    }

    /// Fault thread a holds rib.writer (1) and waits for upstream.idle (2); b the reverse.
    fn crossed(now_ms: u64, waiting_since: u64) -> Observation {
        Observation {
            now_ms,
            previous_ms: Some(now_ms - 250),
            beats: vec![],
            locks: LockSnapshot {
                held: vec![held(1, "rib.writer", 1, 10_000), held(2, "upstream.idle", 2, 10_000)],
                waiting: vec![
                    waiter(1, 2, "upstream.idle", waiting_since),
                    waiter(2, 1, "rib.writer", waiting_since),
                ],
                threads: threads(&[(1, "tern-fault-a"), (2, "tern-fault-b")]),
            },
        }
    }

    #[test]
    fn a_crossed_pair_of_locks_is_a_deadlock_naming_both_locks_and_threads() {
        let found = check(&crossed(10_300, 10_010), LIMITS);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].what(), "deadlock");
        let text = found[0].summary();
        for part in ["tern-fault-a (tid 1001) holds rib.writer and waits for upstream.idle", "tern-fault-b"] {
            assert!(text.contains(part), "{text}");
        }
    }

    #[test]
    fn a_deadlock_is_reported_without_waiting_for_stall_after_but_not_on_first_sight() {
        assert!(check(&crossed(10_100, 10_010), LIMITS).is_empty(), "waiting 90 ms: not yet confirmed");
        assert_eq!(check(&crossed(10_260, 10_010), LIMITS).len(), 1, "250 ms, long before 2 s");
    }

    #[test]
    fn a_deadlocked_lock_is_not_also_reported_as_held_too_long() {
        let found = check(&crossed(60_000, 10_010), LIMITS);
        assert_eq!(found.iter().map(Finding::what).collect::<Vec<_>>(), ["deadlock"]);
        assert_eq!(found[0].key(), check(&crossed(61_000, 10_010), LIMITS)[0].key(), "the same wedge");
    }

    #[test]
    fn a_thread_waiting_on_a_lock_it_holds_is_a_deadlock_of_one() {
        let obs = Observation {
            now_ms: 5_000,
            locks: LockSnapshot {
                held: vec![held(7, "lifecycle.line", 3, 4_000)],
                waiting: vec![waiter(3, 7, "lifecycle.line", 4_000)],
                threads: threads(&[(3, "tern-lifecycle")]),
            },
            ..Observation::default()
        };
        let found = check(&obs, LIMITS);
        assert_eq!(found.len(), 1);
        assert!(found[0].summary().contains("holds lifecycle.line and waits for lifecycle.line"));
    }

    #[test]
    fn a_chain_that_ends_in_a_running_thread_is_contention_not_a_deadlock() {
        let obs = Observation {
            now_ms: 5_000,
            locks: LockSnapshot {
                held: vec![held(1, "a", 1, 4_000), held(2, "b", 2, 4_000)],
                waiting: vec![waiter(1, 2, "b", 4_000), waiter(3, 1, "a", 4_000)],
                threads: threads(&[(1, "x"), (2, "y"), (3, "z")]),
            },
            ..Observation::default()
        };
        assert!(check(&obs, LIMITS).is_empty());
    }

    #[test]
    fn a_lock_held_past_stall_after_names_its_holder_and_waiters() {
        let mut obs = Observation {
            now_ms: 12_001,
            locks: LockSnapshot {
                held: vec![held(4, "upstream.idle", 1, 10_000)],
                waiting: vec![waiter(2, 4, "upstream.idle", 11_000)],
                threads: threads(&[(1, "worker-0"), (2, "worker-1")]),
            },
            ..Observation::default()
        };
        let found = check(&obs, LIMITS);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].what(), "lock_held");
        assert_eq!(
            found[0].summary(),
            "lock upstream.idle held by worker-0 (tid 1001) for 2001 ms; waiting: worker-1 (tid 1002)"
        );
        obs.now_ms = 12_000;
        assert!(check(&obs, LIMITS).is_empty(), "exactly stall_after is not past it");
    }

    #[test]
    fn a_lock_allowed_to_be_held_longer_is_judged_by_its_own_limit() {
        let mut h = held(4, "rib.writer", 1, 0);
        h.may_hold_ms = 15_000;
        let mut obs = Observation {
            now_ms: 14_000,
            locks: LockSnapshot { held: vec![h], threads: threads(&[(1, "blocking")]), ..Default::default() },
            ..Observation::default()
        };
        assert!(check(&obs, LIMITS).is_empty());
        obs.now_ms = 15_001;
        assert_eq!(check(&obs, LIMITS).len(), 1);
    }

    #[test]
    fn a_heartbeat_older_than_stall_after_is_stale_and_a_new_stall_has_a_new_key() {
        let beat = |last_ms| BeatSeen { id: 3, what: Arc::from("worker-0"), last_ms, parked: false };
        let at = |now_ms, last_ms| Observation {
            now_ms,
            previous_ms: Some(now_ms - 250),
            beats: vec![
                beat(last_ms),
                BeatSeen { id: 4, what: Arc::from("lifecycle"), last_ms: now_ms - 10, parked: false },
            ],
            ..Observation::default()
        };
        assert!(check(&at(3_000, 1_000), LIMITS).is_empty());
        let first = check(&at(3_001, 1_000), LIMITS);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].summary(), "heartbeat worker-0 is stale: last tick 2001 ms ago");
        assert_eq!(first[0].key(), check(&at(9_000, 1_000), LIMITS)[0].key(), "still the same stall");
        assert_ne!(
            first[0].key(),
            check(&at(9_000, 5_000), LIMITS)[0].key(),
            "it ticked, then stalled again"
        );
    }

    #[test]
    fn a_parked_runtime_is_idle_however_long_ago_it_last_ticked() {
        let mut obs = Observation {
            now_ms: 100_000,
            previous_ms: Some(99_500),
            beats: vec![BeatSeen { id: 1, what: Arc::from("catalog"), last_ms: 1_000, parked: true }],
            ..Observation::default()
        };
        assert!(check(&obs, LIMITS).is_empty(), "waiting for work is not being stuck");
        assert_eq!(obs.beats[0].age_ms(obs.now_ms), 0);
        assert!(obs.is_idle());
        // It unparked (a tick) and has not parked again since: judged as any other.
        obs.beats[0] = BeatSeen { parked: false, last_ms: 97_000, ..obs.beats[0].clone() };
        assert!(!obs.is_idle());
        assert_eq!(check(&obs, LIMITS).len(), 1);
        obs.beats[0].parked = true;
        obs.locks.held = vec![held(1, "rib.writer", 1, 99_900)];
        assert!(!obs.is_idle(), "a lock held is something to watch closely");
    }

    #[test]
    fn after_the_watchdog_itself_was_paused_it_looks_again_before_calling_a_stall() {
        let obs = Observation {
            now_ms: 10_000,
            previous_ms: Some(5_000),
            beats: vec![BeatSeen { id: 1, what: Arc::from("worker-0"), last_ms: 5_000, parked: false }],
            ..Observation::default()
        };
        assert!(check(&obs, LIMITS).is_empty());
        let next = Observation { now_ms: 10_250, previous_ms: Some(10_000), ..obs };
        assert_eq!(check(&next, LIMITS).len(), 1, "still stale a period later: a stall");
    }
}
