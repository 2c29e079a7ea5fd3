//! HTTP/1.1 and HTTP/2 from clients. This module serves connections, owns header hygiene
//! and turns every error into a response in exactly one place ([`respond`]). It routes
//! through [`crate::routing`] and sends through [`crate::upstream`]; it never touches the
//! listener or the store.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;

use http::HeaderValue;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

pub mod activity;
mod affinity;
pub mod backhaul;
pub mod body;
pub mod drain;
pub mod ending;
mod forward;
pub mod headers;
mod park;
pub use park::Prefixed;
mod parser_replies;
mod replay;
pub mod request_id;
pub mod respond;
mod serve1;
pub mod tcp;
mod tunnel;

pub use drain::Drain;
pub use forward::Handler;

use activity::{ConnState, TouchIo};
use parser_replies::ParserReplies;

use crate::telemetry::Metrics;

/// The client side of one connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
    /// Accepted on the `[backhaul]` listener: another node hands a request over.
    pub backhaul: bool,
    /// Accepted on a private (Flycast) listener: the destination address picks the app.
    pub private: bool,
    /// The app a TCP service with the `http` handler serves: its requests go there,
    /// whatever their Host.
    pub app: Option<Arc<str>>,
    /// The peer's address and the local port as header values, made once per connection
    /// for the forwarding headers of each of its requests.
    pub client_ip: HeaderValue,
    pub local_port: HeaderValue,
    /// For a connection over TLS: its TLS stream's shed signal
    /// ([`crate::tls::Stream::shed_signal`]), raised once a quiet spell has lasted
    /// [`park::PARK_AFTER`] while the connection is not parked (HTTP/2, or HTTP/1.1 with an
    /// exchange open); a later spell is seen within [`park::QUIET_RECHECK`] or, as the spell
    /// lasts, within up to [`park::QUIET_RECHECK_MAX`].
    pub shed: Option<Arc<crate::tls::Shed>>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, local: SocketAddr, tls: bool, door: Door) -> ConnInfo {
        let text = |s: String| HeaderValue::from_maybe_shared(bytes::Bytes::from(s));
        ConnInfo {
            peer,
            local,
            tls,
            backhaul: door == Door::Backhaul,
            private: matches!(door, Door::Private | Door::PrivateTcp),
            app: None,
            client_ip: text(peer.ip().to_string()).unwrap_or(HeaderValue::from_static("-")),
            local_port: HeaderValue::from(local.port()),
            shed: None,
        }
    }
}

/// Which kind of listener a connection came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    /// Public ingress: the Host picks the app, and only apps with `public = true` answer.
    Public,
    /// A private (Flycast) listener: the connection's destination address picks the app.
    Private,
    /// The `[backhaul]` listener: another node hands a request over.
    Backhaul,
    /// A `kind = "tcp"` listener: apps' TCP services, on dedicated addresses or by SNI.
    Tcp,
    /// A private `kind = "tcp"` listener: the TCP services of the app whose private address
    /// the connection reached, for its org's sources only.
    PrivateTcp,
}

impl Door {
    pub fn of(listen: &crate::config::Listen) -> Door {
        let tcp = listen.kind == crate::config::ListenKind::Tcp;
        match (listen.backhaul, tcp, listen.private) {
            (true, ..) => Door::Backhaul,
            (false, true, true) => Door::PrivateTcp,
            (false, true, false) => Door::Tcp,
            (false, false, true) => Door::Private,
            (false, false, false) => Door::Public,
        }
    }

    /// A `kind = "tcp"` listener's, private or not.
    pub fn is_tcp(self) -> bool {
        matches!(self, Door::Tcp | Door::PrivateTcp)
    }
}

#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub keepalive_timeout: Duration,
}

/// What a client connection speaks. Over TLS that is what ALPN settled, exactly: a client
/// that negotiated one protocol and speaks another is not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// Plain TCP: HTTP/1.1, or HTTP/2 with prior knowledge (h2c), told apart by the preface.
    Sniff,
    /// TLS with ALPN `http/1.1`, or no ALPN.
    Http1,
    /// TLS with ALPN `h2`.
    Http2,
}

/// What tern's own HTTP/1.1 server ([`serve1`]) serves a connection's requests with.
struct Own {
    handler: Arc<Handler>,
    info: Arc<ConnInfo>,
    state: Arc<ConnState>,
}

/// A quiet HTTP/1.1 connection (plain or TLS) handed back to its caller, to wait for its next bytes
/// without a task of its own: nothing in flight, nothing read ahead, nothing unwritten.
/// [`Server::serve_or_park`] takes it up again.
pub struct Parked<IO> {
    pub io: IO,
    /// [`Wire::Sniff`] if the client has not said a byte yet, [`Wire::Http1`] between
    /// requests.
    pub wire: Wire,
    /// Its place in the drain: it is still counted open.
    pub seat: drain::Seat,
    /// When it is closed if the client sends nothing more (the keep-alive limit).
    pub quiet_until: tokio::time::Instant,
}

/// How serving a connection ended.
pub enum Served<IO> {
    Closed,
    Parked(Parked<IO>),
}

/// Connection settings shared by every client connection.
pub struct Server {
    /// HTTP/1.1: over TLS after ALPN, and plain TCP once [`park::is_h2c`] says it is not
    /// HTTP/2 with prior knowledge.
    http1: http1::Builder,
    http2: http2::Builder<TurnsExecutor>,
    keepalive_timeout: Duration,
    header_read_timeout: Duration,
    /// Every connection served registers with it, and closes at its time in a drain.
    drain: Drain,
}

impl Server {
    pub fn new(limits: &ServerLimits, drain: Drain) -> Self {
        // Room for heads up to twice our own limit, so tern (not hyper) answers the
        // over-limit ones, with a tern-error code.
        let head_room = (limits.max_header_bytes * 2).max(64 * 1024);
        let h2_header_list = u32::try_from(head_room).unwrap_or(u32::MAX);
        // The same settings for both kinds of builder: they are different types.
        macro_rules! h1_settings {
            ($b:expr) => {
                $b.timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .max_buf_size(head_room.max(8192 + 1))
                    .keep_alive(true)
            };
        }
        macro_rules! h2_settings {
            ($b:expr) => {
                $b.timer(TurnsTimer::default())
                    .max_header_list_size(h2_header_list)
                    .max_concurrent_streams(256)
                    .keep_alive_interval(Some(Duration::from_secs(30)))
                    .keep_alive_timeout(Duration::from_secs(20))
            };
        }
        let mut http1 = http1::Builder::new();
        h1_settings!(http1);
        // Each stream's polls are turns of the clock its bookkeeping reads (`clock::now`).
        let mut http2 = http2::Builder::new(TurnsExecutor);
        h2_settings!(http2);
        Server {
            http1,
            http2,
            keepalive_timeout: limits.keepalive_timeout,
            header_read_timeout: limits.header_read_timeout,
            drain,
        }
    }

    /// Serves one client connection until it closes, in the protocol `wire` says. When its
    /// time in a drain comes (see [`drain::time_to_close`]), or it has had no open exchange
    /// and no bytes for the keep-alive timeout, it is closed gracefully: HTTP/1.1 after the
    /// response in progress, HTTP/2 with GOAWAY.
    pub async fn serve<IO>(&self, io: IO, info: ConnInfo, handler: Arc<Handler>, wire: Wire)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let _ = self.serve_or_park(io, info, handler, wire, None, false).await;
    }

    /// [`Self::serve`], except that with `hands_back` a quiet HTTP/1.1 connection is
    /// handed back ([`Served::Parked`]) to wait without a task, rather than waiting here;
    /// `seat` is a parked connection's, when it is taken up again.
    pub async fn serve_or_park<IO>(
        &self,
        io: IO,
        info: ConnInfo,
        handler: Arc<Handler>,
        wire: Wire,
        seat: Option<drain::Seat>,
        hands_back: bool,
    ) -> Served<IO>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Counted in the drain until hyper is done with it (or, parked, until the socket is
        // closed); a tunnel it upgrades to counts on its own.
        let (drain, registered) = match seat {
            Some(seat) => Drain::resume(seat),
            None => self.drain.connection(),
        };
        let state = Arc::new(ConnState::new(drain));
        let shed = info.shed.clone();
        let info = Arc::new(info);
        let svc_state = state.clone();
        let svc_info = info.clone();
        let peer = info.peer;
        let svc_handler = handler.clone();
        // Each exchange's future is boxed for its own lifetime: hyper keeps room for the
        // service's future in every connection, idle or not, and an exchange's is several KB.
        let svc = service_fn(move |req| {
            let (handler, info, state) = (svc_handler.clone(), svc_info.clone(), svc_state.clone());
            Box::pin(async move {
                let mut resp = handler.handle(req.map(body::RequestBody::Hyper), info, state).await;
                // hyper writes the map alone.
                body::settle_late(&mut resp);
                Ok::<_, Infallible>(resp)
            })
        });
        if wire == Wire::Http2 {
            state.drain.set_http2();
            let io = TokioIo::new(TouchIo::new(io, state.activity.clone()));
            let conn = self.http2.serve_connection(io, svc);
            Box::pin(self.drive(conn, &state, shed.as_deref())).await;
            return Served::Closed;
        }
        let metrics = handler.metrics.clone();
        let own = Own { handler: handler.clone(), info, state: state.clone() };
        // HTTP/1.1's parser answers some heads itself; make those answers tern's.
        let io = ParserReplies::new(io, state.clone(), handler, peer);
        let mut io = Prefixed::new(TouchIo::new(io, state.activity.clone()));
        // Handed back once quiet, but not in a drain: there the connection waits here for
        // its time, as any other.
        let park_after = (hands_back && !self.drain.is_draining()).then_some(park::PARK_AFTER);
        if wire == Wire::Sniff {
            // Told apart once the client has said something; a client that never does is
            // closed at the keep-alive timeout, one that stops inside the preface at the
            // header read timeout.
            match park::next_bytes(&mut io, &state, self.quiet_limit(), park_after).await {
                park::Next::Close => return Served::Closed,
                park::Next::Park => return self.hand_back(io, Wire::Sniff, &state, registered),
                park::Next::Bytes => {}
            }
            match tokio::time::timeout(self.header_read_timeout, park::is_h2c(&mut io)).await {
                Ok(Some(true)) => {
                    state.drain.set_http2();
                    let conn = self.http2.serve_connection(TokioIo::new(io), svc);
                    Box::pin(self.drive(conn, &state, None)).await;
                    return Served::Closed;
                }
                Ok(Some(false)) => {}
                Ok(None) | Err(_) => return Served::Closed,
            }
        }
        match self.serve_http1(io, svc, &own, &metrics, park_after.is_some(), shed.as_deref()).await {
            Some(io) => self.hand_back(io, Wire::Http1, &state, registered),
            None => Served::Closed,
        }
    }

    /// A quiet connection handed back to wait without a task, peeled of what served it.
    fn hand_back<IO>(
        &self,
        io: Prefixed<TouchIo<ParserReplies<IO>>>,
        wire: Wire,
        state: &ConnState,
        registered: drain::Registration,
    ) -> Served<IO> {
        // Handed back only with nothing read ahead, and nothing unwritten (a write the client
        // does not take keeps a connection from being parked); tern's own answer to a bad head
        // is the one thing that could be left, and its connection closes after it anyway.
        let Some(io) = io.into_inner().ok().and_then(|io| io.into_inner().into_inner().ok()) else {
            return Served::Closed;
        };
        Served::Parked(Parked {
            io,
            wire,
            seat: drain::Seat::new(&state.drain, registered),
            quiet_until: state.activity.last() + self.quiet_limit(),
        })
    }

    /// How long a connection waiting for its next request may stay quiet: the keep-alive
    /// timeout, or hyper's header read timeout if shorter (hyper runs it while an HTTP/1.1
    /// connection waits; a parked connection keeps the same limit).
    fn quiet_limit(&self) -> Duration {
        self.keepalive_timeout.min(self.header_read_timeout)
    }

    /// Serves HTTP/1.1 on `io` until it closes, handing hyper the connection each time the
    /// client sends after a quiet spell (see [`park`]). With `hands_back`, a connection
    /// quiet between requests is returned instead, to wait without a task.
    async fn serve_http1<IO, S>(
        &self,
        mut io: Prefixed<IO>,
        svc: S,
        own: &Own,
        metrics: &Metrics,
        hands_back: bool,
        shed: Option<&crate::tls::Shed>,
    ) -> Option<Prefixed<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::HttpService<Incoming> + Clone + Unpin + Send + 'static,
        S::Future: Unpin + Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        S::ResBody: Send + 'static,
        <S::ResBody as http_body::Body>::Data: Send,
        <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // A client that parks mid-head (a byte now and then) must not reset hyper's header
        // read timeout each time: the first such park starts a clock of tern's own.
        let mut partial_since: Option<tokio::time::Instant> = None;
        let state = &*own.state;
        // Parking is for connections kept longer than it takes to park them.
        let parks = park::PARK_AFTER < self.quiet_limit();
        loop {
            // hyper's state is made when the client has something to say: a connection that
            // has not sent its first request yet costs no more than a parked one. One with
            // half a head waits here: its head's clock runs.
            let park_after = (hands_back && partial_since.is_none()).then_some(park::PARK_AFTER);
            match park::next_bytes(&mut io, state, self.quiet_limit(), park_after).await {
                park::Next::Close => return None,
                park::Next::Park => return Some(io),
                park::Next::Bytes => {}
            }
            // A fresh connection gets its own quiet time before it may be parked, even one
            // resumed with a half-read head and no new byte yet.
            state.activity.touch();
            // Plain requests are served by tern's own server; it hands hyper the rest. A head
            // hyper has begun to read is hyper's to finish.
            if partial_since.is_none() {
                let cx = serve1::Ctx {
                    handler: &own.handler,
                    info: &own.info,
                    state: &own.state,
                    shed,
                    quiet: self.quiet_limit().min(park::PARK_AFTER),
                };
                match Box::pin(serve1::serve(&mut io, cx)).await {
                    serve1::Turn::Closed => return None,
                    serve1::Turn::Hyper => {}
                    serve1::Turn::Quiet => {
                        metrics.connections_parked.inc();
                        state.let_timer_go();
                        if hands_back && parks && !state.drain.draining() && !io.has_prefix() {
                            return Some(io);
                        }
                        if let Some(shed) = shed
                            && !io.has_prefix()
                            && !state.activity.write_blocked()
                        {
                            shed.raise();
                        }
                        continue;
                    }
                }
            }
            // Boxed, so that a parked connection's task holds none of hyper's state.
            let conn = Box::pin(self.http1.serve_connection(TokioIo::new(io), svc.clone()).with_upgrades());
            let parts = Box::pin(self.drive_http1(conn, state, shed)).await?;
            metrics.connections_parked.inc();
            io = parts.io.into_inner();
            if parts.read_buf.is_empty() {
                partial_since = None;
                if hands_back && !state.drain.draining() && !io.has_prefix() {
                    return Some(io);
                }
                // Kept here instead (no lot, a drain): its TLS stream's buffers go as the wait
                // for the next request reads.
                if let Some(shed) = shed
                    && !io.has_prefix()
                    && !state.activity.write_blocked()
                {
                    shed.raise();
                }
            } else {
                let since = *partial_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= self.header_read_timeout {
                    return None;
                }
            }
            io.unread(parts.read_buf);
        }
    }

    /// [`Self::drive`] for HTTP/1.1, which also parks the connection once it is quiet:
    /// returns hyper's parts then, `None` when the connection ended. A connection that cannot
    /// be parked yet (an exchange is open: a stream with nothing to say, a machine slow to
    /// answer) raises `shed` (its TLS stream's) after a quiet spell, as [`Self::drive`] does.
    async fn drive_http1<IO, S>(
        &self,
        mut conn: Pin<Box<http1::UpgradeableConnection<TokioIo<Prefixed<IO>>, S>>>,
        state: &ConnState,
        shed: Option<&crate::tls::Shed>,
    ) -> Option<http1::Parts<TokioIo<Prefixed<IO>>, S>>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::HttpService<Incoming> + Unpin,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        S::ResBody: 'static,
        <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut closing = false;
        // Parking is for connections kept longer than it takes to park them.
        let parks = park::PARK_AFTER < self.quiet_limit();
        let mut shed_after = None;
        loop {
            // Boxed, and made only where there is something to shed (select! makes a disabled
            // branch's future all the same): the driver of every connection stays the size it
            // was. Idle TLS connections still read about 0.5 KiB more each once parked than
            // before this wait existed, inline or boxed; why is open (docs/benchmarks.md).
            let mut quiet = (shed.is_some() && !closing)
                .then(|| Box::pin(park::quiet_again(&state.activity, shed_after)));
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(target: "tern::http", error = %e, "client connection ended with an error");
                    }
                    return None;
                }
                () = drain::time_to_close(state), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = state.idle_for(self.keepalive_timeout), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = park::parkable(state), if !closing && parks => {
                    return Pin::into_inner(conn).into_parts();
                }
                () = std::future::poll_fn(|cx| quiet.as_mut().map_or(std::task::Poll::Pending, |q| q.as_mut().poll(cx))) => {
                    shed_after = Some(state.activity.last());
                    // One about to be parked gives its buffers back there (or, if it is not
                    // handed back, in serve_http1); one whose client is not reading has
                    // records queued, and would free them at a later, busier read.
                    if let Some(shed) = shed
                        && (!parks || state.open_exchanges() > 0)
                        && !state.activity.write_blocked()
                    {
                        shed.raise();
                    }
                }
            }
        }
    }

    /// Runs a connection to its end, closing it gracefully at its time in a drain or when idle.
    /// With `shed` (an HTTP/2 connection's TLS stream), a quiet spell of [`park::PARK_AFTER`]
    /// raises it (see [`park::quiet_again`]): the connection is polled again at once, its read
    /// waits, and the stream gives its buffers back; and each poll of the connection is
    /// counted as a round of the stream's, whose flushes go out at the round's end.
    async fn drive<C, E>(&self, conn: C, state: &ConnState, shed: Option<&crate::tls::Shed>)
    where
        C: Future<Output = Result<(), E>> + Graceful,
        E: std::fmt::Display,
    {
        tokio::pin!(conn);
        let mut closing = false;
        // The activity the last raise followed: the next waits for a quiet spell after newer.
        let mut shed_after = None;
        loop {
            tokio::select! {
                // Each poll a round of the TLS stream's (see `Shed::next_round`): its flushes
                // wait for the end of the round, and go out together.
                r = std::future::poll_fn(|cx| {
                    if let Some(shed) = shed {
                        shed.next_round();
                    }
                    conn.as_mut().poll(cx)
                }) => {
                    if let Err(e) = r {
                        tracing::debug!(target: "tern::http", error = %e, "client connection ended with an error");
                    }
                    return;
                }
                () = drain::time_to_close(state), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                // Not idle_for: hyper's keep-alive pings move bytes every 30 s, idle or not.
                () = state.unused_for(self.keepalive_timeout), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = park::quiet_again(&state.activity, shed_after), if !closing && shed.is_some() => {
                    shed_after = Some(state.activity.last());
                    state.let_timer_go();
                    // A client not reading has records queued: no read frees them soon.
                    if let Some(shed) = shed
                        && !state.activity.write_blocked()
                    {
                        shed.raise();
                    }
                }
            }
        }
    }
}

/// A connection that can be asked to finish what it has in progress and close.
trait Graceful {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S> Graceful for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

/// Spawns hyper's tasks (an HTTP/2 connection's streams) on the connection's runtime, each
/// poll a turn of the clock its bookkeeping reads ([`crate::clock::now`]), as a connection
/// task's are.
#[derive(Clone, Copy, Debug, Default)]
pub struct TurnsExecutor;

impl<F> hyper::rt::Executor<F> for TurnsExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(crate::clock::Turns::new(fut));
    }
}

/// hyper's timers, on Tokio's, with hyper's reads of the clock (an HTTP/2 connection's
/// keep-alive notes each frame it reads) taken in the turn of the task they are made in
/// ([`crate::clock::now`]).
#[derive(Clone, Debug, Default)]
pub struct TurnsTimer(TokioTimer);

#[allow(clippy::disallowed_types)] // hyper's trait speaks std's Instant; the clock behind it is tokio's
impl hyper::rt::Timer for TurnsTimer {
    fn sleep(&self, duration: Duration) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        self.0.sleep(duration)
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> std::pin::Pin<Box<dyn hyper::rt::Sleep>> {
        self.0.sleep_until(deadline)
    }

    fn reset(&self, sleep: &mut std::pin::Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        self.0.reset(sleep, new_deadline);
    }

    fn now(&self) -> std::time::Instant {
        crate::clock::now().into_std()
    }
}

impl<I, S, E> Graceful for http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self);
    }
}
