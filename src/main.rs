//! The `tern` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use tern::config::{Config, LogFormat, RibKind, Source};
use tern::listener::inherit::Inherited;
use tern::model::session_key::{SessionKeyRow, parse_id};
use tern::proxy::{self, Bound};
use tern::rib::corrosion::CorrosionRib;
use tern::rib::etcd::EtcdRib;
use tern::rib::sqlite::{Existing, SqliteRib, Store, open_existing};
use tern::rib::{Liveness, Rib, Table};

// A proxy allocates and frees small buffers and headers for every request, on every worker
// thread at once; mimalloc's thread-local free lists serve that pattern better than glibc's.
// Built without transparent huge pages (Cargo.toml) and asked to give memory back once
// connections go quiet (`tern::alloc`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "An edge HTTP/TLS reverse proxy for apps whose machines sleep, stream and move"
)]
struct Cli {
    /// Node config file [default: ./tern.toml, or the embedded default if it does not exist]
    #[arg(short = 'c', long = "config", global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy
    Serve,
    /// Write the apps, machines and certificates DECL declares into the RIB
    Apply {
        /// Declaration file (TOML)
        decl: PathBuf,
        /// Also delete every app, machine and certificate DECL does not name
        #[arg(long)]
        prune: bool,
        /// Check and print what would change, without writing
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate the node config and, if given, a declaration; print the first problem
    Check {
        /// Declaration file (TOML)
        decl: Option<PathBuf>,
    },
    /// Print the apps, machines and certificates in the RIB
    Status,
    /// Hand the running tern's listening sockets to a fresh process, then drain the old one
    Upgrade {
        /// The binary to start [default: the running tern's own path, as it reads now]
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// The running tern's admin address [default: the config's `[admin] addr`]
        #[arg(long, value_name = "ADDR")]
        admin: Option<std::net::SocketAddr>,
    },
    /// Drain the running tern: /healthz 503 for drain_delay, end exchanges over drain_window, exit
    Drain {
        /// Return once the drain has begun instead of waiting for the process to exit
        #[arg(long)]
        no_wait: bool,
        /// The running tern's admin address [default: the config's `[admin] addr`]
        #[arg(long, value_name = "ADDR")]
        admin: Option<std::net::SocketAddr>,
    },
    /// Rotate or list the keys session tokens are sealed with (kept in the RIB)
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Add a key that seals every new token; the others keep opening tokens for GRACE
    Rotate {
        /// How long tokens sealed under the previous keys keep opening ("24h", "30m", "0s")
        #[arg(long, default_value = "24h", value_name = "DUR", value_parser = tern::duration::parse)]
        grace: std::time::Duration,
    },
    /// Print each key's id, when it was made and when it stops opening tokens (never its secret)
    List,
}

fn main() -> ExitCode {
    // Before any thread starts: taking passed sockets clears their environment variables.
    let inherited = tern::listener::inherit::Inherited::from_env();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve => serve(cli.config.as_deref(), inherited),
        Command::Upgrade { binary, admin } => upgrade(cli.config.as_deref(), admin, binary),
        Command::Drain { no_wait, admin } => drain(cli.config.as_deref(), admin, no_wait),
        Command::Apply { decl, prune, dry_run } => apply(cli.config.as_deref(), &decl, prune, dry_run),
        Command::Check { decl } => check(cli.config.as_deref(), decl.as_deref()),
        Command::Status => status(cli.config.as_deref()),
        Command::Keys { command: KeysCommand::Rotate { grace } } => rotate_keys(cli.config.as_deref(), grace),
        Command::Keys { command: KeysCommand::List } => list_keys(cli.config.as_deref()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<&Path>) -> anyhow::Result<(Config, Source)> {
    Ok(Config::load(path)?)
}

fn serve(config_path: Option<&Path>, mut inherited: Inherited) -> anyhow::Result<ExitCode> {
    let (config, source) = load_config(config_path)?;
    let _logs = tern::telemetry::init_logging(config.log.format == LogFormat::Json, &config.log.level);
    match &source {
        Source::File(p) => tracing::info!(target: "tern::proxy", config = %p.display(), "config loaded"),
        Source::Embedded => tracing::info!(target: "tern::proxy", "no tern.toml: using the embedded default"),
    }
    // The control thread: admin, and orchestrating start, upgrade, drain and stop. Workers,
    // the catalog and the lifecycle manager have runtimes of their own.
    let parking = tern::watchdog::Parking::default();
    let runtime = parking
        .install(tokio::runtime::Builder::new_current_thread().enable_all())
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let bound = Bound::bind_inheriting(&config, &mut inherited)?;
        let rib = open_rib(&config)?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            let _ = stop_tx.send(true);
        });
        proxy::run(config, bound, rib, stop_rx, parking).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!(target: "tern::proxy", "cannot install signal handlers; stop tern with SIGKILL");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(target: "tern::proxy", signal = name, "signal received");
}

/// `tern upgrade`: asks the running tern (at the config's admin address) to start a
/// successor on its sockets; it answers once the successor serves.
fn upgrade(
    config_path: Option<&Path>,
    admin: Option<std::net::SocketAddr>,
    binary: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let admin = admin_addr(config_path, admin)?;
    let binary = match binary {
        Some(b) => Some(std::fs::canonicalize(&b).with_context(|| format!("{}", b.display()))?),
        None => None,
    };
    let body = serde_json::json!({ "binary": binary }).to_string();
    let (status, answer) = admin_post(admin, "/v1/upgrade", &body)?;
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or(serde_json::Value::Null);
    if status != 200 {
        let why = v.get("error").and_then(|e| e.as_str()).unwrap_or(answer.trim());
        eprintln!("tern: upgrade failed ({status}): {why}; the running tern keeps serving");
        return Ok(ExitCode::FAILURE);
    }
    let (old, new) =
        (v.get("previous").cloned().unwrap_or_default(), v.get("pid").cloned().unwrap_or_default());
    println!("tern pid {new} serves on the listening sockets now; pid {old} drains and exits");
    Ok(ExitCode::SUCCESS)
}

/// `tern drain`: asks the running tern to drain and stop, and (unless `no_wait`) waits for
/// it to exit.
fn drain(
    config_path: Option<&Path>,
    admin: Option<std::net::SocketAddr>,
    no_wait: bool,
) -> anyhow::Result<ExitCode> {
    let (status, answer) = admin_post(admin_addr(config_path, admin)?, "/v1/drain", "")?;
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or(serde_json::Value::Null);
    if status != 200 {
        eprintln!("tern: drain refused ({status}): {}", answer.trim());
        return Ok(ExitCode::FAILURE);
    }
    let pid = v.get("pid").and_then(serde_json::Value::as_u64).unwrap_or(0);
    println!("tern pid {pid} is draining: /healthz says 503, then its exchanges end and it exits");
    if no_wait || pid == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    let proc = PathBuf::from(format!("/proc/{pid}"));
    while proc.exists() && !is_zombie(&proc) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    println!("tern pid {pid} has exited");
    Ok(ExitCode::SUCCESS)
}

fn is_zombie(proc: &Path) -> bool {
    std::fs::read_to_string(proc.join("stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().starts_with('Z')))
        .unwrap_or(true)
}

/// `--admin`, else the config's admin address (which must name a port).
fn admin_addr(
    config_path: Option<&Path>,
    given: Option<std::net::SocketAddr>,
) -> anyhow::Result<std::net::SocketAddr> {
    if let Some(a) = given {
        return Ok(a);
    }
    let (config, _) = load_config(config_path)?;
    anyhow::ensure!(
        config.admin.addr.port() != 0,
        "the config's admin address has port 0; name the running tern's with --admin ADDR"
    );
    Ok(config.admin.addr)
}

/// A POST to the admin address over plain HTTP/1.1: (status, body).
fn admin_post(addr: std::net::SocketAddr, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
        .with_context(|| format!("cannot reach the running tern's admin address {addr}; is it running?"))?;
    // An upgrade answers once the new process serves (it may load a large catalog first).
    conn.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).context("reading the admin answer")?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, rest.to_string()))
}

/// The RIB the config names, for following and for the writes nodes make.
fn open_rib(config: &Config) -> anyhow::Result<Arc<dyn Rib>> {
    Ok(match config.rib.kind {
        RibKind::Sqlite => Arc::new(
            SqliteRib::open(&config.rib.path, config.rib.poll_interval)
                .with_context(|| format!("opening the RIB at {}", config.rib.path.display()))?,
        ),
        RibKind::Etcd => Arc::new(etcd_rib(config)?),
        RibKind::Corrosion => Arc::new(corrosion_rib(config)?),
    })
}

fn liveness(config: &Config) -> Liveness {
    Liveness { probe_after: config.rib.probe_after, probe_timeout: config.rib.probe_timeout }
}

fn etcd_rib(config: &Config) -> anyhow::Result<EtcdRib> {
    Ok(EtcdRib::new(&config.rib.endpoints, &config.rib.prefix, liveness(config))?)
}

fn corrosion_rib(config: &Config) -> anyhow::Result<CorrosionRib> {
    Ok(CorrosionRib::new(&config.rib.url, liveness(config))?)
}

/// How the RIB is named in what tern prints.
fn rib_name(config: &Config) -> String {
    match config.rib.kind {
        RibKind::Sqlite => config.rib.path.display().to_string(),
        RibKind::Etcd => format!("etcd {} {}", config.rib.endpoints.join(","), config.rib.prefix),
        RibKind::Corrosion => format!("corrosion {}", config.rib.url),
    }
}

/// Every row of `table`, from whichever RIB the config names.
fn read_table(config: &Config, table: Table) -> anyhow::Result<Vec<tern::rib::Record>> {
    Ok(match config.rib.kind {
        RibKind::Sqlite => Store::open(&config.rib.path)
            .with_context(|| format!("opening the RIB at {}", config.rib.path.display()))?
            .read_all(table)?,
        RibKind::Etcd => etcd_rib(config)?.read_all(table)?,
        RibKind::Corrosion => corrosion_rib(config)?.read_all(table)?,
    })
}

fn apply(
    config_path: Option<&Path>,
    decl_path: &Path,
    prune: bool,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let (config, _) = load_config(config_path)?;
    let decl = match tern::decl::load(decl_path) {
        Ok(d) => d,
        Err(problem) => {
            eprintln!("{problem}");
            eprintln!("tern: nothing was applied");
            return Ok(ExitCode::FAILURE);
        }
    };
    let applied = match config.rib.kind {
        RibKind::Sqlite => {
            let mut store = Store::open(&config.rib.path)
                .with_context(|| format!("opening the RIB at {}", config.rib.path.display()))?;
            tern::decl::apply(&mut store, &decl, prune, dry_run)
        }
        RibKind::Etcd => tern::rib::etcd::apply::apply(&etcd_rib(&config)?, &decl, prune, dry_run),
        RibKind::Corrosion => {
            tern::rib::corrosion::apply::apply(&corrosion_rib(&config)?, &decl, prune, dry_run)
        }
    };
    match applied {
        Ok(plan) => {
            println!("{plan}");
            if dry_run {
                println!("(dry run: nothing was written)");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            match e {
                // A conflict names the declaration's file, line and field itself.
                tern::decl::PlanError::Conflict(problem) => eprintln!("{problem}"),
                other => eprintln!("{}: {other}", decl_path.display()),
            }
            eprintln!("tern: nothing was applied");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn check(config_path: Option<&Path>, decl_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let (config, source) = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    match source {
        Source::File(p) => {
            println!("{}: ok (region {}, {} listeners)", p.display(), config.region, config.listen.len())
        }
        Source::Embedded => println!("embedded default config: ok"),
    }
    let decl = match decl_path.map(tern::decl::load).transpose() {
        Ok(d) => d,
        Err(problem) => {
            eprintln!("{problem}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if let (Some(path), Some(d)) = (decl_path, &decl) {
        let (apps, machines, certs) = (d.apps.len(), d.machines.len(), d.certificates.len());
        // Orgs only where there are some: a declaration without them reads as before.
        let orgs = if d.orgs.is_empty() { String::new() } else { format!("{} orgs, ", d.orgs.len()) };
        println!("{}: ok ({orgs}{apps} apps, {machines} machines, {certs} certificates)", path.display());
    }
    match config.rib.kind {
        RibKind::Sqlite => {}
        RibKind::Etcd => {
            let rib = etcd_rib(&config)?;
            let count = || rib.read_all(Table::Apps).map(|rows| rows.len());
            let plan = |d: &tern::decl::Declaration| tern::rib::etcd::apply::apply(&rib, d, false, true);
            return Ok(check_remote(&rib_name(&config), decl.as_ref(), count, plan));
        }
        RibKind::Corrosion => {
            let rib = corrosion_rib(&config)?;
            let count = || rib.read_all(Table::Apps).map(|rows| rows.len());
            let plan = |d: &tern::decl::Declaration| tern::rib::corrosion::apply::apply(&rib, d, false, true);
            return Ok(check_remote(&rib_name(&config), decl.as_ref(), count, plan));
        }
    }
    // What `apply` would refuse only because of what the RIB holds: the same plan, read-only.
    let rib_path = config.rib.path.display();
    let rib = match open_existing(&config.rib.path) {
        Ok(Existing::Present(rib)) => rib,
        Ok(Existing::Absent(why)) => {
            let alone = if decl.is_some() { "; the declaration was checked on its own" } else { "" };
            println!("RIB {rib_path}: not looked at: {why} (tern apply or tern serve creates it){alone}");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => {
            eprintln!("tern: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let Some(d) = decl else {
        let count = |t: Table| rib.all(t).map_or(0, |rows| rows.len());
        let (apps, machines) = (count(Table::Apps), count(Table::Machines));
        println!("RIB {rib_path}: ok ({apps} apps, {machines} machines)");
        return Ok(ExitCode::SUCCESS);
    };
    match tern::decl::dry_run(&rib, &d, false) {
        Ok(plan) => {
            println!("against the RIB {rib_path}, tern apply (without --prune) would make:\n{plan}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            eprintln!("tern: tern apply would refuse this declaration against the RIB {rib_path}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `tern check` against a networked store (etcd, Corrosion): it answers, and the declaration
/// plans against it as `apply` would (nothing is written).
fn check_remote(
    name: &str,
    decl: Option<&tern::decl::Declaration>,
    count_apps: impl FnOnce() -> Result<usize, tern::rib::RibError>,
    dry_run: impl FnOnce(&tern::decl::Declaration) -> Result<tern::decl::Plan, tern::decl::PlanError>,
) -> ExitCode {
    let apps = match count_apps() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("tern: RIB {name}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(d) = decl else {
        println!("RIB {name}: ok ({apps} apps)");
        return ExitCode::SUCCESS;
    };
    match dry_run(d) {
        Ok(plan) => {
            println!("against the RIB {name}, tern apply (without --prune) would make:\n{plan}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            eprintln!("tern: tern apply would refuse this declaration against the RIB {name}");
            ExitCode::FAILURE
        }
    }
}

fn status(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let (config, _) = load_config(config_path)?;
    println!("RIB {}", rib_name(&config));
    for t in Table::ALL {
        let rows = read_table(&config, t)?;
        println!("{} ({}):", t.as_str(), rows.len());
        for r in rows {
            let summary = summarize(t, &r.body);
            println!("  {:<24} {summary}", r.key);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn summarize(table: Table, body: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else { return "(does not decode)".into() };
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    // A list of strings, space-separated.
    let list = |k: &str| {
        let items: Vec<&str> = v
            .get(k)
            .and_then(|h| h.as_array())
            .map_or(Vec::new(), |a| a.iter().filter_map(|x| x.as_str()).collect());
        items.join(" ")
    };
    match table {
        Table::Apps => {
            // Private and dedicated addresses, where the app has them.
            let mut line = list("hostnames");
            for (label, key) in [("private", "private_addrs"), ("addrs", "addrs")] {
                let addrs = list(key);
                if !addrs.is_empty() {
                    line += &format!(" {label}: {addrs}");
                }
            }
            line.trim_start().to_string()
        }
        Table::Machines => format!("{} {} {} {}", s("app"), s("state"), s("addr"), s("region")),
        Table::Certificates => String::new(),
        Table::SessionKeys => key_summary(body, tern::clock::unix_ms()),
        Table::MachineStates => {
            let version = v.get("version").and_then(serde_json::Value::as_u64).unwrap_or(0);
            format!("{} v{version} {} {}", s("state"), s("reason"), s("node"))
        }
        Table::Nodes => {
            let beat = v.get("beat_ms").and_then(serde_json::Value::as_i64).unwrap_or(0);
            let ago = (tern::clock::unix_ms() - beat).max(0) as f64 / 1000.0;
            format!("{} {} beat {ago:.1}s ago", s("region"), s("backhaul"))
        }
        Table::Orgs => list("networks"),
    }
}

/// `tern keys rotate`: through the RIB's own rotation, so every store applies the same rules
/// in one transaction. Running proxies pick the new key up from the RIB.
fn rotate_keys(config_path: Option<&Path>, grace: std::time::Duration) -> anyhow::Result<ExitCode> {
    let (config, _) = load_config(config_path)?;
    let rib = open_rib(&config)?;
    let now = tern::clock::unix_ms();
    let fresh = SessionKeyRow::fresh(now)?;
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    let done = rib.rotate_session_key(&fresh, grace_ms)?;
    println!("session key {} seals new tokens from now on", done.id);
    if !done.retired.is_empty() {
        let ids: Vec<String> = done.retired.iter().map(u32::to_string).collect();
        let (when, rel) = (utc(done.retire_at_ms), relative(done.retire_at_ms, now));
        println!("key {} keep opening tokens until {when} ({rel}), then retire", ids.join(", "));
    }
    if !done.deleted.is_empty() {
        let ids: Vec<String> = done.deleted.iter().map(u32::to_string).collect();
        println!("deleted key {} (retired over a day ago)", ids.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// `tern keys list`: ids and times only; the secrets never leave the RIB this way.
fn list_keys(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let (config, _) = load_config(config_path)?;
    let mut rows = read_table(&config, Table::SessionKeys)?;
    rows.sort_by_key(|r| parse_id(&r.key));
    println!("RIB {}", rib_name(&config));
    println!("{:<6} {:<22} RETIRES", "ID", "CREATED");
    let now = tern::clock::unix_ms();
    for r in rows {
        println!("{:<6} {}", r.key, key_summary(&r.body, now));
    }
    Ok(ExitCode::SUCCESS)
}

/// A session key row as `created  retires`, without its secret.
fn key_summary(body: &str, now: i64) -> String {
    let Ok(row) = serde_json::from_str::<SessionKeyRow>(body) else { return "(does not decode)".into() };
    let retires = match row.retire_at_ms {
        None => "never (seals new tokens)".to_string(),
        Some(at) if at <= now => format!("{} (retired {})", utc(at), relative(at, now)),
        Some(at) => format!("{} ({})", utc(at), relative(at, now)),
    };
    format!("{:<22} {retires}", utc(row.created_ms))
}

/// "in 23h59m", "5m ago", "in 30s": to the minute once it is that far off.
fn relative(at_ms: i64, now_ms: i64) -> String {
    let secs = (at_ms - now_ms).unsigned_abs() / 1000;
    let d = match (secs / 3600, secs / 60 % 60) {
        (0, 0) => format!("{secs}s"),
        (0, m) => format!("{m}m"),
        (h, 0) => format!("{h}h"),
        (h, m) => format!("{h}h{m}m"),
    };
    if at_ms >= now_ms { format!("in {d}") } else { format!("{d} ago") }
}

fn utc(ms: i64) -> String {
    tern::clock::utc_seconds(ms)
}
