//! Bodies that stream through tern, never buffered whole, with back-pressure both ways:
//! a frame is read from one side only when the other side asks for one.
//!
//! Each streamed body carries the guards of its exchange (requests in flight on the
//! machine, open exchanges on the client connection), so they end exactly when the body
//! ends or is dropped, and the app's idle timeout, which only fires after a silence.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::catalog::InFlight;
use crate::telemetry::Metrics;
use crate::upstream::{BoxError, Lease, UpBody};

use super::activity::{Activity, ExchangeGuard, IdleTimer};
use super::ending::{self, SseEdge};

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
}

struct Streamed {
    inner: Incoming,
    idle: IdleTimer,
    metrics: Arc<Metrics>,
    guards: ExchangeGuards,
    /// For an SSE response: ending it cleanly when its machine is about to stop.
    sse: Option<SseEnd>,
}

/// An SSE response listening for its machine's request to end streams. Once asked, it ends
/// at the next event boundary, or is cut if none comes within [`ending::GRACE`].
struct SseEnd {
    edge: SseEdge,
    asked: Pin<Box<WaitForCancellationFutureOwned>>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The last frame was cut short at a boundary: end now.
    cut_at_boundary: bool,
}

impl SseEnd {
    pub fn new(token: CancellationToken) -> Self {
        SseEnd {
            edge: SseEdge::default(),
            asked: Box::pin(token.cancelled_owned()),
            deadline: None,
            cut_at_boundary: false,
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
#[error("the machine is stopping and the event in progress did not end in time")]
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
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
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

    /// Ends an SSE body its machine asked to end: cleanly (the client sees the end of the
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
    /// ends cleanly at an event boundary once that token is cancelled.
    pub fn streamed(
        inner: Incoming,
        idle: IdleTimer,
        metrics: Arc<Metrics>,
        guards: ExchangeGuards,
        sse_end: Option<CancellationToken>,
    ) -> Self {
        let sse = sse_end.map(SseEnd::new);
        ProxyBody { kind: Kind::Stream(Box::new(Streamed { inner, idle, metrics, guards, sse })) }
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

/// A client's request body on its way to a machine; each frame counts as activity, so an
/// upload in progress keeps the exchange alive while the app has not answered yet.
struct ClientBody {
    inner: Incoming,
    activity: Arc<Activity>,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &r {
            self.activity.touch();
        }
        r.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub fn upstream_body(inner: Incoming, activity: Arc<Activity>) -> UpBody {
    ClientBody { inner, activity }.boxed_unsync()
}
