//! Worker threads. Each runs a single-threaded Tokio runtime and owns every connection it
//! is handed: the TLS handshake, the HTTP exchanges, the upstream connections (from its own
//! pool) and any tunnels all stay on one thread. A request then never hops between threads,
//! which on a busy proxy costs more in wake-ups than a second thread gains; and nothing the
//! request path touches is contended across workers but the catalog, which is lock-free.
//!
//! The control thread accepts connections and hands each to the worker with the fewest
//! open connections, once per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::catalog::Catalog;
use crate::config::Limits;
use crate::http::{ConnInfo, Drain, Handler, Server, Wire};
use crate::routing::Router;
use crate::telemetry::Metrics;
use crate::tls;
use crate::upstream::{Pool, PoolConfig};

/// One accepted connection on its way to a worker.
pub(super) struct Job {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    pub tls: bool,
    pub label: Arc<str>,
    pub permit: OwnedSemaphorePermit,
}

/// What every worker shares.
#[derive(Clone)]
pub(super) struct Deps {
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    pub tls: Arc<rustls::ServerConfig>,
    pub server: Arc<Server>,
    pub limits: Limits,
    pub region: Arc<str>,
    pub access_log: bool,
    pub shutdown: watch::Receiver<bool>,
    pub lifecycle: Arc<crate::autostart::Lifecycle>,
    pub replay_cache: Arc<crate::routing::replay_cache::ReplayCache>,
    /// The node's drain: `begin` it to end connections and streams spread over a window.
    pub drain: Drain,
}

struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    open: Arc<AtomicUsize>,
    done: oneshot::Receiver<()>,
}

pub(super) struct Workers {
    workers: Vec<Worker>,
}

impl Workers {
    pub fn start(count: usize, deps: &Deps) -> std::io::Result<Workers> {
        let mut workers = Vec::with_capacity(count);
        for i in 0..count {
            let (jobs, rx) = mpsc::unbounded_channel();
            let (done_tx, done) = oneshot::channel();
            let open = Arc::new(AtomicUsize::new(0));
            let (deps, open2) = (deps.clone(), open.clone());
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            std::thread::Builder::new().name(format!("tern-worker-{i}")).spawn(move || {
                runtime.block_on(run(deps, rx, open2));
                let _ = done_tx.send(());
            })?;
            workers.push(Worker { jobs, open, done });
        }
        Ok(Workers { workers })
    }

    /// Hands a connection to the worker with the fewest open connections.
    pub fn dispatch(&self, job: Job) {
        let Some(w) = self.workers.iter().min_by_key(|w| w.open.load(Ordering::Relaxed)) else { return };
        // Counted here, not when the worker picks it up, so a burst spreads evenly.
        w.open.fetch_add(1, Ordering::Relaxed);
        if w.jobs.send(job).is_err() {
            w.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn open_connections(&self) -> usize {
        self.workers.iter().map(|w| w.open.load(Ordering::Relaxed)).sum()
    }

    /// Waits until every worker has drained (or passed the shutdown deadline) and stopped.
    pub async fn join(self) {
        for w in self.workers {
            drop(w.jobs);
            let _ = w.done.await;
        }
    }
}

async fn run(deps: Deps, mut jobs: mpsc::UnboundedReceiver<Job>, open: Arc<AtomicUsize>) {
    let tasks = TaskTracker::new();
    let pool = Pool::new(
        PoolConfig {
            connect_timeout: deps.limits.connect_timeout,
            idle_timeout: deps.limits.upstream_idle_timeout,
            max_idle_per_host: deps.limits.upstream_max_idle,
            max_connecting: deps.limits.upstream_max_connecting,
            max_response_head: deps.limits.max_response_header_bytes,
        },
        deps.metrics.clone(),
    );
    tokio::spawn(pool.clone().reap_until(deps.shutdown.clone()));
    let handler = Arc::new(Handler {
        router: Router::new(deps.catalog.clone()),
        pool,
        metrics: deps.metrics.clone(),
        region: deps.region.clone(),
        max_header_bytes: deps.limits.max_header_bytes,
        max_response_header_bytes: deps.limits.max_response_header_bytes,
        access_log: deps.access_log,
        tasks: tasks.clone(),
        lifecycle: deps.lifecycle.clone(),
        replay_cache: deps.replay_cache.clone(),
    });
    let deps = Arc::new(deps);
    let mut shutdown = deps.shutdown.clone();
    loop {
        let job = tokio::select! {
            job = jobs.recv() => job,
            () = crate::shutdown::requested(&mut shutdown) => None,
        };
        let Some(job) = job else { break };
        let (deps, handler, open) = (deps.clone(), handler.clone(), open.clone());
        tasks.spawn(async move {
            connection(&deps, handler, job).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    tasks.close();
    // Connections end at their times in the drain; what is left after its window gets
    // shutdown_timeout more.
    tokio::select! {
        () = tasks.wait() => {}
        () = deps.drain.cut_after(deps.limits.shutdown_timeout) => {
            tracing::warn!(target: "tern::proxy", still_open = tasks.len(),
                "drain window and shutdown deadline passed; closing the remaining connections");
        }
    }
    // Whatever is left is cancelled when the runtime drops.
}

async fn connection(deps: &Deps, handler: Arc<Handler>, job: Job) {
    let Job { stream, peer, tls, label, permit } = job;
    let _permit = permit;
    let stream = match tokio::net::TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(target: "tern::listener", error = %e, "cannot adopt an accepted connection");
            return;
        }
    };
    let gauge = deps.metrics.open_connections.with_label_values(&[&label]);
    gauge.inc();
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(peer);
    let info = ConnInfo { peer, local, tls };
    if tls {
        let accepted = tls::accept(
            stream,
            deps.tls.clone(),
            &deps.catalog,
            deps.limits.tls_handshake_timeout,
            &deps.metrics,
        )
        .await;
        if let Ok(stream) = accepted {
            let wire = match stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => Wire::Http2,
                _ => Wire::Http1,
            };
            deps.server.serve(stream, info, handler, wire).await;
        }
    } else {
        deps.server.serve(stream, info, handler, Wire::Sniff).await;
    }
    gauge.dec();
}
