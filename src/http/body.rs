//! Bodies that stream through tern, never buffered whole, with back-pressure both ways:
//! a frame is read from one side only when the other side asks for one.
//!
//! Each streamed body carries the guards of its exchange (requests in flight on the
//! machine, open exchanges on the client connection), so they end exactly when the body
//! ends or is dropped, and the app's idle timeout, which only fires after a silence.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::catalog::InFlight;
use crate::telemetry::Metrics;
use crate::upstream::{BoxError, Lease, UpBody};

use super::activity::{Activity, ExchangeGuard, IdleTimer};

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
}

impl Streamed {
    /// Gives the machine connection back once the body has been read to the end.
    fn release(&mut self) {
        if let Some(lease) = self.guards.lease.take() {
            lease.release();
        }
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

    pub fn streamed(inner: Incoming, idle: IdleTimer, metrics: Arc<Metrics>, guards: ExchangeGuards) -> Self {
        ProxyBody { kind: Kind::Stream(Box::new(Streamed { inner, idle, metrics, guards })) }
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
            Kind::Stream(s) => match Pin::new(&mut s.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    s.idle.activity().touch();
                    if s.inner.is_end_stream() {
                        s.release();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => {
                    s.release();
                    Poll::Ready(None)
                }
                Poll::Pending => match s.idle.poll_expired(cx) {
                    Poll::Ready(()) => {
                        s.metrics.streams_cut_idle.inc();
                        Poll::Ready(Some(Err(IdleTimeout.into())))
                    }
                    Poll::Pending => Poll::Pending,
                },
            },
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
