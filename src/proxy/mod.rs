//! The composition root: wires listener → tls → http → routing → catalog, with upstream
//! beside http, the RIB feeding the catalog, and the admin endpoints. Nothing else imports
//! this module; `main.rs` and the integration tests call it.
//!
//! Sockets are bound first ([`Bound::bind`]) and passed in, so tests bind port 0 and learn
//! the addresses, and connections that arrive while the catalog loads wait in the backlog
//! instead of being refused.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::admin::{Admin, Health};
use crate::autostart::Lifecycle;
use crate::catalog::{self, Catalog};
use crate::config::{Config, Listen};
use crate::http::{Drain, Server, ServerLimits};
use crate::rib::{Rib, RibError};
use crate::telemetry::Metrics;
use crate::{listener, tls};

mod worker;

use worker::{Deps, Job, Workers};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{addr} is already in use{}", in_use_by(holder.as_ref()))]
    InUse { addr: SocketAddr, holder: Option<listener::holder::Holder> },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
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
}

impl Bound {
    pub fn bind(config: &Config) -> Result<Bound, StartError> {
        let bind = |addr: SocketAddr, backlog: u32| {
            listener::bind(addr, backlog).map_err(|source| match source.kind() {
                std::io::ErrorKind::AddrInUse => {
                    StartError::InUse { addr, holder: listener::holder::find(addr) }
                }
                _ => StartError::Bind { addr, source },
            })
        };
        let mut listeners = Vec::with_capacity(config.listen.len());
        for l in &config.listen {
            listeners.push((bind(l.addr, l.backlog)?, l.clone()));
        }
        let admin = bind(config.admin.addr, 128)?;
        Ok(Bound { listeners, admin })
    }

    /// The bound addresses of the proxy listeners, with whether each terminates TLS.
    pub fn addrs(&self) -> Vec<(SocketAddr, bool)> {
        self.listeners.iter().filter_map(|(l, c)| Some((l.local_addr().ok()?, c.tls))).collect()
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

/// Runs the proxy until `shutdown` turns true, then drains: `/healthz` turns 503, the
/// listeners close, and open connections and streams end at their times spread over
/// `[shutdown] drain_window` (HTTP/1.1 gets `Connection: close` on its next response,
/// HTTP/2 GOAWAY, SSE ends at an event boundary, WebSockets get close 1001; see
/// `docs/drain.md`); what is left after the window gets `limits.shutdown_timeout`.
///
/// This task (the control thread) loads the catalog, serves the admin endpoints and accepts
/// connections; [`worker`] threads serve them.
pub async fn run(
    config: Config,
    bound: Bound,
    rib: Arc<dyn Rib>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let metrics = Arc::new(Metrics::new());
    let catalog = Arc::new(Catalog::new());
    // What each published batch changed, for the lifecycle manager; it starts listening
    // after boot's reconcile, and nothing sent meanwhile is lost.
    let (feed, changes) = tokio::sync::mpsc::unbounded_channel();
    ensure_session_key(&rib).await?;
    let updater =
        catalog::updater::start(catalog.clone(), rib.clone(), metrics.clone(), shutdown.clone(), feed)
            .await?;
    let (driver_tx, driver_rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = crate::driver::build(&config, driver_tx).map_err(StartError::Driver)?;
    driver.clean_up_leftovers().await;
    let node: Arc<str> = Arc::from(config.node.clone().unwrap_or_else(|| config.region.clone()));
    // One per node, shared by the workers: a replay one worker saw routes the next
    // request whichever worker takes it.
    let replay_cache = Arc::new(crate::routing::replay_cache::ReplayCache::default());
    let lifecycle = Lifecycle::new(
        driver,
        rib,
        catalog.clone(),
        node,
        Arc::from(config.region.as_str()),
        metrics.clone(),
        replay_cache.clone(),
    );
    tokio::spawn(lifecycle.clone().watch_driver(driver_rx));
    lifecycle.reconcile_at_start();
    tokio::spawn(lifecycle.clone().follow_catalog(changes));
    let supervisor = tokio::spawn(lifecycle.clone().supervise(shutdown.clone()));
    let health = Arc::new(Health::default());
    let drain = Drain::new(&metrics);
    let deps = Deps {
        tls: tls::server_config(catalog.clone())?,
        catalog: catalog.clone(),
        metrics: metrics.clone(),
        server: Arc::new(Server::new(&server_limits(&config.limits), drain.clone())),
        limits: config.limits.clone(),
        region: Arc::from(config.region.as_str()),
        access_log: config.log.access,
        shutdown: shutdown.clone(),
        lifecycle: lifecycle.clone(),
        replay_cache,
        drain: drain.clone(),
    };
    let workers = Arc::new(Workers::start(config.worker_count(), &deps).map_err(StartError::Workers)?);

    let (admin_stop_tx, admin_stop) = watch::channel(false);
    let admin = Arc::new(Admin { catalog, metrics: metrics.clone(), health: health.clone() });
    let admin_listener = tokio::net::TcpListener::from_std(bound.admin)
        .map_err(|source| StartError::Bind { addr: config.admin.addr, source })?;
    let admin_addr = admin_listener.local_addr().unwrap_or(config.admin.addr);
    tracing::info!(target: "tern::listener", addr = %admin_addr, admin = true, "listening");
    let admin_task = tokio::spawn(admin.serve(admin_listener, admin_stop));

    let accept_tasks =
        spawn_listeners(bound.listeners, &workers, &metrics, &shutdown, config.limits.max_connections)?;
    tracing::info!(target: "tern::proxy", admin = %admin_addr, region = %config.region,
        workers = config.worker_count(), "tern is serving");

    let mut shutdown = shutdown;
    crate::shutdown::requested(&mut shutdown).await;
    health.set_draining();
    // Streams never finish on their own, and keep-alive connections need not: each ends at
    // its own time in the window, so clients reconnect elsewhere a few at a time.
    drain.begin(config.shutdown.drain_window);
    tracing::info!(target: "tern::proxy", open_connections = workers.open_connections(),
        drain_window = ?config.shutdown.drain_window, deadline = ?config.limits.shutdown_timeout,
        "shutting down: no new connections; draining the open ones over the window");
    for t in accept_tasks {
        let _ = t.await;
    }
    if let Ok(workers) = Arc::try_unwrap(workers) {
        workers.join().await;
    }
    // Machines this node runs go down with it, recorded as stopped; the next start wakes
    // them on demand.
    let _ = supervisor.await;
    lifecycle.stop_all().await;
    let _ = admin_stop_tx.send(true);
    let _ = admin_task.await;
    let _ = updater.await;
    tracing::info!(target: "tern::proxy", "stopped");
    Ok(())
}

fn server_limits(limits: &crate::config::Limits) -> ServerLimits {
    ServerLimits {
        header_read_timeout: limits.header_read_timeout,
        max_header_bytes: limits.max_header_bytes,
        keepalive_timeout: limits.keepalive_timeout,
    }
}

/// Starts one accept loop per listener, all sharing the node-wide connection cap, each
/// handing its connections to the workers.
fn spawn_listeners(
    listeners: Vec<(std::net::TcpListener, Listen)>,
    workers: &Arc<Workers>,
    metrics: &Arc<Metrics>,
    shutdown: &watch::Receiver<bool>,
    max_connections: usize,
) -> Result<Vec<tokio::task::JoinHandle<()>>, StartError> {
    let limit = Arc::new(Semaphore::new(max_connections));
    let mut accept_tasks = Vec::new();
    for (std_listener, listen) in listeners {
        let addr = std_listener.local_addr().unwrap_or(listen.addr);
        let listener = tokio::net::TcpListener::from_std(std_listener)
            .map_err(|source| StartError::Bind { addr: listen.addr, source })?;
        tracing::info!(target: "tern::listener", %addr, tls = listen.tls, "listening");
        let label: Arc<str> = Arc::from(addr.to_string());
        let (workers, conn_label, tls) = (workers.clone(), label.clone(), listen.tls);
        let on_accept = move |stream: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit| {
            // Leave this thread's reactor; the worker registers it with its own.
            match stream.into_std() {
                Ok(stream) => workers.dispatch(Job { stream, peer, tls, label: conn_label.clone(), permit }),
                Err(e) => {
                    tracing::warn!(target: "tern::listener", error = %e, "cannot hand over a connection")
                }
            }
        };
        accept_tasks.push(tokio::spawn(listener::accept_loop(
            listener,
            label,
            limit.clone(),
            metrics.clone(),
            shutdown.clone(),
            on_accept,
        )));
    }
    Ok(accept_tasks)
}
