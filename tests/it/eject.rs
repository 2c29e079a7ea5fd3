//! Passive ejection: a machine whose connects fail (refused, or no answer within
//! `connect_timeout`) is left out of selection for a back-off, so only the request that
//! found it broken pays for it.
//!
//! Both tests hold a request open on the good machine first, so that least-in-flight
//! prefers the broken one on every pick (as it does in production for a machine that
//! refuses at once: nothing is ever in flight on it). Without ejection, every request would
//! go to the broken machine first.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::Backend;
use crate::harness::{Ca, HttpVersion, Proxy, app_decl, eventually};

/// A port bound but never listening: the kernel refuses connects to it, and while the
/// socket is kept no other test can take the port.
fn refusing() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// A blackholed machine: a listener that never accepts, its accept queue filled, so the
/// kernel drops further SYNs (Linux does so while the queue is full) and a connect gets no
/// answer at all. Returns what must be kept alive with the address.
async fn blackhole() -> (tokio::net::TcpListener, Vec<tokio::net::TcpStream>, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    // Loopback connects complete in microseconds while there is room; the first one that
    // gets no answer shows the queue is full.
    while let Ok(conn) =
        tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await
    {
        queued.push(conn.unwrap());
        assert!(queued.len() < 100, "the accept queue never filled");
    }
    (listener, queued, addr)
}

/// A proxy for app `app` with the good machine busy on a held request, then `bad` added.
/// Returns the held request's task (ended by opening the good backend's gate).
async fn busy_good_then_bad(
    good: &Backend,
    bad: SocketAddr,
    limits: &str,
) -> (Proxy, reqwest::Client, tokio::task::JoinHandle<()>) {
    let ca = Ca::new();
    let decl = |machines: &[(&str, SocketAddr, &str)]| app_decl("app", &["app.test"], machines, "");
    let proxy = Proxy::start_with(&decl(&[("good", good.addr, "started")]), limits).await;
    let client = proxy.client(&ca, HttpVersion::Http1);
    let held = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url("app.test", "/hang"));
        async move {
            let r = client.get(url).send().await.unwrap();
            assert_eq!(r.text().await.unwrap(), "released");
        }
    });
    let at_good = eventually(Duration::from_secs(10), || async {
        (good.requests.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
    });
    assert!(at_good.await.is_some(), "the held request never reached the good machine");
    proxy.apply(&decl(&[("good", good.addr, "started"), ("bad", bad, "started")]));
    let added = eventually(Duration::from_secs(10), || async { machine(&proxy, "bad").await.map(|_| ()) });
    assert!(added.await.is_some(), "the bad machine never reached the catalog");
    (proxy, client, held)
}

async fn machine(proxy: &Proxy, id: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value =
        reqwest::get(format!("http://{}/v1/apps/app", proxy.admin)).await.unwrap().json().await.unwrap();
    v["machines"].as_array().unwrap().iter().find(|m| m["id"] == id).cloned()
}

fn counter(metrics: &str, name: &str) -> u64 {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0)
}

/// The most failed connects one machine can cost in `elapsed` since its first: each one
/// after the first waits out a back-off twice as long as the one before (1 s, 2 s, 4 s…),
/// so k failures span at least 2^(k-1) − 1 seconds. (1% slack for millisecond rounding.)
fn most_failures(elapsed: Duration) -> u64 {
    1 + (elapsed.as_secs_f64() * 1.01 + 1.01).log2().floor() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_machine_is_ejected_and_not_tried_again_within_its_backoff() {
    let good = Backend::start("good").await;
    let (_dead_socket, dead) = refusing();
    let (proxy, client, held) = busy_good_then_bad(&good, dead, "").await;

    let began = Instant::now();
    let mut first_view = None;
    for i in 0..30 {
        let r = client.get(proxy.url("app.test", "/id")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "good", "request {i}");
        if i == 0 {
            // The first went to the dead machine (refused), then to good. Ejected now,
            // unless its back-off already ran out.
            first_view = Some((machine(&proxy, "bad").await.unwrap(), began.elapsed()));
        }
    }
    let elapsed = began.elapsed();
    let m = proxy.metrics().await;
    let failures = counter(&m, "tern_upstream_connect_errors_total");
    assert!(
        (1..=most_failures(elapsed)).contains(&failures),
        "{failures} refused connects in {elapsed:?}: the dead machine was tried again within its back-off"
    );
    assert_eq!(counter(&m, "tern_machine_ejections_total"), failures, "each failure here ejects");
    assert_eq!(counter(&m, "tern_upstream_retries_total"), failures, "each one retried on good");

    let (view, at) = first_view.unwrap();
    assert_eq!(view["connect_failures"], 1, "{view}");
    assert!(view["ejected"] == true || at >= Duration::from_secs(1), "{view} after {at:?}");
    if view["ejected"] == true {
        let left = view["ejected_ms_left"].as_u64().unwrap();
        assert!(left > 0 && left <= 1000, "{view}");
    }
    good.gate.notify_waiters();
    held.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_machine_costs_one_connect_timeout_not_one_per_request() {
    let good = Backend::start("good").await;
    let (_listener, _queued, hole) = blackhole().await;
    let connect_timeout = Duration::from_millis(500);
    let (proxy, client, held) =
        busy_good_then_bad(&good, hole, "[limits]\nconnect_timeout = \"500ms\"\n").await;

    let began = Instant::now();
    let mut slow = 0;
    for i in 0..10 {
        let sent = Instant::now();
        let r = client.get(proxy.url("app.test", "/id")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.text().await.unwrap(), "good", "request {i}");
        let took = sent.elapsed();
        if i == 0 {
            assert!(
                took >= connect_timeout,
                "the first request should have waited on the blackhole: {took:?}"
            );
        }
        if took >= connect_timeout {
            slow += 1;
        }
    }
    let elapsed = began.elapsed();
    let m = proxy.metrics().await;
    let timeouts = counter(&m, "tern_upstream_connect_errors_total");
    assert!(
        (1..=most_failures(elapsed)).contains(&timeouts),
        "{timeouts} connect timeouts in {elapsed:?}: requests kept waiting on the blackholed machine"
    );
    assert!(slow <= timeouts, "{slow} requests waited a connect timeout; {timeouts} timeouts");
    let view = machine(&proxy, "bad").await.unwrap();
    assert!(view["connect_failures"].as_u64().unwrap() >= 1, "{view}");
    good.gate.notify_waiters();
    held.await.unwrap();
}
