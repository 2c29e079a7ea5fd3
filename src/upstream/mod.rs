//! Connections to machines: HTTP/1.1 over pooled keep-alive connections, or h2c (HTTP/2 with
//! prior knowledge) as a per-app option.
//!
//! tern keeps its own small pool instead of a full client so that connecting and sending
//! are separate steps: when a machine refuses the connection, the request (and its unread
//! body) is still in hand and can go to another machine. A pooled connection that turns
//! out to be dead before the request was written hands the request back too.
//!
//! New connections to one machine are opened at most `max_connecting` at a time per worker,
//! and one at a time for h2c. A burst, such as every request held for a machine that just
//! woke, takes whatever pooled connection comes back or slot frees first, all within
//! `connect_timeout`; for h2c, every held request shares the one connection the first of
//! them opens, instead of each opening its own. This caps how many connects are in
//! progress, never how many connections are open: a long stream holds its connection, not
//! a slot.
//!
//! A pooled HTTP/1.1 connection quiet for [`COOL_AFTER`] cools: hyper's state for it (its
//! buffers and its task, about 36 KB) is freed and only the socket is kept, out of Tokio's
//! reactor, the way a quiet client connection is parked. The next request that takes it
//! checks the socket is still open and not sending (one `recv` with `MSG_PEEK`) and starts
//! a new hyper connection on it. One whose last request had a body stays warm: hyper may
//! still hold part of that body unsent (a machine that answered without reading it all), and
//! it would be lost with hyper's state while the socket lived on. An exchange that upgrades
//! (a WebSocket) always gets a connection of its own, which is never pooled: only a
//! connection driven for upgrades can hand its socket over to one, and only one that is not
//! can give its socket back to cool.
//!
//! A `GET`, `HEAD` or `OPTIONS` without a body goes through tern's own HTTP/1.1 exchange
//! ([`h1`]) rather than hyper's client: no connection task and no channel per request, and
//! no allocation for the exchange. A new or cooled connection starts as a bare socket and
//! becomes hyper's only when a request needs it (a body to send); a connection hyper drove
//! that went back to the pool stays hyper's until it cools.
//!
//! It sends what routing decided; it knows nothing of apps or hostnames.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::telemetry::Metrics;
use crate::watchdog::lock::Mutex;

mod h1;

pub use h1::give_back_fields;

/// Fields a request goes out with after its header map's own: tern's forwarding fields
/// (`X-Forwarded-For`, `Fly-Client-IP`, `Via` and the rest), the same for every request of a
/// connection. tern's own exchange writes them straight into the head it writes; any other
/// sender (hyper's HTTP/1.1 or h2c client) gets them added to the map first. Inserting nine
/// fields into a map costs about 7% of a proxied GET's instructions; writing them, a copy.
pub trait Extra: Sync {
    /// Writes the fields as HTTP/1.1 header lines (`name: value\r\n`).
    fn write(&self, buf: &mut bytes::BytesMut);
    /// Sets the fields in `headers`, replacing any of the same name: doing it twice does
    /// what doing it once does.
    fn add_to(&self, headers: &mut HeaderMap);
}

/// The body sent to machines: one tern holds whole, read in with its request's head (tern's
/// own exchange writes it in the head's write), or one sent as it is read.
pub enum UpBody {
    /// All of it; `None` once sent (or when there is none).
    Whole(Option<Bytes>),
    Stream(http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>),
}

impl UpBody {
    /// A body sent as it is read.
    pub fn stream<B>(body: B) -> UpBody
    where
        B: http_body::Body<Data = Bytes, Error = BoxError> + Send + 'static,
    {
        UpBody::Stream(http_body_util::BodyExt::boxed_unsync(body))
    }

    /// The bytes of a body held whole (empty for none); `None` for a streamed one.
    pub fn whole(&self) -> Option<&[u8]> {
        match self {
            UpBody::Whole(bytes) => Some(bytes.as_deref().unwrap_or_default()),
            UpBody::Stream(_) => None,
        }
    }
}

impl std::fmt::Debug for UpBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpBody::Whole(b) => f.debug_tuple("Whole").field(&b.as_ref().map(Bytes::len)).finish(),
            UpBody::Stream(_) => f.write_str("Stream"),
        }
    }
}

impl http_body::Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpBody::Whole(bytes) => std::task::Poll::Ready(
                bytes.take().filter(|b| !b.is_empty()).map(|b| Ok(http_body::Frame::data(b))),
            ),
            UpBody::Stream(body) => std::pin::Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Whole(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            UpBody::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpBody::Whole(bytes) => {
                http_body::SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            UpBody::Stream(body) => body.size_hint(),
        }
    }
}
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Http1,
    H2c,
}

#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
    /// Most connections being opened to one machine at once; more requests wait for one
    /// of those, or for a pooled connection to come back, whichever is first.
    pub max_connecting: usize,
    /// Largest response head tern reads from a machine; hyper's read buffer is sized from
    /// it, so a bigger head fails to parse instead of being buffered whole.
    pub max_response_head: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    proto: Proto,
}

/// How long a pooled HTTP/1.1 connection stays warm (hyper's state kept, ready at once)
/// before it cools to its socket alone.
pub const COOL_AFTER: Duration = Duration::from_secs(1);

/// A pooled HTTP/1.1 connection and, shared with the task that drives it, whether the pool
/// asked it to cool: then the task, once hyper is done, gives the socket back instead of
/// closing it.
struct H1 {
    sender: http1::SendRequest<UpBody>,
    cool: Arc<AtomicBool>,
    /// Whether it may cool: its last request had no body (see [`Pool::cool`]).
    coolable: bool,
}

/// A warm connection in the pool: hyper's, its task running, or tern's own
/// ([`h1::exchange`]), its socket alone, still in Tokio's reactor.
enum Warm {
    Hyper(H1),
    Own(h1::Conn),
}

struct IdleConn {
    conn: Warm,
    since: Instant,
}

/// A cooled connection: its socket, out of Tokio's reactor.
struct ColdConn {
    socket: std::net::TcpStream,
    since: Instant,
}

struct HostPool {
    idle: Mutex<Vec<IdleConn>>,
    cold: Mutex<Vec<ColdConn>>,
    h2: Mutex<Option<http2::SendRequest<UpBody>>>,
    /// Connects in progress to this machine.
    connecting: AtomicUsize,
    /// Connections in `cold`, read without its lock where a connection is given back.
    cold_len: AtomicUsize,
    /// A connection came back to `idle`, or a connect finished (a slot is free; for h2c,
    /// the shared connection may be up).
    available: Notify,
    /// A connect finished: what an exchange that upgrades waits for (it takes no pooled
    /// connection, so a connection given back must not wake it in another's place).
    slot_free: Notify,
}

impl Default for HostPool {
    fn default() -> Self {
        HostPool {
            idle: Mutex::new("upstream.idle", Vec::new()),
            cold: Mutex::new("upstream.cold", Vec::new()),
            h2: Mutex::new("upstream.h2", None),
            connecting: AtomicUsize::new(0),
            cold_len: AtomicUsize::new(0),
            available: Notify::new(),
            slot_free: Notify::new(),
        }
    }
}

/// Connections to every machine, keyed by address and protocol.
pub struct Pool {
    /// Looked up once per proxied request (the entry goes with the connection); its keys are the catalog's machine addresses,
    /// never a client's, so a fast hash (not SipHash's flood resistance) is enough.
    hosts: DashMap<Key, Arc<HostPool>, foldhash::fast::RandomState>,
    config: PoolConfig,
    metrics: Arc<Metrics>,
    /// A connection went back to the pool warm: the reaper's cue to cool it later.
    warm: Notify,
}

/// A connection ready for one request.
pub struct Conn {
    sender: Sender,
    key: Key,
    reused: bool,
    pool: Arc<Pool>,
    /// The machine's entry in `pool`, held from checkout to hand-back: the connection goes
    /// back without looking the machine up again (and the reaper keeps an entry held).
    host: Arc<HostPool>,
}

enum Sender {
    H1(H1),
    /// A socket for tern's own exchange, or for hyper's if the request does not fit it.
    Own(h1::Conn),
    H2(http2::SendRequest<UpBody>),
}

/// What the pool has for a request to a machine.
enum Pooled {
    Warm(Sender),
    Cold(std::net::TcpStream),
}

/// A machine's response body: read by hyper's client, or by tern's own exchange.
pub enum MachineBody {
    Hyper(Incoming),
    Own(h1::Body),
}

impl http_body::Body for MachineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            MachineBody::Hyper(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
            MachineBody::Own(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MachineBody::Hyper(b) => b.is_end_stream(),
            MachineBody::Own(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            MachineBody::Hyper(b) => b.size_hint(),
            MachineBody::Own(b) => b.size_hint(),
        }
    }
}

/// Why sending to a machine failed: hyper's error, or tern's own exchange's.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    Own(#[from] h1::Error),
}

impl UpError {
    /// The response head was over the size allowed (its bytes, or its number of fields).
    pub fn is_too_large(&self) -> bool {
        match self {
            UpError::Hyper(e) => e.is_parse_too_large(),
            UpError::Own(e) => e.is_too_large(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("connecting to {addr}: {source}")]
pub struct ConnectError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

pub enum SendError {
    /// The request was not written, or (tern's own exchange, which carries only requests
    /// that may be sent twice) the connection failed before any answer: safe to send again
    /// on another connection.
    NotSent(Box<Request<UpBody>>, UpError),
    /// The request was (or may have been) written; it cannot be replayed.
    Failed(UpError),
}

impl Pool {
    pub fn new(config: PoolConfig, metrics: Arc<Metrics>) -> Arc<Pool> {
        Arc::new(Pool { hosts: DashMap::default(), config, metrics, warm: Notify::new() })
    }

    /// A connection to `addr`: an idle pooled one if there is one, else a new one once fewer
    /// than `max_connecting` are being opened; within `connect_timeout` in all. An exchange
    /// that `upgrade`s gets a new one, driven so that it can become the tunnel.
    pub async fn checkout(
        self: &Arc<Self>,
        addr: SocketAddr,
        proto: Proto,
        upgrade: bool,
    ) -> Result<Conn, ConnectError> {
        let key = Key { addr, proto };
        if !upgrade && let Some(conn) = self.take_pooled(key).await {
            return Ok(conn);
        }
        let deadline = Instant::now() + self.config.connect_timeout;
        let host = self.host(key);
        loop {
            let available = if upgrade { host.slot_free.notified() } else { host.available.notified() };
            tokio::pin!(available);
            // Registered before looking, so a hand-back between the look and the wait is seen.
            available.as_mut().enable();
            if !upgrade && let Some(conn) = self.take_pooled(key).await {
                return Ok(conn);
            }
            if let Some(slot) = Slot::take(&host, key.proto, self.config.max_connecting) {
                // Boxed: dialling is the rare way out, and its future would otherwise be most
                // of every checkout's, copied along with each request's exchange.
                return Box::pin(self.connect(key, deadline, slot, upgrade)).await;
            }
            if tokio::time::timeout_at(deadline, available).await.is_err() {
                self.metrics.upstream_connect_errors.inc();
                return Err(ConnectError { addr, source: std::io::ErrorKind::TimedOut.into() });
            }
        }
    }

    /// A new connection, never a pooled one: for retrying a request a dead pooled
    /// connection handed back. It takes no slot: it replaces a connection that just died.
    pub async fn connect_fresh(
        self: &Arc<Self>,
        addr: SocketAddr,
        proto: Proto,
        upgrade: bool,
    ) -> Result<Conn, ConnectError> {
        let key = Key { addr, proto };
        let slot = Slot::force(&self.host(key), proto);
        Box::pin(self.connect(key, Instant::now() + self.config.connect_timeout, slot, upgrade)).await
    }

    /// Fault injection only (`[debug] faults`): runs `f` while holding the HTTP/1.1 idle
    /// list of the machine at `addr`, which every request to it takes (to check a
    /// connection out and back in), so a deadlock made with it (`watchdog::faults::deadlock`)
    /// stops this pool's worker at its next request there.
    pub fn hold_for_fault(&self, addr: SocketAddr, f: &mut dyn FnMut()) {
        let host = self.host(Key { addr, proto: Proto::Http1 });
        let _idle = host.idle.lock();
        f();
    }

    fn host(&self, key: Key) -> Arc<HostPool> {
        if let Some(h) = self.hosts.get(&key) {
            return h.clone();
        }
        self.hosts.entry(key).or_default().clone()
    }

    /// A pooled connection, warm or cooled (started again), if there is one.
    async fn take_pooled(self: &Arc<Self>, key: Key) -> Option<Conn> {
        let host = self.hosts.get(&key)?.clone();
        loop {
            let sender = match self.take_idle(&host, key.proto)? {
                Pooled::Warm(sender) => sender,
                Pooled::Cold(socket) => {
                    let Ok(stream) = TcpStream::from_std(socket) else { continue };
                    Sender::Own(h1::Conn::new(stream))
                }
            };
            return Some(Conn { sender, key, reused: true, pool: self.clone(), host });
        }
    }

    fn take_idle(&self, host: &HostPool, proto: Proto) -> Option<Pooled> {
        match proto {
            Proto::Http1 => {
                let mut idle = host.idle.lock();
                // Most recently used first: the likeliest to be alive and warm.
                while let Some(c) = idle.pop() {
                    if crate::clock::now().saturating_duration_since(c.since) >= self.config.idle_timeout {
                        continue;
                    }
                    match c.conn {
                        Warm::Hyper(conn) if conn.sender.is_ready() => {
                            return Some(Pooled::Warm(Sender::H1(conn)));
                        }
                        Warm::Own(conn) if h1::still_open(&conn.stream) => {
                            return Some(Pooled::Warm(Sender::Own(conn)));
                        }
                        _ => {}
                    }
                }
                drop(idle);
                let mut cold = host.cold.lock();
                while let Some(c) = cold.pop() {
                    host.cold_len.store(cold.len(), Ordering::Relaxed);
                    if c.since.elapsed() < self.config.idle_timeout && still_open(&c.socket) {
                        return Some(Pooled::Cold(c.socket));
                    }
                }
                None
            }
            Proto::H2c => {
                let h2 = host.h2.lock();
                h2.as_ref().filter(|s| !s.is_closed()).map(|s| Pooled::Warm(Sender::H2(s.clone())))
            }
        }
    }

    /// A connection tern's own exchange read a response on to its end, back warm.
    fn put_raw(&self, host: &HostPool, conn: h1::Conn) {
        self.put_idle_in(host, Warm::Own(conn));
    }

    fn put_idle(&self, key: Key, conn: Warm) {
        self.put_idle_in(&self.host(key), conn);
    }

    fn put_idle_in(&self, host: &HostPool, conn: Warm) {
        let mut idle = host.idle.lock();
        if idle.len() + host.cold_len.load(Ordering::Relaxed) < self.config.max_idle_per_host {
            idle.push(IdleConn { conn, since: crate::clock::now() });
            drop(idle);
            host.available.notify_one();
            // One atomic operation while the reaper's cooling clock runs (it waits for this
            // only when nothing was warm).
            self.warm.notify_one();
        }
    }

    /// A cooled connection's socket, back from its task; its idle time counts from now.
    fn put_cold(&self, key: Key, socket: std::net::TcpStream) {
        let host = self.host(key);
        // Locked in the order take_idle and reap lock them.
        let idle = host.idle.lock();
        let mut cold = host.cold.lock();
        if idle.len() + cold.len() < self.config.max_idle_per_host {
            drop(idle);
            cold.push(ColdConn { socket, since: Instant::now() });
            host.cold_len.store(cold.len(), Ordering::Relaxed);
            drop(cold);
            host.available.notify_one();
        }
    }

    /// Cools every connection warm in the pool for [`COOL_AFTER`]: its task ends and gives
    /// the socket back. Says how many cooled, and whether any warm one is left to cool later.
    fn cool(&self) -> (usize, bool) {
        let (mut cooled, mut warm_left) = (0, false);
        for host in &self.hosts {
            let mut idle = host.idle.lock();
            let mut kept = Vec::with_capacity(idle.len());
            // tern's own connections cool here, to their socket out of the reactor; hyper's
            // are asked to, and their task gives the socket back.
            let mut sockets = Vec::new();
            for c in idle.drain(..) {
                match c.conn {
                    // Its last request had a body: hyper may hold some of it unsent (a machine
                    // that answered without reading it all), which cooling would lose while
                    // the socket lived on. It stays warm until it is reused or reaped.
                    Warm::Hyper(ref h) if !h.coolable => kept.push(c),
                    _ if c.since.elapsed() < COOL_AFTER => {
                        warm_left = true;
                        kept.push(c);
                    }
                    // Dropped here: with its sender gone, hyper's side of it is done.
                    Warm::Hyper(h) => {
                        h.cool.store(true, Ordering::Release);
                        cooled += 1;
                    }
                    Warm::Own(conn) => {
                        if let Ok(socket) = conn.stream.into_std() {
                            sockets.push(ColdConn { socket, since: c.since });
                        }
                        cooled += 1;
                    }
                }
            }
            *idle = kept;
            if !sockets.is_empty() {
                // Locked in the order take_idle and put_cold lock them.
                let mut cold = host.cold.lock();
                cold.append(&mut sockets);
                host.cold_len.store(cold.len(), Ordering::Relaxed);
            }
        }
        (cooled, warm_left)
    }

    /// hyper's HTTP/1.1 client on `stream`, driven by a task of its own. With `upgrade` the
    /// task can hand the socket to an upgrade, and the connection is never pooled; without,
    /// a connection the pool cools gives its socket back to the pool.
    async fn start_h1(self: &Arc<Self>, key: Key, stream: TcpStream, upgrade: bool) -> hyper::Result<H1> {
        let (sender, mut conn) = http1::Builder::new()
            // Slack for the difference between bytes on the wire and tern's count.
            .max_buf_size(self.config.max_response_head.max(8192) + 1024)
            .handshake(TokioIo::new(stream))
            .await?;
        let cool = Arc::new(AtomicBool::new(false));
        if upgrade {
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(target: "tern::upstream", error = %e, "machine connection ended");
                }
            });
            return Ok(H1 { sender, cool, coolable: false });
        }
        let (pool, asked) = (Arc::downgrade(self), cool.clone());
        tokio::spawn(async move {
            match std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)).await {
                Ok(()) if asked.load(Ordering::Acquire) => {
                    let parts = conn.into_parts();
                    let socket = parts.io.into_inner().into_std();
                    if let (true, Ok(socket), Some(pool)) =
                        (parts.read_buf.is_empty(), socket, pool.upgrade())
                    {
                        pool.put_cold(key, socket);
                    }
                }
                // Closed by the machine, or dropped mid-exchange: dropping it closes the socket.
                Ok(()) => {}
                Err(e) => tracing::debug!(target: "tern::upstream", error = %e, "machine connection ended"),
            }
        });
        Ok(H1 { sender, cool, coolable: true })
    }

    /// Opens a connection, holding `slot` until it is up (or failed).
    async fn connect(
        self: &Arc<Self>,
        key: Key,
        deadline: Instant,
        slot: Slot,
        upgrade: bool,
    ) -> Result<Conn, ConnectError> {
        let started = Instant::now();
        let fail = |source: std::io::Error| {
            self.metrics.upstream_connect_errors.inc();
            ConnectError { addr: key.addr, source }
        };
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(key.addr))
            .await
            .map_err(|_| fail(std::io::ErrorKind::TimedOut.into()))?
            .map_err(fail)?;
        let _ = stream.set_nodelay(true);
        let sender = match key.proto {
            // Started as the first request needs: tern's own exchange, or hyper's.
            Proto::Http1 if !upgrade => Sender::Own(h1::Conn::new(stream)),
            Proto::Http1 => Sender::H1(
                self.start_h1(key, stream, upgrade).await.map_err(|e| fail(std::io::Error::other(e)))?,
            ),
            Proto::H2c => {
                let io = TokioIo::new(stream);
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(20))
                    .max_header_list_size(u32::try_from(self.config.max_response_head).unwrap_or(u32::MAX))
                    .handshake(io)
                    .await
                    .map_err(|e| fail(std::io::Error::other(e)))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(target: "tern::upstream", error = %e, "machine h2 connection ended");
                    }
                });
                *self.host(key).h2.lock() = Some(sender.clone());
                Sender::H2(sender)
            }
        };
        self.metrics.upstream_connect_duration.observe(started.elapsed().as_secs_f64());
        // The slot is held until the connection is up (or failed), then given back.
        Ok(Conn { sender, key, reused: false, pool: self.clone(), host: slot.host.clone() })
    }

    /// Drops idle connections past their idle timeout and forgets hosts with nothing left.
    /// Called periodically, so a machine that left the catalog stops holding sockets.
    pub fn reap(&self) {
        let ttl = self.config.idle_timeout;
        self.hosts.retain(|_, host| {
            let mut idle = host.idle.lock();
            idle.retain(|c| {
                c.since.elapsed() < ttl
                    && match &c.conn {
                        Warm::Hyper(conn) => !conn.sender.is_closed(),
                        Warm::Own(conn) => h1::still_open(&conn.stream),
                    }
            });
            let mut cold = host.cold.lock();
            // A machine that closed an idle connection left it half-closed here: closed now.
            cold.retain(|c| c.since.elapsed() < ttl && still_open(&c.socket));
            host.cold_len.store(cold.len(), Ordering::Relaxed);
            let mut h2 = host.h2.lock();
            if h2.as_ref().is_some_and(|s| s.is_closed()) {
                *h2 = None;
            }
            // Keep the entry while someone else holds it (a checkout in progress).
            !idle.is_empty() || !cold.is_empty() || h2.is_some() || Arc::strong_count(host) > 1
        });
    }

    /// Runs [`Pool::reap`] until `shutdown` turns true, and cools connections warm for
    /// [`COOL_AFTER`]. `give_back` returns freed memory to the system (see
    /// [`crate::alloc`]): called on this thread once what cooled has let hyper's state go.
    /// Its clock runs only while some connection is warm or has just cooled: an idle pool
    /// does not wake for it.
    pub async fn reap_until(
        self: Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        give_back: fn(),
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(10).min(self.config.idle_timeout));
        // Armed once at the start: a reaper restarted after a panic finds warm connections
        // already in the pool, with no cue to come.
        let mut cool_at: Option<Instant> = Some(Instant::now() + COOL_AFTER);
        // Some cooled at the last look: their tasks have ended since, freeing hyper's state.
        let mut cooled_some = false;
        loop {
            tokio::select! {
                () = crate::shutdown::requested(&mut shutdown) => return,
                _ = tick.tick() => self.reap(),
                () = self.warm.notified(), if cool_at.is_none() => cool_at = Some(Instant::now() + COOL_AFTER),
                () = sleep_until(cool_at) => {
                    if cooled_some {
                        give_back();
                    }
                    let (cooled, warm_left) = self.cool();
                    cooled_some = cooled > 0;
                    cool_at = (warm_left || cooled_some).then(|| Instant::now() + COOL_AFTER);
                }
            }
        }
    }
}

/// One of a machine's `max_connecting` places for a connect in progress. Giving it back
/// lets the next waiter in: one of them for HTTP/1.1, where it will open its own connection
/// or take one handed back; all of them for h2c, where the connection just opened (if it
/// was) serves everyone.
struct Slot {
    host: Arc<HostPool>,
    proto: Proto,
}

impl Slot {
    fn take(host: &Arc<HostPool>, proto: Proto, max_connecting: usize) -> Option<Slot> {
        // h2c multiplexes: one connect at a time, and waiters share its result.
        let limit = if proto == Proto::H2c { 1 } else { max_connecting.max(1) };
        host.connecting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1))
            .ok()
            .map(|_| Slot { host: host.clone(), proto })
    }

    fn force(host: &Arc<HostPool>, proto: Proto) -> Slot {
        host.connecting.fetch_add(1, Ordering::AcqRel);
        Slot { host: host.clone(), proto }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.host.connecting.fetch_sub(1, Ordering::AcqRel);
        match self.proto {
            Proto::Http1 => {
                self.host.available.notify_one();
                self.host.slot_free.notify_one();
            }
            Proto::H2c => self.host.available.notify_waiters(),
        }
    }
}

/// An HTTP/1.1 connection lent to one exchange. [`Lease::release`] gives it back to the
/// pool once the response has been read to the end; dropping it instead closes the
/// connection (the response was abandoned midway, so the connection is not reusable).
pub struct Lease {
    conn: H1,
    key: Key,
    pool: Arc<Pool>,
}

impl Lease {
    pub fn release(self) {
        let Lease { mut conn, key, pool } = self;
        if conn.sender.is_ready() {
            pool.put_idle(key, Warm::Hyper(conn));
        } else if !conn.sender.is_closed() {
            // The connection task has not caught up with the end of the body yet.
            tokio::spawn(async move {
                if conn.sender.ready().await.is_ok() {
                    pool.put_idle(key, Warm::Hyper(conn));
                }
            });
        }
    }
}

impl Conn {
    /// Whether this connection came from the pool (and so may have died while idle).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Sends one request. An HTTP/1.1 connection hyper drives comes back as a [`Lease`],
    /// to be released when the response body has been read to the end; none for tern's own
    /// exchange (its body gives the connection back at its end), for an upgrade (the
    /// connection becomes the tunnel) or for h2c (shared, nothing to give back).
    pub async fn send(
        self,
        req: Request<UpBody>,
        upgrade: bool,
    ) -> Result<(Response<MachineBody>, Option<Lease>), SendError> {
        self.send_keeping(req, upgrade, None, None).await
    }

    /// [`Self::send`], which also leaves the request's header fields, as sent, in `keep`:
    /// handed back by tern's own exchange, which is done with them once they are written,
    /// or copied before the request goes to hyper, which keeps it. What a request is sent
    /// again from (a `fly-replay`), without a copy for most requests. `extra`'s fields go out
    /// after the map's, and are not among those kept (see [`Extra`]).
    pub async fn send_keeping(
        self,
        mut req: Request<UpBody>,
        upgrade: bool,
        mut keep: Option<&mut Option<HeaderMap>>,
        extra: Option<&dyn Extra>,
    ) -> Result<(Response<MachineBody>, Option<Lease>), SendError> {
        let Conn { sender, key, pool, host, .. } = self;
        let own = matches!(sender, Sender::Own(_)) && h1::fits(&req, upgrade);
        if !own {
            if let Some(keep) = keep.as_deref_mut() {
                *keep = Some(req.headers().clone());
            }
            if let Some(extra) = extra {
                extra.add_to(req.headers_mut());
            }
        }
        let conn = match sender {
            Sender::Own(conn) if own => {
                let home = h1::Home { pool: pool.clone(), host };
                let max_head = pool.config.max_response_head;
                return match h1::exchange(conn, &mut req, extra, max_head, home).await {
                    Ok(resp) => {
                        if let Some(keep) = keep {
                            *keep = Some(std::mem::take(req.headers_mut()));
                        }
                        Ok((resp.map(MachineBody::Own), None))
                    }
                    Err(f) if f.unanswered => Err(SendError::NotSent(Box::new(req), f.error.into())),
                    Err(f) => Err(SendError::Failed(f.error.into())),
                };
            }
            Sender::Own(conn) => match pool.start_h1(key, conn.stream, upgrade).await {
                Ok(conn) => conn,
                Err(e) => return Err(SendError::NotSent(Box::new(req), e.into())),
            },
            Sender::H1(conn) => conn,
            Sender::H2(mut sender) => {
                if let Err(e) = sender.ready().await {
                    return Err(SendError::NotSent(Box::new(req), e.into()));
                }
                return match sender.try_send_request(req).await {
                    Ok(resp) => Ok((resp.map(MachineBody::Hyper), None)),
                    Err(mut e) => match e.take_message() {
                        Some(req) => Err(SendError::NotSent(Box::new(req), e.into_error().into())),
                        None => Err(SendError::Failed(e.into_error().into())),
                    },
                };
            }
        };
        let mut conn = conn;
        if let Err(e) = conn.sender.ready().await {
            return Err(SendError::NotSent(Box::new(req), e.into()));
        }
        conn.coolable = http_body::Body::is_end_stream(req.body());
        match conn.sender.try_send_request(req).await {
            Ok(resp) => {
                let lease = (!upgrade).then(|| Lease { conn, key, pool });
                Ok((resp.map(MachineBody::Hyper), lease))
            }
            Err(mut e) => match e.take_message() {
                Some(req) => Err(SendError::NotSent(Box::new(req), e.into_error().into())),
                None => Err(SendError::Failed(e.into_error().into())),
            },
        }
    }
}

/// Sleeps until `at`, or forever if there is none.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether an idle connection's socket is still open and quiet: a machine that closed it
/// sent a FIN (read as 0 bytes), and one that sent anything while nothing was asked broke
/// the exchange's framing. Asks the kernel itself, not Tokio's record of readiness, which
/// a socket out of the reactor does not have.
fn still_open(socket: &std::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(socket.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests;
