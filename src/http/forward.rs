//! One exchange: client request → app → machine → response, streamed both ways.

use std::sync::Arc;
use std::time::Duration;

use super::body::RequestBody;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::autostart::{Lifecycle, WakeError};
use crate::catalog::{AppEntry, Machine};
use crate::error::ProxyError;
use crate::routing::Refusal;
use crate::routing::decide::{Regions, Routed, Steering, Wakes, Why};
use crate::routing::replay_cache::{ReplayCache, session_rule};
use crate::routing::select::Pick;
use crate::routing::{self, Router};
use crate::telemetry::{Metrics, status_class};
use crate::upstream::{Conn, Lease, MachineBody, Pool, Proto, SendError, UpBody, UpError};

use super::activity::{Activity, ConnState, ExchangeGuard, IdleTimer, silent_for, silent_for_on};
use super::body::{
    ContinueGate, ExchangeGuards, GateGuard, ProxyBody, RequestBodyState, replayed_body, upstream_body,
};
use super::drain::{self, StreamEnd};
use super::headers::{self, ClientSide};
use super::request_id::RequestId;
use super::{ConnInfo, affinity, replay, request_id, respond, tunnel};

/// Everything an exchange needs, shared by all connections.
pub struct Handler {
    pub router: Router,
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    pub region: Arc<str>,
    /// `region` as the `Fly-Region` header value, made once.
    pub region_header: HeaderValue,
    pub max_header_bytes: usize,
    /// Largest response head a machine may send (status line plus headers).
    pub max_response_header_bytes: usize,
    pub access_log: bool,
    /// Tunnels outlive their request; tracking them lets shutdown wait for them.
    pub tasks: TaskTracker,
    /// Wakes machines for requests that find none started.
    pub lifecycle: Arc<Lifecycle>,
    /// The node's remembered replays (path and session), consulted before the first hop.
    pub replay_cache: Arc<ReplayCache>,
}

/// What the access log and metrics learn about an exchange.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) app: Option<Arc<AppEntry>>,
    pub(super) machine: Option<Arc<str>>,
    pub(super) host: Option<String>,
    /// How long the request waited for a machine to wake, if it did.
    pub(super) waited: Option<Duration>,
    /// Why its machine was chosen.
    pub(super) why: Why,
}

impl Handler {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        conn: Arc<ConnInfo>,
        state: Arc<ConnState>,
    ) -> Response<ProxyBody> {
        // Read once with the bookkeeping of the turn the request came in.
        let started = crate::clock::now();
        // A handed-over request keeps the edge's id (its token proves it).
        let id = match conn.backhaul.then(|| super::backhaul::request_id(&req)).flatten() {
            Some(id) => request_id::RequestId::from(id),
            None => request_id::new(&self.region),
        };
        let exchange = state.begin();
        let version = req.version();
        let accept = req.headers().get(header::ACCEPT).cloned();
        let method = req.method().clone();
        // Only the access log needs it; most nodes at scale run without.
        let path = if self.access_log { req.uri().path().to_owned() } else { String::new() };
        let mut outcome = Outcome::default();
        let result = if conn.backhaul {
            self.deliver(req, &conn, &id, exchange, started, &mut outcome).await
        } else {
            self.forward(req, &conn, &id, exchange, started, &mut outcome).await
        };
        let mut resp = match result {
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
        if state.drain.draining() {
            state.drain.on_response(version, &mut resp);
        }
        let app_label = outcome.app.as_ref().map_or("-", |a| &*a.name);
        let status = resp.status().as_u16();
        let elapsed = crate::clock::now().saturating_duration_since(started);
        match &outcome.app {
            Some(app) => app.series.request(&self.metrics, &app.name, status, elapsed),
            None => self.metrics.unrouted.request(&self.metrics, "-", status, elapsed),
        }
        if self.access_log {
            tracing::info!(target: "tern::access",
                request_id = %id, peer = %conn.peer, method = %method,
                host = outcome.host.as_deref().unwrap_or("-"), path = %path,
                status, app = app_label, machine = outcome.machine.as_deref().unwrap_or("-"),
                tern_error = resp.headers().get(headers::TERN_ERROR).and_then(|v| v.to_str().ok()).unwrap_or("-"),
                // Milliseconds to two decimals (10 µs): finer is noise in a log line.
                duration_ms = (elapsed.as_secs_f64() * 100_000.0).round() / 100.0,
                wake_ms = outcome.waited.map(|w| (w.as_secs_f64() * 100_000.0).round() / 100.0),
                route = outcome.machine.as_ref().map(|_| outcome.why.as_str()),
                "request");
        }
        resp
    }

    /// tern's answer to a request head hyper could not parse (see [`super::parser_replies`]),
    /// counted and logged like any refusal.
    pub(super) fn parser_refusal(
        &self,
        refusal: super::parser_replies::Refusal,
        date: &str,
        peer: std::net::SocketAddr,
    ) -> Vec<u8> {
        use super::parser_replies::Refusal;
        let err = match refusal {
            Refusal::Malformed => ProxyError::BadRequest("a request line or header that does not parse"),
            Refusal::UriTooLong => ProxyError::UriTooLong,
            Refusal::HeadTooLarge => ProxyError::HeadersTooLarge { size: 0, limit: self.max_header_bytes },
        };
        let id = request_id::new(&self.region);
        self.metrics.errors.with_label_values(&[err.code()]).inc();
        self.metrics.requests.with_label_values(&["-", status_class(err.status().as_u16())]).inc();
        if self.access_log {
            tracing::info!(target: "tern::access", request_id = %id, %peer, method = "-", host = "-",
                path = "-", status = err.status().as_u16(), app = "-", machine = "-",
                tern_error = err.code(), "request");
        }
        respond::http1_bytes(&err, &id, date)
    }

    /// The app a request is for. Public listeners go by the Host, and serve only apps with
    /// `public = true`; a private one goes by the connection's destination address, and
    /// serves only sources inside the app's org networks.
    fn app_for(&self, conn: &ConnInfo, host: &str) -> Result<Arc<AppEntry>, ProxyError> {
        if let Some(name) = &conn.app {
            return self.router.app(name).ok_or_else(|| ProxyError::NoApp { host: host.to_string() });
        }
        if !conn.private {
            return self
                .router
                .app_for(host)
                .filter(|a| a.spec.public)
                .ok_or_else(|| ProxyError::NoApp { host: host.to_string() });
        }
        let dest = conn.local.ip();
        let app = self
            .router
            .private_app(dest)
            .ok_or_else(|| ProxyError::NoApp { host: format!("{host} (private address {dest})") })?;
        if !self.router.org(&app.spec.org).is_some_and(|o| o.admits(conn.peer.ip())) {
            return Err(ProxyError::PrivateForbidden {
                app: app.name.clone(),
                org: app.spec.org.clone(),
                source_ip: conn.peer.ip(),
            });
        }
        Ok(app)
    }

    // One exchange, replays included, reads best as one loop: the app, steering and deadline
    // of each hop change in one place.
    #[allow(clippy::too_many_lines)]
    async fn forward(
        &self,
        mut req: Request<RequestBody>,
        conn: &ConnInfo,
        id: &RequestId,
        exchange: ExchangeGuard,
        arrived: Instant,
        outcome: &mut Outcome,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let size = headers::head_size(&req);
        if size > self.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge { size, limit: self.max_header_bytes });
        }
        check_request(&req)?;
        // Shared with the request, not copied: its bytes stay in hyper's read buffer.
        let raw_host = RawHost::of(&req).ok_or(ProxyError::BadHost)?;
        let raw_host = raw_host.as_str().ok_or(ProxyError::BadHost)?;
        let host = routing::normalize(raw_host).map_err(|_| ProxyError::BadHost)?;
        if self.access_log {
            outcome.host = Some(host.to_string());
        }
        let app = self.app_for(conn, &host)?;
        outcome.app = Some(app.clone());

        let route = Route::of(&app, &mut req);
        // The routing, replay and cache fields a client may send are all `fly-…`; most
        // requests have none, and are spared looking each up.
        let fly = headers::Present::scan(req.headers()).fly();
        if fly {
            // tern's to set: a client's would tell the machine of a cache decision never made.
            req.headers_mut().remove(replay::FLY_REPLAY_CACHE_STATUS);
        }
        let uri = req.uri().clone();
        let cache = self.cache_lookup(&app, &host, uri.path(), req.headers(), fly);
        let mut steer = if fly { self.steering(&app, req.headers())? } else { self.unsteered() };
        let keyring = self.router.keyring();
        let session = affinity::open(&app, &keyring, &self.router, req.headers_mut(), &self.metrics)?;
        match (&steer.pinned, &session.pinned) {
            (None, pinned) => steer.pinned.clone_from(pinned),
            // A forced machine that is not the session's would get the session's value, and
            // echo it under a token for itself: refused, not guessed at.
            (Some((forced, _)), Some((on, Why::Session))) if forced.id != on.id => {
                return Err(ProxyError::InstanceUnavailable {
                    app: app.name.clone(),
                    machine: forced.id.to_string(),
                    reason: format!("the request's session is on machine {}", on.id),
                });
            }
            // A cookie is a browser's: the forced machine wins, and its answer sets one.
            (Some(_), _) => {}
        }
        let client_version = req.version();
        // Its bytes began to move when the request arrived.
        let activity = Arc::new(Activity::since(arrived));
        let up = Upstream { raw_host, upgrade: route.upgrade.as_deref(), proto: route.proto };
        let side = client_side(&req, conn, id, &self.region_header);
        let (up_req, body_state, extra) =
            upstream_request(req, &side, up, &activity, route.gate.as_ref(), app.spec.replay_buffer)?;
        // Written by each send, and not kept in the head a replay sends again.
        let extra = extra.then_some(&side as &dyn crate::upstream::Extra);
        // The request as a replay sends it again. Its fields are the first hop's as sent,
        // kept by the send (tern's own exchange hands them back when done: no copy), or
        // copied before anything is added for that hop alone; until then `head_kept` is false.
        let mut head = replay::Head {
            method: up_req.method().clone(),
            path: up_req.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")),
            headers: http::HeaderMap::new(),
        };
        let mut head_kept = false;
        let idle = app.spec.idle_timeout;
        let upgrade = route.upgrade.is_some();
        let mut gate = route.gate.clone();
        let mut deadline = arrived + app.spec.wake_timeout;
        let first_app = app.clone();
        // A session begun on another app's machine (after a fly-replay app=) goes there.
        let session_elsewhere = steer.pinned.as_ref().is_some_and(|(_, why)| *why != Why::Forced);
        let mut app = session.app.clone().filter(|_| session_elsewhere).unwrap_or(app);
        let mut next_req = Some(up_req);
        let mut hops = 0u32;
        // The machine that asked for the replay in flight, with what it asked for.
        let mut replaying: Option<(Arc<Machine>, Arc<AppEntry>, Box<replay::Directive>)> = None;
        let mut fell_back = false;
        // A cached replay routes the first hop; until its target is reached, the app and
        // steering the request would have had without it.
        let mut uncached: Option<(Arc<AppEntry>, Steering)> = None;
        // A session's or a forced machine is the request's: a cached decision does not move it.
        if let Some(hit) = cache.hit.as_ref().filter(|_| steer.pinned.is_none()) {
            match replay::cached(&self.router, &app, &hit.target) {
                Ok((target, next)) => {
                    self.metrics.replays.with_label_values(&[&app.name, "cache"]).inc();
                    uncached =
                        Some((std::mem::replace(&mut app, target), std::mem::replace(&mut steer, next)));
                    deadline = arrived + app.spec.wake_timeout;
                    set_cache_status(&mut head, next_req.as_mut(), Some("hit"));
                }
                Err(e) => {
                    tracing::info!(target: "tern::http", request_id = %id, app = %app.name, error = %e,
                        "cached fly-replay target gone; dropping the entry");
                    self.forget_cached(&first_app, &host, &hit.key);
                }
            }
        } else if cache.bypassed {
            set_cache_status(&mut head, next_req.as_mut(), Some("bypass"));
        }
        let (resp, machine, in_flight, mut lease) = loop {
            let proto = if upgrade || !app.spec.http_options.h2_backend { Proto::Http1 } else { Proto::H2c };
            let mut up_req = match next_req.take() {
                Some(r) => r,
                None => self.again(&head, raw_host, proto, &activity, &body_state, &first_app)?,
            };
            let routed =
                self.connect(&app, &steer, proto, upgrade, deadline, !route.ignored_agent, outcome).await;
            let (routed, upstream) = match (routed, replaying.take()) {
                (Ok(r), _) => r,
                // The cached target could not take it: forget the entry, route as if none.
                (Err(e), _) if uncached.is_some() => {
                    tracing::info!(target: "tern::http", request_id = %id, app = %app.name, error = %e,
                        "cached fly-replay target unreachable; dropping the entry");
                    if !head_kept {
                        // The next try is made from the head: this request goes unsent.
                        head.headers = up_req.headers().clone();
                        head_kept = true;
                    }
                    if let Some(hit) = &cache.hit {
                        self.forget_cached(&first_app, &host, &hit.key);
                    }
                    set_cache_status(&mut head, None, None);
                    (app, steer) = uncached.take().expect("checked");
                    deadline = arrived + app.spec.wake_timeout;
                    continue;
                }
                // The replay's target could not be reached: back to where it came from.
                (Err(e), Some((origin, origin_app, d))) if d.fallback.is_some() && !fell_back => {
                    tracing::info!(target: "tern::http", request_id = %id, app = %app.name, error = %e,
                        "fly-replay target unreachable; falling back to the origin");
                    steer = self.fall_back(&e, &origin, &origin_app, &d, &mut head, arrived);
                    fell_back = true;
                    app = origin_app;
                    deadline = Instant::now() + app.spec.wake_timeout;
                    continue;
                }
                (Err(e), _) => return Err(e),
            };
            // Reached: from here on the cached target is the request's, as a replay's is.
            let via_cache = uncached.take().is_some();
            let Routed { pick: Pick { machine, guard: in_flight, .. }, why, preferred_missed, .. } = routed;
            outcome.machine = Some(machine.id.clone());
            outcome.why = why;
            app.series.routed(&self.metrics, &app.name, why.as_str());
            let remote = super::backhaul::dial(self, &machine).1;
            if !head_kept && (remote || preferred_missed.is_some()) {
                // Fields for this hop alone are added below: the head is copied without them.
                head.headers = up_req.headers().clone();
                head_kept = true;
            }
            if let Some(id) = preferred_missed
                && let Ok(v) = HeaderValue::from_str(&id)
            {
                up_req.headers_mut().insert(headers::PREFERRED_UNAVAILABLE, v);
            }
            let proto = if remote {
                super::backhaul::hand_over(self, &mut up_req, &app, &machine, id, raw_host, upgrade)?
            } else {
                proto
            };
            let mut kept = None;
            let keep = (!head_kept).then_some(&mut kept);
            let timers = exchange.conn();
            let sent = self
                .send(upstream, up_req, &machine, proto, upgrade, &activity, idle, timers, keep, extra)
                .await;
            if let Some(fields) = kept {
                head.headers = fields;
                head_kept = true;
            }
            if let Some(e) = self.refused(&sent, &body_state, &machine) {
                return Err(e);
            }
            let (resp, lease) = sent?;
            if remote
                && super::backhaul::turned_away(&resp)
                && steer.pinned.is_none()
                && hops < replay::MAX_HOPS
            {
                // Its owner cannot take it now: another machine, the request as first sent.
                tracing::info!(target: "tern::http", request_id = %id, app = %app.name, machine = %machine.id,
                    "the machine's owner turned the request away; routing it elsewhere");
                drop((resp, lease, in_flight));
                hops += 1;
                steer.exclude.push(machine.id.clone());
                continue;
            }
            let d = match replay::answer(resp, &machine, uri.path(), idle).await? {
                replay::Answer::Serve(resp) => break (resp, machine, in_flight, lease),
                replay::Answer::Replay(d, how) => {
                    self.metrics.replays.with_label_values(&[&app.name, how]).inc();
                    d
                }
            };
            // The machine's answer is thrown away, and its connection with it (the request
            // may be unsent or half sent on it).
            drop((lease, in_flight));
            hops += 1;
            if hops > replay::MAX_HOPS || fell_back {
                return Err(ProxyError::ReplayLoop { app: app.name.clone(), limit: replay::MAX_HOPS });
            }
            let (target, next) = replay::target(&self.router, &app, &machine, &d)?;
            if !body_state.replayable() {
                return Err(ProxyError::ReplayTooLarge {
                    app: first_app.name.clone(),
                    limit: first_app.spec.replay_buffer,
                });
            }
            let remembered = self.remember(&first_app, &app, &host, uri.path(), &cache, &d, via_cache);
            head.for_replay(&d, &machine, replay::now_us());
            if remembered {
                set_cache_status(&mut head, None, Some("miss"));
            }
            // The next machine gets the body as it comes, without waiting for its 100.
            gate = None;
            steer = next;
            // A machine's timeout is best effort, and never longer than the target app's own.
            let wait = d.timeout.map_or(target.spec.wake_timeout, |t| t.min(target.spec.wake_timeout));
            deadline = Instant::now() + wait;
            let origin_app = std::mem::replace(&mut app, target);
            replaying = Some((machine, origin_app, d));
        };
        body_state.stop_keeping();
        // No replay can come now: the head's map reads the next response heads.
        crate::upstream::give_back_fields(std::mem::take(&mut head.headers));
        if gate.as_ref().is_some_and(|g| g.abandon_if_waiting()) {
            // The machine answered without wanting the body: the connection is mid-request.
            lease = None;
        }
        let (mut parts, body) = resp.into_parts();
        replay::strip(&mut parts.headers);
        session.seal(&first_app, &app, &machine, &keyring, &mut parts.headers, conn.tls, &self.metrics);
        let resp = Response::from_parts(parts, body);
        let guards = ExchangeGuards { in_flight, exchange, lease, gate: gate.map(GateGuard) };
        let timer = IdleTimer::new(activity, idle);
        self.relay(resp, guards, Relay { machine: &machine, route, client_version, id, timer, via: true })
    }

    /// What the replay caches hold for a request of `app`, before its first hop: a session
    /// entry for the value its `[[apps.replay_cache]]` rule keys by, else a path entry
    /// (`fly-replay-cache`); one that allows it is passed over for a client that asks
    /// (`fly-replay-cache-control: skip`).
    ///
    /// `fly` says whether the request may hold any `fly-…` field.
    fn cache_lookup(
        &self,
        app: &AppEntry,
        host: &str,
        path: &str,
        headers: &http::HeaderMap,
        fly: bool,
    ) -> CacheLookup {
        let skip = fly
            && headers
                .get(replay::FLY_REPLAY_CACHE_CONTROL)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("skip"));
        let session = session_rule(&app.spec, host, path, headers).map(|(i, v)| (i, v.into_owned()));
        let mut out = CacheLookup { session, hit: None, bypassed: false };
        if let Some((rule, value)) = &out.session
            && let Some(target) = self.replay_cache.session(&app.name, *rule, value)
        {
            if skip && app.spec.replay_cache[*rule].allow_bypass {
                out.bypassed = true;
            } else {
                out.hit = Some(CacheHit { key: CacheKey::Session(*rule, value.clone()), target });
                return out;
            }
        }
        if let Some(h) = self.replay_cache.path_hit(&app.name, host, path) {
            if skip && h.allow_bypass {
                out.bypassed = true;
            } else {
                out.hit = Some(CacheHit { key: CacheKey::Path(h.prefix), target: h.target });
                out.bypassed = false;
            }
        }
        out
    }

    fn forget_cached(&self, app: &AppEntry, host: &str, key: &CacheKey) {
        match key {
            CacheKey::Path(prefix) => self.replay_cache.invalidate_path(&app.name, host, prefix),
            CacheKey::Session(rule, value) => self.replay_cache.invalidate_session(&app.name, *rule, value),
        }
    }

    /// What a replay by a machine of `app` does to the caches of the request's app: an
    /// invalidation forgets the entry it names (or, naming none, the one that routed the
    /// request); a replay by the origin app's machine that the cache did not route is
    /// remembered, under its `fly-replay-cache` prefix and under the request's session
    /// rule. Returns whether it was remembered.
    #[allow(clippy::too_many_arguments)]
    fn remember(
        &self,
        first_app: &AppEntry,
        app: &Arc<AppEntry>,
        host: &str,
        path: &str,
        cache: &CacheLookup,
        d: &replay::Directive,
        via_cache: bool,
    ) -> bool {
        if let Some(c) = d.cache.as_ref().filter(|c| c.invalidate) {
            if !c.prefix.is_empty() {
                self.replay_cache.invalidate_path(&first_app.name, host, &c.prefix);
            } else if let Some(hit) = &cache.hit {
                self.forget_cached(first_app, host, &hit.key);
            }
            return false;
        }
        if via_cache || app.name != first_app.name {
            return false;
        }
        let mut remembered = false;
        // The header form's prefix was checked against the path as it was read; the JSON
        // form's is checked here, and one that does not cover the request is not kept.
        if let Some(c) = d.cache.as_ref().filter(|c| c.covers(path)) {
            self.replay_cache.put_path(&first_app.name, host, c, replay::cache_target(d));
            remembered = true;
        }
        if let Some((rule, value)) = &cache.session {
            let ttl = Duration::from_secs(first_app.spec.replay_cache[*rule].ttl_seconds);
            self.replay_cache.put_session(&first_app.name, *rule, value, ttl, replay::cache_target(d));
            remembered = true;
        }
        remembered
    }

    /// Where a request goes when its replay's target could not be reached: back to the
    /// machine that asked (`force_self`) or its app (`prefer_self`), told why.
    fn fall_back(
        &self,
        e: &ProxyError,
        origin: &Arc<Machine>,
        origin_app: &Arc<AppEntry>,
        d: &replay::Directive,
        head: &mut replay::Head,
        arrived: Instant,
    ) -> Steering {
        self.metrics.replays.with_label_values(&[&origin_app.name, "fallback"]).inc();
        let reason = if matches!(e, ProxyError::WakeTimeout { .. } | ProxyError::NoRoom { .. }) {
            "timeout"
        } else {
            "no_candidate"
        };
        let failed = replay::Failed {
            instance: &origin.id,
            app: &origin_app.name,
            region: origin.region(),
            replay_source: &origin.id,
            reason,
            elapsed_ms: arrived.elapsed().as_millis() as u64,
        };
        head.headers.remove(replay::FLY_REPLAY_SRC);
        head.headers.insert(replay::FLY_REPLAY_FAILED, replay::failed_header(&failed));
        replay::fallback(origin, d.fallback.unwrap_or(replay::Fallback::PreferSelf))
    }

    /// The request once more, for a replay: its head as first sent (transformed), its body
    /// from the start; refused when the body was too large to keep.
    fn again(
        &self,
        head: &replay::Head,
        raw_host: &str,
        proto: Proto,
        activity: &Arc<Activity>,
        body_state: &Arc<RequestBodyState>,
        origin_app: &AppEntry,
    ) -> Result<Request<UpBody>, ProxyError> {
        let body = replayed_body(activity.clone(), body_state, None).ok_or_else(|| {
            ProxyError::ReplayTooLarge { app: origin_app.name.clone(), limit: origin_app.spec.replay_buffer }
        })?;
        let mut req = Request::new(body);
        *req.method_mut() = head.method.clone();
        *req.headers_mut() = head.headers.clone();
        *req.uri_mut() = match proto {
            Proto::Http1 => Ok(Uri::from(head.path.clone())),
            Proto::H2c => format!("http://{raw_host}{}", head.path).parse(),
        }
        .map_err(|_| ProxyError::BadRequest("request target"))?;
        *req.version_mut() = match proto {
            Proto::Http1 => Version::HTTP_11,
            Proto::H2c => Version::HTTP_2,
        };
        if proto == Proto::H2c {
            req.headers_mut().remove(header::HOST);
        } else if !req.headers().contains_key(header::HOST)
            && let Ok(v) = HeaderValue::from_str(raw_host)
        {
            // An HTTP/2 client's request to an h2c app had none (:authority said it).
            req.headers_mut().insert(header::HOST, v);
        }
        Ok(req)
    }

    /// Why the machine's answer is refused, if it is, looked at in place (the response is
    /// not moved through a call). Whatever the machine connection reports, a body the client
    /// framed wrongly, or stopped sending, is the client's fault. `None` leaves `sent` as it
    /// is: a response to pass on, or the send's own error.
    pub(super) fn refused(
        &self,
        sent: &Result<(Response<MachineBody>, Option<Lease>), ProxyError>,
        body: &RequestBodyState,
        machine: &Machine,
    ) -> Option<ProxyError> {
        match (sent, body.failure()) {
            (Err(_), Some(why)) => Some(ProxyError::BadBody(why.to_string())),
            (Err(ProxyError::UpstreamTimeout { timeout, .. }), None) if body.unfinished() => {
                Some(ProxyError::BodyTimeout { timeout: *timeout })
            }
            (Err(_), _) => None,
            (Ok((resp, _)), _) => {
                let head = headers::response_head_size(resp);
                (head > self.max_response_header_bytes).then(|| ProxyError::ResponseHeadersTooLarge {
                    machine: machine.id.clone(),
                    limit: self.max_response_header_bytes,
                    detail: format!("{head} bytes"),
                })
            }
        }
    }

    /// Passes the machine's response on: a body streamed to the client, or, after a 101 to
    /// the protocol asked for, a tunnel.
    pub(super) fn relay(
        &self,
        mut resp: Response<MachineBody>,
        mut guards: ExchangeGuards,
        r: Relay<'_>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Relay { machine, route, client_version, id, timer, via } = r;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let switched_to = headers::upgrade_protocols(resp.headers()).next().unwrap_or("");
            let (Some(client_upgrade), Some(asked)) = (route.client_upgrade, route.upgrade.as_deref()) else {
                return Err(ProxyError::UpstreamError {
                    machine: machine.id.clone(),
                    detail: "101 Switching Protocols to a request that asked for no upgrade".into(),
                });
            };
            if !switched_to.eq_ignore_ascii_case(asked) {
                return Err(ProxyError::UpstreamError {
                    machine: machine.id.clone(),
                    detail: format!(
                        "101 Switching Protocols to {switched_to:?}, not the {asked:?} asked for"
                    ),
                });
            }
            let machine_upgrade = hyper::upgrade::on(&mut resp);
            let websocket = asked.eq_ignore_ascii_case("websocket");
            let (kind, drain_kind) = if websocket {
                (tunnel::Kind::WebSocket, drain::Kind::WebSocket)
            } else {
                (tunnel::Kind::Other, drain::Kind::Other)
            };
            // Registered before the 101 goes out, so the drain never sees the client's
            // connection gone and its tunnel not yet begun.
            let (end, registered) =
                StreamEnd::new(machine.live.streams_end(), guards.exchange.conn(), drain_kind);
            let settings = tunnel::Settings { idle_timeout: timer.timeout(), kind, end, registered };
            self.tasks.spawn(tunnel::run(
                client_upgrade,
                machine_upgrade,
                settings,
                self.metrics.clone(),
                guards,
            ));
            let (mut parts, _) = resp.into_parts();
            headers::prepare_response_via(
                &mut parts.headers,
                via.then(|| headers::via_value(client_version)),
                id.header(),
                true,
            );
            return Ok(Response::from_parts(parts, ProxyBody::empty()));
        }
        let (mut parts, body) = resp.into_parts();
        if client_version == Version::HTTP_2 {
            headers::own_values(&mut parts.headers);
        }
        let (both_framings, late) = if client_version == Version::HTTP_2 {
            let via = via.then(|| headers::via_value(client_version));
            let id = headers::response_request_id(id.header(), client_version);
            (headers::prepare_response_via(&mut parts.headers, via, &id, false), None)
        } else {
            let via = via.then(|| headers::via_header(client_version));
            headers::prepare_response_late(&mut parts.headers, via, id.header())
        };
        if both_framings {
            // Framed two ways: read by its chunks, and never trusted with another request.
            guards.lease = None;
        }
        // An h2c machine's response goes to the client in the client's protocol; hyper
        // picks that from the connection, this only keeps the head consistent.
        parts.version = Version::HTTP_11;
        let sse_end = is_event_stream(&parts.headers)
            .then(|| StreamEnd::new(machine.live.streams_end(), guards.exchange.conn(), drain::Kind::Sse));
        Ok(Response::from_parts(
            parts,
            ProxyBody::streamed(body, timer, self.metrics.clone(), guards, sse_end, late),
        ))
    }

    /// Routes the request (see [`routing::decide`]) and connects to the machine chosen; if
    /// that refuses and the choice was free, tries one other started machine. A failed
    /// connect ejects its machine for a back-off (see `catalog::outlier`), so that the
    /// requests after this one do not pick it; a working one clears that. The retry gets
    /// its own `connect_timeout`: after a timeout on a blackholed machine it goes to a
    /// machine in rotation, which answers in a round trip. A pinned machine (a session's,
    /// a forced one) is never swapped for another.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn connect(
        &self,
        app: &AppEntry,
        steer: &Steering,
        proto: Proto,
        upgrade: bool,
        deadline: Instant,
        may_wake: bool,
        outcome: &mut Outcome,
    ) -> Result<(Routed, Conn), ProxyError> {
        let worked = |m: &Machine| {
            if m.live.outlier().clear() {
                tracing::info!(target: "tern::upstream", app = %app.name, machine = %m.id,
                    "connected to the machine again; back in rotation");
            }
        };
        let wakes: &dyn Wakes = &self.lifecycle;
        let (routed, unpinned) = self.route_softly(app, steer, deadline, may_wake).await;
        let steer = unpinned.as_ref().unwrap_or(steer);
        let first = self.routed(app, steer, routed, outcome)?;
        let err = match self.checkout(&first.pick.machine, proto, upgrade).await {
            Ok(c) => {
                worked(&first.pick.machine);
                return Ok((first, c));
            }
            Err(e) => e,
        };
        let Routed { pick: Pick { machine: first, guard, probe, .. }, why, preferred_missed, .. } = first;
        // Ejected before it leaves the count: a request that sees it less loaded sees it ejected.
        self.connect_failed(&first, probe, &err);
        drop(guard);
        let refused = || ProxyError::UpstreamConnect {
            machine: first.id.clone(),
            addr: first.addr,
            source: std::io::Error::new(err.source.kind(), err.source.to_string()),
        };
        // Declared started moments ago and this node has not started it yet: start it now.
        let starting = wakes.start_declared(app, &first);
        if steer.pinned.is_some() {
            if !starting {
                return Err(refused());
            }
            let routed = self.router.route(app, steer, wakes, deadline, may_wake).await;
            let again = self.routed(app, steer, routed, outcome)?;
            return match self.checkout(&again.pick.machine, proto, upgrade).await {
                Ok(c) => Ok((again, c)),
                Err(e) => {
                    self.connect_failed(&again.pick.machine, again.pick.probe, &e);
                    Err(refused())
                }
            };
        }
        let mut retry = steer.clone();
        retry.preferred = None;
        retry.exclude.push(first.id.clone());
        let second = match routing::decide::decide(app, &retry) {
            routing::decide::Decision::Go(r) => r,
            _ if starting => {
                let routed = self.router.route(app, &retry, wakes, deadline, may_wake).await;
                self.routed(app, &retry, routed, outcome)?
            }
            _ => return Err(refused()),
        };
        let second = Routed {
            why: if second.why == routing::decide::Why::LeastLoaded { why } else { second.why },
            preferred_missed: second.preferred_missed.or(preferred_missed),
            ..second
        };
        self.metrics.upstream_retries.inc();
        match self.checkout(&second.pick.machine, proto, upgrade).await {
            Ok(c) => {
                worked(&second.pick.machine);
                Ok((second, c))
            }
            Err(e) => {
                self.connect_failed(&second.pick.machine, second.pick.probe, &e);
                Err(ProxyError::UpstreamConnect {
                    machine: second.pick.machine.id.clone(),
                    addr: second.pick.machine.addr,
                    source: e.source,
                })
            }
        }
    }

    /// A connection for an exchange with `m`: to the machine, or to the node that owns it
    /// (over HTTP/2, unless the exchange upgrades).
    async fn checkout(
        &self,
        m: &Machine,
        proto: Proto,
        upgrade: bool,
    ) -> Result<Conn, crate::upstream::ConnectError> {
        let (addr, remote) = super::backhaul::dial(self, m);
        let proto = if remote && !upgrade { Proto::H2c } else { proto };
        self.pool.checkout(addr, proto, upgrade).await
    }

    /// Routes; a browser cannot act on an error, so an affinity cookie whose machine cannot
    /// be had pins nothing (the response brings a new cookie): then the steering used instead.
    pub(super) async fn route_softly(
        &self,
        app: &AppEntry,
        steer: &Steering,
        deadline: Instant,
        may_wake: bool,
    ) -> (Result<Routed, Refusal>, Option<Steering>) {
        let wakes: &dyn Wakes = &self.lifecycle;
        let routed = self.router.route(app, steer, wakes, deadline, may_wake).await;
        match (&routed, &steer.pinned) {
            (Err(Refusal::Wait(WakeError::Unavailable(_) | WakeError::Gone, ..)), Some((_, Why::Cookie))) => {
                let unpinned = Steering { pinned: None, ..steer.clone() };
                (self.router.route(app, &unpinned, wakes, deadline, may_wake).await, Some(unpinned))
            }
            _ => (routed, None),
        }
    }

    /// A routing decision as the exchange takes it: waits are timed and counted, and a
    /// refusal becomes the error the client gets.
    pub(super) fn routed(
        &self,
        app: &AppEntry,
        steer: &Steering,
        routed: Result<Routed, Refusal>,
        outcome: &mut Outcome,
    ) -> Result<Routed, ProxyError> {
        let label = |r: &Result<Routed, Refusal>| match r {
            Ok(_) => "ok",
            Err(Refusal::Wait(WakeError::Timeout, ..)) => "timeout",
            Err(Refusal::Wait(WakeError::QueueFull(_) | WakeError::NoRoom(_), ..)) => "queue_full",
            Err(Refusal::Wait(WakeError::Failed(_), ..)) => "failed",
            Err(_) => "nothing_to_wake",
        };
        let waited = match &routed {
            Ok(r) => r.waited,
            // Turned away at once (nothing to wake): it did not wait.
            Err(Refusal::Wait(
                WakeError::NothingToWake | WakeError::Unavailable(_) | WakeError::Gone,
                ..,
            )) => None,
            Err(Refusal::Wait(_, _, waited)) => Some(*waited),
            Err(Refusal::NoRegion) => None,
        };
        if let Some(waited) = waited {
            outcome.waited = Some(waited);
            self.metrics
                .wake_duration
                .with_label_values(&[&app.name, label(&routed)])
                .observe(waited.as_secs_f64());
        }
        let name = app.name.clone();
        let pinned_why = steer.pinned.as_ref().map(|(_, why)| *why);
        routed.map_err(|refusal| match refusal {
            Refusal::NoRegion => {
                let regions = match &steer.regions {
                    routing::decide::Regions::Force(r) | routing::decide::Regions::Prefer(r) => r.join(","),
                    routing::decide::Regions::Any => String::new(),
                };
                ProxyError::RegionUnavailable { app: name, regions }
            }
            Refusal::Wait(e, pinned, waited) => match (e, pinned, pinned_why) {
                (WakeError::Gone, Some(m), Some(Why::Session)) => {
                    ProxyError::SessionGone { app: name, machine: m.to_string() }
                }
                (e @ (WakeError::Gone | WakeError::Unavailable(_)), Some(m), _) => {
                    ProxyError::InstanceUnavailable {
                        app: name,
                        machine: m.to_string(),
                        reason: e.to_string(),
                    }
                }
                (WakeError::Timeout, _, _) => {
                    ProxyError::WakeTimeout { app: name, timeout: app.spec.wake_timeout }
                }
                (WakeError::QueueFull(limit), _, _) => ProxyError::QueueFull { app: name, limit },
                (WakeError::NoRoom(hard_limit), _, _) => ProxyError::NoRoom { app: name, hard_limit, waited },
                (WakeError::Failed(reason), _, _) => {
                    ProxyError::WakeFailed { app: name, reason: reason.to_string() }
                }
                (WakeError::NothingToWake | WakeError::Gone | WakeError::Unavailable(_), _, _) => {
                    ProxyError::NoMachine { app: name }
                }
            },
        })
    }

    /// Ejects a machine whose connect failed, for its back-off (see `catalog::outlier`).
    fn connect_failed(&self, m: &Machine, probe: bool, err: &crate::upstream::ConnectError) {
        let ejected = m.live.outlier().failed(crate::clock::now_ms(), probe);
        if ejected.is_some() {
            self.metrics.machine_ejections.inc();
        }
        tracing::warn!(target: "tern::upstream", app = %m.spec.app, machine = %m.id, error = %err,
            ejected_ms = ejected.map(|e| e.for_ms), failures = ejected.map(|e| e.failures),
            "could not connect to the machine");
    }

    /// Sends the request and waits for the response head, for at most the app's
    /// idle_timeout of silence (an upload in progress is not silence). A pooled connection
    /// that died while idle hands the request back, and it goes out once more on a new one.
    /// With `keep`, the request's fields as sent are left there, and `extra`'s go out after
    /// them (see [`crate::upstream::Conn::send_keeping`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn send(
        &self,
        conn: Conn,
        req: Request<UpBody>,
        machine: &Machine,
        proto: Proto,
        upgrade: bool,
        activity: &Activity,
        idle: Duration,
        timers: &ConnState,
        mut keep: Option<&mut Option<http::HeaderMap>>,
        extra: Option<&dyn crate::upstream::Extra>,
    ) -> Result<(Response<MachineBody>, Option<Lease>), ProxyError> {
        let timeout = || ProxyError::UpstreamTimeout { machine: machine.id.clone(), timeout: idle };
        let failed = |e: UpError| {
            if e.is_too_large() {
                // Over hyper's read buffer (sized from the limit), or over 100 header fields.
                return ProxyError::ResponseHeadersTooLarge {
                    machine: machine.id.clone(),
                    limit: self.max_response_header_bytes,
                    detail: e.to_string(),
                };
            }
            ProxyError::UpstreamError { machine: machine.id.clone(), detail: e.to_string() }
        };
        let reused = conn.reused();
        let mut timer = timers.take_timer();
        // `biased`: the send first, then the timer; no random draw to pick an order.
        let first = tokio::select! {
            biased;
            r = conn.send_keeping(req, upgrade, keep.as_deref_mut(), extra) => r,
            () = silent_for_on(timer.as_mut(), activity, idle) => return Err(timeout()),
        };
        timers.keep_timer(timer);
        let req = match first {
            Ok(resp) => return Ok(resp),
            Err(SendError::NotSent(req, _)) if reused => req,
            Err(SendError::NotSent(_, e) | SendError::Failed(e)) => return Err(failed(e)),
        };
        // The pooled connection died while idle, and now a new one fails too: the machine is
        // gone, as surely as if the first connect had failed.
        let fresh = self.pool.connect_fresh(machine.addr, proto, upgrade).await.map_err(|e| {
            self.connect_failed(machine, false, &e);
            ProxyError::UpstreamConnect { machine: machine.id.clone(), addr: machine.addr, source: e.source }
        })?;
        tokio::select! {
            biased;
            r = fresh.send_keeping(*req, upgrade, keep, extra) => r.map_err(|(SendError::NotSent(_, e) | SendError::Failed(e))| failed(e)),
            () = silent_for(activity, idle) => Err(timeout()),
        }
    }
}

impl Handler {
    /// What steers the request within its app: the routing headers (fly-proxy's), never
    /// to a machine of another app.
    fn steering(&self, app: &AppEntry, head: &http::HeaderMap) -> Result<Steering, ProxyError> {
        let mut steer = self.unsteered();
        let text = |name: &str| {
            head.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
        };
        if let Some(id) = text(headers::FORCE_INSTANCE) {
            let Some(m) = self.router.machine_of(app, id) else {
                return Err(ProxyError::InstanceUnavailable {
                    app: app.name.clone(),
                    machine: id.to_owned(),
                    reason: "the app has no such machine".into(),
                });
            };
            steer.pinned = Some((m, Why::Forced));
        }
        if let Some(id) = text(headers::PREFER_INSTANCE) {
            match self.router.machine_of(app, id) {
                Some(m) => steer.preferred = Some((m, Why::Preferred)),
                None => steer.preferred_missing = Some(Arc::from(id)),
            }
        }
        let regions = |v: &str| -> Vec<String> {
            v.split(',').map(|r| r.trim().to_ascii_lowercase()).filter(|r| !r.is_empty()).collect()
        };
        if let Some(v) = text(headers::FORCE_REGION) {
            steer.regions = Regions::Force(regions(v));
        } else if let Some(v) = text(headers::PREFER_REGION) {
            steer.regions = Regions::Prefer(regions(v));
        }
        Ok(steer)
    }

    /// The steering of a request without routing headers.
    fn unsteered(&self) -> Steering {
        Steering { nearest: self.router.nearest().cloned(), ..Steering::default() }
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

/// Refuses requests that are ambiguous or that tern does not serve, before anything is
/// routed: `CONNECT` (tern is no tunnel), a `*` target on anything but `OPTIONS`, two `Host`
/// headers (which one routes?), an HTTP/1.1 request without `Host` (RFC 9112 §3.2), and an
/// HTTP/2 request whose `Host` names another host than its `:authority`.
fn check_request<B>(req: &Request<B>) -> Result<(), ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed(Method::CONNECT));
    }
    if req.uri().path() == "*" && req.method() != Method::OPTIONS {
        return Err(ProxyError::BadRequest("a \"*\" request target is only for OPTIONS"));
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadHost);
    }
    match (req.version(), host, req.uri().authority()) {
        (Version::HTTP_11, None, _) => Err(ProxyError::BadHost),
        // Byte-equal (the usual case) needs no normalising.
        (Version::HTTP_2, Some(host), Some(authority))
            if host.as_bytes() != authority.as_str().as_bytes() =>
        {
            let same = host.to_str().ok().and_then(|h| routing::normalize(h).ok())
                == routing::normalize(authority.as_str()).ok();
            if same { Ok(()) } else { Err(ProxyError::BadHost) }
        }
        _ => Ok(()),
    }
}

/// The host the client asked for: the URI authority (HTTP/2, absolute-form), else `Host`;
/// held apart from the request by a shared reference to its bytes, so that the request can
/// change while the host is read.
enum RawHost {
    Authority(http::uri::Authority),
    Header(HeaderValue),
}

impl RawHost {
    fn of<B>(req: &Request<B>) -> Option<RawHost> {
        if let Some(auth) = req.uri().authority() {
            return Some(RawHost::Authority(auth.clone()));
        }
        req.headers().get(header::HOST).cloned().map(RawHost::Header)
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            RawHost::Authority(a) => Some(a.as_str()),
            RawHost::Header(v) => v.to_str().ok(),
        }
    }
}

/// How one request goes to its app's machines, as its head says.
pub(super) struct Route {
    /// The one protocol the client may switch to. Any other it asked for (h2c above all: it
    /// would hand the connection to the machine, past tern) is dropped, and the request goes
    /// on as a plain one.
    pub(super) upgrade: Option<String>,
    pub(super) client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    pub(super) proto: Proto,
    /// `Expect: 100-continue`, relayed from the machine.
    pub(super) gate: Option<Arc<ContinueGate>>,
    /// A user agent the app never wakes a machine for.
    pub(super) ignored_agent: bool,
}

impl Route {
    pub(super) fn of(app: &AppEntry, req: &mut Request<RequestBody>) -> Route {
        let ignored_agent =
            !app.spec.wake_ignore_user_agents.is_empty()
                && req.headers().get(header::USER_AGENT).and_then(|v| v.to_str().ok()).is_some_and(|ua| {
                    app.spec.wake_ignore_user_agents.iter().any(|s| ua.contains(s.as_str()))
                });
        let upgrade: Option<String> = headers::wants_upgrade(req)
            .then(|| {
                headers::upgrade_protocols(req.headers())
                    .find(|p| app.spec.http_options.allows_upgrade(p))
                    .map(str::to_owned)
            })
            .flatten();
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut *req));
        // WebSocket over h2c needs extended CONNECT; upgrades always use HTTP/1.1.
        let proto =
            if app.spec.http_options.h2_backend && upgrade.is_none() { Proto::H2c } else { Proto::Http1 };
        // hyper relays only an HTTP/1.1 machine's 100 (and only an HTTP/1.1 client waits for
        // one). An empty body has nothing to wait for, and an upgrade's body goes with it: its
        // 101 is the machine's answer, and nothing would end a body held back past it.
        let gate = (req.version() == Version::HTTP_11
            && proto == Proto::Http1
            && upgrade.is_none()
            && !http_body::Body::is_end_stream(req.body())
            && headers::expects_continue(req.headers()))
        .then(|| Arc::new(ContinueGate::default()));
        Route { upgrade, client_upgrade, proto, gate, ignored_agent }
    }
}

/// Sets (or, with `None`, removes) `fly-replay-cache-status` on the request as it will be
/// sent again and, if given, on the one about to go.
fn set_cache_status(
    head: &mut replay::Head,
    req: Option<&mut Request<UpBody>>,
    status: Option<&'static str>,
) {
    let set = |h: &mut http::HeaderMap| match status {
        Some(s) => {
            h.insert(replay::FLY_REPLAY_CACHE_STATUS, HeaderValue::from_static(s));
        }
        None => {
            h.remove(replay::FLY_REPLAY_CACHE_STATUS);
        }
    };
    set(&mut head.headers);
    if let Some(req) = req {
        set(req.headers_mut());
    }
}

/// What the replay caches say about a request before its first hop.
struct CacheLookup {
    /// The `[[apps.replay_cache]]` rule covering it and the value it keys by: where a
    /// replay of it is remembered.
    session: Option<(usize, String)>,
    /// The entry that routes it.
    hit: Option<CacheHit>,
    /// An entry was passed over at the client's asking.
    bypassed: bool,
}

struct CacheHit {
    key: CacheKey,
    target: replay::Target,
}

/// Which entry routed a request, to forget it.
enum CacheKey {
    Path(String),
    Session(usize, String),
}

/// What passing a response on needs to know.
pub(super) struct Relay<'a> {
    pub(super) machine: &'a Machine,
    pub(super) route: Route,
    pub(super) client_version: Version,
    pub(super) id: &'a RequestId,
    pub(super) timer: IdleTimer,
    /// Whether to add this node's `Via` (not on a response going back over the backhaul).
    pub(super) via: bool,
}

/// How the request goes to the machine.
pub(super) struct Upstream<'a> {
    pub(super) raw_host: &'a str,
    pub(super) upgrade: Option<&'a str>,
    pub(super) proto: Proto,
}

/// The client side of `req`'s exchange, as the machine is told of it.
pub(super) fn client_side<'a, B>(
    req: &Request<B>,
    conn: &'a ConnInfo,
    id: &'a RequestId,
    region: &'a HeaderValue,
) -> ClientSide<'a> {
    ClientSide {
        client_ip: &conn.client_ip,
        tls: conn.tls,
        local_port: &conn.local_port,
        region,
        request_id: id.header(),
        version: req.version(),
        relayed: conn.backhaul,
    }
}

/// The client's request as a machine is sent it, the state of its body, and whether the
/// forwarding fields are left to the sender (`side`'s [`crate::upstream::Extra`]: see
/// [`headers::prepare_request`]).
pub(super) fn upstream_request(
    req: Request<RequestBody>,
    side: &ClientSide<'_>,
    up: Upstream<'_>,
    activity: &Arc<Activity>,
    gate: Option<&Arc<ContinueGate>>,
    replay_buffer: u64,
) -> Result<(Request<UpBody>, Arc<RequestBodyState>, bool), ProxyError> {
    let Upstream { raw_host, upgrade, proto } = up;
    let (mut parts, body) = req.into_parts();
    let gated = gate.is_some();
    let extra =
        headers::prepare_request(&mut parts.headers, side, raw_host, upgrade, gated, proto == Proto::H2c);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let origin_form = parts.uri.scheme().is_none() && parts.uri.authority().is_none();
    parts.uri = match proto {
        // Already what an HTTP/1.1 machine is sent: kept, not parsed again.
        Proto::Http1 if origin_form && parts.uri.path_and_query().is_some() => parts.uri,
        Proto::Http1 => path.parse().map_err(|_| ProxyError::BadRequest("request target"))?,
        Proto::H2c => format!("http://{raw_host}{path}")
            .parse()
            .map_err(|_| ProxyError::BadRequest("request target"))?,
    };
    parts.version = match proto {
        Proto::Http1 => Version::HTTP_11,
        Proto::H2c => Version::HTTP_2,
    };
    if parts.headers.get(header::HOST).is_some_and(|h| h != raw_host) {
        // An absolute-form target wins over Host (RFC 9112 §3.2.2): send what routed it (to
        // an h2c machine, the same as its :authority).
        if let Ok(v) = HeaderValue::from_str(raw_host) {
            parts.headers.insert(header::HOST, v);
        }
    }
    let gate = gate.cloned();
    // No body, or one read whole with its head, goes as it is (tern's own exchange writes it
    // with the head), not through a reader of the client's body; the state keeps it too, to
    // send again for a replay.
    let whole = match &body {
        RequestBody::Empty => Some(None),
        _ => body.whole().filter(|_| gate.is_none()).map(|b| Some(b.clone())),
    };
    let state = RequestBodyState::new(body, replay_buffer);
    let up_body = match whole {
        Some(bytes) => UpBody::Whole(bytes),
        None => upstream_body(activity.clone(), state.clone(), gate.clone()),
    };
    let mut req = Request::from_parts(parts, up_body);
    if let Some(gate) = gate {
        hyper::ext::on_informational(&mut req, move |r| {
            if r.status() == StatusCode::CONTINUE {
                gate.open();
            }
        });
    }
    Ok((req, state, extra))
}
