//! The watchdog: turns a wedged tern (deadlocked locks, a blocked runtime thread, a task
//! spinning at 100% CPU) into a short blip that explains itself.
//!
//! It runs on one OS thread of its own, `tern-watchdog`, never on a runtime it watches. A
//! wedge is:
//! - a heartbeat older than `stall_after`: each runtime and loop worth watching registers
//!   one ([`Watchdog::heartbeat`]). A runtime's heartbeat ticks whenever its thread parks or
//!   unparks ([`Parking`]), and when the watchdog asks a busy one that has not for a tick
//!   (`stall_after / 20`) ([`keep_beating`]); a parked runtime is idle, not wedged, and is
//!   neither judged nor woken;
//! - a cycle among tracked locks ([`lock`]): a deadlock, reported as soon as every thread
//!   in it has waited one period, not after `stall_after`;
//! - a tracked lock held longer than `stall_after`.
//!
//! The watchdog looks every `stall_after / 40` while anything is busy (a runtime unparked, a
//! tracked lock held or waited for), and every `stall_after / 4` while all is idle, so an
//! idle node is woken a few times a second in all rather than hundreds: a runtime that
//! unparks and wedges is seen busy at the next look, well before it can be stale, and
//! judged as closely from then on.
//!
//! On a wedge, in this order: a diagnostics file ([`diagnostics`]), a count
//! (`tern_watchdog_stalls_total{what}`), [`Watchdog::is_wedged`] turns true (so `/healthz`
//! answers 503), then the `on_wedge` hook, once, which carries out the configured
//! [`Action`]. With [`Action::Log`] it keeps watching: a later, different wedge is reported
//! again, the same one never twice. Busy loops are the business of [`spin`], per connection.
//!
//! What it decides is a pure function ([`check::check`]) of what it saw and the time; the
//! thread is a thin loop around it.
//!
//! It imports nothing of tern's but `telemetry` and `clock` (leaves). Nothing imports it
//! except the composition root, and [`lock`] (the tracked mutex tern's own locks use).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use crate::telemetry::Metrics;

pub mod check;
pub mod diagnostics;
pub mod faults;
pub mod lock;
pub mod spin;

use check::{BeatSeen, Finding, Limits, Observation};

/// What to do about a wedge: the `on_wedge` hook does it; the watchdog only reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Action {
    /// Hand the listening sockets to a fresh tern and end this one.
    #[default]
    Bounce,
    /// Exit non-zero, for a supervisor (systemd) to restart.
    Exit,
    /// Only report, and keep watching.
    Log,
}

impl Action {
    /// As `[watchdog] action` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Bounce => "bounce",
            Action::Exit => "exit",
            Action::Log => "log",
        }
    }
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bounce" => Ok(Action::Bounce),
            "exit" => Ok(Action::Exit),
            "log" => Ok(Action::Log),
            other => Err(format!("unknown watchdog action {other:?}: expected bounce, exit or log")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// A heartbeat or lock making no progress this long is a wedge.
    pub stall_after: Duration,
    pub action: Action,
    /// Where diagnostics files go (created when the first one is written).
    pub diagnostics_dir: PathBuf,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            stall_after: Duration::from_secs(2),
            action: Action::Bounce,
            diagnostics_dir: "diagnostics".into(),
        }
    }
}

/// What the watchdog thread calls out to; it owns them.
pub struct Hooks {
    /// Called once per wedge reported (with [`Action::Bounce`] or [`Action::Exit`], once in
    /// all), after the diagnostics file is written and `is_wedged` turned true.
    pub on_wedge: Box<dyn Fn(&Wedge) + Send>,
    /// The catalog generation, for the diagnostics file.
    pub generation: Box<dyn Fn() -> u64 + Send>,
}

/// A reported wedge.
#[derive(Clone, Debug)]
pub struct Wedge {
    /// What was found wedged, the cause first (a deadlock before the heartbeat it starves).
    pub findings: Vec<Finding>,
    /// The diagnostics file, unless it could not be written (that is logged).
    pub diagnostics: Option<PathBuf>,
    pub at_unix_ms: i64,
}

impl Wedge {
    /// The `what` of the first finding: "deadlock", "lock_held" or "heartbeat".
    pub fn what(&self) -> &'static str {
        self.findings.first().map_or("heartbeat", Finding::what)
    }

    /// One line per finding.
    pub fn summary(&self) -> String {
        self.findings.iter().map(Finding::summary).collect::<Vec<_>>().join("\n")
    }
}

/// Milliseconds on the real monotonic clock, since the first call in this process.
///
/// `std::time::Instant`, not tokio's: a wedge is a real-time matter, the watchdog thread
/// has no runtime, and a runtime with paused time (tests) must look neither fresh nor
/// stale to it. CLOCK_MONOTONIC stops while the machine sleeps, so a suspend is no stall.
#[allow(clippy::disallowed_types)] // see above: tokio's paused clock must not reach the watchdog
pub fn now_ms() -> u64 {
    static BASE: OnceLock<std::time::Instant> = OnceLock::new();
    let base = *BASE.get_or_init(std::time::Instant::now);
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Whether a runtime's thread is parked: waiting in its driver for I/O or a timer, with no
/// task to run. A parked runtime is idle, not wedged (anything for it to do wakes it), so the
/// watchdog neither judges its heartbeat nor wakes it. Kept by the runtime's own park hooks
/// ([`Parking::install`]): a clock read and two relaxed stores per park and per unpark.
#[derive(Clone, Default)]
pub struct Parking(Arc<ParkCell>);

#[derive(Default)]
struct ParkCell {
    parked: AtomicBool,
    /// When it last parked or unparked ([`now_ms`]): either is a sign of life.
    changed_ms: AtomicU64,
}

impl Parking {
    /// Keeps this up to date from `builder`'s runtime, which must have one thread (a
    /// current-thread runtime, or a multi-thread one with one worker).
    pub fn install<'b>(&self, builder: &'b mut tokio::runtime::Builder) -> &'b mut tokio::runtime::Builder {
        let (park, unpark) = (self.clone(), self.clone());
        builder.on_thread_park(move || park.set(true)).on_thread_unpark(move || unpark.set(false))
    }

    /// The time first, then the flag (released): whoever sees the flag change sees the time.
    fn set(&self, parked: bool) {
        self.0.changed_ms.store(now_ms(), Ordering::Relaxed);
        self.0.parked.store(parked, Ordering::Release);
    }

    fn parked(&self) -> bool {
        self.0.parked.load(Ordering::Acquire)
    }

    fn changed_ms(&self) -> u64 {
        self.0.changed_ms.load(Ordering::Relaxed)
    }
}

/// One registered heartbeat.
struct BeatCell {
    id: u64,
    what: Arc<str>,
    last_ms: AtomicU64,
    /// Whether what ticks it is waiting, not working: a parked runtime, an accept loop
    /// awaiting a connection.
    parking: Parking,
    /// The watchdog's request for a tick ([`keep_beating`] answers it).
    poke: tokio::sync::Notify,
}

impl BeatCell {
    /// As the watchdog sees it now: parked, and the latest sign of life.
    fn seen(&self) -> (bool, u64) {
        let parked = self.parking.parked();
        (parked, self.last_ms.load(Ordering::Relaxed).max(self.parking.changed_ms()))
    }
}

/// A named heartbeat. Clones tick the same heartbeat; when the last clone drops, the
/// heartbeat is retired (no longer watched: a worker that finished draining is not wedged).
#[derive(Clone)]
pub struct Beat(Arc<BeatCell>);

impl Beat {
    /// Says "still alive": one relaxed store of the monotonic clock.
    #[inline]
    pub fn tick(&self) {
        self.0.last_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub fn what(&self) -> &str {
        &self.0.what
    }

    /// What ticks it is waiting for something outside (a connection to accept), not
    /// working: not judged until [`busy`](Self::busy).
    #[inline]
    pub fn idle(&self) {
        self.0.parking.set(true);
    }

    /// Working again (a tick).
    #[inline]
    pub fn busy(&self) {
        self.0.parking.set(false);
    }
}

impl std::fmt::Debug for Beat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Beat").field(&self.0.what).finish()
    }
}

/// Ticks `beat` now and whenever the watchdog asks, forever: spawn it on each runtime being
/// watched. The watchdog asks a runtime that is not parked and went a tick without a sign
/// of life; if the runtime's threads are all blocked, or one task never yields on a
/// single-threaded runtime, this task is not polled and the heartbeat goes stale. Nothing
/// here wakes an idle runtime.
pub async fn keep_beating(beat: Beat) {
    loop {
        beat.tick();
        beat.0.poke.notified().await;
    }
}

/// Reports seen, for `/v1/watchdog`.
#[derive(Default)]
struct Record {
    stalls: u64,
    last: Option<(&'static str, i64, String)>,
    last_file: Option<PathBuf>,
    /// Keys of the wedges reported and still seen: each is reported once.
    reported: BTreeSet<String>,
    /// `on_wedge` was called (with Bounce or Exit, it is not called again).
    acted: bool,
    /// Heartbeats with an age gauge, so a retired one's series is removed.
    gauged: BTreeSet<Arc<str>>,
}

pub struct Watchdog {
    settings: Settings,
    metrics: Arc<Metrics>,
    beats: parking_lot::Mutex<Vec<Weak<BeatCell>>>,
    next_beat: AtomicU64,
    wedged: AtomicBool,
    started: AtomicBool,
    record: parking_lot::Mutex<Record>,
    hold_dates: parking_lot::Mutex<lock::HoldDates>,
}

impl Watchdog {
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Arc<Watchdog> {
        Arc::new(Watchdog {
            settings,
            metrics,
            beats: parking_lot::Mutex::new(Vec::new()),
            next_beat: AtomicU64::new(1),
            wedged: AtomicBool::new(false),
            started: AtomicBool::new(false),
            record: parking_lot::Mutex::new(Record::default()),
            hold_dates: parking_lot::Mutex::new(lock::HoldDates::default()),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Registers a heartbeat named `what` ("worker-0", "lifecycle", "catalog",
    /// "accept 127.0.0.1:8080"), ticked now. Names need not be unique.
    pub fn heartbeat(&self, what: &str) -> Beat {
        self.heartbeat_parked(what, Parking::default())
    }

    /// A runtime's heartbeat: [`heartbeat`](Self::heartbeat), not judged while `parking`
    /// (installed on the runtime) says its thread is parked.
    pub fn heartbeat_parked(&self, what: &str, parking: Parking) -> Beat {
        let cell = Arc::new(BeatCell {
            id: self.next_beat.fetch_add(1, Ordering::Relaxed),
            what: Arc::from(what),
            last_ms: AtomicU64::new(now_ms()),
            parking,
            poke: tokio::sync::Notify::new(),
        });
        let mut beats = self.beats.lock();
        beats.retain(|b| b.strong_count() > 0);
        beats.push(Arc::downgrade(&cell));
        Beat(cell)
    }

    /// Whether a wedge was reported: for good with Bounce or Exit (this process is on its
    /// way out), while one is still seen with Log.
    pub fn is_wedged(&self) -> bool {
        self.wedged.load(Ordering::Relaxed)
    }

    /// How often the watchdog looks while anything is busy.
    pub fn period(&self) -> Duration {
        (self.settings.stall_after / 40).max(Duration::from_millis(1))
    }

    /// How often it looks while every heartbeat is parked and no tracked lock is held: a
    /// runtime that unparks and wedges meanwhile is seen busy at the next look, three
    /// quarters of `stall_after` before it could be called stale, and watched closely from
    /// then on.
    pub fn idle_period(&self) -> Duration {
        (self.settings.stall_after / 4).max(Duration::from_millis(1))
    }

    /// How long a busy heartbeat may go without a tick before the watchdog asks for one
    /// ([`keep_beating`]): 20 times per `stall_after`, so a stall is seen within a twentieth
    /// of it.
    pub fn tick_period(&self) -> Duration {
        (self.settings.stall_after / 20).max(Duration::from_millis(1))
    }

    fn limits(&self) -> Limits {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Limits {
            stall_after_ms: ms(self.settings.stall_after),
            confirm_ms: ms(self.period()),
            tick_ms: ms(self.tick_period()),
        }
    }

    /// Starts the `tern-watchdog` thread. It ends when the watchdog is dropped. A second
    /// call is refused.
    pub fn start(self: &Arc<Self>, hooks: Hooks) -> std::io::Result<()> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the watchdog is already running",
            ));
        }
        let me = Arc::downgrade(self);
        let (busy, idle) = (self.period(), self.idle_period());
        let spawned = std::thread::Builder::new().name("tern-watchdog".into()).spawn(move || {
            let mut previous = None;
            let mut period = busy;
            loop {
                std::thread::sleep(period);
                let Some(dog) = me.upgrade() else { return };
                let obs = dog.observe(now_ms(), previous);
                previous = Some(obs.now_ms);
                period = if obs.is_idle() { idle } else { busy };
                dog.poke(&obs);
                let looked =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dog.judge(&obs, &hooks)));
                if looked.is_err() {
                    // A hook that panics must not end the watching; counted, logged, on.
                    dog.metrics.task_panics.with_label_values(&["watchdog"]).inc();
                    tracing::error!(target: "tern::watchdog", "a watchdog hook panicked; still watching");
                }
            }
        });
        if let Err(e) = spawned {
            self.started.store(false, Ordering::SeqCst);
            return Err(e);
        }
        tracing::info!(target: "tern::watchdog", stall_after_ms = self.limits().stall_after_ms,
            action = self.settings.action.as_str(), "watchdog started");
        Ok(())
    }

    /// Heartbeats and tracked locks as they are at `now_ms` (which dates holds seen for the
    /// first time: pass the real [`now_ms`]).
    pub fn observe(&self, now_ms: u64, previous_ms: Option<u64>) -> Observation {
        let locks = lock::snapshot(&mut self.hold_dates.lock(), now_ms);
        Observation { now_ms, previous_ms, beats: self.beats_seen(), locks }
    }

    fn beats_seen(&self) -> Vec<BeatSeen> {
        let mut beats = self.beats.lock();
        beats.retain(|b| b.strong_count() > 0);
        beats
            .iter()
            .filter_map(Weak::upgrade)
            .map(|b| {
                let (parked, last_ms) = b.seen();
                BeatSeen { id: b.id, what: b.what.clone(), last_ms, parked }
            })
            .collect()
    }

    /// Asks every busy heartbeat that went a tick without a sign of life in `obs` for one.
    fn poke(&self, obs: &Observation) {
        let tick_ms = self.limits().tick_ms;
        let due: BTreeSet<u64> = obs
            .beats
            .iter()
            .filter(|b| !b.parked && obs.now_ms.saturating_sub(b.last_ms) >= tick_ms)
            .map(|b| b.id)
            .collect();
        if due.is_empty() {
            return;
        }
        for b in self.beats.lock().iter().filter_map(Weak::upgrade) {
            if due.contains(&b.id) {
                b.poke.notify_one();
            }
        }
    }

    /// One look: updates the age gauges, and reports what is newly wedged in `obs`.
    pub fn judge(&self, obs: &Observation, hooks: &Hooks) {
        let findings = check::check(obs, self.limits());
        self.gauge_ages(obs);
        let fresh: Vec<Finding> = {
            let mut record = self.record.lock();
            let seen: BTreeSet<String> = findings.iter().map(Finding::key).collect();
            record.reported.retain(|k| seen.contains(k));
            if self.settings.action == Action::Log {
                self.wedged.store(!findings.is_empty(), Ordering::Relaxed);
            }
            if record.acted && self.settings.action != Action::Log {
                return;
            }
            let fresh: Vec<Finding> =
                findings.into_iter().filter(|f| !record.reported.contains(&f.key())).collect();
            record.reported.extend(fresh.iter().map(Finding::key));
            fresh
        };
        if !fresh.is_empty() {
            self.report(fresh, obs, hooks);
        }
    }

    /// Writes the diagnostics, counts, marks wedged, then calls the hook: in that order, so
    /// whatever the hook does (exit at once) the evidence is already on disk.
    fn report(&self, findings: Vec<Finding>, obs: &Observation, hooks: &Hooks) {
        let at_unix_ms = crate::clock::unix_ms();
        let pid = std::process::id();
        // A panicking hook must not cost the report (the file matters more than the number).
        let generation =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (hooks.generation)())).unwrap_or(0);
        let report = diagnostics::Report {
            findings: &findings,
            obs,
            stall_after_ms: self.limits().stall_after_ms,
            generation,
            pid,
            at_unix_ms,
        };
        let text = diagnostics::render(&report, &diagnostics::tasks());
        let file = match diagnostics::write(&self.settings.diagnostics_dir, at_unix_ms, pid, &text) {
            Ok(path) => Some(path),
            Err(e) => {
                tracing::error!(target: "tern::watchdog", dir = %self.settings.diagnostics_dir.display(),
                    error = %e, "cannot write the diagnostics file; the report follows in the log");
                None
            }
        };
        for f in &findings {
            self.metrics.watchdog_stalls.with_label_values(&[f.what()]).inc();
        }
        self.wedged.store(true, Ordering::Relaxed);
        let wedge = Wedge { findings, diagnostics: file, at_unix_ms };
        tracing::error!(target: "tern::watchdog", what = wedge.what(), file = ?wedge.diagnostics,
            action = self.settings.action.as_str(), "wedged: {}", wedge.summary());
        if wedge.diagnostics.is_none() {
            tracing::error!(target: "tern::watchdog", "{text}");
        }
        {
            let mut record = self.record.lock();
            record.stalls += wedge.findings.len() as u64;
            record.last = Some((wedge.what(), at_unix_ms, wedge.summary()));
            record.last_file.clone_from(&wedge.diagnostics);
            record.acted = true;
        }
        (hooks.on_wedge)(&wedge);
    }

    fn gauge_ages(&self, obs: &Observation) {
        let gauge = &self.metrics.heartbeat_age;
        let now: BTreeSet<Arc<str>> = obs.beats.iter().map(|b| b.what.clone()).collect();
        for b in &obs.beats {
            #[allow(clippy::cast_precision_loss)] // ages are far below 2^52 ms
            gauge.with_label_values(&[&*b.what]).set(b.age_ms(obs.now_ms) as f64 / 1000.0);
        }
        let mut record = self.record.lock();
        for gone in record.gauged.difference(&now) {
            let _ = gauge.remove_label_values(&[&**gone]);
        }
        record.gauged = now;
    }

    /// For `GET /v1/watchdog`: every heartbeat's age, the settings, the stalls seen, the
    /// last diagnostics file, and whether tern is wedged.
    pub fn status_json(&self) -> serde_json::Value {
        let now = now_ms();
        let beats: Vec<serde_json::Value> = self
            .beats_seen()
            .iter()
            .map(|b| serde_json::json!({ "what": &*b.what, "age_ms": b.age_ms(now), "idle": b.parked }))
            .collect();
        let record = self.record.lock();
        let last = record.last.as_ref().map(
            |(what, at, summary)| serde_json::json!({ "what": what, "at_unix_ms": at, "summary": summary }),
        );
        serde_json::json!({
            "wedged": self.is_wedged(),
            "stall_after_ms": self.limits().stall_after_ms,
            "action": self.settings.action.as_str(),
            "heartbeats": beats,
            "stalls": { "count": record.stalls, "last": last },
            "last_diagnostics": record.last_file.as_ref().map(|p| p.display().to_string()),
        })
    }
}

#[cfg(test)]
mod tests;
