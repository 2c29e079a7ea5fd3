//! Listening sockets and the accept loop.
//!
//! Sockets are made with socket2 so that each can set IPV6_V6ONLY (so `[::]` and `0.0.0.0`
//! can both be listed) and its own backlog. They do not set SO_REUSEPORT: with it a second
//! tern would bind the same address and silently take half the connections; an address
//! already taken is refused with the pid that holds it ([`holder`]). Upgrades hand the
//! sockets themselves to the new process instead ([`inherit`]). The accept loop survives descriptor exhaustion
//! (EMFILE/ENFILE) with a back-off and a metric, and stops accepting while the node-wide
//! connection cap is reached, leaving new connections queued in the kernel.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::telemetry::Metrics;

pub mod holder;
pub mod inherit;

/// Binds a listening socket.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // SO_REUSEADDR only lets a restarted tern bind past connections still in TIME_WAIT;
    // Linux never lets it share a port another socket listens on.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// The `reason` label of `tern_accept_errors_total`, and whether to back off.
fn classify(e: &io::Error) -> (&'static str, bool) {
    match e.raw_os_error() {
        Some(libc::EMFILE) => ("emfile", true),
        Some(libc::ENFILE) => ("enfile", true),
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => ("nomem", true),
        Some(libc::ECONNABORTED) => ("aborted", false),
        _ => ("other", true),
    }
}

/// Accepts connections until `shutdown` turns true, handing each to `on_accept` with a
/// permit from `limit` that it must hold for the connection's life. `beat`, ticked every
/// period while the loop waits, tells the watchdog the loop itself still turns.
pub async fn accept_loop<F>(
    listener: TcpListener,
    label: Arc<str>,
    limit: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
    beat: Option<(crate::watchdog::Beat, Duration)>,
    mut on_accept: F,
) where
    F: FnMut(TcpStream, SocketAddr, OwnedSemaphorePermit),
{
    let mut backoff = Duration::from_millis(5);
    let (beat, period) = match beat {
        Some((b, p)) => (Some(b), p),
        None => (None, Duration::from_secs(3600)),
    };
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                metrics.connections_rejected.inc();
                tracing::warn!(target: "tern::listener", listener = %label,
                    "max_connections reached; new connections wait in the backlog");
                // Waiting for a connection to close is not being stuck: keep ticking.
                let waiting = limit.clone().acquire_owned();
                tokio::pin!(waiting);
                loop {
                    tokio::select! {
                        p = &mut waiting => match p { Ok(p) => break p, Err(_) => return },
                        () = crate::shutdown::requested(&mut shutdown) => return,
                        _ = every.tick() => if let Some(b) = &beat { b.tick() },
                    }
                }
            }
        };
        let accepted = loop {
            tokio::select! {
                r = listener.accept() => break r,
                () = crate::shutdown::requested(&mut shutdown) => return,
                _ = every.tick() => if let Some(b) = &beat { b.tick() },
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                metrics.connections.with_label_values(&[&label]).inc();
                on_accept(stream, peer, permit);
            }
            Err(e) => {
                let (reason, back_off) = classify(&e);
                metrics.accept_errors.with_label_values(&[reason]).inc();
                if back_off {
                    tracing::warn!(target: "tern::listener", listener = %label, error = %e, retry_in = ?backoff, "accept failed");
                    let pause = tokio::time::sleep(backoff);
                    tokio::pin!(pause);
                    loop {
                        tokio::select! {
                            () = &mut pause => break,
                            () = crate::shutdown::requested(&mut shutdown) => return,
                            // Backing off is not being stuck: keep ticking.
                            _ = every.tick() => if let Some(b) = &beat { b.tick() },
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_descriptor_exhaustion() {
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EMFILE)), ("emfile", true));
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::ENFILE)), ("enfile", true));
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::ECONNABORTED)), ("aborted", false));
    }

    #[tokio::test]
    async fn binds_v4_and_v6_and_refuses_an_address_in_use() {
        let a = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = a.local_addr().unwrap();
        // No SO_REUSEPORT: a second socket on the same address would split its traffic.
        let e = bind(addr, 16).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        if let Ok(v6) = bind("[::1]:0".parse().unwrap(), 16) {
            assert!(v6.local_addr().unwrap().is_ipv6());
        }
    }
}
