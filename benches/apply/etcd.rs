//! `RIB=etcd`: the same measurement against one real etcd member (Debian's `etcd-server`)
//! started here on a loopback address of its own, on ports the kernel picked there, with its
//! data under cargo's target tmp directory (a full fill takes a few GB; it is removed after).
//!
//! The fill writes tern's own layout (`{prefix}apps/NAME`, `{prefix}machines/ID`,
//! `{prefix}app_hosts/HOSTNAME/APP`) through tern's gRPC client, in large transactions, a
//! few in flight at once. Then each round does what one `tern apply` process does: a new
//! client (its own connection and runtime) and `tern::rib::etcd::apply::apply`, which plans
//! from point reads at one revision and commits one transaction guarded on them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;

use tern::rib::Liveness;
use tern::rib::etcd::grpc::Grpc;
use tern::rib::etcd::{EtcdRib, apply, proto};

const PREFIX: &str = "/tern/";
/// Apps per fill transaction: six keys each (the app, its two hostnames, three machines).
const APPS_PER_TXN: usize = 1_000;
/// Fill transactions in flight at once, on one HTTP/2 connection.
const IN_FLIGHT: usize = 4;

/// One etcd member, killed and its data removed when dropped.
struct Member {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Drop for Member {
    fn drop(&mut self) {
        // Best effort: the process may have died already, which is what this wants anyway.
        if let Err(e) = self.child.kill() {
            eprintln!("etcd: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("etcd: {e}");
        }
    }
}

/// 127.x.y.z from the process id: an address no fixed-port service sits on.
fn lone_address() -> Ipv4Addr {
    let b = std::process::id().wrapping_mul(2_654_435_761).to_be_bytes();
    Ipv4Addr::new(127, b[1].max(1), b[2], b[3].clamp(2, 254))
}

fn free_port(ip: Ipv4Addr) -> SocketAddr {
    let l = std::net::TcpListener::bind((ip, 0)).expect("a free loopback port");
    l.local_addr().expect("a bound address")
}

fn start_member() -> Member {
    let probe = Command::new("etcd").arg("--version").output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "RIB=etcd needs etcd on the PATH (Debian: apt-get install etcd-server)"
    );
    let dir = tempfile::Builder::new()
        .prefix("apply-etcd-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a data directory under target/tmp");
    let ip = lone_address();
    let (client, peer) = (free_port(ip), free_port(ip));
    let log = std::fs::File::create(dir.path().join("etcd.log")).expect("the member's log file");
    let child = Command::new("etcd")
        .args(["--name", "bench", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &format!("http://{client}")])
        .args(["--advertise-client-urls", &format!("http://{client}")])
        .args(["--listen-peer-urls", &format!("http://{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
        .args(["--initial-cluster", &format!("bench=http://{peer}")])
        // 8 GiB, etcd's suggested maximum: 1M apps take about a third of it.
        .args(["--quota-backend-bytes", &(8u64 << 30).to_string()])
        .args(["--max-txn-ops", &(6 * APPS_PER_TXN).to_string()])
        .args(["--max-request-bytes", &(8u32 << 20).to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("etcd starts");
    Member { child, url: format!("http://{client}"), dir }
}

fn put(key: String, value: String) -> proto::RequestOp {
    proto::RequestOp {
        request: Some(proto::request_op::Request::Put(proto::PutRequest {
            key: key.into_bytes(),
            value: value.into_bytes(),
            ..Default::default()
        })),
    }
}

/// Apps `from..to` with their hostnames and machines, as `tern apply` would have written them.
fn batch(from: usize, to: usize) -> proto::TxnRequest {
    let mut ops = Vec::with_capacity(6 * (to - from));
    for i in from..to {
        ops.push(put(format!("{PREFIX}apps/app-{i}"), super::app_body(i)));
        for host in [format!("app-{i}.test"), format!("www.app-{i}.test")] {
            ops.push(put(format!("{PREFIX}app_hosts/{host}/app-{i}"), format!("app-{i}")));
        }
        for j in 0..3 {
            ops.push(put(format!("{PREFIX}machines/app-{i}-{j}"), super::machine_body(i, j)));
        }
    }
    proto::TxnRequest { compare: vec![], success: ops, failure: vec![] }
}

async fn count(grpc: &Grpc, table: &str) -> i64 {
    let key = format!("{PREFIX}{table}/").into_bytes();
    let mut end = key.clone();
    *end.last_mut().expect("a non-empty prefix") += 1;
    let req = proto::RangeRequest { key, range_end: end, count_only: true, ..Default::default() };
    let r: proto::RangeResponse =
        grpc.unary("/etcdserverpb.KV/Range", &req, Duration::from_secs(60)).await.expect("etcd counts");
    r.count
}

/// Waits for the member, then fills it with `n` apps; returns how long the fill took.
fn fill(url: &str, n: usize) -> Duration {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime for the fill");
    rt.block_on(async {
        let grpc = Arc::new(Grpc::new(&[url.to_string()]));
        let up = Instant::now();
        loop {
            let req = proto::RangeRequest { key: b"ready".to_vec(), ..Default::default() };
            let r: Result<proto::RangeResponse, _> =
                grpc.unary("/etcdserverpb.KV/Range", &req, Duration::from_secs(1)).await;
            if r.is_ok() {
                break;
            }
            assert!(up.elapsed() < Duration::from_secs(30), "etcd did not answer within 30s: {r:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started = Instant::now();
        let mut done = 0usize;
        let mut txns = futures_util::stream::iter((0..n).step_by(APPS_PER_TXN))
            .map(|from| {
                let grpc = grpc.clone();
                async move {
                    let req = batch(from, (from + APPS_PER_TXN).min(n));
                    let r: proto::TxnResponse = grpc
                        .unary("/etcdserverpb.KV/Txn", &req, Duration::from_secs(120))
                        .await
                        .expect("etcd takes the fill transaction");
                    assert!(r.succeeded, "an unguarded transaction succeeds");
                    req.success.len() / 6
                }
            })
            .buffer_unordered(IN_FLIGHT);
        while let Some(apps) = txns.next().await {
            let before = done / 100_000;
            done += apps;
            if done / 100_000 > before {
                eprintln!("  filled {done} apps in {:.1?}", started.elapsed());
            }
        }
        let took = started.elapsed();
        let (apps, machines, hosts) =
            (count(&grpc, "apps").await, count(&grpc, "machines").await, count(&grpc, "app_hosts").await);
        assert_eq!((apps, machines, hosts), (n as i64, 3 * n as i64, 2 * n as i64), "every key landed");
        took
    })
}

/// Bytes on disk under `dir` (blocks in use: bbolt grows its file sparsely, by up to 1 GiB).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

pub fn run(n: usize) {
    let member = start_member();
    let took = fill(&member.url, n);
    eprintln!(
        "filled {n} apps, {} machines and {} hostname keys ({} keys) into etcd in {took:.1?}; its data directory holds {:.2} GiB",
        3 * n,
        2 * n,
        6 * n,
        disk_usage(&member.dir.path().join("data")) as f64 / f64::from(1u32 << 30)
    );
    let endpoints = [member.url.clone()];
    let mut took = Vec::with_capacity(super::ROUNDS);
    for k in 0..super::ROUNDS {
        let d = super::one_app(k);
        let t = Instant::now();
        // A new client each time, as each `tern apply` process makes its own.
        let rib = EtcdRib::new(&endpoints, PREFIX, Liveness::default()).expect("a client");
        let plan = apply::apply(&rib, &d, false, false).expect("applies");
        took.push(t.elapsed());
        assert_eq!(plan.changes.len(), 4, "{plan}");
    }
    // A stolen hostname is still found, through the index.
    let thief = tern::decl::parse(
        &format!("[[apps]]\nname = \"thief\"\nhostnames = [\"www.app-{}.test\"]\n", n / 2),
        "thief.toml",
        Path::new("."),
    )
    .expect("the thief's declaration parses");
    let rib = EtcdRib::new(&endpoints, PREFIX, Liveness::default()).expect("a client");
    assert!(apply::apply(&rib, &thief, false, true).is_err(), "the hostname check still holds");
    super::report("etcd", n, took);
}
