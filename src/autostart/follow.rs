//! Following the catalog: what `tern apply` changes while tern runs is acted on as it
//! would be at boot, and what leaves the catalog leaves nothing behind.
//!
//! The catalog's updater sends, after each batch it publishes, what the batch changed
//! ([`Changes`]); this module never reaches into the catalog's machinery, it only reads the
//! published snapshot.
//!
//! ```text
//!  machine added or changed, declared started,   ──▶ started (reason "declared"), as at boot;
//!  this node's driver runs it, not running yet        a request that reaches it first joins
//!                                                     the start instead of failing to connect
//!
//!  machine removed while it runs ──▶ a start in progress gives up ──▶ streams asked to end
//!     cleanly ──▶ in-flight requests drain (≤ DRAIN, less if tern shuts down) ──▶ process
//!     stopped (reason "removed"); its lifecycle lock is forgotten
//!
//!  app removed ──▶ its held-request counter, its line and its metric series are forgotten
//! ```
//!
//! Per-key state kept for a removed app or machine that a request still holds (an `Arc` in
//! use) stays until that request lets go; the supervisor's sweep collects it then.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::catalog::{AppEntry, Changes, Machine, Snapshot};
use crate::driver::Target;
use crate::model::MachineState;

use super::Lifecycle;
use super::supervise::{DRAIN, until_no_exchange};

/// How many supervisor passes between two sweeps of the metric series of apps gone.
pub(super) const METRIC_SWEEP_EVERY: u64 = 60;

impl Lifecycle {
    /// Acts on each batch the catalog publishes, until the catalog's updater ends.
    pub async fn follow_catalog(self: Arc<Self>, mut feed: mpsc::UnboundedReceiver<Changes>) {
        while let Some(changes) = feed.recv().await {
            self.on_changes(changes);
        }
        tracing::debug!(target: "tern::lifecycle", "the catalog's feed ended");
    }

    fn on_changes(self: &Arc<Self>, changes: Changes) {
        for (m, app) in changes.removed_machines {
            let kill = app.map_or(super::KILL_TIMEOUT_UNKNOWN, |a| a.kill_timeout);
            self.retire_removed(m, kill);
        }
        let snap = self.catalog.load_full();
        for m in &changes.machines {
            // The version published now: a later batch may have changed it again.
            let Some(m) = snap.machine(&m.id) else { continue };
            if let Some(app) = snap.app(&m.spec.app) {
                self.start_declared(app, m);
            }
        }
        for name in &changes.removed_apps {
            if snap.app(name).is_none() {
                self.forget_app(name);
            }
        }
    }

    /// Starts a machine declared `started` that this node's driver runs and that is not
    /// running, as at boot; returns whether a start is now in progress for it. Routing
    /// does not pick it while it starts; requests wait for it as for any wake.
    ///
    /// Also the request path's safety net: a request that could not connect to a machine
    /// declared started moments ago (before this node acted on the change) calls this and,
    /// if it returns true, waits for the start rather than failing.
    pub fn start_declared(self: &Arc<Self>, app: &AppEntry, m: &Arc<Machine>) -> bool {
        if !self.driver.manages(&m.spec) || m.addr.port() == 0 {
            return false;
        }
        if self.wakes.get(&m.id).is_some_and(|w| w.is_for(m)) {
            return true;
        }
        if self.driver.running(&m.id) || !matches!(m.state(), MachineState::Started | MachineState::Starting)
        {
            return false;
        }
        // Not routable until its process is up and ready.
        self.set_state(m, MachineState::Starting, "declared");
        drop(self.wake_machine_for(m, app, "declared"));
        true
    }

    /// Retires a machine that left the catalog: as for a declared stop, its streams end
    /// cleanly and its requests drain before its process is stopped. Nothing is recorded
    /// in the RIB (the machine's rows went with it).
    fn retire_removed(self: &Arc<Self>, m: Arc<Machine>, kill_timeout: Duration) {
        let gone = |_: &Arc<str>, _: &tokio::task::AbortHandle| self.catalog.load().machine(&m.id).is_none();
        if let Some((_, check)) = self.checkers.remove_if(&m.id, gone) {
            check.abort();
        }
        // A start in progress gives up, and stops what it started.
        let wake = self.wakes.get(&m.id).filter(|w| w.is_for(&m)).map(|w| w.cancel.clone());
        if let Some(cancel) = &wake {
            cancel.cancel();
        }
        if wake.is_none() && !self.driver.running(&m.id) {
            self.forget_machine(&m.id);
            return;
        }
        let this = self.clone();
        self.runtime.spawn(async move {
            this.stop_removed(&m, kill_timeout).await;
            this.forget_machine(&m.id);
        });
    }

    async fn stop_removed(&self, m: &Machine, kill_timeout: Duration) {
        // After the wake it cancelled (which stops what it started), or an autostop.
        let op = self.op_lock(&m.id);
        let _op = op.lock().await;
        // Declared again under its id meanwhile: that declaration decides what runs.
        let back = || self.catalog.load().machine(&m.id).is_some();
        if !self.driver.running(&m.id) || back() {
            return;
        }
        m.live.end_streams();
        let drained = tokio::select! {
            r = tokio::time::timeout(DRAIN, until_no_exchange(m)) => r.is_ok(),
            // Shutdown ends every stream and waits for requests itself; `stop_all` waits
            // for this lock.
            () = self.closing.cancelled() => false,
        };
        if back() {
            m.live.resume_streams();
            return;
        }
        match self.driver.stop(&Target::of(m), kill_timeout).await {
            Ok(()) => {
                self.metrics.machine_actions.with_label_values(&["stop", "removed"]).inc();
                tracing::info!(target: "tern::lifecycle", machine = %m.id, app = %m.spec.app, drained,
                    "removed from the catalog: stopped its process");
            }
            Err(e) => {
                tracing::warn!(target: "tern::lifecycle", machine = %m.id, error = %e, "could not stop a removed machine");
            }
        }
    }

    /// Drops the per-machine state of a machine the catalog no longer holds, unless
    /// something still uses it.
    fn forget_machine(&self, id: &str) {
        if self.catalog.load().machine(id).is_none() {
            self.ops.remove_if(id, |_, op| Arc::strong_count(op) == 1);
        }
    }

    /// Drops the per-app state of an app that left the catalog: what no request holds now
    /// goes at once, the rest at the supervisor's next sweep.
    pub(super) fn forget_app(&self, name: &str) {
        // Under the map's lock, as `hold` and `acquire` take them: nobody takes a clone
        // between the count and the removal.
        self.held.remove_if(name, |_, count| Arc::strong_count(count) == 1);
        self.lines.remove_if(name, |_, line| Arc::strong_count(line) == 1);
        self.metrics.forget_app(name);
    }

    /// The supervisor's sweep: per-key state of apps and machines gone from `snap` that was
    /// still in use when they left, and (every [`METRIC_SWEEP_EVERY`] passes) metric series
    /// an exchange that outlived its app wrote after the app left.
    pub(super) fn sweep(&self, snap: &Snapshot, pass: u64) {
        self.held.retain(|app, count| snap.app(app).is_some() || Arc::strong_count(count) > 1);
        self.lines.retain(|app, line| snap.app(app).is_some() || Arc::strong_count(line) > 1);
        self.ops.retain(|id, op| snap.machine(id).is_some() || Arc::strong_count(op) > 1);
        shrink(&self.held);
        shrink(&self.lines);
        shrink(&self.ops);
        shrink(&self.wakes);
        shrink(&self.checkers);
        if pass % METRIC_SWEEP_EVERY == 0 {
            self.metrics.forget_apps_where(|app| app != "-" && snap.app(app).is_none());
        }
    }
}

/// Gives back a map's room once most of it is empty (a burst of apps came and went): a
/// hash map keeps its capacity otherwise.
fn shrink<K: Eq + std::hash::Hash, V>(map: &dashmap::DashMap<K, V>) {
    if map.capacity() > 4 * map.len() + 64 {
        map.shrink_to_fit();
    }
}
