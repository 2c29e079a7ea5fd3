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
use tokio_util::task::TaskTracker;

use crate::admin::{Admin, Health};
use crate::catalog::{self, Catalog};
use crate::config::{Config, Listen};
use crate::http::{ConnInfo, Handler, Server, ServerLimits};
use crate::rib::{Rib, RibError};
use crate::routing::Router;
use crate::telemetry::Metrics;
use crate::upstream::{Pool, PoolConfig};
use crate::{listener, tls};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the catalog: {0}")]
    Catalog(#[from] RibError),
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Listening sockets, bound but not yet accepting.
pub struct Bound {
    listeners: Vec<(std::net::TcpListener, Listen)>,
    admin: std::net::TcpListener,
}

impl Bound {
    pub fn bind(config: &Config) -> Result<Bound, StartError> {
        let bind = |addr: SocketAddr, backlog: u32| {
            listener::bind(addr, backlog).map_err(|source| StartError::Bind { addr, source })
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

/// Everything one client connection needs.
struct Shared {
    server: Server,
    handler: Arc<Handler>,
    catalog: Arc<Catalog>,
    tls: Arc<rustls::ServerConfig>,
    limits: crate::config::Limits,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    tasks: TaskTracker,
}

/// Runs the proxy until `shutdown` turns true, then drains: `/healthz` turns 503, the
/// listeners close, open connections finish their in-flight requests (HTTP/1.1 closes after
/// the current response, HTTP/2 gets GOAWAY) within `limits.shutdown_timeout`.
pub async fn run(
    config: Config,
    bound: Bound,
    rib: Arc<dyn Rib>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let metrics = Arc::new(Metrics::new());
    let catalog = Arc::new(Catalog::new());
    let updater = catalog::updater::start(catalog.clone(), rib, metrics.clone(), shutdown.clone()).await?;
    let health = Arc::new(Health::default());
    let tasks = TaskTracker::new();
    let shared = build(&config, catalog.clone(), metrics.clone(), shutdown.clone(), tasks.clone())?;

    let (admin_stop_tx, admin_stop) = watch::channel(false);
    let admin = Arc::new(Admin { catalog, metrics, health: health.clone() });
    let admin_listener = tokio::net::TcpListener::from_std(bound.admin)
        .map_err(|source| StartError::Bind { addr: config.admin.addr, source })?;
    let admin_addr = admin_listener.local_addr().unwrap_or(config.admin.addr);
    tracing::info!(target: "tern::listener", addr = %admin_addr, admin = true, "listening");
    let admin_task = tokio::spawn(admin.serve(admin_listener, admin_stop));

    let accept_tasks = spawn_listeners(bound.listeners, &shared, config.limits.max_connections)?;
    tracing::info!(target: "tern::proxy", admin = %admin_addr, region = %config.region, "tern is serving");

    let mut shutdown = shutdown;
    crate::shutdown::requested(&mut shutdown).await;
    health.set_draining();
    tracing::info!(target: "tern::proxy", open_connections = tasks.len(), deadline = ?config.limits.shutdown_timeout,
        "shutting down: no new connections; letting in-flight requests finish");
    for t in accept_tasks {
        let _ = t.await;
    }
    tasks.close();
    if tokio::time::timeout(config.limits.shutdown_timeout, tasks.wait()).await.is_err() {
        tracing::warn!(target: "tern::proxy", still_open = tasks.len(),
            "shutdown deadline passed; closing the remaining connections");
    }
    let _ = admin_stop_tx.send(true);
    let _ = admin_task.await;
    let _ = updater.await;
    tracing::info!(target: "tern::proxy", "stopped");
    Ok(())
}

/// Builds what every connection shares: the HTTP server settings, the exchange handler
/// with its upstream pool, and the TLS configuration.
fn build(
    config: &Config,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    tasks: TaskTracker,
) -> Result<Arc<Shared>, StartError> {
    let pool = Pool::new(
        PoolConfig {
            connect_timeout: config.limits.connect_timeout,
            idle_timeout: config.limits.upstream_idle_timeout,
            max_idle_per_host: config.limits.upstream_max_idle,
        },
        metrics.clone(),
    );
    tokio::spawn(pool.clone().reap_until(shutdown.clone()));
    let handler = Arc::new(Handler {
        router: Router::new(catalog.clone()),
        pool,
        metrics: metrics.clone(),
        region: Arc::from(config.region.as_str()),
        max_header_bytes: config.limits.max_header_bytes,
        access_log: config.log.access,
        tasks: tasks.clone(),
    });
    Ok(Arc::new(Shared {
        server: Server::new(&ServerLimits {
            header_read_timeout: config.limits.header_read_timeout,
            max_header_bytes: config.limits.max_header_bytes,
            keepalive_timeout: config.limits.keepalive_timeout,
        }),
        handler,
        tls: tls::server_config(catalog.clone())?,
        catalog,
        limits: config.limits.clone(),
        metrics,
        shutdown,
        tasks,
    }))
}

/// Starts one accept loop per listener, all sharing the node-wide connection cap.
fn spawn_listeners(
    listeners: Vec<(std::net::TcpListener, Listen)>,
    shared: &Arc<Shared>,
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
        let (conn_shared, conn_label, tls) = (shared.clone(), label.clone(), listen.tls);
        let on_accept = move |stream: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit| {
            let (s, label) = (conn_shared.clone(), conn_label.clone());
            conn_shared.tasks.spawn(async move { connection(s, stream, peer, tls, label, permit).await });
        };
        accept_tasks.push(tokio::spawn(listener::accept_loop(
            listener,
            label,
            limit.clone(),
            shared.metrics.clone(),
            shared.shutdown.clone(),
            on_accept,
        )));
    }
    Ok(accept_tasks)
}

async fn connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: bool,
    label: Arc<str>,
    _permit: OwnedSemaphorePermit,
) {
    let gauge = shared.metrics.open_connections.with_label_values(&[&label]);
    gauge.inc();
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(peer);
    let info = ConnInfo { peer, local, tls };
    let handler = shared.handler.clone();
    let shutdown = shared.shutdown.clone();
    if tls {
        let accepted = tls::accept(
            stream,
            shared.tls.clone(),
            &shared.catalog,
            shared.limits.tls_handshake_timeout,
            &shared.metrics,
        )
        .await;
        if let Ok(stream) = accepted {
            shared.server.serve(stream, info, handler, shutdown).await;
        }
    } else {
        shared.server.serve(stream, info, handler, shutdown).await;
    }
    gauge.dec();
}
