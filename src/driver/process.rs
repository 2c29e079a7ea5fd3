//! The `process` driver: a machine is a local process tern runs from its declared `cmd`.
//!
//! ```text
//!            start (spawn)                 suspend (SIGSTOP)
//!  stopped ───────────────▶ running ─────────────────────────▶ frozen
//!     ▲                      │   ▲                               │
//!     │  stop: SIGTERM, then │   └──── start (SIGCONT) ──────────┘
//!     │  SIGKILL after       │
//!     └── kill_timeout ──────┘   exits on its own ─▶ stopped, reported as
//!                                                    DriverEvent::Exited (never restarted)
//! ```
//!
//! Each machine runs in its own process group, so signals reach whatever its `cmd` spawns
//! (a shell's children too). stdout and stderr go to `<log_dir>/<machine id>.log`, appended.
//!
//! While a machine runs, `<log_dir>/<machine id>.pid` holds its process group and the
//! kernel's start time of its leader, and the same for the tern that runs it. If tern dies
//! without stopping its machines (a crash, SIGKILL), the next `tern serve` finds those files,
//! checks that the machine's process still runs and that the tern that started it does not
//! (start times guard against reused pids), and stops it before starting anything: otherwise
//! it would keep the machine's port and answer in place of the machine tern starts. A
//! machine of another tern that still runs is left alone, except the one that started this
//! process (an upgrade or a bounce): its machines are adopted, still running, and watched
//! by their start time since only their first parent can wait for them. The record's second
//! line (the machine's app, region, address and command) is what makes that possible.
//! The machine learns who it is from `FLY_MACHINE_ID`, `FLY_APP_NAME`, `FLY_REGION` and
//! `PORT`, as on Fly.io.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch};

use super::{BoxFuture, Driver, DriverError, DriverEvent, Target};

pub struct ProcessDriver {
    log_dir: PathBuf,
    procs: Arc<DashMap<Arc<str>, Proc>>,
    events: mpsc::UnboundedSender<DriverEvent>,
}

struct Proc {
    pgid: Pid,
    /// What it was started as, for stopping it when the catalog no longer holds it.
    target: Target,
    /// Turns true when the process has exited.
    exited: watch::Receiver<bool>,
    /// Set before tern stops it, so its exit is not reported as unexpected.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    frozen: bool,
}

impl ProcessDriver {
    pub fn new(log_dir: PathBuf, events: mpsc::UnboundedSender<DriverEvent>) -> Self {
        ProcessDriver { log_dir, procs: Arc::new(DashMap::new()), events }
    }

    fn signal(&self, id: &Arc<str>, pgid: Pid, sig: Signal) -> Result<(), DriverError> {
        match killpg(pgid, sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(DriverError::Signal { id: id.clone(), detail: format!("{sig}: {e}") }),
        }
    }

    async fn spawn(&self, m: &Target) -> Result<(), DriverError> {
        let Some(cmd) = m.cmd.as_ref().filter(|c| !c.is_empty()) else {
            return Err(DriverError::NotManaged(m.id.clone()));
        };
        let fail = |source: std::io::Error| DriverError::Spawn { id: m.id.clone(), source };
        tokio::fs::create_dir_all(&self.log_dir).await.map_err(fail)?;
        let log_path = self.log_dir.join(format!("{}.log", m.id));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(fail)?;
        let log2 = log.try_clone().map_err(fail)?;
        let mut child = tokio::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .env("FLY_MACHINE_ID", &*m.id)
            .env("FLY_APP_NAME", &*m.app)
            .env("FLY_REGION", &m.region)
            .env("PORT", m.addr.port().to_string())
            // What tern's own supervisor and successor use is not the machine's business.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("TERN_READY")
            .env_remove("TERN_LISTEN_ROLES")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(fail)?;
        let pid = child.id().ok_or_else(|| fail(std::io::Error::other("exited at once")))?;
        let pgid = Pid::from_raw(i32::try_from(pid).map_err(|_| fail(std::io::Error::other("pid")))?);
        let (tx, exited) = watch::channel(false);
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.procs.insert(
            m.id.clone(),
            Proc { pgid, target: m.clone(), exited, stopping: stopping.clone(), frozen: false },
        );
        let pid_path = self.log_dir.join(format!("{}.pid", m.id));
        let me = Pid::this();
        if let (Some(started), Some(my_start)) = (start_time(pgid), start_time(me)) {
            let record =
                format!("{} {started} {} {my_start}\n{}\n", pgid.as_raw(), me.as_raw(), target_json(m));
            if let Err(e) = std::fs::write(&pid_path, record) {
                tracing::warn!(target: "tern::driver", machine = %m.id, error = %e, "cannot record the machine's pid");
            }
        }
        tracing::info!(target: "tern::driver", machine = %m.id, pid, log = %log_path.display(), "machine process started");

        let exit = Exit {
            procs: self.procs.clone(),
            events: self.events.clone(),
            id: m.id.clone(),
            pgid,
            pid_path,
            tx,
            stopping,
        };
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            exit.exited(&status);
        });
        Ok(())
    }
}

impl Driver for ProcessDriver {
    fn manages(&self, m: &crate::model::MachineSpec) -> bool {
        m.cmd.as_ref().is_some_and(|c| !c.is_empty())
    }

    fn start<'a>(&'a self, m: &'a Target) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let frozen = self.procs.get_mut(&m.id).map(|mut p| {
                let was = p.frozen;
                p.frozen = false;
                (p.pgid, was)
            });
            match frozen {
                Some((pgid, true)) => self.signal(&m.id, pgid, Signal::SIGCONT),
                Some((_, false)) => Ok(()), // already running
                None => self.spawn(m).await,
            }
        })
    }

    fn stop<'a>(&'a self, m: &'a Target, kill_timeout: Duration) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let Some((pgid, mut exited, frozen)) = self.procs.get(&m.id).map(|p| {
                p.stopping.store(true, std::sync::atomic::Ordering::Release);
                (p.pgid, p.exited.clone(), p.frozen)
            }) else {
                return Ok(());
            };
            self.signal(&m.id, pgid, Signal::SIGTERM)?;
            if frozen {
                // A stopped process only sees SIGTERM once it runs again.
                self.signal(&m.id, pgid, Signal::SIGCONT)?;
            }
            let polite = tokio::time::timeout(kill_timeout, exited.wait_for(|e| *e)).await.is_ok();
            if !polite {
                tracing::warn!(target: "tern::driver", machine = %m.id, ?kill_timeout,
                    "machine ignored SIGTERM; sending SIGKILL");
                self.signal(&m.id, pgid, Signal::SIGKILL)?;
                let _ = exited.wait_for(|e| *e).await.is_ok();
            }
            Ok(())
        })
    }

    fn suspend<'a>(&'a self, m: &'a Target) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let Some(pgid) = self.procs.get_mut(&m.id).map(|mut p| {
                p.frozen = true;
                p.pgid
            }) else {
                return Ok(());
            };
            self.signal(&m.id, pgid, Signal::SIGSTOP)
        })
    }

    fn running(&self, id: &str) -> bool {
        self.procs.contains_key(id)
    }

    fn running_targets(&self) -> Vec<Target> {
        self.procs.iter().map(|p| p.target.clone()).collect()
    }

    fn clean_up_leftovers(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Ok(entries) = std::fs::read_dir(&self.log_dir) else { return };
            let mut stops = tokio::task::JoinSet::new();
            for path in entries.flatten().map(|e| e.path()) {
                if path.extension().is_none_or(|x| x != "pid") {
                    continue;
                }
                let Some(record) = read_record(&path) else {
                    let _ = std::fs::remove_file(&path);
                    continue;
                };
                let (owner, owner_started) = record.owner;
                if owner != Pid::this() && start_time(owner) == Some(owner_started) {
                    // The tern that started this one hands its machines over; any other
                    // tern that still runs keeps its own.
                    if owner == nix::unistd::getppid() {
                        let id =
                            path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                        let text = std::fs::read_to_string(&path).unwrap_or_default();
                        self.adopt(&id, &path, &record, &text);
                    }
                    continue;
                }
                let _ = std::fs::remove_file(&path);
                let (pgid, started) = record.machine;
                if start_time(pgid) != Some(started) {
                    continue; // gone, or the pid now belongs to someone else
                }
                let id = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                tracing::warn!(target: "tern::driver", machine = %id, pid = pgid.as_raw(),
                    "a machine process left by an earlier run of tern still runs; stopping it");
                stops.spawn(stop_leftover(pgid, started));
            }
            while stops.join_next().await.is_some() {}
        })
    }
}

/// What to do when a machine process ends, however tern learns of it (waiting for its own
/// child, or watching one it adopted).
struct Exit {
    procs: Arc<DashMap<Arc<str>, Proc>>,
    events: mpsc::UnboundedSender<DriverEvent>,
    id: Arc<str>,
    pgid: Pid,
    pid_path: PathBuf,
    tx: watch::Sender<bool>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Exit {
    fn exited(self, status: &str) {
        let Exit { procs, events, id, pgid, pid_path, tx, stopping } = self;
        // Only forget the entry if it is still this process (not a later start).
        if procs.remove_if(&id, |_, p| p.pgid == pgid).is_some()
            && read_record(&pid_path).is_some_and(|r| r.machine.0 == pgid)
        {
            // Still this process's record, not a later start's.
            let _ = std::fs::remove_file(&pid_path);
        }
        let _ = tx.send(true);
        if stopping.load(std::sync::atomic::Ordering::Acquire) {
            tracing::info!(target: "tern::driver", machine = %id, %status, "machine process stopped");
        } else {
            tracing::warn!(target: "tern::driver", machine = %id, %status, "machine process exited on its own");
            let _ = events.send(DriverEvent::Exited { id, status: status.to_string() });
        }
    }
}

/// A target as the second line of a `.pid` file, so a successor can adopt the machine.
fn target_json(t: &Target) -> String {
    serde_json::json!({ "app": &*t.app, "region": t.region, "addr": t.addr.to_string(), "cmd": t.cmd })
        .to_string()
}

fn target_from(id: &str, text: &str) -> Option<Target> {
    let v: serde_json::Value = serde_json::from_str(text.lines().nth(1)?).ok()?;
    Some(Target {
        id: Arc::from(id),
        app: Arc::from(v.get("app")?.as_str()?),
        region: v.get("region")?.as_str()?.to_string(),
        addr: v.get("addr")?.as_str()?.parse().ok()?,
        cmd: serde_json::from_value(v.get("cmd")?.clone()).ok()?,
    })
}

/// How often an adopted machine (not tern's child, so not waited for) is looked at.
const ADOPTED_POLL: Duration = Duration::from_millis(100);

impl ProcessDriver {
    /// Takes over a machine the tern that started this one runs (an upgrade or a bounce
    /// hands them over, still serving): its record names this process now, and its end is
    /// noticed by watching its start time, since only its first parent can wait for it.
    fn adopt(&self, id: &str, path: &std::path::Path, record: &Record, text: &str) -> bool {
        let Some(target) = target_from(id, text) else { return false };
        let (pgid, started) = record.machine;
        if start_time(pgid) != Some(started) {
            return false;
        }
        let me = Pid::this();
        let Some(my_start) = start_time(me) else { return false };
        let (tx, exited) = watch::channel(false);
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let frozen = proc_state(pgid) == Some('T');
        self.procs.insert(
            target.id.clone(),
            Proc { pgid, target: target.clone(), exited, stopping: stopping.clone(), frozen },
        );
        let line =
            format!("{} {started} {} {my_start}\n{}\n", pgid.as_raw(), me.as_raw(), target_json(&target));
        let _ = std::fs::write(path, line);
        tracing::info!(target: "tern::driver", machine = %id, pid = pgid.as_raw(), frozen,
            "adopted a machine process from the tern that started this one");
        let exit = Exit {
            procs: self.procs.clone(),
            events: self.events.clone(),
            id: target.id.clone(),
            pgid,
            pid_path: path.to_path_buf(),
            tx,
            stopping,
        };
        tokio::spawn(async move {
            let mut every = tokio::time::interval(ADOPTED_POLL);
            while start_time(pgid) == Some(started) {
                every.tick().await;
            }
            exit.exited("ended (adopted: no status)");
        });
        true
    }
}

fn proc_state(pid: Pid) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw())).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// What a `.pid` file records: the machine's process group with its leader's start time,
/// and the tern that started it, likewise.
struct Record {
    machine: (Pid, u64),
    owner: (Pid, u64),
}

fn read_record(path: &std::path::Path) -> Option<Record> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut n = text.split_whitespace().map(str::parse::<u64>);
    let mut next = || n.next()?.ok();
    let pid = |v: u64| i32::try_from(v).ok().map(Pid::from_raw);
    Some(Record { machine: (pid(next()?)?, next()?), owner: (pid(next()?)?, next()?) })
}

/// How long a leftover machine gets between SIGTERM and SIGKILL (its app's `kill_timeout` is
/// not known yet at this point).
const LEFTOVER_KILL_TIMEOUT: Duration = Duration::from_secs(5);

async fn stop_leftover(pgid: Pid, started: u64) {
    let alive = || start_time(pgid) == Some(started);
    let _ = killpg(pgid, Signal::SIGTERM);
    let _ = killpg(pgid, Signal::SIGCONT); // a suspended one only sees SIGTERM once it runs
    let deadline = tokio::time::Instant::now() + LEFTOVER_KILL_TIMEOUT;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while alive() && tokio::time::Instant::now() < deadline {
        tick.tick().await;
    }
    if alive() {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
}

/// The kernel's start time of process `pid` (clock ticks since boot, `/proc/<pid>/stat`
/// field 22), or `None` if there is no such process. Not its parent's child any more, a
/// leftover becomes a zombie only briefly, and a zombie has no process group to signal.
fn start_time(pid: Pid) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw())).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in machine process in its own process group, as the driver starts them.
    fn machine_process() -> std::process::Child {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("sleep").arg("60").process_group(0).spawn().expect("sleep")
    }

    fn record(dir: &std::path::Path, id: &str, machine: &std::process::Child, owner: Pid) {
        let pgid = Pid::from_raw(i32::try_from(machine.id()).expect("pid"));
        let text = format!(
            "{} {} {} {}\n",
            pgid.as_raw(),
            start_time(pgid).expect("machine start"),
            owner.as_raw(),
            start_time(owner).unwrap_or(1),
        );
        std::fs::write(dir.join(format!("{id}.pid")), text).expect("write");
    }

    #[tokio::test]
    async fn leftovers_of_a_dead_tern_are_stopped_and_a_live_terns_machines_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (events, _rx) = mpsc::unbounded_channel();
        let driver = ProcessDriver::new(dir.path().to_path_buf(), events);
        // One machine whose tern still runs (this test's parent stands in for it)…
        let mut kept = machine_process();
        record(dir.path(), "kept", &kept, nix::unistd::getppid());
        // …and one whose tern is gone (a finished process stands in for it).
        let mut dead_tern = std::process::Command::new("true").spawn().expect("true");
        let dead = Pid::from_raw(i32::try_from(dead_tern.id()).expect("pid"));
        dead_tern.wait().expect("wait");
        let mut left = machine_process();
        record(dir.path(), "left", &left, dead);

        driver.clean_up_leftovers().await;
        let status = left.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGTERM));
        assert!(kept.try_wait().expect("try_wait").is_none(), "a live tern's machine keeps running");
        assert!(dir.path().join("kept.pid").exists() && !dir.path().join("left.pid").exists());
        kept.kill().expect("kill");
        let _ = kept.wait();
    }
}
