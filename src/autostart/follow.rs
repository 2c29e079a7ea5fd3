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
//!
//!  machine running, its address or cmd changed ──▶ out of routing (starting) ──▶ the old
//!     process's streams end cleanly, its requests drain (≤ DRAIN) ──▶ stopped (reason
//!     "redeclared") ──▶ the new version starts, as at boot; requests wait for it
//! ```
//!
//! Per-key state kept for a removed app or machine that a request still holds (an `Arc` in
//! use) stays until that request lets go; the supervisor's sweep collects it then.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::catalog::{AppEntry, Changes, Machine, Snapshot};
use crate::model::MachineState;

use super::Lifecycle;

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
        for (old, app) in changes.redeclared {
            let kill = app.map_or(super::KILL_TIMEOUT_UNKNOWN, |a| a.kill_timeout);
            self.restart_redeclared(old, kill);
        }
        let snap = self.catalog.load_full();
        for m in &changes.machines {
            // The version published now: a later batch may have changed it again.
            let Some(m) = snap.machine(&m.id) else { continue };
            if let Some(app) = snap.app(&m.spec.app) {
                self.start_declared(app, m);
            }
        }
        for name in &changes.redeclared_apps {
            self.replay_cache.forget_app(name);
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
        // A request routed before a removal must not start the machine again.
        if !self.manages(&m.spec) || m.addr.port() == 0 || !self.holds(m) {
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

    /// Makes a running machine whose address or command changed run its new declaration, as
    /// a restart of tern would: the old process is retired like a declared stop (streams
    /// ended cleanly, requests drained), then the new version starts. The new version is out
    /// of routing meanwhile, and its wake, waiting for the machine's lock behind the stop,
    /// holds the requests that come.
    fn restart_redeclared(self: &Arc<Self>, old: Arc<Machine>, kill_timeout: Duration) {
        let snap = self.catalog.load_full();
        let (Some(new), Some(app)) = (
            snap.machine(&old.id).cloned(),
            snap.machine(&old.id).and_then(|m| snap.app(&m.spec.app)).cloned(),
        ) else {
            return;
        };
        // Handed to another node (`node` changed): this one runs it no more, as it would not
        // start it at boot; the new owner starts it.
        if !self.manages(&new.spec) {
            if self.driver.running(&old.id) {
                let this = self.clone();
                let op = self.op_lock(&old.id);
                self.runtime.spawn(async move {
                    let _held = op.lock_owned().await;
                    if this.driver.running(&old.id) {
                        this.retire_process(&old, kill_timeout, "owner changed", || false).await;
                    }
                });
            }
            return;
        }
        // Declared stopped now: the supervisor's declared-stop pass retires it.
        if !self.driver.running(&old.id)
            || !matches!(new.state(), MachineState::Started | MachineState::Starting)
        {
            return;
        }
        self.set_state(&new, MachineState::Starting, "declared");
        let op = self.op_lock(&old.id);
        let early = op.clone().try_lock_owned().ok();
        let wake_now = early.is_some();
        if wake_now {
            drop(self.wake_machine_for(&new, &app, "declared"));
        }
        let this = self.clone();
        self.runtime.spawn(async move {
            let held = match early {
                Some(g) => g,
                None => op.lock_owned().await,
            };
            if this.driver.running(&old.id) {
                this.retire_process(&old, kill_timeout, "redeclared", || false).await;
            }
            drop(held);
            if !wake_now {
                this.start_current(&old.id);
            }
        });
    }

    /// Starts the version of machine `id` the catalog holds now, if it is declared started.
    fn start_current(self: &Arc<Self>, id: &str) {
        let snap = self.catalog.load_full();
        if let Some(m) = snap.machine(id)
            && let Some(app) = snap.app(&m.spec.app)
        {
            self.start_declared(app, m);
        }
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
            // Declared again under its id while this one stopped: that one runs now.
            this.start_current(&m.id);
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
        self.retire_process(m, kill_timeout, "removed", back).await;
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
        self.replay_cache.forget_app(name);
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::watch;

    use crate::autostart::supervise::tests::setup_at;
    use crate::catalog::{Changes, Event};
    use crate::model::MachineState;

    async fn until(mut f: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("condition never held");
    }

    /// A request routed before a prune, whose connect then fails (the retirement stopped
    /// the process), asks for the declared start of its stale machine: nothing starts.
    #[tokio::test]
    async fn a_request_routed_before_a_prune_does_not_start_the_removed_machine() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listener");
        let addr = listener.local_addr().expect("addr").to_string();
        let (_dir, driver, lifecycle) = setup_at("", &[("m1", MachineState::Started)], &addr);
        driver.running.insert(Arc::from("m1"));
        let old = lifecycle.catalog.load_full();
        let (app, m1) = (old.app("a").expect("a").clone(), old.machine("m1").expect("m1").clone());
        let mut next = (*old).clone();
        next.apply(Event::RemoveMachine("m1".into()));
        lifecycle.catalog.publish(next);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(lifecycle.clone().follow_catalog(rx));
        let removed = vec![(m1.clone(), Some(app.spec.clone()))];
        tx.send(Changes { removed_machines: removed, ..Default::default() }).expect("feed");
        until(|| !driver.running.contains("m1")).await;
        assert!(!lifecycle.start_declared(&app, &m1), "a machine the catalog no longer holds");
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(lifecycle.clone().supervise(shutdown));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(*driver.calls.lock(), ["stop m1"]);
    }

    /// A machine re-declared with another owner (`node`) while this node runs it is stopped
    /// here, as this node would not start it at boot.
    #[tokio::test]
    async fn a_machine_handed_to_another_node_is_stopped_here() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listener");
        let addr = listener.local_addr().expect("addr").to_string();
        let (_dir, driver, lifecycle) = setup_at("", &[("m1", MachineState::Started)], &addr);
        driver.running.insert(Arc::from("m1"));
        let old = lifecycle.catalog.load_full();
        let m1 = old.machine("m1").expect("m1").clone();
        let mut next = (*old).clone();
        let mut spec = m1.spec.clone();
        spec.node = Some("worker-9".into());
        next.apply(Event::Machine(spec));
        lifecycle.catalog.publish(next);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(lifecycle.clone().follow_catalog(rx));
        let now = lifecycle.catalog.load_full();
        let moved = now.machine("m1").expect("m1").clone();
        let app = now.app("a").map(|a| a.spec.clone());
        tx.send(Changes { machines: vec![moved], redeclared: vec![(m1, app)], ..Default::default() })
            .expect("feed");
        until(|| !driver.running.contains("m1")).await;
        assert_eq!(*driver.calls.lock(), ["stop m1"], "stopped, and not started again here");
    }

    /// A request waiting for a wake when its whole app is pruned wakes nothing else.
    #[tokio::test]
    async fn a_prune_during_a_wake_starts_no_other_machine_of_the_app() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listener");
        let addr = listener.local_addr().expect("addr").to_string();
        let stopped = MachineState::Stopped;
        let (_dir, driver, lifecycle) = setup_at("", &[("m1", stopped), ("m2", stopped)], &addr);
        // m1 never gets ready (nothing listens at its address), so its wake is in progress.
        let mut snap = (*lifecycle.catalog.load_full()).clone();
        snap.apply(Event::Machine(crate::model::MachineSpec {
            id: "m1".into(),
            app: "a".into(),
            region: "".into(),
            addr: "127.0.0.1:1".parse().expect("addr"),
            state: stopped,
            cmd: Some(vec!["app".into()]),
            node: None,
        }));
        lifecycle.catalog.publish(snap);
        let app = lifecycle.catalog.load_full().app("a").expect("a").clone();
        let request = tokio::spawn({
            let (lifecycle, app) = (lifecycle.clone(), app.clone());
            async move {
                lifecycle
                    .acquire(
                        &app,
                        Default::default(),
                        tokio::time::Instant::now() + Duration::from_secs(10),
                        true,
                    )
                    .await
                    .is_ok()
            }
        });
        until(|| driver.calls.lock().iter().any(|c| c == "start m1")).await;
        lifecycle.catalog.publish(crate::catalog::Snapshot::default());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(lifecycle.clone().follow_catalog(rx));
        let removed = app.machines.iter().map(|m| (m.clone(), Some(app.spec.clone()))).collect();
        tx.send(Changes {
            removed_machines: removed,
            removed_apps: vec![app.name.clone()],
            ..Default::default()
        })
        .expect("feed");
        assert!(!request.await.expect("request"), "the request is refused, not served");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(driver.running.is_empty(), "{:?}", *driver.calls.lock());
        assert!(!driver.calls.lock().iter().any(|c| c == "start m2"), "{:?}", *driver.calls.lock());
    }
}
