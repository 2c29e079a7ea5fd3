//! The node-wide drain. When tern stops (SIGTERM/SIGINT), hands its listening sockets to a
//! new process (`tern upgrade`) or is drained (`tern drain`), it ends its long-lived
//! exchanges spread evenly over a window instead of all at once, so that clients reconnect
//! (to the new process, or to another node) without a thundering herd and without a failed
//! request. What each kind of exchange sees is in `docs/drain.md`.
//!
//! ## Participants and their times
//! Every client connection hyper serves and every stream (an SSE response, a WebSocket or
//! other upgraded tunnel) registers while it is open ([`Registration`]). [`Drain::begin`]
//! counts the participants open at that moment (n), and each of them, as it notices the
//! drain, claims the next slot k and gets the time `start + window * k / n`: the first at
//! once, the rest one n-th of the window apart. Slots go in the order participants notice
//! the drain (on each worker, roughly least recently active first). The order is not
//! shuffled because it carries no meaning: any order gives the same even spread of end
//! times, which is what the clients and the process taking over see; and claiming in
//! arrival order needs no list of participants, so registering costs a connection two
//! atomic increments and no lock.
//!
//! A participant that registers after the drain began is *late*: a late connection's time
//! is the drain's start (at once), and a late stream's time is its connection's (at once if
//! that has passed). So nothing that begins during the drain outlives its connection's turn.
//!
//! ## States
//! `serving` → `draining` ([`Drain::begin`], once; a second call changes nothing) →
//! `finished` (no participant open, logged once; late arrivals are still served and counted).
//! After the window, the worker gives what is still open `limits.shutdown_timeout`
//! ([`Drain::cut_after`]) and then cuts it.
//!
//! It may not touch the listener, the catalog or the workers: the composition root begins
//! it and waits on it; connections and streams in [`super`] consult it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, Version, header};
use prometheus::IntCounter;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

use super::activity::ConnState;
use super::ending::Why;

/// Once its time has come, an HTTP/1.1 connection with nothing in flight is closed only
/// after nothing has moved on it for this long (or at the window's end). A client busy on it
/// gets `Connection: close` on its next response instead of a close while its next request
/// may be on the way.
pub const QUIET: Duration = Duration::from_secs(1);

/// What a participant is, for `tern_drain_ended_total{kind}` and the drain's log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    H1 = 0,
    H2 = 1,
    Sse = 2,
    WebSocket = 3,
    Other = 4,
}

impl Kind {
    const ALL: [Kind; 5] = [Kind::H1, Kind::H2, Kind::Sse, Kind::WebSocket, Kind::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::H1 => "h1",
            Kind::H2 => "h2",
            Kind::Sse => "sse",
            Kind::WebSocket => "ws",
            Kind::Other => "other",
        }
    }
}

/// The node's drain: one per process, shared by every worker. Cloning is cheap.
#[derive(Clone, Default)]
pub struct Drain {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain")
            .field("draining", &self.is_draining())
            .field("open", &self.inner.open.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// Set once by `begin`; the only thing the request path reads while no drain runs.
    started: AtomicBool,
    /// Set right after `started`, by the same call.
    plan: OnceLock<Plan>,
    /// Turns true once the plan is set: what participants wait on.
    began: watch::Sender<bool>,
    /// Participants open now, connections and streams.
    open: AtomicUsize,
    /// Of those, streams.
    streams: AtomicUsize,
    /// Participants the drain ended at their time, indexed by [`Kind`].
    ended: [AtomicU64; 5],
    counters: Option<[IntCounter; 5]>,
    /// The window and the shutdown timeout after it have passed: what is left is being cut.
    cut: AtomicBool,
    finished: AtomicBool,
    on_finished: Notify,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            started: AtomicBool::new(false),
            plan: OnceLock::new(),
            began: watch::channel(false).0,
            open: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
            ended: Default::default(),
            counters: None,
            cut: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            on_finished: Notify::new(),
        }
    }
}

/// When the drain began, how long it lasts, and how many slots it spreads.
#[derive(Debug)]
struct Plan {
    start: Instant,
    window: Duration,
    slots: usize,
    next: AtomicUsize,
}

impl Plan {
    /// Slot `k`'s time after the start: `window * k / slots`, exactly. A slot past the count
    /// (never expected: see `Drain::register`) gets the window's end.
    fn offset(&self, k: usize) -> Duration {
        if k >= self.slots {
            return self.window;
        }
        let nanos = self.window.as_nanos() * k as u128 / self.slots as u128;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    fn claim(&self) -> Instant {
        self.start + self.offset(self.next.fetch_add(1, Ordering::Relaxed))
    }

    fn end(&self) -> Instant {
        self.start + self.window
    }
}

impl Drain {
    pub fn new(metrics: &Metrics) -> Drain {
        let counters = Kind::ALL.map(|k| metrics.drain_ended.with_label_values(&[k.as_str()]));
        Drain { inner: Arc::new(Inner { counters: Some(counters), ..Inner::default() }) }
    }

    /// Begins the drain: every connection and stream open now ends at its own time, spread
    /// evenly over `window`. Returns false, changing nothing, if a drain already began.
    pub fn begin(&self, window: Duration) -> bool {
        let inner = &*self.inner;
        if inner.started.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return false;
        }
        // Every participant that registered and saw no drain is counted here (both orders are
        // SeqCst); one that registers meanwhile may be counted and also be late, which only
        // leaves a slot unused at the end.
        let open = inner.open.load(Ordering::SeqCst);
        let streams = inner.streams.load(Ordering::SeqCst).min(open);
        let plan = Plan { start: Instant::now(), window, slots: open, next: AtomicUsize::new(0) };
        debug_assert!(inner.plan.get().is_none(), "only the call that set `started` sets the plan");
        let _ = inner.plan.set(plan);
        tracing::info!(target: "tern::http", window_ms = window.as_millis() as u64,
            connections = open - streams, streams,
            "drain begins: ending open connections and streams spread over the window");
        inner.began.send_replace(true);
        if inner.open.load(Ordering::SeqCst) == 0 {
            inner.finish();
        }
        true
    }

    /// Whether a drain began. One relaxed load: the request path's only cost while none runs.
    #[inline]
    pub fn is_draining(&self) -> bool {
        self.inner.started.load(Ordering::Relaxed)
    }

    /// When the window ends, once the drain began.
    pub fn window_end(&self) -> Option<Instant> {
        self.inner.plan.get().map(Plan::end)
    }

    /// Client connections hyper serves now. Connections still in their TLS handshake or
    /// queued for a worker are not counted yet: they register (late) when served.
    pub fn open_connections(&self) -> usize {
        let streams = self.inner.streams.load(Ordering::SeqCst);
        self.inner.open.load(Ordering::SeqCst).saturating_sub(streams)
    }

    /// SSE responses and upgraded tunnels open now. A tunnel outlives hyper's part of its
    /// connection and holds the client's socket: the process is done with its clients once
    /// both counts are 0 ([`Self::finished`]).
    pub fn open_streams(&self) -> usize {
        self.inner.streams.load(Ordering::SeqCst)
    }

    /// Resolves once the drain began and no connection or stream is left open.
    pub async fn finished(&self) {
        loop {
            let notified = self.inner.on_finished.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.finished.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    /// Resolves once the drain began.
    pub async fn begun(&self) {
        let mut began = self.inner.began.subscribe();
        let _ = began.wait_for(|b| *b).await;
    }

    /// Resolves `extra` after the window's end (once the drain began), when what is still
    /// open is to be cut; the drain's last log line then says so.
    pub async fn cut_after(&self, extra: Duration) {
        self.begun().await;
        if let Some(end) = self.window_end() {
            tokio::time::sleep_until(end + extra).await;
        }
        self.inner.cut.store(true, Ordering::SeqCst);
    }

    /// Registers a participant; true if it is late (the drain had begun).
    fn register(&self, stream: bool) -> (Registration, bool) {
        self.inner.open.fetch_add(1, Ordering::SeqCst);
        if stream {
            self.inner.streams.fetch_add(1, Ordering::SeqCst);
        }
        let late = self.inner.started.load(Ordering::SeqCst);
        (Registration { inner: self.inner.clone(), stream }, late)
    }

    /// Registers a client connection about to be served; the registration lasts until it
    /// is dropped (when hyper is done with the connection).
    pub fn connection(&self) -> (ConnDrain, Registration) {
        let (registration, late) = self.register(false);
        let conn = ConnDrain {
            drain: self.clone(),
            late,
            due: OnceLock::new(),
            http2: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        };
        (conn, registration)
    }
}

impl Drain {
    /// A parked connection taken up again: its place in the drain as it was.
    pub fn resume(seat: Seat) -> (ConnDrain, Registration) {
        let conn = ConnDrain {
            drain: Drain { inner: seat.registration.inner.clone() },
            late: seat.late,
            due: seat.due.map(OnceLock::from).unwrap_or_default(),
            http2: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            ended: AtomicBool::new(false),
        };
        (conn, seat.registration)
    }
}

/// A connection's place in the drain while it waits with no task of its own (parked by a
/// worker between requests): still counted open, and given its time like any other.
pub struct Seat {
    registration: Registration,
    late: bool,
    due: Option<Instant>,
}

impl Seat {
    /// The seat of a connection served so far as `conn`, registered by `registration`.
    pub fn new(conn: &ConnDrain, registration: Registration) -> Seat {
        Seat { registration, late: conn.late, due: conn.due.get().copied() }
    }

    /// Whether a drain began.
    pub fn draining(&self) -> bool {
        self.registration.inner.started.load(Ordering::Relaxed)
    }

    /// The connection's time, claimed now if it has none yet; `None` while no drain runs.
    pub fn due(&mut self) -> Option<Instant> {
        if self.due.is_none() {
            let plan = self.registration.inner.plan.get()?;
            self.due = Some(if self.late { plan.start } else { plan.claim() });
        }
        self.due
    }

    /// The drain closes the connection at its time: counted as an HTTP/1.1 one it ended.
    pub fn ended(&self) {
        self.registration.inner.count(Kind::H1);
    }
}

impl Inner {
    fn count(&self, kind: Kind) {
        self.ended[kind as usize].fetch_add(1, Ordering::Relaxed);
        if let Some(c) = &self.counters {
            c[kind as usize].inc();
        }
    }

    /// Logs the drain's end and wakes whoever waits for it, once.
    fn finish(&self) {
        if self.finished.swap(true, Ordering::SeqCst) {
            return;
        }
        let ended = |k: Kind| self.ended[k as usize].load(Ordering::Relaxed);
        let elapsed_ms = self.plan.get().map_or(0, |p| p.start.elapsed().as_millis() as u64);
        let cut = self.cut.load(Ordering::SeqCst);
        tracing::info!(target: "tern::http", elapsed_ms, h1 = ended(Kind::H1), h2 = ended(Kind::H2),
            sse = ended(Kind::Sse), ws = ended(Kind::WebSocket), other = ended(Kind::Other), cut,
            "drain finished: no connection or stream left open");
        self.on_finished.notify_waiters();
    }
}

/// A participant, counted while it is open.
pub struct Registration {
    inner: Arc<Inner>,
    stream: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.stream {
            self.inner.streams.fetch_sub(1, Ordering::SeqCst);
        }
        let was = self.inner.open.fetch_sub(1, Ordering::SeqCst);
        // Each registration counted itself once: a count that wraps would leave `finished`
        // never reached (or reached early) and the drain's log wrong.
        debug_assert!(was > 0, "a participant left that never registered");
        if was == 1 && self.inner.plan.get().is_some() {
            self.inner.finish();
        }
    }
}

/// Where one client connection stands in the drain.
#[derive(Debug)]
pub struct ConnDrain {
    drain: Drain,
    late: bool,
    /// Its time, claimed by whichever asks first: the connection's driver or its handler.
    due: OnceLock<Instant>,
    http2: AtomicBool,
    /// Its time has come: each HTTP/1.1 response from now on carries `Connection: close`.
    closing: AtomicBool,
    /// Counted in `tern_drain_ended_total` already.
    ended: AtomicBool,
}

impl Default for ConnDrain {
    /// A connection of a drain of its own (tests).
    fn default() -> Self {
        Drain::default().connection().0
    }
}

impl ConnDrain {
    /// The connection speaks HTTP/2: at its time it gets GOAWAY rather than waiting for a
    /// response to carry `Connection: close`.
    pub fn set_http2(&self) {
        self.http2.store(true, Ordering::Relaxed);
    }

    #[inline]
    pub fn draining(&self) -> bool {
        self.drain.is_draining()
    }

    /// The connection's time, once the drain has begun.
    pub fn due(&self) -> Option<Instant> {
        if let Some(at) = self.due.get() {
            return Some(*at);
        }
        let plan = self.drain.inner.plan.get()?;
        Some(*self.due.get_or_init(|| if self.late { plan.start } else { plan.claim() }))
    }

    /// Whether the connection's time has come.
    fn closing_now(&self) -> bool {
        if self.closing.load(Ordering::Relaxed) {
            return true;
        }
        if self.due().is_none_or(|due| Instant::now() < due) {
            return false;
        }
        self.closing.store(true, Ordering::Relaxed);
        true
    }

    /// Marks an HTTP/1.x response `Connection: close` once the connection's time has come,
    /// so the client reads it whole and then reconnects; hyper closes after it. A 101 keeps
    /// its `Connection: upgrade` (the tunnel, a late stream, ends at the connection's time).
    /// Call only while draining ([`Self::draining`]).
    pub fn on_response<B>(&self, version: Version, resp: &mut Response<B>) {
        if version >= Version::HTTP_2 || resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return;
        }
        if self.closing_now() {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            self.ended(Kind::H1);
        }
    }

    fn ended(&self, kind: Kind) {
        if !self.ended.swap(true, Ordering::Relaxed) {
            self.drain.inner.count(kind);
        }
    }
}

/// Resolves when the drain wants `conn` closed gracefully: HTTP/2 at its time (GOAWAY; its
/// streams in flight finish); HTTP/1.1 at its time once quiet (nothing in flight, nothing
/// moved for [`QUIET`]), or at the window's end. Until then, from its time on, its responses
/// carry `Connection: close` ([`ConnDrain::on_response`]).
pub async fn time_to_close(conn: &ConnState) {
    let d = &conn.drain;
    d.drain.begun().await;
    let (Some(due), Some(end)) = (d.due(), d.drain.window_end()) else {
        return std::future::pending().await;
    };
    tokio::time::sleep_until(due).await;
    d.closing.store(true, Ordering::Relaxed);
    if d.http2.load(Ordering::Relaxed) {
        d.ended(Kind::H2);
        return;
    }
    tokio::select! {
        () = conn.idle_for(QUIET) => {}
        () = tokio::time::sleep_until(end) => {}
    }
    d.ended(Kind::H1);
}

/// What a stream waits on to end: its machine stopping, or its time in a drain.
pub struct StreamEnd {
    machine: CancellationToken,
    conn: Arc<ConnState>,
    late: bool,
    kind: Kind,
}

impl StreamEnd {
    /// A stream on `conn` about to begin, registered with the drain until the
    /// [`Registration`] drops; `machine` is its machine's token.
    pub fn new(machine: CancellationToken, conn: &Arc<ConnState>, kind: Kind) -> (StreamEnd, Registration) {
        let (registration, late) = conn.drain.drain.register(true);
        (StreamEnd { machine, conn: conn.clone(), late, kind }, registration)
    }

    /// Resolves when the stream is to end, saying why.
    pub async fn wait(self) -> Why {
        let drained = async {
            let conn = &self.conn.drain;
            conn.drain.begun().await;
            let at = if self.late { conn.due() } else { conn.drain.inner.plan.get().map(Plan::claim) };
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
            conn.drain.inner.count(self.kind);
        };
        tokio::select! {
            biased;
            () = self.machine.cancelled() => Why::Machine,
            () = drained => Why::Drain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(window_ms: u64, slots: usize) -> Plan {
        Plan {
            start: Instant::now(),
            window: Duration::from_millis(window_ms),
            slots,
            next: AtomicUsize::new(0),
        }
    }

    #[test]
    fn slot_k_of_n_is_at_k_nths_of_the_window() {
        let p = plan(1000, 3);
        let offsets: Vec<_> = (0..4).map(|k| p.offset(k).as_nanos()).collect();
        assert_eq!(offsets, [0, 333_333_333, 666_666_666, 1_000_000_000], "a slot past n gets the end");
        assert_eq!(plan(1000, 0).offset(0), Duration::from_secs(1), "nothing was counted");
        assert_eq!(plan(0, 5).offset(4), Duration::ZERO, "a zero window ends everything at once");
        let big = Plan { window: Duration::from_secs(3600), ..plan(0, 1_000_000) };
        assert_eq!(big.offset(999_999), Duration::from_nanos(3_599_996_400_000));
    }

    /// Each of `n` connections open at the start waits for its time; returns when each got it,
    /// after the drain's start, in whole milliseconds.
    async fn times(drain: &Drain, conns: Vec<Arc<ConnState>>) -> Vec<u64> {
        let waits: Vec<_> = conns
            .into_iter()
            .map(|c| {
                tokio::spawn(async move {
                    c.drain.drain.begun().await;
                    let due = c.drain.due().unwrap();
                    tokio::time::sleep_until(due).await;
                    Instant::now()
                })
            })
            .collect();
        let start = Instant::now();
        drain.begin(Duration::from_secs(4));
        let mut out = Vec::new();
        for w in waits {
            out.push((w.await.unwrap() - start).as_millis() as u64);
        }
        out.sort_unstable();
        out
    }

    #[tokio::test(start_paused = true)]
    async fn connections_open_at_the_start_end_spread_evenly() {
        let drain = Drain::default();
        let mut regs = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..4 {
            let (c, r) = drain.connection();
            conns.push(Arc::new(ConnState::new(c)));
            regs.push(r);
        }
        assert_eq!(times(&drain, conns).await, [0, 1000, 2000, 3000]);
        assert!(!drain.begin(Duration::from_secs(100)), "begin is idempotent");
        assert_eq!(
            drain.window_end().unwrap() - drain.inner.plan.get().unwrap().start,
            Duration::from_secs(4)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn late_participants_end_at_their_connections_time() {
        let drain = Drain::default();
        let (early, _r1) = drain.connection();
        let (c2, _r2) = drain.connection();
        let early = Arc::new(ConnState::new(early));
        let second = Arc::new(ConnState::new(c2));
        // A stream on `second` open at the start has a slot of its own.
        let (own, _r3) = StreamEnd::new(CancellationToken::new(), &second, Kind::Sse);
        let start = Instant::now();
        drain.begin(Duration::from_secs(3));
        assert_eq!(early.drain.due(), Some(start), "claimed first");
        assert_eq!(second.drain.due(), Some(start + Duration::from_secs(1)));
        assert_eq!(own.wait().await, Why::Drain);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // A stream that begins during the drain ends at its connection's time (passed: at once).
        let (late, _r4) = StreamEnd::new(CancellationToken::new(), &second, Kind::WebSocket);
        assert_eq!(late.wait().await, Why::Drain);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        // A connection that begins during the drain is due at once.
        let (late_conn, _r5) = drain.connection();
        assert_eq!(late_conn.due(), Some(start));
        let ended = |k: Kind| drain.inner.ended[k as usize].load(Ordering::Relaxed);
        assert_eq!((ended(Kind::Sse), ended(Kind::WebSocket)), (1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_machine_ends_a_stream_before_its_time() {
        let drain = Drain::default();
        let (c, _r) = drain.connection();
        let conn = Arc::new(ConnState::new(c));
        let token = CancellationToken::new();
        let (end, _s) = StreamEnd::new(token.clone(), &conn, Kind::Sse);
        token.cancel();
        assert_eq!(end.wait().await, Why::Machine);
    }

    #[tokio::test(start_paused = true)]
    async fn finished_once_every_participant_has_left() {
        let drain = Drain::default();
        let (c, reg) = drain.connection();
        let conn = Arc::new(ConnState::new(c));
        let (_end, stream) = StreamEnd::new(CancellationToken::new(), &conn, Kind::WebSocket);
        assert_eq!((drain.open_connections(), drain.open_streams()), (1, 1));
        drain.begin(Duration::from_secs(1));
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.finished().await }
        });
        drop(reg);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a stream is still open");
        drop(stream);
        waiter.await.unwrap();
        // With nothing open, a drain finishes as it begins.
        let empty = Drain::default();
        empty.begin(Duration::from_secs(60));
        tokio::time::timeout(Duration::from_millis(1), empty.finished()).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn responses_carry_connection_close_from_the_connections_time_on() {
        let drain = Drain::default();
        let (first, _r1) = drain.connection();
        let (second, _r2) = drain.connection();
        drain.begin(Duration::from_secs(2));
        assert!(first.draining());
        let ok = || Response::new(());
        let close = |c: &ConnDrain, v: Version, mut r: Response<()>| {
            c.on_response(v, &mut r);
            r.headers().get(header::CONNECTION).cloned()
        };
        assert_eq!(first.due(), Some(Instant::now()));
        assert_eq!(close(&first, Version::HTTP_11, ok()).unwrap(), "close");
        assert_eq!(close(&second, Version::HTTP_11, ok()), None, "its time is a second away");
        let mut switching = ok();
        *switching.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        assert_eq!(close(&first, Version::HTTP_11, switching), None);
        assert_eq!(close(&first, Version::HTTP_2, ok()), None, "HTTP/2 gets GOAWAY instead");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(close(&second, Version::HTTP_11, ok()).unwrap(), "close");
        assert_eq!(drain.inner.ended[Kind::H1 as usize].load(Ordering::Relaxed), 2, "once each");
    }
}
