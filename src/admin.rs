//! The admin endpoints: `/healthz`, `/metrics`, `/v1/apps/{app}`, `/v1/session-keys`.
//! Read-only views of the catalog and the metrics; served on their own address, never on a
//! public listener. No secret is ever shown.

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
use tokio::sync::watch;

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
                    async move { Ok::<_, Infallible>(admin.route(&req)) }
                });
                let conn =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(target: "tern::admin", error = %e, "admin connection ended");
                }
            });
        }
    }

    fn route(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        let path = req.uri().path();
        match path {
            "/healthz" if self.health.is_draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
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

/// What the catalog holds for an app, as `/v1/apps/{app}` shows it.
pub fn app_json(app: &AppEntry) -> serde_json::Value {
    let now = crate::clock::now_ms();
    let machines: Vec<_> = app
        .machines
        .iter()
        .map(|m| {
            let outlier = m.live.outlier().status(now);
            serde_json::json!({
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
            })
        })
        .collect();
    serde_json::json!({
        "name": &*app.name,
        "org": app.spec.org,
        "hostnames": app.spec.hostnames,
        "internal_port": app.spec.internal_port,
        "machines": machines,
    })
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
