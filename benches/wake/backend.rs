//! The machine the wake benchmark wakes: the bench binary itself, run by tern's process
//! driver as `wake-<hash> backend ADDR DELAY_MS BACKLOG [ACCEPT_AFTER_MS]`. (`cargo bench`
//! builds no examples, and a nested `cargo build` would wait on the lock the outer one
//! holds, so the machine lives in the binary that is certainly built.)
//!
//! It boots slowly on purpose: it binds ADDR at once (a bound socket that does not listen
//! refuses connections, as no socket would), sleeps DELAY_MS so that every request of the
//! round is held at tern before it can answer, then calls `listen(2)` and notes that
//! instant, `t_listen`. From then on tern's readiness probe can connect.
//!
//! For every request it answers `200` with one line:
//!
//! ```text
//! wake-bench <boot_mono> <listen_mono> <listen_real> <kernel_real> <read_mono> <first_accept_mono>
//! ```
//!
//! all in nanoseconds: `boot` when the process began; `listen` just after `listen(2)`
//! returned; `kernel` the kernel's receive timestamp of the request's first bytes
//! (`SO_TIMESTAMPNS`: when tern's write reached this socket, however late this process
//! reads it; 0 if the kernel gave none); `read` when this process had read the whole head;
//! `first_accept` when it accepted its first connection (tern's readiness probe, which
//! connects before any request is forwarded). `_mono` is `CLOCK_MONOTONIC`, the clock the
//! bench reads too; kernel receive timestamps are `CLOCK_REALTIME`, so `t_listen` is noted
//! on both clocks and each difference is taken on one.
//!
//! With ACCEPT_AFTER_MS it leaves connections in its accept queue that long after listening
//! before it accepts any: the kernel completes the handshakes and stamps the requests as
//! they arrive, while this process takes no CPU from tern (a diagnostic, not a real app).
//!
//! The server is a minimal HTTP/1.1 keep-alive loop (GET only, no bodies) on one thread:
//! hyper cannot hand out the control messages `recvmsg(2)` carries.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use anyhow::Context;
use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, sockopt};
use nix::sys::time::TimeSpec;
use nix::time::{ClockId, clock_gettime};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;

/// Nanoseconds on `clock`.
pub fn now_ns(clock: ClockId) -> i64 {
    clock_gettime(clock).map_or(0, |t| ts_ns(&t))
}

/// Nanoseconds on `CLOCK_MONOTONIC`, the clock the bench and the backend share.
pub fn mono_ns() -> i64 {
    now_ns(ClockId::CLOCK_MONOTONIC)
}

fn ts_ns(t: &TimeSpec) -> i64 {
    t.tv_sec() * 1_000_000_000 + t.tv_nsec()
}

/// When the machine began to listen, on both clocks, and when its process began.
#[derive(Clone, Copy)]
struct Stamps {
    boot_mono: i64,
    listen_mono: i64,
    listen_real: i64,
}

/// `backend ADDR DELAY_MS BACKLOG [ACCEPT_AFTER_MS]`
pub fn main(args: &[String]) -> anyhow::Result<()> {
    let boot_mono = mono_ns();
    let (addr, delay, backlog, accept_after) = match args {
        [a, d, b] => (a, d, b, "0"),
        [a, d, b, x] => (a, d, b, x.as_str()),
        _ => anyhow::bail!("usage: backend ADDR DELAY_MS BACKLOG [ACCEPT_AFTER_MS]"),
    };
    let accept_after = Duration::from_millis(accept_after.parse().context("ACCEPT_AFTER_MS")?);
    let addr: SocketAddr = addr.parse().context("ADDR")?;
    let delay = Duration::from_millis(delay.parse().context("DELAY_MS")?);
    let backlog: i32 = backlog.parse().context("BACKLOG")?;

    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    // The bench holds the port (bound, not listening) until the round ends; share it.
    sock.set_reuse_port(true)?;
    // Set before any request can arrive: it also turns on the kernel's receive
    // timestamping, and accepted sockets inherit it.
    socket::setsockopt(&sock, sockopt::ReceiveTimestampns, &true)?;
    sock.bind(&addr.into())?;
    std::thread::sleep(delay);
    sock.listen(backlog)?;
    let stamps = Stamps { boot_mono, listen_mono: mono_ns(), listen_real: now_ns(ClockId::CLOCK_REALTIME) };
    sock.set_nonblocking(true)?;
    std::thread::sleep(accept_after);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(sock.into())?;
        let mut first_accept = 0;
        loop {
            let (stream, _) = listener.accept().await?;
            if first_accept == 0 {
                first_accept = mono_ns();
            }
            tokio::spawn(async move {
                let _ = serve(stream, stamps, first_accept).await;
            });
        }
    })
}

async fn serve(mut stream: TcpStream, stamps: Stamps, first_accept: i64) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut len = 0;
    // The kernel timestamp of the first bytes of the request being read.
    let mut first: Option<i64> = None;
    loop {
        if len == buf.len() {
            return Err(io::Error::other("request head too large"));
        }
        stream.readable().await?;
        let fd = stream.as_raw_fd();
        let (n, kernel) = match stream.try_io(Interest::READABLE, || recv_stamped(fd, &mut buf[len..])) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(());
        }
        first.get_or_insert(kernel.unwrap_or(0));
        len += n;
        while let Some(end) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            let read_mono = mono_ns();
            let body = format!(
                "wake-bench {} {} {} {} {read_mono} {first_accept}\n",
                stamps.boot_mono,
                stamps.listen_mono,
                stamps.listen_real,
                first.unwrap_or(0),
            );
            let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
            stream.write_all(resp.as_bytes()).await?;
            buf.copy_within(end + 4..len, 0);
            len -= end + 4;
            // Bytes of a next request that came with this read share its timestamp.
            first = if len > 0 { first } else { None };
        }
    }
}

/// One `recvmsg(2)`: the bytes read and the kernel's receive timestamp, if it gave one.
fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<i64>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(TimeSpec);
    let msg = socket::recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())?;
    let stamp = msg.cmsgs()?.find_map(|c| match c {
        ControlMessageOwned::ScmTimestampns(t) => Some(ts_ns(&t)),
        _ => None,
    });
    Ok((msg.bytes, stamp))
}
