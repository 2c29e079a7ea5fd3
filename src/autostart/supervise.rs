//! The supervisor: once a second it runs each app's health checks on its started machines
//! and decides whether to stop (or suspend) one of the machines this node runs.
//!
//! A machine's life as autostop sees it:
//!
//! ```text
//!              idle for auto_stop_after, or excess for auto_stop_after
//!              and no exchange in flight; never below min_machines_running
//!   started ─────────────────────────────────────────────▶ cordoned (out of rotation)
//!      ▲                                                        │ 50 ms for requests that
//!      │ an exchange began meanwhile: back in rotation          │ picked it just before
//!      ├────────────────────────────────────────────────────────┤
//!      │                                                        ▼
//!      │  wake (a request)                         stopping / suspending ──▶ stopped / suspended
//!      └────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Per app and region, with N started machines passing their checks (a failing one is
//! neither counted nor stopped), of which `over_soft` are at or over the soft limit, the
//! excess is N − (over_soft + 1) for N > 1, and for a lone machine 1 if it has nothing in
//! flight, else 0 (fly-proxy's rule). While the excess is at least 1 and more
//! than `min_machines_running` machines run in the region (the app's `primary_region` only,
//! when it names one, as fly-proxy counts it; every region when it names none), one machine
//! per pass is stopped:
//! one that has been idle (nothing in flight) for `auto_stop_after`, or, once the excess
//! has lasted `auto_stop_after` with every machine busy now and then, one with nothing in
//! flight at that moment. An open stream or WebSocket is an exchange in flight, so a machine
//! holding one is never chosen. Only machines this node's driver runs are stopped.
//!
//! A machine declared `stopped` while its process runs is retired on the next pass:
//!
//! ```text
//!   running, declared stopped ──▶ streams asked to end cleanly ──▶ in-flight requests
//!   (already out of routing)      (SSE at an event boundary,       drain (≤ DRAIN) ──▶ process
//!                                  WebSockets: close frame 1001)                      stopped
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::catalog::{AppEntry, Machine};
use crate::model::{AutoStop, MachineState};

use super::{Lifecycle, checks};

/// How often the supervisor looks at every app.
const TICK: Duration = Duration::from_secs(1);

/// Apps a pass looks at between two yields to the runtime.
const YIELD_EVERY: usize = 4096;

/// Machines whose states the `tern_machines` gauges count on every pass; a catalog N times
/// bigger has them counted every N + 1 passes (a minute apart at 3M machines).
const COUNTED: usize = 50_000;

/// How long a cordoned machine waits for requests that chose it just before.
const CORDON: Duration = Duration::from_millis(50);

/// How long a machine being retired (shed under load, declared stopped, removed) may take
/// to finish its exchanges.
pub(super) const DRAIN: Duration = Duration::from_secs(10);

/// The machines autostop keeps running in `region`: `min_machines_running` in the app's
/// primary region (in every region when the app names none), none elsewhere.
fn min_running_in(spec: &crate::model::AppSpec, region: &str) -> u32 {
    match spec.primary_region.as_deref() {
        Some(primary) if !primary.eq_ignore_ascii_case(region) => 0,
        _ => spec.min_machines_running,
    }
}

/// What the autostop decision needs to know about one machine.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View {
    pub started: bool,
    /// This node may stop it (its driver runs it) and it is in rotation.
    pub stoppable: bool,
    pub load: u32,
    /// When its last exchange ended; `None` while one is in flight.
    pub idle_since_ms: Option<u64>,
}

/// Autostop's limits for one app.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rule {
    pub soft_limit: u32,
    pub min_running: u32,
    pub window_ms: u64,
}

/// Which machine of one app's region to stop now, if any, and whether it must first drain
/// (it may have exchanges in flight). `excess_since` is when the region last began to have
/// excess capacity; it is kept across passes and reset by this function.
pub(crate) fn choose_stop(
    views: &[View],
    rule: Rule,
    now_ms: u64,
    excess_since: &mut Option<u64>,
) -> Option<(usize, bool)> {
    let started: Vec<(usize, &View)> = views.iter().enumerate().filter(|(_, v)| v.started).collect();
    let n = started.len();
    let excess = match started.as_slice() {
        [] => 0,
        [(_, only)] => usize::from(only.load == 0),
        many => {
            let over_soft = many.iter().filter(|(_, v)| v.load >= rule.soft_limit).count();
            n.saturating_sub(over_soft + 1)
        }
    };
    if excess == 0 || n <= rule.min_running as usize {
        *excess_since = None;
        return None;
    }
    let since = *excess_since.get_or_insert(now_ms);
    let quiet = |v: &View| v.stoppable && v.load == 0 && v.idle_since_ms.is_some();
    let longest_idle = |ok: &dyn Fn(&View) -> bool| {
        started.iter().filter(|(_, v)| ok(v)).min_by_key(|(_, v)| v.idle_since_ms)
    };
    let idle_for_window =
        |v: &View| quiet(v) && v.idle_since_ms.is_some_and(|t| now_ms.saturating_sub(t) >= rule.window_ms);
    if let Some((i, _)) = longest_idle(&idle_for_window) {
        *excess_since = None;
        return Some((*i, false));
    }
    // Excess that lasted a window while traffic touched every machine: shed the least loaded
    // (never a lone machine: it goes only when idle for the window).
    if n > 1 && now_ms.saturating_sub(since) >= rule.window_ms {
        let least =
            started.iter().filter(|(_, v)| v.stoppable).min_by_key(|(_, v)| (v.load, v.idle_since_ms));
        if let Some((i, _)) = least {
            *excess_since = None;
            return Some((*i, true));
        }
    }
    None
}

impl Lifecycle {
    /// Runs checks and autostop until `shutdown`.
    pub async fn supervise(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut excess_since: HashMap<(Arc<str>, String), u64> = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pass: u64 = 0;
        loop {
            tokio::select! {
                () = crate::shutdown::requested(&mut shutdown) => break,
                _ = tick.tick() => {}
            }
            crate::tasks::fault_point("supervisor");
            let snap = self.catalog.load_full();
            let now = crate::clock::now_ms();
            let mut regions_seen = HashSet::new();
            // Autostop and declared stops act only on machines this node's driver runs: their
            // apps are all this looks at, however many the catalog holds.
            for app in self.apps_running_here(&snap) {
                if app.spec.auto_stop != AutoStop::Off {
                    self.autostop_pass(&app, now, &mut excess_since, &mut regions_seen);
                }
                self.retire_declared_stopped(&app);
            }
            excess_since.retain(|k, _| regions_seen.contains(k));
            // Health checks look at every app (one read each, for most), with a yield every so
            // many: a catalog of a million apps must not hold this runtime long enough to look
            // wedged. The machines gauges read every machine's state, a cache miss each at
            // millions: every pass up to COUNTED machines, every so many passes above.
            let count = pass % (snap.machine_count() / COUNTED + 1) as u64 == 0;
            let mut states = [0i64; 7];
            for (i, app) in snap.apps().enumerate() {
                if count {
                    for m in app.machines.iter() {
                        states[usize::from(m.state().code())] += 1;
                    }
                }
                if !app.spec.checks.is_empty() {
                    self.ensure_checks(app);
                }
                if i % YIELD_EVERY == YIELD_EVERY - 1 {
                    tokio::task::yield_now().await;
                }
            }
            pass += 1;
            self.sweep(&snap, pass);
            for (code, n) in states.iter().enumerate().filter(|_| count) {
                let state = MachineState::from_code(u8::try_from(code).unwrap_or(u8::MAX));
                self.metrics.machines.with_label_values(&[state.as_str()]).set(*n);
            }
            self.metrics.supervisor_passes.inc();
        }
        for c in self.checkers.iter() {
            c.value().abort();
        }
    }

    /// The apps of the machines this node's driver runs, as the catalog holds them now (a
    /// machine's app may have changed since it started).
    fn apps_running_here(&self, snap: &crate::catalog::Snapshot) -> Vec<Arc<AppEntry>> {
        let mut seen = HashSet::new();
        self.driver
            .running_targets()
            .iter()
            .filter_map(|t| snap.machine(&t.id))
            .filter(|m| seen.insert(m.spec.app.clone()))
            .filter_map(|m| snap.app(&m.spec.app).cloned())
            .collect()
    }

    fn autostop_pass(
        self: &Arc<Self>,
        app: &AppEntry,
        now: u64,
        excess_since: &mut HashMap<(Arc<str>, String), u64>,
        seen: &mut HashSet<(Arc<str>, String)>,
    ) {
        let mut by_region: HashMap<&str, Vec<&Arc<Machine>>> = HashMap::new();
        for m in app.machines.iter() {
            by_region.entry(m.region()).or_default().push(m);
        }
        for (region, machines) in by_region {
            let rule = Rule {
                soft_limit: app.spec.concurrency.soft_limit,
                min_running: min_running_in(&app.spec, region),
                window_ms: u64::try_from(app.spec.auto_stop_after.as_millis()).unwrap_or(u64::MAX),
            };
            let views: Vec<View> = machines
                .iter()
                .map(|m| View {
                    // A machine failing its checks is not running for the app: it does not
                    // count toward the minimum, and a check never stops a machine.
                    started: m.state() == MachineState::Started && m.live.healthy(),
                    stoppable: m.live.in_rotation() && self.driver.running(&m.id),
                    load: m.live.in_flight(),
                    idle_since_ms: m.live.idle_since_ms(),
                })
                .collect();
            let key = (app.name.clone(), region.to_string());
            let mut since = excess_since.get(&key).copied();
            let chosen = choose_stop(&views, rule, now, &mut since);
            match since {
                Some(t) => {
                    excess_since.insert(key.clone(), t);
                }
                None => {
                    excess_since.remove(&key);
                }
            }
            seen.insert(key);
            if let Some((i, drain)) = chosen {
                let m = machines[i].clone();
                m.live.set_in_rotation(false);
                let (this, spec) = (self.clone(), app.spec.clone());
                self.runtime.spawn(async move { this.autostop(&m, &spec, drain).await });
            }
        }
    }

    /// Stops (or suspends) a cordoned machine once nothing is in flight on it. An idle
    /// machine that took an exchange meanwhile, or an excess one still busy after `DRAIN`
    /// (an open stream, say), goes back into rotation instead.
    async fn autostop(&self, m: &Arc<Machine>, spec: &crate::model::AppSpec, drain: bool) {
        tokio::time::sleep(CORDON).await;
        if drain {
            let _ = tokio::time::timeout(DRAIN, until_no_exchange(m)).await;
        }
        let op = self.op_lock(&m.id);
        let _op = op.lock().await;
        if m.live.in_flight() > 0 || m.state() != MachineState::Started {
            m.live.set_in_rotation(true);
            return;
        }
        let idle_ms = m.live.idle_since_ms().map(|t| crate::clock::now_ms().saturating_sub(t));
        let target = crate::driver::Target::of(m);
        let suspended = if spec.auto_stop == AutoStop::Suspend {
            self.set_state(m, MachineState::Suspending, "autostop");
            match self.driver.suspend(&target).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(target: "tern::lifecycle", machine = %m.id, error = %e, "could not suspend; stopping instead");
                    false
                }
            }
        } else {
            false
        };
        if !suspended {
            self.set_state(m, MachineState::Stopping, "autostop");
            if let Err(e) = self.driver.stop(&target, spec.kill_timeout).await {
                tracing::warn!(target: "tern::lifecycle", machine = %m.id, error = %e, "could not stop machine");
            }
        }
        let (action, state) =
            if suspended { ("suspend", MachineState::Suspended) } else { ("stop", MachineState::Stopped) };
        self.set_state(m, state, "autostop");
        m.live.set_in_rotation(true);
        m.live.set_healthy(true);
        self.metrics.machine_actions.with_label_values(&[action, "autostop"]).inc();
        tracing::info!(target: "tern::lifecycle", machine = %m.id, app = %m.spec.app, to = state.as_str(),
            idle_ms, "autostop");
    }

    /// Stops the machines of `app` that were declared `stopped` (with `tern apply`, or in
    /// the RIB) while their process runs. Routing left them the moment the declaration
    /// arrived; here their requests get `DRAIN` to finish, their streams are ended cleanly
    /// (SSE at an event boundary, WebSockets with a close frame) and the process is stopped.
    fn retire_declared_stopped(self: &Arc<Self>, app: &AppEntry) {
        for m in app.machines.iter() {
            if m.state() != MachineState::Stopped || !self.driver.running(&m.id) {
                continue;
            }
            // Anything else acting on the machine (a wake, an autostop, an earlier pass)
            // holds its lock; the next pass looks again.
            let Ok(op) = self.op_lock(&m.id).try_lock_owned() else { continue };
            let (this, m, kill) = (self.clone(), m.clone(), app.spec.kill_timeout);
            self.runtime.spawn(async move {
                let _op = op;
                if m.state() != MachineState::Stopped || !this.driver.running(&m.id) {
                    return;
                }
                this.retire_process(&m, kill, "declared", || m.state() != MachineState::Stopped).await;
            });
        }
    }

    /// Retires a machine's process the way every planned stop does (a declared stop, a
    /// removal, a changed declaration): its streams are asked to end cleanly, its requests
    /// get up to `DRAIN` (less if tern shuts down: shutdown waits for them itself), then the
    /// driver stops it, counted as `stop`/`reason`. `keep`, asked after the drain, says the
    /// machine is wanted after all (declared again meanwhile): then it stays, and so do the
    /// streams it takes from now on. The caller holds the machine's lifecycle lock.
    pub(super) async fn retire_process(
        &self,
        m: &Machine,
        kill_timeout: Duration,
        reason: &'static str,
        keep: impl Fn() -> bool,
    ) {
        m.live.end_streams();
        let drained = tokio::select! {
            r = tokio::time::timeout(DRAIN, until_no_exchange(m)) => r.is_ok(),
            () = self.closing.cancelled() => false,
        };
        if keep() {
            m.live.resume_streams();
            return;
        }
        match self.driver.stop(&crate::driver::Target::of(m), kill_timeout).await {
            Ok(()) => {
                self.metrics.machine_actions.with_label_values(&["stop", reason]).inc();
                tracing::info!(target: "tern::lifecycle", machine = %m.id, app = %m.spec.app, drained, reason,
                    "stopped the machine's process");
            }
            Err(e) => {
                tracing::warn!(target: "tern::lifecycle", machine = %m.id, error = %e, reason,
                    "could not stop the machine's process");
            }
        }
    }

    /// Starts the check loop of every started machine of the app that has none yet.
    fn ensure_checks(self: &Arc<Self>, app: &AppEntry) {
        for m in app.machines.iter().filter(|m| m.state() == MachineState::Started && self.owns(&m.spec)) {
            // A loop that ended (its machine stopped) may not have removed its entry yet, or
            // may have ended before the entry was written: a finished one is replaced.
            let entry = self.checkers.entry(m.id.clone());
            if matches!(&entry, dashmap::Entry::Occupied(e) if !e.get().is_finished()) {
                continue;
            }
            let this = self.clone();
            let id = m.id.clone();
            let task = self.runtime.spawn(async move { this.check_loop(id).await });
            entry.insert(task.abort_handle());
        }
    }

    /// Checks one machine every interval while it is started and its app has checks; a
    /// failing machine is out of routing until it passes. Ends healthy, so a later start
    /// is judged afresh.
    async fn check_loop(self: Arc<Self>, id: Arc<str>) {
        let grace = self.app_of(&id).map_or(Duration::ZERO, |(_, app)| {
            app.spec.checks.iter().map(|c| c.grace_period).max().unwrap_or_default()
        });
        tokio::time::sleep(grace).await;
        while let Some((m, app)) = self.app_of(&id) {
            if m.state() != MachineState::Started || app.spec.checks.is_empty() {
                m.live.set_healthy(true);
                break;
            }
            let host = checks::host_for(&app.spec, m.addr);
            let version = m.live.state_version();
            let result = checks::all_pass(&app.spec.checks, m.addr, &host).await;
            if m.live.state_version() != version {
                // Stopped or restarted while probing: the answer is about another life.
                continue;
            }
            let pass = result.is_ok();
            let label = if pass { "pass" } else { "fail" };
            self.metrics.checks.with_label_values(&[&app.name, label]).inc();
            // A passing check is a machine that answers: a failed connect's ejection ends now.
            if pass && m.live.outlier().clear() {
                tracing::info!(target: "tern::lifecycle", machine = %m.id, app = %app.name,
                    "checks pass; ejection after failed connects lifted");
            }
            if pass != m.live.healthy() {
                match &result {
                    Ok(()) => tracing::info!(target: "tern::lifecycle", machine = %m.id, app = %app.name,
                        "checks pass again; back in routing"),
                    Err(why) => tracing::warn!(target: "tern::lifecycle", machine = %m.id, app = %app.name,
                        reason = %why, "check failed; out of routing until it passes"),
                }
                m.live.set_healthy(pass);
            }
            let every = app.spec.checks.iter().map(|c| c.interval).min().unwrap_or(Duration::from_secs(15));
            drop((m, app));
            tokio::time::sleep(every).await;
        }
        // Only this loop's own entry: a newer loop for the machine may have replaced it.
        if let Some(me) = tokio::task::try_id() {
            self.checkers.remove_if(&id, |_, h| h.id() == me);
        }
    }

    fn app_of(&self, id: &str) -> Option<(Arc<Machine>, Arc<AppEntry>)> {
        let snap = self.catalog.load();
        let m = snap.machine(id)?.clone();
        let app = snap.app(&m.spec.app)?.clone();
        Some((m, app))
    }
}

/// Resolves once the machine has no exchange in flight.
pub(super) async fn until_no_exchange(m: &Machine) {
    loop {
        let watch = m.live.watch();
        let ended = watch.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        if m.live.in_flight() == 0 {
            return;
        }
        ended.await;
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    const RULE: Rule = Rule { soft_limit: 10, min_running: 0, window_ms: 60_000 };

    fn idle(since: u64) -> View {
        View { started: true, stoppable: true, load: 0, idle_since_ms: Some(since) }
    }

    fn busy(load: u32) -> View {
        View { started: true, stoppable: true, load, idle_since_ms: None }
    }

    #[test]
    fn a_lone_idle_machine_stops_after_the_window_and_not_before() {
        let mut since = None;
        assert_eq!(choose_stop(&[idle(0)], RULE, 59_999, &mut since), None);
        assert_eq!(choose_stop(&[idle(0)], RULE, 60_000, &mut since), Some((0, false)));
        // A lone machine with anything in flight has no excess.
        let mut since = None;
        assert_eq!(choose_stop(&[busy(1)], RULE, 1_000_000, &mut since), None);
        assert_eq!(since, None);
    }

    #[test]
    fn a_lone_machine_with_regular_traffic_is_never_shed() {
        // A request every 30 s against a 60 s window: passes between requests see load 0,
        // but the machine is never idle for a whole window.
        let mut since = None;
        for t in (0..600_000u64).step_by(1_000) {
            let v = if t % 30_000 == 0 { busy(1) } else { idle(t - t % 30_000) };
            assert_eq!(choose_stop(&[v], RULE, t, &mut since), None, "at {t} ms");
        }
    }

    #[test]
    fn min_machines_running_counts_in_the_primary_region_only() {
        let spec = |extra: &str| -> crate::model::AppSpec {
            toml::from_str(&format!("name = \"a\"\nmin_machines_running = 2\n{extra}")).expect("app")
        };
        let with = spec("primary_region = \"ams\"");
        assert_eq!((min_running_in(&with, "ams"), min_running_in(&with, "fra")), (2, 0));
        let without = spec("");
        assert_eq!((min_running_in(&without, "ams"), min_running_in(&without, "fra")), (2, 2));
    }

    #[test]
    fn never_below_min_machines_running() {
        let rule = Rule { min_running: 2, ..RULE };
        let mut since = None;
        let two = [idle(0), idle(0)];
        assert_eq!(choose_stop(&two, rule, 10_000_000, &mut since), None);
        let three = [idle(0), idle(5), idle(0)];
        let (i, _) = choose_stop(&three, rule, 10_000_000, &mut since).unwrap();
        assert!(i == 0 || i == 2, "the longest idle goes first");
    }

    #[test]
    fn an_open_stream_is_activity() {
        // Two machines, one holding a stream (load 1) for hours: only the idle one may go.
        let views = [busy(1), idle(0)];
        let mut since = None;
        assert_eq!(choose_stop(&views, RULE, 10_000_000, &mut since), Some((1, false)));
        let views = [busy(1), View { started: false, ..idle(0) }];
        assert_eq!(choose_stop(&views, RULE, 10_000_000, &mut None), None, "and the last one never");
    }

    #[test]
    fn excess_under_load_is_shed_after_it_lasts_a_window() {
        // Three machines, none over soft: excess 2, but each is busy now and then, so none
        // is idle for the whole window. After a window of excess, one quiet one goes.
        let views = [busy(3), idle(150_000), busy(2)];
        let mut since = None;
        assert_eq!(choose_stop(&views, RULE, 100_500, &mut since), None);
        assert_eq!(since, Some(100_500));
        assert_eq!(choose_stop(&views, RULE, 160_499, &mut since), None);
        assert_eq!(
            choose_stop(&views, RULE, 160_500, &mut since),
            Some((1, true)),
            "the least loaded, drained"
        );
        // Steady load on every machine: still the least loaded one goes, after draining.
        let views = [busy(3), busy(1), busy(2)];
        let mut since = Some(0);
        assert_eq!(choose_stop(&views, RULE, 60_000, &mut since), Some((1, true)));
        assert_eq!(since, None, "one at a time: the clock starts over");
        // Every machine over soft: no excess, nothing stops.
        let hot = [busy(10), busy(12)];
        assert_eq!(choose_stop(&hot, RULE, 1_000_000, &mut since), None);
        assert_eq!(since, None);
    }

    #[test]
    fn machines_this_node_does_not_run_count_but_are_not_stopped() {
        let other = View { stoppable: false, ..idle(0) };
        assert_eq!(choose_stop(&[other, other], RULE, 10_000_000, &mut None), None);
        assert_eq!(choose_stop(&[other, idle(10)], RULE, 10_000_000, &mut None), Some((1, false)));
    }

    /// A mock driver (no processes in a unit test): records what it is asked to do.
    #[derive(Default)]
    pub(in crate::autostart) struct MockDriver {
        pub calls: parking_lot::Mutex<Vec<String>>,
        pub running: dashmap::DashSet<Arc<str>>,
    }

    impl crate::driver::Driver for MockDriver {
        fn manages(&self, _: &crate::model::MachineSpec) -> bool {
            true
        }
        fn start<'a>(
            &'a self,
            m: &'a crate::driver::Target,
        ) -> crate::driver::BoxFuture<'a, Result<(), crate::driver::DriverError>> {
            self.calls.lock().push(format!("start {}", m.id));
            self.running.insert(m.id.clone());
            Box::pin(async { Ok(()) })
        }
        fn stop<'a>(
            &'a self,
            m: &'a crate::driver::Target,
            _: Duration,
        ) -> crate::driver::BoxFuture<'a, Result<(), crate::driver::DriverError>> {
            self.calls.lock().push(format!("stop {}", m.id));
            self.running.remove(&m.id);
            Box::pin(async { Ok(()) })
        }
        fn suspend<'a>(
            &'a self,
            m: &'a crate::driver::Target,
        ) -> crate::driver::BoxFuture<'a, Result<(), crate::driver::DriverError>> {
            self.calls.lock().push(format!("suspend {}", m.id));
            Box::pin(async { Ok(()) })
        }
        fn running(&self, id: &str) -> bool {
            self.running.contains(id)
        }
        fn running_targets(&self) -> Vec<crate::driver::Target> {
            let target = |id: &Arc<str>| crate::driver::Target {
                id: id.clone(),
                app: Arc::from("a"),
                region: String::new(),
                addr: "127.0.0.1:1".parse().expect("addr"),
                cmd: None,
            };
            self.running.iter().map(|id| target(&id)).collect()
        }
    }

    /// A lifecycle over a mock driver and a real RIB, with one app `a` (its extra TOML
    /// given) and its machines (each with a `cmd`) in the given states.
    fn setup(
        app_toml: &str,
        machines: &[(&str, MachineState)],
    ) -> (tempfile::TempDir, Arc<MockDriver>, Arc<Lifecycle>) {
        setup_at(app_toml, machines, "127.0.0.1:1")
    }

    /// Like [`setup`], with every machine at `addr`.
    pub(in crate::autostart) fn setup_at(
        app_toml: &str,
        machines: &[(&str, MachineState)],
        addr: &str,
    ) -> (tempfile::TempDir, Arc<MockDriver>, Arc<Lifecycle>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let rib = crate::rib::sqlite::SqliteRib::open(&dir.path().join("rib.db"), Duration::from_millis(10))
            .expect("rib");
        let catalog = Arc::new(crate::catalog::Catalog::new());
        let mut snap = crate::catalog::Snapshot::default();
        let app: crate::model::AppSpec =
            toml::from_str(&format!("name = \"a\"\nhostnames = [\"a.test\"]\n{app_toml}")).expect("app");
        snap.apply(crate::catalog::Event::App(app));
        for (id, state) in machines {
            snap.apply(crate::catalog::Event::Machine(crate::model::MachineSpec {
                id: (*id).into(),
                app: "a".into(),
                region: "".into(),
                addr: addr.parse().expect("addr"),
                state: *state,
                cmd: Some(vec!["app".into()]),
                node: None,
            }));
        }
        catalog.publish(snap);
        let driver = Arc::new(MockDriver::default());
        let lifecycle = Lifecycle::new(
            driver.clone(),
            Arc::new(rib),
            catalog,
            crate::autostart::Site { node: Arc::from("node"), region: Arc::from(""), nearest: None },
            Arc::new(crate::telemetry::Metrics::new()),
            Arc::default(),
        );
        (dir, driver, lifecycle)
    }

    /// The supervisor on tokio's paused clock: only time matters here, so a test of minutes
    /// runs in milliseconds and cannot be flaky.
    #[tokio::test(start_paused = true)]
    async fn autostop_waits_out_the_window_and_any_open_exchange() {
        let (_dir, driver, lifecycle) =
            setup("auto_stop = \"stop\"\nauto_stop_after = \"60s\"", &[("m1", MachineState::Started)]);
        driver.running.insert(Arc::from("m1"));
        let catalog = lifecycle.catalog.clone();
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(lifecycle.clone().supervise(shutdown));
        let m = catalog.load().machine("m1").expect("m1").clone();

        // A stream open for ten minutes: the machine is busy all along.
        let stream = m.live.begin();
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(driver.calls.lock().is_empty(), "nothing stops a machine with an open stream");
        drop(stream);
        // The window starts when the stream ends.
        tokio::time::sleep(Duration::from_secs(58)).await;
        assert!(driver.calls.lock().is_empty(), "not before the idle window");
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(*driver.calls.lock(), ["stop m1"]);
        assert_eq!(m.state(), MachineState::Stopped);
        assert!(m.live.in_rotation(), "back in rotation, ready for the next wake");
    }

    /// A wake that is waiting for the machine's lock when tern shuts down (behind an autostop,
    /// say) must not start the machine after `stop_all` has run: it would outlive tern.
    #[tokio::test(start_paused = true)]
    async fn a_wake_queued_at_shutdown_starts_nothing() {
        let (_dir, driver, lifecycle) = setup("wake_timeout = \"30s\"", &[("m1", MachineState::Stopped)]);
        let app = lifecycle.catalog.load().app("a").expect("app").clone();
        // Something else holds the machine's lock, as an autostop in progress would.
        let busy = lifecycle.op_lock(&Arc::from("m1")).lock_owned().await;
        let held = tokio::spawn({
            let (lifecycle, app) = (lifecycle.clone(), app.clone());
            async move {
                lifecycle
                    .acquire(
                        &app,
                        Default::default(),
                        tokio::time::Instant::now() + Duration::from_secs(30),
                        true,
                    )
                    .await
                    .err()
            }
        });
        while !lifecycle.wakes.contains_key("m1") {
            tokio::task::yield_now().await;
        }
        let stopping = tokio::spawn({
            let lifecycle = lifecycle.clone();
            async move { lifecycle.stop_all().await }
        });
        drop(busy);
        stopping.await.expect("stop_all");
        let err = held.await.expect("held request").expect("the held request fails");
        assert!(err.to_string().contains("shutting down"), "{err}");
        let calls = driver.calls.lock().clone();
        assert!(calls.iter().all(|c| !c.starts_with("start")), "{calls:?}");
        assert!(driver.running.is_empty(), "no machine process outlives tern");
    }

    /// At shutdown every machine the driver runs is stopped, including one the catalog no
    /// longer holds (removed moments before, its retirement still draining).
    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_a_running_machine_the_catalog_no_longer_holds() {
        let (_dir, driver, lifecycle) = setup("", &[("kept", MachineState::Started)]);
        for id in ["kept", "removed"] {
            driver.running.insert(Arc::from(id));
        }
        lifecycle.stop_all().await;
        let mut calls = driver.calls.lock().clone();
        calls.sort();
        assert_eq!(calls, ["stop kept", "stop removed"]);
        assert!(driver.running.is_empty(), "no machine process outlives tern");
    }

    /// The request path's safety net: a machine declared started that this node does not
    /// run yet is started (once, however many ask), not left to fail every connect.
    #[tokio::test(start_paused = true)]
    async fn a_declared_machine_that_is_not_running_is_started_once_on_demand() {
        let started = MachineState::Started;
        let (_dir, driver, lifecycle) = setup("", &[("m1", started), ("m2", started)]);
        driver.running.insert(Arc::from("m2"));
        let snap = lifecycle.catalog.load_full();
        let (app, m1, m2) =
            (snap.app("a").unwrap(), snap.machine("m1").unwrap(), snap.machine("m2").unwrap());
        assert!(!lifecycle.start_declared(app, m2), "running already");
        assert!(lifecycle.start_declared(app, m1));
        assert_eq!(m1.state(), MachineState::Starting, "out of routing while it starts");
        assert!(lifecycle.start_declared(app, m1), "a second caller joins the same start");
        while !driver.running.contains("m1") {
            tokio::task::yield_now().await;
        }
        assert_eq!(*driver.calls.lock(), ["start m1"]);
    }

    /// What tern keeps per app goes with the app, but not from under a request that still
    /// uses it: that part goes at the supervisor's next sweep.
    #[tokio::test(start_paused = true)]
    async fn an_apps_state_goes_when_it_leaves_once_no_request_holds_it() {
        let (_dir, _driver, lifecycle) = setup("", &[]);
        let app = lifecycle.catalog.load().app("a").expect("app").clone();
        let held = lifecycle.hold(&app).expect("room");
        lifecycle.metrics.requests.with_label_values(&["a", "2xx"]).inc();
        lifecycle.metrics.wake_duration.with_label_values(&["a", "ok"]).observe(0.1);
        lifecycle.catalog.publish(crate::catalog::Snapshot::default());
        lifecycle.forget_app("a");
        assert!(lifecycle.held.contains_key("a"), "a held request still counts on it");
        assert!(!lifecycle.metrics.render().contains("app=\"a\""), "its series are gone");
        drop(held);
        lifecycle.sweep(&lifecycle.catalog.load_full(), 1);
        assert!(lifecycle.held.is_empty() && lifecycle.lines.is_empty());
    }

    /// A machine failing its checks takes no traffic, so it looks idle; but it neither
    /// counts toward `min_machines_running` nor is stopped (a check never stops a machine).
    #[tokio::test(start_paused = true)]
    async fn a_failing_machine_neither_counts_toward_the_minimum_nor_is_stopped() {
        let app = "auto_stop = \"stop\"\nauto_stop_after = \"60s\"\nmin_machines_running = 1";
        let started = MachineState::Started;
        let (_dir, driver, lifecycle) = setup(app, &[("healthy", started), ("failing", started)]);
        for id in ["healthy", "failing"] {
            driver.running.insert(Arc::from(id));
        }
        let failing = lifecycle.catalog.load().machine("failing").expect("failing").clone();
        failing.live.set_healthy(false);
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(lifecycle.clone().supervise(shutdown));
        // Both idle for five windows: the healthy one is the minimum, the failing one is not
        // autostop's to stop.
        tokio::time::sleep(Duration::from_secs(300)).await;
        let calls = driver.calls.lock().clone();
        assert!(calls.is_empty(), "{calls:?}");
        // Once it passes again, it is ordinary excess and goes after its idle window.
        failing.live.set_healthy(true);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let calls = driver.calls.lock().clone();
        assert_eq!(calls.len(), 1, "{calls:?}");
    }

    /// A machine ejected after a failed connect is back as soon as a health check passes,
    /// not only when its back-off runs out. A real listener answers the TCP check; the
    /// clock runs (a paused one would race the check's connect against its timeout).
    #[tokio::test]
    async fn a_passing_check_lifts_an_ejection_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let checks =
            "[[checks]]\ntype = \"tcp\"\ninterval = \"1h\"\ntimeout = \"10s\"\ngrace_period = \"0s\"";
        let (_dir, _driver, lifecycle) = setup_at(checks, &[("m1", MachineState::Started)], &addr);
        let app = lifecycle.catalog.load().app("a").expect("app").clone();
        let m = app.machines[0].clone();
        m.live.outlier().failed(crate::clock::now_ms(), false);
        let mut status = m.live.outlier().status(crate::clock::now_ms());
        assert!(status.ejected && status.failures == 1, "{status:?}");
        lifecycle.ensure_checks(&app);
        // Only a success clears the count; a back-off running out leaves it at 1.
        let cleared = tokio::time::timeout(Duration::from_secs(10), async {
            while m.live.outlier().status(crate::clock::now_ms()).failures != 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        status = m.live.outlier().status(crate::clock::now_ms());
        assert!(cleared.is_ok(), "the check passed but the ejection stayed: {status:?}");
        assert!(!status.ejected);
    }

    /// Wakes go to the nearest machine this node may start: by `[regions] rtt_ms`, never
    /// one another node owns.
    #[tokio::test]
    async fn wakes_pick_the_nearest_machine_this_node_may_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rib = crate::rib::sqlite::SqliteRib::open(&dir.path().join("rib.db"), Duration::from_millis(10))
            .expect("rib");
        let catalog = Arc::new(crate::catalog::Catalog::new());
        let mut snap = crate::catalog::Snapshot::default();
        let app: crate::model::AppSpec =
            toml::from_str("name = \"a\"\nhostnames = [\"a.test\"]").expect("app");
        snap.apply(crate::catalog::Event::App(app));
        // (id, region, owner)
        let machines = [("iad-1", "iad", None), ("ams-w", "ams", Some("worker-2")), ("fra-1", "fra", None)];
        for (id, region, owner) in machines {
            snap.apply(crate::catalog::Event::Machine(crate::model::MachineSpec {
                id: id.into(),
                app: "a".into(),
                region: region.into(),
                addr: "127.0.0.1:1".parse().expect("addr"),
                state: MachineState::Stopped,
                cmd: Some(vec!["app".into()]),
                node: owner.map(Arc::from),
            }));
        }
        catalog.publish(snap);
        let table = [("fra".to_string(), 9), ("iad".to_string(), 80)].into_iter().collect();
        let lifecycle = Lifecycle::new(
            Arc::new(MockDriver::default()),
            Arc::new(rib),
            catalog.clone(),
            crate::autostart::Site {
                node: Arc::from("edge-1"),
                region: Arc::from("ams"),
                nearest: crate::routing::nearest::Nearest::new("ams", &table).map(Arc::new),
            },
            Arc::new(crate::telemetry::Metrics::new()),
            Arc::default(),
        );
        let snap = catalog.load();
        let app = snap.app("a").expect("app");
        let pick = |tried: &[Arc<str>]| {
            lifecycle
                .candidate(app, tried, &crate::routing::decide::Eligible::default())
                .map(|m| m.id.clone())
        };
        // ams-w is nearest but worker-2's to start; fra is next.
        assert_eq!(pick(&[]).as_deref(), Some("fra-1"));
        assert_eq!(pick(&[Arc::from("fra-1")]).as_deref(), Some("iad-1"));
        assert_eq!(pick(&[Arc::from("fra-1"), Arc::from("iad-1")]), None, "nothing this node may start");
    }
}
