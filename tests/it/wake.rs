//! Waking stopped machines on request, with real processes run by the `process` driver.

use std::path::PathBuf;
use std::time::Duration;

use crate::harness::{Ca, HttpVersion, Proxy};

/// The example backend binary (`examples/bench_backend.rs`), which `cargo test` builds.
pub(crate) fn backend_bin() -> PathBuf {
    let tern = PathBuf::from(crate::harness::tern_bin());
    tern.parent().unwrap().join("examples").join("bench_backend")
}

/// A port for a machine that tern will start: see [`crate::harness::reserve_port`].
pub(crate) fn free_port() -> u16 {
    crate::harness::reserve_port()
}

fn sleepy_app(extra: &str, machines: &[(&str, u16, &str, Vec<String>)]) -> String {
    let mut d = format!("[[apps]]\nname = \"sleepy\"\nhostnames = [\"sleepy.test\"]\n{extra}\n");
    for (id, port, state, cmd) in machines {
        let cmd: Vec<String> = cmd.iter().map(|c| format!("{c:?}")).collect();
        d += &format!(
            "[[machines]]\nid = \"{id}\"\napp = \"sleepy\"\naddr = \"127.0.0.1:{port}\"\nstate = \"{state}\"\ncmd = [{}]\n",
            cmd.join(", ")
        );
    }
    d
}

/// App `app` (`app.test`) with one machine `m1` the process driver runs from the test
/// backend on a free port, declared in `state`: the declaration and the port.
pub(crate) fn one_process_machine(state: &str) -> (String, u16) {
    let port = free_port();
    let cmd: Vec<String> = backend_cmd(port).iter().map(|c| format!("{c:?}")).collect();
    let decl = format!(
        "[[apps]]\nname = \"app\"\nhostnames = [\"app.test\"]\n\n[[machines]]\nid = \"m1\"\napp = \"app\"\n\
         addr = \"127.0.0.1:{port}\"\nstate = \"{state}\"\ncmd = [{}]\n",
        cmd.join(", ")
    );
    (decl, port)
}

pub(crate) fn backend_cmd(port: u16) -> Vec<String> {
    vec![backend_bin().display().to_string(), format!("127.0.0.1:{port}")]
}

/// `n` GETs of `url` at once; each one's status and body.
pub(crate) async fn concurrent_gets(client: &reqwest::Client, url: &str, n: usize) -> Vec<(u16, String)> {
    let requests = (0..n).map(|_| {
        let (client, url) = (client.clone(), url.to_string());
        tokio::spawn(async move {
            let r = client.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    });
    futures_util::future::join_all(requests).await.into_iter().map(Result::unwrap).collect()
}

pub(crate) fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok()).unwrap_or(0.0)
}

pub(crate) async fn machine_state(proxy: &Proxy, id: &str) -> String {
    let v: serde_json::Value =
        reqwest::get(format!("http://{}/v1/apps/sleepy", proxy.admin)).await.unwrap().json().await.unwrap();
    let m = v["machines"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap();
    m["state"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_to_a_stopped_app_start_it_once_and_all_get_answers() {
    let port = free_port();
    let decl = sleepy_app(
        "max_pending = 5000\nwake_timeout = \"30s\"",
        &[("s1", port, "stopped", backend_cmd(port))],
    );
    let mut proxy = Proxy::start(&decl).await;
    assert_eq!(machine_state(&proxy, "s1").await, "stopped");

    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let url = proxy.url("sleepy.test", "/");
    let results = concurrent_gets(&client, &url, 1000).await;
    let ok = results.iter().filter(|(status, body)| *status == 200 && body == "hello, world\n").count();
    let bad: Vec<_> =
        results.iter().filter(|(status, body)| !(*status == 200 && body == "hello, world\n")).collect();
    let m = proxy.metrics().await;
    let counted: Vec<&str> = m
        .lines()
        .filter(|l| {
            l.starts_with("tern_errors_total")
                || l.starts_with("tern_upstream")
                || l.starts_with("tern_wakes")
        })
        .collect();
    assert_eq!(
        ok, 1000,
        "every held request answered by the woken machine: {bad:?}; tern counted {counted:#?}"
    );

    assert_eq!(
        metric(&m, "tern_machine_actions_total{action=\"start\",reason=\"wake\"}"),
        1.0,
        "exactly one start"
    );
    assert_eq!(metric(&m, "tern_wakes_total{result=\"ok\"}"), 1.0);
    assert_eq!(metric(&m, "tern_errors_total{code=\"wake_timeout\"}"), 0.0);
    assert_eq!(machine_state(&proxy, "s1").await, "started");

    // Shutdown stops the machine tern started.
    proxy.shutdown().await.unwrap().unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the machine's process is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_that_never_gets_ready_fails_every_held_request_at_the_deadline() {
    let port = free_port();
    // A process that runs but never listens.
    let cmd = vec!["sleep".to_string(), "600".to_string()];
    // Its start gives up a second after the requests do.
    let app = "wake_timeout = \"1s\"\nstart_timeout = \"2s\"\nkill_timeout = \"1s\"";
    let decl = sleepy_app(app, &[("s1", port, "stopped", cmd)]);
    let mut proxy = Proxy::start(&decl).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let started = tokio::time::Instant::now();
    let shapes =
        [("application/json", "application/json"), ("text/html", "text/html"), ("*/*", "text/plain")];
    let requests = shapes
        .iter()
        .map(|(accept, _)| client.get(proxy.url("sleepy.test", "/")).header("accept", *accept).send());
    let responses = futures_util::future::join_all(requests).await;
    let waited = started.elapsed();
    for (r, (_, content_type)) in responses.into_iter().zip(shapes) {
        let r = r.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["tern-error"], "wake_timeout");
        assert!(r.headers().contains_key("retry-after"));
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with(content_type));
    }
    assert!(waited >= Duration::from_millis(900), "held until the deadline, not failed early: {waited:?}");
    // The start is reported failed at its own deadline and the machine is back to stopped.
    let failed = crate::harness::eventually(Duration::from_secs(5), || async {
        let m = proxy.metrics().await;
        (metric(&m, "tern_wakes_total{result=\"failed\"}") == 1.0).then_some(())
    })
    .await;
    assert!(failed.is_some(), "the failed start is counted");
    assert_eq!(machine_state(&proxy, "s1").await, "stopped");
    proxy.shutdown().await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_user_agents_never_wake_a_machine() {
    let port = free_port();
    let decl =
        sleepy_app("wake_ignore_user_agents = [\"Slackbot\"]", &[("s1", port, "stopped", backend_cmd(port))]);
    let mut proxy = Proxy::start(&decl).await;
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let r = client
        .get(proxy.url("sleepy.test", "/"))
        .header("user-agent", "Slackbot-LinkExpanding 1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["tern-error"], "no_machine");
    assert_eq!(machine_state(&proxy, "s1").await, "stopped");
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "tern_machine_actions_total{action=\"start\",reason=\"wake\"}"), 0.0);

    // Anyone else wakes it.
    let r = client.get(proxy.url("sleepy.test", "/")).header("user-agent", "curl/8").send().await.unwrap();
    assert_eq!(r.status(), 200);
    proxy.shutdown().await.unwrap().unwrap();
}
