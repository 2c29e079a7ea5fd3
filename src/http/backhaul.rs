//! Handing a request to the node that owns its machine (the backhaul).
//!
//! A machine may name its owner (`node = "worker-1"`): only that node starts, stops and
//! probes it, and only it sees all the machine's load. So an edge that routes a request to
//! a machine another node owns does not connect to the machine: it sends the request, as
//! prepared for the machine (client address, TLS facts, original port, region and request
//! id already in its headers), to the owner's `[backhaul]` address, over pooled HTTP/2
//! (HTTP/1.1 for an upgrade). The owner wakes the machine if it must, holds the request to
//! the machine's limits, and relays it without adding a header of its own, so the app sees
//! exactly what the edge would have sent it; the answer goes back the same way, and the
//! edge adds its `Via` once.
//!
//! ```text
//!  client ─▶ edge: route ─▶ machine owned by worker-1 ─▶ worker-1's backhaul
//!                                                         ├─ token opens, owns the machine
//!                                                         │   └─ wake / wait for room ─▶ machine
//!                                                         └─ cannot take it now ─▶ 503 retry_elsewhere
//!                                                                 └─ edge: another machine
//! ```
//!
//! The request carries a token sealed with the fleet's session keys (the RIB's, which
//! every node shares) naming the app and machine, the request id and when it was sealed:
//! the backhaul listener serves nothing without one that opens, and a token older than a
//! minute is refused.

use std::net::SocketAddr;
use std::sync::Arc;

use super::body::RequestBody;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, Version};
use tokio::time::Instant;

use crate::catalog::{AppEntry, Machine};
use crate::error::ProxyError;
use crate::routing::decide::{Steering, Why};
use crate::upstream::{Proto, UpBody};

use super::activity::{Activity, ExchangeGuard, IdleTimer};
use super::body::{ExchangeGuards, GateGuard, ProxyBody};
use super::forward::{Handler, Outcome, Relay, Route, Upstream, client_side, upstream_request};
use super::request_id::RequestId;
use super::{ConnInfo, headers};

/// The sealed token: app, machine, request id and sealing time.
pub const TOKEN: HeaderName = HeaderName::from_static("tern-backhaul");
/// The app the token was sealed for (its additional data: the token opens only with it).
pub const APP: HeaderName = HeaderName::from_static("tern-backhaul-app");
const PURPOSE: &str = "backhaul";
/// How old a token may be when it arrives.
const MAX_AGE_MS: i64 = 60_000;

/// Where a request for `m` is sent: its owner's backhaul if another live node owns it and
/// published one, else the machine itself.
pub fn dial(handler: &Handler, m: &Machine) -> (SocketAddr, bool) {
    match owner_backhaul(handler, m) {
        Some(addr) => (addr, true),
        None => (m.addr, false),
    }
}

fn owner_backhaul(handler: &Handler, m: &Machine) -> Option<SocketAddr> {
    let owner = m.spec.node.as_deref()?;
    if handler.lifecycle.owns(&m.spec) {
        return None;
    }
    let snap = handler.router.catalog().load();
    let node = snap.node(owner)?;
    node.row.as_ref()?.backhaul.as_deref()?.parse().ok()
}

/// Readies a request prepared for machine `m` for its owner: the token, and HTTP/2 unless
/// it upgrades. Returns the protocol to the owner.
pub fn hand_over(
    handler: &Handler,
    req: &mut Request<UpBody>,
    app: &AppEntry,
    m: &Machine,
    id: &str,
    raw_host: &str,
    upgrade: bool,
) -> Result<Proto, ProxyError> {
    let value = format!("{id} {}", crate::clock::unix_ms());
    let token = handler
        .router
        .keyring()
        .seal_as(&app.name, PURPOSE, &m.id, value.as_bytes())
        .and_then(|t| HeaderValue::from_str(&t).ok())
        .ok_or_else(|| ProxyError::Internal("no session key to seal a backhaul token with".into()))?;
    let app_name = HeaderValue::from_str(&app.name).map_err(|_| ProxyError::Internal("app name".into()))?;
    req.headers_mut().insert(TOKEN, token);
    req.headers_mut().insert(APP, app_name);
    if upgrade {
        return Ok(Proto::Http1);
    }
    if req.version() != Version::HTTP_2 {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = format!("http://{raw_host}{path}")
            .parse()
            .map_err(|_| ProxyError::BadRequest("request target"))?;
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
    }
    Ok(Proto::H2c)
}

/// Whether the owner turned the request away for the edge to route elsewhere.
pub fn turned_away<B>(resp: &Response<B>) -> bool {
    resp.headers().get(headers::TERN_ERROR).is_some_and(|v| v.as_bytes() == b"retry_elsewhere")
}

/// The request id a handed-over request carries (the edge's), for the owner's own log.
pub fn request_id<B>(req: &Request<B>) -> Option<String> {
    req.headers().get(headers::FLY_REQUEST_ID).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// What a token says, once it opened.
struct Ticket {
    app: Arc<AppEntry>,
    machine: Arc<Machine>,
}

impl Handler {
    /// Opens the token: the request's app and machine, or why it is refused.
    fn ticket(&self, req: &Request<RequestBody>) -> Result<Ticket, ProxyError> {
        let forbidden = |why: &str| {
            // Another fleet's node, a stray client, or a probe: worth an operator's look.
            tracing::warn!(target: "tern::fleet", reason = why, "refused a request on the backhaul listener");
            ProxyError::BackhaulForbidden(why.to_string())
        };
        let token = req.headers().get(TOKEN).ok_or_else(|| forbidden("no token"))?;
        let app_name =
            req.headers().get(APP).and_then(|v| v.to_str().ok()).ok_or_else(|| forbidden("no app"))?;
        let now = crate::clock::unix_ms();
        let opened = self
            .router
            .keyring()
            .open_as(app_name, PURPOSE, token.as_bytes(), now)
            .map_err(|e| forbidden(&format!("the token does not open: {e}")))?;
        let value = String::from_utf8_lossy(&opened.value);
        let (id, sealed_at) = value.split_once(' ').ok_or_else(|| forbidden("a token without its time"))?;
        let sealed_at: i64 = sealed_at.parse().map_err(|_| forbidden("a token without its time"))?;
        if (now - sealed_at).abs() > MAX_AGE_MS {
            return Err(forbidden("a stale token"));
        }
        if request_id(req).as_deref() != Some(id) {
            return Err(forbidden("a token for another request"));
        }
        let elsewhere = |reason: &str| ProxyError::RetryElsewhere {
            machine: opened.machine.to_string(),
            reason: reason.to_string(),
        };
        let app =
            self.router.app(app_name).ok_or_else(|| elsewhere("its app is not in this node's catalog"))?;
        let machine = self
            .router
            .machine_of(&app, &opened.machine)
            .ok_or_else(|| elsewhere("not in this node's catalog"))?;
        if !self.lifecycle.owns(&machine.spec) {
            return Err(elsewhere("owned by another node"));
        }
        Ok(Ticket { app, machine })
    }

    /// The owner's side: a request another node handed over for a machine this node owns.
    pub(super) async fn deliver(
        &self,
        mut req: Request<RequestBody>,
        conn: &ConnInfo,
        id: &RequestId,
        exchange: ExchangeGuard,
        arrived: Instant,
        outcome: &mut Outcome,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Ticket { app, machine } = self.ticket(&req)?;
        outcome.app = Some(app.clone());
        let elsewhere = |reason: &str| ProxyError::RetryElsewhere {
            machine: machine.id.to_string(),
            reason: reason.to_string(),
        };
        // Turned away at once rather than held: the edge may have another machine.
        let hard = app.spec.concurrency.hard_limit;
        if machine.routable() && hard.is_some_and(|h| machine.live.in_flight() >= h) {
            return Err(elsewhere("at its hard limit"));
        }
        if machine.state() == crate::model::MachineState::Started {
            // Checks run here only: the edge cannot know, so it hears it now.
            if !machine.live.healthy() {
                return Err(elsewhere("failing its health checks"));
            }
            if !machine.live.in_rotation() {
                return Err(elsewhere("being stopped"));
            }
        }
        req.headers_mut().remove(TOKEN);
        req.headers_mut().remove(APP);
        let raw_host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).map(str::to_owned))
            .ok_or(ProxyError::BadHost)?;
        outcome.host = Some(raw_host.clone());
        let route = Route::of(&app, &mut req);
        let steer = Steering { pinned: Some((machine.clone(), Why::Forced)), ..Steering::default() };
        let deadline = arrived + app.spec.wake_timeout;
        let proto = route.proto;
        let upgrade = route.upgrade.is_some();
        let (routed, upstream) = self.connect(&app, &steer, proto, upgrade, deadline, true, outcome).await?;
        let pick = routed.pick;
        outcome.machine = Some(pick.machine.id.clone());
        outcome.why = Why::Forced;
        let activity = Arc::new(Activity::new());
        // A relayed request keeps the edge's forwarding headers; no region is added.
        let no_region = http::HeaderValue::from_static("");
        let up = Upstream { raw_host: &raw_host, upgrade: route.upgrade.as_deref(), proto };
        let side = client_side(&req, conn, id, &no_region);
        let client_version = req.version();
        let (up_req, body_state, extra) =
            upstream_request(req, &side, up, &activity, route.gate.as_ref(), app.spec.replay_buffer)?;
        debug_assert!(!extra, "a relayed request gets no forwarding fields");
        let idle = app.spec.idle_timeout;
        let timers = exchange.conn();
        let sent = self
            .send(upstream, up_req, &pick.machine, proto, upgrade, &activity, idle, timers, None, None)
            .await;
        if let Some(e) = self.refused(&sent, &body_state, &pick.machine) {
            return Err(e);
        }
        let (resp, lease) = sent?;
        body_state.stop_keeping();
        let gate = route.gate.clone();
        let guards = ExchangeGuards { in_flight: pick.guard, exchange, lease, gate: gate.map(GateGuard) };
        let timer = IdleTimer::new(activity, idle);
        let relay = Relay { machine: &pick.machine, route, client_version, id, timer, via: false };
        self.relay(resp, guards, relay)
    }
}
