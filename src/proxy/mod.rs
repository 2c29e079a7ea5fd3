//! The composition root: wires listener → tls → http → routing → catalog, with upstream
//! beside http, the RIB feeding the catalog, and the admin endpoints. Nothing else imports
//! this module; `main.rs` and the integration tests call it.
//!
//! Sockets are bound first ([`Bound::bind`]) and passed in, so tests bind port 0 and learn
//! the addresses, and connections that arrive while the catalog loads wait in the backlog
//! instead of being refused.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{Semaphore, watch};

use crate::admin::{Admin, Control, Health};
use crate::autostart::Lifecycle;
use crate::catalog::{self, Catalog};
use crate::config::{Config, Listen};
use crate::http::{Drain, Server, ServerLimits};
use crate::listener::inherit::{Handoff, Inherited};
use crate::rib::{Rib, RibError};
use crate::telemetry::Metrics;
use crate::{listener, tls};

pub mod fleet;
mod lot;
mod wedge;
mod worker;

use worker::{Deps, Workers};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{addr} is already in use{}", in_use_by(holder.as_ref()))]
    InUse { addr: SocketAddr, holder: Option<listener::holder::Holder> },
    // The cause is in the message, not also a `source`: `{:#}` would print it twice.
    #[error("cannot listen on {addr}: {cause}")]
    Bind { addr: SocketAddr, cause: std::io::Error },
    #[error("cannot load the catalog: {0}")]
    Catalog(#[from] RibError),
    #[error("cannot make sure the RIB holds a session key: {0}")]
    SessionKey(String),
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot start the driver: {0}")]
    Driver(String),
    #[error("cannot start the worker threads: {0}")]
    Workers(#[source] std::io::Error),
}

/// The end of the "address in use" message: who holds it, as far as this user can tell.
fn in_use_by(holder: Option<&listener::holder::Holder>) -> String {
    match holder {
        Some(h) if h.pid == std::process::id() => {
            " by another listener of this same tern (check [[listen]] and [admin] addresses)".into()
        }
        Some(h) if h.cmdline.is_empty() => format!(" by pid {}", h.pid),
        Some(h) => format!(" by pid {} ({})", h.pid, h.cmdline),
        None => " (by a process this user cannot inspect, or one that just exited)".into(),
    }
}

/// Listening sockets, bound but not yet accepting.
pub struct Bound {
    listeners: Vec<(std::net::TcpListener, Listen)>,
    admin: std::net::TcpListener,
    /// A descriptor of each, kept for a successor process.
    handoff: Arc<Handoff>,
}

impl Bound {
    pub fn bind(config: &Config) -> Result<Bound, StartError> {
        Bound::bind_inheriting(config, &mut Inherited::default())
    }

    /// Takes each listener's socket from `inherited` (a predecessor's, or systemd's) when
    /// it holds one, and binds the rest.
    pub fn bind_inheriting(config: &Config, inherited: &mut Inherited) -> Result<Bound, StartError> {
        let bind = |addr: SocketAddr, backlog: u32, freebind: bool| {
            listener::bind(addr, backlog, freebind).map_err(|source| match source.kind() {
                std::io::ErrorKind::AddrInUse => {
                    StartError::InUse { addr, holder: listener::holder::find(addr) }
                }
                _ => StartError::Bind { addr, cause: source },
            })
        };
        let mut listeners = Vec::with_capacity(config.listen.len());
        let backhaul = config.backhaul.as_ref().map(|b| crate::config::Listen {
            addr: b.addr,
            kind: crate::config::ListenKind::Http,
            tls: false,
            private: false,
            proxy_protocol: false,
            proxy_protocol_from: Vec::new(),
            freebind: false,
            backlog: 1024,
            backhaul: true,
        });
        for l in config.listen.iter().chain(backhaul.as_ref()) {
            let socket = match inherited.take(l.addr, false) {
                Some(s) => s,
                None => bind(l.addr, l.backlog, l.freebind)?,
            };
            listeners.push((socket, l.clone()));
        }
        let admin = match inherited.take(config.admin.addr, true) {
            Some(s) => s,
            None => bind(config.admin.addr, 128, false)?,
        };
        inherited.close_unclaimed();
        for (l, c) in &listeners {
            let addr = l.local_addr().unwrap_or(c.addr);
            if c.backhaul {
                tracing::info!(target: "tern::listener", %addr, backhaul = true, "listening");
            } else {
                let kind = match c.kind {
                    crate::config::ListenKind::Http => "http",
                    crate::config::ListenKind::Tcp => "tcp",
                };
                tracing::info!(target: "tern::listener", %addr, kind, tls = c.tls, private = c.private, "listening");
            }
        }
        let kept: Vec<(SocketAddr, &std::net::TcpListener)> =
            listeners.iter().map(|(s, l)| (l.addr, s)).collect();
        let handoff = Handoff::keep(&kept, (config.admin.addr, &admin))
            .map_err(|cause| StartError::Bind { addr: config.admin.addr, cause })?;
        Ok(Bound { listeners, admin, handoff: Arc::new(handoff) })
    }

    /// The bound addresses of the proxy listeners, with whether each terminates TLS.
    pub fn addrs(&self) -> Vec<(SocketAddr, bool)> {
        self.listeners
            .iter()
            .filter(|(_, c)| !c.backhaul)
            .filter_map(|(l, c)| Some((l.local_addr().ok()?, c.tls)))
            .collect()
    }

    /// Where the `[backhaul]` listener is bound, if there is one.
    pub fn backhaul_addr(&self) -> Option<SocketAddr> {
        self.listeners.iter().find(|(_, c)| c.backhaul).and_then(|(l, _)| l.local_addr().ok())
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }
}

/// Makes sure the RIB holds a session key before the catalog loads, so the first snapshot
/// brings a keyring. The key used is whichever the RIB holds afterwards (another node's, if
/// it was quicker), as the catalog reads it; this node's fresh one is only a candidate.
async fn ensure_session_key(rib: &Arc<dyn Rib>) -> Result<(), StartError> {
    let fresh = crate::model::session_key::SessionKeyRow::fresh(crate::clock::unix_ms())
        .map_err(|e| StartError::SessionKey(e.to_string()))?;
    let rib = rib.clone();
    let inserted = tokio::task::spawn_blocking(move || rib.ensure_session_key(&fresh))
        .await
        .map_err(|e| StartError::SessionKey(e.to_string()))?
        .map_err(|e| StartError::SessionKey(e.to_string()))?;
    if inserted {
        tracing::info!(target: "tern::proxy", id = 1, "no session key in the RIB: made key 1");
    }
    Ok(())
}

/// A current-thread runtime on a thread of its own, for one kind of background work; the
/// thread runs until [`RuntimeThread::stop`].
struct RuntimeThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RuntimeThread {
    /// Its heartbeat, `what`, ends with the runtime, which retires it.
    fn start(name: &str, watchdog: &crate::watchdog::Watchdog, what: &str) -> std::io::Result<RuntimeThread> {
        let parking = crate::watchdog::Parking::default();
        let runtime = parking.install(tokio::runtime::Builder::new_current_thread().enable_all()).build()?;
        let handle = runtime.handle().clone();
        handle.spawn(crate::watchdog::keep_beating(watchdog.heartbeat_parked(what, parking)));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name(name.to_string()).spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            });
            // Tasks still running (none, after an orderly stop) are dropped with it.
            runtime.shutdown_timeout(std::time::Duration::from_millis(100));
        })?;
        Ok(RuntimeThread { handle, stop: Some(stop), thread: Some(thread) })
    }

    /// Ends the runtime and waits for its thread, without blocking the caller's runtime.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The node's background work, each kind on a runtime of its own: the catalog following the
/// RIB (`tern-catalog`), and the lifecycle manager with its supervisor, wakes, probes and
/// health checks (`tern-lifecycle`).
struct Background {
    catalog_rt: RuntimeThread,
    lifecycle_rt: RuntimeThread,
    updater: tokio::task::JoinHandle<()>,
    supervisor: tokio::task::JoinHandle<()>,
    lifecycle: Arc<Lifecycle>,
    replay_cache: Arc<crate::routing::replay_cache::ReplayCache>,
    /// The RIB and this node's name, if it beats in a fleet: it leaves when it stops.
    fleet: Option<(Arc<dyn Rib>, Arc<str>)>,
}

impl Background {
    /// Loads the catalog and starts the lifecycle manager, both following `shutdown`.
    async fn start(
        config: &Config,
        rib: Arc<dyn Rib>,
        metrics: &Arc<Metrics>,
        catalog: &Arc<Catalog>,
        tasks: &crate::tasks::Tasks,
        shutdown: &watch::Receiver<bool>,
        watchdog: &crate::watchdog::Watchdog,
    ) -> Result<Background, StartError> {
        let catalog_rt =
            RuntimeThread::start("tern-catalog", watchdog, "catalog").map_err(StartError::Workers)?;
        let lifecycle_rt =
            RuntimeThread::start("tern-lifecycle", watchdog, "lifecycle").map_err(StartError::Workers)?;
        // What each published batch changed, for the lifecycle manager; it starts listening
        // after boot's reconcile, and nothing sent meanwhile is lost.
        let (feed, changes) = tokio::sync::mpsc::unbounded_channel();
        ensure_session_key(&rib).await?;
        let node: Arc<str> = Arc::from(config.node.clone().unwrap_or_else(|| config.region.clone()));
        // Before the catalog loads: the liveness it makes for this node must know it is ours.
        let pulse = catalog.load().pulse().clone();
        pulse.set_local(&node);
        if let Some(b) = &config.backhaul {
            pulse.set_dead_after(b.dead_after);
        }
        let updater = {
            let (catalog, rib, metrics, shutdown) =
                (catalog.clone(), rib.clone(), metrics.clone(), shutdown.clone());
            catalog_rt
                .handle
                .spawn(catalog::updater::start(catalog, rib, metrics, shutdown, feed))
                .await
                .map_err(|e| StartError::Catalog(RibError::Other(e.to_string())))??
        };
        let updater = tasks.watch(&catalog_rt.handle, "catalog", rethrow(updater));
        let (driver_tx, driver_rx) = tokio::sync::mpsc::unbounded_channel();
        // One per node, shared by the workers: a replay one worker saw routes the next
        // request whichever worker takes it.
        let replay_cache = Arc::new(crate::routing::replay_cache::ReplayCache::default());
        // The driver and the lifecycle manager spawn their work on the runtime current when
        // they are made: the lifecycle runtime. (Entered only where nothing is awaited.)
        let driver = {
            let _on = lifecycle_rt.handle.enter();
            crate::driver::build(config, driver_tx).map_err(StartError::Driver)?
        };
        let d = driver.clone();
        lifecycle_rt
            .handle
            .spawn(async move { d.clean_up_leftovers().await })
            .await
            .map_err(|e| StartError::Driver(e.to_string()))?;
        let lifecycle = {
            let _on = lifecycle_rt.handle.enter();
            Lifecycle::new(
                driver,
                rib.clone(),
                catalog.clone(),
                crate::autostart::Site {
                    node: node.clone(),
                    region: Arc::from(config.region.as_str()),
                    nearest: crate::routing::nearest::Nearest::new(&config.region, &config.regions.rtt_ms)
                        .map(Arc::new),
                },
                metrics.clone(),
                replay_cache.clone(),
            )
        };
        tasks.watch(&lifecycle_rt.handle, "driver-events", lifecycle.clone().watch_driver(driver_rx));
        {
            let l = lifecycle.clone();
            lifecycle_rt
                .handle
                .spawn(async move { l.reconcile_at_start() })
                .await
                .map_err(|e| StartError::Driver(e.to_string()))?;
        }
        tasks.watch(&lifecycle_rt.handle, "catalog-follow", lifecycle.clone().follow_catalog(changes));
        let supervisor = {
            let (l, s) = (lifecycle.clone(), shutdown.clone());
            tasks.keep(&lifecycle_rt.handle, "supervisor", move || l.clone().supervise(s.clone()))
        };
        let fleet = fleet::beat(config, &rib, &node, tasks, &lifecycle_rt.handle, shutdown);
        Ok(Background { catalog_rt, lifecycle_rt, updater, supervisor, lifecycle, replay_cache, fleet })
    }

    /// Once the workers are done: machines this node runs go down with it, recorded as
    /// stopped (the next start wakes them on demand), unless a successor took them over;
    /// then the runtimes end.
    async fn stop(self, handed_over: bool) {
        let _ = self.supervisor.await;
        if !handed_over {
            if let Some((rib, node)) = self.fleet.clone() {
                let _ = self.lifecycle_rt.handle.spawn(fleet::leave(rib, node)).await;
            }
            let l = self.lifecycle.clone();
            let _ = self.lifecycle_rt.handle.spawn(async move { l.stop_all().await }).await;
        }
        let _ = self.updater.await;
        self.lifecycle_rt.stop().await;
        self.catalog_rt.stop().await;
    }
}

/// Runs the proxy until `shutdown` turns true, then drains: `/healthz` turns 503, the
/// listeners close, and open connections and streams end at their times spread over
/// `[shutdown] drain_window` (HTTP/1.1 gets `Connection: close` on its next response,
/// HTTP/2 GOAWAY, SSE ends at an event boundary, WebSockets get close 1001; see
/// `docs/drain.md`); what is left after the window gets `limits.shutdown_timeout`.
///
/// Threads: this task (the control thread) loads the catalog, serves the admin endpoints and
/// orchestrates start and stop; the catalog follows the RIB on `tern-catalog`; lifecycle
/// work (the supervisor, wakes, probes, health checks) runs on `tern-lifecycle`; each
/// [`worker`] accepts and serves its own connections. A wedge in one of them leaves the
/// others running, and the watchdog sees which. `parking` says when the runtime this runs on
/// is parked, if it was installed there (`Parking::default()` otherwise: the control
/// heartbeat is then asked for a tick every `stall_after / 20`).
// The composition root, read top to bottom: each step is a call, in the order the node needs.
#[allow(clippy::too_many_lines)]
pub async fn run(
    mut config: Config,
    bound: Bound,
    rib: Arc<dyn Rib>,
    shutdown: watch::Receiver<bool>,
    parking: crate::watchdog::Parking,
) -> Result<(), StartError> {
    // Other nodes are told the address the backhaul listener got (port 0 picks one).
    if let (Some(b), Some(at)) = (config.backhaul.as_mut(), bound.backhaul_addr()) {
        b.addr = at;
    }
    // `shutdown` (a signal) is one way for the node to end; an upgrade or a drain are the
    // others. Everything inside follows `halt`, which turns once the way is decided.
    let (external, (halt_tx, shutdown)) = (shutdown, watch::channel(false));
    let halt_tx = Arc::new(halt_tx);
    let metrics = Arc::new(Metrics::new());
    let catalog = Arc::new(Catalog::new());
    let watchdog = wedge::watchdog(&config, &metrics);
    let control_beat =
        tokio::spawn(crate::watchdog::keep_beating(watchdog.heartbeat_parked("control", parking)));
    // A store client's own runtime (etcd, Corrosion); its heartbeat ends with it.
    let client_beat = rib.client_runtime().map(|(rt, parking)| {
        rt.spawn(crate::watchdog::keep_beating(watchdog.heartbeat_parked("rib-client", parking)))
    });
    let tasks = crate::tasks::Tasks::new(metrics.clone(), escalate_to(&watchdog));
    let bg =
        Background::start(&config, rib.clone(), &metrics, &catalog, &tasks, &shutdown, &watchdog).await?;
    let lifecycle = bg.lifecycle.clone();
    let health = Arc::new(Health::default());
    let (stop_accepting_tx, stop_accepting) = watch::channel(false);
    let stop_accepting_tx = Arc::new(stop_accepting_tx);
    let drain = Drain::new(&metrics);
    let deps = Deps {
        tls: tls::ServerConfigs::http(catalog.clone())?,
        tls_raw: tls::ServerConfigs::raw(catalog.clone())?,
        catalog: catalog.clone(),
        metrics: metrics.clone(),
        server: Arc::new(Server::new(&server_limits(&config.limits), drain.clone())),
        limits: config.limits.clone(),
        region: Arc::from(config.region.as_str()),
        access_log: config.log.access,
        shutdown: shutdown.clone(),
        stop_accepting,
        connection_limit: Arc::new(Semaphore::new(config.limits.max_connections)),
        lifecycle: lifecycle.clone(),
        tasks: tasks.clone(),
        replay_cache: bg.replay_cache.clone(),
        drain: drain.clone(),
    };
    let workers = Workers::start(config.worker_count(), &deps, &bound.listeners, &watchdog)
        .map_err(StartError::Workers)?;

    let (admin_stop_tx, admin_stop) = watch::channel(false);
    let (control_tx, control) = tokio::sync::mpsc::unbounded_channel();
    let admin = Arc::new(Admin {
        catalog: catalog.clone(),
        metrics: metrics.clone(),
        health: health.clone(),
        control: Some(control_tx),
        faults: config.debug.faults,
        watchdog: Some(watchdog.clone()),
    });
    let admin_listener = tokio::net::TcpListener::from_std(bound.admin)
        .map_err(|cause| StartError::Bind { addr: config.admin.addr, cause })?;
    let admin_addr = admin_listener.local_addr().unwrap_or(config.admin.addr);
    tracing::info!(target: "tern::listener", addr = %admin_addr, admin = true, "listening");
    let admin_task = tokio::spawn(admin.serve(admin_listener, admin_stop));
    // The workers hold their own descriptors of the listening sockets now.
    drop(bound.listeners);
    let handoff = bound.handoff;
    let (bounced_tx, bounced) = watch::channel(None);
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bounce = wedge::Bounce {
        handoff: handoff.clone(),
        stop_accepting: stop_accepting_tx.clone(),
        halt: halt_tx.clone(),
        bounced: bounced_tx,
        metrics: metrics.clone(),
        finished: finished.clone(),
    };
    wedge::start(&watchdog, catalog.clone(), bounce).map_err(StartError::Workers)?;
    tracing::info!(target: "tern::proxy", admin = %admin_addr, region = %config.region,
        workers = config.worker_count(), "tern is serving");
    // Installed before anyone is told this process is ready: a SIGUSR2 sent at once must
    // find the handler, not the default action (which ends the process).
    let usr2 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2()).ok();
    crate::listener::inherit::notify_ready();

    let node = Node {
        config: &config,
        handoff: &handoff,
        workers: &workers,
        health: &health,
        rib: &rib,
        catalog: &catalog,
    };
    let ending = node.serve_until_the_end(external, control, bounced, usr2).await;
    if matches!(ending, Ending::Upgraded(_) | Ending::Bounced(_)) {
        // Health checks on new connections reach the new process; this one stops
        // answering them before it says it drains.
        let _ = admin_stop_tx.send(true);
    }
    health.set_draining();
    // Streams never finish on their own, and keep-alive connections need not: each ends at
    // its own time in the window, so clients reconnect (to the new process, after an
    // upgrade) a few at a time. Begun before accepting stops, so nothing slips between.
    let window = match ending {
        Ending::Bounced(_) => config.shutdown.drain_window.min(wedge::BOUNCE_DRAIN),
        _ => config.shutdown.drain_window,
    };
    drain.begin(window);
    let _ = stop_accepting_tx.send(true);
    match ending {
        Ending::Upgraded(pid) | Ending::Bounced(pid) => {
            // The new process serves the admin address too from now on, and systemd
            // follows it (its READY=1 carried MAINPID). It adopted the machines this one
            // runs: from now on this one only finishes its exchanges, on the catalog as it
            // stands, and starts, wakes and stops nothing.
            let _ = admin_stop_tx.send(true);
            lifecycle.hand_over();
            let _ = halt_tx.send(true);
            tracing::info!(target: "tern::proxy", successor = pid, open_connections = workers.open_connections(),
                drain_window = ?window, "handed the listening sockets over; draining this process");
        }
        Ending::Stop | Ending::Drained => {
            handoff.close();
            crate::listener::inherit::sd_notify("STOPPING=1");
            tracing::info!(target: "tern::proxy", open_connections = workers.open_connections(),
                drain_window = ?window, deadline = ?config.limits.shutdown_timeout,
                "shutting down: no new connections; draining the open ones over the window");
        }
    }
    workers.join().await;
    // Background work (catalog, supervisor) ran on through the drain; now it stops.
    let _ = halt_tx.send(true);
    let _ = admin_stop_tx.send(true);
    let _ = admin_task.await;
    bg.stop(matches!(ending, Ending::Upgraded(_) | Ending::Bounced(_))).await;
    control_beat.abort();
    if let Some(beat) = client_beat {
        beat.abort();
    }
    finished.store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(target: "tern::proxy", "stopped");
    Ok(())
}

/// How a node's serving ends.
enum Ending {
    /// A signal (SIGTERM, SIGINT) or the caller's shutdown.
    Stop,
    /// `tern drain`: `/healthz` said 503 for `drain_delay` first.
    Drained,
    /// `tern upgrade`: a new process (this pid) serves on the same sockets.
    Upgraded(u32),
    /// The watchdog found this process wedged and a new one (this pid) took over.
    Bounced(u32),
}

/// What the control loop needs of the running node.
struct Node<'a> {
    config: &'a Config,
    handoff: &'a Arc<Handoff>,
    workers: &'a Workers,
    health: &'a Arc<Health>,
    rib: &'a Arc<dyn Rib>,
    catalog: &'a Arc<Catalog>,
}

impl Node<'_> {
    /// Serves operations from the admin address (and SIGUSR2) until one ends the node, or
    /// `external` asks it to stop.
    async fn serve_until_the_end(
        &self,
        mut external: watch::Receiver<bool>,
        mut control: tokio::sync::mpsc::UnboundedReceiver<Control>,
        mut bounced: watch::Receiver<Option<u32>>,
        mut usr2: Option<tokio::signal::unix::Signal>,
    ) -> Ending {
        loop {
            let op = tokio::select! {
                () = crate::shutdown::requested(&mut external) => return Ending::Stop,
                Ok(pid) = async { bounced.wait_for(Option::is_some).await.map(|p| p.unwrap_or(0)) } => {
                    return Ending::Bounced(pid);
                }
                Some(()) = async { usr2.as_mut()?.recv().await } => {
                    tracing::info!(target: "tern::proxy", signal = "SIGUSR2", "upgrade asked");
                    match self.upgrade(None).await {
                        Ok(pid) => return Ending::Upgraded(pid),
                        Err(_) => continue, // logged; this process keeps serving
                    }
                }
                op = control.recv() => match op {
                    Some(op) => op,
                    None => { crate::shutdown::requested(&mut external).await; return Ending::Stop }
                },
            };
            match op {
                Control::Upgrade { binary, reply } => match self.upgrade(binary).await {
                    Ok(pid) => {
                        let _ = reply.send(Ok(pid));
                        return Ending::Upgraded(pid);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                },
                Control::Drain { reply } => {
                    self.health.set_draining();
                    let _ = reply.send(Ok(()));
                    let delay = self.config.shutdown.drain_delay;
                    tracing::info!(target: "tern::proxy", ?delay,
                        "draining: /healthz says 503; listeners stay open for drain_delay");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = crate::shutdown::requested(&mut external) => {}
                    }
                    return Ending::Drained;
                }
                Control::Fault { kind, reply } => {
                    let _ = reply.send(self.inject(&kind));
                }
            }
        }
    }

    /// Starts a fresh tern (`binary`, else this one's) on this process's listening sockets
    /// and waits until it serves. Errors are logged and returned; this process serves on.
    async fn upgrade(&self, binary: Option<std::path::PathBuf>) -> Result<u32, String> {
        let binary = binary.unwrap_or_else(own_binary);
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let handoff = self.handoff.clone();
        let started = tokio::task::spawn_blocking(move || {
            handoff.start_successor(&binary, &args, SUCCESSOR_READY_WITHIN)
        })
        .await;
        match started {
            Ok(Ok(successor)) => {
                // Not waited for: it outlives this process, which leaves it to init.
                let pid = successor.pid;
                std::mem::forget(successor.child);
                tracing::info!(target: "tern::proxy", successor = pid, "the new tern is serving");
                Ok(pid)
            }
            Ok(Err(e)) => {
                tracing::error!(target: "tern::proxy", error = %e, "upgrade failed; this process keeps serving");
                Err(e.to_string())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// `[debug] faults`.
    fn inject(&self, kind: &str) -> Result<String, String> {
        match kind {
            "block-worker" => {
                if self.workers.command(0, worker::Command::Block) {
                    Ok("worker 0 blocks its thread".into())
                } else {
                    Err("no worker to block".into())
                }
            }
            "deadlock" => self.deadlock(),
            "spin" => {
                crate::watchdog::faults::arm_spin();
                Ok("the next connection spins without progress".into())
            }
            "panic" => {
                crate::tasks::panic_next("supervisor");
                Ok("the supervisor task panics at its next pass".into())
            }
            other => Err(format!("no fault {other:?} (deadlock, block-worker, spin, panic)")),
        }
    }
}

impl Node<'_> {
    /// The deadlock fault: the RIB's writer lock (which lifecycle state writes take) and
    /// worker 0's upstream idle list for a started machine (which its requests there take),
    /// each taken by one thread and wanted by the other.
    fn deadlock(&self) -> Result<String, String> {
        let snap = self.catalog.load();
        let machine = snap
            .apps()
            .flat_map(|a| a.machines.iter())
            .find(|m| m.state() == crate::model::MachineState::Started)
            .ok_or("no started machine whose requests the deadlock could stop")?;
        let (addr, id) = (machine.addr, machine.id.clone());
        let pool = self.workers.pool(0).ok_or("no worker")?;
        let rib = self.rib.clone();
        crate::watchdog::faults::deadlock(
            Box::new(move |f| rib.hold_for_fault(f)),
            Box::new(move |f| pool.hold_for_fault(addr, f)),
        )
        .map_err(|e| e.to_string())?;
        Ok(format!("rib.writer and upstream.idle (worker 0, machine {id} at {addr}) deadlocked"))
    }
}

/// How long a new process may take to load the catalog and start serving.
const SUCCESSOR_READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// The binary this process was started from, as its path now reads (an upgrade usually
/// replaces the file first; `/proc/self/exe` would still name the old one).
fn own_binary() -> std::path::PathBuf {
    match std::env::current_exe() {
        Ok(p) => {
            let s = p.to_string_lossy();
            match s.strip_suffix(" (deleted)") {
                Some(stripped) => std::path::PathBuf::from(stripped),
                None => p,
            }
        }
        Err(_) => std::path::PathBuf::from("/proc/self/exe"),
    }
}

/// A background task that died and cannot be restarted leaves the node without something
/// it needs (the catalog no longer followed, machine exits no longer heard): a wedge. It
/// is handed to the watchdog as a heartbeat that never ticks again, so it is reported,
/// with its name, `stall_after` later, and the configured action follows.
fn escalate_to(watchdog: &Arc<crate::watchdog::Watchdog>) -> crate::tasks::Escalate {
    let (watchdog, dead) = (watchdog.clone(), Arc::new(parking_lot::Mutex::new(Vec::new())));
    Arc::new(move |task: &str| {
        dead.lock().push(watchdog.heartbeat(&format!("task {task} (panicked)")));
    })
}

/// A task's handle as a future that panics if the task did: for [`crate::tasks::Tasks::watch`]
/// over a task something else spawned.
async fn rethrow(handle: tokio::task::JoinHandle<()>) {
    if let Err(e) = handle.await
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
}

fn server_limits(limits: &crate::config::Limits) -> ServerLimits {
    ServerLimits {
        header_read_timeout: limits.header_read_timeout,
        max_header_bytes: limits.max_header_bytes,
        keepalive_timeout: limits.keepalive_timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_that_cannot_restart_becomes_a_stale_heartbeat_the_watchdog_reports() {
        let dir = tempfile::tempdir().unwrap();
        let settings = crate::watchdog::Settings {
            stall_after: std::time::Duration::from_secs(2),
            action: crate::watchdog::Action::Log,
            diagnostics_dir: dir.path().to_path_buf(),
        };
        let watchdog = crate::watchdog::Watchdog::new(settings, Arc::new(Metrics::new()));
        // Kept, as the node's Tasks keep it: the dead task's heartbeat lives in it.
        let escalate = escalate_to(&watchdog);
        escalate("catalog-follow");
        let now = crate::watchdog::now_ms();
        let hooks = crate::watchdog::Hooks { on_wedge: Box::new(|_| {}), generation: Box::new(|| 0) };
        watchdog.judge(&watchdog.observe(now, None), &hooks);
        assert!(!watchdog.is_wedged(), "not before stall_after");
        watchdog.judge(&watchdog.observe(now + 2_000, Some(now + 1_950)), &hooks);
        assert!(watchdog.is_wedged());
        let status = watchdog.status_json();
        let summary = status["stalls"]["last"]["summary"].as_str().unwrap();
        assert!(summary.contains("task catalog-follow (panicked)"), "{status}");
    }
}
