//! The lifecycle manager: wakes machines when requests need them, records every state
//! change in the RIB, and notices machines that exit on their own.
//!
//! The wake path, for one request that finds no started machine with room:
//!
//! ```text
//!  request ──▶ held (≤ max_pending per app, else 503 queue_full)
//!     │
//!     ├─ a machine of the app is already waking? ──yes──▶ join that wake
//!     │        no
//!     ├─ pick a stopped/suspended machine (suspended first: it resumes at once;
//!     │  this node's region first) ──none──▶ 503 no_machine
//!     │
//!     ▼  one wake per machine, however many requests join it:
//!   starting ──driver.start──▶ probing (TCP connect every 1 ms) ──accepts──▶ started
//!     │                            │                                           │
//!     │ start fails /              │ process exits / start_timeout /           ▼
//!     │ never ready ◀──────────────┘ removed / shutdown              every joined request
//!     ▼                                                             is forwarded
//!   stopped (recorded "start_failed") ──▶ joined requests try the next candidate
//! ```
//!
//! A start has its own deadline, the app's `start_timeout` from when it began, and no
//! request's: each request waits until its own deadline (arrival + `wake_timeout`), then
//! leaves with 503 wake_timeout while the start goes on, and a later request joins that same
//! start rather than beginning another. Only the start's deadline, the machine leaving the
//! catalog or tern shutting down ends it early (stopping what it started). A machine
//! declared `started` that this node runs is started the same way (reason "declared"), at
//! boot and whenever `tern apply` declares it later (see `follow.rs`).
//!
//! When machines of the app are started but every one is at its hard limit, the request
//! waits for room instead, in the app's line:
//!
//! ```text
//!  held ──▶ back of the app's line ──at the front, and a slot frees──▶ forwarded
//!              │                   (an exchange ends, or a machine turns routable)
//!              └── wake_timeout after arrival ──▶ 503 queue_full
//! ```
//!
//! Only the front of the line may take a slot, and a new request joins the line whenever
//! anyone waits in it, so requests are served in the order they arrived.
//!
//! Machine states live in `MachineLive` (what routing reads, changed at once) and in the
//! RIB's `machine_states` table (so other readers and a restarted tern see them). Each
//! change takes the next version, so an echo of an older record never undoes a newer one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::catalog::{AppEntry, Catalog, Machine, Queued};
use crate::driver::{Driver, DriverError, DriverEvent, Target};
use crate::model::{AppSpec, MachineState, StateRow};
use crate::rib::Rib;
use crate::routing::decide::{Eligible, WaitFuture, Wakes};
use crate::routing::replay_cache::ReplayCache;
use crate::routing::select::{self, Pick};
use crate::telemetry::Metrics;

mod checks;
mod follow;
mod supervise;

/// How a wake ended, as its waiters see it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Progress {
    Waking,
    Ready,
    Failed(Arc<str>),
}

/// A start in progress: one per machine, joined by every request that waits for it.
struct Wake {
    progress: watch::Receiver<Progress>,
    /// Cancelled when the start must give up before its `start_timeout`: tern shuts down,
    /// or the machine left the catalog. It then stops what it started.
    cancel: CancellationToken,
    /// Which machine: one removed and declared again under the same id is another machine.
    machine: Arc<Machine>,
}

impl Wake {
    fn is_for(&self, m: &Machine) -> bool {
        Arc::ptr_eq(&self.machine.live, &m.live)
    }
}

/// Why a request stopped waiting for room: routing's own error, the trait's.
pub use crate::routing::decide::WaitError as WakeError;

const SHUTTING_DOWN: &str = "tern is shutting down";

/// Why a wake failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("the machine was not ready within its app's start_timeout")]
    NotReady,
    #[error("{0}")]
    Other(Arc<str>),
}

pub struct Lifecycle {
    driver: Arc<dyn Driver>,
    rib: Arc<dyn Rib>,
    catalog: Arc<Catalog>,
    node: Arc<str>,
    /// The node part of the lifecycle versions this node mints.
    node_tag: u64,
    /// Distances to regions (`[regions] rtt_ms`): wakes pick the nearest machine.
    nearest: Option<Arc<crate::routing::nearest::Nearest>>,
    region: Arc<str>,
    metrics: Arc<Metrics>,
    /// The node's remembered replays, forgotten with their app.
    replay_cache: Arc<ReplayCache>,
    /// Wakes in progress, by machine id.
    wakes: DashMap<Arc<str>, Wake>,
    /// Requests held per app.
    held: DashMap<Arc<str>, Arc<AtomicU32>>,
    /// Where lifecycle work runs: the control runtime, which outlives every worker.
    runtime: tokio::runtime::Handle,
    /// Health-check loops running, by machine id.
    checkers: DashMap<Arc<str>, tokio::task::AbortHandle>,
    /// One lifecycle operation (wake, autostop) at a time per machine: a wake that arrives
    /// while the machine is being stopped starts it once the stop is done.
    ops: DashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>,
    /// Requests waiting for room on a machine of the app, in arrival order, by app.
    lines: DashMap<Arc<str>, Arc<Line>>,
    /// Set by [`Lifecycle::stop_all`]: no wake starts a machine any more, and one in
    /// progress gives up (stopping what it started), so none outlives tern.
    closing: CancellationToken,
}

/// The requests of one app waiting for room (every routable machine at its hard limit), in
/// the order they began to wait. Only the one at the front looks for a slot; the others
/// sleep until the request ahead of them leaves (served, or given up), which wakes just the
/// next one. So the longest waiting is served first, a late arrival never takes a slot
/// ahead of those already waiting, and a freed slot wakes one request, not the whole line.
struct Line {
    waiting: crate::watchdog::lock::Mutex<std::collections::VecDeque<(u64, Arc<tokio::sync::Notify>)>>,
    next: std::sync::atomic::AtomicU64,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            waiting: crate::watchdog::lock::Mutex::new("lifecycle.line", std::collections::VecDeque::new()),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// A request's place in its app's line.
struct Place {
    line: Arc<Line>,
    ticket: u64,
    /// Notified when this place reaches the front.
    turn: Arc<tokio::sync::Notify>,
}

impl Line {
    fn join(self: &Arc<Self>) -> Place {
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        let turn = Arc::new(tokio::sync::Notify::new());
        self.waiting.lock().push_back((ticket, turn.clone()));
        Place { line: self.clone(), ticket, turn }
    }

    fn is_empty(&self) -> bool {
        self.waiting.lock().is_empty()
    }
}

impl Place {
    fn at_front(&self) -> bool {
        self.line.waiting.lock().front().is_some_and(|(t, _)| *t == self.ticket)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut waiting = self.line.waiting.lock();
        let was_front = waiting.front().is_some_and(|(t, _)| *t == self.ticket);
        waiting.retain(|(t, _)| *t != self.ticket);
        if was_front && let Some((_, next)) = waiting.front() {
            // A stored permit if the next one is not asleep yet: it is not lost.
            next.notify_one();
        }
    }
}

/// One held request; dropping it releases the app's slot.
struct Held {
    count: Arc<AtomicU32>,
    metrics: Arc<Metrics>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        self.metrics.held_requests.dec();
    }
}

/// A machine handed to the node that owns it: counted in flight here (so this node's choices
/// see the load it sends), delivered by its owner, who wakes it and enforces its limits.
fn hand_over(m: Arc<Machine>) -> Pick {
    let guard = m.live.begin();
    Pick { machine: m, guard, over_soft: false, probe: false }
}

/// Where this node stands in the fleet: its name, its region and its distances to others.
pub struct Site {
    pub node: Arc<str>,
    pub region: Arc<str>,
    pub nearest: Option<Arc<crate::routing::nearest::Nearest>>,
}

impl Lifecycle {
    pub fn new(
        driver: Arc<dyn Driver>,
        rib: Arc<dyn Rib>,
        catalog: Arc<Catalog>,
        site: Site,
        metrics: Arc<Metrics>,
        replay_cache: Arc<ReplayCache>,
    ) -> Arc<Lifecycle> {
        let Site { node, region, nearest } = site;
        Arc::new(Lifecycle {
            nearest,
            driver,
            rib,
            catalog,
            node_tag: crate::catalog::node_tag(&node),
            node,
            region,
            metrics,
            replay_cache,
            wakes: DashMap::new(),
            held: DashMap::new(),
            runtime: tokio::runtime::Handle::current(),
            checkers: DashMap::new(),
            ops: DashMap::new(),
            closing: CancellationToken::new(),
            lines: DashMap::new(),
        })
    }

    /// The regions by distance, if the node has a table of them.
    pub fn nearest(&self) -> Option<&Arc<crate::routing::nearest::Nearest>> {
        self.nearest.as_ref()
    }

    /// Whether this node runs the machine: its driver can, and no other node owns it.
    pub(crate) fn manages(&self, spec: &crate::model::MachineSpec) -> bool {
        self.owns(spec) && self.driver.manages(spec)
    }

    /// Whether no other node owns the machine (it names this node, or none): only its
    /// owner starts, stops and probes a machine.
    pub(crate) fn owns(&self, spec: &crate::model::MachineSpec) -> bool {
        spec.node.as_deref().is_none_or(|n| n == &*self.node)
    }

    /// Whether another node owns the machine and beats.
    fn owned_elsewhere_alive(&self, m: &Machine) -> bool {
        !self.owns(&m.spec) && m.owner.as_ref().is_some_and(|o| o.alive())
    }

    /// A machine another live node owns, for that node to wake (or, up by now, to serve):
    /// the nearest, one on its way up before a suspended one before a stopped one.
    fn remote_candidate(
        &self,
        app: &AppEntry,
        tried: &[Arc<str>],
        eligible: &Eligible<'_>,
    ) -> Option<Arc<Machine>> {
        let distance = |m: &Machine| match &self.nearest {
            Some(n) => n.rtt(m.region()),
            None => u32::from(m.region() != &*self.region),
        };
        app.machines
            .iter()
            .filter(|m| !tried.contains(&m.id) && eligible.admits(m) && m.addr.port() != 0)
            .filter(|m| self.owned_elsewhere_alive(m))
            .filter_map(|m| {
                let order = match m.state() {
                    // Up since this request looked (its owner's record came in between).
                    MachineState::Started | MachineState::Starting => 0,
                    MachineState::Suspended => 1,
                    MachineState::Stopped => 2,
                    MachineState::Stopping | MachineState::Suspending => 3,
                    MachineState::Destroyed => return None,
                };
                Some(((distance(m), order), m))
            })
            .min_by_key(|(rank, _)| *rank)
            .map(|(_, m)| m.clone())
    }

    fn op_lock(&self, id: &Arc<str>) -> Arc<tokio::sync::Mutex<()>> {
        self.ops.entry(id.clone()).or_default().clone()
    }

    /// Whether a request to `app` that finds no room should wait for a wake.
    pub fn can_wake(&self, app: &AppEntry) -> bool {
        app.spec.auto_start && app.machines.iter().any(|m| self.manages(&m.spec))
    }

    /// Holds the caller until a machine of the app has room, then counts the caller in
    /// flight on it. With no routable machine it waits for a wake (starting one if none is
    /// waking); with every routable machine at its hard limit it queues for room (and wakes
    /// another machine if it can). Fails at `deadline`, or at once past `max_pending`.
    /// Without `may_wake` (a user agent on the app's ignore list) it only queues for room.
    pub async fn acquire(
        self: &Arc<Self>,
        app: &AppEntry,
        eligible: Eligible<'_>,
        deadline: Instant,
        may_wake: bool,
    ) -> Result<Pick, WakeError> {
        let asked = may_wake && app.spec.auto_start;
        let may_wake = may_wake && self.can_wake(app);
        let _held = self.hold(app)?;
        let mut tried: Vec<Arc<str>> = Vec::new();
        let mut last_failure: Option<Arc<str>> = None;
        let line = self.lines.entry(app.name.clone()).or_default().clone();
        let mut place: Option<Place> = None;
        let restricted = !eligible.is_all();
        let (name, caller_app) = (app.name.clone(), app);
        loop {
            // The app as the catalog has it now: a machine added since counts too.
            let current = self.catalog.load_full();
            // Removed since the request was routed: nothing of it may be woken again.
            let Some(app) = current.app(&name) else {
                let _ = caller_app;
                return Err(WakeError::NothingToWake);
            };
            let app: &AppEntry = app;
            // A request that may only take some machines (a region, not the one that replayed
            // it) never joins the app's line: at its front it would hold up requests that
            // could take the machines it may not.
            let at_front = restricted || place.as_ref().map_or_else(|| line.is_empty(), Place::at_front);
            // Registered before looking, so nothing in between is missed: the front listens
            // for an exchange ending or a machine turning routable (a spare woken, checks
            // passing) on every machine; the rest, for their turn. Every waiter counts on
            // the machines, which is how a new request knows to join the line.
            let queued: Vec<Queued> = app.machines.iter().map(|m| m.live.queue()).collect();
            let turn = place.as_ref().map(|p| p.turn.clone());
            let mut notified: Vec<_> =
                if at_front { queued.iter().map(|q| Box::pin(q.notified())).collect() } else { Vec::new() };
            notified.extend(turn.iter().map(|t| Box::pin(t.notified())));
            for n in &mut notified {
                n.as_mut().enable();
            }
            // A wake that finished between the caller's pick and now (or another node's
            // start, or an exchange ending) leaves nothing to wait for; but requests already
            // waiting for room go first.
            if at_front
                && let Some(pick) = select::acquire_among(&app.machines, &eligible, &app.spec.concurrency)
            {
                if pick.over_soft && may_wake {
                    self.wake_spare(app);
                }
                return Ok(pick);
            }
            if app.machines.iter().any(|m| m.routable() && eligible.admits(m)) {
                // Every routable machine is at its hard limit (or others wait ahead): queue.
                if place.is_none() && !restricted {
                    drop(notified);
                    place = Some(line.join());
                    continue;
                }
                if may_wake {
                    self.wake_spare(app);
                }
                if tokio::time::timeout_at(deadline, any_of(&mut notified)).await.is_err() {
                    return Err(WakeError::NoRoom(app.spec.concurrency.hard_limit.unwrap_or(u32::MAX)));
                }
                continue;
            }
            drop(notified);
            drop(queued);
            // Nothing is routable: this request waits for a wake now, not for room, and must
            // not hold up those behind it.
            place = None;
            let local = if may_wake { self.candidate(app, &tried, &eligible) } else { None };
            let Some(machine) = local else {
                // None this node may start: one another node owns, handed to that node to
                // wake (the request goes to it over the backhaul, and it holds it).
                if asked && let Some(m) = self.remote_candidate(app, &tried, &eligible) {
                    return Ok(hand_over(m));
                }
                return Err(match last_failure {
                    Some(f) => WakeError::Failed(f),
                    None => WakeError::NothingToWake,
                });
            };
            let mut progress = self.wake_machine(&machine, app);
            let outcome = tokio::time::timeout_at(deadline, progress.wait_for(|p| *p != Progress::Waking))
                .await
                .map(|r| r.map(|p| p.clone()));
            let result = match outcome {
                Err(_) => return Err(WakeError::Timeout),
                Ok(Ok(p)) => p,
                Ok(Err(_)) => progress.borrow().clone(),
            };
            match result {
                Progress::Ready => continue,
                Progress::Failed(why) => last_failure = Some(why),
                Progress::Waking => last_failure = Some(Arc::from("the wake was abandoned")),
            }
            tried.push(machine.id.clone());
        }
    }

    /// Holds the caller until this very machine has room, then counts the caller in flight
    /// on it: queued while it is at its hard limit, and, stopped or suspended, woken (if
    /// `may_wake` and this node runs it). Never another machine: a session's state is on
    /// this one. Fails at `deadline`, when the machine leaves the catalog, or at once when
    /// it is down and nothing here may start it.
    pub async fn wait_for(
        self: &Arc<Self>,
        app: &AppEntry,
        machine: &Arc<Machine>,
        deadline: Instant,
        may_wake: bool,
    ) -> Result<Pick, WakeError> {
        let _held = self.hold(app)?;
        let limits = &app.spec.concurrency;
        let hard = limits.hard_limit.unwrap_or(u32::MAX);
        let may_wake = may_wake && app.spec.auto_start;
        loop {
            let current = self.catalog.load_full();
            // Removed, or declared again as another machine under its id: the session's
            // machine is gone.
            let Some(m) =
                current.machine(&machine.id).filter(|m| Arc::ptr_eq(&m.live, &machine.live)).cloned()
            else {
                return Err(WakeError::Gone);
            };
            // Registered before looking: an exchange ending or a state change in between is
            // not missed. A watcher, not a request in the app's line.
            let watch = m.live.watch();
            let mut notified = Box::pin(watch.notified());
            notified.as_mut().enable();
            if m.routable() {
                let load = m.live.in_flight();
                if let Some(guard) = m.live.try_begin(hard) {
                    if m.routable() {
                        return Ok(Pick {
                            over_soft: load >= limits.soft_limit,
                            machine: m,
                            guard,
                            probe: false,
                        });
                    }
                    drop(guard);
                    continue;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Err(WakeError::NoRoom(hard));
                }
                continue;
            }
            if may_wake && self.owned_elsewhere_alive(&m) {
                // Its owner wakes it and holds the request until it has room.
                return Ok(hand_over(m));
            }
            let waking = self.wakes.get(&m.id).is_some_and(|w| w.is_for(&m));
            let startable = may_wake && self.manages(&m.spec) && m.addr.port() != 0;
            match m.state() {
                MachineState::Stopped
                | MachineState::Suspended
                | MachineState::Stopping
                | MachineState::Suspending
                    if !waking && !startable =>
                {
                    return Err(WakeError::Unavailable(m.state().as_str()));
                }
                // Woken below.
                MachineState::Stopped
                | MachineState::Suspended
                | MachineState::Stopping
                | MachineState::Suspending => {}
                MachineState::Destroyed => return Err(WakeError::Unavailable("destroyed")),
                // Starting (here or on another node), or started but out of rotation for a
                // moment (checks failing, a cordon): wait for it to turn routable.
                _ if !waking => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(WakeError::Timeout);
                    }
                    continue;
                }
                _ => {}
            }
            drop(notified);
            drop(watch);
            let mut progress = self.wake_machine(&m, app);
            let outcome = tokio::time::timeout_at(deadline, progress.wait_for(|p| *p != Progress::Waking))
                .await
                .map(|r| r.map(|p| p.clone()));
            match outcome {
                Err(_) => return Err(WakeError::Timeout),
                Ok(Ok(Progress::Ready)) => {}
                Ok(Ok(Progress::Failed(why))) => return Err(WakeError::Failed(why)),
                Ok(Ok(Progress::Waking) | Err(_)) => {
                    if let Progress::Failed(why) = progress.borrow().clone() {
                        return Err(WakeError::Failed(why));
                    }
                }
            }
        }
    }

    /// Every routable machine of the app is over its soft limit: wake one more if there is
    /// one to wake and none is waking yet. The caller does not wait for it.
    pub fn wake_spare(self: &Arc<Self>, app: &AppEntry) {
        if app.machines.iter().any(|m| self.wakes.contains_key(&m.id)) || !self.can_wake(app) {
            return;
        }
        if let Some(m) = self.candidate(app, &[], &Eligible::default()) {
            tracing::info!(target: "tern::lifecycle", app = %app.name, machine = %m.id,
                "every started machine is over its soft limit; waking another");
            drop(self.wake_machine_for(&m, app, "capacity"));
        }
    }

    fn hold(&self, app: &AppEntry) -> Result<Held, WakeError> {
        let count = self.held.entry(app.name.clone()).or_default().clone();
        let limit = app.spec.max_pending;
        let prev = count.fetch_add(1, Ordering::AcqRel);
        let held = Held { count, metrics: self.metrics.clone() };
        self.metrics.held_requests.inc();
        if prev >= limit {
            return Err(WakeError::QueueFull(limit));
        }
        Ok(held)
    }

    /// The machine to wait for: one already waking, else the nearest (this node's region
    /// first, then by `[regions] rtt_ms`), and within a region a suspended one (it resumes
    /// at once) before a stopped one.
    fn candidate(&self, app: &AppEntry, tried: &[Arc<str>], eligible: &Eligible<'_>) -> Option<Arc<Machine>> {
        let distance = |m: &Machine| match &self.nearest {
            Some(n) => n.rtt(m.region()),
            None => u32::from(m.region() != &*self.region),
        };
        // (not already waking, distance, suspended before stopped before stopping)
        type Rank = (bool, u32, u8);
        let rank = |m: &Machine| -> Option<Rank> {
            if tried.contains(&m.id) || !eligible.admits(m) || !self.manages(&m.spec) || m.addr.port() == 0 {
                return None;
            }
            let order = match m.state() {
                _ if self.wakes.contains_key(&m.id) => 0,
                MachineState::Suspended => 1,
                MachineState::Stopped => 2,
                // Being stopped: its wake starts it once the stop is done.
                MachineState::Stopping | MachineState::Suspending => 3,
                _ => return None,
            };
            Some((order != 0, distance(m), order))
        };
        let mut best: Option<(&Arc<Machine>, Rank)> = None;
        for m in app.machines.iter() {
            if let Some(r) = rank(m)
                && best.as_ref().is_none_or(|(_, b)| r < *b)
            {
                best = Some((m, r));
            }
        }
        best.map(|(m, _)| m.clone())
    }

    /// Joins the machine's wake in progress, or starts one.
    fn wake_machine(self: &Arc<Self>, machine: &Arc<Machine>, app: &AppEntry) -> watch::Receiver<Progress> {
        self.wake_machine_for(machine, app, "wake")
    }

    /// The start runs on its own deadline (`start_timeout`), not any request's: a request
    /// that gives up leaves it running, and a later one joins it.
    fn wake_machine_for(
        self: &Arc<Self>,
        machine: &Arc<Machine>,
        app: &AppEntry,
        reason: &'static str,
    ) -> watch::Receiver<Progress> {
        let entry = self.wakes.entry(machine.id.clone());
        let entry = match entry {
            dashmap::Entry::Occupied(e)
                if *e.get().progress.borrow() == Progress::Waking && e.get().is_for(machine) =>
            {
                return e.get().progress.clone();
            }
            other => other,
        };
        let (tx, rx) = watch::channel(Progress::Waking);
        let cancel = self.closing.child_token();
        entry.insert(Wake { progress: rx.clone(), cancel: cancel.clone(), machine: machine.clone() });
        let this = self.clone();
        let (machine, spec, mine) = (machine.clone(), app.spec.clone(), rx.clone());
        self.runtime.spawn(async move {
            let result = this.run_wake(&machine, &spec, reason, &cancel).await;
            // Only this wake's own entry: a machine declared again under the id has its own.
            this.wakes.remove_if(&machine.id, |_, w| w.progress.same_channel(&mine));
            let _ = tx.send(match result {
                Ok(()) => Progress::Ready,
                Err(failure) => Progress::Failed(Arc::from(failure.to_string())),
            });
        });
        rx
    }

    /// Why a wake was cancelled.
    fn why_cancelled(&self) -> Arc<str> {
        Arc::from(if self.closing.is_cancelled() { SHUTTING_DOWN } else { "the machine left the catalog" })
    }

    async fn run_wake(
        &self,
        m: &Arc<Machine>,
        spec: &AppSpec,
        reason: &'static str,
        cancel: &CancellationToken,
    ) -> Result<(), Failure> {
        let started = Instant::now();
        let op = self.op_lock(&m.id);
        let _op = op.lock().await;
        if cancel.is_cancelled() {
            return Err(Failure::Other(self.why_cancelled()));
        }
        if !self.holds(m) {
            // Removed (or declared anew) while this wake waited for the machine's lock.
            return Err(Failure::Other(Arc::from("the machine left the catalog")));
        }
        let from = m.state();
        let target = Target::of(m);
        self.set_state(m, MachineState::Starting, reason);
        let action = if from == MachineState::Suspended { "resume" } else { "start" };
        self.metrics.machine_actions.with_label_values(&[action, reason]).inc();
        let deadline = started + spec.start_timeout;
        // A start can take long (an orchestrator booting a VM); shutdown does not wait for it.
        let start = tokio::select! {
            r = tokio::time::timeout_at(deadline, self.driver.start(&target)) => match r {
                Ok(r) => r.map_err(|e: DriverError| Failure::Other(Arc::from(e.to_string()))),
                Err(_) => Err(Failure::NotReady),
            },
            () = cancel.cancelled() => Err(Failure::Other(self.why_cancelled())),
        };
        let result = match start {
            Ok(()) => self.until_ready(m, spec, deadline, cancel).await,
            Err(failure) => Err(failure),
        };
        // A machine declared started that does not get ready in time (its checks fail, say)
        // keeps running: a check never stops a machine, and restarting tern must not stop
        // machines it adopts. Its checks decide when it takes traffic.
        if reason == "declared" && matches!(result, Err(Failure::NotReady)) {
            m.live.set_healthy(spec.checks.is_empty());
            self.set_state(m, MachineState::Started, reason);
            tracing::warn!(target: "tern::lifecycle", machine = %m.id, app = %m.spec.app,
                "declared started but not ready within start_timeout; left running, routed once its checks pass");
            return Ok(());
        }
        match &result {
            Ok(()) => {
                m.live.touch();
                // Judged afresh: a failing check or a cordon from before the stop is stale.
                m.live.set_healthy(true);
                m.live.set_in_rotation(true);
                self.set_state(m, MachineState::Started, reason);
                self.metrics.wakes.with_label_values(&["ok"]).inc();
                tracing::info!(target: "tern::lifecycle", machine = %m.id, app = %m.spec.app, from = from.as_str(),
                    ms = started.elapsed().as_millis() as u64, "machine woke");
            }
            Err(failure) => {
                self.metrics.wakes.with_label_values(&["failed"]).inc();
                tracing::warn!(target: "tern::lifecycle", machine = %m.id, app = %m.spec.app, reason = %failure,
                    "machine failed to start");
                if let Err(e) = self.driver.stop(&target, spec.kill_timeout).await {
                    tracing::warn!(target: "tern::lifecycle", machine = %m.id, error = %e, "could not stop it");
                }
                self.set_state(m, MachineState::Stopped, "start_failed");
            }
        }
        result
    }

    /// Probes the machine until it is ready, its process exits, or the deadline passes.
    /// Ready means its port accepts a connection, and, if the app has an HTTP check, that
    /// check passes. Probes go out every millisecond (on tokio's 1 ms timer ticks),
    /// so readiness is seen within about 1 ms; a refused connect on the
    /// same host costs microseconds, so even a slow boot's thousands of probes are cheap.
    async fn until_ready(
        &self,
        m: &Machine,
        spec: &AppSpec,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<(), Failure> {
        // An interval, not a sleep per turn: tokio's timer rounds each deadline up to its
        // next millisecond tick, so a 1 ms sleep after each probe spaces them 1–2 ms apart,
        // while an interval's deadlines are fixed on the 1 ms grid and the probes land on
        // every tick.
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let http_check = spec.checks.iter().find(|c| c.kind == crate::model::CheckType::Http);
        let host = checks::host_for(spec, m.addr);
        loop {
            tick.tick().await;
            let attempt =
                tokio::time::timeout(Duration::from_millis(100), tokio::net::TcpStream::connect(m.addr));
            if let Ok(Ok(_)) = attempt.await {
                match http_check {
                    None => return Ok(()),
                    Some(check) => match checks::probe(check, m.addr, &host).await {
                        Ok(()) => return Ok(()),
                        Err(why) => tracing::debug!(target: "tern::lifecycle", machine = %m.id, %why,
                                "not ready: its HTTP check fails"),
                    },
                }
            }
            if !self.driver.running(&m.id) {
                return Err(Failure::Other(Arc::from(
                    "the machine's process exited before it accepted connections",
                )));
            }
            if cancel.is_cancelled() {
                return Err(Failure::Other(self.why_cancelled()));
            }
            if Instant::now() >= deadline {
                return Err(Failure::NotReady);
            }
        }
    }

    /// Moves the machine to `state` at once (routing sees it) and records it in the RIB,
    /// unless it left the catalog: its record went with it, and one written now would
    /// outlive it (in the RIB, and in every catalog that reads it).
    fn set_state(&self, m: &Machine, state: MachineState, reason: &str) {
        let version = m.live.transition(state, self.node_tag);
        if !self.holds(m) {
            return;
        }
        let row = StateRow {
            state,
            version,
            reason: reason.to_string(),
            node: self.node.to_string(),
            at_ms: unix_ms(),
        };
        let (rib, id) = (self.rib.clone(), m.id.clone());
        // Records go out in the background; the version keeps a late one from undoing a newer.
        self.runtime.spawn_blocking(move || {
            if let Err(e) = rib.record_state(&id, &row) {
                tracing::warn!(target: "tern::lifecycle", machine = %id, error = %e, "could not record the machine's state");
            }
        });
    }

    /// Handles what the driver noticed on its own, until the driver goes away.
    pub async fn watch_driver(self: Arc<Self>, mut events: mpsc::UnboundedReceiver<DriverEvent>) {
        while let Some(ev) = events.recv().await {
            match ev {
                DriverEvent::Exited { id, status } => {
                    self.metrics.machine_actions.with_label_values(&["exit", "exited"]).inc();
                    let snap = self.catalog.load_full();
                    if let Some(m) = snap.machine(&id) {
                        // A machine that dies is stopped, not restarted in a loop; the next
                        // request wakes it again.
                        if m.state() != MachineState::Starting {
                            self.set_state(m, MachineState::Stopped, "exited");
                        }
                        tracing::warn!(target: "tern::lifecycle", machine = %id, %status, "machine exited; marked stopped");
                    }
                }
            }
        }
    }

    /// At start-up: machines this node manages that are recorded as running are started
    /// (tern's earlier processes are gone); ones caught mid-transition are stopped. While
    /// tern runs, [`follow_catalog`](Self::follow_catalog) starts those declared later.
    pub fn reconcile_at_start(self: &Arc<Self>) {
        let snap = self.catalog.load_full();
        for app in snap.apps() {
            for m in app.machines.iter().filter(|m| self.manages(&m.spec) && !self.driver.running(&m.id)) {
                match m.state() {
                    MachineState::Started | MachineState::Starting => {
                        self.start_declared(app, m);
                    }
                    MachineState::Suspended | MachineState::Suspending | MachineState::Stopping => {
                        self.set_state(m, MachineState::Stopped, "restart");
                    }
                    MachineState::Stopped | MachineState::Destroyed => {}
                }
            }
        }
    }

    /// Another process runs this node's machines from now on (an upgrade or a bounce
    /// handed them over, still running): this one starts and wakes nothing more. Requests
    /// still draining here that would need a wake are answered `shutting_down`.
    pub fn hand_over(&self) {
        self.closing.cancel();
    }

    /// Asks every open stream through this node to end cleanly: SSE responses at an event
    /// boundary, WebSockets with a close frame. Used at shutdown, when they would otherwise
    /// hold the drain to its deadline and then be cut.
    pub fn end_all_streams(&self) {
        let snap = self.catalog.load_full();
        for app in snap.apps() {
            for m in app.machines.iter() {
                m.live.end_streams();
            }
        }
    }

    /// Stops every machine this node runs, at shutdown, and records them stopped: each one
    /// the driver runs, whether or not the catalog still holds it (one removed moments ago
    /// may still be draining), and each one a wake is about to start. Each is stopped under
    /// its lifecycle lock, after whatever wake, autostop or retirement holds it: a wake in
    /// progress gives up within a probe interval (and stops what it started), and no new one
    /// starts, so no machine process outlives tern.
    pub async fn stop_all(self: &Arc<Self>) {
        self.closing.cancel();
        let snap = self.catalog.load_full();
        let mut todo: std::collections::HashMap<Arc<str>, (Target, Option<Arc<Machine>>)> = self
            .driver
            .running_targets()
            .into_iter()
            .map(|t| (t.id.clone(), (t.clone(), snap.machine(&t.id).cloned())))
            .collect();
        // About to run: a wake that has not taken the lock yet finds `closing`.
        for w in self.wakes.iter() {
            let m = w.machine.clone();
            todo.entry(w.key().clone()).or_insert_with(|| (Target::of(&m), Some(m)));
        }
        let mut stops = tokio::task::JoinSet::new();
        for (_, (target, m)) in todo {
            let app = m.as_ref().and_then(|m| snap.app(&m.spec.app));
            let kill = app.map_or(KILL_TIMEOUT_UNKNOWN, |a| a.spec.kill_timeout);
            let this = self.clone();
            stops.spawn_on(
                async move { this.stop_at_shutdown(&target, m.as_deref(), kill).await },
                &self.runtime,
            );
        }
        while stops.join_next().await.is_some() {}
    }

    async fn stop_at_shutdown(&self, target: &Target, m: Option<&Machine>, kill_timeout: Duration) {
        let op = self.op_lock(&target.id);
        let _op = op.lock().await;
        if !self.driver.running(&target.id) {
            return;
        }
        if let Some(m) = m {
            self.set_state(m, MachineState::Stopping, "shutdown");
        }
        self.metrics.machine_actions.with_label_values(&["stop", "shutdown"]).inc();
        if let Err(e) = self.driver.stop(target, kill_timeout).await {
            tracing::warn!(target: "tern::lifecycle", machine = %target.id, error = %e, "could not stop machine");
        }
        if let Some(m) = m {
            self.set_state(m, MachineState::Stopped, "shutdown");
        }
    }

    /// Whether the catalog holds this very machine (not one declared again under its id).
    pub(super) fn holds(&self, m: &Machine) -> bool {
        self.catalog.load().machine(&m.id).is_some_and(|c| Arc::ptr_eq(&c.live, &m.live))
    }
}

impl Wakes for Arc<Lifecycle> {
    fn wake_spare(&self, app: &AppEntry) {
        Lifecycle::wake_spare(self, app);
    }

    fn wait_any<'a>(
        &'a self,
        app: &'a AppEntry,
        eligible: Eligible<'a>,
        deadline: Instant,
        may_wake: bool,
    ) -> WaitFuture<'a> {
        Box::pin(self.acquire(app, eligible, deadline, may_wake))
    }

    fn wait_for<'a>(
        &'a self,
        app: &'a AppEntry,
        machine: &'a Arc<Machine>,
        deadline: Instant,
        may_wake: bool,
    ) -> WaitFuture<'a> {
        Box::pin(Lifecycle::wait_for(self, app, machine, deadline, may_wake))
    }

    fn start_declared(&self, app: &AppEntry, machine: &Arc<Machine>) -> bool {
        Lifecycle::start_declared(self, app, machine)
    }
}

/// The grace between SIGTERM and SIGKILL for a machine whose app tern no longer knows:
/// the declarations' default `kill_timeout`.
const KILL_TIMEOUT_UNKNOWN: Duration = Duration::from_secs(5);

/// Resolves when any of `notified` does.
async fn any_of(notified: &mut [std::pin::Pin<Box<tokio::sync::futures::Notified<'_>>>]) {
    std::future::poll_fn(|cx| {
        for n in notified.iter_mut() {
            if n.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await;
}

fn unix_ms() -> i64 {
    crate::clock::unix_ms()
}
