//! What `tern apply` declares while tern runs, acted on as at boot: machines declared
//! `started` are started, machines removed with `--prune` are retired and stopped (also
//! while tern shuts down), and a slow start outlives the requests that wait for it. Machines
//! are real processes (`examples/test_machine.rs`) run by the `process` driver.

use std::time::Duration;

use crate::harness::{Ca, HttpVersion, Proxy, eventually};
use crate::lifecycle::{app, ended_cleanly, live_streams, machine, machine_json, metric_now, until_machine};
use crate::wake::{free_port, metric};

fn refuses(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

async fn app_listed(proxy: &Proxy, name: &str) -> bool {
    reqwest::get(format!("http://{}/v1/apps/{name}", proxy.admin)).await.unwrap().status() == 200
}

/// Before: such a machine was routed to (the catalog said started) but nothing ran it, so
/// every request got `502 upstream_connect` until tern restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_declared_started_at_runtime_is_started_and_answers_at_once() {
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let late = |state: &str, more: &str| app("late", "") + &machine("late", "m1", p1, state, &[]) + more;
    let mut proxy = Proxy::start(&late("stopped", "")).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let get = |host: &str| {
        let (client, url) = (client.clone(), proxy.url(host, "/id"));
        async move {
            let r = client.get(url).send().await.unwrap();
            (r.status().as_u16(), r.headers().get("tern-error").cloned(), r.text().await.unwrap())
        }
    };

    // Changed from stopped to started: the first request once the catalog has the change
    // is answered by the machine.
    proxy.apply(&late("started", ""));
    until_machine(&proxy, "late", "m1", Duration::from_secs(10), |m| m["state"] != "stopped").await;
    assert_eq!(get("late.test").await, (200, None, "m1".into()));

    // Added, in a new app: likewise.
    let fresh = app("fresh", "") + &machine("fresh", "f1", p2, "started", &[]);
    proxy.apply(&late("started", &fresh));
    let listed =
        eventually(Duration::from_secs(10), || async { app_listed(&proxy, "fresh").await.then_some(()) });
    listed.await.expect("the catalog has the new app");
    assert_eq!(get("fresh.test").await, (200, None, "f1".into()));

    // Added to an app, and no request at all: it is started all the same, as at boot.
    proxy.apply(&(late("started", &fresh) + &machine("late", "m3", p3, "started", &[])));
    let up = eventually(Duration::from_secs(10), || async { (!refuses(p3)).then_some(()) }).await;
    assert!(up.is_some(), "the declared machine's process was started without a request");
    until_machine(&proxy, "late", "m3", Duration::from_secs(10), |m| m["state"] == "started").await;

    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "tern_machine_actions_total{action=\"start\",reason=\"declared\"}"), 3.0);
    assert_eq!(metric(&m, "tern_machine_actions_total{action=\"start\",reason=\"wake\"}"), 0.0);
    assert_eq!(metric(&m, "tern_errors_total{code=\"upstream_connect\"}"), 0.0);
    proxy.shutdown().await.unwrap().unwrap();
    assert!(refuses(p1) && refuses(p2) && refuses(p3), "shutdown stops them all");
}

/// Before: the machine left routing but its process ran on, past tern's own shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_removed_by_prune_ends_its_streams_cleanly_then_stops() {
    let port = free_port();
    let mut proxy = Proxy::start(&(app("live", "") + &machine("live", "l1", port, "started", &[]))).await;
    until_machine(&proxy, "live", "l1", Duration::from_secs(10), |m| m["state"] == "started").await;
    let (sse, ws) = live_streams(&proxy).await;

    // The operator prunes the machine (its app stays) while both streams are open.
    proxy.apply_pruning(&app("live", ""));
    ended_cleanly(sse, ws).await;
    eventually(Duration::from_secs(10), || async { refuses(port).then_some(()) })
        .await
        .expect("the removed machine's process is stopped");
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "tern_machine_actions_total{action=\"stop\",reason=\"removed\"}"), 1.0);
    assert_eq!(metric(&m, "tern_streams_ended_total{how=\"clean\",kind=\"sse\"}"), 1.0);
    assert_eq!(metric(&m, "tern_streams_ended_total{how=\"clean\",kind=\"websocket\"}"), 1.0);
    let v: serde_json::Value =
        reqwest::get(format!("http://{}/v1/apps/live", proxy.admin)).await.unwrap().json().await.unwrap();
    assert_eq!(v["machines"].as_array().unwrap().len(), 0);
    proxy.shutdown().await.unwrap().unwrap();
}

/// A machine removed with its app while one of its requests is still in flight (so its
/// retirement is still draining) when tern shuts down: shutdown must stop it too, although
/// the catalog no longer holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_pruned_while_tern_shuts_down_does_not_outlive_it() {
    let port = free_port();
    let decl = app("brief", "") + &machine("brief", "b1", port, "started", &[]) + &app("other", "");
    let mut proxy = Proxy::start_with(&decl, "[limits]\nshutdown_timeout = \"1s\"\n").await;
    until_machine(&proxy, "brief", "b1", Duration::from_secs(10), |m| m["state"] == "started").await;
    let pid = {
        let client = proxy.client(&Ca::new(), HttpVersion::Http1);
        let pid = client.get(proxy.url("brief.test", "/pid")).send().await.unwrap().text().await.unwrap();
        let url = proxy.url("brief.test", "/hang");
        tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) });
        pid
    };
    until_machine(&proxy, "brief", "b1", Duration::from_secs(10), |m| m["in_flight"] == 1).await;

    proxy.apply_pruning(&app("other", ""));
    let gone =
        eventually(Duration::from_secs(10), || async { (!app_listed(&proxy, "brief").await).then_some(()) });
    gone.await.expect("the catalog dropped the app");
    assert!(!refuses(port), "still draining its request");
    proxy.shutdown().await.unwrap().unwrap();
    assert!(refuses(port), "the machine's port is closed once tern has stopped");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "its process is gone");
}

/// Before: the first request's `wake_timeout` was the start's deadline, so with a machine
/// slower to listen than that, each refresh started it again and tern killed it each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_start_outlives_the_requests_that_wait_for_it() {
    let port = free_port();
    let decl = app("slow", "wake_timeout = \"400ms\"")
        + &machine("slow", "s1", port, "stopped", &["START_DELAY_MS=1500"]);
    let mut proxy = Proxy::start(&decl).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let get = || {
        let (client, url) = (client.clone(), proxy.url("slow.test", "/pid"));
        async move {
            let r = client.get(url).send().await.unwrap();
            (r.status().as_u16(), r.headers().get("tern-error").cloned(), r.text().await.unwrap())
        }
    };

    let (status, code, _) = get().await;
    assert_eq!((status, code.unwrap()), (503, "wake_timeout".parse().unwrap()));
    // The start goes on: its process runs, not yet listening.
    let record = std::fs::read_to_string(proxy.dir.path().join("machine-logs").join("s1.pid")).unwrap();
    let pid: u32 = record.split_whitespace().next().unwrap().parse().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "the machine was not killed");
    assert_eq!(machine_json(&proxy, "slow", "s1").await["state"], "starting");

    // Each later request waits its own wake_timeout on that same start, until it is up.
    let mut answered = None;
    for _ in 0..50 {
        match get().await {
            (200, None, body) => {
                answered = Some(body);
                break;
            }
            (status, code, _) => assert_eq!((status, code.unwrap()), (503, "wake_timeout".parse().unwrap())),
        }
    }
    assert_eq!(answered.expect("the machine came up"), pid.to_string(), "the same process answers");
    assert_eq!(metric_now(&proxy, "tern_machine_actions_total{action=\"start\",reason=\"wake\"}").await, 1.0);
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "tern_wakes_total{result=\"ok\"}"), 1.0);
    assert_eq!(metric(&m, "tern_wakes_total{result=\"failed\"}"), 0.0);
    proxy.shutdown().await.unwrap().unwrap();
}

/// Before: the old process ran on at the old address, and every request to the new one got
/// `502 upstream_connect` until tern restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_machine_moved_to_another_port_is_restarted_there() {
    let (old, new) = (free_port(), free_port());
    let decl = |port: u16| app("moved", "") + &machine("moved", "k1", port, "started", &[]);
    let mut proxy = Proxy::start(&decl(old)).await;
    until_machine(&proxy, "moved", "k1", Duration::from_secs(10), |m| m["state"] == "started").await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let r = client.get(proxy.url("moved.test", "/id")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    proxy.apply(&decl(new));
    until_machine(&proxy, "moved", "k1", Duration::from_secs(10), |m| {
        m["addr"] == format!("127.0.0.1:{new}").as_str()
    })
    .await;
    // Requests from now on are answered by the new process (held while it starts).
    for _ in 0..5 {
        let r = client.get(proxy.url("moved.test", "/id")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.headers().get("tern-error"));
    }
    assert!(refuses(old), "the old process still listens");
    assert!(!refuses(new));
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "tern_machine_actions_total{action=\"stop\",reason=\"redeclared\"}"), 1.0);
    assert_eq!(metric(&m, "tern_errors_total{code=\"upstream_connect\"}"), 0.0);
    proxy.shutdown().await.unwrap().unwrap();
    assert!(refuses(new));
}
