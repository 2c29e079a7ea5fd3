//! The diagnostics file a wedge leaves behind: what is wedged, every heartbeat's age, the
//! tracked locks held and waited for, and every thread of the process as the kernel sees it
//! (`/proc/self/task/*`: name, state, where it sleeps), so the file explains the wedge after
//! the process that had it is gone. Plain text, for a person first.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::check::{Finding, Observation};

/// What one report says.
pub struct Report<'a> {
    /// The wedges that caused this report.
    pub findings: &'a [Finding],
    pub obs: &'a Observation,
    pub stall_after_ms: u64,
    pub generation: u64,
    pub pid: u32,
    pub at_unix_ms: i64,
}

/// One thread of this process, from `/proc/self/task/<tid>/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub tid: i32,
    /// `comm`: the thread's name, as the kernel keeps it (15 bytes at most).
    pub name: String,
    /// The state letter of `stat`: R running, S sleeping, D in uninterruptible I/O, …
    pub state: char,
    /// The kernel function it sleeps in (`futex_wait_queue` for a blocked lock), or "-".
    pub wchan: String,
}

/// Every thread of this process; empty where there is no `/proc`.
pub fn tasks() -> Vec<Task> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut tasks: Vec<Task> = dir
        .filter_map(Result::ok)
        .filter_map(|e| {
            let tid: i32 = e.file_name().to_str()?.parse().ok()?;
            let read = |file: &str| std::fs::read_to_string(e.path().join(file)).unwrap_or_default();
            let name = read("comm").trim_end().to_string();
            // "tid (comm) S …": comm may hold spaces and parentheses, so the state is the
            // first field after the last ')'.
            let stat = read("stat");
            let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
            let wchan = read("wchan");
            let wchan = match wchan.trim() {
                "" | "0" => "-".to_string(),
                w => w.to_string(),
            };
            Some(Task { tid, name, state: state.unwrap_or('?'), wchan })
        })
        .collect();
    tasks.sort_by_key(|t| t.tid);
    tasks
}

/// The report's text, with `tasks` as the thread list.
pub fn render(r: &Report<'_>, tasks: &[Task]) -> String {
    let mut s = String::new();
    let now = r.obs.now_ms;
    let _ = writeln!(
        s,
        "tern watchdog: wedged at {} (unix ms {}), pid {}, catalog generation {}",
        utc(r.at_unix_ms),
        r.at_unix_ms,
        r.pid,
        r.generation
    );
    let _ = writeln!(s, "stall_after: {} ms\n\n== Wedged", r.stall_after_ms);
    for f in r.findings {
        let _ = writeln!(s, "- {}", f.summary());
    }
    let _ = writeln!(s, "\n== Heartbeats (age in ms; STALE: reported above)");
    let stale: Vec<u64> = r
        .findings
        .iter()
        .filter_map(|f| match f {
            Finding::Heartbeat { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    for b in &r.obs.beats {
        let age = b.age_ms(now);
        let mark = if stale.contains(&b.id) {
            "  STALE"
        } else if b.parked {
            "  (idle: parked, waiting for work)"
        } else {
            ""
        };
        let _ = writeln!(s, "{:>10}  {}{mark}", age, b.what);
    }
    render_locks(&mut s, r.obs);
    let _ = writeln!(s, "\n== Threads (/proc/self/task)\n{:>8}  state  {:<24}  name", "tid", "wchan");
    for t in tasks {
        let _ = writeln!(s, "{:>8}  {:<5}  {:<24}  {}", t.tid, t.state, t.wchan, t.name);
    }
    s
}

fn render_locks(s: &mut String, obs: &Observation) {
    let locks = &obs.locks;
    let _ = writeln!(s, "\n== Tracked locks held (held for at least, in ms)");
    if locks.held.is_empty() {
        let _ = writeln!(s, "(none)");
    }
    for h in &locks.held {
        let tid = locks.threads.get(&h.holder).map_or(String::new(), |t| format!(" (tid {})", t.tid));
        let _ = writeln!(
            s,
            "{:>10}  {} by {}{tid}",
            obs.now_ms.saturating_sub(h.since_ms),
            h.name,
            locks.thread_name(h.holder)
        );
        for w in locks.waiting.iter().filter(|w| w.lock == h.lock) {
            let waited = obs.now_ms.saturating_sub(w.since_ms);
            let _ = writeln!(s, "{:>10}    waiting: {} for {waited} ms", "", locks.thread_name(w.thread));
        }
    }
}

/// Writes `text` to `dir/wedge-<unix seconds>-<pid>.txt`, creating `dir`; a second report
/// in the same second gets `-2`, `-3`, … rather than replacing the first.
pub fn write(dir: &Path, at_unix_ms: i64, pid: u32, text: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let secs = at_unix_ms.div_euclid(1000);
    for n in 1..100 {
        let name = match n {
            1 => format!("wedge-{secs}-{pid}.txt"),
            n => format!("wedge-{secs}-{pid}-{n}.txt"),
        };
        let path = dir.join(name);
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut file) => {
                file.write_all(text.as_bytes())?;
                file.sync_all()?;
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "99 reports this second already"))
}

fn utc(unix_ms: i64) -> String {
    crate::clock::utc_millis(unix_ms)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::check::{BeatSeen, Limits, check};
    use super::super::lock::{HeldLock, LockSnapshot, ThreadInfo, Waiter};
    use super::*;

    #[test]
    fn every_thread_of_this_process_is_listed_from_proc_with_its_state() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let sleeper = std::thread::Builder::new()
            .name("diag-sleeper".into())
            .spawn(move || {
                let _ = rx.recv();
            })
            .unwrap();
        // Named before it runs; asleep in recv once the kernel says so.
        let task = loop {
            let found = tasks().into_iter().find(|t| t.name == "diag-sleeper");
            if let Some(t) = found.filter(|t| t.state == 'S') {
                break t;
            }
            std::thread::yield_now();
        };
        let me = tasks().into_iter().find(|t| t.tid == nix::unistd::gettid().as_raw()).unwrap();
        assert_eq!(me.state, 'R', "the thread reading /proc is running");
        assert!(!task.wchan.is_empty());
        drop(tx);
        sleeper.join().unwrap();
    }

    #[test]
    fn a_deadlock_report_names_the_locks_the_threads_and_the_stale_heartbeat() {
        let threads = [(1, "tern-fault-a"), (2, "tern-fault-b")]
            .into_iter()
            .map(|(t, n)| (t, ThreadInfo { name: Arc::from(n), tid: 100 + i32::try_from(t).unwrap() }))
            .collect();
        let held = |lock, name, holder| HeldLock { lock, name, holder, since_ms: 1_000, may_hold_ms: 0 };
        let obs = Observation {
            now_ms: 4_000,
            previous_ms: Some(3_750),
            beats: vec![
                BeatSeen { id: 1, what: Arc::from("worker-0"), last_ms: 1_500, parked: false },
                BeatSeen { id: 2, what: Arc::from("lifecycle"), last_ms: 3_990, parked: false },
            ],
            locks: LockSnapshot {
                held: vec![held(1, "rib.writer", 1), held(2, "upstream.idle", 2)],
                waiting: vec![
                    Waiter { thread: 1, lock: 2, name: "upstream.idle", since_ms: 1_001 },
                    Waiter { thread: 2, lock: 1, name: "rib.writer", since_ms: 1_001 },
                ],
                threads,
            },
        };
        let findings = check(&obs, Limits { stall_after_ms: 2_000, confirm_ms: 250, tick_ms: 0 });
        let report = Report {
            findings: &findings,
            obs: &obs,
            stall_after_ms: 2_000,
            generation: 42,
            pid: 77,
            at_unix_ms: 1_795_942_502_345,
        };
        let text = render(&report, &tasks());
        for part in [
            "wedged at 2026-11-29T08:55:02.345Z",
            "pid 77, catalog generation 42",
            "- deadlock: tern-fault-a (tid 101) holds rib.writer and waits for upstream.idle",
            "tern-fault-b (tid 102) holds upstream.idle and waits for rib.writer",
            "- heartbeat worker-0 is stale: last tick 2500 ms ago",
            "      2500  worker-0  STALE",
            "        10  lifecycle\n",
            "      3000  rib.writer by tern-fault-a (tid 101)",
            "waiting: tern-fault-b for 2999 ms",
        ] {
            assert!(text.contains(part), "missing {part:?} in\n{text}");
        }
        let me = nix::unistd::gettid().as_raw().to_string();
        assert!(text.lines().any(|l| l.trim_start().starts_with(&me)), "this thread is listed:\n{text}");
    }

    #[test]
    fn reports_land_in_the_directory_named_by_time_and_pid_without_replacing_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("diagnostics");
        let first = write(&nested, 1_795_942_502_345, 77, "one").unwrap();
        let second = write(&nested, 1_795_942_502_999, 77, "two").unwrap();
        assert_eq!(first, nested.join("wedge-1795942502-77.txt"));
        assert_eq!(second, nested.join("wedge-1795942502-77-2.txt"));
        assert_eq!(std::fs::read_to_string(first).unwrap(), "one");
    }

    #[test]
    fn utc_dates_are_right_across_leap_days() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
    }
}
