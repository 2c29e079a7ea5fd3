//! Named, tracked mutexes, so the watchdog can say which lock is wedged and who holds it.
//!
//! A [`Mutex`] is a `parking_lot::Mutex` with a name (`"rib.writer"`) and one word beside
//! it: the holder (a small per-thread token) and which acquisition this is (a count),
//! stored with relaxed atomic writes on every lock and cleared on unlock. No clock is read
//! on that path (a clock read would cost five times the lock): how long a lock has been
//! held is measured by the watchdog, from the first look that saw that same acquisition, a
//! lower bound late by at most one look (`stall_after / 40`).
//!
//! A lock registers itself in a process-wide registry the first time it is taken, and
//! leaves it when dropped, so a million machines whose lock was never taken cost no entry.
//! Only a thread that finds the lock taken (`try_lock` failed) writes itself down as
//! waiting, in the registry, before it blocks: the uncontended path touches nothing but
//! the lock itself.
//!
//! From [`snapshot`] the watchdog thread sees every lock held (name, holder thread, since
//! when) and every waiting thread (and on which lock). A cycle among them (thread A holds
//! L1 and waits for L2 while B holds L2 and waits for L1) is a deadlock; a lock held past
//! `stall_after` is a wedge too (see `check`).
//!
//! Why not parking_lot's `deadlock_detection` feature: it names no lock and no thread, only
//! backtraces, and it cannot see locks it does not own, such as DashMap's shards. This
//! module is tern's own view, with names an operator can read in a diagnostics file.
//!
//! Not visible yet: the DashMaps on tern's paths (autostart's wakes, held counts, checkers,
//! ops and lines; the replay cache; upstream's hosts), the locks of `http::body`, and
//! tokio's async mutexes (autostart's per-machine `ops`), which block tasks, not threads.
//! A deadlock through one of them shows as a stale heartbeat (or as nothing, for tasks),
//! not as a cycle.
//!
//! This is the one part of the watchdog the rest of tern imports; it imports nothing of
//! tern's but the watchdog's clock.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::now_ms;

/// Bits of a lock's word that hold the holder's thread token; the rest count acquisitions
/// (wrapping), which tells one hold from the next by the same thread.
const TOKEN_BITS: u32 = 24;
const SEQ_BITS: u32 = 64 - TOKEN_BITS;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
/// The token of a thread whose own could not be had (it is exiting, or tokens ran out).
const UNKNOWN_THREAD: u32 = (1 << TOKEN_BITS) - 1;

/// A named mutual-exclusion lock the watchdog can see. Feels like `parking_lot::Mutex`.
pub struct Mutex<T> {
    name: &'static str,
    /// How long the lock may be held before it counts as a wedge, when longer than the
    /// watchdog's `stall_after` (zero: `stall_after`).
    may_hold_ms: u64,
    /// Made and registered on the first lock.
    state: OnceLock<Arc<LockState>>,
    inner: parking_lot::Mutex<T>,
}

/// What the registry keeps of a lock.
pub(crate) struct LockState {
    id: u64,
    name: &'static str,
    may_hold_ms: u64,
    /// `token << 40 | seq` of the holder, zero while free. One word, so the watchdog never
    /// pairs one holder with another's acquisition.
    word: AtomicU64,
    /// Acquisitions so far; written only by the holder, so a load and a store suffice.
    seq: AtomicU64,
}

impl<T> Mutex<T> {
    /// A lock named `name`: short, dotted, the owner first (`"upstream.idle"`). The name is
    /// what diagnostics files and `/v1/watchdog` show.
    pub const fn new(name: &'static str, value: T) -> Self {
        Mutex { name, may_hold_ms: 0, state: OnceLock::new(), inner: parking_lot::Mutex::new(value) }
    }

    /// Lets the lock be held up to `limit` before it counts as wedged, for a lock held
    /// across a wait that is bounded but may be longer than `stall_after` (SQLite's busy
    /// timeout). A deadlock on it is still reported at once.
    #[must_use]
    pub fn may_hold_for(mut self, limit: Duration) -> Self {
        self.may_hold_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Takes the lock, blocking the thread until it is free.
    #[inline]
    pub fn lock(&self) -> MutexGuard<'_, T> {
        let state = self.state();
        let inner = match self.inner.try_lock() {
            Some(guard) => guard,
            None => wait_for(state, &self.inner),
        };
        // Never zero (zero means free): the token is.
        let seq = state.seq.load(Relaxed).wrapping_add(1);
        state.seq.store(seq, Relaxed);
        state.word.store(pack(thread_token(), seq), Relaxed);
        MutexGuard { inner, state }
    }

    /// The value, without locking: `&mut self` proves no one else holds it.
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }

    #[inline]
    fn state(&self) -> &LockState {
        self.state.get_or_init(|| register(self.name, self.may_hold_ms))
    }
}

impl<T> Drop for Mutex<T> {
    fn drop(&mut self) {
        if let Some(state) = self.state.get() {
            REGISTRY.lock().locks.remove(&state.id);
        }
    }
}

impl<T> fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mutex").field("name", &self.name).field("locked", &self.inner.is_locked()).finish()
    }
}

/// Held until dropped; derefs to the value.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct MutexGuard<'a, T> {
    inner: parking_lot::MutexGuard<'a, T>,
    state: &'a LockState,
}

impl<T> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T> Drop for MutexGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        // Cleared before `inner` unlocks (fields drop after this body), so the next
        // holder's word always lands after ours.
        self.state.word.store(0, Relaxed);
    }
}

/// The contended path: written down as waiting, so a cycle can be seen, then blocked.
#[cold]
#[inline(never)]
fn wait_for<'a, T>(state: &LockState, inner: &'a parking_lot::Mutex<T>) -> parking_lot::MutexGuard<'a, T> {
    let me = thread_token();
    REGISTRY.lock().waiters.insert(me, Waiting { lock: state.id, since_ms: now_ms() });
    let guard = inner.lock();
    REGISTRY.lock().waiters.remove(&me);
    guard
}

fn pack(token: u32, seq: u64) -> u64 {
    (u64::from(token) << SEQ_BITS) | (seq & SEQ_MASK)
}

fn holder(word: u64) -> u32 {
    u32::try_from(word >> SEQ_BITS).unwrap_or(UNKNOWN_THREAD)
}

fn register(name: &'static str, may_hold_ms: u64) -> Arc<LockState> {
    let mut reg = REGISTRY.lock();
    reg.next_lock += 1;
    let state = Arc::new(LockState {
        id: reg.next_lock,
        name,
        may_hold_ms,
        word: AtomicU64::new(0),
        seq: AtomicU64::new(0),
    });
    reg.locks.insert(state.id, state.clone());
    state
}

thread_local! {
    /// This thread's token, zero until it first takes a tracked lock.
    static TOKEN: Cell<u32> = const { Cell::new(0) };
    /// Gives the token back when the thread ends (tokens are reused: they must fit in 24 bits).
    static ENROLLED: Enrolled = const { Enrolled(Cell::new(0)) };
}

struct Enrolled(Cell<u32>);

impl Drop for Enrolled {
    fn drop(&mut self) {
        let token = self.0.get();
        if token != 0 {
            let _ = TOKEN.try_with(|t| t.set(UNKNOWN_THREAD));
            REGISTRY.lock().leave(token);
        }
    }
}

#[inline]
fn thread_token() -> u32 {
    TOKEN
        .try_with(|t| match t.get() {
            0 => {
                let token = enroll();
                t.set(token);
                token
            }
            token => token,
        })
        .unwrap_or(UNKNOWN_THREAD)
}

#[cold]
fn enroll() -> u32 {
    let current = std::thread::current();
    let info = ThreadInfo {
        name: Arc::from(current.name().unwrap_or("<unnamed>")),
        tid: nix::unistd::gettid().as_raw(),
    };
    let token = REGISTRY.lock().enroll(info);
    if token != UNKNOWN_THREAD {
        let _ = ENROLLED.try_with(|e| e.0.set(token));
    }
    token
}

/// Every tracked lock that was ever taken and still exists, every waiting thread and every
/// thread that took a tracked lock.
struct Registry {
    next_lock: u64,
    locks: BTreeMap<u64, Arc<LockState>>,
    waiters: BTreeMap<u32, Waiting>,
    threads: BTreeMap<u32, ThreadInfo>,
    next_token: u32,
    free_tokens: Vec<u32>,
}

struct Waiting {
    lock: u64,
    since_ms: u64,
}

static REGISTRY: parking_lot::Mutex<Registry> = parking_lot::Mutex::new(Registry {
    next_lock: 0,
    locks: BTreeMap::new(),
    waiters: BTreeMap::new(),
    threads: BTreeMap::new(),
    next_token: 0,
    free_tokens: Vec::new(),
});

impl Registry {
    fn enroll(&mut self, info: ThreadInfo) -> u32 {
        let token = match self.free_tokens.pop() {
            Some(t) => t,
            None if self.next_token + 1 < UNKNOWN_THREAD => {
                self.next_token += 1;
                self.next_token
            }
            None => return UNKNOWN_THREAD,
        };
        self.threads.insert(token, info);
        token
    }

    fn leave(&mut self, token: u32) {
        self.threads.remove(&token);
        self.waiters.remove(&token);
        self.free_tokens.push(token);
    }
}

/// A thread that took a tracked lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadInfo {
    pub name: Arc<str>,
    /// The kernel's thread id, as in `/proc/self/task/<tid>`.
    pub tid: i32,
}

/// A lock held at the time of a [`snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldLock {
    /// Tells apart locks of the same name (two machines' `machine.streams_end`).
    pub lock: u64,
    pub name: &'static str,
    pub holder: u32,
    /// When the first snapshot that saw this hold was taken (with the same [`HoldDates`]):
    /// it was taken at most one look earlier.
    pub since_ms: u64,
    /// How long it may be held before it counts as wedged, beyond `stall_after` (zero: no
    /// longer than that).
    pub may_hold_ms: u64,
}

/// A thread blocked on a lock at the time of a [`snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiter {
    pub thread: u32,
    pub lock: u64,
    pub name: &'static str,
    pub since_ms: u64,
}

/// The tracked locks as the watchdog sees them at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockSnapshot {
    pub held: Vec<HeldLock>,
    pub waiting: Vec<Waiter>,
    /// By token: the threads named in `held` and `waiting`, and any other that took a lock.
    pub threads: BTreeMap<u32, ThreadInfo>,
}

impl LockSnapshot {
    /// A thread's name, or a stand-in for one that has ended.
    pub fn thread_name(&self, token: u32) -> Arc<str> {
        match self.threads.get(&token) {
            Some(t) => t.name.clone(),
            None => Arc::from(format!("thread #{token} (ended)")),
        }
    }

    /// Keeps only the locks (and their waiters) `keep` accepts: for tests, which share one
    /// process-wide registry with every other test.
    pub fn retain_locks(&mut self, keep: impl Fn(&str) -> bool) {
        self.held.retain(|h| keep(h.name));
        self.waiting.retain(|w| keep(w.name));
    }
}

/// When each hold was first seen, across snapshots: each watchdog keeps its own.
#[derive(Debug, Default)]
pub struct HoldDates(BTreeMap<u64, (u64, u64)>);

/// Every tracked lock held now and every thread waiting for one, a hold dated by `dates`
/// from the first snapshot that saw it (`now_ms` if this one is the first). Takes the
/// registry's lock briefly; reads each lock's word without locking it.
pub fn snapshot(dates: &mut HoldDates, now_ms: u64) -> LockSnapshot {
    let reg = REGISTRY.lock();
    let mut seen = BTreeMap::new();
    let mut held = Vec::new();
    for s in reg.locks.values() {
        let word = s.word.load(Relaxed);
        if word == 0 {
            continue;
        }
        let since_ms = match dates.0.get(&s.id) {
            Some(&(same, since)) if same == word => since,
            _ => now_ms,
        };
        seen.insert(s.id, (word, since_ms));
        held.push(HeldLock {
            lock: s.id,
            name: s.name,
            holder: holder(word),
            since_ms,
            may_hold_ms: s.may_hold_ms,
        });
    }
    dates.0 = seen;
    let waiting = reg
        .waiters
        .iter()
        .filter_map(|(&thread, w)| {
            let name = reg.locks.get(&w.lock)?.name;
            Some(Waiter { thread, lock: w.lock, name, since_ms: w.since_ms })
        })
        .collect();
    LockSnapshot { held, waiting, threads: reg.threads.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mine(prefix: &'static str) -> LockSnapshot {
        let mut s = snapshot(&mut HoldDates::default(), now_ms());
        s.retain_locks(|n| n.starts_with(prefix));
        s
    }

    #[test]
    fn a_held_lock_shows_its_name_and_holder_until_released() {
        let lock = Mutex::new("test.lock.held", 1);
        assert!(mine("test.lock.held").held.is_empty(), "a lock never taken is not even registered");
        let mut guard = lock.lock();
        *guard += 1;
        let s = mine("test.lock.held");
        assert_eq!(s.held.len(), 1);
        let held = &s.held[0];
        assert_eq!(held.name, "test.lock.held");
        assert_eq!(s.threads[&held.holder].tid, nix::unistd::gettid().as_raw());
        drop(guard);
        assert!(mine("test.lock.held").held.is_empty());
        assert_eq!(*lock.lock(), 2);
    }

    #[test]
    fn a_hold_is_dated_from_the_first_look_that_saw_it_and_a_new_hold_afresh() {
        let lock = Mutex::new("test.lock.dated", ());
        let mut dates = HoldDates::default();
        let mut dated = |at| {
            let mut s = snapshot(&mut dates, at);
            s.retain_locks(|n| n == "test.lock.dated");
            s.held.first().map(|h| h.since_ms)
        };
        let guard = lock.lock();
        assert_eq!(dated(1_000), Some(1_000));
        assert_eq!(dated(1_250), Some(1_000), "the same hold");
        drop(guard);
        assert_eq!(dated(1_500), None);
        let _again = lock.lock();
        assert_eq!(dated(1_750), Some(1_750), "taken again by the same thread: a new hold");
    }

    #[test]
    fn a_dropped_lock_leaves_the_registry() {
        let lock = Mutex::new("test.lock.dropped", ());
        let guard = lock.lock();
        std::mem::forget(guard); // a leaked guard keeps the word set, as a stuck holder would
        assert_eq!(mine("test.lock.dropped").held.len(), 1);
        drop(lock);
        assert!(mine("test.lock.dropped").held.is_empty());
    }

    #[test]
    fn a_blocked_thread_is_seen_waiting_on_the_lock_by_name() {
        let lock = Arc::new(Mutex::new("test.lock.contended", 0u32));
        let guard = lock.lock();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let lock = lock.clone();
            std::thread::Builder::new()
                .name("test-waiter".into())
                .spawn(move || {
                    tx.send(nix::unistd::gettid().as_raw()).unwrap();
                    *lock.lock() += 1;
                })
                .unwrap()
        };
        let tid = rx.recv().unwrap();
        // The waiter registers itself just before it blocks; poll the registry for it.
        let seen = loop {
            let s = mine("test.lock.contended");
            if let Some(w) = s.waiting.first() {
                break (w.clone(), s.threads[&w.thread].clone());
            }
            std::thread::yield_now();
        };
        assert_eq!(seen.0.name, "test.lock.contended");
        assert_eq!(&*seen.1.name, "test-waiter");
        assert_eq!(seen.1.tid, tid);
        drop(guard);
        waiter.join().unwrap();
        assert!(mine("test.lock.contended").waiting.is_empty());
        assert_eq!(*lock.lock(), 1);
    }

    #[test]
    fn the_word_keeps_holder_and_acquisition_apart() {
        let word = pack(5, (1 << 40) + 77);
        assert_eq!(
            (holder(word), word & SEQ_MASK),
            (5, 77),
            "the count wraps at 40 bits, never into the token"
        );
        assert_eq!(holder(pack(UNKNOWN_THREAD, 3)), UNKNOWN_THREAD);
    }
}
