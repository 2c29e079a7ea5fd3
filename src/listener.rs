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
pub mod proxy_protocol;

/// Binds a listening socket.
pub fn bind(addr: SocketAddr, backlog: u32, freebind: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // IP_FREEBIND: the address need not be on an interface yet (an anycast address added
    // after tern starts, or one a BGP speaker brings up).
    if freebind {
        if addr.is_ipv6() { socket.set_freebind_v6(true)? } else { socket.set_freebind_v4(true)? }
    }
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

/// What an accept loop does besides accepting, for a worker: keep its heartbeat (idle while
/// it waits, busy in between), and ask `defer` whether to let another worker take the next
/// connection.
#[derive(Default)]
pub struct Pacing {
    pub beat: Option<crate::watchdog::Beat>,
    pub defer: Option<Box<dyn Fn() -> bool + Send>>,
}

/// `f`, with the loop's heartbeat idle while it waits: waiting for a connection, a permit
/// or the end of a pause is not being stuck, and wakes nobody.
async fn waiting<T>(beat: Option<&crate::watchdog::Beat>, f: impl std::future::Future<Output = T>) -> T {
    if let Some(b) = beat {
        b.idle();
    }
    let out = f.await;
    if let Some(b) = beat {
        b.busy();
    }
    out
}

/// How long a worker ahead in open connections waits before it asks for the next one.
const DEFER: Duration = Duration::from_millis(1);

/// Whether worker `me` should let the others take the next connection: it holds more than
/// the least loaded worker by over a sixteenth (and at least 1).
pub fn ahead(loads: &[std::sync::Arc<std::sync::atomic::AtomicUsize>], me: usize) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(mine) = loads.get(me).map(|l| l.load(Relaxed)) else { return false };
    let least = loads.iter().enumerate().filter(|(i, _)| *i != me).map(|(_, l)| l.load(Relaxed)).min();
    least.is_some_and(|least| mine > least + (least / 16).max(1))
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
/// permit from `limit` that it must hold for the connection's life. `beat`, idle while the
/// loop waits and ticked as it turns, tells the watchdog the loop itself is not stuck.
pub async fn accept_loop<F>(
    listener: TcpListener,
    label: Arc<str>,
    limit: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
    pacing: Pacing,
    mut on_accept: F,
) where
    F: FnMut(TcpStream, SocketAddr, OwnedSemaphorePermit),
{
    let mut backoff = Duration::from_millis(5);
    let Pacing { beat, defer } = pacing;
    let beat = beat.as_ref();
    loop {
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                metrics.connections_rejected.inc();
                tracing::warn!(target: "tern::listener", listener = %label,
                    "max_connections reached; new connections wait in the backlog");
                let waited = waiting(beat, async {
                    tokio::select! {
                        p = limit.clone().acquire_owned() => p.ok(),
                        () = crate::shutdown::requested(&mut shutdown) => None,
                    }
                });
                match waited.await {
                    Some(p) => p,
                    None => return,
                }
            }
        };
        // A worker well ahead of another in open connections lets it take the next one:
        // every worker sharing the socket is woken for it, and the kernel hands it to the
        // first to ask. Only a head start, never a refusal: after the pause it asks too.
        if defer.as_ref().is_some_and(|d| d()) {
            waiting(beat, tokio::time::sleep(DEFER)).await;
        }
        let accepted = waiting(beat, async {
            tokio::select! {
                r = listener.accept() => Some(r),
                () = crate::shutdown::requested(&mut shutdown) => None,
            }
        });
        let Some(accepted) = accepted.await else { return };
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
                    let paused = waiting(beat, async {
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => true,
                            () = crate::shutdown::requested(&mut shutdown) => false,
                        }
                    });
                    if !paused.await {
                        return;
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
    fn a_worker_well_ahead_defers_to_the_least_loaded() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        let loads = |v: &[usize]| v.iter().map(|&n| Arc::new(AtomicUsize::new(n))).collect::<Vec<_>>();
        assert!(!ahead(&loads(&[0, 0]), 0));
        assert!(!ahead(&loads(&[1, 0]), 0), "a slack of 1");
        assert!(ahead(&loads(&[2, 0]), 0));
        assert!(!ahead(&loads(&[0, 3]), 0), "behind is never ahead");
        assert!(!ahead(&loads(&[106, 100]), 0), "within a sixteenth");
        assert!(ahead(&loads(&[107, 100]), 0));
        assert!(!ahead(&loads(&[5]), 0), "alone: no one to defer to");
    }

    #[test]
    fn classifies_descriptor_exhaustion() {
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EMFILE)), ("emfile", true));
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::ENFILE)), ("enfile", true));
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::ECONNABORTED)), ("aborted", false));
    }

    #[tokio::test]
    async fn binds_v4_and_v6_and_refuses_an_address_in_use() {
        let a = bind("127.0.0.1:0".parse().unwrap(), 16, false).unwrap();
        let addr = a.local_addr().unwrap();
        // No SO_REUSEPORT: a second socket on the same address would split its traffic.
        let e = bind(addr, 16, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        if let Ok(v6) = bind("[::1]:0".parse().unwrap(), 16, false) {
            assert!(v6.local_addr().unwrap().is_ipv6());
        }
    }

    #[test]
    fn freebind_binds_an_address_no_interface_has_yet() {
        // Documentation addresses (RFC 5737, RFC 3849): on no interface of this host. Bound
        // only; nothing is sent to or from them.
        // A host that lets every socket bind any address (ip_nonlocal_bind) cannot show it.
        let nonlocal = |v: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/{v}/ip_nonlocal_bind"))
                .is_ok_and(|s| s.trim() != "0")
        };
        if nonlocal("ipv4") || nonlocal("ipv6") {
            eprintln!("skipped: ip_nonlocal_bind is set on this host");
            return;
        }
        let ipv6 = bind("[::1]:0".parse().unwrap(), 16, false).is_ok();
        for addr in ["192.0.2.1:0", "[2001:db8::1]:0"] {
            let addr: SocketAddr = addr.parse().unwrap();
            if addr.is_ipv6() && !ipv6 {
                eprintln!("skipped {addr}: this host has no IPv6");
                continue;
            }
            let e = bind(addr, 16, false).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL), "{addr} without freebind: {e}");
            let l = bind(addr, 16, true).unwrap();
            assert_eq!(l.local_addr().unwrap().ip(), addr.ip());
        }
    }
}
