//! The admin endpoints: `/healthz`, `/metrics`, `/v1/apps/{app}`, `/v1/session-keys`,
//! `/v1/watchdog` (read-only views; no secret is ever shown), and the operations
//! `POST /v1/upgrade`, `POST /v1/drain` and, with `[debug] faults`, `POST /v1/debug/faults/*`.
//! Served on their own address, never on a public listener: whoever reaches it can restart
//! tern, so keep it on loopback or a management network.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::catalog::{AppEntry, Catalog, Snapshot};
use crate::telemetry::Metrics;

/// Whether the node serves or drains; `/healthz` answers 503 while draining so that a load
/// balancer or BGP speaker takes the node out before it stops.
#[derive(Debug, Default)]
pub struct Health {
    draining: AtomicBool,
}

impl Health {
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

pub struct Admin {
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// Where operations (upgrade, drain, faults) go: the node's control loop.
    pub control: Option<mpsc::UnboundedSender<Control>>,
    /// `[debug] faults`: whether `/v1/debug/faults/*` exists.
    pub faults: bool,
    /// `GET /v1/watchdog`, and `/healthz` 503 while wedged.
    pub watchdog: Option<Arc<crate::watchdog::Watchdog>>,
}

/// An operation asked of the node through the admin address.
#[derive(Debug)]
pub enum Control {
    /// Hand the listening sockets to a fresh process (`binary`, or this one's) and drain.
    Upgrade { binary: Option<std::path::PathBuf>, reply: oneshot::Sender<Result<u32, String>> },
    /// Turn `/healthz` 503, wait `drain_delay`, drain, exit 0.
    Drain { reply: oneshot::Sender<Result<(), String>> },
    /// Fault injection: `deadlock`, `block-worker`, `spin`, `panic`.
    Fault { kind: String, reply: oneshot::Sender<Result<String, String>> },
}

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(target: "tern::admin", error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = crate::shutdown::requested(&mut stop) => return,
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(admin.handle(req).await) }
                });
                // One request per connection: a health check after an upgrade then always
                // reaches the process that serves, never a kept-alive line to the old one.
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(target: "tern::admin", error = %e, "admin connection ended");
                }
            });
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() == Method::POST {
            return self.operate(req).await;
        }
        self.route(&req)
    }

    /// `POST`: operations, each answered once the node has done (or refused) it.
    async fn operate(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let Some(control) = &self.control else {
            return text(StatusCode::SERVICE_UNAVAILABLE, "this node takes no operations\n");
        };
        let body =
            match http_body_util::BodyExt::collect(http_body_util::Limited::new(req.into_body(), 64 * 1024))
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "the request body could not be read (64 KiB at most)\n",
                    );
                }
            };
        match path.as_str() {
            "/v1/upgrade" => {
                let binary = match serde_json::from_slice::<UpgradeRequest>(if body.is_empty() {
                    b"{}"
                } else {
                    &body
                }) {
                    Ok(r) => r.binary,
                    Err(e) => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            &format!("expected {{\"binary\": \"/path\"}}: {e}\n"),
                        );
                    }
                };
                if let Some(b) = &binary
                    && !b.is_absolute()
                {
                    return text(StatusCode::BAD_REQUEST, "binary must be an absolute path\n");
                }
                let (reply, answer) = oneshot::channel();
                let _ = control.send(Control::Upgrade { binary, reply });
                match answer.await {
                    Ok(Ok(pid)) => {
                        json(StatusCode::OK, &serde_json::json!({"pid": pid, "previous": std::process::id()}))
                    }
                    Ok(Err(e)) => json(StatusCode::INTERNAL_SERVER_ERROR, &serde_json::json!({"error": e})),
                    Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "the node is stopping\n"),
                }
            }
            "/v1/drain" => {
                let (reply, answer) = oneshot::channel();
                let _ = control.send(Control::Drain { reply });
                match answer.await {
                    Ok(Ok(())) => json(
                        StatusCode::OK,
                        &serde_json::json!({"draining": true, "pid": std::process::id()}),
                    ),
                    Ok(Err(e)) => json(StatusCode::CONFLICT, &serde_json::json!({"error": e})),
                    Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "the node is stopping\n"),
                }
            }
            p => match p.strip_prefix("/v1/debug/faults/") {
                Some(kind) if self.faults => {
                    let (reply, answer) = oneshot::channel();
                    let _ = control.send(Control::Fault { kind: kind.to_string(), reply });
                    match answer.await {
                        Ok(Ok(what)) => {
                            json(StatusCode::OK, &serde_json::json!({"fault": kind, "injected": what}))
                        }
                        Ok(Err(e)) => json(StatusCode::NOT_FOUND, &serde_json::json!({"error": e})),
                        Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "the node is stopping\n"),
                    }
                }
                _ => text(StatusCode::NOT_FOUND, "not found\n"),
            },
        }
    }

    fn route(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET, or POST for operations\n");
        }
        let path = req.uri().path();
        match path {
            "/healthz" if self.health.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
            "/healthz" if self.watchdog.as_ref().is_some_and(|w| w.is_wedged()) => {
                text(StatusCode::SERVICE_UNAVAILABLE, "wedged\n")
            }
            "/v1/watchdog" => match &self.watchdog {
                Some(w) => {
                    let mut status = w.status_json();
                    status["pid"] = serde_json::json!(std::process::id());
                    json(StatusCode::OK, &status)
                }
                None => text(StatusCode::NOT_FOUND, "no watchdog\n"),
            },
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/metrics" => {
                let mut r = text(StatusCode::OK, &self.metrics.render());
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, "text/plain; version=0.0.4".parse().expect("static"));
                r
            }
            "/v1/session-keys" => json(StatusCode::OK, &session_keys_json(&self.catalog.load())),
            _ => match path.strip_prefix("/v1/apps/") {
                Some(name) if !name.is_empty() && !name.contains('/') => {
                    match self.catalog.load().app(name) {
                        Some(app) => json(StatusCode::OK, &app_json(app)),
                        None => {
                            json(StatusCode::NOT_FOUND, &serde_json::json!({"error": "no_app", "name": name}))
                        }
                    }
                }
                _ => text(StatusCode::NOT_FOUND, "not found\n"),
            },
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UpgradeRequest {
    #[serde(default)]
    binary: Option<std::path::PathBuf>,
}

/// What the catalog holds for an app, as `/v1/apps/{app}` shows it.
pub fn app_json(app: &AppEntry) -> serde_json::Value {
    let now = crate::clock::now_ms();
    let machines: Vec<_> = app
        .machines
        .iter()
        .map(|m| {
            let outlier = m.live.outlier().status(now);
            let mut json = serde_json::json!({
                "id": &*m.id,
                "state": m.state().as_str(),
                "region": m.region(),
                "addr": m.addr.to_string(),
                "in_flight": m.live.in_flight(),
                "healthy": m.live.healthy(),
                "in_rotation": m.live.in_rotation(),
                "state_version": m.live.state_version(),
                "ejected": outlier.ejected,
                "ejected_ms_left": outlier.left_ms,
                "connect_failures": outlier.failures,
            });
            // Fleets: the node that runs it, and whether this node hears it beat.
            if let (Some(node), Some(live)) = (&m.spec.node, &m.owner) {
                json["node"] = serde_json::json!(node);
                json["node_alive"] = serde_json::json!(live.alive());
            }
            json
        })
        .collect();
    let mut json = serde_json::json!({
        "name": &*app.name,
        "org": app.spec.org,
        "hostnames": app.spec.hostnames,
        "internal_port": app.spec.internal_port,
        "public": app.spec.public,
        "machines": machines,
    });
    // Only where declared: most apps have neither.
    if !app.spec.private_addrs.is_empty() {
        json["private_addrs"] = serde_json::json!(app.spec.private_addrs);
    }
    if !app.spec.services.is_empty() || !app.spec.addrs.is_empty() {
        json["addrs"] = serde_json::json!(app.spec.addrs);
        json["services"] = serde_json::json!(app.spec.services);
    }
    json
}

/// The session keys this node holds, as `/v1/session-keys` shows them: ids and times, never
/// secrets. `sealing` is the key new tokens are sealed with; `keys` lists every key held,
/// by id.
pub fn session_keys_json(snap: &Snapshot) -> serde_json::Value {
    let keys: Vec<_> = snap
        .session_keys()
        .map(|k| serde_json::json!({"id": k.id, "created_ms": k.created_ms, "retire_at_ms": k.retire_at_ms}))
        .collect();
    serde_json::json!({ "sealing": snap.keyring().sealing_id(), "keys": keys })
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, "text/plain; charset=utf-8".parse().expect("static"));
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().expect("static"));
    r
}
