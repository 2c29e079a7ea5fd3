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
//! It sends what routing decided; it knows nothing of apps or hostnames.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::telemetry::Metrics;
use crate::watchdog::lock::Mutex;

/// The body type sent to machines.
pub type UpBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
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

struct IdleConn {
    sender: http1::SendRequest<UpBody>,
    since: Instant,
}

struct HostPool {
    idle: Mutex<Vec<IdleConn>>,
    h2: Mutex<Option<http2::SendRequest<UpBody>>>,
    /// Connects in progress to this machine.
    connecting: AtomicUsize,
    /// A connection came back to `idle`, or a connect finished (a slot is free; for h2c,
    /// the shared connection may be up).
    available: Notify,
}

impl Default for HostPool {
    fn default() -> Self {
        HostPool {
            idle: Mutex::new("upstream.idle", Vec::new()),
            h2: Mutex::new("upstream.h2", None),
            connecting: AtomicUsize::new(0),
            available: Notify::new(),
        }
    }
}

/// Connections to every machine, keyed by address and protocol.
pub struct Pool {
    hosts: DashMap<Key, Arc<HostPool>>,
    config: PoolConfig,
    metrics: Arc<Metrics>,
}

/// A connection ready for one request.
pub struct Conn {
    sender: Sender,
    key: Key,
    reused: bool,
    pool: Arc<Pool>,
}

enum Sender {
    H1(http1::SendRequest<UpBody>),
    H2(http2::SendRequest<UpBody>),
}

#[derive(Debug, thiserror::Error)]
#[error("connecting to {addr}: {source}")]
pub struct ConnectError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

pub enum SendError {
    /// The request was not written: safe to send again on another connection.
    NotSent(Box<Request<UpBody>>, hyper::Error),
    /// The request was (or may have been) written; it cannot be replayed.
    Failed(hyper::Error),
}

impl Pool {
    pub fn new(config: PoolConfig, metrics: Arc<Metrics>) -> Arc<Pool> {
        Arc::new(Pool { hosts: DashMap::new(), config, metrics })
    }

    /// A connection to `addr`: an idle pooled one if there is one, else a new one once fewer
    /// than `max_connecting` are being opened; within `connect_timeout` in all.
    pub async fn checkout(self: &Arc<Self>, addr: SocketAddr, proto: Proto) -> Result<Conn, ConnectError> {
        let key = Key { addr, proto };
        if let Some(sender) = self.take_idle(key) {
            return Ok(Conn { sender, key, reused: true, pool: self.clone() });
        }
        let deadline = Instant::now() + self.config.connect_timeout;
        let host = self.host(key);
        loop {
            let available = host.available.notified();
            tokio::pin!(available);
            // Registered before looking, so a hand-back between the look and the wait is seen.
            available.as_mut().enable();
            if let Some(sender) = self.take_idle(key) {
                return Ok(Conn { sender, key, reused: true, pool: self.clone() });
            }
            if let Some(slot) = Slot::take(&host, key.proto, self.config.max_connecting) {
                return self.connect(key, deadline, slot).await;
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
    ) -> Result<Conn, ConnectError> {
        let key = Key { addr, proto };
        let slot = Slot::force(&self.host(key), proto);
        self.connect(key, Instant::now() + self.config.connect_timeout, slot).await
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

    fn take_idle(&self, key: Key) -> Option<Sender> {
        let host = self.hosts.get(&key)?.clone();
        match key.proto {
            Proto::Http1 => {
                let mut idle = host.idle.lock();
                // Most recently used first: the likeliest to be alive and warm.
                while let Some(c) = idle.pop() {
                    if c.sender.is_ready() && c.since.elapsed() < self.config.idle_timeout {
                        return Some(Sender::H1(c.sender));
                    }
                }
                None
            }
            Proto::H2c => {
                let h2 = host.h2.lock();
                h2.as_ref().filter(|s| !s.is_closed()).map(|s| Sender::H2(s.clone()))
            }
        }
    }

    fn put_idle(&self, key: Key, sender: http1::SendRequest<UpBody>) {
        let host = self.host(key);
        let mut idle = host.idle.lock();
        if idle.len() < self.config.max_idle_per_host {
            idle.push(IdleConn { sender, since: Instant::now() });
            drop(idle);
            host.available.notify_one();
        }
    }

    /// Opens a connection, holding `slot` until it is up (or failed).
    async fn connect(
        self: &Arc<Self>,
        key: Key,
        deadline: Instant,
        slot: Slot,
    ) -> Result<Conn, ConnectError> {
        let _slot = slot;
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
        let io = TokioIo::new(stream);
        let sender = match key.proto {
            Proto::Http1 => {
                let (sender, conn) = http1::Builder::new()
                    // Slack for the difference between bytes on the wire and tern's count.
                    .max_buf_size(self.config.max_response_head.max(8192) + 1024)
                    .handshake(io)
                    .await
                    .map_err(|e| fail(std::io::Error::other(e)))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(target: "tern::upstream", error = %e, "machine connection ended");
                    }
                });
                Sender::H1(sender)
            }
            Proto::H2c => {
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
        Ok(Conn { sender, key, reused: false, pool: self.clone() })
    }

    /// Drops idle connections past their idle timeout and forgets hosts with nothing left.
    /// Called periodically, so a machine that left the catalog stops holding sockets.
    pub fn reap(&self) {
        let ttl = self.config.idle_timeout;
        self.hosts.retain(|_, host| {
            let mut idle = host.idle.lock();
            idle.retain(|c| !c.sender.is_closed() && c.since.elapsed() < ttl);
            let mut h2 = host.h2.lock();
            if h2.as_ref().is_some_and(|s| s.is_closed()) {
                *h2 = None;
            }
            // Keep the entry while someone else holds it (a checkout in progress).
            !idle.is_empty() || h2.is_some() || Arc::strong_count(host) > 1
        });
    }

    /// Runs [`Pool::reap`] until `shutdown` turns true.
    pub async fn reap_until(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(10).min(self.config.idle_timeout));
        loop {
            tokio::select! {
                () = crate::shutdown::requested(&mut shutdown) => return,
                _ = tick.tick() => self.reap(),
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
            Proto::Http1 => self.host.available.notify_one(),
            Proto::H2c => self.host.available.notify_waiters(),
        }
    }
}

/// An HTTP/1.1 connection lent to one exchange. [`Lease::release`] gives it back to the
/// pool once the response has been read to the end; dropping it instead closes the
/// connection (the response was abandoned midway, so the connection is not reusable).
pub struct Lease {
    sender: http1::SendRequest<UpBody>,
    key: Key,
    pool: Arc<Pool>,
}

impl Lease {
    pub fn release(self) {
        let Lease { mut sender, key, pool } = self;
        if sender.is_ready() {
            pool.put_idle(key, sender);
        } else if !sender.is_closed() {
            // The connection task has not caught up with the end of the body yet.
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.put_idle(key, sender);
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

    /// Sends one request. An HTTP/1.1 connection comes back as a [`Lease`], to be released
    /// when the response body has been read to the end; none for an upgrade (the connection
    /// becomes the tunnel) or for h2c (shared, nothing to give back).
    pub async fn send(
        self,
        req: Request<UpBody>,
        upgrade: bool,
    ) -> Result<(Response<Incoming>, Option<Lease>), SendError> {
        match self.sender {
            Sender::H1(mut sender) => {
                if let Err(e) = sender.ready().await {
                    return Err(SendError::NotSent(Box::new(req), e));
                }
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        let lease = (!upgrade).then(|| Lease { sender, key: self.key, pool: self.pool });
                        Ok((resp, lease))
                    }
                    Err(mut e) => match e.take_message() {
                        Some(req) => Err(SendError::NotSent(Box::new(req), e.into_error())),
                        None => Err(SendError::Failed(e.into_error())),
                    },
                }
            }
            Sender::H2(mut sender) => {
                if let Err(e) = sender.ready().await {
                    return Err(SendError::NotSent(Box::new(req), e));
                }
                match sender.try_send_request(req).await {
                    Ok(resp) => Ok((resp, None)),
                    Err(mut e) => match e.take_message() {
                        Some(req) => Err(SendError::NotSent(Box::new(req), e.into_error())),
                        None => Err(SendError::Failed(e.into_error())),
                    },
                }
            }
        }
    }
}
