//! Bodies that stream through tern, never buffered whole, with back-pressure both ways:
//! a frame is read from one side only when the other side asks for one.
//!
//! Each streamed body carries the guards of its exchange (requests in flight on the
//! machine, open exchanges on the client connection), so they end exactly when the body
//! ends or is dropped, and the app's idle timeout, which only fires after a silence.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::catalog::InFlight;
use crate::telemetry::Metrics;
use crate::upstream::{BoxError, Lease, MachineBody, UpBody};

use super::activity::{Activity, ExchangeGuard, IdleTimer};
use super::drain::{Registration, StreamEnd};
use super::ending::{self, SseEdge, Why};
use super::headers::Late;

/// A response body: either tern's own (an error page) or a machine's, streamed.
pub struct ProxyBody {
    kind: Kind,
}

enum Kind {
    Full(Option<Bytes>),
    Stream(Box<Streamed>),
}

/// Everything that must live exactly as long as a streamed response.
pub struct ExchangeGuards {
    pub in_flight: InFlight,
    pub exchange: ExchangeGuard,
    /// The machine connection, given back to the pool when the body has been read to the
    /// end and closed if the body is abandoned midway.
    pub lease: Option<Lease>,
    /// For a request whose body waited for the machine's 100: ends an unsent body with the
    /// exchange.
    pub gate: Option<GateGuard>,
}

struct Streamed {
    inner: MachineBody,
    idle: IdleTimer,
    metrics: Arc<Metrics>,
    guards: ExchangeGuards,
    /// For an SSE response: ending it cleanly when its machine is about to stop or its time
    /// in a drain comes.
    sse: Option<SseEnd>,
    /// The head's last fields, not in its map (see [`Late`]).
    late: Option<Late>,
}

/// An SSE response listening for its machine's request to end streams, or for its time in
/// a drain. Once asked, it ends at the next event boundary, or is cut if none comes within
/// [`ending::GRACE`].
struct SseEnd {
    edge: SseEdge,
    asked: Pin<Box<dyn Future<Output = Why> + Send>>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The last frame was cut short at a boundary: end now.
    cut_at_boundary: bool,
    /// Counts the stream as open in a drain, until the body ends.
    _registered: Registration,
}

impl SseEnd {
    pub fn new((end, registered): (StreamEnd, Registration)) -> Self {
        SseEnd {
            edge: SseEdge::default(),
            asked: Box::pin(end.wait()),
            deadline: None,
            cut_at_boundary: false,
            _registered: registered,
        }
    }

    /// Takes in a frame's bytes. Once asked to end, if the frame runs past an event
    /// boundary into an event it does not finish, says how much of it to pass on: up to
    /// that boundary, after which the body ends.
    fn take(&mut self, data: &Bytes) -> Option<usize> {
        let last = self.edge.feed(data);
        if self.deadline.is_none() || self.edge.at_boundary() {
            return None;
        }
        let upto = last?;
        self.edge = SseEdge::default();
        self.cut_at_boundary = true;
        Some(upto)
    }

    /// Ready(true) to end the body cleanly now, Ready(false) to cut it (the grace ran out
    /// mid-event), Pending to carry on.
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if self.cut_at_boundary {
            return Poll::Ready(true);
        }
        if self.deadline.is_none() {
            if self.asked.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.deadline = Some(Box::pin(tokio::time::sleep(ending::GRACE)));
        }
        if self.edge.at_boundary() {
            return Poll::Ready(true);
        }
        match self.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(false),
            _ => Poll::Pending,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the stream was asked to end and the event in progress did not end in time")]
pub struct EndedMidEvent;

impl Streamed {
    /// Gives the machine connection back once the body has been read to the end.
    fn release(&mut self) {
        if let Some(lease) = self.guards.lease.take() {
            lease.release();
        }
    }
}

impl Streamed {
    fn poll_stream(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Asked to end and between events: end here, before reading into the next one.
        if let Some(sse) = &mut self.sse
            && let Poll::Ready(clean) = sse.poll_end(cx)
        {
            return Poll::Ready(self.end_early(clean));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                self.idle.activity().touch();
                if let Some(sse) = &mut self.sse
                    && let Some(data) = frame.data_ref()
                    && let Some(upto) = sse.take(data)
                {
                    // Asked to end: pass on up to the last boundary in this frame, then end.
                    if upto == 0 {
                        return Poll::Ready(self.end_early(true));
                    }
                    frame = Frame::data(data.slice(..upto));
                }
                if self.inner.is_end_stream() {
                    self.release();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => {
                self.release();
                Poll::Ready(None)
            }
            Poll::Pending => match self.idle.poll_expired(cx) {
                Poll::Ready(()) => {
                    self.metrics.streams_cut_idle.inc();
                    Poll::Ready(Some(Err(IdleTimeout.into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    /// Ends an SSE body asked to end: cleanly (the client sees the end of the
    /// body) or, past the grace mid-event, with an error (the client sees it cut). The
    /// machine connection is not given back: the response was not read to its end.
    fn end_early(&mut self, clean: bool) -> Option<Result<Frame<Bytes>, BoxError>> {
        self.sse = None;
        let how = if clean { "clean" } else { "cut" };
        self.metrics.streams_ended.with_label_values(&["sse", how]).inc();
        if clean { None } else { Some(Err(EndedMidEvent.into())) }
    }
}

impl Drop for Streamed {
    /// hyper stops polling a body whose length says it is complete (or that is empty), so
    /// the end may only be visible here.
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the exchange was silent for the app's idle_timeout")]
pub struct IdleTimeout;

impl ProxyBody {
    pub fn full(bytes: Bytes) -> Self {
        ProxyBody { kind: Kind::Full(Some(bytes)) }
    }

    pub fn empty() -> Self {
        ProxyBody { kind: Kind::Full(None) }
    }

    /// A machine's response body, streamed. With `sse_end` (an SSE response), the body
    /// ends cleanly at an event boundary once that says so.
    pub fn streamed(
        inner: MachineBody,
        idle: IdleTimer,
        metrics: Arc<Metrics>,
        guards: ExchangeGuards,
        sse_end: Option<(StreamEnd, Registration)>,
        late: Option<Late>,
    ) -> Self {
        let sse = sse_end.map(SseEnd::new);
        ProxyBody { kind: Kind::Stream(Box::new(Streamed { inner, idle, metrics, guards, sse, late })) }
    }

    /// The fields the head ends with that are not in its map: tern's own HTTP/1.1 server
    /// writes them after the map's.
    pub fn late(&self) -> Option<&Late> {
        match &self.kind {
            Kind::Stream(s) => s.late.as_ref(),
            Kind::Full(_) => None,
        }
    }
}

/// Puts the fields a response's head ends with into its map: for a response hyper sends,
/// which writes only the map.
pub fn settle_late(resp: &mut http::Response<ProxyBody>) {
    let late = match &mut resp.body_mut().kind {
        Kind::Stream(s) => s.late.take(),
        Kind::Full(_) => None,
    };
    if let Some(late) = late {
        late.settle(resp.headers_mut());
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Kind::Stream(s) => s.poll_stream(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.is_none(),
            Kind::Stream(s) => s.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Stream(s) => s.inner.size_hint(),
        }
    }
}

/// A client's request body: hyper's, or one tern's own HTTP/1.1 server read (see
/// [`super::serve1`]): none, or all of it, read in with its head.
#[derive(Debug)]
pub enum RequestBody {
    Hyper(Incoming),
    Empty,
    /// All of it; `None` once read.
    Whole(Option<Bytes>),
}

impl RequestBody {
    /// The bytes of a body read whole with its head, before anything reads them.
    pub fn whole(&self) -> Option<&Bytes> {
        match self {
            RequestBody::Whole(bytes) => bytes.as_ref(),
            _ => None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Hyper(b) => Pin::new(b).poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Whole(b) => {
                Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(b) => b.is_end_stream(),
            RequestBody::Empty => true,
            RequestBody::Whole(b) => b.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Hyper(b) => b.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Whole(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// The client's request body, shared by the exchange and whichever machine request reads
/// it. It is read from the client once; what has been read is kept, up to the app's
/// `replay_buffer`, so that a `fly-replay` can send the request again, kept part first, then
/// the rest as the client sends it. Keeping costs no copy (frames are reference-counted)
/// and ends with the machine's response head: a response that does not replay frees it.
///
/// It also tells the exchange whether reading the body from the client failed: a malformed
/// body (bad chunk framing, a length mismatch) is the client's fault, whatever error the
/// machine connection reports for it.
#[derive(Debug)]
pub struct RequestBodyState {
    failed: std::sync::OnceLock<String>,
    /// The body is being read from the client (and so the client owes the rest of it).
    reading: std::sync::atomic::AtomicBool,
    ended: std::sync::atomic::AtomicBool,
    tape: parking_lot::Mutex<Tape>,
}

#[derive(Debug)]
struct Tape {
    /// The client's body, from where it has been read to; `None` once dropped unread.
    source: Option<RequestBody>,
    /// Frames read so far, while they fit in `limit`.
    kept: std::collections::VecDeque<Kept>,
    kept_bytes: u64,
    limit: u64,
    /// Past the limit, or no longer kept: the body cannot be sent again.
    spilled: bool,
    /// The next kept frame the current reader gets.
    pos: usize,
    /// Which reader is current: a replay starts a new one, and the old one (on a machine
    /// connection being thrown away) gets nothing more.
    reader: u64,
    /// The task of the reader that last waited on the client: a replay wakes it, so the old
    /// machine exchange ends at once (with [`Replaced`]) instead of hanging on a body that
    /// no longer comes.
    waiting: Option<std::task::Waker>,
}

/// What each kept frame costs besides its bytes, so that a body of many tiny frames (1-byte
/// chunks) cannot keep far more memory than `replay_buffer` says.
const FRAME_OVERHEAD: u64 = 128;

#[derive(Debug)]
enum Kept {
    Data(Bytes),
    Trailers(http::HeaderMap),
}

impl Kept {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Kept::Data(d) => Frame::data(d.clone()),
            Kept::Trailers(t) => Frame::trailers(t.clone()),
        }
    }
}

impl RequestBodyState {
    /// A body to read from `source`, keeping up to `limit` bytes of it for a replay.
    pub fn new(source: RequestBody, limit: u64) -> Arc<RequestBodyState> {
        // A body that says it is larger (its Content-Length) is never kept: whether it could
        // be replayed must not depend on how much of it has arrived when the machine answers.
        let spilled = http_body::Body::size_hint(&source).lower() > limit;
        Arc::new(RequestBodyState {
            failed: std::sync::OnceLock::new(),
            reading: std::sync::atomic::AtomicBool::new(false),
            ended: std::sync::atomic::AtomicBool::new(false),
            tape: parking_lot::Mutex::new(Tape {
                source: Some(source),
                kept: std::collections::VecDeque::new(),
                kept_bytes: 0,
                limit,
                spilled,
                pos: 0,
                reader: 0,
                waiting: None,
            }),
        })
    }

    /// Why the client's body could not be read, if it could not.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Whether tern is still waiting for the rest of the client's body: a silence then is
    /// the client's, not the machine's.
    pub fn unfinished(&self) -> bool {
        self.reading.load(Ordering::Acquire) && !self.ended.load(Ordering::Acquire)
    }

    /// Whether the body can be sent again from its start: all of it read so far is kept,
    /// and reading it from the client has not failed.
    pub fn replayable(&self) -> bool {
        !self.tape.lock().spilled && self.failed.get().is_none()
    }

    /// The response came and does not replay: nothing more is kept, and what was kept is
    /// freed as the current reader passes it.
    pub fn stop_keeping(&self) {
        let mut tape = self.tape.lock();
        tape.spilled = true;
        let pos = tape.pos;
        tape.kept.drain(..pos);
        tape.pos = 0;
    }

    /// Starts the body over for a replay, if it can be: the next reader gets the kept
    /// frames first, then the rest from the client. Any earlier reader gets nothing more.
    fn rewind(&self) -> Option<u64> {
        let mut tape = self.tape.lock();
        if tape.spilled {
            return None;
        }
        tape.reader += 1;
        tape.pos = 0;
        if let Some(w) = tape.waiting.take() {
            w.wake();
        }
        Some(tape.reader)
    }

    /// The body was never asked for (a gated body whose machine answered first): dropping
    /// it unread tells hyper to send the client no `100 Continue`.
    fn drop_unread(&self, reader: u64) {
        let mut tape = self.tape.lock();
        if tape.reader == reader {
            tape.source = None;
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request is being sent to another machine")]
struct Replaced;

/// `Expect: 100-continue`, relayed: the client's body is not read (so hyper sends the client
/// no `100 Continue`) until the machine says it wants it with its own 100, or
/// [`CONTINUE_FALLBACK`] passes without one (a machine that ignores `Expect`, as clients
/// themselves assume after about a second). A machine that answers with a final response
/// first never gets the body: the client's is dropped unread, and the machine connection is
/// closed once that response has been read to its end.
#[derive(Debug, Default)]
pub struct ContinueGate {
    state: std::sync::atomic::AtomicU8,
    waker: parking_lot::Mutex<Option<std::task::Waker>>,
}

/// How long a request waits for its machine's 100 before its body is sent anyway.
pub const CONTINUE_FALLBACK: std::time::Duration = std::time::Duration::from_secs(1);

const GATE_WAITING: u8 = 0;
const GATE_OPEN: u8 = 1;
/// A final response came first: the body is never sent.
const GATE_ABANDONED: u8 = 2;
/// ...and that response has ended: close the machine connection.
const GATE_FINISHED: u8 = 3;

impl ContinueGate {
    /// The machine answered 100 (or the fallback passed): send the body.
    pub fn open(&self) {
        self.move_from(GATE_WAITING, GATE_OPEN);
    }

    /// A final response arrived. Returns true if the body was never asked for, in which
    /// case it never will be and the machine connection must not be reused.
    pub fn abandon_if_waiting(&self) -> bool {
        self.move_from(GATE_WAITING, GATE_ABANDONED)
    }

    fn move_from(&self, from: u8, to: u8) -> bool {
        let moved = self.state.compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if moved && let Some(w) = self.waker.lock().take() {
            w.wake();
        }
        moved
    }

    fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }
}

/// Held by an exchange whose request body was gated: when the exchange ends, an abandoned
/// body ends too, closing the machine connection it kept busy.
pub struct GateGuard(pub Arc<ContinueGate>);

impl Drop for GateGuard {
    fn drop(&mut self) {
        self.0.move_from(GATE_ABANDONED, GATE_FINISHED);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the machine answered before asking for the request body")]
struct BodyNotWanted;

/// A client's request body on its way to a machine; each frame counts as activity, so an
/// upload in progress keeps the exchange alive while the app has not answered yet.
struct ClientBody {
    state: Arc<RequestBodyState>,
    /// Which reader of the body this is (see [`Tape::reader`]).
    reader: u64,
    activity: Arc<Activity>,
    gate: Option<Gated>,
}

/// A request body held for its machine's 100.
struct Gated {
    gate: Arc<ContinueGate>,
    /// Started at the first poll: when the body is sent anyway.
    fallback: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ClientBody {
    /// Ready(Ok) to read the body, Ready(Err) to end it with an error, Pending to wait.
    fn poll_gate(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let Some(Gated { gate, fallback }) = &mut self.gate else { return Poll::Ready(Ok(())) };
        // Stored before the state is read: a move in between wakes this poll's task.
        *gate.waker.lock() = Some(cx.waker().clone());
        match gate.state() {
            GATE_OPEN => {
                // Open for good: the rest of the body flows without the gate.
                self.gate = None;
                Poll::Ready(Ok(()))
            }
            GATE_FINISHED => Poll::Ready(Err(BodyNotWanted.into())),
            GATE_ABANDONED => {
                self.state.drop_unread(self.reader);
                Poll::Pending
            }
            _ => {
                let sleep = fallback.get_or_insert_with(|| Box::pin(tokio::time::sleep(CONTINUE_FALLBACK)));
                if sleep.as_mut().poll(cx).is_ready() {
                    gate.open();
                    self.gate = None;
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.poll_gate(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
            Poll::Pending => return Poll::Pending,
        }
        let this = &mut *self;
        let state = &*this.state;
        let mut tape = state.tape.lock();
        if tape.reader != this.reader {
            return Poll::Ready(Some(Err(Replaced.into())));
        }
        if let Some(kept) = tape.kept.get(tape.pos) {
            let frame = kept.frame();
            if tape.spilled {
                // No replay can come any more: what the reader has passed is freed.
                tape.kept.pop_front();
            } else {
                tape.pos += 1;
            }
            this.activity.touch();
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(source) = tape.source.as_mut() else { return Poll::Pending };
        let r = Pin::new(&mut *source).poll_frame(cx);
        state.reading.store(true, Ordering::Release);
        match &r {
            Poll::Pending => tape.waiting = Some(cx.waker().clone()),
            // A body that failed ends cleanly afterwards: not as complete to the next reader.
            Poll::Ready(None) if state.failed.get().is_some() => {
                return Poll::Ready(Some(Err(Replaced.into())));
            }
            Poll::Ready(None) => state.ended.store(true, Ordering::Release),
            Poll::Ready(Some(Ok(frame))) => {
                this.activity.touch();
                // hyper polls no further once the body says it is complete (its length
                // reached, or END_STREAM): the end is only visible here.
                if source.is_end_stream() {
                    state.ended.store(true, Ordering::Release);
                }
                let tape = &mut *tape;
                let empty = frame.data_ref().is_some_and(Bytes::is_empty);
                if !tape.spilled && !empty {
                    let size = frame.data_ref().map_or(0, |d| d.len() as u64) + FRAME_OVERHEAD;
                    if tape.kept_bytes + size <= tape.limit {
                        tape.kept_bytes += size;
                        tape.kept.push_back(match frame.trailers_ref() {
                            Some(t) => Kept::Trailers(t.clone()),
                            None => Kept::Data(frame.data_ref().cloned().unwrap_or_default()),
                        });
                        tape.pos = tape.kept.len();
                    } else {
                        // Too large to send again: keep nothing more, free what was kept.
                        tape.spilled = true;
                        tape.kept = std::collections::VecDeque::new();
                        tape.pos = 0;
                    }
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let _ = state.failed.set(e.to_string());
            }
        }
        r.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        let tape = self.state.tape.lock();
        tape.reader == self.reader
            && tape.pos >= tape.kept.len()
            && tape.source.as_ref().is_some_and(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let tape = self.state.tape.lock();
        let Some(source) = tape.source.as_ref() else { return SizeHint::default() };
        let rest = source.size_hint();
        let kept: u64 = tape
            .kept
            .iter()
            .skip(tape.pos)
            .map(|k| if let Kept::Data(d) = k { d.len() as u64 } else { 0 })
            .sum();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + kept);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + kept);
        }
        hint
    }
}

/// The client's body as sent to the first machine. With `gate`, it waits for the
/// machine's 100.
pub fn upstream_body(
    activity: Arc<Activity>,
    state: Arc<RequestBodyState>,
    gate: Option<Arc<ContinueGate>>,
) -> UpBody {
    let gate = gate.map(|gate| Gated { gate, fallback: None });
    UpBody::stream(ClientBody { state, reader: 0, activity, gate })
}

/// The client's body from its start again, for a replay; `None` when it was too large to
/// keep. With `gate`, it waits for the new machine's 100.
pub fn replayed_body(
    activity: Arc<Activity>,
    state: &Arc<RequestBodyState>,
    gate: Option<Arc<ContinueGate>>,
) -> Option<UpBody> {
    let reader = state.rewind()?;
    let gate = gate.map(|gate| Gated { gate, fallback: None });
    Some(UpBody::stream(ClientBody { state: state.clone(), reader, activity, gate }))
}
