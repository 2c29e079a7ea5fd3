//! One exchange: client request → app → machine → response, streamed both ways.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::autostart::{Lifecycle, WakeError};
use crate::catalog::{AppEntry, InFlight, Machine};
use crate::error::ProxyError;
use crate::routing::select::Pick;
use crate::routing::{self, Router};
use crate::telemetry::{Metrics, status_class};
use crate::upstream::{Conn, Lease, Pool, Proto, SendError, UpBody};

use super::activity::{Activity, ConnState, ExchangeGuard, IdleTimer, silent_for};
use super::body::{ExchangeGuards, ProxyBody, upstream_body};
use super::headers::{self, ClientSide};
use super::{ConnInfo, request_id, respond, tunnel};

/// Everything an exchange needs, shared by all connections.
pub struct Handler {
    pub router: Router,
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    pub region: Arc<str>,
    pub max_header_bytes: usize,
    pub access_log: bool,
    /// Tunnels outlive their request; tracking them lets shutdown wait for them.
    pub tasks: TaskTracker,
    /// Wakes machines for requests that find none started.
    pub lifecycle: Arc<Lifecycle>,
}

/// What the access log and metrics learn about an exchange.
#[derive(Default)]
struct Outcome {
    app: Option<Arc<str>>,
    machine: Option<Arc<str>>,
    host: Option<String>,
    /// How long the request waited for a machine to wake, if it did.
    waited: Option<Duration>,
}

impl Handler {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
        state: Arc<ConnState>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let id = request_id::new(&self.region);
        let exchange = state.begin();
        let version = req.version();
        let accept = req.headers().get(header::ACCEPT).cloned();
        let method = req.method().clone();
        // Only the access log needs it; most nodes at scale run without.
        let path = if self.access_log { req.uri().path().to_owned() } else { String::new() };
        let mut outcome = Outcome::default();
        let result = self.forward(req, &conn, &id, exchange, started, &mut outcome).await;
        let resp = match result {
            Ok(resp) => resp,
            Err(err) => {
                self.metrics.errors.with_label_values(&[err.code()]).inc();
                let level_warn = err.origin() != crate::error::Origin::Client;
                if level_warn {
                    tracing::warn!(target: "tern::http", request_id = %id, code = err.code(), error = %err, "request failed");
                }
                respond::error(&err, accept.as_ref(), &id, version)
            }
        };
        let app_label = outcome.app.as_deref().unwrap_or("-");
        let status = resp.status().as_u16();
        let elapsed = started.elapsed();
        self.metrics.requests.with_label_values(&[app_label, status_class(status)]).inc();
        self.metrics.request_duration.with_label_values(&[app_label]).observe(elapsed.as_secs_f64());
        if self.access_log {
            tracing::info!(target: "tern::access",
                request_id = %id, peer = %conn.peer, method = %method,
                host = outcome.host.as_deref().unwrap_or("-"), path = %path,
                status, app = app_label, machine = outcome.machine.as_deref().unwrap_or("-"),
                tern_error = resp.headers().get(headers::TERN_ERROR).and_then(|v| v.to_str().ok()).unwrap_or("-"),
                // Milliseconds to two decimals (10 µs): finer is noise in a log line.
                duration_ms = (elapsed.as_secs_f64() * 100_000.0).round() / 100.0,
                wake_ms = outcome.waited.map(|w| (w.as_secs_f64() * 100_000.0).round() / 100.0),
                "request");
        }
        resp
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
        id: &str,
        exchange: ExchangeGuard,
        arrived: Instant,
        outcome: &mut Outcome,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let size = headers::head_size(&req);
        if size > self.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge { size, limit: self.max_header_bytes });
        }
        let raw_host = request_host(&req).ok_or(ProxyError::BadHost)?.to_owned();
        let host = routing::normalize(&raw_host).map_err(|_| ProxyError::BadHost)?.into_owned();
        outcome.host = Some(host.clone());
        let app = self.router.app_for(&host).ok_or(ProxyError::NoApp { host })?;
        outcome.app = Some(app.name.clone());

        let ignored_agent =
            !app.spec.wake_ignore_user_agents.is_empty()
                && req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).is_some_and(|ua| {
                    app.spec.wake_ignore_user_agents.iter().any(|s| ua.contains(s.as_str()))
                });
        let upgrade = headers::wants_upgrade(&req);
        let websocket = upgrade
            && req
                .headers()
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("websocket")));
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let client_version = req.version();
        // WebSocket over h2c needs extended CONNECT; upgrades always use HTTP/1.1.
        let proto = if app.spec.http_options.h2_backend && !upgrade { Proto::H2c } else { Proto::Http1 };
        let activity = Arc::new(Activity::new());
        let up_req =
            upstream_request(req, conn, id, &raw_host, upgrade, proto, self.region.as_ref(), &activity)?;

        let (machine, upstream, in_flight) =
            self.connect(&app, proto, arrived, ignored_agent, outcome).await?;
        outcome.machine = Some(machine.id.clone());
        let idle = app.spec.idle_timeout;
        let (mut resp, lease) =
            self.send(upstream, up_req, &machine, proto, upgrade, &activity, idle).await?;

        let guards = ExchangeGuards { in_flight, exchange, lease };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return Err(ProxyError::UpstreamError {
                    machine: machine.id.clone(),
                    detail: "101 Switching Protocols to a request that asked for no upgrade".into(),
                });
            };
            let machine_upgrade = hyper::upgrade::on(&mut resp);
            let kind = if websocket { tunnel::Kind::WebSocket } else { tunnel::Kind::Other };
            self.tasks.spawn(tunnel::run(
                client_upgrade,
                machine_upgrade,
                tunnel::Settings { idle_timeout: idle, kind, end: machine.live.streams_end() },
                self.metrics.clone(),
                guards,
            ));
            let (mut parts, _) = resp.into_parts();
            headers::prepare_response(&mut parts.headers, client_version, id, true);
            return Ok(Response::from_parts(parts, ProxyBody::empty()));
        }
        let (mut parts, body) = resp.into_parts();
        headers::prepare_response(&mut parts.headers, client_version, id, false);
        // An h2c machine's response goes to the client in the client's protocol; hyper
        // picks that from the connection, this only keeps the head consistent.
        parts.version = Version::HTTP_11;
        let timer = IdleTimer::new(activity, idle);
        let sse_end = is_event_stream(&parts.headers).then(|| machine.live.streams_end());
        Ok(Response::from_parts(
            parts,
            ProxyBody::streamed(body, timer, self.metrics.clone(), guards, sse_end),
        ))
    }

    /// Picks a machine and connects; if it refuses, tries one other started machine.
    async fn connect(
        &self,
        app: &AppEntry,
        proto: Proto,
        arrived: Instant,
        ignored_agent: bool,
        outcome: &mut Outcome,
    ) -> Result<(Arc<Machine>, Conn, InFlight), ProxyError> {
        // Requests already waiting for room on this app go first: join them rather than
        // take a slot that frees ahead of them. (Every waiter registers on every machine, so
        // the first machine tells.)
        let waiting = app.machines.first().is_some_and(|m| m.live.has_queued());
        let first = match if waiting { None } else { self.router.pick(app, &[]) } {
            Some(pick) => {
                if pick.over_soft && !ignored_agent {
                    self.lifecycle.wake_spare(app);
                }
                pick
            }
            None => self.wait_for_room(app, arrived, !ignored_agent, outcome).await?,
        };
        let Pick { machine: first, guard, .. } = first;
        let err = match self.pool.checkout(first.addr, proto).await {
            Ok(c) => return Ok((first, c, guard)),
            Err(e) => e,
        };
        drop(guard);
        tracing::warn!(target: "tern::upstream", app = %app.name, machine = %first.id, error = %err, "could not connect to the machine");
        let Some(Pick { machine: second, guard, .. }) = self.router.pick(app, &[&first.id]) else {
            return Err(ProxyError::UpstreamConnect {
                machine: first.id.clone(),
                addr: first.addr,
                source: err.source,
            });
        };
        self.metrics.upstream_retries.inc();
        match self.pool.checkout(second.addr, proto).await {
            Ok(c) => Ok((second, c, guard)),
            Err(e) => Err(ProxyError::UpstreamConnect {
                machine: second.id.clone(),
                addr: second.addr,
                source: e.source,
            }),
        }
    }

    /// Holds the request until a machine of the app has room: one woken for it (if the app
    /// wakes machines and the client may wake them), or one whose exchanges drop below the
    /// hard limit; until the app's wake_timeout after the request arrived.
    async fn wait_for_room(
        &self,
        app: &AppEntry,
        arrived: Instant,
        may_wake: bool,
        outcome: &mut Outcome,
    ) -> Result<Pick, ProxyError> {
        let began = Instant::now();
        let result = self.lifecycle.acquire(app, arrived + app.spec.wake_timeout, may_wake).await;
        let waited = began.elapsed();
        let label = match &result {
            Ok(_) => "ok",
            Err(WakeError::Timeout) => "timeout",
            Err(WakeError::QueueFull(_) | WakeError::NoRoom(_)) => "queue_full",
            Err(WakeError::NothingToWake) => "nothing_to_wake",
            Err(WakeError::Failed(_)) => "failed",
        };
        // A request turned away at once (nothing to wake) did not wait.
        if !matches!(result, Err(WakeError::NothingToWake)) {
            outcome.waited = Some(waited);
            self.metrics.wake_duration.with_label_values(&[&app.name, label]).observe(waited.as_secs_f64());
        }
        let name = app.name.clone();
        result.map_err(|e| match e {
            WakeError::Timeout => ProxyError::WakeTimeout { app: name, timeout: app.spec.wake_timeout },
            WakeError::QueueFull(limit) => ProxyError::QueueFull { app: name, limit },
            WakeError::NoRoom(hard_limit) => ProxyError::NoRoom { app: name, hard_limit, waited },
            WakeError::NothingToWake => ProxyError::NoMachine { app: name },
            WakeError::Failed(reason) => ProxyError::WakeFailed { app: name, reason: reason.to_string() },
        })
    }

    /// Sends the request and waits for the response head, for at most the app's
    /// idle_timeout of silence (an upload in progress is not silence). A pooled connection
    /// that died while idle hands the request back, and it goes out once more on a new one.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        conn: Conn,
        req: Request<UpBody>,
        machine: &Machine,
        proto: Proto,
        upgrade: bool,
        activity: &Activity,
        idle: Duration,
    ) -> Result<(Response<Incoming>, Option<Lease>), ProxyError> {
        let timeout = || ProxyError::UpstreamTimeout { machine: machine.id.clone(), timeout: idle };
        let failed = |e: hyper::Error| ProxyError::UpstreamError {
            machine: machine.id.clone(),
            detail: e.to_string(),
        };
        let reused = conn.reused();
        let first = tokio::select! {
            r = conn.send(req, upgrade) => r,
            () = silent_for(activity, idle) => return Err(timeout()),
        };
        let req = match first {
            Ok(resp) => return Ok(resp),
            Err(SendError::NotSent(req, _)) if reused => req,
            Err(SendError::NotSent(_, e) | SendError::Failed(e)) => return Err(failed(e)),
        };
        let fresh = self.pool.connect_fresh(machine.addr, proto).await.map_err(|e| {
            ProxyError::UpstreamConnect { machine: machine.id.clone(), addr: machine.addr, source: e.source }
        })?;
        tokio::select! {
            r = fresh.send(*req, upgrade) => r.map_err(|(SendError::NotSent(_, e) | SendError::Failed(e))| failed(e)),
            () = silent_for(activity, idle) => Err(timeout()),
        }
    }
}

/// An SSE response (`text/event-stream`) whose events tern can see, so it may end it
/// cleanly between two. A compressed one cannot be read for boundaries: it runs until its
/// machine goes, like any other response.
fn is_event_stream(headers: &http::HeaderMap) -> bool {
    let sse = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| {
        ct.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
    });
    let plain = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .all(|v| v.to_str().is_ok_and(|e| e.trim().is_empty() || e.trim().eq_ignore_ascii_case("identity")));
    sse && plain
}

/// The host the client asked for: the URI authority (HTTP/2, absolute-form), else `Host`.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    if let Some(auth) = req.uri().authority() {
        return Some(auth.as_str());
    }
    req.headers().get(header::HOST).and_then(|v| v.to_str().ok())
}

#[allow(clippy::too_many_arguments)]
fn upstream_request(
    req: Request<Incoming>,
    conn: &ConnInfo,
    id: &str,
    raw_host: &str,
    upgrade: bool,
    proto: Proto,
    region: &str,
    activity: &Arc<Activity>,
) -> Result<Request<UpBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let side = ClientSide {
        peer_ip: conn.peer.ip(),
        tls: conn.tls,
        local_port: conn.local.port(),
        region,
        request_id: id,
        version: parts.version,
    };
    headers::prepare_request(&mut parts.headers, &side, raw_host, upgrade, proto == Proto::H2c);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match proto {
        Proto::Http1 => path.parse(),
        Proto::H2c => format!("http://{raw_host}{path}").parse(),
    }
    .map_err(|_| ProxyError::BadRequest("request target"))?;
    parts.version = match proto {
        Proto::Http1 => Version::HTTP_11,
        Proto::H2c => Version::HTTP_2,
    };
    if parts.headers.get(header::HOST).is_some_and(|h| h != raw_host) && proto == Proto::Http1 {
        // An absolute-form target wins over Host (RFC 9112 §3.2.2): send what routed it.
        if let Ok(v) = HeaderValue::from_str(raw_host) {
            parts.headers.insert(header::HOST, v);
        }
    }
    Ok(Request::from_parts(parts, upstream_body(body, activity.clone())))
}
