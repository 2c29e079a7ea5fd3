//! The watchdog as a whole: reporting order, once-only hooks, retirement, status, and one
//! run of the real thread against a blocked runtime.

use std::sync::mpsc;

use super::lock::LockSnapshot;
use super::*;

struct Seen {
    hooks: Hooks,
    wedges: mpsc::Receiver<Wedge>,
}

fn hooks(generation: u64) -> Seen {
    let (tx, wedges) = mpsc::channel();
    let tx = parking_lot::Mutex::new(tx);
    let hooks = Hooks {
        on_wedge: Box::new(move |w| {
            let _ = tx.lock().send(w.clone());
        }),
        generation: Box::new(move || generation),
    };
    Seen { hooks, wedges }
}

fn dog(action: Action, dir: &std::path::Path) -> (Arc<Watchdog>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let settings =
        Settings { stall_after: Duration::from_secs(2), action, diagnostics_dir: dir.join("diag") };
    (Watchdog::new(settings, metrics.clone()), metrics)
}

/// What the watchdog sees `after_ms` past `beat`'s last tick, without other tests' locks
/// (the lock registry is process-wide).
fn look(dog: &Watchdog, beat: &Beat, after_ms: u64) -> Observation {
    let now_ms = beat.0.last_ms.load(Ordering::Relaxed) + after_ms;
    Observation {
        now_ms,
        previous_ms: Some(now_ms.saturating_sub(250)),
        beats: dog.beats_seen(),
        ..Default::default()
    }
}

fn stalls(m: &Metrics, what: &str) -> u64 {
    m.watchdog_stalls.with_label_values(&[what]).get()
}

#[test]
fn a_stale_heartbeat_is_written_down_counted_and_marked_before_the_hook_runs_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (dog, metrics) = dog(Action::Bounce, tmp.path());
    let beat = dog.heartbeat("worker-0");
    let lifecycle = dog.heartbeat("lifecycle");
    // Ticked as the watchdog looks: fresh.
    lifecycle.0.last_ms.store(beat.0.last_ms.load(Ordering::Relaxed) + 2_000, Ordering::Relaxed);
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let hooks = {
        let (order, dog, metrics) = (order.clone(), dog.clone(), metrics.clone());
        Hooks {
            on_wedge: Box::new(move |w| {
                let file = w.diagnostics.as_ref().map(|p| std::fs::read_to_string(p).unwrap());
                order.lock().push((file, stalls(&metrics, "heartbeat"), dog.is_wedged(), w.what()));
            }),
            generation: Box::new(|| 7),
        }
    };
    // Heard from 1.9 s ago and due to tick every 100 ms: it may have stopped only 1.8 s ago.
    let tick = u64::try_from(dog.tick_period().as_millis()).unwrap();
    assert_eq!(tick, 100);
    dog.judge(&look(&dog, &beat, 2_000 - tick), &hooks);
    assert!(order.lock().is_empty() && !dog.is_wedged(), "not yet stalled for stall_after");
    dog.judge(&look(&dog, &beat, 2_001 - tick), &hooks);
    let calls = order.lock().clone();
    assert_eq!(calls.len(), 1);
    let (file, counted, wedged, what) = &calls[0];
    let file = file.as_deref().expect("the file was there when the hook ran");
    assert!(file.contains("heartbeat worker-0 is stale: last tick 1901 ms ago"), "{file}");
    assert!(file.contains("catalog generation 7"), "{file}");
    assert_eq!((*counted, *wedged, *what), (1, true, "heartbeat"));
    // Bounce acts once: neither the same stall nor a later one calls the hook again.
    dog.judge(&look(&dog, &beat, 3_000), &hooks);
    beat.tick();
    dog.judge(&look(&dog, &beat, 2_500), &hooks);
    assert_eq!(order.lock().len(), 1);
    assert!(dog.is_wedged(), "the process is on its way out");
    let status = dog.status_json();
    assert_eq!(status["stalls"]["count"], 1);
    assert_eq!(status["stalls"]["last"]["what"], "heartbeat");
    let path = status["last_diagnostics"].as_str().unwrap();
    assert!(path.starts_with(tmp.path().join("diag").to_str().unwrap()), "{path}");
}

#[test]
fn with_log_each_wedge_is_reported_once_and_a_later_one_again() {
    let tmp = tempfile::tempdir().unwrap();
    let (dog, metrics) = dog(Action::Log, tmp.path());
    let seen = hooks(1);
    let beat = dog.heartbeat("catalog");
    for after in [2_100, 2_350, 2_600] {
        dog.judge(&look(&dog, &beat, after), &seen.hooks);
    }
    assert_eq!(seen.wedges.try_iter().count(), 1, "the same stall is reported once");
    assert!(dog.is_wedged());
    beat.tick();
    dog.judge(&look(&dog, &beat, 10), &seen.hooks);
    assert!(!dog.is_wedged(), "with log, healthy again once nothing is wedged");
    dog.judge(&look(&dog, &beat, 2_100), &seen.hooks);
    let again: Vec<Wedge> = seen.wedges.try_iter().collect();
    assert_eq!(again.len(), 1, "a new stall of the same heartbeat is a new wedge");
    assert_eq!(stalls(&metrics, "heartbeat"), 2);
    let files = std::fs::read_dir(tmp.path().join("diag")).unwrap().count();
    assert_eq!(files, 2);
}

#[test]
fn a_deadlock_is_counted_under_its_own_name_and_the_file_names_locks_and_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let (dog, metrics) = dog(Action::Exit, tmp.path());
    let seen = hooks(3);
    let beat = dog.heartbeat("worker-0");
    let mut obs = look(&dog, &beat, 300);
    let threads = [(1, "tern-fault-a"), (2, "tern-fault-b")]
        .into_iter()
        .map(|(t, n)| (t, lock::ThreadInfo { name: Arc::from(n), tid: 500 + i32::try_from(t).unwrap() }))
        .collect();
    let since = obs.now_ms - 260;
    let held = |lock, name, holder| lock::HeldLock { lock, name, holder, since_ms: since, may_hold_ms: 0 };
    let waiter = |thread, lock, name| lock::Waiter { thread, lock, name, since_ms: since };
    obs.locks = LockSnapshot {
        held: vec![held(1, "rib.writer", 1), held(2, "upstream.idle", 2)],
        waiting: vec![waiter(1, 2, "upstream.idle"), waiter(2, 1, "rib.writer")],
        threads,
    };
    dog.judge(&obs, &seen.hooks);
    let wedge = seen.wedges.try_recv().unwrap();
    assert_eq!(wedge.what(), "deadlock");
    assert_eq!(stalls(&metrics, "deadlock"), 1);
    let text = std::fs::read_to_string(wedge.diagnostics.unwrap()).unwrap();
    for part in
        ["tern-fault-a (tid 501) holds rib.writer", "tern-fault-b (tid 502) holds upstream.idle", "worker-0"]
    {
        assert!(text.contains(part), "{part:?} in\n{text}");
    }
}

#[test]
fn a_retired_heartbeat_is_no_longer_watched_nor_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let (dog, metrics) = dog(Action::Log, tmp.path());
    let seen = hooks(1);
    let kept = dog.heartbeat("lifecycle");
    let worker = dog.heartbeat("worker-1");
    let clone = worker.clone();
    dog.judge(&look(&dog, &kept, 5), &seen.hooks);
    assert!(metrics.render().contains("tern_heartbeat_age_seconds{what=\"worker-1\"}"));
    drop(worker);
    assert_eq!(dog.status_json()["heartbeats"].as_array().unwrap().len(), 2, "a clone keeps it alive");
    drop(clone);
    dog.judge(&look(&dog, &kept, 2_500), &seen.hooks);
    let wedge = seen.wedges.try_recv().unwrap();
    assert_eq!(
        wedge.summary(),
        "heartbeat lifecycle is stale: last tick 2500 ms ago",
        "worker-1 drained and left"
    );
    let status = dog.status_json();
    let names: Vec<&str> =
        status["heartbeats"].as_array().unwrap().iter().map(|b| b["what"].as_str().unwrap()).collect();
    assert_eq!(names, ["lifecycle"]);
    let text = metrics.render();
    assert!(!text.contains("what=\"worker-1\""), "{text}");
    assert!(text.contains("tern_heartbeat_age_seconds{what=\"lifecycle\"} 2.5"), "{text}");
}

#[test]
fn status_shows_settings_and_heartbeat_ages() {
    let tmp = tempfile::tempdir().unwrap();
    let (dog, _) = dog(Action::Bounce, tmp.path());
    let _beat = dog.heartbeat("accept 127.0.0.1:8080");
    let status = dog.status_json();
    assert_eq!(status["action"], "bounce");
    assert_eq!(status["stall_after_ms"], 2000);
    assert_eq!(status["wedged"], false);
    assert_eq!(status["stalls"]["count"], 0);
    assert!(status["last_diagnostics"].is_null());
    assert_eq!(status["heartbeats"][0]["what"], "accept 127.0.0.1:8080");
    assert!(status["heartbeats"][0]["age_ms"].as_u64().unwrap() < 1_000);
    assert_eq!("log".parse::<Action>(), Ok(Action::Log));
    assert!("reboot".parse::<Action>().is_err());
}

#[test]
fn the_watchdog_thread_reports_a_runtime_whose_thread_is_blocked() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let stall_after = Duration::from_millis(100);
    let settings = Settings { stall_after, action: Action::Log, diagnostics_dir: tmp.path().to_path_buf() };
    let dog = Watchdog::new(settings, metrics.clone());
    // A runtime as tern makes them: its heartbeat idle while it is parked.
    let parking = Parking::default();
    let beat = dog.heartbeat_parked("test-worker-beat", parking.clone());
    let (block_tx, block_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let worker = std::thread::Builder::new()
        .name("test-worker".into())
        .spawn(move || {
            let rt =
                parking.install(tokio::runtime::Builder::new_current_thread().enable_all()).build().unwrap();
            rt.block_on(async move {
                tokio::spawn(keep_beating(beat));
                let _ = block_rx.await;
                // What /v1/debug/faults/block-worker does: the runtime's only thread stops.
                let _ = release_rx.recv();
            });
        })
        .unwrap();
    let seen = hooks(9);
    dog.start(seen.hooks).unwrap();
    assert!(dog.start(hooks(9).hooks).is_err(), "one watchdog thread");
    block_tx.send(()).unwrap();
    // Other tests' deliberate deadlocks share this process: look for ours.
    let wedge = loop {
        let w = seen.wedges.recv_timeout(Duration::from_secs(20)).expect("a wedge is reported");
        if w.findings
            .iter()
            .any(|f| matches!(f, Finding::Heartbeat { what, .. } if &**what == "test-worker-beat"))
        {
            break w;
        }
    };
    assert!(dog.is_wedged());
    assert!(stalls(&metrics, "heartbeat") >= 1);
    let text = std::fs::read_to_string(wedge.diagnostics.unwrap()).unwrap();
    assert!(text.contains("test-worker-beat  STALE"), "{text}");
    assert!(text.lines().any(|l| l.ends_with(" test-worker") && l.contains(" S ")), "{text}");
    assert!(text.contains("catalog generation 9"));
    release_tx.send(()).unwrap();
    worker.join().unwrap();
}

#[test]
fn a_deadlock_on_terns_own_rib_and_upstream_locks_starves_state_writes_and_is_named() {
    use crate::model::{MachineState, StateRow};
    use crate::rib::Rib;
    use crate::upstream::{Pool, PoolConfig};

    let tmp = tempfile::tempdir().unwrap();
    let rib = Arc::new(
        crate::rib::sqlite::SqliteRib::open(&tmp.path().join("tern.db"), Duration::from_secs(1)).unwrap(),
    );
    let config = PoolConfig {
        connect_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        max_idle_per_host: 4,
        max_connecting: 4,
        max_response_head: 16 * 1024,
    };
    let pool = Pool::new(config, Arc::new(Metrics::new()));
    // Port 9 of TEST-NET-1: never dialled, only its pool entry is locked.
    let addr = std::net::SocketAddr::from(([192, 0, 2, 9], 9));
    let first: faults::LockTaker = {
        let rib = rib.clone();
        Box::new(move |f| rib.hold_for_fault(f))
    };
    let second: faults::LockTaker = Box::new(move |f| pool.hold_for_fault(addr, f));
    faults::deadlock(first, second).unwrap();
    // Both fault threads wait on each other before the real work starts, or it could take
    // the writer lock first, write, and never wait at all.
    let waiting_names = || {
        let mut s = lock::snapshot(&mut lock::HoldDates::default(), now_ms());
        s.retain_locks(|n| n == "rib.writer" || n == "upstream.idle");
        let named = |t: &u32| s.threads.get(t).map(|i| i.name.to_string()).unwrap_or_default();
        let names: Vec<String> = s.waiting.iter().map(|w| named(&w.thread)).collect();
        (s, names)
    };
    while !["tern-fault-a", "tern-fault-b"].iter().all(|n| waiting_names().1.iter().any(|w| w == n)) {
        std::thread::yield_now();
    }
    // Real work: a machine's state record, written as the lifecycle manager writes it.
    let (done_tx, done_rx) = mpsc::channel();
    {
        let rib = rib.clone();
        std::thread::Builder::new()
            .name("test-state-write".into())
            .spawn(move || {
                let row = StateRow {
                    state: MachineState::Started,
                    version: 1,
                    reason: "wake".into(),
                    node: "n".into(),
                    at_ms: 0,
                };
                let _ = done_tx.send(rib.record_state("m-1", &row).is_ok());
            })
            .unwrap();
    }
    let mut snap = loop {
        let (s, waiting) = waiting_names();
        if ["tern-fault-a", "tern-fault-b", "test-state-write"].iter().all(|n| waiting.iter().any(|w| w == n))
        {
            break s;
        }
        std::thread::yield_now();
    };
    assert!(done_rx.try_recv().is_err(), "the state write is stuck behind the deadlock");
    // Other tests' threads may hold locks of the same names: keep ours.
    let ours: Vec<u32> = snap
        .threads
        .iter()
        .filter(|(_, t)| matches!(&*t.name, "tern-fault-a" | "tern-fault-b" | "test-state-write"))
        .map(|(&k, _)| k)
        .collect();
    snap.held.retain(|h| ours.contains(&h.holder));
    snap.waiting.retain(|w| ours.contains(&w.thread));
    let since = snap.waiting.iter().map(|w| w.since_ms).max().unwrap();
    let obs = Observation { now_ms: since + 250, locks: snap, ..Observation::default() };
    let found = check::check(&obs, Limits { stall_after_ms: 2_000, confirm_ms: 250, tick_ms: 0 });
    let [Finding::Deadlock { cycle }] = found.as_slice() else { panic!("{found:?}") };
    let mut locks: Vec<_> = cycle.iter().map(|l| l.holds).collect();
    locks.sort_unstable();
    assert_eq!(locks, ["rib.writer", "upstream.idle"]);
}

#[test]
fn a_parked_runtime_is_neither_judged_nor_woken_and_a_busy_one_is_asked_for_a_tick() {
    use futures_util::FutureExt;
    let tmp = tempfile::tempdir().unwrap();
    let (dog, _) = dog(Action::Log, tmp.path());
    let seen = hooks(1);
    let parking = Parking::default();
    let idle = dog.heartbeat_parked("catalog", parking.clone());
    parking.set(true);
    let busy = dog.heartbeat("worker-0");
    let obs = look(&dog, &busy, 5_000);
    assert!(!obs.is_idle(), "worker-0 is busy");
    dog.judge(&obs, &seen.hooks);
    let wedge = seen.wedges.try_recv().unwrap();
    assert_eq!(wedge.summary(), "heartbeat worker-0 is stale: last tick 5000 ms ago", "catalog is only idle");
    dog.poke(&obs);
    assert!(busy.0.poke.notified().now_or_never().is_some(), "the busy one is asked for a tick");
    assert!(idle.0.poke.notified().now_or_never().is_none(), "the parked one is left asleep");
    // A busy one that ticked within the tick is left alone too.
    busy.tick();
    dog.poke(&look(&dog, &busy, 10));
    assert!(busy.0.poke.notified().now_or_never().is_none());
    drop(busy);
    let obs = look(&dog, &idle, 60_000);
    assert!(obs.is_idle(), "all parked: the watchdog may look less often");
    assert_eq!(dog.status_json()["heartbeats"][0]["idle"], true);

    // An accept loop waiting for a connection is idle the same way.
    let accept = dog.heartbeat("accept 127.0.0.1:8080 (worker-0)");
    accept.idle();
    assert!(dog.beats_seen().iter().all(|b| b.parked));
    accept.busy();
    assert!(dog.beats_seen().iter().any(|b| !b.parked && &*b.what == "accept 127.0.0.1:8080 (worker-0)"));
}
