//! `tern upgrade` and `tern drain`, driven through the real binary and its admin address:
//! a fresh process takes the listening sockets themselves, so no connection is refused
//! while the old one finishes what it holds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::backend::Backend;
use crate::harness::{self, Reap, ServeProcess, app_decl, eventually, fresh_get, tern_bin};

fn setup(dir: &std::path::Path, backend: SocketAddr) -> std::path::PathBuf {
    let db = dir.join("rib.db");
    harness::apply_decl(&db, &app_decl("app", &["app.test"], &[("m1", backend, "started")], ""));
    let config = dir.join("tern.toml");
    std::fs::write(&config, harness::node_config(&db, "") + "format = \"json\"\n").unwrap();
    config
}

async fn cli(args: &[&str], tern: &ServeProcess) -> std::process::Output {
    let admin = tern.admin.to_string();
    tokio::process::Command::new(tern_bin()).args(args).args(["--admin", &admin]).output().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_hands_the_sockets_over_and_refuses_no_connection() {
    let b = Backend::start("m1").await;
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), b.addr);
    let mut old = ServeProcess::start(&config).await;
    let old_pid = old.pid();
    assert_eq!(fresh_get(old.http, "/id").await, Ok(200));

    // A request the old process holds across the upgrade.
    let held = tokio::spawn(fresh_get(old.http, "/hang"));
    eventually(Duration::from_secs(5), || async { (b.requests.load(Ordering::SeqCst) >= 2).then_some(()) })
        .await
        .expect("the held request reached the machine");

    // New connections, one after another, all through the upgrade.
    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(parking_lot::Mutex::new(Vec::new())),
    );
    let load = tokio::spawn({
        let (stop, ok, failed, addr) = (stop.clone(), ok.clone(), failed.clone(), old.http);
        async move {
            while !stop.load(Ordering::SeqCst) {
                match fresh_get(addr, "/id").await {
                    Ok(200) => ok.fetch_add(1, Ordering::SeqCst),
                    other => {
                        failed.lock().push(format!("{other:?}"));
                        0
                    }
                };
            }
        }
    });
    eventually(Duration::from_secs(5), || async { (ok.load(Ordering::SeqCst) >= 20).then_some(()) })
        .await
        .unwrap();

    let out = cli(&["upgrade"], &old).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let new_pid: u32 = stdout
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the new pid in {stdout:?}"));
    let _reap = Reap(new_pid);
    assert_ne!(new_pid, old_pid);
    let before = ok.load(Ordering::SeqCst);
    eventually(Duration::from_secs(5), || async { (ok.load(Ordering::SeqCst) >= before + 50).then_some(()) })
        .await
        .expect("new connections keep being answered after the upgrade");

    // The old process still holds its request; it finishes, then the old process exits 0.
    assert!(old.child.try_wait().unwrap().is_none(), "the old tern waits for its in-flight request");
    b.gate.notify_one();
    assert_eq!(held.await.unwrap(), Ok(200));
    let status = tokio::time::timeout(Duration::from_secs(30), old.child.wait())
        .await
        .expect("the old tern exits")
        .unwrap();
    assert!(status.success(), "{status}");

    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    assert!(failed.lock().is_empty(), "failed: {:?}", failed.lock());
    // The admin address belongs to the new process now.
    let healthz = reqwest::get(format!("http://{}/healthz", old.admin)).await.unwrap();
    assert_eq!(healthz.status(), 200);
    assert_eq!(fresh_get(old.http, "/id").await, Ok(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_leaves_the_running_tern_serving() {
    let b = Backend::start("m1").await;
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), b.addr);
    let mut old = ServeProcess::start(&config).await;
    // A "new binary" that exits at once, as a broken build would.
    let out = cli(&["upgrade", "--binary", "/bin/false"], &old).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exited") && stderr.contains("keeps serving"), "{stderr}");
    assert!(old.child.try_wait().unwrap().is_none(), "the running tern is still there");
    assert_eq!(fresh_get(old.http, "/id").await, Ok(200));
    let healthz = reqwest::get(format!("http://{}/healthz", old.admin)).await.unwrap();
    assert_eq!(healthz.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_says_503_for_drain_delay_while_still_serving_then_exits_zero() {
    let b = Backend::start("m1").await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    harness::apply_decl(&db, &app_decl("app", &["app.test"], &[("m1", b.addr, "started")], ""));
    let config = dir.path().join("tern.toml");
    let shutdown = "[shutdown]\ndrain_window = \"1s\"\ndrain_delay = \"2s\"\n";
    std::fs::write(&config, harness::node_config(&db, shutdown) + "format = \"json\"\n").unwrap();
    let mut tern = ServeProcess::start(&config).await;
    let drain = tokio::spawn({
        let admin = tern.admin.to_string();
        async move {
            tokio::process::Command::new(tern_bin())
                .args(["drain", "--admin", &admin])
                .output()
                .await
                .unwrap()
        }
    });
    let started = tokio::time::Instant::now();
    eventually(Duration::from_secs(5), || async {
        let r = reqwest::get(format!("http://{}/healthz", tern.admin)).await.ok()?;
        (r.status() == 503).then_some(())
    })
    .await
    .expect("/healthz turns 503 first");
    // Within drain_delay the listeners still take and serve connections, so the anycast
    // route can be withdrawn before anything is refused.
    assert_eq!(fresh_get(tern.http, "/id").await, Ok(200));
    assert!(started.elapsed() < Duration::from_secs(2));
    let status =
        tokio::time::timeout(Duration::from_secs(15), tern.child.wait()).await.expect("exits").unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() >= Duration::from_secs(2), "not before drain_delay");
    let out = drain.await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("has exited"));
    assert!(tokio::net::TcpStream::connect(tern.http).await.is_err(), "listeners closed");
}

/// The machines a tern runs (process driver) pass to the new process still running: the
/// same process keeps serving, and the new tern is the one that stops it in the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_hands_running_machines_over_instead_of_starting_them_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    let (decl, _) = crate::wake::one_process_machine("started");
    harness::apply_decl(&db, &decl);
    let config = dir.path().join("tern.toml");
    std::fs::write(&config, harness::node_config(&db, "") + "format = \"json\"\n").unwrap();
    let mut old = ServeProcess::start(&config).await;
    eventually(Duration::from_secs(10), || async {
        (fresh_get(old.http, "/id").await == Ok(200)).then_some(())
    })
    .await
    .expect("the declared machine starts");
    let pid_file = dir.path().join("machine-logs").join("m1.pid");
    let machine_pid = |text: &str| text.split_whitespace().next().unwrap().to_string();
    let before = machine_pid(&std::fs::read_to_string(&pid_file).unwrap());

    let out = cli(&["upgrade"], &old).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let new_pid: u32 = stdout.split_whitespace().nth(2).and_then(|p| p.parse().ok()).unwrap();
    let reap = Reap(new_pid);
    let status = tokio::time::timeout(Duration::from_secs(30), old.child.wait()).await.unwrap().unwrap();
    assert!(status.success());
    // The same machine process, now recorded as the new tern's, still serving.
    let record = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(machine_pid(&record), before, "not started a second time: {record}");
    assert_eq!(record.split_whitespace().nth(2), Some(new_pid.to_string().as_str()), "{record}");
    for _ in 0..10 {
        assert_eq!(fresh_get(old.http, "/id").await, Ok(200));
    }
    // The new tern stops it when it stops.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(new_pid).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let machine = nix::unistd::Pid::from_raw(before.parse().unwrap());
    let stopped = eventually(Duration::from_secs(20), || async {
        nix::sys::signal::kill(machine, None).is_err().then_some(())
    })
    .await;
    drop(reap);
    assert!(stopped.is_some(), "the adopted machine is stopped by the tern that adopted it");
}
