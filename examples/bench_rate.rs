//! Open-loop, fixed-rate HTTP/1.1 load for the load harness's latency run
//! (`benches/load/run.sh`): `--rate` requests per second in total over `--conns` keep-alive
//! connections, each connection sending on its own fixed schedule (rate ÷ conns per second,
//! the connections' schedules staggered evenly), one request at a time.
//!
//! Latency is counted from when a request was due, not from when it went out: if a response
//! is late, the requests due behind it on its connection go out late, and that wait counts
//! (coordinated omission corrected, as wrk2 does). Lateness of this client's own timer
//! (tokio's has a 1 ms grain) does not count: a request due while its connection was free
//! is timed from the moment it is sent.
//!
//! Prints one line: `sent=… ok=… errors=… rate=… p50_us=… p99_us=… p999_us=… max_us=…
//! lag_p99_us=…` (`rate`: requests sent per second, to check the client kept up with its
//! schedule; `lag_p99_us`: how late it sent requests due on a free connection, its own lag,
//! to check it had the CPU it needed), and the first error message on stderr.
//!
//! Usage: `bench_rate --addr 127.0.0.1:PORT --rate 20000 [--conns 64] [--duration 10] [--tls]`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::time::Instant;

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
    /// Requests per second, over all connections.
    #[arg(long)]
    rate: f64,
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
}

/// One connection's results.
#[derive(Default)]
struct Tally {
    sent: u64,
    errors: u64,
    latencies_us: Vec<u32>,
    /// How late this client sent the requests due while their connection was free: its own
    /// lag, which the latencies leave out. Large, it says this client was short of CPU, and
    /// then it was also late reading responses, which the latencies do count.
    lags_us: Vec<u32>,
    first_error: Option<String>,
}

/// A connection's fixed schedule: its first request is due at `first`, then every `every`,
/// until `end`.
#[derive(Clone, Copy)]
struct Schedule {
    first: Instant,
    every: Duration,
    end: Instant,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rate > 0.0 && args.conns > 0 && args.duration > 0.0,
        "rate, conns and duration must be > 0"
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = Target::new(args.addr, &args.host, args.tls)?;
    let req: Arc<[u8]> = bench_client::request(&args.host, &args.path).into();
    // Connected before the clock starts, so no request's latency includes a handshake.
    let mut streams = Vec::with_capacity(args.conns);
    for _ in 0..args.conns {
        streams.push(target.connect().await?);
    }
    let every = Duration::from_secs_f64(args.conns as f64 / args.rate);
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(args.duration);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, stream) in streams.into_iter().enumerate() {
        let first = start + every.mul_f64(i as f64 / args.conns as f64);
        let (target, req) = (target.clone(), req.clone());
        tasks.spawn(drive(target, req, stream, Schedule { first, every, end }));
    }
    let mut all = Tally::default();
    while let Some(t) = tasks.join_next().await {
        let t = t?;
        all.sent += t.sent;
        all.errors += t.errors;
        all.latencies_us.extend(t.latencies_us);
        all.lags_us.extend(t.lags_us);
        if all.first_error.is_none() {
            all.first_error = t.first_error;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    report(&mut all, elapsed);
    Ok(())
}

/// Sends on one connection by its schedule; a broken connection is counted as an error and
/// opened again for the next request.
async fn drive(target: Target, req: Arc<[u8]>, stream: Stream, plan: Schedule) -> Tally {
    let mut tally = Tally::default();
    let mut stream = Some(stream);
    let mut buf = Vec::with_capacity(4096);
    let mut due = plan.first;
    let mut last_done = Instant::now();
    while due < plan.end {
        tokio::time::sleep_until(due).await;
        let sent_at = Instant::now();
        // Due while the previous response was still awaited: the proxy's delay, counted from
        // when it was due. Due while the connection was free: our timer's delay, not counted.
        let from = if last_done > due {
            due
        } else {
            tally.lags_us.push(micros(sent_at - due));
            sent_at
        };
        tally.sent += 1;
        match send(&target, &mut stream, &req, &mut buf).await {
            Ok(()) => {
                tally.latencies_us.push(micros(from.elapsed()));
            }
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
                stream = None;
            }
        }
        last_done = Instant::now();
        due += plan.every;
    }
    tally
}

async fn send(
    target: &Target,
    stream: &mut Option<Stream>,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    if stream.is_none() {
        *stream = Some(target.connect().await.map_err(|e| format!("connect: {e}"))?);
    }
    let Some(s) = stream.as_mut() else { return Err("no connection".into()) };
    match bench_client::exchange(s, req, buf, Duration::from_secs(10)).await {
        Ok(200) => Ok(()),
        Ok(status) => Err(format!("status {status}")),
        Err(e) => Err(e.to_string()),
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Nearest rank: the smallest sample with at least `q` of all samples at or below it.
fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn report(all: &mut Tally, elapsed: f64) {
    all.latencies_us.sort_unstable();
    all.lags_us.sort_unstable();
    let lat = &all.latencies_us;
    println!(
        "sent={} ok={} errors={} rate={:.0} p50_us={} p99_us={} p999_us={} max_us={} lag_p99_us={}",
        all.sent,
        lat.len(),
        all.errors,
        all.sent as f64 / elapsed,
        percentile(lat, 0.5),
        percentile(lat, 0.99),
        percentile(lat, 0.999),
        lat.last().copied().unwrap_or(0),
        percentile(&all.lags_us, 0.99)
    );
    if let Some(e) = &all.first_error {
        eprintln!("bench_rate: first error: {e}");
    }
}
