//! Catalog and routing costs at 10k, 100k and 1M apps: ns per lookup, µs per change, bytes
//! per app. Lookup and single-change cost must stay flat as the catalog grows. Also how long
//! a change committed to the SQLite RIB takes to reach a running proxy's catalog.
//!
//! Run: `cargo bench --bench catalog` (add `-- lookup`, `-- rib` etc. to filter).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, BenchmarkId, Criterion, criterion_group, criterion_main};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

use tern::catalog::{Catalog, Event, Snapshot, decode, updater};
use tern::model::{AppSpec, MachineAddr, MachineSpec, MachineState};
use tern::rib::Record;
use tern::rib::Table;
use tern::rib::sqlite::{SqliteRib, Store};
use tern::telemetry::Metrics;

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];

fn app(i: usize) -> AppSpec {
    let mut a: AppSpec = toml::from_str(&format!("name = \"app-{i}\"")).expect("valid app");
    a.hostnames = vec![format!("app-{i}.example.com"), format!("*.app-{i}.example.com")];
    a
}

fn machine(i: usize, state: MachineState) -> MachineSpec {
    MachineSpec {
        id: format!("m-{i}").into(),
        app: format!("app-{i}").into(),
        region: "ams".into(),
        addr: format!("10.{}.{}.{}:8080", (i >> 16) & 255, (i >> 8) & 255, i & 255)
            .parse::<MachineAddr>()
            .expect("addr"),
        state,
        cmd: None,
        node: None,
    }
}

/// A catalog of `n` apps, each with two hostnames (exact and wildcard) and one machine.
/// Returns it with the bytes it holds per app.
fn build(n: usize) -> (Snapshot, usize) {
    let region = Region::new(GLOBAL);
    let mut s = Snapshot::default();
    for i in 0..n {
        s.apply(Event::App(app(i)));
        s.apply(Event::Machine(machine(i, MachineState::Started)));
    }
    // What a proxy holds after loading: compact bases, empty deltas.
    let s = s.rebase(&s.compact());
    let stats = region.change();
    let live =
        stats.bytes_allocated.saturating_sub(stats.bytes_deallocated) as isize + stats.bytes_reallocated;
    (s, live.max(0) as usize / n)
}

/// `count` random hostnames of a catalog of `n` apps. 1024 is a hot set that stays in cache;
/// 65,536 spread over a large catalog is mostly cold, as uniform traffic would be.
fn hosts(n: usize, wild: bool, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            let i = fastrand::usize(..n);
            if wild { format!("x{i}.app-{i}.example.com") } else { format!("app-{i}.example.com") }
        })
        .collect()
}

fn catalog(c: &mut Criterion) {
    let mut group = c.benchmark_group("catalog");
    group.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    for n in SIZES {
        let (snap, bytes_per_app) = build(n);
        println!("catalog/{n}: {bytes_per_app} bytes per app (2 hostnames, 1 machine each)");
        lookups(&mut group, n, &snap);
        changes(&mut group, n, &snap);
    }
    group.finish();
}

fn lookups(group: &mut BenchmarkGroup<'_, WallTime>, n: usize, snap: &Snapshot) {
    for (label, wild, count) in [
        ("lookup_exact", false, 1024),
        ("lookup_wildcard", true, 1024),
        ("lookup_exact_uniform", false, 65_536),
    ] {
        let keys = hosts(n, wild, count);
        group.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
            let mut k = 0;
            b.iter(|| {
                k = (k + 1) % count;
                black_box(snap.route(black_box(&keys[k])).is_some())
            })
        });
    }
    // Reference: a plain std HashMap (SipHash) over the same names, to show how much of
    // any growth is the memory hierarchy rather than the catalog's structure.
    let reference: std::collections::HashMap<String, usize> =
        (0..n).map(|i| (format!("app-{i}.example.com"), i)).collect();
    let keys = hosts(n, false, 65_536);
    group.bench_with_input(BenchmarkId::new("std_hashmap_uniform", n), &n, |b, _| {
        let mut k = 0;
        b.iter(|| {
            k = (k + 1) % keys.len();
            black_box(reference.contains_key(black_box(keys[k].as_str())))
        })
    });
    drop(reference);
}

fn changes(group: &mut BenchmarkGroup<'_, WallTime>, n: usize, snap: &Snapshot) {
    // One change: copy-on-write clone of the snapshot, apply, drop the old version, as
    // the updater does for each RIB change.
    // A change to one of 1024 recently used apps: the structure's own cost, in cache.
    group.bench_with_input(BenchmarkId::new("change_machine_state_hot", n), &n, |b, _| {
        b.iter_batched(
            || (snap.clone(), Event::Machine(machine(fastrand::usize(..1024), MachineState::Stopped))),
            |(mut next, ev)| {
                next.apply(ev);
                next
            },
            BatchSize::SmallInput,
        )
    });
    // A change to any app, uniformly: its entries are usually cold in cache.
    group.bench_with_input(BenchmarkId::new("change_machine_state", n), &n, |b, _| {
        b.iter_batched(
            || (snap.clone(), Event::Machine(machine(fastrand::usize(..n), MachineState::Stopped))),
            |(mut next, ev)| {
                next.apply(ev);
                next
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_with_input(BenchmarkId::new("change_app_hostnames", n), &n, |b, _| {
        b.iter_batched(
            || {
                let i = fastrand::usize(..n);
                let mut a = app(i);
                a.hostnames.push(format!("new-{i}.example.org"));
                (snap.clone(), Event::App(a))
            },
            |(mut next, ev)| {
                next.apply(ev);
                next
            },
            BatchSize::SmallInput,
        )
    });
    // The whole path of one RIB row: JSON decode, validation, apply.
    group.bench_with_input(BenchmarkId::new("change_from_rib_row", n), &n, |b, _| {
        b.iter_batched(
            || {
                let m = machine(fastrand::usize(..n), MachineState::Stopped);
                (snap.clone(), m.id.clone(), serde_json::to_string(&m).expect("json"))
            },
            |(mut next, key, body)| {
                if let Ok(Some(ev)) = decode(&next, Table::Machines, &key, Some(&body)) {
                    next.apply(ev);
                }
                next
            },
            BatchSize::SmallInput,
        )
    });
}

fn routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("routing");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    group.bench_function("normalize_host", |b| {
        b.iter(|| black_box(tern::routing::normalize(black_box("Api.Example.COM:8443")).is_ok()))
    });
    let mut s = Snapshot::default();
    s.apply(Event::App(app(0)));
    for k in 0..16 {
        let mut m = machine(0, MachineState::Started);
        m.id = format!("m-0-{k}").into();
        s.apply(Event::Machine(m));
    }
    let machines = s.app("app-0").expect("app").machines.clone();
    group.bench_function("least_in_flight_16_machines", |b| {
        b.iter(|| black_box(tern::routing::select::least_in_flight(black_box(&machines), &[]).is_some()))
    });
    group.finish();
}

/// From a commit to the SQLite RIB (what `tern apply` does) to the catalog publishing it,
/// with the default settings (file events, a 1 s poll behind them): how long an operator
/// waits for a change to be served. The real watcher thread and updater task; the bench thread checks the catalog in a yield
/// loop, so the figure is the propagation itself, not a sleep's granularity.
fn rib_to_catalog(c: &mut Criterion) {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rib.db");
    let rib = SqliteRib::open(&path, Duration::from_secs(1)).expect("RIB");
    let catalog = Arc::new(Catalog::new());
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    // Nobody listens to what changed; a closed feed is fine.
    let (feed, _) = tokio::sync::mpsc::unbounded_channel();
    rt.block_on(updater::start(catalog.clone(), Arc::new(rib), Arc::new(Metrics::new()), stop_rx, feed))
        .expect("updater");
    let mut store = Store::open(&path).expect("store");
    let mut n = 0u64;
    let mut group = c.benchmark_group("rib");
    group.sample_size(30).measurement_time(Duration::from_secs(10));
    group.bench_function("commit_to_catalog", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let name = format!("app-{n}");
                let body = format!(r#"{{"name":"{name}","hostnames":["{name}.example.com"]}}"#);
                let record = Record { table: Table::Apps, key: name.clone(), body };
                let start = tokio::time::Instant::now();
                store.transact(|tx| tx.put(&record)).expect("commit");
                while catalog.load().app(&name).is_none() {
                    std::thread::yield_now();
                }
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, catalog, routing, rib_to_catalog);
criterion_main!(benches);
