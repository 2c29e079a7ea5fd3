//! A server-side TLS stream on rustls's unbuffered API.
//!
//! rustls's buffered connection keeps a 4 KiB receive buffer for as long as a read is
//! pending, which for a keep-alive connection is its whole life: the largest part of what an
//! idle TLS connection costs. Here tern owns the buffers. What was read but not yet decrypted,
//! what was decrypted but not yet read and what was encrypted but not yet written each live in
//! a buffer of this stream's, and a connection that is idle ([`Stream::into_parts`]) gives
//! them all back and keeps only its session: the keys and state rustls needs to go on.
//!
//! Reading and writing share one rule: rustls's state machine is driven over what has been
//! read ([`Session::advance`]) until it asks for more bytes, and only then is the socket read.
//! So every complete record is decrypted before a read waits, and a read never waits while
//! plaintext is held.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest TLS record on the wire: 2^14 bytes of plaintext, up to 256 of expansion, a
/// 5-byte header.
const MAX_RECORD: usize = 5 + (1 << 14) + 256;

/// The least the receive buffer is grown to: a read asks the socket for at least this much.
const READ_ROOM: usize = 4096;

/// The most the receive buffer grows to: a client's first flight as [`super::hello`] hands
/// it over (a ClientHello of up to 64 KiB, and a record after it), and one record more.
const MAX_INCOMING: usize = 0x10000 + 2 * MAX_RECORD;

/// The most plaintext one write encrypts before the caller hears how much was taken.
const MAX_WRITE: usize = 32 * 1024;

/// Records queued up to this much wait for a flush (or more writes): many small writes (an
/// HTTP/2 connection's frames) go out in one send.
const SEND_AT: usize = 16 * 1024;

/// The most of a vectored write gathered into one record.
const MAX_GATHER: usize = 1 << 14;

/// A TLS session and its buffers, without the socket.
pub struct Session {
    conn: UnbufferedServerConnection,
    /// Bytes read from the peer; the first `filled` are not yet taken by rustls.
    incoming: Vec<u8>,
    filled: usize,
    /// Records to send; the first `sent` bytes went out already.
    outgoing: Vec<u8>,
    sent: usize,
    /// Decrypted and not yet read, from `taken` on.
    plain: Vec<u8>,
    taken: usize,
    /// A vectored write's slices gathered into one record.
    gather: Vec<u8>,
    /// The socket's read side ended.
    eof: bool,
    /// The peer sent close_notify: it sends nothing more.
    peer_closed: bool,
    /// close_notify is queued: nothing more is sent.
    closing: bool,
    /// rustls failed (its alert, if any, is queued): the session is over, and rustls is not
    /// driven again (the unbuffered API does not remember a failed record, and would fail on
    /// it, and alert, a second time).
    failed: bool,
    /// Raised by whoever drives the connection once it has been quiet a while (see
    /// [`Stream::shed_signal`]): the buffers are given back at the next read that waits with
    /// nothing in them, and the flag lowered.
    shed: Option<Arc<Shed>>,
    /// The driver's round ([`Shed::next_round`]) in which a flush was put off, 0 if none is
    /// owed.
    put_off: u32,
}

/// A request that a stream give its buffers back (see [`Stream::shed_signal`]), shared by
/// the stream and whoever drives its connection. The stream counts each time it does.
///
/// It also carries the driver's rounds, for a connection whose driver counts them (HTTP/2):
/// see [`Shed::next_round`].
#[derive(Debug)]
pub struct Shed {
    raised: AtomicBool,
    done: prometheus::IntCounter,
    /// The driver's rounds of polling the connection, 0 while it counts none.
    round: AtomicU32,
}

impl Shed {
    /// Asks for the buffers at the stream's next read that waits with nothing in them.
    pub fn raise(&self) {
        self.raised.store(true, Ordering::Relaxed);
    }

    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Relaxed)
    }

    fn lower(&self) {
        self.raised.store(false, Ordering::Relaxed);
    }

    /// Counts a round: the connection's driver is about to poll it. Once rounds are counted,
    /// a flush of a few records ([`SEND_AT`]) is put off to the end of the round: the task is
    /// woken, and the records go out, all in one send, in the next round. An HTTP/2
    /// connection flushes after each response's data frame (h2 does), so the responses a
    /// round completes would otherwise go out in a send each.
    ///
    /// Called by the one task that polls the stream (a load and a store, no atomic
    /// read-modify-write).
    pub fn next_round(&self) {
        let next = self.round.load(Ordering::Relaxed).wrapping_add(1).max(1);
        self.round.store(next, Ordering::Relaxed);
    }

    fn round(&self) -> u32 {
        self.round.load(Ordering::Relaxed)
    }
}

/// Where driving rustls stopped.
enum Advanced {
    /// Plaintext was put in the caller's buffer.
    Data,
    /// rustls needs more bytes from the peer (to finish the handshake, or for the next
    /// record).
    NeedInput,
    /// The caller's plaintext was encrypted: this many bytes of it.
    Wrote(usize),
    /// The peer closed the TLS session.
    PeerClosed,
    /// Both sides closed it, or close_notify was just queued.
    Closed,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Appends what `encode` writes to `out`, giving it the room it says it needs.
fn append(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
    room: usize,
) -> io::Result<()> {
    let start = out.len();
    let mut room = room;
    for _ in 0..2 {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(Some(needed)) => room = needed,
            Err(None) => break,
        }
    }
    out.truncate(start);
    Err(io::Error::other("TLS record could not be encoded"))
}

fn encode_error(e: EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

fn encrypt_error(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

impl Session {
    fn new(config: Arc<ServerConfig>, first: Vec<u8>) -> Result<Box<Session>, rustls::Error> {
        Ok(Box::new(Session {
            conn: UnbufferedServerConnection::new(config)?,
            filled: first.len(),
            incoming: first,
            outgoing: Vec::new(),
            sent: 0,
            plain: Vec::new(),
            taken: 0,
            gather: Vec::new(),
            eof: false,
            peer_closed: false,
            closing: false,
            failed: false,
            shed: None,
            put_off: 0,
        }))
    }

    /// Frees the buffers, which only a session with nothing waiting in them may do
    /// ([`Session::is_idle`]); the next read or write allocates again.
    fn give_back(&mut self) {
        self.incoming = Vec::new();
        self.outgoing = Vec::new();
        self.plain = Vec::new();
        self.gather = Vec::new();
        (self.filled, self.sent, self.taken) = (0, 0, 0);
    }

    /// Nothing read, decrypted or encrypted is waiting: the session alone goes on.
    fn is_idle(&self) -> bool {
        self.filled == 0 && self.taken == self.plain.len() && self.sent == self.outgoing.len()
    }

    /// Drives rustls over what has been read, until it delivers plaintext into `read`,
    /// encrypts `write`, queues close_notify (`close`) or needs more bytes. Plaintext that does
    /// not fit in `read` (or comes while writing) waits in `plain`; records rustls wants sent
    /// wait in `outgoing`.
    fn advance(
        &mut self,
        mut read: Option<&mut ReadBuf<'_>>,
        write: Option<&[u8]>,
        close: bool,
    ) -> io::Result<Advanced> {
        if self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the TLS session failed"));
        }
        loop {
            let Session { conn, incoming, filled, outgoing, plain, peer_closed, closing, .. } = self;
            let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut incoming[..*filled]);
            let mut extra_discard = 0;
            let step = match state {
                Err(e) => Err(tls_error(e)),
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut delivered = false;
                    let mut failed = None;
                    while let Some(record) = traffic.next_record() {
                        let mut payload = match record {
                            Ok(record) => {
                                // Always 0 while rustls decrypts into its own buffers; counted
                                // as its API asks, for when it decrypts in place.
                                extra_discard += record.discard;
                                record.payload
                            }
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        };
                        if let Some(buf) = read.as_deref_mut() {
                            let n = payload.len().min(buf.remaining());
                            buf.put_slice(&payload[..n]);
                            payload = &payload[n..];
                            delivered |= n > 0;
                        }
                        plain.extend_from_slice(payload);
                    }
                    match failed {
                        Some(e) => Err(tls_error(e)),
                        None => Ok(delivered.then_some(Advanced::Data)),
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    append(outgoing, |buf| data.encode(buf).map_err(encode_error), 1024).map(|()| None)
                }
                // What was encoded is in `outgoing`: sent when the socket takes it.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    Ok(None)
                }
                Ok(ConnectionState::BlockedHandshake) => Ok(Some(Advanced::NeedInput)),
                Ok(ConnectionState::PeerClosed) => {
                    *peer_closed = true;
                    Ok(read.is_some().then_some(Advanced::PeerClosed))
                }
                Ok(ConnectionState::Closed) => Ok(Some(Advanced::Closed)),
                Ok(ConnectionState::WriteTraffic(mut traffic)) => match (write, close) {
                    (Some(data), _) => {
                        // Each record adds a header, a tag and a content type: 64 is room to spare.
                        let room = data.len() + 64 * (data.len() / (1 << 14) + 1);
                        append(outgoing, |buf| traffic.encrypt(data, buf).map_err(encrypt_error), room)
                            .map(|()| Some(Advanced::Wrote(data.len())))
                    }
                    (None, true) if *closing => Ok(Some(Advanced::Closed)),
                    (None, true) => {
                        *closing = true;
                        append(outgoing, |buf| traffic.queue_close_notify(buf).map_err(encrypt_error), 64)
                            .map(|()| Some(Advanced::Closed))
                    }
                    (None, false) => Ok(Some(Advanced::NeedInput)),
                },
                Ok(_) => Err(io::Error::other("unexpected TLS state (early data is not accepted)")),
            };
            let discard = discard + extra_discard;
            if discard > 0 {
                incoming.copy_within(discard..*filled, 0);
                *filled -= discard;
            }
            match step {
                Ok(None) => continue,
                Ok(Some(advanced)) => return Ok(advanced),
                Err(e) => {
                    self.failed = true;
                    self.queue_alert();
                    return Err(e);
                }
            }
        }
    }

    /// After a failure rustls queues the fatal alert it chose: into `outgoing`, for the
    /// caller to send if it can. rustls hands over what it queued before it looks at the
    /// input again, so one call takes the alert; it is given the real input all the same
    /// (rustls keeps offsets into it), and is not called a second time.
    fn queue_alert(&mut self) {
        let Session { conn, incoming, filled, outgoing, .. } = self;
        let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut incoming[..*filled]);
        if let Ok(ConnectionState::EncodeTlsData(mut data)) = state {
            let _ = append(outgoing, |buf| data.encode(buf).map_err(encode_error), 64);
        }
        if discard > 0 {
            incoming.copy_within(discard..*filled, 0);
            *filled -= discard;
        }
    }

    /// close_notify, encrypted, to write to the socket as the connection is closed without
    /// waiting (it is parked, and its send buffer is empty).
    pub fn close_notify(&mut self) -> Vec<u8> {
        if self.closing || self.failed || self.advance(None, None, true).is_err() {
            return Vec::new();
        }
        let mut out = std::mem::take(&mut self.outgoing);
        out.drain(..self.sent);
        self.sent = 0;
        out
    }

    /// Room to read into: the buffer grows (to [`READ_ROOM`] at least, and to the size of the
    /// record it holds the start of), up to [`MAX_INCOMING`].
    fn room(&mut self) -> io::Result<&mut [u8]> {
        if self.filled == self.incoming.len() {
            let record = match self.incoming.get(3..5) {
                Some(len) => 5 + usize::from(u16::from_be_bytes([len[0], len[1]])),
                None => 0,
            };
            let size = (self.incoming.len() * 2).max(READ_ROOM).max(record).min(MAX_INCOMING);
            if size <= self.filled {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS message too large"));
            }
            self.incoming.resize(size, 0);
        }
        Ok(&mut self.incoming[self.filled..])
    }

    /// Moves plaintext held back into `buf`.
    fn give(&mut self, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.plain.len() - self.taken);
        buf.put_slice(&self.plain[self.taken..self.taken + n]);
        self.taken += n;
        if self.taken == self.plain.len() {
            self.plain.clear();
            self.taken = 0;
        }
    }
}

/// A TLS server connection over `IO`.
///
/// Two rules for whoever drives it, both kept by hyper and by `http::tunnel`:
/// - Writes are held (up to [`SEND_AT`]) until a flush: write, then flush, before waiting for
///   the peer's answer. A driver that counts rounds ([`Shed::next_round`]) has a flush put
///   off to its next round, and polls again when woken.
/// - Reading and writing are polled from one task: a read also sends what rustls queued on its
///   own (an answer to a key update), registering the reader's waker for the socket's
///   writability.
pub struct Stream<IO> {
    io: IO,
    session: Box<Session>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Stream<IO> {
    /// The server's side of a handshake on `io`, `first` being what was read of it already
    /// (the client's first flight, as [`super::hello::read`] gathered it).
    pub(super) async fn handshake(io: IO, first: Vec<u8>, config: Arc<ServerConfig>) -> io::Result<Self> {
        let mut stream = Stream { io, session: Session::new(config, first).map_err(tls_error)? };
        std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    /// Drives the handshake to its end. TLS 1.3's session tickets, which rustls queues as the
    /// handshake ends and no client waits for, are not sent here: they go out with the first
    /// answer, or before a read waits for the peer ([`AsyncRead::poll_read`]), whichever comes
    /// first. A client whose request is there to read once the handshake is done gets tickets
    /// and answer in one send. TLS 1.2's last flight, which the client waits for, is sent
    /// before this ends.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.advance(cx, None, None)? {
                Advanced::NeedInput if !self.session.conn.is_handshaking() => {
                    if self.session.conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
                        ready!(self.poll_send(cx))?;
                    }
                    return Poll::Ready(Ok(()));
                }
                Advanced::NeedInput => {
                    // rustls's answer goes out before more is read.
                    ready!(self.poll_send(cx))?;
                    ready!(self.poll_receive(cx))?;
                }
                Advanced::PeerClosed | Advanced::Closed => {
                    ready!(self.poll_send(cx))?;
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                Advanced::Data | Advanced::Wrote(_) => {}
            }
        }
    }

    /// [`Session::advance`], and on a failure the alert rustls queued sent if the socket
    /// takes it now: whoever called gives up on the connection.
    fn advance(
        &mut self,
        cx: &mut Context<'_>,
        read: Option<&mut ReadBuf<'_>>,
        write: Option<&[u8]>,
    ) -> io::Result<Advanced> {
        let advanced = self.session.advance(read, write, false);
        if advanced.is_err() {
            let _ = self.poll_send(cx);
        }
        advanced
    }

    /// Writes out what is queued, as far as the socket takes it.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let session = &mut *self.session;
        while session.sent < session.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &session.outgoing[session.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            session.sent += n;
        }
        session.outgoing.clear();
        session.sent = 0;
        session.put_off = 0;
        Poll::Ready(Ok(()))
    }

    /// Whether a flush now is put off to the driver's next round (see [`Shed::next_round`]):
    /// with rounds counted and a few records queued, the first flush of a round wakes the
    /// task and puts the send off, and so does every later one of the same round.
    fn put_off_flush(&mut self, cx: &mut Context<'_>) -> bool {
        let session = &mut *self.session;
        let round = session.shed.as_ref().map_or(0, |s| s.round());
        let queued = session.outgoing.len() - session.sent;
        if round == 0 || queued == 0 || queued >= SEND_AT {
            return false;
        }
        if session.put_off == 0 {
            session.put_off = round;
            cx.waker().wake_by_ref();
        }
        session.put_off == round
    }

    /// A flush was put off in the driver's current round.
    fn put_off_now(&self) -> bool {
        let session = &*self.session;
        session.put_off != 0 && session.shed.as_ref().is_some_and(|s| s.round() == session.put_off)
    }

    /// Reads once from the socket into the receive buffer; an ended read side is an error
    /// here, as rustls still needed bytes.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.session.eof {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed connection without sending TLS close_notify",
            )));
        }
        let mut buf = ReadBuf::new(self.session.room()?);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        if n == 0 {
            self.session.eof = true;
        }
        self.session.filled += n;
        Poll::Ready(Ok(()))
    }

    /// Encrypts `data` (up to [`MAX_WRITE`] of it) into the records queued to send; they go
    /// out once [`SEND_AT`] is queued, or at a flush.
    fn poll_encrypt(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        // Backpressure: while a send's worth waits for the socket, nothing more is taken.
        if self.session.outgoing.len() - self.session.sent >= SEND_AT {
            ready!(self.poll_send(cx))?;
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.session.closing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        match self.advance(cx, None, Some(data))? {
            Advanced::Wrote(n) => {
                if self.session.outgoing.len() - self.session.sent >= SEND_AT
                    && let Poll::Ready(Err(e)) = self.poll_send(cx)
                {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(n))
            }
            Advanced::NeedInput => Poll::Ready(Err(io::Error::other("TLS handshake not complete"))),
            Advanced::Data | Advanced::PeerClosed | Advanced::Closed => {
                Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
            }
        }
    }

    /// The protocol ALPN chose, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.session.conn.alpn_protocol()
    }
}

impl<IO> Stream<IO> {
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The socket and the session apart, if nothing is waiting in the buffers (which are
    /// freed); itself back if something is.
    pub fn into_parts(self) -> Result<(IO, Box<Session>), Self> {
        let s = &self.session;
        if !s.is_idle() || s.eof || s.peer_closed || s.closing || s.failed {
            return Err(self);
        }
        let Stream { io, mut session } = self;
        session.give_back();
        // Given back already: a signal raised and not yet acted on would free the buffers
        // again at the first read that waits once the connection is served again.
        if let Some(shed) = &session.shed {
            shed.lower();
        }
        Ok((io, session))
    }

    /// A flag that, raised, has the stream give its buffers back (about 7 KiB once warm) at
    /// its next read that waits with nothing in them. For a connection that stays with its
    /// task while quiet (HTTP/2, never parked; HTTP/1.1 with an exchange open, or not handed
    /// to a parking lot): its driver raises it after a quiet spell and polls the connection,
    /// whose read then waits. The stream lowers it once done, and counts it in `done`. Made
    /// once; `done` is that of the first call.
    pub fn shed_signal(&mut self, done: &prometheus::IntCounter) -> Arc<Shed> {
        let make = || {
            Arc::new(Shed { raised: AtomicBool::new(false), done: done.clone(), round: AtomicU32::new(0) })
        };
        self.session.shed.get_or_insert_with(make).clone()
    }

    pub fn from_parts(io: IO, session: Box<Session>) -> Self {
        Stream { io, session }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.session.taken < this.session.plain.len() {
            this.session.give(buf);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 || this.session.peer_closed {
            return Poll::Ready(Ok(()));
        }
        loop {
            match this.advance(cx, Some(buf), None)? {
                Advanced::NeedInput => match this.poll_receive(cx) {
                    Poll::Ready(received) => received?,
                    Poll::Pending => {
                        // What rustls queued on its own (the handshake's session tickets)
                        // goes out, as far as the socket takes it, before the read waits. The read neither waits for it nor fails by it: a send
                        // that fails is the next write's error, and the read reports how the
                        // peer's side ends.
                        // Not a flush put off in this round: the round's end sends it.
                        if !this.put_off_now() {
                            let _ = this.poll_send(cx);
                        }
                        let session = &mut this.session;
                        if let Some(shed) = &session.shed
                            && shed.is_raised()
                            && session.is_idle()
                        {
                            shed.lower();
                            shed.done.inc();
                            session.give_back();
                        }
                        return Poll::Pending;
                    }
                },
                Advanced::Data | Advanced::PeerClosed | Advanced::Closed | Advanced::Wrote(_) => {
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_encrypt(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut slices = bufs.iter().filter(|b| !b.is_empty());
        let first = slices.next().map_or(&[][..], |b| &**b);
        if first.len() >= MAX_GATHER || slices.next().is_none() {
            return this.poll_encrypt(cx, first);
        }
        // Small slices (an HTTP/1.1 head and its body, HTTP/2 frames) make one record.
        let mut gather = std::mem::take(&mut this.session.gather);
        gather.clear();
        for buf in bufs {
            let take = buf.len().min(MAX_GATHER - gather.len());
            gather.extend_from_slice(&buf[..take]);
            if gather.len() == MAX_GATHER {
                break;
            }
        }
        let written = this.poll_encrypt(cx, &gather);
        this.session.gather = gather;
        written
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.put_off_flush(cx) {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.session.closing && !this.session.failed {
            // Without a session to close (a handshake not done) the socket is shut all the same.
            let _ = this.session.advance(None, None, true);
            this.session.closing = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// A server config for `a.test` and a client config trusting it, both at `version`.
    fn configs(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap().self_signed(&key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pkcs8 = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], pkcs8.into())
            .unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        (Arc::new(server), Arc::new(client))
    }

    /// The server's side as tern runs it: the first flight read by `hello`, then the handshake.
    async fn serve(mut io: DuplexStream, config: Arc<ServerConfig>) -> io::Result<Stream<DuplexStream>> {
        let first = super::super::hello::read(&mut io).await.map_err(|_| io::ErrorKind::InvalidData)?;
        Stream::handshake(io, first, config).await
    }

    /// A connected pair: tern's stream and a tokio-rustls client.
    async fn pair(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (Stream<DuplexStream>, tokio_rustls::client::TlsStream<DuplexStream>) {
        let (server, client) = configs(version);
        let (near, far) = tokio::io::duplex(1 << 20);
        let connector = tokio_rustls::TlsConnector::from(client);
        let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
        let (served, connected) = tokio::join!(serve(near, server), connector.connect(name, far));
        (served.unwrap(), connected.unwrap())
    }

    /// A TLS 1.3 pair after one exchange, the client taken apart into its socket and its
    /// session: it has read the session tickets, so what it reads next is all sent later.
    async fn past_the_tickets() -> (Stream<DuplexStream>, DuplexStream, rustls::ClientConnection) {
        let (mut server, mut client) = pair(&rustls::version::TLS13).await;
        server.write_all(b"x").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut [0; 1]).await.unwrap();
        let (client_io, session) = client.into_inner();
        (server, client_io, session)
    }

    /// Reads what the server sent the client until it closed: exactly one record, an alert,
    /// returned as the client's session takes it.
    async fn the_one_alert(
        mut client_io: DuplexStream,
        mut session: rustls::ClientConnection,
    ) -> rustls::Error {
        let mut wire = Vec::new();
        client_io.read_to_end(&mut wire).await.unwrap();
        assert_eq!(records(&wire).len(), 1, "one record, the alert: {:?}", records(&wire));
        session.read_tls(&mut &wire[..]).unwrap();
        session.process_new_packets().unwrap_err()
    }

    /// Moves what the client wants sent onto the wire.
    async fn send(client: &mut rustls::ClientConnection, wire: &mut DuplexStream) {
        let mut out = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut out).unwrap();
        }
        wire.write_all(&out).await.unwrap();
    }

    /// Reads the wire into the client until `done` says enough.
    async fn receive(
        client: &mut rustls::ClientConnection,
        wire: &mut DuplexStream,
        done: impl Fn(&rustls::ClientConnection) -> bool,
    ) {
        let mut buf = vec![0; 1 << 16];
        while !done(client) {
            let n = wire.read(&mut buf).await.unwrap();
            assert!(n > 0, "the server closed the connection");
            let mut read = &buf[..n];
            while !read.is_empty() {
                client.read_tls(&mut read).unwrap();
            }
            client.process_new_packets().unwrap();
        }
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_whatever_the_record_and_read_sizes() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (mut server, mut client) = pair(version).await;
            assert_eq!(server.alpn_protocol(), Some(&b"http/1.1"[..]));
            // 300 KiB: many full records, then read back in reads of odd sizes (plaintext left
            // over from a record waits for the next read).
            let data: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
            let (sent, received) = tokio::join!(client.write_all(&data), async {
                let mut got = Vec::new();
                let mut sizes = [1usize, 7, 100, 4096, 20_000].into_iter().cycle();
                while got.len() < data.len() {
                    let mut buf = vec![0; sizes.next().unwrap()];
                    let n = server.read(&mut buf).await.unwrap();
                    assert!(n > 0);
                    got.extend_from_slice(&buf[..n]);
                }
                got
            });
            sent.unwrap();
            assert!(received == data, "{version:?}: what arrived differs from what was sent");
            // And back, in one write larger than MAX_WRITE (the caller is told what was taken).
            let (sent, back) =
                tokio::join!(async { server.write_all(&data).await.and(server.flush().await) }, async {
                    let mut back = vec![0; data.len()];
                    client.read_exact(&mut back).await.map(|_| back)
                });
            sent.unwrap();
            assert!(back.unwrap() == data, "{version:?}: what came back differs");
        }
    }

    #[tokio::test]
    async fn a_request_sent_with_the_clients_finished_is_read() {
        let (server, client) = configs(&rustls::version::TLS13);
        let (near, mut wire) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut stream = serve(near, server).await.unwrap();
            let mut buf = [0; 64];
            let n = stream.read(&mut buf).await.unwrap();
            buf[..n].to_vec()
        });
        let mut client = rustls::ClientConnection::new(client, "a.test".try_into().unwrap()).unwrap();
        // Written before the handshake: rustls sends it right after the client's Finished,
        // in the same write.
        client.writer().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        send(&mut client, &mut wire).await;
        receive(&mut client, &mut wire, |c| !c.is_handshaking()).await;
        send(&mut client, &mut wire).await;
        assert_eq!(server.await.unwrap(), b"GET / HTTP/1.1\r\n\r\n");
    }

    /// A socket that remembers the size of each write that went through it: one per send.
    struct Sends {
        io: DuplexStream,
        sizes: Vec<usize>,
    }

    impl AsyncRead for Sends {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Sends {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, data))?;
            self.sizes.push(n);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn tls13_tickets_go_out_with_the_first_answer_or_before_a_read_waits() {
        let (server_config, client_config) = configs(&rustls::version::TLS13);
        for request_with_finished in [true, false] {
            let (near, mut wire) = tokio::io::duplex(1 << 20);
            let server = tokio::spawn({
                let config = server_config.clone();
                async move {
                    let mut io = Sends { io: near, sizes: Vec::new() };
                    let first = super::super::hello::read(&mut io).await.unwrap();
                    Stream::handshake(io, first, config).await.unwrap()
                }
            });
            let mut client =
                rustls::ClientConnection::new(client_config.clone(), "a.test".try_into().unwrap()).unwrap();
            if request_with_finished {
                client.writer().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            }
            send(&mut client, &mut wire).await;
            receive(&mut client, &mut wire, |c| !c.is_handshaking()).await;
            send(&mut client, &mut wire).await;
            let mut server = server.await.unwrap();
            assert_eq!(server.get_ref().sizes.len(), 1, "the handshake sent its flight and held the tickets");
            let mut buf = [0; 64];
            if request_with_finished {
                let n = server.read(&mut buf).await.unwrap();
                assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
                assert_eq!(server.get_ref().sizes.len(), 1, "a read that did not wait sent nothing");
                server.write_all(b"answer").await.unwrap();
                server.flush().await.unwrap();
                let sizes = &server.get_ref().sizes;
                assert_eq!(sizes.len(), 2, "tickets and answer in one send: {sizes:?}");
                let mut second = vec![0; sizes[1]];
                wire.read_exact(&mut second).await.unwrap();
                let records = records(&second);
                // The answer's record: 6 bytes, its content type and a 16-byte tag.
                assert!(
                    records.len() >= 2 && records.last() == Some(&(0x17, 6 + 1 + 16)),
                    "the tickets, then the answer: {records:?}"
                );
                let mut read = &second[..];
                while !read.is_empty() {
                    client.read_tls(&mut read).unwrap();
                }
                client.process_new_packets().unwrap();
                let mut got = [0; 6];
                client.reader().read_exact(&mut got).unwrap();
                assert_eq!(&got, b"answer");
            } else {
                // Nothing to read: the read waits, and the tickets go out before it does.
                let mut cx = Context::from_waker(std::task::Waker::noop());
                assert!(Pin::new(&mut server).poll_read(&mut cx, &mut ReadBuf::new(&mut buf)).is_pending());
                assert_eq!(server.get_ref().sizes.len(), 2, "the tickets went out before the read waited");
            }
        }
    }

    #[tokio::test]
    async fn a_key_update_from_the_client_is_answered_and_traffic_goes_on() {
        let (mut server, mut client) = pair(&rustls::version::TLS13).await;
        for round in 0..3u8 {
            client.get_mut().1.refresh_traffic_keys().unwrap();
            client.write_all(&[round; 10]).await.unwrap();
            client.flush().await.unwrap();
            let mut buf = [0; 10];
            server.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, [round; 10]);
            server.write_all(&[round + 100; 10]).await.unwrap();
            server.flush().await.unwrap();
            client.read_exact(&mut buf).await.unwrap();
            assert_eq!(
                buf,
                [round + 100; 10],
                "round {round}: the client reads the server after its key update"
            );
        }
    }

    #[tokio::test]
    async fn close_notify_is_a_clean_end_and_a_cut_connection_is_not() {
        // The client closes cleanly: the server reads the end of the stream.
        let (mut server, mut client) = pair(&rustls::version::TLS13).await;
        client.write_all(b"last").await.unwrap();
        client.shutdown().await.unwrap();
        let mut all = Vec::new();
        server.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"last");
        // The server closes cleanly: the client reads the end of the stream.
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert!(server.write_all(b"more").await.is_err(), "nothing is sent after close_notify");

        // The socket ends without close_notify: truncation, not an end.
        let (mut server, client) = pair(&rustls::version::TLS13).await;
        drop(client);
        let e = server.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// The records in `wire`, as (content type, length).
    fn records(mut wire: &[u8]) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        while wire.len() >= 5 {
            let len = usize::from(u16::from_be_bytes([wire[3], wire[4]]));
            out.push((wire[0], len));
            wire = &wire[(5 + len).min(wire.len())..];
        }
        out
    }

    #[tokio::test]
    async fn a_forged_record_fails_the_session_once_with_one_alert() {
        let (mut server, mut client_io, session) = past_the_tickets().await;
        // An application-data record whose tag cannot verify.
        let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x20];
        forged.extend_from_slice(&[0x55; 0x20]);
        client_io.write_all(&forged).await.unwrap();
        let e = server.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // The session is over: no second read of the record (nor a second alert), nothing
        // written after the alert, no close_notify after it, and the socket is shut.
        assert!(server.read(&mut [0; 8]).await.is_err());
        assert!(server.write_all(b"after the alert").await.is_err());
        server.shutdown().await.unwrap();
        let err = the_one_alert(client_io, session).await;
        assert!(
            matches!(err, rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_record_longer_than_tls_allows_is_refused_at_its_header() {
        let (mut server, mut client_io, session) = past_the_tickets().await;
        // A header claiming 65,535 bytes, and only the header: refused as it stands, not
        // buffered while the rest is awaited.
        client_io.write_all(&[0x17, 0x03, 0x03, 0xff, 0xff]).await.unwrap();
        let e = server.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(server.session.incoming.len() <= READ_ROOM, "grew to {}", server.session.incoming.len());
        server.shutdown().await.unwrap();
        let err = the_one_alert(client_io, session).await;
        assert!(matches!(err, rustls::Error::AlertReceived(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_hello_record_with_bytes_after_the_hello_is_refused_with_an_alert() {
        let (server, client) = configs(&rustls::version::TLS13);
        let mut client = rustls::ClientConnection::new(client, "a.test".try_into().unwrap()).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        // The start of another handshake message (Finished, empty) in the hello's record.
        hello.extend_from_slice(&[0x14, 0, 0, 0]);
        let len = u16::from_be_bytes([hello[3], hello[4]]) + 4;
        hello[3..5].copy_from_slice(&len.to_be_bytes());
        let (near, mut wire) = tokio::io::duplex(1 << 20);
        wire.write_all(&hello).await.unwrap();
        assert!(serve(near, server).await.is_err(), "refused (and no panic)");
        let mut answer = Vec::new();
        wire.read_to_end(&mut answer).await.unwrap();
        assert_eq!(records(&answer).first().map(|r| r.0), Some(0x15), "an alert: {answer:?}");
    }

    #[tokio::test]
    async fn an_idle_stream_gives_its_buffers_back_and_goes_on() {
        let (mut server, mut client) = pair(&rustls::version::TLS13).await;
        client.write_all(b"ping").await.unwrap();
        client.flush().await.unwrap();
        let mut buf = [0; 4];
        server.read_exact(&mut buf).await.unwrap();
        // The session tickets wait to go out with the first answer: not idle yet.
        let Err(mut server) = server.into_parts() else { panic!("a stream holding its tickets parted") };
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        // Idle: parted from its socket with no buffer kept, and joined again.
        let (io, session) = server.into_parts().unwrap_or_else(|_| panic!("an idle stream parts"));
        assert_eq!(session.incoming.capacity() + session.outgoing.capacity() + session.plain.capacity(), 0);
        let mut server = Stream::from_parts(io, session);
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        // Closed from the lot: close_notify from the session alone, a clean end for the client.
        let (_io, mut session) = server.into_parts().unwrap_or_else(|_| panic!("still idle"));
        let bytes = session.close_notify();
        let (_, mut client) = client.into_inner();
        client.read_tls(&mut &bytes[..]).unwrap();
        client.process_new_packets().unwrap();
        assert_eq!(client.reader().read(&mut buf).unwrap(), 0, "close_notify: a clean end");
        assert!(session.close_notify().is_empty(), "sent once");

        // Half a record read: nothing to read yet, and the stream does not part with it.
        let (mut server, client) = pair(&rustls::version::TLS13).await;
        let (mut client_io, _) = client.into_inner();
        client_io.write_all(b"\x17\x03\x03\x00\x40half").await.unwrap();
        let mut tiny = [0; 1];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut server).poll_read(&mut cx, &mut ReadBuf::new(&mut tiny)).is_pending());
        assert_eq!(server.session.filled, 9, "the half record was read");
        assert!(server.into_parts().is_err(), "a stream holding half a record parted");
    }

    /// The buffers of a stream held by its task (HTTP/2) while quiet: given back at a read
    /// that waits once the signal is raised, only then, and never with bytes in them.
    #[tokio::test]
    async fn a_raised_shed_signal_frees_the_buffers_at_the_next_read_that_waits() {
        let done = prometheus::IntCounter::new("sheds", "sheds").unwrap();
        let (mut server, mut client) = pair(&rustls::version::TLS13).await;
        let shed = server.shed_signal(&done);
        let held = |s: &Stream<DuplexStream>| {
            s.session.incoming.capacity() + s.session.outgoing.capacity() + s.session.plain.capacity()
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut buf = [0; 4];
        ping_pong(&mut server, &mut client).await;
        // Not raised: a read that waits keeps what it has (a busy connection reuses it).
        assert!(Pin::new(&mut server).poll_read(&mut cx, &mut ReadBuf::new(&mut buf)).is_pending());
        assert!(held(&server) > 0);
        // Raised: the next read that waits gives them back, and lowers it.
        assert_eq!(done.get(), 0);
        shed.raise();
        assert!(Pin::new(&mut server).poll_read(&mut cx, &mut ReadBuf::new(&mut buf)).is_pending());
        assert_eq!(held(&server), 0);
        assert!(!shed.is_raised(), "lowered once done");
        assert_eq!(done.get(), 1, "counted");
        // And the stream goes on, both ways.
        ping_pong(&mut server, &mut client).await;

        // Half a record read: raised, the read waits and keeps it (and the signal stays up).
        let (mut server, client) = pair(&rustls::version::TLS13).await;
        let shed = server.shed_signal(&done);
        let (mut client_io, _) = client.into_inner();
        client_io.write_all(b"\x17\x03\x03\x00\x40half").await.unwrap();
        shed.raise();
        let mut tiny = [0; 1];
        assert!(Pin::new(&mut server).poll_read(&mut cx, &mut ReadBuf::new(&mut tiny)).is_pending());
        assert_eq!(server.session.filled, 9, "the half record is kept");
        assert!(shed.is_raised(), "still to do once the buffers are empty");
        assert_eq!(done.get(), 1, "not counted");

        // Parked with the signal up: parking gives the buffers back, and lowers it, so the
        // stream served again keeps what its next read that waits holds.
        let (mut server, mut client) = pair(&rustls::version::TLS13).await;
        let shed = server.shed_signal(&done);
        ping_pong(&mut server, &mut client).await;
        shed.raise();
        let (io, session) = server.into_parts().map_err(|_| "parted").unwrap();
        assert!(!shed.is_raised(), "lowered at parking");
        assert_eq!(done.get(), 1, "parking frees the buffers, and is not counted as a shed");
        let mut server = Stream::from_parts(io, session);
        ping_pong(&mut server, &mut client).await;
        assert!(Pin::new(&mut server).poll_read(&mut cx, &mut ReadBuf::new(&mut buf)).is_pending());
        assert!(held(&server) > 0, "served again, a read that waits keeps its buffers");
        assert_eq!(done.get(), 1);
    }

    /// Counts the wakes it is given.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// With rounds counted (HTTP/2's driver), the responses a round completes go out in one
    /// send at the next round, however many flushes they had; without, each flush sends.
    #[tokio::test]
    async fn flushes_in_a_counted_round_go_out_together_in_the_next() {
        let done = prometheus::IntCounter::new("sheds", "sheds").unwrap();
        let (mut server, mut client) = pair(&rustls::version::TLS13).await;
        let shed = server.shed_signal(&done);
        ping_pong(&mut server, &mut client).await;
        let (mut client_io, mut session) = client.into_inner();
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let woken = || wakes.0.load(Ordering::Relaxed);
        // What one read of the client's socket finds, as (records, plaintext); None if nothing.
        let mut wire = vec![0; 1 << 16];
        let mut one_read = |client_io: &mut DuplexStream| {
            let mut noop = Context::from_waker(std::task::Waker::noop());
            let mut read = ReadBuf::new(&mut wire);
            if Pin::new(client_io).poll_read(&mut noop, &mut read).is_pending() {
                return None;
            }
            session.read_tls(&mut read.filled()).unwrap();
            session.process_new_packets().unwrap();
            let mut plain = Vec::new();
            let _ = std::io::Read::read_to_end(&mut session.reader(), &mut plain);
            Some((records(read.filled()).len(), String::from_utf8(plain).unwrap()))
        };
        let mut buf = [0; 4];

        // Uncounted: a flush sends.
        assert!(Pin::new(&mut server).poll_write(&mut cx, b"zero").is_ready());
        assert!(Pin::new(&mut server).poll_flush(&mut cx).is_ready());
        assert_eq!(one_read(&mut client_io), Some((1, "zero".into())), "sent at its flush");

        // Counted: three responses flushed in one round wait, and the task is woken once.
        shed.next_round();
        for body in [b"one ", b"two ", b"six "] {
            assert!(Pin::new(&mut server).poll_write(&mut cx, body).is_ready());
            assert!(matches!(Pin::new(&mut server).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        }
        // A read that waits in the same round does not send them either.
        assert!(Pin::new(&mut server).poll_read(&mut cx, &mut ReadBuf::new(&mut buf)).is_pending());
        assert_eq!(one_read(&mut client_io), None, "nothing sent in the round");
        assert_eq!(woken(), 1, "woken once, for the next round");

        // The next round: the read that waits sends all three, in one write.
        shed.next_round();
        assert!(Pin::new(&mut server).poll_read(&mut cx, &mut ReadBuf::new(&mut buf)).is_pending());
        assert_eq!(one_read(&mut client_io), Some((3, "one two six ".into())), "together");
        assert_eq!(woken(), 1, "no more wakes");

        // Put off again in a later round, and sent by that round's next one's flush.
        shed.next_round();
        assert!(Pin::new(&mut server).poll_write(&mut cx, b"last").is_ready());
        assert!(Pin::new(&mut server).poll_flush(&mut cx).is_ready());
        assert_eq!(woken(), 2, "put off, and woken");
        shed.next_round();
        assert!(Pin::new(&mut server).poll_flush(&mut cx).is_ready());
        assert_eq!(one_read(&mut client_io), Some((1, "last".into())));
    }

    /// One exchange each way, checked byte for byte.
    async fn ping_pong(
        server: &mut Stream<DuplexStream>,
        client: &mut tokio_rustls::client::TlsStream<DuplexStream>,
    ) {
        let mut buf = [0; 4];
        client.write_all(b"ping").await.unwrap();
        client.flush().await.unwrap();
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
    }
}
