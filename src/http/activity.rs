//! "When did bytes last move?" — shared by the per-app idle timeout (which must never cut
//! an exchange or tunnel while bytes flow) and the keep-alive timeout of idle connections.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::drain::ConnDrain;

/// The last time bytes moved, as an offset from a base instant, readable without a lock.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    last_ms: AtomicU64,
    /// When an exchange last ended, as the same offset.
    exchange_ms: AtomicU64,
    /// The last write was refused for now (the peer is not reading): bytes wait unwritten.
    write_blocked: AtomicBool,
}

impl Activity {
    pub fn new() -> Self {
        Self::since(Instant::now())
    }

    /// Activity whose first movement was at `base` (an instant already read: a clock read
    /// fewer).
    pub fn since(base: Instant) -> Self {
        Activity {
            base,
            last_ms: AtomicU64::new(0),
            exchange_ms: AtomicU64::new(0),
            write_blocked: AtomicBool::new(false),
        }
    }

    pub fn write_blocked(&self) -> bool {
        self.write_blocked.load(Ordering::Relaxed)
    }

    /// Notes whether a write (or flush) was refused for now, from its poll result.
    fn wrote<T>(&self, r: &Poll<T>) {
        let blocked = r.is_pending();
        if self.write_blocked.load(Ordering::Relaxed) != blocked {
            self.write_blocked.store(blocked, Ordering::Relaxed);
        }
    }

    pub fn touch(&self) {
        let ms = crate::clock::now().saturating_duration_since(self.base).as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// An exchange ended: activity, and the time an HTTP/2 connection's keep-alive limit
    /// runs from. One clock read for both.
    fn exchange_ended(&self) {
        let ms = crate::clock::now().saturating_duration_since(self.base).as_millis() as u64;
        self.exchange_ms.fetch_max(ms, Ordering::Relaxed);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When an exchange last ended (the connection's start, if none has).
    pub fn last_exchange(&self) -> Instant {
        self.base + Duration::from_millis(self.exchange_ms.load(Ordering::Relaxed))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Resolves once nothing has moved for `timeout`.
pub async fn silent_for(activity: &Activity, timeout: Duration) {
    // Set without a look at the clock (a deadline already past fires at the first poll):
    // most waits end another way, and the clock is read only when the timer fires.
    let sleep = std::pin::pin!(tokio::time::sleep_until(activity.last() + timeout));
    silent_for_on(sleep, activity, timeout).await;
}

/// [`silent_for`] on a timer kept from an earlier wait. Moving a registered timer's deadline
/// later is a store to it, where a new timer is a lock and an insert into the runtime's timer
/// wheel when first polled, and a lock and a removal when dropped: a connection's exchanges
/// wait for their machines on one timer ([`ConnState::take_timer`]).
pub async fn silent_for_on(mut sleep: Pin<&mut tokio::time::Sleep>, activity: &Activity, timeout: Duration) {
    loop {
        sleep.as_mut().reset(activity.last() + timeout);
        sleep.as_mut().await;
        if activity.last() + timeout <= Instant::now() {
            return;
        }
    }
}

/// A poll-based version of [`silent_for`] for body wrappers, which cannot await.
#[derive(Debug)]
pub struct IdleTimer {
    activity: Arc<Activity>,
    timeout: Duration,
    /// Made at the first wait: most bodies (all of it read with the head) never wait.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl IdleTimer {
    pub fn new(activity: Arc<Activity>, timeout: Duration) -> Self {
        IdleTimer { activity, timeout, sleep: None }
    }

    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Ready(()) once the exchange has been silent for the timeout; otherwise registers the
    /// waker for the current deadline.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let (activity, timeout) = (&self.activity, self.timeout);
        let sleep =
            self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(activity.last() + timeout)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = activity.last() + timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

/// An I/O wrapper that touches an [`Activity`] whenever bytes move.
pub struct TouchIo<IO> {
    inner: IO,
    activity: Arc<Activity>,
}

impl<IO> TouchIo<IO> {
    pub fn new(inner: IO, activity: Arc<Activity>) -> Self {
        TouchIo { inner, activity }
    }

    pub fn into_inner(self) -> IO {
        self.inner
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for TouchIo<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for TouchIo<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.wrote(&r);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.wrote(&r);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.activity.wrote(&r);
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A client connection's state: when bytes last moved, how many exchanges are open, and
/// where it stands in a drain. A connection with no open exchange and no bytes for the
/// keep-alive timeout is closed.
#[derive(Debug, Default)]
pub struct ConnState {
    pub activity: Arc<Activity>,
    open: AtomicUsize,
    /// Someone waits in [`Self::exchanges_end`]: the last exchange to end wakes [`Self::ended`].
    watching: AtomicBool,
    ended: Notify,
    pub drain: ConnDrain,
    /// The timer the connection's last exchange waited on, for the next (see
    /// [`silent_for_on`]).
    timer: parking_lot::Mutex<Option<Pin<Box<tokio::time::Sleep>>>>,
}

impl ConnState {
    pub fn new(drain: ConnDrain) -> Self {
        ConnState {
            activity: Arc::default(),
            open: AtomicUsize::new(0),
            watching: AtomicBool::new(false),
            ended: Notify::new(),
            drain,
            timer: parking_lot::Mutex::new(None),
        }
    }

    /// A timer to wait on: the connection's, or a new one while another exchange of the
    /// connection (HTTP/2) holds it. Given back with [`Self::keep_timer`].
    pub fn take_timer(&self) -> Pin<Box<tokio::time::Sleep>> {
        let kept = self.timer.lock().take();
        // A far deadline; whoever waits on it sets its own first.
        kept.unwrap_or_else(|| Box::pin(tokio::time::sleep(Duration::from_secs(3600))))
    }

    /// Lets the kept timer go: the connection is quiet, or its exchange has become a stream
    /// that may wait for hours, and the timer (a few hundred bytes, and an entry in the
    /// runtime's timer wheel) would be held all the while. The next exchange makes a new one.
    pub fn let_timer_go(&self) {
        // Dropped once the lock is released: a timer's drop takes the runtime's timer lock.
        let kept = self.timer.lock().take();
        drop(kept);
    }

    /// Keeps `timer` for the connection's next exchange (of two given back, the later).
    pub fn keep_timer(&self, timer: Pin<Box<tokio::time::Sleep>>) {
        let spare = self.timer.lock().replace(timer);
        // Another exchange gave one back first (HTTP/2): the newer is kept, the other dropped
        // outside the lock.
        drop(spare);
    }

    pub fn begin(self: &Arc<Self>) -> ExchangeGuard {
        // Its start is not noted: while it is open nothing counts as unused, and its end is.
        self.open.fetch_add(1, Ordering::Relaxed);
        ExchangeGuard(self.clone())
    }

    pub fn open_exchanges(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Resolves when the connection has had no open exchange and no bytes for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        self.quiet_for(timeout, Activity::last).await;
    }

    /// Resolves when the connection has had no open exchange, and none has ended, for
    /// `timeout`, whatever bytes moved: HTTP/2's keep-alive limit. Its pings (hyper
    /// sends one every 30 s, idle or not) and other frames outside a stream keep nothing open.
    pub async fn unused_for(&self, timeout: Duration) {
        self.quiet_for(timeout, Activity::last_exchange).await;
    }

    /// No exchange open, and `timeout` since the instant `since` reads.
    ///
    /// While an exchange is open it waits out one `timeout` on the clock (a busy connection's
    /// exchanges come and go many times in it, and waking at each end would cost a poll per
    /// request), then, if one is still open, for the last to end: a stream open for hours
    /// costs no wake until it ends. (A silent stream is the exchange's business: the app's
    /// idle_timeout.)
    async fn quiet_for(&self, timeout: Duration, since: fn(&Activity) -> Instant) {
        let mut open_a_while = false;
        loop {
            if self.open_exchanges() > 0 {
                if open_a_while {
                    self.exchanges_end().await;
                } else {
                    tokio::time::sleep(timeout).await;
                    open_a_while = true;
                }
                continue;
            }
            open_a_while = false;
            let deadline = since(&self.activity) + timeout;
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// Resolves once no exchange is open, woken by the last to end.
    async fn exchanges_end(&self) {
        let ended = self.ended.notified();
        tokio::pin!(ended);
        // Registered before the flag is raised and the count read again, so an end between
        // them is either seen in the count or wakes this waiter (both orders are SeqCst).
        ended.as_mut().enable();
        self.watching.store(true, Ordering::SeqCst);
        if self.open.load(Ordering::SeqCst) > 0 {
            ended.await;
        }
    }
}

/// One open exchange on a connection; dropping it closes the exchange.
#[derive(Debug)]
pub struct ExchangeGuard(Arc<ConnState>);

impl ExchangeGuard {
    /// The connection the exchange is on.
    pub fn conn(&self) -> &Arc<ConnState> {
        &self.0
    }
}

impl Drop for ExchangeGuard {
    fn drop(&mut self) {
        let conn = &self.0;
        conn.activity.exchange_ended();
        // A lock-free load on every request; the wake (a lock) only for a waiter.
        if conn.open.fetch_sub(1, Ordering::SeqCst) == 1 && conn.watching.load(Ordering::SeqCst) {
            conn.watching.store(false, Ordering::SeqCst);
            conn.ended.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silence_is_measured_from_the_last_touch() {
        let a = Arc::new(Activity::new());
        let started = Instant::now();
        let toucher = {
            let a = a.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    a.touch();
                }
            })
        };
        silent_for(&a, Duration::from_secs(5)).await;
        // Touched every 4 s for 20 s, then 5 s of silence.
        assert_eq!(started.elapsed().as_secs(), 25);
        toucher.await.unwrap();
    }

    /// A connection's exchanges wait on one kept timer, each from its own activity and with
    /// its own limit: a later exchange with a shorter limit than the one before (another
    /// app's) is cut at its own, and one with a longer limit is not cut at the old one.
    #[tokio::test(start_paused = true)]
    async fn exchanges_on_a_kept_timer_wait_each_its_own_limit() {
        let conn = ConnState::default();
        let wait = |limit: u64| {
            let conn = &conn;
            async move {
                let (exchange, started) = (Activity::new(), Instant::now());
                let mut timer = conn.take_timer();
                silent_for_on(timer.as_mut(), &exchange, Duration::from_secs(limit)).await;
                conn.keep_timer(timer);
                started.elapsed().as_secs()
            }
        };
        assert_eq!(wait(60).await, 60);
        assert_eq!(wait(5).await, 5, "shorter than the kept timer's last deadline");
        assert_eq!(wait(90).await, 90, "longer: not cut at the last one");
        // An exchange waiting while another holds the timer (HTTP/2) gets one of its own.
        let held = conn.take_timer();
        assert_eq!(wait(7).await, 7);
        conn.keep_timer(held);
        // Touched halfway, the wait runs from the touch.
        let exchange = Arc::new(Activity::new());
        let started = Instant::now();
        let toucher = {
            let exchange = exchange.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(20)).await;
                exchange.touch();
            })
        };
        let mut timer = conn.take_timer();
        silent_for_on(timer.as_mut(), &exchange, Duration::from_secs(30)).await;
        assert_eq!(started.elapsed().as_secs(), 50);
        toucher.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_with_an_open_exchange_is_never_idle() {
        let c = Arc::new(ConnState::default());
        let guard = c.begin();
        let idle = tokio::time::timeout(Duration::from_secs(600), c.idle_for(Duration::from_secs(10))).await;
        assert!(idle.is_err(), "an open exchange keeps the connection");
        drop(guard);
        let started = Instant::now();
        c.idle_for(Duration::from_secs(10)).await;
        assert_eq!(started.elapsed().as_secs(), 10);
    }

    /// A stream open for ten minutes costs its connection's waits a wake or two, not one a
    /// second; they resolve a second after it ends.
    #[tokio::test(start_paused = true)]
    async fn an_open_stream_does_not_wake_the_connection_until_it_ends() {
        let c = Arc::new(ConnState::default());
        let guard = c.begin();
        let polls = AtomicUsize::new(0);
        let idle = c.idle_for(Duration::from_secs(1));
        tokio::pin!(idle);
        let counted = std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            idle.as_mut().poll(cx)
        });
        // On a task of its own, so that its timer's wake does not poll the wait too.
        let stream = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(600)).await;
            drop(guard);
        });
        let started = Instant::now();
        // Bounded, so that a lost wake fails here rather than hanging.
        tokio::time::timeout(Duration::from_secs(3600), counted).await.expect("woken by the stream's end");
        stream.await.unwrap();
        assert_eq!(started.elapsed().as_secs(), 601, "a second after the stream's end");
        // The first poll, the wake after one second, the end's wake and the last second's.
        assert!(polls.load(Ordering::Relaxed) <= 4, "{} polls", polls.load(Ordering::Relaxed));
    }

    /// A connection's driver waits on one connection in several ways at once (parking, the
    /// keep-alive limit, a drain's quiet second): the end of a long stream wakes every one
    /// still waiting, and one given up meanwhile leaves the others to it.
    #[tokio::test(start_paused = true)]
    async fn a_stream_end_wakes_every_wait_on_the_connection() {
        let c = Arc::new(ConnState::default());
        let guard = c.begin();
        let stream = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(600)).await;
            drop(guard);
        });
        let started = Instant::now();
        let waits = async {
            let waited = |timeout: u64| {
                let c = c.clone();
                async move {
                    c.idle_for(Duration::from_secs(timeout)).await;
                    started.elapsed().as_secs()
                }
            };
            let given_up = async {
                tokio::select! {
                    () = c.idle_for(Duration::from_secs(1)) => unreachable!("an open exchange"),
                    () = tokio::time::sleep(Duration::from_secs(300)) => {}
                }
            };
            tokio::join!(waited(1), waited(75), waited(1), given_up)
        };
        let (park, keepalive, quiet, ()) =
            tokio::time::timeout(Duration::from_secs(3600), waits).await.expect("every wait woken");
        assert_eq!((park, keepalive, quiet), (601, 675, 601), "each its own time after the end");
        stream.await.unwrap();
    }

    /// HTTP/2's keep-alive limit counts exchanges, not bytes: pings every 30 s do not keep
    /// an unused connection, an exchange does, and the limit runs from its end.
    #[tokio::test(start_paused = true)]
    async fn only_exchanges_keep_a_connection_in_use() {
        let c = Arc::new(ConnState::default());
        let started = Instant::now();
        let pings = async {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                c.activity.touch();
            }
        };
        // Bounded, so that a limit the pings kept forever fails here rather than hanging.
        let unused = tokio::time::timeout(Duration::from_secs(600), async {
            tokio::select! {
                () = c.unused_for(Duration::from_secs(75)) => {}
                () = pings => unreachable!(),
            }
        })
        .await;
        assert!(unused.is_ok(), "pings kept an unused connection");
        assert_eq!(started.elapsed().as_secs(), 75, "bytes alone do not keep it");
        // A new connection, an exchange 10 s in lasting 100 s: the limit runs from its end.
        let c = Arc::new(ConnState::default());
        let started = Instant::now();
        let exchange = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let guard = c.begin();
            tokio::time::sleep(Duration::from_secs(100)).await;
            drop(guard);
            std::future::pending::<()>().await;
        };
        tokio::select! {
            () = c.unused_for(Duration::from_secs(75)) => {}
            () = exchange => unreachable!(),
        }
        assert_eq!(started.elapsed().as_secs(), 10 + 100 + 75);
    }
}
