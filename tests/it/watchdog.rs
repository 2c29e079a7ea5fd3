//! The watchdog against real wedges, made with `[debug] faults` in a real `tern serve`:
//! a blocked worker and a deadlock on tern's own locks are bounced to a fresh process on
//! the same sockets, a spinning connection is closed without a bounce, and a panicking
//! background task is restarted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::backend::Backend;
use crate::harness::{self, Proxy, Reap, ServeProcess, app_decl, eventually, fresh_get};

const FAULTS: &str = "[watchdog]\nstall_after = \"1s\"\n[debug]\nfaults = true\n";

fn serve_config(dir: &std::path::Path, backend: SocketAddr) -> std::path::PathBuf {
    let db = dir.join("rib.db");
    harness::apply_decl(&db, &app_decl("app", &["app.test"], &[("m1", backend, "started")], ""));
    let config = dir.join("tern.toml");
    std::fs::write(&config, harness::node_config(&db, FAULTS) + "format = \"json\"\n").unwrap();
    config
}

async fn watchdog_status(admin: SocketAddr) -> Option<serde_json::Value> {
    reqwest::get(format!("http://{admin}/v1/watchdog")).await.ok()?.json().await.ok()
}

async fn inject(admin: SocketAddr, fault: &str) -> reqwest::StatusCode {
    reqwest::Client::new()
        .post(format!("http://{admin}/v1/debug/faults/{fault}"))
        .send()
        .await
        .unwrap()
        .status()
}

/// Fresh connections one after another until stopped: (answered, refused, other failures).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<parking_lot::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let (stop, ok, failures): (_, _, Arc<parking_lot::Mutex<Vec<String>>>) =
            (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::default());
        let task = tokio::spawn({
            let (stop, ok, failures): (_, _, Arc<parking_lot::Mutex<Vec<String>>>) =
                (stop.clone(), ok.clone(), Arc::clone(&failures));
            async move {
                while !stop.load(Ordering::SeqCst) {
                    match fresh_get(addr, "/id").await {
                        Ok(200) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        other => failures.lock().push(format!("{other:?}")),
                    }
                }
            }
        });
        Load { stop, ok, failures, task }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        (self.ok.load(Ordering::SeqCst), self.failures.lock().clone())
    }
}

/// Injects `fault` into a serving tern and follows the bounce it causes: returns the
/// diagnostics file's text. Asserts no connection was refused throughout.
async fn bounced_by(fault: &str) -> String {
    let b = Backend::start("m1").await;
    let dir = tempfile::tempdir().unwrap();
    let config = serve_config(dir.path(), b.addr);
    let mut old = ServeProcess::start(&config).await;
    let old_pid = old.pid();
    let load = Load::start(old.http);
    eventually(Duration::from_secs(5), || async { (load.ok.load(Ordering::SeqCst) >= 20).then_some(()) })
        .await
        .expect("served before the fault");

    assert_eq!(inject(old.admin, fault).await, 200);
    // A request so the deadlock's worker reaches for its lock (the load may be on the other).
    let _ = fresh_get(old.http, "/id").await;
    let status = eventually(Duration::from_secs(10), || async {
        let s = watchdog_status(old.admin).await?;
        (s["pid"].as_u64()? != u64::from(old_pid)).then_some(s)
    })
    .await
    .expect("a fresh tern answers on the admin address");
    let new_pid = u32::try_from(status["pid"].as_u64().unwrap()).unwrap();
    let _reap = Reap(new_pid);
    assert_eq!(status["wedged"], false, "the fresh one is not wedged: {status}");
    // New connections go to the fresh tern (the load's own may be stuck on the wedged
    // thread until the old process ends).
    for _ in 0..20 {
        assert_eq!(fresh_get(old.http, "/id").await, Ok(200), "answered by the fresh tern");
    }
    // The wedged one ends within its grace, even with a thread that never returns.
    let exited =
        tokio::time::timeout(Duration::from_secs(20), old.child.wait()).await.expect("the old tern ends");
    assert!(exited.is_ok());
    let (ok, failures) = load.finish().await;
    assert!(failures.iter().all(|f| !f.contains("connect")), "no connection refused: {failures:?}");
    assert!(failures.len() <= 2, "only what the wedged thread held fails ({ok} answered): {failures:?}");
    let diagnostics =
        std::fs::read_dir(dir.path().join("diagnostics")).unwrap().next().unwrap().unwrap().path();
    std::fs::read_to_string(diagnostics).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_worker_is_bounced_to_a_fresh_process_on_the_same_sockets() {
    let report = bounced_by("block-worker").await;
    assert!(report.contains("heartbeat worker-0 is stale"), "{report}");
    assert!(report.lines().any(|l| l.contains("STALE") && l.contains("worker-0")), "{report}");
    assert!(report.contains("tern-worker-0"), "the threads are listed: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_on_terns_own_locks_is_named_and_bounced() {
    let report = bounced_by("deadlock").await;
    assert!(report.contains("deadlock"), "{report}");
    for name in ["rib.writer", "upstream.idle", "tern-fault-a", "tern-fault-b"] {
        assert!(report.contains(name), "{name} in {report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_connection_is_closed_and_counted_without_a_bounce() {
    let b = Backend::start("m1").await;
    // In a process of its own: the faults are process-wide, and other tests' proxies in
    // this one would take them.
    let dir = tempfile::tempdir().unwrap();
    let proxy = ServeProcess::start(&serve_config(dir.path(), b.addr)).await;
    assert_eq!(inject(proxy.admin, "spin").await, 200);
    let started = tokio::time::Instant::now();
    let mut spun = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(2), spun.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0) | Err(_))), "closed within 2 s: {closed:?}");
    let took = started.elapsed();
    assert_eq!(fresh_get(proxy.http, "/id").await, Ok(200), "other connections are served");
    let metrics =
        reqwest::get(format!("http://{}/metrics", proxy.admin)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tern_spurious_wakeups_total{protocol=\"http\"} 1"), "{metrics}");
    let status = watchdog_status(proxy.admin).await.unwrap();
    assert_eq!(status["wedged"], false, "{status}");
    assert_eq!(status["stalls"]["count"], 0, "a spin is no wedge: {status}");
    eprintln!("spinning connection closed after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_background_task_is_restarted_and_counted() {
    let b = Backend::start("m1").await;
    // In a process of its own: the faults are process-wide, and other tests' proxies in
    // this one would take them.
    let dir = tempfile::tempdir().unwrap();
    let proxy = ServeProcess::start(&serve_config(dir.path(), b.addr)).await;
    let metric = |name: &'static str| {
        let admin = proxy.admin;
        async move {
            let text = reqwest::get(format!("http://{admin}/metrics")).await.ok()?.text().await.ok()?;
            text.lines().find(|l| l.starts_with(name))?.rsplit(' ').next()?.parse::<u64>().ok()
        }
    };
    assert_eq!(inject(proxy.admin, "panic").await, 200);
    eventually(Duration::from_secs(10), || async {
        (metric("tern_task_panics_total{task=\"supervisor\"}").await? == 1).then_some(())
    })
    .await
    .expect("the panic is counted");
    // Restarted: the supervisor goes on making passes.
    let passes = metric("tern_supervisor_passes_total").await.unwrap();
    eventually(Duration::from_secs(10), || async {
        (metric("tern_supervisor_passes_total").await? > passes).then_some(())
    })
    .await
    .expect("the supervisor runs again");
    assert_eq!(fresh_get(proxy.http, "/id").await, Ok(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_endpoints_are_absent_without_the_debug_switch() {
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "")).await;
    for fault in ["deadlock", "block-worker", "spin", "panic"] {
        assert_eq!(inject(proxy.admin, fault).await, 404, "{fault}");
    }
    let status = watchdog_status(proxy.admin).await.unwrap();
    let beats: Vec<&str> =
        status["heartbeats"].as_array().unwrap().iter().filter_map(|h| h["what"].as_str()).collect();
    for what in ["control", "catalog", "lifecycle", "worker-0"] {
        assert!(beats.contains(&what), "{what} in {beats:?}");
    }
    assert!(beats.iter().any(|b| b.starts_with("accept ")), "{beats:?}");
}

/// Operations refuse what they cannot act on, with a reason, and the node serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_refuse_bad_input_and_change_nothing() {
    let b = Backend::start("m1").await;
    let proxy = Proxy::start_with(
        &app_decl("app", &["app.test"], &[("m1", b.addr, "started")], ""),
        "[debug]\nfaults = true\n",
    )
    .await;
    let post = |path: &'static str, body: &'static str| {
        let admin = proxy.admin;
        async move {
            let r =
                reqwest::Client::new().post(format!("http://{admin}{path}")).body(body).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (status, text) = post("/v1/upgrade", "{\"binary\": \"tern\"}").await;
    assert_eq!((status, text.contains("absolute")), (400, true), "{text}");
    let (status, text) = post("/v1/upgrade", "not json").await;
    assert_eq!((status, text.contains("binary")), (400, true), "{text}");
    let (status, text) = post("/v1/upgrade", "{\"bin\": \"/usr/bin/tern\"}").await;
    assert_eq!(status, 400, "an unknown field is refused: {text}");
    let (status, text) = post("/v1/debug/faults/reboot", "").await;
    assert_eq!((status, text.contains("deadlock, block-worker, spin, panic")), (404, true), "{text}");
    let (status, _) = post("/v1/nothing", "").await;
    assert_eq!(status, 404);
    let healthz = reqwest::get(format!("http://{}/healthz", proxy.admin)).await.unwrap();
    assert_eq!(healthz.status(), 200, "still serving, not draining");
    assert_eq!(fresh_get(proxy.http, "/id").await, Ok(200));
}
