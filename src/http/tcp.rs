//! TCP services: connections on a `kind = "tcp"` listener, relayed to an app's machines.
//!
//! A connection is routed by its destination: to the app that lists the address in `addrs`
//! and has a service on the port; failing that (a shared address), by the server name in a
//! TLS ClientHello, read without answering, to the app that claims the name in `hostnames`
//! and serves TLS on the port (passthrough, or terminated here). Nothing matches: the
//! connection is closed and counted (`no_service`).
//!
//! The machine is chosen and woken as for an HTTP request (least loaded, held until one is
//! ready, one start per burst, queued at the hard limit), and the connection counts as one
//! in flight on it for as long as it is open: autostop sees it as load, and `concurrency`
//! limits connections. Bytes are relayed both ways through the tunnel HTTP upgrades use
//! (back-pressure, half-close, the app's `idle_timeout` for silence, ended when the
//! machine is about to stop or the connection's time in a drain comes). This lives beside
//! HTTP because it shares all of that.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::autostart::WakeError;
use crate::catalog::AppEntry;
use crate::model::Handling;
use crate::routing::Refusal;
use crate::routing::decide::{Steering, Wakes};

use super::activity::ConnState;
use super::drain::{self, StreamEnd};
use super::{ConnInfo, Handler, Prefixed, Server, tunnel};

/// How long tern waits for a machine's port to accept.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where a TCP connection goes: the app, its service's port on the machines, and what is
/// done on the way.
pub struct TcpRoute {
    pub app: Arc<AppEntry>,
    pub internal_port: u16,
    pub handling: Handling,
}

impl Server {
    /// The service a connection is for. A shared address reads the ClientHello (within the
    /// header read timeout) and puts it back for whoever reads next; a private listener goes
    /// by the app's private address and admits its org's sources only. Counts and logs a
    /// connection that matches nothing.
    pub async fn route_tcp<IO: AsyncRead + Unpin>(
        &self,
        io: &mut Prefixed<IO>,
        conn: &ConnInfo,
        handler: &Handler,
    ) -> Option<TcpRoute> {
        let (peer, local) = (conn.peer, conn.local);
        let route = |app: &Arc<AppEntry>, shared: bool| {
            let (service, port) = app.spec.service_for(local.port())?;
            let handling = port.handling().ok()?;
            // On a shared address only TLS is told apart (by SNI), and only public apps.
            if shared && (!app.spec.public || (handling.http && !handling.tls)) {
                return None;
            }
            Some(TcpRoute { app: app.clone(), internal_port: service.internal_port, handling })
        };
        let refuse = |reason: &'static str, sni: Option<&str>| {
            handler.metrics.tcp_refused.with_label_values(&[reason]).inc();
            tracing::info!(target: "tern::tcp", %peer, %local, sni = sni.unwrap_or("-"), reason,
                "no service for this connection: closed");
        };
        if conn.private {
            let snap = handler.router.catalog().load();
            let Some(found) = snap.private_app(local.ip()).and_then(|app| route(app, false)) else {
                refuse("no_service", None);
                return None;
            };
            if !snap.org(&found.app.spec.org).is_some_and(|o| o.admits(peer.ip())) {
                refuse("private_forbidden", None);
                return None;
            }
            return Some(found);
        }
        let dedicated = handler.router.catalog().load().tcp_app(local).and_then(|app| route(app, false));
        if let Some(found) = dedicated {
            return Some(found);
        }
        let peeked = tokio::time::timeout(self.header_read_timeout, crate::tls::peek_sni(io)).await;
        let (first, name) = peeked.ok().flatten().unwrap_or_default();
        io.unread(bytes::Bytes::from(first));
        let found = name.as_deref().and_then(|n| handler.router.app_for(n)).and_then(|app| route(&app, true));
        if found.is_none() {
            refuse("no_service", name.as_deref());
        }
        found
    }

    /// Relays `client` to a machine of the route's app, waking one if none is started.
    pub async fn relay_tcp<IO>(
        &self,
        client: IO,
        route: &TcpRoute,
        peer: SocketAddr,
        local: SocketAddr,
        handler: &Handler,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let app = &route.app;
        let refused = |reason: &'static str, detail: String| {
            handler.metrics.tcp_refused.with_label_values(&[reason]).inc();
            tracing::info!(target: "tern::tcp", app = %app.name, %peer, reason, detail, "connection closed");
        };
        let steer = Steering { nearest: handler.router.nearest().cloned(), ..Steering::default() };
        let wakes: &dyn Wakes = &handler.lifecycle;
        let deadline = Instant::now() + app.spec.wake_timeout;
        let routed = match handler.router.route(app, &steer, wakes, deadline, true).await {
            Ok(r) => r,
            Err(refusal) => {
                let reason = match &refusal {
                    Refusal::Wait(WakeError::Timeout, ..) => "wake_timeout",
                    Refusal::Wait(WakeError::QueueFull(_) | WakeError::NoRoom(_), ..) => "queue_full",
                    Refusal::Wait(WakeError::Failed(_), ..) => "wake_failed",
                    _ => "no_machine",
                };
                return refused(reason, format!("{refusal:?}"));
            }
        };
        // Held for the connection's life: load for autostop, and what concurrency limits.
        let machine = routed.pick.machine.clone();
        let _in_flight = routed.pick.guard;
        // A machine declared with a port of its own (ip:port) is reached there; one declared
        // by address alone, on the service's internal port.
        let target = if machine.spec.addr.port.is_some() {
            machine.addr
        } else {
            SocketAddr::new(machine.addr.ip(), route.internal_port)
        };
        let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return refused("upstream_connect", format!("{}: {target}: {e}", machine.id)),
            Err(_) => {
                return refused("upstream_connect", format!("{}: {target}: connect timed out", machine.id));
            }
        };
        let _ = upstream.set_nodelay(true);
        if route.handling.proxy_proto {
            let header = crate::listener::proxy_protocol::v2_header(peer, local);
            if let Err(e) = upstream.write_all(&header).await {
                return refused("upstream_connect", format!("{}: sending the PROXY header: {e}", machine.id));
            }
        }
        handler.metrics.tcp_relayed.inc();
        tracing::debug!(target: "tern::tcp", app = %app.name, machine = %machine.id, %peer, "relaying");
        let began = Instant::now();
        let tally = Arc::new(Tally::default());
        let client = Tallied { inner: client, tally: tally.clone() };
        // Registered with the drain as a stream of its own: it ends at its time in a drain,
        // as a WebSocket would, and when its machine is about to stop.
        let (conn, _registered) = self.drain.connection();
        let state = Arc::new(ConnState::new(conn));
        let (end, registered) = StreamEnd::new(machine.live.streams_end(), &state, drain::Kind::Other);
        let settings = tunnel::Settings {
            idle_timeout: app.spec.idle_timeout,
            kind: tunnel::Kind::Other,
            end,
            registered,
        };
        tunnel::relay(client, upstream, settings, &handler.metrics).await;
        if handler.access_log {
            tracing::info!(target: "tern::access", kind = "tcp", %peer, %local, app = %app.name,
                machine = %machine.id, duration_ms = (began.elapsed().as_secs_f64() * 100_000.0).round() / 100.0,
                bytes_in = tally.read.load(Ordering::Relaxed), bytes_out = tally.written.load(Ordering::Relaxed),
                "connection");
        }
    }
}

/// Bytes a client sent and was sent, for the access log.
#[derive(Default)]
struct Tally {
    read: AtomicU64,
    written: AtomicU64,
}

/// A client connection that counts its bytes into a [`Tally`].
struct Tallied<IO> {
    inner: IO,
    tally: Arc<Tally>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tallied<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.tally.read.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tallied<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.tally.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
