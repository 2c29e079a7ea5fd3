//! Idle keep-alive connections for the load harness's memory run (`benches/load/run.sh`):
//! opens `--conns` connections to a proxy, at most `--concurrency` being opened at once,
//! makes one request on each (`--requests`) and reads the whole response, then
//! holds them all open without sending another byte, so the harness can read how much the
//! proxy's memory grew per connection.
//!
//! Prints `ready ok=N errors=E` on stdout once every connection has had its response, then
//! waits for stdin to close (or a signal). On stdin's end it prints `held=H closed=C`: of
//! the connections it held, how many the proxy had closed meanwhile (a figure read while
//! the proxy was closing them would be wrong), and exits.
//!
//! Usage: `bench_idle --addr 127.0.0.1:PORT [--tls | --h2] [--conns 10000] [--host localhost]
//! [--path /] [--stream]` (`--h2`: HTTP/2 over TLS, the requests made with hyper's client;
//! `--stream`: the last request's body is not read but held open, as a client holds an SSE
//! stream, for a path whose response never ends)
//!
//! One thread (a current-thread runtime), so that it stays light beside the backend on the
//! harness's load-generator CPU.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[path = "bench_client/mod.rs"]
mod bench_client;
use bench_client::{Stream, Target};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    addr: SocketAddr,
    /// The Host header, and the SNI with `--tls`.
    #[arg(long, default_value = "localhost")]
    host: String,
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long)]
    tls: bool,
    /// HTTP/2 over TLS (ALPN `h2` only; implies `--tls`): each connection a client of hyper's,
    /// its requests on streams of their own.
    #[arg(long)]
    h2: bool,
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Connections being opened (connect, handshake, request) at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Requests made on each connection before it is left idle; 0 shows what a connection
    /// costs before any request.
    #[arg(long, default_value_t = 1)]
    requests: u32,
    /// The last request on each connection is a stream held open: its response head is read
    /// (a 200), its body left unread.
    #[arg(long)]
    stream: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = if args.h2 {
        Target::h2(args.addr, &args.host)?
    } else {
        Target::new(args.addr, &args.host, args.tls)?
    };
    let req: Arc<[u8]> = bench_client::request(&args.host, &args.path).into();
    let uri: Arc<str> = format!("https://{}{}", args.host, args.path).into();
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let (requests, h2, stream) = (args.requests, args.h2, args.stream);
    anyhow::ensure!(!stream || requests > 0, "--stream needs a request to hold");
    let mut opening = JoinSet::new();
    for _ in 0..args.conns {
        let (target, req, uri, gate) = (target.clone(), req.clone(), uri.clone(), gate.clone());
        opening.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            if h2 {
                open_h2(&target, &uri, requests, stream).await
            } else {
                open(&target, &req, requests, stream).await
            }
        });
    }
    let mut held = Vec::with_capacity(args.conns);
    let mut errors = Vec::new();
    while let Some(r) = opening.join_next().await {
        match r? {
            Ok(s) => held.push(s),
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors.sort();
    errors.dedup();
    println!("ready ok={} errors={} {}", held.len(), args.conns - held.len(), errors.join("; "));
    // Held until stdin ends: the harness closes it once it has read the proxy's memory.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    let closed = held.iter().filter(|s| is_closed(s)).count();
    println!("held={} closed={closed}", held.len());
    Ok(())
}

/// A connection held idle.
enum Held {
    Http1(Stream),
    /// hyper's client for it, and the task driving the connection (it answers the proxy's
    /// pings, and ends when the proxy closes the connection).
    Http2 {
        _sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
        driving: tokio::task::JoinHandle<()>,
        /// The body of a stream held open, unread.
        _stream: Option<hyper::body::Incoming>,
    },
}

async fn open(target: &Target, req: &[u8], requests: u32, stream: bool) -> anyhow::Result<Held> {
    let mut s = target.connect().await?;
    let mut buf = Vec::new();
    let timeout = Duration::from_secs(30);
    for i in 0..requests {
        let status = if stream && i + 1 == requests {
            bench_client::open_stream(&mut s, req, &mut buf, timeout).await?
        } else {
            bench_client::exchange(&mut s, req, &mut buf, timeout).await?
        };
        anyhow::ensure!(status == 200, "status {status}");
    }
    Ok(Held::Http1(s))
}

/// A connection speaking HTTP/2 (the proxy must have chosen `h2`), `requests` GETs of `uri`
/// made on it one after another, each response read to its end (the last one's held unread
/// with `stream`).
async fn open_h2(target: &Target, uri: &str, requests: u32, stream: bool) -> anyhow::Result<Held> {
    let s = target.connect().await?;
    let alpn = match &s {
        tokio_util::either::Either::Right(tls) => tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec),
        tokio_util::either::Either::Left(_) => None,
    };
    anyhow::ensure!(alpn.as_deref() == Some(&b"h2"[..]), "the proxy chose {alpn:?}, not h2");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await?;
    let driving = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut held = None;
    for i in 0..requests {
        let req = http::Request::get(uri).body(Empty::<Bytes>::new())?;
        let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req)).await??;
        let status = resp.status();
        anyhow::ensure!(status == 200, "status {status}");
        if stream && i + 1 == requests {
            held = Some(resp.into_body());
        } else {
            resp.into_body().collect().await?;
        }
    }
    Ok(Held::Http2 { _sender: sender, driving, _stream: held })
}

/// Whether the peer has closed the connection. Over HTTP/1.1: its socket reads end of
/// stream or an error; anything the proxy sent meanwhile (TLS session tickets, a
/// close_notify) is read and dropped on the way, which is harmless as the connection is not
/// used again. Over HTTP/2: hyper's connection task has ended.
fn is_closed(held: &Held) -> bool {
    let s = match held {
        Held::Http1(s) => s,
        Held::Http2 { driving, .. } => return driving.is_finished(),
    };
    let tcp = match s {
        tokio_util::either::Either::Left(s) => s,
        tokio_util::either::Either::Right(s) => s.get_ref().0,
    };
    let sock = socket2::SockRef::from(tcp);
    let mut buf = [0u8; 4096];
    loop {
        match (&*sock).read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}
