//! What `tern apply` of one app costs against a big RIB: issue 12 asks ≤ 50 ms at 1M apps
//! (3M machines), for every RIB kind.
//!
//! The RIB is filled first (apps `app-N` with hostnames `app-N.test` and `www.app-N.test`,
//! three machines each), then a one-app declaration (one app, three machines, a hostname
//! the check must look up) is applied `ROUNDS` times, a new app each time, exactly as
//! `tern apply` does it (plan, check, write, commit). Prints the median, p90 and max.
//!
//! Run: `cargo bench --bench apply` (sqlite, 1M apps), or with `APPS=100000`; `RIB=etcd`
//! runs the same against a single etcd member started here (needs Debian `etcd-server`; the
//! 1M-app fill, 6M keys, takes about a minute on 2 cores and 1.8 GiB under target/tmp while
//! it runs; see `apply/etcd.rs`).

use std::time::Duration;

use tokio::time::Instant;

use tern::decl;

#[path = "apply/etcd.rs"]
mod etcd;

const ROUNDS: usize = 40;

fn apps() -> usize {
    std::env::var("APPS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000)
}

fn app_body(i: usize) -> String {
    format!(
        r#"{{"name":"app-{i}","org":"personal","hostnames":["app-{i}.test","www.app-{i}.test"],"internal_port":8080,"auto_stop":"stop","auto_start":true}}"#
    )
}

fn machine_body(i: usize, j: usize) -> String {
    format!(
        r#"{{"id":"app-{i}-{j}","app":"app-{i}","region":"ams","addr":"127.0.{}.{}:8080","state":"started"}}"#,
        j,
        i % 250 + 1
    )
}

/// A one-app declaration: app `new-K` and its three machines.
fn one_app(k: usize) -> decl::Declaration {
    let mut text =
        format!("[[apps]]\nname = \"new-{k}\"\nhostnames = [\"new-{k}.test\"]\ninternal_port = 8080\n");
    for j in 0..3 {
        text += &format!(
            "\n[[machines]]\nid = \"new-{k}-{j}\"\napp = \"new-{k}\"\nregion = \"ams\"\naddr = \"127.0.0.{}:8080\"\nstate = \"stopped\"\n",
            j + 1
        );
    }
    decl::parse(&text, "bench.toml", std::path::Path::new(".")).expect("the bench declaration parses")
}

fn report(kind: &str, n: usize, mut took: Vec<Duration>) {
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
    println!(
        "apply/{kind}/{n}_apps: median {:.1} ms, p90 {:.1} ms, max {:.1} ms over {} applies",
        at(0.5).as_secs_f64() * 1e3,
        at(0.9).as_secs_f64() * 1e3,
        took[took.len() - 1].as_secs_f64() * 1e3,
        took.len()
    );
}

fn sqlite(n: usize) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("tern.db");
    drop(tern::rib::sqlite::Store::open(&path).expect("the RIB is created"));
    let filled = Instant::now();
    {
        let mut conn = rusqlite::Connection::open(&path).expect("the RIB opens");
        let tx = conn.transaction().expect("a transaction");
        {
            let mut app = tx
                .prepare("INSERT INTO apps (key, body) VALUES (?1, ?2)")
                .expect("the bench RIB takes the write");
            let mut machine = tx
                .prepare("INSERT INTO machines (key, body) VALUES (?1, ?2)")
                .expect("the bench RIB takes the write");
            for i in 0..n {
                app.execute(rusqlite::params![format!("app-{i}"), app_body(i)])
                    .expect("the bench RIB takes the write");
                for j in 0..3 {
                    machine
                        .execute(rusqlite::params![format!("app-{i}-{j}"), machine_body(i, j)])
                        .expect("the bench RIB takes the write");
                }
            }
        }
        tx.commit().expect("the bench RIB takes the write");
    }
    eprintln!("filled {n} apps and {} machines in {:.1?}", 3 * n, filled.elapsed());
    let mut store = tern::rib::sqlite::Store::open(&path).expect("the RIB opens");
    // The first write trims the change log the fill made; not what an apply costs.
    decl::apply(&mut store, &one_app(usize::MAX), false, false).expect("applies");
    let mut took = Vec::with_capacity(ROUNDS);
    for k in 0..ROUNDS {
        let d = one_app(k);
        let t = Instant::now();
        // A new store each time, as each `tern apply` process opens its own.
        let mut store = tern::rib::sqlite::Store::open(&path).expect("the RIB opens");
        let plan = decl::apply(&mut store, &d, false, false).expect("applies");
        took.push(t.elapsed());
        assert_eq!(plan.changes.len(), 4, "{plan}");
    }
    // A stolen hostname is still found, through the index.
    let thief = decl::parse(
        &format!("[[apps]]\nname = \"thief\"\nhostnames = [\"www.app-{}.test\"]\n", n / 2),
        "thief.toml",
        std::path::Path::new("."),
    )
    .expect("the bench RIB takes the write");
    assert!(decl::apply(&mut store, &thief, false, true).is_err(), "the hostname check still holds");
    report("sqlite", n, took);
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let n = apps();
    match std::env::var("RIB").as_deref() {
        Ok("etcd") => etcd::run(n),
        _ => sqlite(n),
    }
}
