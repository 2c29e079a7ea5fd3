//! The busy-loop guard: a connection task polled over and over without moving a byte is
//! spinning (fly-proxy's tokio-rustls `close_notify` loop held a core at 100%), and is
//! closed, logged with its protocol and peer, and counted in
//! `tern_spurious_wakeups_total{protocol}`. The process is not bounced for it: one
//! connection is lost, not every connection.
//!
//! [`Counted`] wraps a connection's I/O and bumps a [`Progress`] counter on every read or
//! write that moved bytes; [`Guarded`] wraps the connection's future and counts the polls
//! since that counter last moved. The hot path reads no clock: only after
//! [`SUSPECT_POLLS`] polls without progress is the time taken, and only at [`SPIN_POLLS`]
//! is it compared. That many polls within [`SPIN_WINDOW`] is a spin; spread over longer,
//! it is an idle connection woken now and then, and counting starts again.

use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::telemetry::Metrics;

/// Polls without progress after which the guard starts to time them.
pub const SUSPECT_POLLS: u32 = 1_000;
/// Polls without progress that, within [`SPIN_WINDOW`] of the suspect mark, are a spin.
pub const SPIN_POLLS: u32 = 10_000;
pub const SPIN_WINDOW: Duration = Duration::from_secs(1);

/// How many reads and writes of a connection moved bytes; shared by its wrappers.
#[derive(Clone, Debug, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one step of progress: for work that is not I/O through a [`Counted`].
    #[inline]
    pub fn bump(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

pin_project! {
    /// I/O that counts its progress: every read or write that moved at least one byte.
    #[derive(Debug)]
    pub struct Counted<IO> {
        #[pin]
        io: IO,
        progress: Progress,
    }
}

impl<IO> Counted<IO> {
    pub fn new(io: IO, progress: Progress) -> Self {
        Counted { io, progress }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The count its bytes go to.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    pub fn into_inner(self) -> IO {
        self.io
    }
}

impl<IO: AsyncRead> AsyncRead for Counted<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.io.poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.progress.bump();
        }
        res
    }
}

impl<IO: AsyncWrite> AsyncWrite for Counted<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        counted(this.progress, this.io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        counted(this.progress, this.io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

fn counted(progress: &Progress, res: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
    if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
        progress.bump();
    }
    res
}

/// Why a [`Guarded`] future was ended early.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{protocol} connection from {peer} was polled {polls} times without progress: closed")]
pub struct Spinning {
    pub protocol: &'static str,
    pub peer: SocketAddr,
    pub polls: u32,
}

pin_project! {
    /// A connection's future, ended early (`Err(Spinning)`, dropping the connection) when it
    /// is polled [`SPIN_POLLS`] times within [`SPIN_WINDOW`] without its [`Progress`] moving.
    pub struct Guarded<F> {
        #[pin]
        inner: F,
        progress: Progress,
        seen: u64,
        polls: u32,
        suspect_since: Option<Instant>,
        // None until first polled; then whether the spin fault replaced the inner future.
        faulted: Option<bool>,
        protocol: &'static str,
        peer: SocketAddr,
        metrics: Arc<Metrics>,
    }
}

impl<F: Future> Guarded<F> {
    /// Guards `inner`, a connection from `peer` speaking `protocol` (a stable label:
    /// "http1", "h2", "tls", "tunnel"), whose I/O counts into `progress`.
    pub fn new(
        inner: F,
        progress: Progress,
        protocol: &'static str,
        peer: SocketAddr,
        metrics: Arc<Metrics>,
    ) -> Self {
        let seen = progress.get();
        Guarded {
            inner,
            progress,
            seen,
            polls: 0,
            suspect_since: None,
            faulted: None,
            protocol,
            peer,
            metrics,
        }
    }
}

impl<F: Future> Future for Guarded<F> {
    type Output = Result<F::Output, Spinning>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let faulted = *this.faulted.get_or_insert_with(super::faults::take_spin);
        if faulted {
            // The spin fault: what a stuck TLS close looks like, a task that wakes itself
            // and never gets anywhere.
            cx.waker().wake_by_ref();
        } else if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let now = this.progress.get();
        if now != *this.seen {
            *this.seen = now;
            *this.polls = 0;
            *this.suspect_since = None;
            return Poll::Pending;
        }
        *this.polls += 1;
        if *this.polls == SUSPECT_POLLS {
            *this.suspect_since = Some(Instant::now());
        } else if *this.polls >= SPIN_POLLS {
            let quick = this.suspect_since.is_some_and(|at| at.elapsed() < SPIN_WINDOW);
            if quick {
                let spinning = Spinning { protocol: this.protocol, peer: *this.peer, polls: *this.polls };
                tracing::warn!(target: "tern::watchdog", protocol = spinning.protocol, peer = %spinning.peer,
                    polls = spinning.polls, "connection task spinning without progress; closing it");
                this.metrics.spurious_wakeups.with_label_values(&[this.protocol]).inc();
                return Poll::Ready(Err(spinning));
            }
            *this.polls = 0;
            *this.suspect_since = None;
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The spin fault is process-wide; tests that poll a `Guarded` take turns.
    static TURNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn peer() -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], 40_000))
    }

    fn spurious(m: &Metrics, protocol: &str) -> u64 {
        m.spurious_wakeups.with_label_values(&[protocol]).get()
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_wakes_itself_without_progress_is_cut_and_counted() {
        let _turn = TURNS.lock().await;
        let metrics = Arc::new(Metrics::new());
        let spin = poll_fn(|cx| {
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        });
        let out = Guarded::new(spin, Progress::new(), "http1", peer(), metrics.clone()).await;
        let err = out.unwrap_err();
        assert_eq!((err.protocol, err.peer, err.polls), ("http1", peer(), SPIN_POLLS));
        assert_eq!(spurious(&metrics, "http1"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_moving_bytes_on_every_poll_is_left_alone() {
        let _turn = TURNS.lock().await;
        let metrics = Arc::new(Metrics::new());
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let progress = Progress::new();
        let mut io = Counted::new(near, progress.clone());
        let mut sent = 0u32;
        // Wakes itself like the spinner, but writes a byte each time.
        let busy = poll_fn(move |cx| {
            if sent == 3 * SPIN_POLLS {
                return Poll::Ready(sent);
            }
            match Pin::new(&mut io).poll_write(cx, b"x") {
                Poll::Ready(Ok(1)) => sent += 1,
                other => panic!("{other:?}"),
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            far.read_to_end(&mut all).await.map(|_| all.len())
        });
        let out = Guarded::new(busy, progress, "http1", peer(), metrics.clone()).await;
        assert_eq!(out.unwrap(), 3 * SPIN_POLLS);
        assert_eq!(reader.await.unwrap().unwrap(), 30_000);
        assert_eq!(spurious(&metrics, "http1"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_woken_now_and_then_is_left_alone() {
        let _turn = TURNS.lock().await;
        let metrics = Arc::new(Metrics::new());
        // A keep-alive connection whose timer fires every 10 ms with nothing to read.
        let idle = async {
            for _ in 0..2 * SPIN_POLLS {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            "closed by its own timeout"
        };
        let out = Guarded::new(idle, Progress::new(), "h2", peer(), metrics.clone()).await;
        assert_eq!(out.unwrap(), "closed by its own timeout");
        assert_eq!(spurious(&metrics, "h2"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_spin_fault_armed_the_next_guarded_task_spins_and_is_cut_then_it_disarms() {
        let _turn = TURNS.lock().await;
        let metrics = Arc::new(Metrics::new());
        super::super::faults::arm_spin();
        let first = Guarded::new(async { 5 }, Progress::new(), "http1", peer(), metrics.clone()).await;
        assert!(first.is_err(), "a future that was ready at once was replaced by a spinner");
        let second = Guarded::new(async { 5 }, Progress::new(), "http1", peer(), metrics.clone()).await;
        assert_eq!(second.unwrap(), 5);
        assert_eq!(spurious(&metrics, "http1"), 1);
    }

    #[tokio::test]
    async fn counted_io_passes_reads_writes_and_shutdown_through_and_counts_only_bytes_moved() {
        let (near, mut far) = tokio::io::duplex(1024);
        let progress = Progress::new();
        let mut io = Counted::new(near, progress.clone());
        io.write_all(b"hello").await.unwrap();
        let bufs = [IoSlice::new(b"ab"), IoSlice::new(b"cd")];
        let n = io.write_vectored(&bufs).await.unwrap();
        assert!(n > 0);
        assert_eq!(progress.get(), 2);
        io.shutdown().await.unwrap();
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert!(got.starts_with(b"helloab"), "{got:?}");
        far.write_all(b"pong").await.unwrap();
        drop(far);
        let mut back = Vec::new();
        io.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
        assert_eq!(progress.get(), 3, "the read of 4 bytes counts; the read of end-of-file does not");
        assert_eq!(io.is_write_vectored(), io.get_ref().is_write_vectored());
    }
}
