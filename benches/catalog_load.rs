//! Issue 13's catalog at scale: 1M apps and 3M machines in a SQLite RIB. Measures what a node
//! booting on it pays:
//!
//! - **load**: from subscribing to the RIB to the first catalog published, exactly what
//!   `tern serve` does at boot (`catalog::updater::start` over a real `SqliteRib`, its
//!   watcher thread reading the snapshot); target ≤ 10 s;
//! - **memory**: the whole process's resident set after the load minus before, per machine
//!   (allocator included: mimalloc, as `tern serve`); target ≤ 1 KiB;
//! - **lookup**: `Router::app_for` on a random hostname (half exact, half under a wildcard),
//!   each lookup timed on its own (the clock's own cost, measured the same way, is printed
//!   beside it); target p99 ≤ 1 µs.
//!
//! The RIB is filled once and kept under `target/tmp/` (about a minute and 1.6 GB at 1M apps);
//! each app has two hostnames (`app-N.test`, `*.app-N.test`) and three machines.
//!
//! Run: `cargo bench --bench catalog_load` (1M apps), `APPS=100000 cargo bench --bench
//! catalog_load`; `LOOKUPS` (1,000,000) lookups.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tern::catalog::{Catalog, updater};
use tern::rib::sqlite::{SqliteRib, Store};
use tern::routing::Router;
use tern::telemetry::Metrics;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MACHINES_PER_APP: usize = 3;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn app_body(i: usize) -> String {
    format!(
        r#"{{"name":"app-{i}","org":"personal","hostnames":["app-{i}.test","*.app-{i}.test"],"internal_port":8080,"auto_stop":"stop","auto_start":true}}"#
    )
}

fn machine_body(i: usize, j: usize) -> String {
    format!(
        r#"{{"id":"app-{i}-{j}","app":"app-{i}","region":"ams","addr":"10.{}.{}.{}:8080","state":"started"}}"#,
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255
    )
}

/// The RIB of `n` apps, filled on first use and kept: filling it costs far more than
/// loading it, and is not what is measured.
fn rib_of(n: usize) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("tmp");
    std::fs::create_dir_all(&dir).expect("target/tmp");
    let path = dir.join(format!("catalog-load-v1-{n}.db"));
    if path.exists() {
        return path;
    }
    let partial = dir.join(format!("catalog-load-v1-{n}.db.partial"));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", partial.display()));
    }
    drop(Store::open(&partial).expect("the RIB is created"));
    let filled = Instant::now();
    {
        let mut conn = rusqlite::Connection::open(&partial).expect("the RIB opens");
        let tx = conn.transaction().expect("a transaction");
        {
            let mut app = tx.prepare("INSERT INTO apps (key, body) VALUES (?1, ?2)").expect("insert");
            let mut machine = tx.prepare("INSERT INTO machines (key, body) VALUES (?1, ?2)").expect("insert");
            for i in 0..n {
                app.execute(rusqlite::params![format!("app-{i}"), app_body(i)]).expect("insert");
                for j in 0..MACHINES_PER_APP {
                    machine
                        .execute(rusqlite::params![format!("app-{i}-{j}"), machine_body(i, j)])
                        .expect("insert");
                }
            }
        }
        tx.commit().expect("commit");
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").expect("checkpoint");
    }
    // The next write trims the change log to what a running RIB keeps.
    Store::open(&partial)
        .expect("the RIB opens")
        .transact(|_| Ok::<_, tern::rib::RibError>(()))
        .expect("trim");
    std::fs::rename(&partial, &path).expect("rename");
    eprintln!(
        "filled {n} apps, {} machines in {:.1?} ({})",
        MACHINES_PER_APP * n,
        filled.elapsed(),
        path.display()
    );
    path
}

/// This process's resident set, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .expect("VmRSS");
    kb * 1024
}

/// CPU time of each of this process's threads so far, by name, and the time each waited for
/// a CPU (a busy machine), from `/proc/self/task/*/schedstat`: what the wall-clock load time
/// is read beside.
fn cpu() -> std::collections::BTreeMap<String, (Duration, Duration)> {
    let mut out = std::collections::BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task").flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        let mut f = text.split_whitespace().map(|v| v.parse::<u64>().unwrap_or(0));
        let (run, wait) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
        let e = out.entry(name).or_insert((Duration::ZERO, Duration::ZERO));
        e.0 += Duration::from_nanos(run);
        e.1 += Duration::from_nanos(wait);
    }
    out
}

/// `after - before`, per thread: "name 1.23 s (waited 0.10 s)".
fn cpu_used(
    before: &std::collections::BTreeMap<String, (Duration, Duration)>,
    after: &std::collections::BTreeMap<String, (Duration, Duration)>,
) -> String {
    let zero = (Duration::ZERO, Duration::ZERO);
    after
        .iter()
        .map(|(name, (run, wait))| {
            let (r0, w0) = before.get(name).unwrap_or(&zero);
            format!(
                "{name} {:.2} s (waited {:.2} s)",
                (*run - *r0).as_secs_f64(),
                (*wait - *w0).as_secs_f64()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Minor page faults of the process so far (`/proc/self/stat`, field 10): each is a page the
/// process touched for the first time (or again, after the allocator gave it back).
fn faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    after.split_whitespace().nth(7).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ns(d: Duration) -> String {
    format!("{} ns", d.as_nanos())
}

fn load(path: &Path) -> (Arc<Catalog>, Duration, tokio::runtime::Runtime) {
    // The catalog's runtime, as tern serve's `tern-catalog` thread runs it.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let rib = SqliteRib::open(path, Duration::from_secs(1)).expect("the RIB opens");
    let catalog = Arc::new(Catalog::new());
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    // Nobody listens to what changed; a closed feed is fine.
    let (feed, _) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    rt.block_on(updater::start(catalog.clone(), Arc::new(rib), Arc::new(Metrics::new()), stop_rx, feed))
        .expect("the catalog loads");
    let took = started.elapsed();
    std::mem::forget(stop);
    (catalog, took, rt)
}

fn lookups(catalog: &Arc<Catalog>, apps: usize, count: usize) {
    let mut rng = fastrand::Rng::with_seed(13);
    let hosts: Vec<String> = (0..count)
        .map(|k| {
            let i = rng.usize(..apps);
            if k % 2 == 0 { format!("app-{i}.test") } else { format!("x{k}.app-{i}.test") }
        })
        .collect();
    let router = Router::new(catalog.clone());
    let mut took = Vec::with_capacity(count);
    let mut clock = Vec::with_capacity(count);
    let mut found = 0usize;
    for h in &hosts {
        let t = Instant::now();
        let app = router.app_for(std::hint::black_box(h));
        let d = t.elapsed();
        found += usize::from(app.is_some());
        took.push(d);
        let t = Instant::now();
        clock.push(std::hint::black_box(t).elapsed());
    }
    assert_eq!(found, count, "every sampled hostname routes");
    let batch = Instant::now();
    for h in &hosts {
        std::hint::black_box(router.app_for(std::hint::black_box(h)));
    }
    let mean = batch.elapsed() / u32::try_from(count).unwrap_or(u32::MAX);
    took.sort_unstable();
    clock.sort_unstable();
    println!(
        "lookup (Router::app_for, {count} random hostnames, half wildcard): p50 {}, p90 {}, p99 {}, p99.9 {}, max {}; \
         mean {} in one batch; the clock alone: p50 {}, p99 {}",
        ns(pct(&took, 0.5)),
        ns(pct(&took, 0.9)),
        ns(pct(&took, 0.99)),
        ns(pct(&took, 0.999)),
        ns(took[took.len() - 1]),
        ns(mean),
        ns(pct(&clock, 0.5)),
        ns(pct(&clock, 0.99)),
    );
}

fn main() {
    // The catalog's own account of the load (where the time went) is a log line.
    tracing_subscriber::fmt().with_env_filter("warn,tern::catalog=info").with_target(false).init();
    let apps = env("APPS", 1_000_000);
    let path = rib_of(apps);
    let machines = apps * MACHINES_PER_APP;
    let before = rss();
    let (cpu0, faults0) = (cpu(), faults());
    let (catalog, took, rt) = load(&path);
    let (cpu1, faults1) = (cpu(), faults());
    std::mem::forget(rt);
    let after = rss();
    let snap = catalog.load_full();
    assert_eq!((snap.app_count(), snap.machine_count()), (apps, machines));
    drop(snap);
    let per_machine = after.saturating_sub(before) / machines;
    println!(
        "load ({apps} apps, {machines} machines): {:.2} s from subscribing to the first catalog published; \
         CPU per thread: {}; {} page faults",
        took.as_secs_f64(),
        cpu_used(&cpu0, &cpu1),
        faults1 - faults0,
    );
    println!(
        "memory: resident set {:.0} MiB before, {:.0} MiB after: {per_machine} bytes per machine ({} per app)",
        before as f64 / (1 << 20) as f64,
        after as f64 / (1 << 20) as f64,
        after.saturating_sub(before) / apps,
    );
    lookups(&catalog, apps, env("LOOKUPS", 1_000_000));
    // Freeing millions of entries is not what is measured (a node never does), and takes
    // seconds: leave it to the exit.
    std::mem::forget(catalog);
}
