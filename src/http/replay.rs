//! `fly-replay` on the request path: a machine answers with a `fly-replay` header (or an
//! `application/vnd.fly.replay+json` body) instead of serving the request, and tern sends
//! the same request, body included, where it says: another machine, region or app (of the
//! same org). The client sees only the final answer; the `fly-replay` never reaches it.
//!
//! ```text
//!  client ──▶ tern ──▶ m1 ── fly-replay: instance=m7;state=x ──▶ tern
//!                  └──▶ m7 (fly-replay-src: instance=m1;region=ams;t=…;state=x) ──▶ client
//! ```
//!
//! The request body is kept while it is sent (up to the app's `replay_buffer`), so a replay
//! resends it from the start. At most [`MAX_HOPS`] replays follow one another. A target that
//! cannot be reached (no connection at all) sends the request back with `fallback`.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName};
use http::{Response, StatusCode};
use http_body_util::BodyExt;

use crate::catalog::{AppEntry, Machine};
use crate::error::ProxyError;
use crate::routing::Router;
use crate::routing::decide::{Regions, Steering, Why};
use crate::routing::replay;
pub use crate::routing::replay::{Directive, Failed, Fallback, failed_header};
pub use crate::routing::replay_cache::Target;
use crate::upstream::MachineBody;

/// fly-proxy's limit: the eleventh replay in a row is refused.
pub const MAX_HOPS: u32 = 10;

/// The largest `application/vnd.fly.replay+json` body read.
const MAX_JSON: usize = 64 * 1024;

pub const FLY_REPLAY: HeaderName = HeaderName::from_static("fly-replay");
pub const FLY_REPLAY_SRC: HeaderName = HeaderName::from_static("fly-replay-src");
pub const FLY_REPLAY_FAILED: HeaderName = HeaderName::from_static("fly-replay-failed");
pub const FLY_REPLAY_CACHE_STATUS: HeaderName = HeaderName::from_static("fly-replay-cache-status");
/// `skip` from a client: past a cache entry that allows it.
pub const FLY_REPLAY_CACHE_CONTROL: HeaderName = HeaderName::from_static("fly-replay-cache-control");
const JSON_TYPE: &str = "application/vnd.fly.replay+json";

/// What a machine's response asks for.
// Serve is nearly every answer: boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Answer {
    /// Serve it: no replay.
    Serve(Response<MachineBody>),
    /// Send the request elsewhere; `how` is the form it came in (a metric label).
    Replay(Box<Directive>, &'static str),
}

/// Reads a replay request off a machine's response head (and, for the JSON form, its
/// body, bounded and within `idle`).
pub async fn answer(
    resp: Response<MachineBody>,
    machine: &Machine,
    request_path: &str,
    idle: Duration,
) -> Result<Answer, ProxyError> {
    let invalid = |detail: String| ProxyError::ReplayInvalid { machine: machine.id.clone(), detail };
    if let Some(value) = resp.headers().get(FLY_REPLAY) {
        let mut d = replay::from_header(value).map_err(|e| invalid(e.to_string()))?;
        if d.cache.is_none() {
            d.cache = replay::cache_from_headers(resp.headers(), request_path)
                .map_err(|e| invalid(e.to_string()))?;
        }
        return Ok(Answer::Replay(Box::new(d), "header"));
    }
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case(JSON_TYPE)));
    if !json || resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Answer::Serve(resp));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_JSON);
    let bytes = match tokio::time::timeout(idle, body.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => return Err(invalid(format!("reading its body: {e}"))),
        Err(_) => return Err(invalid("its body did not arrive within idle_timeout".into())),
    };
    let d = replay::from_json(&bytes).map_err(|e| invalid(e.to_string()))?;
    Ok(Answer::Replay(Box::new(d), "json"))
}

/// Where a replay goes: the app (the origin's, or `app=` of the same org) and the steering
/// within it.
pub fn target(
    router: &Router,
    origin_app: &Arc<AppEntry>,
    origin: &Machine,
    d: &Directive,
) -> Result<(Arc<AppEntry>, Steering), ProxyError> {
    let (app, mut steer) = steer_to(router, origin_app, &origin.id, &cache_target(d), Why::Replay)?;
    if d.elsewhere && Arc::ptr_eq(&app, origin_app) {
        steer.exclude.push(origin.id.clone());
    }
    Ok((app, steer))
}

/// Where a cached replay sends a request of `origin_app`, as [`target`] does for the replay
/// it remembers (a cached replay has no `elsewhere`).
pub fn cached(
    router: &Router,
    origin_app: &Arc<AppEntry>,
    t: &Target,
) -> Result<(Arc<AppEntry>, Steering), ProxyError> {
    steer_to(router, origin_app, &Arc::from("replay cache"), t, Why::ReplayCache)
}

/// What a replay cache remembers of a directive: where it went.
pub fn cache_target(d: &Directive) -> Target {
    Target {
        app: d.app.clone(),
        instance: d.instance.clone(),
        region: d.region.clone(),
        prefer_instance: d.prefer_instance.clone(),
    }
}

fn steer_to(
    router: &Router,
    origin_app: &Arc<AppEntry>,
    origin: &Arc<str>,
    t: &Target,
    why: Why,
) -> Result<(Arc<AppEntry>, Steering), ProxyError> {
    let invalid = |detail: String| ProxyError::ReplayInvalid { machine: origin.clone(), detail };
    let app = match t.app.as_deref() {
        None => origin_app.clone(),
        Some(name) if name == &*origin_app.name => origin_app.clone(),
        Some(name) => {
            let target = router.app_named(name).ok_or_else(|| invalid(format!("app={name}: no such app")))?;
            if target.spec.org != origin_app.spec.org {
                return Err(ProxyError::ReplayUnauthorized {
                    app: origin_app.name.clone(),
                    target: name.into(),
                });
            }
            target
        }
    };
    let mut steer = Steering { why, ..Steering::default() };
    if let Some(id) = t.instance.as_deref() {
        let m = router.machine_of(&app, id).ok_or_else(|| ProxyError::InstanceUnavailable {
            app: app.name.clone(),
            machine: id.into(),
            reason: "fly-replay names no machine of the app".into(),
        })?;
        steer.pinned = Some((m, why));
    }
    if let Some(id) = t.prefer_instance.as_deref() {
        match router.machine_of(&app, id) {
            Some(m) => steer.preferred = Some((m, why)),
            None => steer.preferred_missing = Some(Arc::from(id)),
        }
    }
    if !t.region.is_empty() {
        steer.regions = Regions::Force(t.region.clone());
    }
    Ok((app, steer))
}

/// Where a failed replay goes back to, with `fallback`.
pub fn fallback(origin: &Arc<Machine>, how: Fallback) -> Steering {
    let mut steer = Steering { why: Why::Replay, ..Steering::default() };
    match how {
        Fallback::ForceSelf => steer.pinned = Some((origin.clone(), Why::Replay)),
        Fallback::PreferSelf => steer.preferred = Some((origin.clone(), Why::Replay)),
    }
    steer
}

/// The head of the request as first sent, to send again. Cloned once per request: the
/// machine request takes the original.
pub struct Head {
    pub method: http::Method,
    /// As first sent (a count on the request's bytes, not a copy), or as a replay's
    /// `transform` makes it.
    pub path: http::uri::PathAndQuery,
    pub headers: HeaderMap,
}

impl Head {
    /// Applies the replay's `transform` (JSON form) and marks where it came from.
    pub fn for_replay(&mut self, d: &Directive, origin: &Machine, now_us: u64) {
        if let Some(path) = &d.transform.path {
            self.path.clone_from(path);
        }
        for name in &d.transform.delete_headers {
            self.headers.remove(name);
        }
        for (name, value) in &d.transform.set_headers {
            self.headers.insert(name.clone(), value.clone());
        }
        self.headers.remove(FLY_REPLAY_CACHE_STATUS);
        self.headers.insert(
            FLY_REPLAY_SRC,
            replay::src_header(&origin.id, origin.region(), now_us, d.state.as_deref()),
        );
    }
}

/// Microseconds since the Unix epoch, for `fly-replay-src`'s `t`.
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Drops a `fly-replay` header from a response that reaches the client anyway (a fallback's,
/// or an upgrade's 101).
pub fn strip(headers: &mut HeaderMap) {
    headers.remove(FLY_REPLAY);
}
