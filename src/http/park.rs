//! Idle HTTP/1.1 connections give their buffers back.
//!
//! hyper keeps a connection's read and write buffers (24 KB or more) and its last header
//! map for as long as the connection lives. A keep-alive connection quiet for
//! [`PARK_AFTER`] is taken back from hyper (nothing in flight, nothing unwritten), and only
//! the socket is kept while it waits: the next bytes the client sends start a fresh hyper
//! connection, with those bytes (and any hyper had read ahead) given to it first.
//!
//! Plain connections are told apart from HTTP/2 with prior knowledge here, by the preface,
//! rather than by hyper-util's `auto` builder, which cannot hand its connection back.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::activity::{Activity, ConnState, silent_for};
use super::drain;

/// How long a keep-alive connection is quiet before hyper's state for it is freed. Long
/// enough that a busy connection never pays for a fresh one between its requests.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An IO whose first reads return `prefix`: bytes read before hyper took the connection.
pub struct Prefixed<IO> {
    prefix: Bytes,
    inner: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(inner: IO) -> Self {
        Prefixed { prefix: Bytes::new(), inner }
    }

    pub fn get_ref(&self) -> &IO {
        &self.inner
    }

    /// Whether bytes read ahead still wait in front of the IO.
    pub fn has_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }

    /// The IO itself, if nothing read ahead is left in front of it.
    pub fn into_inner(self) -> Result<IO, Self> {
        if self.prefix.is_empty() { Ok(self.inner) } else { Err(self) }
    }

    /// Puts `bytes` before whatever is still unread.
    pub fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.prefix = if self.prefix.is_empty() {
            bytes
        } else {
            let mut joined = Vec::with_capacity(bytes.len() + self.prefix.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.prefix);
            Bytes::from(joined)
        };
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // An emptied view still holds its buffer (hyper's, after a pipelined read).
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What the next bytes of a quiet connection say.
pub enum Next {
    /// Bytes arrived (kept in the IO, to be read again).
    Bytes,
    /// None came within the time it was to wait before it is handed over to wait without a
    /// task (see [`super::Parked`]).
    Park,
    /// The client closed, the read failed, the keep-alive timeout passed or the drain wants
    /// the connection closed.
    Close,
}

/// Waits for a quiet connection's next bytes, holding no buffer but a small one on the
/// stack while it reads. Nothing is written: a connection closed here had nothing in flight.
pub async fn next_bytes<IO>(
    io: &mut Prefixed<IO>,
    state: &ConnState,
    keepalive: Duration,
    park_after: Option<Duration>,
) -> Next
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    if !io.prefix.is_empty() {
        return Next::Bytes;
    }
    // The buffer is on the stack of each poll, not in the future: a parked connection's
    // task keeps no room for it.
    let read = std::future::poll_fn(|cx| {
        let mut buf = [0u8; 256];
        let mut filled = ReadBuf::new(&mut buf);
        Pin::new(&mut io.inner).poll_read(cx, &mut filled).map(|r| match r {
            Ok(()) if !filled.filled().is_empty() => Some(Bytes::copy_from_slice(filled.filled())),
            Ok(()) | Err(_) => None,
        })
    });
    let next = tokio::select! {
        r = read => match r {
            None => return Next::Close,
            Some(bytes) => {
                io.unread(bytes);
                Next::Bytes
            }
        },
        () = drain::time_to_close(state) => Next::Close,
        () = state.idle_for(keepalive) => Next::Close,
        () = tokio::time::sleep(park_after.unwrap_or_default()), if park_after.is_some() => Next::Park,
    };
    if matches!(next, Next::Close) {
        // TLS says close_notify; bounded, as the client may not be reading.
        let _ = tokio::time::timeout(Duration::from_secs(1), io.inner.shutdown()).await;
    }
    next
}

/// Whether a plain connection opens with the HTTP/2 preface: reads until the preface is
/// complete or a byte differs (a request line differs at its first byte), and keeps what
/// it read for the protocol chosen. `None` when the client closed first.
pub async fn is_h2c<IO>(io: &mut Prefixed<IO>) -> Option<bool>
where
    IO: AsyncRead + Unpin,
{
    let mut buf = [0u8; 24];
    let mut n = 0;
    let mut same = true;
    while same && n < PREFACE.len() {
        let got = match io.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return None,
            Ok(got) => got,
        };
        n += got;
        same = buf[..n] == PREFACE[..n];
    }
    io.unread(Bytes::copy_from_slice(&buf[..n]));
    Some(same)
}

/// Resolves once the connection can be parked: no exchange open, no byte moved for
/// [`PARK_AFTER`], and nothing left unwritten (a client not reading keeps hyper's buffer).
pub async fn parkable(state: &ConnState) {
    loop {
        state.idle_for(PARK_AFTER).await;
        if !state.activity.write_blocked() {
            return;
        }
        tokio::time::sleep(PARK_AFTER).await;
    }
}

/// How long a connection already quiet since its last shed first waits before it looks
/// again for activity after it (an idle HTTP/2 connection is woken as often by hyper's
/// keep-alive ping); each look after finds the same quiet spell waits twice as long, up to
/// [`QUIET_RECHECK_MAX`], so that a stream silent for hours costs a few wakes, not one every
/// 30 s.
pub const QUIET_RECHECK: Duration = Duration::from_secs(30);
pub const QUIET_RECHECK_MAX: Duration = Duration::from_secs(480);

/// Resolves once no byte has moved for [`PARK_AFTER`] after activity later than `after` (any,
/// if `None`), exchanges open or not: a stream with nothing to say is as quiet as an idle
/// connection. While the quiet spell is the one `after` came from, it looks again after
/// [`QUIET_RECHECK`], then at growing intervals.
pub async fn quiet_again(activity: &Activity, after: Option<tokio::time::Instant>) {
    let mut recheck = QUIET_RECHECK;
    loop {
        silent_for(activity, PARK_AFTER).await;
        if after.is_none_or(|after| activity.last() > after) {
            return;
        }
        tokio::time::sleep(recheck).await;
        recheck = (recheck * 2).min(QUIET_RECHECK_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each quiet spell is reported once: after a second without a byte, not again in the
    /// same spell (looked at after 30 s, then at growing intervals), and again a second after
    /// new activity ends. An open exchange with nothing to say is quiet too.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_spell_is_reported_once_and_the_next_after_new_activity() {
        let c = std::sync::Arc::new(ConnState::default());
        let a = &c.activity;
        let started = tokio::time::Instant::now();
        // Bounded waits throughout: a spell never reported fails rather than hangs.
        let bounded = |f| tokio::time::timeout(Duration::from_secs(3600), f);
        bounded(quiet_again(a, None)).await.expect("reported");
        assert_eq!(started.elapsed(), PARK_AFTER);
        let seen = Some(a.last());
        let same_spell = tokio::time::timeout(Duration::from_secs(3600), quiet_again(a, seen)).await;
        assert!(same_spell.is_err(), "the same quiet spell again");
        // Bytes move 10 s into a wait; the quiet spell after them is a second old at 11 s, and
        // is noticed at the next look (the first after QUIET_RECHECK).
        let waiting = tokio::time::Instant::now();
        let toucher = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            a.touch();
        };
        let (reported, ()) = tokio::join!(bounded(quiet_again(a, seen)), toucher);
        reported.expect("reported");
        assert_eq!(waiting.elapsed(), QUIET_RECHECK);
        // An exchange open and silent (a stream with nothing to say) is a quiet spell.
        let _stream = c.begin();
        let seen = Some(a.last());
        let waiting = tokio::time::Instant::now();
        let toucher = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            a.touch();
        };
        let (reported, ()) = tokio::join!(bounded(quiet_again(a, seen)), toucher);
        reported.expect("reported");
        assert_eq!(waiting.elapsed(), QUIET_RECHECK, "seen at the first look after its byte");
    }

    /// A spell that lasts is looked at after 30, 60, 120, 240, 480, 480, … seconds: an hour of
    /// silence costs 10 looks, not 120.
    #[tokio::test(start_paused = true)]
    async fn a_long_quiet_spell_is_looked_at_less_and_less_often() {
        let a = Activity::new();
        tokio::time::timeout(Duration::from_secs(60), quiet_again(&a, None)).await.expect("reported");
        let seen = Some(a.last());
        let looks = std::sync::atomic::AtomicUsize::new(0);
        let quiet = quiet_again(&a, seen);
        tokio::pin!(quiet);
        let counted = std::future::poll_fn(|cx| {
            looks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            quiet.as_mut().poll(cx)
        });
        let _ = tokio::time::timeout(Duration::from_secs(3600), counted).await;
        // The first poll, a wake per look (each look's silence is already a second old), and
        // the timeout's, which polls it once more.
        assert_eq!(looks.load(std::sync::atomic::Ordering::Relaxed), 1 + 10 + 1);
    }

    #[tokio::test]
    async fn prefixed_bytes_come_first_then_the_stream() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut io = Prefixed::new(client);
        server.write_all(b" world").await.unwrap();
        drop(server);
        io.unread(Bytes::from_static(b"llo,"));
        io.unread(Bytes::from_static(b"he"));
        let mut out = String::new();
        io.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello, world");
    }

    #[tokio::test]
    async fn the_preface_is_told_from_a_request_line_at_its_first_differing_byte() {
        let cases = [
            (&PREFACE[..], true),
            (b"GET / HTTP/1.1\r\n".as_slice(), false),
            (b"GET /a/longer/path HTTP/1.1\r\nhost: a.test\r\n\r\n".as_slice(), false),
            (b"PRX".as_slice(), false),
        ];
        for (sent, h2) in cases {
            let (client, mut server) = tokio::io::duplex(64);
            let mut io = Prefixed::new(client);
            server.write_all(sent).await.unwrap();
            assert_eq!(is_h2c(&mut io).await, Some(h2), "{sent:?}");
            // Nothing read is lost.
            drop(server);
            let mut out = Vec::new();
            io.read_to_end(&mut out).await.unwrap();
            assert_eq!(out, sent);
        }
    }
}
