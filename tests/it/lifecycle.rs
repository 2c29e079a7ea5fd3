//! Machines that sleep and wake under load: capacity limits, health checks, autostop,
//! suspend and resume, and upgrades held across a wake. Machines are real processes
//! (`examples/test_machine.rs`) run by the `process` driver.

use std::path::PathBuf;
use std::time::Duration;

use crate::harness::{Ca, HttpVersion, Proxy, eventually};
use crate::wake::{free_port, metric};

pub(crate) fn machine_bin() -> PathBuf {
    let tern = PathBuf::from(crate::harness::tern_bin());
    tern.parent().unwrap().join("examples").join("test_machine")
}

/// A machine of app `app` listening on `port`, started by tern in `state`; `env` entries
/// (`START_DELAY_MS=300`) go into its environment.
pub(crate) fn machine(app: &str, id: &str, port: u16, state: &str, env: &[&str]) -> String {
    let mut cmd: Vec<String> = Vec::new();
    if !env.is_empty() {
        cmd.push("env".into());
        cmd.extend(env.iter().map(|e| (*e).to_string()));
    }
    cmd.push(machine_bin().display().to_string());
    cmd.push(format!("127.0.0.1:{port}"));
    let cmd: Vec<String> = cmd.iter().map(|c| format!("{c:?}")).collect();
    format!(
        "[[machines]]\nid = \"{id}\"\napp = \"{app}\"\naddr = \"127.0.0.1:{port}\"\nstate = \"{state}\"\ncmd = [{}]\n",
        cmd.join(", ")
    )
}

pub(crate) fn app(name: &str, extra: &str) -> String {
    format!("[[apps]]\nname = \"{name}\"\nhostnames = [\"{name}.test\"]\n{extra}\n")
}

pub(crate) async fn machine_json(proxy: &Proxy, app: &str, id: &str) -> serde_json::Value {
    let v: serde_json::Value =
        reqwest::get(format!("http://{}/v1/apps/{app}", proxy.admin)).await.unwrap().json().await.unwrap();
    v["machines"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap().clone()
}

/// Waits (up to `limit`) until the machine's admin JSON satisfies `f`.
pub(crate) async fn until_machine(
    proxy: &Proxy,
    app: &str,
    id: &str,
    limit: Duration,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let m = machine_json(proxy, app, id).await;
        if f(&m) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "machine {id} never reached the expected condition; last seen {m}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub(crate) async fn metric_now(proxy: &Proxy, name: &str) -> f64 {
    metric(&proxy.metrics().await, name)
}

/// A WebSocket through tern's plain listener.
pub(crate) type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// An SSE stream (its first event read) and a WebSocket (one message echoed), both open
/// through `proxy` on app `live`'s machine.
pub(crate) async fn live_streams(proxy: &Proxy) -> (reqwest::Response, Ws) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let mut sse = client.get(proxy.url("live.test", "/sse")).send().await.unwrap();
    assert_eq!(sse.chunk().await.unwrap().unwrap(), "data: one\n\n");
    let tcp = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://live.test/ws", tcp).await.unwrap();
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hi"));
    (sse, ws)
}

/// Both streams end cleanly, within 10 s: the WebSocket with a 1001 (going away) close frame,
/// the SSE stream with the end of its body, not an error.
pub(crate) async fn ended_cleanly(mut sse: reqwest::Response, mut ws: Ws) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("no close frame came") {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a close frame, got {other:?}"),
    }
    while let Some(Ok(_)) = ws.next().await {}
    assert!(sse.chunk().await.expect("a clean end, not an error").is_none());
}

/// Asks a machine directly (not through tern): `/release`, `/sick`, `/well`.
pub(crate) async fn poke(port: u16, path: &str) {
    let r = reqwest::get(format!("http://127.0.0.1:{port}{path}")).await.unwrap();
    assert!(r.status().is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_and_hard_limits_steer_wake_and_queue() {
    let (p1, p2) = (free_port(), free_port());
    let decl = app("busy", "concurrency = { soft_limit = 1, hard_limit = 2 }\nwake_timeout = \"1s\"")
        + &machine("busy", "b1", p1, "started", &[])
        + &machine("busy", "b2", p2, "stopped", &[]);
    let mut proxy = Proxy::start(&decl).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let url = |path: &str| proxy.url("busy.test", path);
    until_machine(&proxy, "busy", "b1", Duration::from_secs(10), |m| m["state"] == "started").await;
    let get = |path: &str| {
        let (client, url) = (client.clone(), url(path));
        tokio::spawn(async move {
            let r = client.get(url).send().await.unwrap();
            (r.status().as_u16(), r.headers().get("tern-error").cloned(), r.text().await.unwrap())
        })
    };
    let in_flight = |n: u64| move |m: &serde_json::Value| m["in_flight"] == n;

    // Under the soft limit: b1 takes it, nothing else wakes.
    let a = get("/hang");
    until_machine(&proxy, "busy", "b1", Duration::from_secs(5), in_flight(1)).await;
    assert_eq!(machine_json(&proxy, "busy", "b2").await["state"], "stopped");
    // b1 is at its soft limit: the next request still goes to b1 (room under hard), and
    // b2 wakes for what comes after.
    let b = get("/hang");
    until_machine(&proxy, "busy", "b1", Duration::from_secs(5), in_flight(2)).await;
    until_machine(&proxy, "busy", "b2", Duration::from_secs(10), |m| m["state"] == "started").await;
    assert_eq!(
        metric_now(&proxy, "tern_machine_actions_total{action=\"start\",reason=\"capacity\"}").await,
        1.0
    );
    // b1 is at its hard limit: new work goes to b2.
    let r = client.get(url("/id")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "b2");
    let d = get("/hang");
    until_machine(&proxy, "busy", "b2", Duration::from_secs(5), in_flight(1)).await;
    let e = get("/hang");
    until_machine(&proxy, "busy", "b2", Duration::from_secs(5), in_flight(2)).await;

    // Both at their hard limit: the next request queues until an exchange ends.
    let queued = get("/id");
    let held = eventually(Duration::from_secs(5), || async {
        (metric_now(&proxy, "tern_held_requests").await == 1.0).then_some(())
    })
    .await;
    assert!(held.is_some(), "the request is held, not sent to a full machine");
    assert_eq!(machine_json(&proxy, "busy", "b1").await["in_flight"], 2, "b1 never went past its hard limit");
    poke(p1, "/release").await;
    assert_eq!(a.await.unwrap().2, "released");
    assert_eq!(b.await.unwrap().2, "released");
    assert_eq!(queued.await.unwrap(), (200, None, "b1".to_string()), "the queued request got b1's room");

    // Full again, and nothing frees up: the queued request gets 503 queue_full at the deadline.
    let a = get("/hang");
    let b = get("/hang");
    until_machine(&proxy, "busy", "b1", Duration::from_secs(5), in_flight(2)).await;
    let started = tokio::time::Instant::now();
    let (status, code, _) = get("/id").await.unwrap();
    assert_eq!((status, code.unwrap()), (503, "queue_full".parse().unwrap()));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "held until wake_timeout: {:?}",
        started.elapsed()
    );
    poke(p1, "/release").await;
    poke(p2, "/release").await;
    for h in [a, b, d, e] {
        assert_eq!(h.await.unwrap().0, 200);
    }
    proxy.shutdown().await.unwrap().unwrap();
}

/// Waits until the supervisor has made `n` more passes than now: a real event to wait on
/// when a test must show that something did *not* happen.
async fn passes(proxy: &Proxy, n: f64) {
    let start = metric_now(proxy, "tern_supervisor_passes_total").await;
    let done = eventually(Duration::from_secs(20), || async {
        (metric_now(proxy, "tern_supervisor_passes_total").await >= start + n).then_some(())
    })
    .await;
    assert!(done.is_some(), "the supervisor kept running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_check_takes_a_machine_out_of_routing_and_a_passing_one_brings_it_back() {
    let (p1, p2) = (free_port(), free_port());
    let checks =
        "[[apps.checks]]\ntype = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"1s\"";
    let decl = app("chk", checks)
        + &machine("chk", "c1", p1, "started", &[])
        + &machine("chk", "c2", p2, "started", &[]);
    let mut proxy = Proxy::start(&decl).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    for id in ["c1", "c2"] {
        until_machine(&proxy, "chk", id, Duration::from_secs(10), |m| m["state"] == "started").await;
    }
    let ids = |n: usize| {
        let (client, url) = (client.clone(), proxy.url("chk.test", "/id"));
        async move {
            let mut seen = Vec::new();
            for _ in 0..n {
                seen.push(client.get(&url).send().await.unwrap().text().await.unwrap());
            }
            seen
        }
    };
    poke(p1, "/sick").await;
    until_machine(&proxy, "chk", "c1", Duration::from_secs(5), |m| m["healthy"] == false).await;
    assert!(ids(30).await.iter().all(|id| id == "c2"), "a failing machine takes no requests");
    let m = machine_json(&proxy, "chk", "c1").await;
    assert_eq!(m["state"], "started", "a check never stops a machine");
    assert!(metric_now(&proxy, "tern_checks_total{app=\"chk\",result=\"fail\"}").await >= 1.0);

    poke(p1, "/well").await;
    until_machine(&proxy, "chk", "c1", Duration::from_secs(5), |m| m["healthy"] == true).await;
    assert!(ids(30).await.iter().any(|id| id == "c1"), "back in routing once it passes");
    proxy.shutdown().await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autostop_keeps_min_machines_running_and_spares_a_machine_with_an_open_stream() {
    // Two idle machines, at least one running: exactly one is stopped.
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let decl = app("idle", "auto_stop = \"stop\"\nauto_stop_after = \"1s\"\nmin_machines_running = 1")
        + &machine("idle", "i1", p1, "started", &[])
        + &machine("idle", "i2", p2, "started", &[])
        + &app("streamy", "auto_stop = \"stop\"\nauto_stop_after = \"1s\"")
        + &machine("streamy", "s1", p3, "started", &[]);
    let mut proxy = Proxy::start(&decl).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    until_machine(&proxy, "streamy", "s1", Duration::from_secs(10), |m| m["state"] == "started").await;
    // An SSE stream that stays open (one event, then silence).
    let mut sse = client.get(proxy.url("streamy.test", "/sse")).send().await.unwrap();
    assert_eq!(sse.chunk().await.unwrap().unwrap(), "data: one\n\n");

    let stopped = eventually(Duration::from_secs(20), || async {
        let states = [machine_json(&proxy, "idle", "i1").await, machine_json(&proxy, "idle", "i2").await];
        (states.iter().filter(|m| m["state"] == "stopped").count() == 1).then_some(())
    })
    .await;
    assert!(stopped.is_some(), "one idle machine was stopped");
    assert_eq!(
        metric_now(&proxy, "tern_machine_actions_total{action=\"stop\",reason=\"autostop\"}").await,
        1.0
    );
    // Well past the window, several passes later: still one running, and the streaming
    // machine still serves its stream.
    passes(&proxy, 3.0).await;
    let states = [machine_json(&proxy, "idle", "i1").await, machine_json(&proxy, "idle", "i2").await];
    assert_eq!(states.iter().filter(|m| m["state"] == "started").count(), 1, "min_machines_running holds");
    assert_eq!(machine_json(&proxy, "streamy", "s1").await["state"], "started", "an open stream is activity");
    assert_eq!(
        metric_now(&proxy, "tern_machine_actions_total{action=\"stop\",reason=\"autostop\"}").await,
        1.0
    );

    // The stream goes on; once it ends, the machine is stopped after the window.
    poke(p3, "/release").await;
    assert_eq!(sse.chunk().await.unwrap().unwrap(), "data: two\n\n");
    assert!(sse.chunk().await.unwrap().is_none(), "the stream ended cleanly");
    until_machine(&proxy, "streamy", "s1", Duration::from_secs(20), |m| m["state"] == "stopped").await;
    assert!(std::net::TcpStream::connect(("127.0.0.1", p3)).is_err(), "its process is gone");
    proxy.shutdown().await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_machine_resumes_and_answers() {
    let port = free_port();
    let decl = app("frozen", "auto_stop = \"suspend\"\nauto_stop_after = \"1s\"")
        + &machine("frozen", "f1", port, "started", &[]);
    let mut proxy = Proxy::start(&decl).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    until_machine(&proxy, "frozen", "f1", Duration::from_secs(10), |m| m["state"] == "started").await;
    let before = client.get(proxy.url("frozen.test", "/id")).send().await.unwrap().text().await.unwrap();
    assert_eq!(before, "f1");
    until_machine(&proxy, "frozen", "f1", Duration::from_secs(20), |m| m["state"] == "suspended").await;

    let started = tokio::time::Instant::now();
    let r = client.get(proxy.url("frozen.test", "/id")).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "f1", "the same process, thawed");
    assert_eq!(
        metric_now(&proxy, "tern_machine_actions_total{action=\"resume\",reason=\"wake\"}").await,
        1.0
    );
    assert_eq!(metric_now(&proxy, "tern_machine_actions_total{action=\"start\",reason=\"wake\"}").await, 0.0);
    eprintln!("resumed and answered in {took:?}");
    proxy.shutdown().await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_is_held_across_a_wake() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let port = free_port();
    // The app takes 300 ms to boot, so the upgrade really waits.
    let decl = app("wsapp", "") + &machine("wsapp", "w1", port, "stopped", &["START_DELAY_MS=300"]);
    let mut proxy = Proxy::start(&decl).await;
    let tcp = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let started = tokio::time::Instant::now();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://wsapp.test/ws", tcp).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited for the boot");
    ws.send(Message::text("after the wake")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("after the wake"));
    ws.close(None).await.unwrap();
    drop(ws);
    assert_eq!(metric_now(&proxy, "tern_wakes_total{result=\"ok\"}").await, 1.0);
    proxy.shutdown().await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_held_for_an_h2c_machine_share_one_connection_per_worker() {
    let port = free_port();
    let decl = app("grpcish", "[apps.http_options]\nh2_backend = true")
        + &machine("grpcish", "g1", port, "stopped", &["START_DELAY_MS=200"]);
    let mut proxy = Proxy::start(&decl).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let url = proxy.url("grpcish.test", "/id");
    let results = crate::wake::concurrent_gets(&client, &url, 100).await;
    let ok = results.iter().filter(|(status, id)| *status == 200 && id == "g1").count();
    assert_eq!(ok, 100);
    // One HTTP/2 connection per tern worker (2 here) carries every held request, rather
    // than one connection each, opened all at once against a machine that just booted.
    let connects = metric_now(&proxy, "tern_upstream_connect_duration_seconds_count").await;
    assert!((1.0..=2.0).contains(&connects), "{connects} connections opened to the machine");
    proxy.shutdown().await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_declared_stopped_ends_its_streams_cleanly_then_stops() {
    let port = free_port();
    let decl = |state: &str| app("live", "") + &machine("live", "l1", port, state, &[]);
    let mut proxy = Proxy::start(&decl("started")).await;
    until_machine(&proxy, "live", "l1", Duration::from_secs(10), |m| m["state"] == "started").await;
    let (sse, ws) = live_streams(&proxy).await;

    // The operator declares the machine stopped while both streams are open.
    proxy.apply(&decl("stopped"));
    ended_cleanly(sse, ws).await;
    // Then its process is stopped.
    eventually(Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err().then_some(())
    })
    .await
    .expect("the machine's process is stopped");
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "tern_machine_actions_total{action=\"stop\",reason=\"declared\"}"), 1.0);
    assert_eq!(metric(&m, "tern_streams_ended_total{how=\"clean\",kind=\"sse\"}"), 1.0);
    assert_eq!(metric(&m, "tern_streams_ended_total{how=\"clean\",kind=\"websocket\"}"), 1.0);
    assert_eq!(machine_json(&proxy, "live", "l1").await["state"], "stopped");
    proxy.shutdown().await.unwrap().unwrap();
}

/// tern killed outright (a crash, SIGKILL) cannot stop its machines; the next `tern serve`
/// must stop what the last one left before starting the machine again, or the leftover
/// would keep the port and answer in place of the machine tern runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_left_running_by_a_killed_tern_is_stopped_by_the_next_one() {
    use crate::harness::{self, ServeProcess};
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    harness::apply_decl(&db, &(app("left", "") + &machine("left", "l1", port, "started", &[])));
    let config = dir.path().join("tern.toml");
    std::fs::write(&config, harness::node_config(&db, "") + "format = \"json\"\n").unwrap();
    harness::install_crypto();
    let pid_through = |tern: &ServeProcess| {
        let url = format!("http://left.test:{}/pid", tern.http.port());
        let client = harness::client_for(tern.http, tern.https, &Ca::new(), HttpVersion::Http1);
        async move {
            let r = client.get(url).send().await.ok()?;
            if r.status() != 200 {
                return None;
            }
            r.text().await.ok()?.parse::<u32>().ok()
        }
    };
    let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();

    let mut first = ServeProcess::start(&config).await;
    let old = eventually(Duration::from_secs(10), || pid_through(&first)).await.expect("the machine answers");
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();
    assert!(alive(old), "killed outright, tern left its machine running");

    let mut second = ServeProcess::start(&config).await;
    eventually(Duration::from_secs(10), || async { (!alive(old)).then_some(()) })
        .await
        .expect("the leftover machine process is stopped");
    let new =
        eventually(Duration::from_secs(10), || pid_through(&second)).await.expect("the machine answers");
    assert_ne!(new, old, "a process tern runs now, not the leftover");

    let pid = second.pid().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    second.child.wait().await.unwrap();
    assert!(!alive(new), "a clean shutdown stops the machine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_queued_for_room_are_served_in_arrival_order() {
    let port = free_port();
    let decl = app("fair", "concurrency = { soft_limit = 1, hard_limit = 1 }\nwake_timeout = \"30s\"")
        + &machine("fair", "f1", port, "started", &[]);
    let mut proxy = Proxy::start(&decl).await;
    until_machine(&proxy, "fair", "f1", Duration::from_secs(10), |m| m["state"] == "started").await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    // One request takes the machine's only slot and keeps it.
    let holder = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url("fair.test", "/hang"));
        async move { client.get(url).send().await.unwrap().status() }
    });
    until_machine(&proxy, "fair", "f1", Duration::from_secs(10), |m| m["in_flight"] == 1).await;
    // Six more queue behind it, one after the other.
    let mut queued = Vec::new();
    for i in 0..6 {
        let (client, url) = (client.clone(), proxy.url("fair.test", "/seq"));
        queued.push(tokio::spawn(async move {
            let r = client.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }));
        let held = f64::from(i + 1);
        eventually(Duration::from_secs(10), || async {
            (metric_now(&proxy, "tern_held_requests").await == held).then_some(())
        })
        .await
        .expect("the request is queued");
    }
    poke(port, "/release").await;
    assert_eq!(holder.await.unwrap(), 200);
    // The machine numbers requests as they reach it: the queue went out in arrival order.
    let mut arrivals = Vec::new();
    for q in queued {
        let (status, seq) = q.await.unwrap();
        assert_eq!(status, 200);
        arrivals.push(seq.parse::<u64>().unwrap());
    }
    let mut sorted = arrivals.clone();
    sorted.sort_unstable();
    assert_eq!(arrivals, sorted, "served out of order");
    proxy.shutdown().await.unwrap().unwrap();
}
