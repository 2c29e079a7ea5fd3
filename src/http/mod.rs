//! HTTP/1.1 and HTTP/2 from clients. This module serves connections, owns header hygiene
//! and turns every error into a response in exactly one place ([`respond`]). It routes
//! through [`crate::routing`] and sends through [`crate::upstream`]; it never touches the
//! listener or the store.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

pub mod activity;
pub mod body;
pub mod ending;
mod forward;
pub mod headers;
pub mod request_id;
pub mod respond;
mod tunnel;

pub use forward::Handler;

use activity::{ConnState, TouchIo};

/// The client side of one connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
}

#[derive(Clone, Debug)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub keepalive_timeout: Duration,
}

/// Connection settings shared by every client connection.
pub struct Server {
    builder: auto::Builder<TokioExecutor>,
    keepalive_timeout: Duration,
}

impl Server {
    pub fn new(limits: &ServerLimits) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // Room for heads up to twice our own limit, so tern (not hyper) answers the
        // over-limit ones, with a tern-error code.
        let head_room = (limits.max_header_bytes * 2).max(64 * 1024);
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(head_room.max(8192 + 1))
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(head_room).unwrap_or(u32::MAX))
            .max_concurrent_streams(256)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        Server { builder, keepalive_timeout: limits.keepalive_timeout }
    }

    /// Serves one client connection until it closes. When `shutdown` turns true, or the
    /// connection has had no open exchange and no bytes for the keep-alive timeout, it is
    /// closed gracefully: HTTP/1.1 after the response in progress, HTTP/2 with GOAWAY.
    pub async fn serve<IO>(
        &self,
        io: IO,
        info: ConnInfo,
        handler: Arc<Handler>,
        mut shutdown: watch::Receiver<bool>,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let state = Arc::new(ConnState::default());
        let io = TokioIo::new(TouchIo::new(io, state.activity.clone()));
        let info = Arc::new(info);
        let svc_state = state.clone();
        let svc = service_fn(move |req| {
            let (handler, info, state) = (handler.clone(), info.clone(), svc_state.clone());
            async move { Ok::<_, Infallible>(handler.handle(req, info, state).await) }
        });
        let conn = self.builder.serve_connection_with_upgrades(io, svc);
        tokio::pin!(conn);
        let mut closing = false;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(target: "tern::http", error = %e, "client connection ended with an error");
                    }
                    return;
                }
                () = crate::shutdown::requested(&mut shutdown), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = state.idle_for(self.keepalive_timeout), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
