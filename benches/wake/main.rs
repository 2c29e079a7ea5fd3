//! Proxy-added wake latency: how long after a woken machine starts accepting connections
//! tern forwards the requests it held for it, with 1, 100 and 1,000 requests waiting.
//!
//! A request to an app whose machines are all stopped is held while tern starts one, probes
//! its port (every ≤ 2 ms) and, once the port accepts, forwards every held request. The
//! machine's own boot time is the app's business; what tern adds on top of it is the gap
//! between the machine listening and each held request reaching it. That gap is measured
//! here, per request, as
//!
//! ```text
//! proxy-added = t_forwarded − t_listen
//! ```
//!
//! on the machine's side of the wire, so that no client-side or proxy-side clock is in the
//! measurement: `t_listen` is noted by the machine just after `listen(2)` returns, and
//! `t_forwarded` is the kernel's receive timestamp (`SO_TIMESTAMPNS`) of the request's first
//! bytes on the machine's socket, i.e. when tern's write reached the machine, however long
//! the machine then takes to read it. The time the machine's process takes to read each
//! request (`read`) is reported alongside: it adds the machine's own queueing, which is not
//! tern's.
//!
//! Each round is a fresh `tern serve` (release build, its own RIB in a temp dir, ports
//! picked by the kernel) with one app whose one machine is stopped and whose `cmd` is this
//! binary in backend mode (see `backend.rs`): a machine that takes a few hundred ms to
//! boot. The round opens N client connections, sends one request on each, waits until
//! tern's `tern_held_requests` gauge reads N (all held), and only counts the round if that
//! happened before the machine listened, so every counted request was waiting when the
//! machine came up. Then it reads every answer, stops tern with SIGTERM (which stops the
//! machine) and moves on. Percentiles are over every request of every round of a size.
//!
//! Run: `cargo bench --bench wake`. Settings, from the environment:
//!
//! - `WAKE_SIZES` (default `1,100,1000`): waiting requests per round.
//! - `WAKE_ROUNDS` (default 10): rounds per size; sizes below `WAKE_MIN_SAMPLES` (default
//!   100) requests get more rounds, so that even N = 1 has 100 samples.
//! - `WAKE_DELAY_MS` (default 200 + N/2): how long the machine sleeps before listening.
//! - `WAKE_BACKLOG` (default 1024, what tokio's `TcpListener::bind` uses): the machine's
//!   `listen(2)` backlog.
//! - `WAKE_WORKERS` (default 0: one per CPU): tern's `workers`.
//! - `WAKE_MAX_CONNECTING` (default: tern's own, 8): tern's `[limits] upstream_max_connecting`.
//! - `WAKE_DUMP=FILE`: also write every request's figures, per round, as CSV.
//! - `WAKE_DIRECT` = `herd` | `fifo` | `reuse:K`: no tern; reference points for what any
//!   proxy pays on this machine to release held requests, three ways (see `direct.rs`).
//! - `WAKE_ACCEPT_AFTER_MS` (default 0): a diagnostic; the machine accepts nothing for that
//!   long after listening, so it takes no CPU while tern forwards (needs `WAKE_BACKLOG` > N).

mod backend;
mod direct;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use backend::mono_ns;

/// The p99 goal for proxy-added wake latency, in ms.
const GOAL_P99_MS: f64 = 5.0;

struct Settings {
    sizes: Vec<usize>,
    rounds: usize,
    min_samples: usize,
    delay_ms: Option<u64>,
    backlog: u32,
    workers: usize,
    max_connecting: Option<usize>,
    accept_after_ms: u64,
    direct: Option<direct::Mode>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let sizes = env_or("WAKE_SIZES", "1,100,1000".to_string())?
            .split(',')
            .map(|s| s.trim().parse::<usize>().context("WAKE_SIZES"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let delay = env_or("WAKE_DELAY_MS", 0u64)?;
        Ok(Settings {
            sizes,
            rounds: env_or("WAKE_ROUNDS", 10)?,
            min_samples: env_or("WAKE_MIN_SAMPLES", 100)?,
            delay_ms: (delay > 0).then_some(delay),
            backlog: env_or("WAKE_BACKLOG", 1024)?,
            workers: env_or("WAKE_WORKERS", 0)?,
            max_connecting: match std::env::var("WAKE_MAX_CONNECTING") {
                Ok(v) => Some(v.trim().parse().context("WAKE_MAX_CONNECTING")?),
                Err(_) => None,
            },
            accept_after_ms: env_or("WAKE_ACCEPT_AFTER_MS", 0)?,
            direct: match std::env::var("WAKE_DIRECT") {
                Ok(m) => Some(m.parse()?),
                Err(_) => None,
            },
        })
    }

    fn rounds_for(&self, n: usize) -> usize {
        self.rounds.max(self.min_samples.div_ceil(n.max(1)))
    }

    fn delay_for(&self, n: usize) -> u64 {
        self.delay_ms.unwrap_or(200 + n as u64 / 2)
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("backend") {
        return backend::main(&args[1..]);
    }
    let settings = Settings::from_env()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run(&settings))
}

async fn run(settings: &Settings) -> anyhow::Result<()> {
    let tern = PathBuf::from(env!("CARGO_BIN_EXE_tern"));
    let me = std::env::current_exe()?;
    let mut summaries = Vec::new();
    let mut dump = match std::env::var_os("WAKE_DUMP") {
        Some(path) => {
            let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
            writeln!(f, "n,round,forwarded_ms,read_ms")?;
            Some(f)
        }
        None => None,
    };
    for &n in &settings.sizes {
        let rounds = settings.rounds_for(n);
        let mut all = Vec::new();
        let mut skipped = 0;
        for r in 1..=rounds {
            let round =
                one_round(n, settings, &tern, &me).await.with_context(|| format!("N={n} round {r}"))?;
            eprintln!("N={n:<5} round {r:>3}/{rounds}: {}", round.line());
            if let Some(dump) = &mut dump {
                for (f, rd) in round.forwarded_ms.iter().zip(&round.read_ms) {
                    writeln!(dump, "{n},{r},{f:.4},{rd:.4}")?;
                }
            }
            if round.valid() {
                all.push(round);
            } else {
                skipped += 1;
            }
        }
        summaries.push(Summary::of(n, &all, skipped));
    }
    print_tables(settings, &summaries);
    Ok(())
}

/// What one round saw. Times are `CLOCK_MONOTONIC` ns unless named `_ms`.
struct Round {
    first_sent: i64,
    all_held: i64,
    boot: i64,
    listen: i64,
    /// When the machine accepted its first connection: tern's readiness probe.
    probed: i64,
    all_answered: i64,
    /// Per request: t_forwarded − t_listen (kernel timestamp), ms.
    forwarded_ms: Vec<f64>,
    /// Per request: when the machine's process had read the head − t_listen, ms.
    read_ms: Vec<f64>,
    /// Requests the kernel gave no receive timestamp for (counted by `read` instead).
    unstamped: usize,
    /// New connections tern opened to the machine, and their mean connect time (tern's
    /// `tern_upstream_connect_duration_seconds`, which includes the HTTP/1.1 handshake setup).
    upstream_connects: usize,
    upstream_connect_mean_ms: f64,
    /// CPU time from the machine listening to all answered, ms: tern, the machine, this
    /// process (the clients).
    cpu_ms: Option<[f64; 3]>,
}

impl Round {
    /// Counted only if every request was held before the machine listened.
    fn valid(&self) -> bool {
        self.all_held < self.listen
    }

    fn line(&self) -> String {
        let ms = |t: i64| (t - self.first_sent) as f64 / 1e6;
        let mut f = self.forwarded_ms.clone();
        f.sort_by(f64::total_cmp);
        format!(
            "held all {:>6.1} ms, listening {:>6.1} ms, all answered {:>6.1} ms after the first request; \
             probed {:.3} ms after listening, forwarded min {:.3} p50 {:.3} p99 {:.3} max {:.3} ms; \
             {} upstream connects, mean {:.3} ms{}{}{}",
            ms(self.all_held),
            ms(self.listen),
            ms(self.all_answered),
            (self.probed - self.listen) as f64 / 1e6,
            f.first().copied().unwrap_or(f64::NAN),
            pct(&f, 0.50),
            pct(&f, 0.99),
            f.last().copied().unwrap_or(f64::NAN),
            self.upstream_connects,
            self.upstream_connect_mean_ms,
            self.cpu_ms.map_or(String::new(), |[t, m, c]| format!(
                "; CPU from listening to all answered: tern {t:.1} ms, machine {m:.1} ms, clients {c:.1} ms"
            )),
            if self.unstamped > 0 {
                format!(" ({} without kernel timestamp)", self.unstamped)
            } else {
                String::new()
            },
            if self.valid() { "" } else { "  NOT COUNTED: the machine listened before all were held" },
        )
    }
}

/// The machine's command line: this binary in backend mode.
fn backend_cmd(me: &Path, port: u16, n: usize, s: &Settings) -> [String; 6] {
    [
        me.display().to_string(),
        "backend".into(),
        format!("127.0.0.1:{port}"),
        s.delay_for(n).to_string(),
        s.backlog.to_string(),
        s.accept_after_ms.to_string(),
    ]
}

async fn one_round(n: usize, s: &Settings, tern: &Path, me: &Path) -> anyhow::Result<Round> {
    if let Some(mode) = s.direct {
        return direct::round(mode, n, s, me).await;
    }
    let dir = tempfile::tempdir()?;
    let (_held, port) = free_port()?;
    let config = dir.path().join("tern.toml");
    let decl = dir.path().join("decl.toml");
    std::fs::write(&config, node_config(dir.path(), s.workers, s.max_connecting))?;
    std::fs::write(&decl, declaration(port, n, &backend_cmd(me, port, n, s)))?;
    let applied = Command::new(tern).arg("apply").arg("-c").arg(&config).arg(&decl).output().await?;
    if !applied.status.success() {
        bail!("tern apply failed: {}", String::from_utf8_lossy(&applied.stderr));
    }
    let mut serve = Serve::start(tern, &config).await?;
    let (http, admin, pid) = (serve.http, serve.admin, serve.child.id().unwrap_or(0));
    let outcome = async move {
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..n {
            requests.spawn(request(http));
        }
        let all_held = wait_held(admin, n).await?;
        // CPU use is sampled every millisecond until the first answer, so that what was
        // used from the moment the machine listened can be told apart from its boot.
        let procs = [pid, children(pid).first().copied().unwrap_or(0), std::process::id()];
        let answering = Arc::new(AtomicBool::new(false));
        let sampler = tokio::spawn(sample_cpu(procs, answering.clone()));
        let mut answers = Vec::with_capacity(n);
        while let Some(r) = requests.join_next().await {
            answering.store(true, Ordering::Relaxed);
            answers.push(r??);
        }
        let end = procs.map(cpu_ns);
        let samples = sampler.await?;
        let listen = answers.first().map_or(0, |a| a.listen_mono);
        let at_listen = samples.iter().rev().find(|(t, _)| *t <= listen).map(|(_, c)| *c);
        let cpu = at_listen.map(|c| [0, 1, 2].map(|i| (end[i] - c[i]) as f64 / 1e6));
        let metrics = http_get(admin, "/metrics").await?;
        anyhow::Ok((all_held, answers, metrics, cpu))
    }
    .await;
    // Stopped gracefully even when the round failed, so tern stops the machine's process.
    let stopped = serve.stop().await;
    let (all_held, answers, metrics, cpu) = outcome?;
    stopped?;
    drop(dir);
    let mut round = Round::from_answers(n, all_held, &answers)?;
    round.cpu_ms = cpu;
    let sum = metric(&metrics, "tern_upstream_connect_duration_seconds_sum");
    let count = metric(&metrics, "tern_upstream_connect_duration_seconds_count");
    round.upstream_connects = count as usize;
    round.upstream_connect_mean_ms = if count > 0.0 { sum / count * 1e3 } else { f64::NAN };
    Ok(round)
}

impl Round {
    fn from_answers(n: usize, all_held: i64, answers: &[Answer]) -> anyhow::Result<Round> {
        let first = answers.first().context("no answers")?;
        let (boot, listen, listen_real) = (first.boot, first.listen_mono, first.listen_real);
        let mut round = Round {
            first_sent: answers.iter().map(|a| a.sent).min().unwrap_or(0),
            all_held,
            boot,
            listen,
            probed: answers.iter().map(|a| a.first_accept).min().unwrap_or(0),
            all_answered: answers.iter().map(|a| a.answered).max().unwrap_or(0),
            forwarded_ms: Vec::with_capacity(n),
            read_ms: Vec::with_capacity(n),
            unstamped: 0,
            upstream_connects: 0,
            upstream_connect_mean_ms: f64::NAN,
            cpu_ms: None,
        };
        for a in answers {
            if a.listen_mono != listen {
                bail!("answers from two different machine processes");
            }
            let read = (a.read_mono - listen) as f64 / 1e6;
            round.read_ms.push(read);
            if a.kernel_real == 0 {
                round.unstamped += 1;
                round.forwarded_ms.push(read);
            } else {
                round.forwarded_ms.push((a.kernel_real - listen_real) as f64 / 1e6);
            }
        }
        Ok(round)
    }
}

/// One answered request: when the client sent and got it, and what the machine reported.
struct Answer {
    sent: i64,
    answered: i64,
    boot: i64,
    listen_mono: i64,
    listen_real: i64,
    kernel_real: i64,
    read_mono: i64,
    first_accept: i64,
}

/// One request on its own connection, through tern; the connection closes after it.
async fn request(addr: SocketAddr) -> anyhow::Result<Answer> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: wake.test\r\nconnection: close\r\n\r\n").await?;
    let sent = mono_ns();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    parse_answer(sent, mono_ns(), &buf)
}

fn parse_answer(sent: i64, answered: i64, buf: &[u8]) -> anyhow::Result<Answer> {
    let text = String::from_utf8_lossy(buf);
    if !text.starts_with("HTTP/1.1 200") {
        bail!("tern answered: {}", text.lines().take(12).collect::<Vec<_>>().join(" | "));
    }
    let line =
        text.split("wake-bench ").nth(1).and_then(|l| l.lines().next()).context("no wake-bench line")?;
    let v: Vec<i64> = line.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
    let [boot, listen_mono, listen_real, kernel_real, read_mono, first_accept] = v[..] else {
        bail!("malformed wake-bench line {line:?}");
    };
    Ok(Answer { sent, answered, boot, listen_mono, listen_real, kernel_real, read_mono, first_accept })
}

/// Polls tern's admin `/metrics` until `tern_held_requests` reads `n`; returns when it did.
async fn wait_held(admin: SocketAddr, n: usize) -> anyhow::Result<i64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = http_get(admin, "/metrics").await?;
        let held = metric(&metrics, "tern_held_requests");
        if held >= n as f64 {
            return Ok(mono_ns());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("tern held {held} of {n} requests after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// (when, CPU used so far by each of `procs`) every millisecond, until `stop`.
async fn sample_cpu(procs: [u32; 3], stop: Arc<AtomicBool>) -> Vec<(i64, [i64; 3])> {
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        samples.push((mono_ns(), procs.map(cpu_ns)));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    samples
}

/// CPU time a process's threads have used so far, ns (0 if it is gone).
fn cpu_ns(pid: u32) -> i64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<i64>().ok())
        .sum()
}

/// A process's children.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// A sample's value in Prometheus text (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}

/// A port for the machine tern will start, held by the returned socket (bound, never
/// listening) until the round ends: releasing it before the machine binds would let another
/// process take it. The machine binds with SO_REUSEPORT to share it (same user, both set).
fn free_port() -> std::io::Result<(socket2::Socket, u16)> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    let port = socket.local_addr()?.as_socket().map_or(0, |a| a.port());
    Ok((socket, port))
}

fn node_config(dir: &Path, workers: usize, max_connecting: Option<usize>) -> String {
    let limits =
        max_connecting.map_or(String::new(), |n| format!("\n[limits]\nupstream_max_connecting = {n}\n"));
    format!(
        "region = \"bench\"\nworkers = {workers}\n\n[[listen]]\naddr = \"127.0.0.1:0\"\n\n\
         [admin]\naddr = \"127.0.0.1:0\"\n\n[rib]\npath = \"{}\"\n\n\
         [driver]\nkind = \"process\"\nlog_dir = \"{}\"\n\n\
         [log]\nformat = \"json\"\nlevel = \"info\"\naccess = false\n{limits}",
        dir.join("tern.db").display(),
        dir.join("machine-logs").display(),
    )
}

fn declaration(port: u16, n: usize, cmd: &[String]) -> String {
    let cmd: Vec<String> = cmd.iter().map(|c| format!("{c:?}")).collect();
    format!(
        "[[apps]]\nname = \"wake\"\nhostnames = [\"wake.test\"]\nmax_pending = {}\nwake_timeout = \"30s\"\n\
         kill_timeout = \"1s\"\n\n\
         [[machines]]\nid = \"wake-1\"\napp = \"wake\"\nregion = \"bench\"\naddr = \"127.0.0.1:{port}\"\n\
         state = \"stopped\"\ncmd = [{}]\n",
        (2 * n).max(2000),
        cmd.join(", ")
    )
}

/// A running `tern serve`, with the addresses it reported.
struct Serve {
    child: Child,
    http: SocketAddr,
    admin: SocketAddr,
}

impl Serve {
    async fn start(tern: &Path, config: &Path) -> anyhow::Result<Serve> {
        let mut child = Command::new(tern)
            .arg("serve")
            .arg("-c")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Reads every line (so the log pipe never fills), passes on the addresses, and
        // shows warnings.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    eprintln!("tern: {line}");
                    continue;
                };
                if v["message"] == "listening" {
                    let addr = v["addr"].as_str().and_then(|a| a.parse::<SocketAddr>().ok());
                    let _ = tx.send((v["admin"].as_bool() == Some(true), addr));
                } else if matches!(v["level"].as_str(), Some("WARN" | "ERROR")) {
                    eprintln!("tern: {line}");
                }
            }
        });
        let (mut http, mut admin) = (None, None);
        while http.is_none() || admin.is_none() {
            let (is_admin, addr) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .context("tern serve did not report its addresses")?
                .context("tern serve exited")?;
            if is_admin { admin = addr } else { http = addr }
        }
        Ok(Serve { child, http: http.context("http")?, admin: admin.context("admin")? })
    }

    /// SIGTERM, as an operator would: tern drains and stops the machine it started.
    async fn stop(&mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("tern exited early")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let Ok(status) = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await else {
            self.child.kill().await?;
            bail!("tern serve did not stop within 30 s of SIGTERM");
        };
        let status = status?;
        if !status.success() {
            bail!("tern serve exited with {status}");
        }
        Ok(())
    }
}

fn delays(s: &Settings) -> String {
    match s.delay_ms {
        Some(ms) => format!("{ms} ms"),
        None => "200 ms + N/2 ms".into(),
    }
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    pct(&v, 0.5)
}

/// Every counted round of one size, summed up.
struct Summary {
    n: usize,
    rounds: usize,
    skipped: usize,
    unstamped: usize,
    forwarded: Vec<f64>,
    read: Vec<f64>,
    /// Each round's own p99, sorted: how much the rounds differ.
    round_p99s: Vec<f64>,
    /// Medians over rounds, ms: first request sent → machine process running, → machine
    /// listening, → all answered; machine listening → last request forwarded.
    spawn_ms: f64,
    listen_ms: f64,
    /// Median over rounds: machine listening → tern's probe connected, ms.
    probed_ms: f64,
    last_forwarded_ms: f64,
    total_ms: f64,
    /// Medians over rounds of the CPU used from the machine listening to all answered, ms:
    /// tern, the machine, the clients (this process).
    cpu_ms: [f64; 3],
}

impl Summary {
    fn of(n: usize, rounds: &[Round], skipped: usize) -> Summary {
        let mut forwarded: Vec<f64> = rounds.iter().flat_map(|r| r.forwarded_ms.iter().copied()).collect();
        let mut read: Vec<f64> = rounds.iter().flat_map(|r| r.read_ms.iter().copied()).collect();
        forwarded.sort_by(f64::total_cmp);
        read.sort_by(f64::total_cmp);
        let per_round = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
        let mut round_p99s: Vec<f64> = rounds
            .iter()
            .map(|r| {
                let mut f = r.forwarded_ms.clone();
                f.sort_by(f64::total_cmp);
                pct(&f, 0.99)
            })
            .collect();
        round_p99s.sort_by(f64::total_cmp);
        Summary {
            n,
            rounds: rounds.len(),
            skipped,
            unstamped: rounds.iter().map(|r| r.unstamped).sum(),
            forwarded,
            read,
            round_p99s,
            spawn_ms: per_round(&|r| (r.boot - r.first_sent) as f64 / 1e6),
            listen_ms: per_round(&|r| (r.listen - r.first_sent) as f64 / 1e6),
            probed_ms: per_round(&|r| (r.probed - r.listen) as f64 / 1e6),
            last_forwarded_ms: per_round(&|r| r.forwarded_ms.iter().copied().fold(f64::NAN, f64::max)),
            total_ms: per_round(&|r| (r.all_answered - r.first_sent) as f64 / 1e6),
            cpu_ms: [0, 1, 2].map(|i| per_round(&|r| r.cpu_ms.map_or(f64::NAN, |c| c[i]))),
        }
    }
}

fn print_tables(s: &Settings, summaries: &[Summary]) {
    let cores = std::thread::available_parallelism().map_or(0, |c| c.get());
    println!();
    let what = match s.direct {
        Some(mode) => format!("Reference point, {mode}"),
        None => format!(
            "tern, workers = {}",
            if s.workers == 0 { "one per CPU".to_string() } else { s.workers.to_string() }
        ),
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    println!(
        "Wake latency added between the machine listening and each held request reaching it. {what}; \
         {cores} cores (load average {load} at the end); machine listen backlog {}{}:",
        s.backlog,
        if s.accept_after_ms > 0 {
            format!("; the machine accepts nothing for {} ms after listening", s.accept_after_ms)
        } else {
            String::new()
        },
    );
    println!();
    println!(
        "| waiting requests | rounds | samples | p50 ms | p99 ms | max ms | p99 ≤ {GOAL_P99_MS} ms | \
         one round's p99: best / median / worst |"
    );
    println!("|---:|---:|---:|---:|---:|---:|:---:|---:|");
    for x in summaries {
        let p99 = pct(&x.forwarded, 0.99);
        println!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {:.2} / {:.2} / {:.2} |",
            x.n,
            x.rounds,
            x.forwarded.len(),
            pct(&x.forwarded, 0.50),
            p99,
            x.forwarded.last().copied().unwrap_or(f64::NAN),
            if p99 <= GOAL_P99_MS { "yes" } else { "**no**" },
            x.round_p99s.first().copied().unwrap_or(f64::NAN),
            pct(&x.round_p99s, 0.5),
            x.round_p99s.last().copied().unwrap_or(f64::NAN),
        );
    }
    println!();
    print_context(s, summaries);
}

fn print_context(s: &Settings, summaries: &[Summary]) {
    println!("The whole wake, medians over rounds, ms (the machine sleeps {} before it listens):", delays(s));
    println!();
    println!(
        "| waiting requests | first request → machine process running | → machine listening | → all answered | \
         listening → tern's probe connected | listening → last forwarded | machine's own read p50 / p99 | \
         CPU from listening to all answered: tern / machine / clients |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for x in summaries {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} / {:.2} | {} |",
            x.n,
            x.spawn_ms,
            x.listen_ms,
            x.total_ms,
            x.probed_ms,
            x.last_forwarded_ms,
            pct(&x.read, 0.50),
            pct(&x.read, 0.99),
            if x.cpu_ms.iter().any(|c| c.is_nan()) {
                "–".to_string()
            } else {
                format!("{:.1} / {:.1} / {:.1}", x.cpu_ms[0], x.cpu_ms[1], x.cpu_ms[2])
            },
        );
    }
    for x in summaries {
        if x.skipped > 0 {
            println!(
                "\nN={}: {} round(s) not counted (the machine listened before all were held)",
                x.n, x.skipped
            );
        }
        if x.unstamped > 0 {
            println!(
                "\nN={}: {} request(s) had no kernel timestamp; their read time was used",
                x.n, x.unstamped
            );
        }
    }
}
