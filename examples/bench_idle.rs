//! Idle keep-alive connections for the load harness's memory run (`benches/load/run.sh`):
//! opens `--conns` connections to a proxy, at most `--concurrency` being opened at once,
//! makes one HTTP/1.1 request on each (`--requests`) and reads the whole response, then
//! holds them all open without sending another byte, so the harness can read how much the
//! proxy's memory grew per connection.
//!
//! Prints `ready ok=N errors=E` on stdout once every connection has had its response, then
//! waits for stdin to close (or a signal). On stdin's end it prints `held=H closed=C`: of
//! the connections it held, how many the proxy had closed meanwhile (a figure read while
//! the proxy was closing them would be wrong), and exits.
//!
//! Usage: `bench_idle --addr 127.0.0.1:PORT [--tls] [--conns 10000] [--host localhost]`
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
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Connections being opened (connect, handshake, request) at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Requests made on each connection before it is left idle; 0 shows what a connection
    /// costs before any request.
    #[arg(long, default_value_t = 1)]
    requests: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = Target::new(args.addr, &args.host, args.tls)?;
    let req: Arc<[u8]> = bench_client::request(&args.host, &args.path).into();
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let requests = args.requests;
    let mut opening = JoinSet::new();
    for _ in 0..args.conns {
        let (target, req, gate) = (target.clone(), req.clone(), gate.clone());
        opening.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            open(&target, &req, requests).await
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

async fn open(target: &Target, req: &[u8], requests: u32) -> anyhow::Result<Stream> {
    let mut s = target.connect().await?;
    let mut buf = Vec::new();
    for _ in 0..requests {
        let status = bench_client::exchange(&mut s, req, &mut buf, Duration::from_secs(30)).await?;
        anyhow::ensure!(status == 200, "status {status}");
    }
    Ok(s)
}

/// Whether the peer has closed the connection: its socket reads end of stream or an error.
/// Anything the proxy sent meanwhile (TLS session tickets, a close_notify) is read and
/// dropped on the way, which is harmless as the connection is not used again.
fn is_closed(s: &Stream) -> bool {
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
