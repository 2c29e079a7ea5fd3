//! Apps that come and go leave nothing behind: 10,000 apps churned through a running
//! proxy's catalog (applied, each sent a request that makes tern keep per-app state, then
//! pruned) and the proxy's memory goes back to where it was.
//!
//! A test binary of its own, so that its counting allocator sees only this proxy: every
//! allocation in the process (tern's threads, the machine, the client) goes through it, and
//! no other test runs here at the same time.

// Test helpers fail loudly by design; the shared harness has more than this test uses.
#![allow(clippy::unwrap_used, clippy::too_many_lines, dead_code)]

#[path = "it/backend.rs"]
mod backend;
#[path = "it/harness.rs"]
mod harness;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

use harness::{Proxy, eventually};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated and not yet freed, process-wide. (stats_alloc already counts a
/// reallocation's growth in `bytes_allocated` and its shrinking in `bytes_deallocated`;
/// adding `bytes_reallocated` as well would count every grown buffer twice.)
fn live_bytes() -> i64 {
    let s = GLOBAL.stats();
    s.bytes_allocated as i64 - s.bytes_deallocated as i64
}

const CHURN: usize = 10_000;

/// How far above the baseline the proxy may stay once the churned apps are gone. What is
/// left is room, not state: a hash table keeps its slots after its entries are removed, and
/// the metrics library's series tables (two of them hold a series per app) cannot be told
/// to shrink: 16,384 slots of 16 bytes each, about 0.26 MiB per table for 10,000 apps.
/// Everything kept per app (series, counters, lines, catalog entries) is several times
/// that over 10,000 apps, so a leak of it does not fit under this margin.
const MARGIN: i64 = 1 << 20;

/// The apps the proxy keeps throughout.
fn base_decl() -> String {
    "[[apps]]\nname = \"home\"\nhostnames = [\"home.test\"]\n".to_string()
}

/// `n` apps named `{prefix}-{i}`: even ones with one started machine at `backend` (shared by
/// all), odd ones whose only machine is stopped and has no `cmd` (a request for one is held,
/// finds nothing tern may wake, and gets `503 no_machine`).
fn churn_decl(prefix: &str, n: usize, backend: SocketAddr) -> String {
    let mut d = base_decl();
    for i in 0..n {
        let (addr, state) =
            if i % 2 == 0 { (backend.to_string(), "started") } else { ("127.0.0.1:9".into(), "stopped") };
        d += &format!(
            "[[apps]]\nname = \"{prefix}-{i}\"\nhostnames = [\"{prefix}-{i}.test\"]\n\
             [[machines]]\nid = \"{prefix}-{i}-m\"\napp = \"{prefix}-{i}\"\naddr = \"{addr}\"\nstate = \"{state}\"\n"
        );
    }
    d
}

/// A plain HTTP/1.1 client on one keep-alive connection, reconnecting when tern closes it.
/// (A pooling client would keep a connection per hostname: 10,000 of them, in this process.)
struct Client {
    addr: SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
}

impl Client {
    fn new(addr: SocketAddr) -> Client {
        Client { addr, sender: None }
    }

    /// GETs `path` from `host`: the status and `tern-error`, and the body, read to its end.
    async fn get(&mut self, host: &str, path: &str) -> (u16, Option<String>, String) {
        loop {
            if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
                let stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
                tokio::spawn(conn);
                self.sender = Some(sender);
            }
            let sender = self.sender.as_mut().unwrap();
            if sender.ready().await.is_err() {
                self.sender = None;
                continue;
            }
            let req = http::Request::get(path).header(http::header::HOST, host).body(Empty::new()).unwrap();
            match sender.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let code = resp.headers().get("tern-error").map(|v| v.to_str().unwrap().to_string());
                    let body = resp.into_body().collect().await.unwrap().to_bytes();
                    return (status, code, String::from_utf8_lossy(&body).into_owned());
                }
                Err(_) => self.sender = None,
            }
        }
    }
}

/// A metric's value from `/metrics` text.
fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok()).unwrap_or(0.0)
}

async fn metrics(proxy: &Proxy) -> String {
    Client::new(proxy.admin).get("admin", "/metrics").await.2
}

/// Waits until the catalog holds `apps` apps and `machines` machines (a large apply may
/// reach it in several batches).
async fn until_catalog(proxy: &Proxy, apps: usize, machines: usize) {
    let done = eventually(Duration::from_secs(60), || async {
        let text = metrics(proxy).await;
        let (a, m) = (metric(&text, "tern_catalog_apps"), metric(&text, "tern_catalog_machines"));
        (a == apps as f64 && m == machines as f64).then_some(())
    });
    done.await.unwrap_or_else(|| panic!("the catalog never held {apps} apps and {machines} machines"));
}

/// Waits for two more supervisor passes than now: its sweep of per-key state has run.
async fn until_swept(proxy: &Proxy) {
    let start = metric(&metrics(proxy).await, "tern_supervisor_passes_total");
    let done = eventually(Duration::from_secs(20), || async {
        (metric(&metrics(proxy).await, "tern_supervisor_passes_total") >= start + 2.0).then_some(())
    });
    done.await.expect("the supervisor kept running");
}

/// Applies `n` apps, sends each one request (over a few connections at once), prunes them.
async fn churn(proxy: &Proxy, prefix: &str, n: usize, backend: SocketAddr) {
    proxy.apply(&churn_decl(prefix, n, backend));
    until_catalog(proxy, n + 1, n).await;
    let lanes = 4;
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let (http, prefix) = (proxy.http, prefix.to_string());
        tasks.push(tokio::spawn(async move {
            let mut client = Client::new(http);
            for i in (lane..n).step_by(lanes) {
                let got = client.get(&format!("{prefix}-{i}.test"), "/id").await;
                if i % 2 == 0 {
                    assert_eq!(got, (200, None, "shared".into()), "app {prefix}-{i}");
                } else {
                    assert_eq!((got.0, got.1.as_deref()), (503, Some("no_machine")), "app {prefix}-{i}");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    proxy.apply_pruning(&base_decl());
    until_catalog(proxy, 1, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_apps_through_the_catalog_leave_memory_where_it_was() {
    let backend = backend::Backend::start("shared").await;
    let mut proxy = Proxy::start(&base_decl()).await;
    // Whatever is made once (metric families, pooled machine connections, table room for a
    // few hundred apps) is made here, before the baseline.
    churn(&proxy, "warm", 500, backend.addr).await;
    until_swept(&proxy).await;
    let baseline = live_bytes();

    churn(&proxy, "churn", CHURN, backend.addr).await;
    until_swept(&proxy).await;
    let mut above = 0;
    let settled = eventually(Duration::from_secs(20), || {
        above = live_bytes() - baseline;
        async move { (above <= MARGIN).then_some(()) }
    })
    .await;
    eprintln!("{CHURN} apps churned: {above} bytes above the baseline ({} per app)", above / CHURN as i64);
    let text = metrics(&proxy).await;
    let listed = text.lines().filter(|l| l.contains("app=\"churn-") || l.contains("app=\"warm-")).count();
    assert_eq!(listed, 0, "/metrics still lists series of churned apps");
    assert!(settled.is_some(), "{above} bytes still held after {CHURN} apps left (margin {MARGIN})");
    proxy.shutdown().await.unwrap().unwrap();
}
