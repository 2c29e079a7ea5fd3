//! Worker threads. Each runs a single-threaded Tokio runtime and owns every connection it
//! accepts: the TLS handshake, the HTTP exchanges, the upstream connections (from its own
//! pool) and any tunnels all stay on one thread. A request then never hops between threads,
//! which on a busy proxy costs more in wake-ups than a second thread gains; and nothing the
//! request path touches is contended across workers but the catalog, which is lock-free.
//!
//! Each worker accepts for itself, on its own descriptor of every listening socket (the
//! same socket, so one kernel accept queue): no other thread stands between a client and a
//! worker, and a worker that wedges stops taking connections while the others take them
//! all. The kernel wakes every worker waiting on a socket when a connection arrives; the
//! first to call accept gets it, which favours the least busy.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderValue;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;

use crate::catalog::Catalog;
use crate::config::{Limits, Listen};
use crate::http::{ConnInfo, Door, Drain, Handler, Prefixed, Served, Server, Wire};
use crate::listener::proxy_protocol::{self, Header, Refused};
use crate::net::Prefix;
use crate::routing::Router;
use crate::telemetry::Metrics;
use crate::tls;
use crate::upstream::{Pool, PoolConfig};
use crate::watchdog::spin::{Counted, Guarded, Progress};
use crate::watchdog::{Beat, Parking, Watchdog, keep_beating};

use super::lot::{self, Lot};

/// One accepted connection.
pub(super) struct Job {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub tls: bool,
    pub door: Door,
    /// A `proxy_protocol` listener's trusted sources: a PROXY header comes first.
    pub proxy_from: Option<Arc<[Prefix]>>,
    pub ticket: Ticket,
}

/// What an open connection holds for as long as it is open, parked or not: its place under
/// `max_connections`, and its count in `tern_open_connections` and in the worker's load.
pub(super) struct Ticket {
    _permit: OwnedSemaphorePermit,
    _gauge: OpenGauge,
    open: Arc<AtomicUsize>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TLS client connection once its handshake is done.
type TlsIo = tls::Stream<Prefixed<Counted<TcpStream>>>;

/// What serves an HTTP connection again after it was parked, besides its socket.
pub(super) struct Conn {
    peer: SocketAddr,
    local: SocketAddr,
    door: Door,
    tls: bool,
    wire: Wire,
    _ticket: Ticket,
}

/// A parked connection's socket, as its protocol left it.
pub(super) enum Held {
    /// Taken out of Tokio's reactor.
    Plain(std::net::TcpStream),
    /// Taken out of Tokio's reactor, with its TLS session (its keys and state; its buffers
    /// are freed).
    Tls(std::net::TcpStream, Box<tls::Session>),
}

/// A connection in the lot.
pub(super) struct Rest {
    held: Held,
    conn: Conn,
}

impl lot::Car for Rest {
    fn fd(&self) -> BorrowedFd<'_> {
        match &self.held {
            Held::Plain(socket) | Held::Tls(socket, _) => socket.as_fd(),
        }
    }

    fn close(self) {
        // A TLS client is told with close_notify, written without waiting: a few bytes into
        // an idle socket's empty send buffer.
        if let Held::Tls(mut socket, mut session) = self.held {
            let _ = std::io::Write::write(&mut socket, &session.close_notify());
        }
    }
}

/// How a connection's I/O goes into the lot and comes back out.
trait Parkable: Sized + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {
    /// Its socket for the lot; itself back if it cannot be parked now (bytes read ahead
    /// wait in front of it), `None` if the socket failed.
    fn hold(self) -> Result<Option<Held>, Self>;
    /// Its socket back from the lot, with a fresh count of progress for the task that serves
    /// it now (a parked connection keeps no heap of its own).
    fn unhold(held: Held) -> Option<Self>;
    /// The busy-loop guard's count of its bytes (see [`Guarded`]).
    fn progress(&self) -> &Progress;
    /// A signal that has it give its buffers back while quiet and not parked (HTTP/2, or
    /// HTTP/1.1 with an exchange open); `None` where there are none to give (plain TCP).
    fn shed_signal(&mut self, _done: &prometheus::IntCounter) -> Option<Arc<tls::Shed>> {
        None
    }
}

impl Parkable for Prefixed<Counted<TcpStream>> {
    fn hold(self) -> Result<Option<Held>, Self> {
        Ok(self.into_inner()?.into_inner().into_std().ok().map(Held::Plain))
    }

    fn unhold(held: Held) -> Option<Self> {
        match held {
            Held::Plain(socket) => Some(socket_io(socket)?),
            Held::Tls(..) => None,
        }
    }

    fn progress(&self) -> &Progress {
        self.get_ref().progress()
    }
}

impl Parkable for TlsIo {
    fn hold(self) -> Result<Option<Held>, Self> {
        if self.get_ref().has_prefix() {
            return Err(self);
        }
        let (io, session) = self.into_parts()?;
        match io.into_inner() {
            Ok(counted) => Ok(counted.into_inner().into_std().ok().map(|socket| Held::Tls(socket, session))),
            Err(io) => Err(tls::Stream::from_parts(io, session)),
        }
    }

    fn unhold(held: Held) -> Option<Self> {
        match held {
            Held::Tls(socket, session) => Some(tls::Stream::from_parts(socket_io(socket)?, session)),
            Held::Plain(_) => None,
        }
    }

    fn progress(&self) -> &Progress {
        self.get_ref().get_ref().progress()
    }

    fn shed_signal(&mut self, done: &prometheus::IntCounter) -> Option<Arc<tls::Shed>> {
        Some(tls::Stream::shed_signal(self, done))
    }
}

/// A socket back from the lot, registered with Tokio again, its progress counted afresh.
fn socket_io(socket: std::net::TcpStream) -> Option<Prefixed<Counted<TcpStream>>> {
    Some(Prefixed::new(Counted::new(TcpStream::from_std(socket).ok()?, Progress::new())))
}

/// The worker's parking lot, if the kernel gave it one.
type SharedLot = Option<Arc<Lot<Rest>>>;

/// What every worker shares.
#[derive(Clone)]
pub(super) struct Deps {
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    pub tls: tls::ServerConfigs,
    /// For TCP services that terminate TLS: the same certificates, no ALPN.
    pub tls_raw: tls::ServerConfigs,
    pub server: Arc<Server>,
    pub limits: Limits,
    pub region: Arc<str>,
    pub access_log: bool,
    /// Turns true once the node's connections are done: background work (the pool reaper)
    /// stops.
    pub shutdown: watch::Receiver<bool>,
    /// Turns true when the worker should stop accepting: at shutdown, or once a new
    /// process has taken the listening sockets over.
    pub stop_accepting: watch::Receiver<bool>,
    /// The node-wide cap on open connections, shared by every worker's accept loops.
    pub connection_limit: Arc<Semaphore>,
    pub lifecycle: Arc<crate::autostart::Lifecycle>,
    /// Starts the worker's own background tasks (its pool's reaper) under watch.
    pub tasks: crate::tasks::Tasks,
    pub replay_cache: Arc<crate::routing::replay_cache::ReplayCache>,
    /// The node's drain: `begin` it to end connections and streams spread over a window.
    pub drain: Drain,
}

/// Something the node asks one worker to do, other than serving.
pub(super) enum Command {
    /// Fault injection: block this worker's thread forever, as a wedged worker would.
    Block,
}

struct Worker {
    commands: mpsc::UnboundedSender<Command>,
    open: Arc<AtomicUsize>,
    done: oneshot::Receiver<()>,
    /// Its upstream pool, for fault injection (its locks are real ones).
    pool: Arc<Pool>,
}

pub(super) struct Workers {
    workers: Vec<Worker>,
}

impl Workers {
    /// Starts `count` workers, each accepting on its own descriptor of every listener.
    pub fn start(
        count: usize,
        deps: &Deps,
        listeners: &[(std::net::TcpListener, Listen)],
        watchdog: &Watchdog,
    ) -> std::io::Result<Workers> {
        let mut workers = Vec::with_capacity(count);
        // Every worker's open connections, for the accept loops to keep them level.
        let loads: Arc<Vec<Arc<AtomicUsize>>> =
            Arc::new((0..count).map(|_| Arc::new(AtomicUsize::new(0))).collect());
        for i in 0..count {
            let mine = listeners
                .iter()
                .map(|(l, c)| Ok((l.try_clone()?, c.clone())))
                .collect::<std::io::Result<Vec<_>>>()?;
            let (commands, rx) = mpsc::unbounded_channel();
            let (done_tx, done) = oneshot::channel();
            let open = loads[i].clone();
            let level = Level { loads: loads.clone(), me: i };
            let (deps, open2) = (deps.clone(), open.clone());
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
            let parking = Parking::default();
            let beats = Beats {
                runtime: watchdog.heartbeat_parked(&format!("worker-{i}"), parking.clone()),
                accept: mine
                    .iter()
                    .map(|(l, c)| {
                        let addr = l.local_addr().unwrap_or(c.addr);
                        watchdog.heartbeat(&format!("accept {addr} (worker-{i})"))
                    })
                    .collect(),
            };
            let runtime =
                parking.install(tokio::runtime::Builder::new_current_thread().enable_all()).build()?;
            let pool2 = pool.clone();
            std::thread::Builder::new().name(format!("tern-worker-{i}")).spawn(move || {
                runtime.block_on(run(deps, mine, rx, open2, pool2, beats, level));
                let _ = done_tx.send(());
            })?;
            workers.push(Worker { commands, open, done, pool });
        }
        Ok(Workers { workers })
    }

    pub fn open_connections(&self) -> usize {
        self.workers.iter().map(|w| w.open.load(Ordering::Relaxed)).sum()
    }

    /// Worker `index`'s upstream pool.
    pub fn pool(&self, index: usize) -> Option<Arc<Pool>> {
        self.workers.get(index).map(|w| w.pool.clone())
    }

    /// Sends `command` to worker `index`; false if there is no such worker (or it stopped).
    pub fn command(&self, index: usize, command: Command) -> bool {
        self.workers.get(index).is_some_and(|w| w.commands.send(command).is_ok())
    }

    /// Waits until every worker has drained (or passed the shutdown deadline) and stopped.
    pub async fn join(self) {
        for w in self.workers {
            drop(w.commands);
            let _ = w.done.await;
        }
    }
}

/// Which worker this is among all of them, to defer to a less loaded one.
#[derive(Clone)]
struct Level {
    loads: Arc<Vec<Arc<AtomicUsize>>>,
    me: usize,
}

/// A worker's heartbeats: its runtime's, and one per accept loop.
struct Beats {
    runtime: Beat,
    accept: Vec<Beat>,
}

async fn run(
    deps: Deps,
    listeners: Vec<(std::net::TcpListener, Listen)>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    open: Arc<AtomicUsize>,
    pool: Arc<Pool>,
    beats: Beats,
    level: Level,
) {
    let tasks = TaskTracker::new();
    // Ends with the runtime, which retires the heartbeat with it.
    let ticking = tokio::spawn(keep_beating(beats.runtime));
    keep_reaping(&deps, &pool);
    let handler = handler(&deps, pool, &tasks);
    let deps = Arc::new(deps);
    let lot = open_lot(&deps, &handler, &tasks);
    let mut accepting = Vec::with_capacity(listeners.len());
    for ((std_listener, listen), beat) in listeners.into_iter().zip(beats.accept) {
        let addr = std_listener.local_addr().unwrap_or(listen.addr);
        let listener = match tokio::net::TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(target: "tern::listener", %addr, error = %e, "a worker cannot accept on a listener");
                continue;
            }
        };
        let label: Arc<str> = Arc::from(addr.to_string());
        // Resolved once per listener: `with_label_values` takes the metric family's lock, which
        // the accept path should not. Listener series are never removed, so the handle stays live.
        let gauge = deps.metrics.open_connections.with_label_values(&[&label]);
        let (deps2, handler, open, tasks, lot) =
            (deps.clone(), handler.clone(), open.clone(), tasks.clone(), lot.clone());
        let (tls, door) = (listen.tls, Door::of(&listen));
        let proxy_from: Option<Arc<[Prefix]>> =
            listen.proxy_protocol.then(|| listen.proxy_protocol_from.clone().into());
        let on_accept = move |stream: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit| {
            open.fetch_add(1, Ordering::Relaxed);
            let ticket = Ticket {
                _permit: permit,
                // Counted open for as long as this runs, however it ends (cancelled at
                // shutdown too), parked or not.
                _gauge: OpenGauge::inc(gauge.clone()),
                open: open.clone(),
            };
            let job = Job { stream, peer, tls, door, proxy_from: proxy_from.clone(), ticket };
            let (deps, handler, lot) = (deps2.clone(), handler.clone(), lot.clone());
            // Each poll a turn of the clock its bookkeeping reads (see `clock::now`).
            tasks.spawn(crate::clock::Turns::new(async move { connection(&deps, handler, &lot, job).await }));
        };
        accepting.push(tokio::spawn(crate::listener::accept_loop(
            listener,
            label,
            deps.connection_limit.clone(),
            deps.metrics.clone(),
            deps.stop_accepting.clone(),
            crate::listener::Pacing {
                beat: Some(beat),
                defer: Some({
                    let level = level.clone();
                    Box::new(move || crate::listener::ahead(&level.loads, level.me))
                }),
            },
            on_accept,
        )));
    }
    // Serve until the node stops accepting; connections carry on meanwhile.
    let mut stop_accepting = deps.stop_accepting.clone();
    loop {
        tokio::select! {
            () = crate::shutdown::requested(&mut stop_accepting) => break,
            command = commands.recv() => match command {
                Some(Command::Block) => block_this_thread(),
                None => crate::shutdown::requested(&mut stop_accepting).await,
            },
        }
    }
    for a in accepting {
        let _ = a.await;
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
    ticking.abort();
    // Whatever is left is cancelled when the runtime drops.
}

/// What serves this worker's requests.
fn handler(deps: &Deps, pool: Arc<Pool>, tasks: &TaskTracker) -> Arc<Handler> {
    Arc::new(Handler {
        router: Router::new(deps.catalog.clone()).with_nearest(deps.lifecycle.nearest().cloned()),
        pool,
        metrics: deps.metrics.clone(),
        region: deps.region.clone(),
        region_header: HeaderValue::from_str(&deps.region).unwrap_or(HeaderValue::from_static("-")),
        max_header_bytes: deps.limits.max_header_bytes,
        max_response_header_bytes: deps.limits.max_response_header_bytes,
        access_log: deps.access_log,
        tasks: tasks.clone(),
        lifecycle: deps.lifecycle.clone(),
        replay_cache: deps.replay_cache.clone(),
    })
}

/// The pool's reaper, restarted if it panics, until the node's background work stops.
fn keep_reaping(deps: &Deps, pool: &Arc<Pool>) {
    let (pool, shutdown) = (pool.clone(), deps.shutdown.clone());
    deps.tasks.keep(&tokio::runtime::Handle::current(), "pool-reaper", move || {
        pool.clone().reap_until(shutdown.clone(), crate::alloc::give_back)
    });
}

/// Fault injection (`[debug] faults`): this worker's thread stops, as if a task had made a
/// blocking call that never returns. Its connections hang; the watchdog must notice.
fn block_this_thread() {
    tracing::warn!(target: "tern::proxy", thread = ?std::thread::current().name(),
        "fault injected: blocking this worker thread forever");
    loop {
        std::thread::park();
    }
}

/// A connection to a `proxy_protocol` listener: its peer checked against the listener's
/// `from`, then its PROXY header read. The client's address and the one it reached, as the
/// header gives them (or the connection's own, for a header that gives none); `None` when
/// the connection is refused (counted and logged).
async fn proxy_header(
    deps: &Deps,
    from: &[Prefix],
    peer: SocketAddr,
    local: SocketAddr,
    stream: &mut Prefixed<Counted<TcpStream>>,
) -> Option<(SocketAddr, SocketAddr)> {
    let read = async {
        if !from.iter().any(|p| p.contains(peer.ip())) {
            return Err(Refused::UntrustedSource);
        }
        proxy_protocol::read(stream, deps.limits.header_read_timeout).await
    };
    match read.await {
        Ok((header, rest)) => {
            stream.unread(rest);
            Some(match header {
                Header::Proxied { source, destination } => (source, destination),
                Header::Local => (peer, local),
            })
        }
        Err(why) => {
            deps.metrics.proxy_protocol_refused.with_label_values(&[why.as_str()]).inc();
            tracing::debug!(target: "tern::listener", %peer, %local, reason = why.as_str(), "{why}: connection closed");
            None
        }
    }
}

impl Deps {
    /// A TLS handshake on `stream` with `configs`, within the handshake timeout, counted.
    fn handshake<'a, IO>(
        &'a self,
        stream: IO,
        configs: &'a tls::ServerConfigs,
    ) -> impl Future<Output = Result<tls::Stream<IO>, tls::HandshakeFailure>> + 'a
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'a,
    {
        tls::accept(stream, configs, &self.catalog, self.limits.tls_handshake_timeout, &self.metrics)
    }
}

/// A connection to a TCP service: routed by its destination (or SNI), then HTTP for an
/// `http` service (the app's alone), or relayed to a machine, after TLS if the service
/// terminates it.
async fn serve_tcp(
    deps: &Deps,
    mut stream: Prefixed<Counted<TcpStream>>,
    info: ConnInfo,
    handler: Arc<Handler>,
) {
    let (peer, local) = (info.peer, info.local);
    let Some(route) = deps.server.route_tcp(&mut stream, &info, &handler).await else { return };
    let info = ConnInfo { tls: route.handling.tls, app: Some(route.app.name.clone()), ..info };
    match route.handling {
        // Not parked: the app it is pinned to would be lost.
        h if h.http && h.tls => Box::pin(serve_tls(deps, stream, info, handler, None)).await,
        h if h.http => Box::pin(deps.server.serve(stream, info, handler, Wire::Sniff)).await,
        h if h.tls => match Box::pin(deps.handshake(stream, &deps.tls_raw)).await {
            Ok(mut tls) => {
                // The session tickets go out now, as far as the socket takes them without
                // waiting (a client that reads nothing cannot hold the task here): the relay
                // may first wake a machine, and nothing reads or writes the stream until it
                // is relaying. What the socket does not take goes with the first relayed bytes.
                std::future::poll_fn(|cx| {
                    let _ = tokio::io::AsyncWrite::poll_flush(std::pin::Pin::new(&mut tls), cx);
                    std::task::Poll::Ready(())
                })
                .await;
                Box::pin(deps.server.relay_tcp(tls, &route, peer, local, &handler)).await
            }
            Err(_) => deps.metrics.tcp_refused.with_label_values(&["tls"]).inc(),
        },
        _ => Box::pin(deps.server.relay_tcp(stream, &route, peer, local, &handler)).await,
    }
}

/// A TLS connection: its handshake, then HTTP in the protocol ALPN chose. With `parking`
/// (its lot and what serves it again), HTTP/1.1 waits in the lot between requests.
async fn serve_tls(
    deps: &Deps,
    stream: Prefixed<Counted<TcpStream>>,
    mut info: ConnInfo,
    handler: Arc<Handler>,
    parking: Option<(&SharedLot, Conn)>,
) {
    // The handshake's state is boxed and freed once it is done; the stream moves into its
    // serving future before that is awaited. The task keeps room for neither. A spinning
    // handshake is closed by its guard; what serves the connection after it has its own.
    let progress = stream.get_ref().progress().clone();
    let handshake = Box::pin(deps.handshake(stream, &deps.tls));
    let serving = match Guarded::new(handshake, progress, "tls", info.peer, deps.metrics.clone()).await {
        Ok(Ok(mut stream)) => {
            let wire = match stream.alpn_protocol() {
                Some(b"h2") => Wire::Http2,
                _ => Wire::Http1,
            };
            info.shed = Some(stream.shed_signal(&deps.metrics.tls_buffers_shed));
            let serving: Pin<Box<dyn Future<Output = ()> + Send + '_>> = match parking {
                Some((lot, conn)) => {
                    Box::pin(serve_parking(deps, handler, lot, stream, Conn { wire, ..conn }, None))
                }
                None => Box::pin(deps.server.serve(stream, info, handler, wire)),
            };
            serving
        }
        Ok(Err(_)) | Err(_) => return,
    };
    serving.await;
}

async fn connection(deps: &Deps, handler: Arc<Handler>, lot: &SharedLot, job: Job) {
    let Job { stream, peer, tls, door, proxy_from, ticket } = job;
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().unwrap_or(peer);
    // The busy-loop guard: every byte read or written counts as progress; a connection
    // task woken thousands of times a second without any is closed (spin::Guarded).
    let progress = Progress::new();
    let mut stream = Prefixed::new(Counted::new(stream, progress.clone()));
    let (peer, local) = match proxy_from {
        None => (peer, local),
        // Boxed: only these connections keep room for reading the header.
        Some(from) => match Box::pin(proxy_header(deps, &from, peer, local, &mut stream)).await {
            Some(addrs) => addrs,
            None => return,
        },
    };
    if door.is_tcp() {
        let _ticket = ticket;
        let serve = Box::pin(serve_tcp(deps, stream, ConnInfo::new(peer, local, tls, door), handler));
        let _ = Guarded::new(serve, progress, "tcp", peer, deps.metrics.clone()).await;
        return;
    }
    let conn = Conn { peer, local, door, tls, wire: Wire::Sniff, _ticket: ticket };
    // Each protocol's future boxed on its own and only that one made: a connection's task
    // holds its own protocol's state, not room for the largest (a TLS stream's is KBs).
    if !tls {
        return Box::pin(serve_parking(deps, handler, lot, stream, conn, None)).await;
    }
    // Guarded inside, each part on its own: a connection in the lot has no task to guard.
    let info = ConnInfo::new(peer, local, tls, door);
    Box::pin(serve_tls(deps, stream, info, handler, Some((lot, conn)))).await;
}

/// An HTTP connection (plain, or TLS once its handshake is done), served until it closes or
/// is parked in the worker's lot; `seat` is its place in the drain if it was parked before.
async fn serve_parking<IO: Parkable>(
    deps: &Deps,
    handler: Arc<Handler>,
    lot: &SharedLot,
    mut io: IO,
    mut conn: Conn,
    mut seat: Option<crate::http::drain::Seat>,
) {
    // Handed back to be parked only if there is a lot to park it in; one the lot refuses
    // waits in this task from then on.
    let mut parks = lot.is_some();
    let protocol = if conn.tls { "tls" } else { "http" };
    loop {
        let mut info = ConnInfo::new(conn.peer, conn.local, conn.tls, conn.door);
        info.shed = io.shed_signal(&deps.metrics.tls_buffers_shed);
        let progress = io.progress().clone();
        let serve = Box::pin(deps.server.serve_or_park(io, info, handler.clone(), conn.wire, seat, parks));
        // A spinning connection is logged and counted by the guard; dropping it closes it.
        let guarded = Guarded::new(serve, progress, protocol, conn.peer, deps.metrics.clone());
        let Ok(Served::Parked(parked)) = guarded.await else { return };
        let Some(lot) = lot else { return };
        conn.wire = parked.wire;
        let held = match parked.io.hold() {
            Ok(Some(held)) => held,
            Ok(None) => return,
            Err(io_back) => {
                (io, seat, parks) = (io_back, Some(parked.seat), false);
                continue;
            }
        };
        let rest = Rest { held, conn };
        let back = match lot.park(lot::Parked { seat: parked.seat, quiet_until: parked.quiet_until, rest }) {
            Ok(()) => return,
            Err(back) => back,
        };
        parks = false;
        let Rest { held, conn: again } = back.rest;
        let Some(unheld) = IO::unhold(held) else { return };
        (io, conn, seat) = (unheld, again, Some(back.seat));
    }
}

/// A parked connection whose client sent something (or closed): served again.
async fn resume(deps: Arc<Deps>, handler: Arc<Handler>, lot: SharedLot, parked: lot::Parked<Rest>) {
    let lot::Parked { seat, rest: Rest { held, conn }, .. } = parked;
    match held {
        Held::Plain(socket) => {
            let Some(io) = socket_io(socket) else { return };
            Box::pin(serve_parking(&deps, handler, &lot, io, conn, Some(seat))).await;
        }
        Held::Tls(socket, session) => {
            let Some(io) = socket_io(socket) else { return };
            let tls = tls::Stream::from_parts(io, session);
            Box::pin(serve_parking(&deps, handler, &lot, tls, conn, Some(seat))).await;
        }
    }
}

/// The worker's parking lot, and the task that waits on it until the drain has closed what
/// it holds.
fn open_lot(deps: &Arc<Deps>, handler: &Arc<Handler>, tasks: &TaskTracker) -> SharedLot {
    let lot = match Lot::new(deps.metrics.connections_parked_now.clone(), crate::alloc::give_back) {
        Ok(lot) => Arc::new(lot),
        Err(e) => {
            tracing::warn!(target: "tern::proxy", error = %e,
                "no parking lot: quiet connections keep a task each");
            return None;
        }
    };
    let (deps, handler, waiting, spawner) = (deps.clone(), handler.clone(), lot.clone(), tasks.clone());
    tasks.spawn(async move {
        let drain = deps.drain.clone();
        let shared = Some(waiting.clone());
        waiting
            .run(async move { drain.begun().await }, |parked| {
                spawner.spawn(crate::clock::Turns::new(resume(
                    deps.clone(),
                    handler.clone(),
                    shared.clone(),
                    parked,
                )));
            })
            .await;
    });
    Some(lot)
}

/// One open connection in `tern_open_connections`, until dropped.
struct OpenGauge(prometheus::IntGauge);

impl OpenGauge {
    fn inc(gauge: prometheus::IntGauge) -> OpenGauge {
        gauge.inc();
        OpenGauge(gauge)
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}
