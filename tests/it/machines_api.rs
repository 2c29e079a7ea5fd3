//! The `machines-api` driver, driven as a user would (requests through tern), against
//! [`MockOrchestrator`]: a small in-repo HTTP server that **stands in for a real Fly Machines
//! API orchestrator** (a mock: no real orchestrator can run here). It serves the endpoints tern
//! calls with the documented Fly shapes, but its machines are real: `start` runs the example
//! backend (`examples/bench_backend.rs`) on the machine's port and `stop` kills it. It records
//! every call (method, path and query, `Authorization`, body) and answers 401 to any request
//! without the right bearer token.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;

use crate::harness::{Ca, HttpVersion, Proxy, app_decl};

/// One call the mock orchestrator received.
#[derive(Clone, Debug)]
struct Call {
    method: String,
    /// Path and query, as sent.
    target: String,
    authorization: Option<String>,
    body: String,
}

/// A mock standing in for a Fly Machines API orchestrator; see the module doc.
struct MockOrchestrator {
    addr: SocketAddr,
    state: Arc<MockState>,
    task: tokio::task::JoinHandle<()>,
}

struct MockState {
    token: String,
    calls: Mutex<Vec<Call>>,
    /// By (app, machine id).
    machines: Mutex<HashMap<(String, String), MockMachine>>,
    /// Answer `start` of a started machine with 412, as an orchestrator may, instead of 200.
    refuse_restart: AtomicBool,
}

struct MockMachine {
    port: u16,
    /// The backend's process, while the machine is started.
    process: Option<tokio::process::Child>,
}

impl MockOrchestrator {
    /// Serves on 127.0.0.1:0; `machines` are (app, id, port), all stopped.
    async fn start(token: &str, machines: &[(&str, &str, u16)]) -> MockOrchestrator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(MockState {
            token: token.to_string(),
            calls: Mutex::new(Vec::new()),
            refuse_restart: AtomicBool::new(false),
            machines: Mutex::new(
                machines
                    .iter()
                    .map(|(app, id, port)| {
                        ((app.to_string(), id.to_string()), MockMachine { port: *port, process: None })
                    })
                    .collect(),
            ),
        });
        let served = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = served.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(state.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        MockOrchestrator { addr, state, task }
    }

    /// Starts a machine behind tern's back, as if it had been running before tern started.
    fn boot(&self, app: &str, id: &str) {
        let mut machines = self.state.machines.lock();
        let m = machines.get_mut(&(app.to_string(), id.to_string())).unwrap();
        m.process = Some(spawn_backend(m.port));
    }

    fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().clone()
    }

    /// The `[driver]` table pointing tern at this mock.
    fn driver_config(&self, token: &str) -> String {
        format!("[driver]\nkind = \"machines-api\"\nurl = \"http://{}\"\ntoken = \"{token}\"\n", self.addr)
    }
}

impl Drop for MockOrchestrator {
    fn drop(&mut self) {
        self.task.abort();
        for m in self.state.machines.lock().values_mut() {
            if let Some(c) = m.process.as_mut() {
                let _ = c.start_kill();
            }
        }
    }
}

impl MockState {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let method = req.method().to_string();
        let target = req.uri().path_and_query().map_or("", |p| p.as_str()).to_string();
        let authorization =
            req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(String::from);
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let body = String::from_utf8_lossy(&body).into_owned();
        self.calls.lock().push(Call { method: method.clone(), target: target.clone(), authorization, body });
        let authorized = self.calls.lock().last().and_then(|c| c.authorization.clone())
            == Some(format!("Bearer {}", self.token));
        if !authorized {
            return answer(StatusCode::UNAUTHORIZED, r#"{"error":"unauthorized"}"#);
        }

        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let parts: Vec<&str> = path.split('/').collect();
        let (app, id, action) = match parts[..] {
            ["", "v1", "apps", app, "machines", id, action] => (app, id, action),
            ["", "v1", "apps", app, "machines", id] => (app, id, ""),
            _ => return answer(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#),
        };
        let key = (app.to_string(), id.to_string());
        let Some(port) = self.machines.lock().get(&key).map(|m| m.port) else {
            return answer(StatusCode::NOT_FOUND, r#"{"error":"machine not found"}"#);
        };
        match (method.as_str(), action) {
            ("POST", "start") => {
                let mut machines = self.machines.lock();
                let child = &mut machines.get_mut(&key).unwrap().process;
                if child.is_some() && self.refuse_restart.load(Ordering::SeqCst) {
                    return answer(
                        StatusCode::PRECONDITION_FAILED,
                        r#"{"error":"failed_precondition: machine still active, refusing to start"}"#,
                    );
                }
                let previous = if child.is_some() { "started" } else { "stopped" };
                if child.is_none() {
                    *child = Some(spawn_backend(port));
                }
                answer(StatusCode::OK, &format!(r#"{{"previous_state":"{previous}","migrated":false}}"#))
            }
            ("GET", "") => {
                let started = self.machines.lock().get(&key).is_some_and(|m| m.process.is_some());
                let state = if started { "started" } else { "stopped" };
                answer(
                    StatusCode::OK,
                    &format!(r#"{{"id":"{id}","state":"{state}","instance_id":"01MOCK{id}"}}"#),
                )
            }
            ("GET", "wait") => {
                let started = self.machines.lock().get(&key).is_some_and(|m| m.process.is_some());
                let wanted = query.split('&').find_map(|kv| kv.strip_prefix("state="));
                // As Fly's API: waiting for `stopped` needs the machine's instance_id.
                if wanted == Some("stopped")
                    && !query.split('&').any(|kv| kv == format!("instance_id=01MOCK{id}"))
                {
                    return answer(StatusCode::BAD_REQUEST, r#"{"error":"instance_id is required"}"#);
                }
                match (wanted, started) {
                    (Some("started"), true) | (Some("stopped"), false) => {
                        answer(StatusCode::OK, r#"{"ok":true}"#)
                    }
                    (Some("started" | "stopped"), _) => {
                        answer(StatusCode::REQUEST_TIMEOUT, r#"{"error":"deadline_exceeded"}"#)
                    }
                    _ => answer(
                        StatusCode::BAD_REQUEST,
                        r#"{"error":"this mock waits for started or stopped"}"#,
                    ),
                }
            }
            ("POST", "stop") => {
                let child = self.machines.lock().get_mut(&key).unwrap().process.take();
                if let Some(mut c) = child {
                    c.kill().await.unwrap();
                }
                answer(StatusCode::OK, r#"{"ok":true}"#)
            }
            ("POST", "suspend") => answer(StatusCode::OK, r#"{"ok":true}"#),
            _ => answer(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#),
        }
    }
}

/// The machine itself: the example backend on its port.
fn spawn_backend(port: u16) -> tokio::process::Child {
    tokio::process::Command::new(crate::wake::backend_bin())
        .arg(format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn answer(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", "application/json".parse().unwrap());
    r
}

/// A port for the machine the mock will start: see [`crate::harness::reserve_port`].
fn free_port() -> u16 {
    crate::harness::reserve_port()
}

fn sleepy(port: u16, state: &str) -> String {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // No cmd: under machines-api the orchestrator runs every machine.
    app_decl("sleepy", &["sleepy.test"], &[("m1", addr, state)], "wake_timeout = \"30s\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_orchestrator_a_request_wakes_a_stopped_machine_through_the_api_and_shutdown_stops_it() {
    let port = free_port();
    let mock = MockOrchestrator::start("s3cret", &[("sleepy", "m1", port)]).await;
    let mut proxy = Proxy::start_with(&sleepy(port, "stopped"), &mock.driver_config("s3cret")).await;

    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let r = client.get(proxy.url("sleepy.test", "/")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.headers().get("tern-error"));
    assert_eq!(r.text().await.unwrap(), "hello, world\n");

    let calls = mock.calls();
    assert!(calls.iter().all(|c| c.authorization.as_deref() == Some("Bearer s3cret")), "{calls:#?}");
    let starts: Vec<_> =
        calls.iter().filter(|c| c.method == "POST" && c.target.ends_with("/start")).collect();
    assert_eq!(starts.len(), 1, "exactly one start: {calls:#?}");
    assert_eq!(starts[0].target, "/v1/apps/sleepy/machines/m1/start");
    assert!(
        calls.iter().any(|c| c.method == "GET"
            && c.target.starts_with("/v1/apps/sleepy/machines/m1/wait?")
            && c.target.contains("state=started")),
        "start waits for the orchestrator to say started: {calls:#?}"
    );
    assert!(!calls.iter().any(|c| c.target.ends_with("/stop")), "nothing stopped yet: {calls:#?}");

    // Shutdown stops the machine this tern woke, through the API.
    proxy.shutdown().await.unwrap().unwrap();
    let calls = mock.calls();
    let stops: Vec<_> = calls.iter().filter(|c| c.method == "POST" && c.target.ends_with("/stop")).collect();
    assert_eq!(stops.len(), 1, "{calls:#?}");
    assert_eq!(stops[0].target, "/v1/apps/sleepy/machines/m1/stop");
    assert!(
        calls.iter().any(|c| c.method == "GET"
            && c.target.starts_with("/v1/apps/sleepy/machines/m1/wait?")
            && c.target.contains("instance_id=01MOCKm1&state=stopped")),
        "stop waits for the orchestrator to say stopped, given the instance_id it read: {calls:#?}"
    );
    assert_eq!(stops[0].authorization.as_deref(), Some("Bearer s3cret"));
    let body: serde_json::Value = serde_json::from_str(&stops[0].body).unwrap();
    assert_eq!(body, serde_json::json!({"signal": "SIGTERM", "timeout": "5s"}), "kill_timeout's default");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the machine's process is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_orchestrator_a_wrong_token_fails_the_wake_at_once_with_wake_failed() {
    let port = free_port();
    let mock = MockOrchestrator::start("s3cret", &[("sleepy", "m1", port)]).await;
    let mut proxy = Proxy::start_with(&sleepy(port, "stopped"), &mock.driver_config("wrong")).await;

    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let asked = tokio::time::Instant::now();
    let r = client.get(proxy.url("sleepy.test", "/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["tern-error"], "wake_failed");
    // Failed on the 401, not held until wake_timeout (30 s).
    assert!(asked.elapsed() < Duration::from_secs(10), "{:?}", asked.elapsed());

    let calls = mock.calls();
    let start = calls.iter().find(|c| c.target.ends_with("/start")).expect("tern asked to start");
    assert_eq!(start.authorization.as_deref(), Some("Bearer wrong"));
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the mock started nothing");
    proxy.shutdown().await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_orchestrator_a_machine_already_started_is_adopted_at_tern_start_even_if_start_is_refused() {
    let port = free_port();
    let mock = MockOrchestrator::start("s3cret", &[("sleepy", "m1", port)]).await;
    mock.boot("sleepy", "m1");
    mock.state.refuse_restart.store(true, Ordering::SeqCst);
    let mut proxy = Proxy::start_with(&sleepy(port, "started"), &mock.driver_config("s3cret")).await;

    // tern adopts the machine recorded started: start (refused with 412), then the wait
    // endpoint says it is started, so the adoption succeeds rather than stopping it.
    let adopted = crate::harness::eventually(Duration::from_secs(10), || async {
        let m = proxy.metrics().await;
        m.lines().any(|l| l == "tern_wakes_total{result=\"ok\"} 1").then_some(())
    })
    .await;
    assert!(adopted.is_some(), "adopted: {:#?}\n{}", mock.calls(), proxy.metrics().await);
    let calls = mock.calls();
    assert!(calls.iter().any(|c| c.target.ends_with("/start")), "{calls:#?}");
    assert!(calls.iter().any(|c| c.target.contains("/wait?state=started")), "{calls:#?}");
    assert!(!calls.iter().any(|c| c.target.ends_with("/stop")), "never stopped: {calls:#?}");

    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let r = client.get(proxy.url("sleepy.test", "/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello, world\n");

    // Adopted means run by this tern: shutdown stops it.
    proxy.shutdown().await.unwrap().unwrap();
    assert!(mock.calls().iter().any(|c| c.target == "/v1/apps/sleepy/machines/m1/stop"));
}
