//! `fly-replay`: what an app's response asks tern to do with the request instead of
//! answering it, read from the `fly-replay` header or an `application/vnd.fly.replay+json`
//! body, plus the headers tern writes back (`fly-replay-src`, `fly-replay-failed`).
//!
//! Pure parsing: no I/O, no catalog. Routing the replay, counting hops and expanding
//! region aliases against the catalog belong to the caller.
//!
//! Rules, stricter than fly-proxy where a mistake would silently change routing:
//! - an unknown or repeated field is refused (naming it), not ignored: `regoin=ams` should
//!   fail loudly rather than replay to any machine;
//! - a directive must ask for something (`region`, `instance`, `prefer_instance`, `app` or
//!   `elsewhere=true`); `state`, `timeout` or `fallback` alone are refused;
//! - `instance` excludes `prefer_instance` and `elsewhere`;
//! - empty values and values that are not visible ASCII are refused;
//! - `state` is opaque but must be echoed verbatim in `fly-replay-src`, whose fields are
//!   `;`-separated and unquoted, so in both forms it is 1–1024 visible ASCII characters
//!   without space, `;`, `"` or `\`.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use crate::model::names;

pub use super::replay_cache::{ReplayCache, Target, session_rule};

/// What a replaying response asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directive {
    /// Region codes, lower-cased; aliases (`eu`, `any`, …) kept as given, see
    /// [`region_matches`].
    pub region: Vec<String>,
    pub instance: Option<String>,
    pub prefer_instance: Option<String>,
    pub app: Option<String>,
    pub state: Option<String>,
    /// Leave the responding machine out of the next choice.
    pub elsewhere: bool,
    pub timeout: Option<Duration>,
    pub fallback: Option<Fallback>,
    /// Changes to the request before it is sent again (JSON form only).
    pub transform: Transform,
    /// Remember this replay for later requests (the JSON `cache` object, or the
    /// `fly-replay-cache*` headers through [`cache_from_headers`]).
    pub cache: Option<CacheDirective>,
}

/// Where a replay goes when its target cannot take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Back to the machine that replayed.
    ForceSelf,
    /// Back to any machine of the app that replayed.
    PreferSelf,
}

/// Changes the JSON form may ask for, applied in the order given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transform {
    /// A new path and query, starting with '/'.
    pub path: Option<http::uri::PathAndQuery>,
    pub delete_headers: Vec<HeaderName>,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
}

/// A replay to remember for later requests under `prefix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheDirective {
    /// A path prefix without host and without the implicit trailing `/*` (and without a
    /// trailing '/' except the root `/`). Empty for an invalidation that named none: the
    /// entry that routed this request.
    pub prefix: String,
    /// At least 10 s, as fly-proxy requires; zero for an invalidation.
    pub ttl: Duration,
    pub invalidate: bool,
    /// Clients may skip the cached replay with `fly-replay-cache-control: skip`.
    pub allow_bypass: bool,
}

/// Why a replay directive was refused (`replay_invalid`). Each message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("fly-replay: the value has characters other than visible ASCII")]
    NotAscii,
    #[error("fly-replay: {0:?} is not field=value")]
    Malformed(String),
    #[error("fly-replay: unknown field {0:?}")]
    UnknownField(String),
    #[error("fly-replay: {0} is given twice")]
    Repeated(&'static str),
    #[error("fly-replay: {0} is empty")]
    Empty(&'static str),
    #[error("fly-replay: {field} {value:?} {why}")]
    BadValue { field: &'static str, value: String, why: &'static str },
    #[error("fly-replay: {0} and {1} cannot be combined")]
    Conflict(&'static str, &'static str),
    #[error("fly-replay: nothing to do (give region, instance, prefer_instance, app or elsewhere=true)")]
    NothingToDo,
    #[error("fly-replay: JSON body: {0}")]
    Json(String),
    #[error("fly-replay-cache: {prefix:?} does not cover this request's path {path:?}")]
    CacheNotThisPath { prefix: String, path: String },
}

impl Invalid {
    fn bad(field: &'static str, value: &str, why: &'static str) -> Invalid {
        Invalid::BadValue { field, value: value.to_string(), why }
    }
}

/// The fields common to both forms, as given, before the rules are applied.
#[derive(Default)]
struct Fields {
    region: Option<Vec<String>>,
    instance: Option<String>,
    prefer_instance: Option<String>,
    app: Option<String>,
    state: Option<String>,
    elsewhere: Option<bool>,
    timeout: Option<Duration>,
    fallback: Option<String>,
}

/// `fly-replay: region=ams;instance=00ab;state=x;elsewhere=true;timeout=800ms;fallback=prefer_self`.
/// Values may be quoted (`region="ams,fra"`); field names are case-insensitive; spaces
/// around `;` and `=` are ignored, as is a trailing `;`.
pub fn from_header(value: &HeaderValue) -> Result<Directive, Invalid> {
    let text = value.to_str().map_err(|_| Invalid::NotAscii)?;
    let mut f = Fields::default();
    for part in split_params(text)? {
        let (key, raw) = part.split_once('=').ok_or_else(|| Invalid::Malformed(part.trim().into()))?;
        let key = key.trim().to_ascii_lowercase();
        let v = unquote(raw.trim())?;
        let set = |slot: &mut Option<String>, name: &'static str| match slot {
            Some(_) => Err(Invalid::Repeated(name)),
            None => {
                *slot = Some(v.clone());
                Ok(())
            }
        };
        match key.as_str() {
            "region" if f.region.is_some() => return Err(Invalid::Repeated("region")),
            "region" => f.region = Some(v.split(',').map(str::to_string).collect()),
            "instance" => set(&mut f.instance, "instance")?,
            "prefer_instance" => set(&mut f.prefer_instance, "prefer_instance")?,
            "app" => set(&mut f.app, "app")?,
            "state" => set(&mut f.state, "state")?,
            "fallback" => set(&mut f.fallback, "fallback")?,
            "elsewhere" if f.elsewhere.is_some() => return Err(Invalid::Repeated("elsewhere")),
            "elsewhere" => f.elsewhere = Some(parse_bool("elsewhere", &v)?),
            "timeout" if f.timeout.is_some() => return Err(Invalid::Repeated("timeout")),
            "timeout" => f.timeout = Some(parse_timeout(&v)?),
            _ => return Err(Invalid::UnknownField(key)),
        }
    }
    finish(f, Transform::default(), None)
}

/// Splits `a=1;b="x;y"` at the semicolons outside quotes, dropping empty parts.
fn split_params(text: &str) -> Result<Vec<&str>, Invalid> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, b) in text.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b';' if !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err(Invalid::Malformed(text[start..].trim().into()));
    }
    parts.push(&text[start..]);
    Ok(parts.into_iter().filter(|p| !p.trim().is_empty()).collect())
}

/// A token or an RFC 9110 quoted-string, without its quotes and escapes.
fn unquote(v: &str) -> Result<String, Invalid> {
    let Some(inner) = v.strip_prefix('"') else { return Ok(v.to_string()) };
    let inner = inner.strip_suffix('"').ok_or_else(|| Invalid::Malformed(v.into()))?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next().ok_or_else(|| Invalid::Malformed(v.into()))?),
            '"' => return Err(Invalid::Malformed(v.into())),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn parse_bool(field: &'static str, v: &str) -> Result<bool, Invalid> {
    match v.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Invalid::bad(field, v, "is not true or false")),
    }
}

fn parse_timeout(v: &str) -> Result<Duration, Invalid> {
    if v.is_empty() {
        return Err(Invalid::Empty("timeout"));
    }
    match crate::duration::parse(v) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(Invalid::bad("timeout", v, "must be above zero")),
        Err(_) => Err(Invalid::bad("timeout", v, "is not a duration (\"800ms\", \"5s\", \"1m\")")),
    }
}

/// Applies the rules of the module doc to fields read from either form.
fn finish(f: Fields, transform: Transform, cache: Option<CacheDirective>) -> Result<Directive, Invalid> {
    let mut region = Vec::new();
    for r in f.region.unwrap_or_default() {
        let r = r.trim().to_ascii_lowercase();
        if r.is_empty() {
            return Err(Invalid::Empty("region"));
        }
        names::check_region(&r).map_err(|_| Invalid::bad("region", &r, "is not a region code"))?;
        if !region.contains(&r) {
            region.push(r);
        }
    }
    let machine = |v: Option<String>, field: &'static str| -> Result<Option<String>, Invalid> {
        let Some(v) = v else { return Ok(None) };
        if v.is_empty() {
            return Err(Invalid::Empty(field));
        }
        names::check_machine_id(&v).map_err(|_| Invalid::bad(field, &v, "is not a machine id"))?;
        Ok(Some(v))
    };
    let instance = machine(f.instance, "instance")?;
    let prefer_instance = machine(f.prefer_instance, "prefer_instance")?;
    if let Some(app) = &f.app {
        if app.is_empty() {
            return Err(Invalid::Empty("app"));
        }
        names::check_app_name(app).map_err(|_| Invalid::bad("app", app, "is not an app name"))?;
    }
    if let Some(state) = &f.state {
        check_state(state)?;
    }
    let fallback = match f.fallback.as_deref() {
        None => None,
        Some("") => return Err(Invalid::Empty("fallback")),
        Some(v) if v.eq_ignore_ascii_case("force_self") => Some(Fallback::ForceSelf),
        Some(v) if v.eq_ignore_ascii_case("prefer_self") => Some(Fallback::PreferSelf),
        Some(v) => return Err(Invalid::bad("fallback", v, "is not force_self or prefer_self")),
    };
    let elsewhere = f.elsewhere.unwrap_or(false);
    if instance.is_some() && prefer_instance.is_some() {
        return Err(Invalid::Conflict("instance", "prefer_instance"));
    }
    if instance.is_some() && elsewhere {
        return Err(Invalid::Conflict("instance", "elsewhere"));
    }
    if region.is_empty() && instance.is_none() && prefer_instance.is_none() && f.app.is_none() && !elsewhere {
        return Err(Invalid::NothingToDo);
    }
    Ok(Directive {
        region,
        instance,
        prefer_instance,
        app: f.app,
        state: f.state,
        elsewhere,
        timeout: f.timeout,
        fallback,
        transform,
        cache,
    })
}

/// `state` must survive into `fly-replay-src` unchanged (see the module doc).
fn check_state(state: &str) -> Result<(), Invalid> {
    if state.is_empty() {
        return Err(Invalid::Empty("state"));
    }
    if state.len() > 1024 {
        let start: String = state.chars().take(32).collect();
        return Err(Invalid::bad("state", &start, "is longer than 1024 characters"));
    }
    if !state.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b'"' | b'\\')) {
        return Err(Invalid::bad("state", state, "has a space, ';', '\"', '\\' or a non-ASCII character"));
    }
    Ok(())
}

/// The JSON form, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJson {
    region: Option<Regions>,
    instance: Option<String>,
    prefer_instance: Option<String>,
    app: Option<String>,
    state: Option<String>,
    elsewhere: Option<bool>,
    timeout: Option<JsonDuration>,
    fallback: Option<String>,
    transform: Option<RawTransform>,
    cache: Option<RawCache>,
}

/// `"ams,fra"` or `["ams", "fra"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Regions {
    List(String),
    Array(Vec<String>),
}

/// `"800ms"` or a number of seconds.
#[derive(Deserialize)]
#[serde(untagged)]
enum JsonDuration {
    Text(String),
    Secs(u64),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransform {
    path: Option<String>,
    #[serde(default)]
    delete_headers: Vec<String>,
    #[serde(default)]
    set_headers: Vec<RawHeader>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    ttl: Option<u64>,
    #[serde(default)]
    invalidate: bool,
    #[serde(default)]
    allow_bypass: bool,
}

/// The `application/vnd.fly.replay+json` body form: the header's fields (`region` as a
/// comma list or an array, `elsewhere` a boolean, `timeout` a duration string or seconds),
/// plus `transform` {`path`, `delete_headers`[], `set_headers`[{`name`, `value`}]} and
/// `cache` {`prefix`, `ttl` (seconds), `invalidate`, `allow_bypass`}. Whether the cache
/// prefix covers the request is for the caller to check ([`CacheDirective::covers`]).
pub fn from_json(body: &[u8]) -> Result<Directive, Invalid> {
    let raw: RawJson = serde_json::from_slice(body).map_err(|e| Invalid::Json(e.to_string()))?;
    let region = raw.region.map(|r| match r {
        Regions::List(s) => s.split(',').map(str::to_string).collect(),
        Regions::Array(v) => v,
    });
    let timeout = match raw.timeout {
        None => None,
        Some(JsonDuration::Text(t)) => Some(parse_timeout(&t)?),
        Some(JsonDuration::Secs(0)) => return Err(Invalid::bad("timeout", "0", "must be above zero")),
        Some(JsonDuration::Secs(n)) => Some(Duration::from_secs(n)),
    };
    let transform = raw.transform.map(transform).transpose()?.unwrap_or_default();
    let cache = match raw.cache {
        None => None,
        Some(c) if c.invalidate => Some(CacheDirective {
            prefix: c.prefix.as_deref().map(cache_prefix).transpose()?.unwrap_or_default(),
            ttl: Duration::ZERO,
            invalidate: true,
            allow_bypass: c.allow_bypass,
        }),
        Some(c) => {
            let prefix = c.prefix.ok_or(Invalid::Empty("cache.prefix"))?;
            Some(CacheDirective {
                prefix: cache_prefix(&prefix)?,
                ttl: cache_ttl(c.ttl.ok_or(Invalid::Empty("cache.ttl"))?)?,
                invalidate: false,
                allow_bypass: c.allow_bypass,
            })
        }
    };
    let f = Fields {
        region,
        instance: raw.instance,
        prefer_instance: raw.prefer_instance,
        app: raw.app,
        state: raw.state,
        elsewhere: raw.elsewhere,
        timeout,
        fallback: raw.fallback,
    };
    finish(f, transform, cache)
}

/// Headers a transform may not touch: they frame the message, or tern writes them on the
/// replayed request itself, so an app setting them could forge where a request came from.
fn transform_may_touch(name: &HeaderName) -> bool {
    let n = name.as_str();
    !matches!(
        n,
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "upgrade"
            | "te"
            | "trailer"
            | "keep-alive"
            | "proxy-connection"
            | "http2-settings"
            // What tern writes about the client: a machine must not forge it for another.
            | "x-forwarded-for"
            | "x-forwarded-proto"
            | "x-forwarded-port"
            | "x-forwarded-ssl"
            | "fly-client-ip"
            | "fly-forwarded-port"
            | "fly-region"
            | "fly-request-id"
            | "via"
            | "fly-preferred-instance-unavailable"
    ) && !n.starts_with("fly-replay")
        && !n.starts_with("tern-")
}

fn transform(t: RawTransform) -> Result<Transform, Invalid> {
    let name = |field: &'static str, n: &str| -> Result<HeaderName, Invalid> {
        let h = HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| Invalid::bad(field, n, "is not a header name"))?;
        if !transform_may_touch(&h) {
            return Err(Invalid::bad(field, n, "frames the request or is set by tern"));
        }
        Ok(h)
    };
    let path = match &t.path {
        Some(p) => match p.parse::<http::uri::PathAndQuery>() {
            Ok(parsed) if p.starts_with('/') => Some(parsed),
            _ => return Err(Invalid::bad("transform.path", p, "is not a path starting with '/'")),
        },
        None => None,
    };
    let delete_headers =
        t.delete_headers.iter().map(|n| name("transform.delete_headers", n)).collect::<Result<_, _>>()?;
    let mut set_headers = Vec::with_capacity(t.set_headers.len());
    for h in t.set_headers {
        let value = HeaderValue::from_str(&h.value)
            .map_err(|_| Invalid::bad("transform.set_headers", &h.value, "is not a header value"))?;
        set_headers.push((name("transform.set_headers", &h.name)?, value));
    }
    Ok(Transform { path, delete_headers, set_headers })
}

/// `[host]/path/*` (or `/path`) as a host-less prefix: the host and the implicit `/*` go.
fn cache_prefix(raw: &str) -> Result<String, Invalid> {
    let bad = |why| Invalid::bad("fly-replay-cache", raw, why);
    let raw_trim = raw.trim();
    let path = match raw_trim.find('/') {
        Some(0) => raw_trim,
        Some(i) => {
            let host = raw_trim[..i].to_ascii_lowercase();
            if !names::is_dns_name(&host) {
                return Err(bad("has a host that is not a hostname (no port)"));
            }
            &raw_trim[i..]
        }
        None => return Err(bad("is not a path starting with '/' (\"/api/*\" or \"host/api/*\")")),
    };
    let path = path.strip_suffix('*').unwrap_or(path);
    if path.contains('*') || path.contains('?') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("may hold only a path, with '*' at the end"));
    }
    let path = path.trim_end_matches('/');
    Ok(if path.is_empty() { "/".into() } else { path.into() })
}

fn cache_ttl(secs: u64) -> Result<Duration, Invalid> {
    if secs < crate::model::session::MIN_REPLAY_CACHE_TTL {
        return Err(Invalid::bad("fly-replay-cache-ttl-secs", &secs.to_string(), "must be at least 10"));
    }
    Ok(Duration::from_secs(secs))
}

impl CacheDirective {
    /// Whether `path` (without query) is under this prefix: the prefix itself or below it
    /// at a `/`, so `/api` covers `/api` and `/api/users`, not `/apiary`.
    pub fn covers(&self, path: &str) -> bool {
        path_under(&self.prefix, path)
    }
}

/// Whether `path` is `prefix` or below it at a '/' (the root `/` covers every path).
pub(crate) fn path_under(prefix: &str, path: &str) -> bool {
    prefix == "/" || path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Reads the `fly-replay-cache` (`[host]/path/*`, or `invalidate`),
/// `fly-replay-cache-ttl-secs` (≥ 10) and `fly-replay-cache-allow-bypass` (`yes`) response
/// headers; `None` without `fly-replay-cache`. The prefix must cover `request_path` (the
/// path without query), as fly-proxy requires, so an app cannot cache a replay for paths
/// it was not asked about.
pub fn cache_from_headers(
    headers: &HeaderMap,
    request_path: &str,
) -> Result<Option<CacheDirective>, Invalid> {
    let one = |name: &'static str| -> Result<Option<&str>, Invalid> {
        let mut values = headers.get_all(name).iter();
        let Some(v) = values.next() else { return Ok(None) };
        if values.next().is_some() {
            return Err(Invalid::Repeated(name));
        }
        v.to_str().map(|s| Some(s.trim())).map_err(|_| Invalid::NotAscii)
    };
    let Some(spec) = one("fly-replay-cache")? else { return Ok(None) };
    let allow_bypass = match one("fly-replay-cache-allow-bypass")? {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("yes") || v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("no") || v.eq_ignore_ascii_case("false") => false,
        Some(v) => return Err(Invalid::bad("fly-replay-cache-allow-bypass", v, "is not yes or no")),
    };
    if spec.eq_ignore_ascii_case("invalidate") {
        return Ok(Some(CacheDirective {
            prefix: String::new(),
            ttl: Duration::ZERO,
            invalidate: true,
            allow_bypass,
        }));
    }
    let ttl = one("fly-replay-cache-ttl-secs")?.ok_or(Invalid::Empty("fly-replay-cache-ttl-secs"))?;
    let ttl = ttl
        .parse::<u64>()
        .map_err(|_| Invalid::bad("fly-replay-cache-ttl-secs", ttl, "is not a number of seconds"))?;
    let c =
        CacheDirective { prefix: cache_prefix(spec)?, ttl: cache_ttl(ttl)?, invalidate: false, allow_bypass };
    if !c.covers(request_path) {
        return Err(Invalid::CacheNotThisPath { prefix: c.prefix, path: request_path.into() });
    }
    Ok(Some(c))
}

/// Keeps what a header field of `k=v;…` can carry: visible ASCII without ';'. Values tern
/// validated already pass through unchanged; this only guards against a caller's mistake.
fn field_safe(v: &str) -> std::borrow::Cow<'_, str> {
    if v.bytes().all(|b| b.is_ascii_graphic() && b != b';') {
        std::borrow::Cow::Borrowed(v)
    } else {
        v.chars().map(|c| if c.is_ascii_graphic() && c != ';' { c } else { '_' }).collect::<String>().into()
    }
}

fn header(text: &str) -> HeaderValue {
    // Cannot fail: every byte went through `field_safe` or is a digit or one of `=;_`.
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `fly-replay-src: instance=…;region=…;t=<µs since epoch>;state=…` (`state` omitted when
/// `None`), for the replayed request.
pub fn src_header(instance: &str, region: &str, t_us: u64, state: Option<&str>) -> HeaderValue {
    let mut s = format!("instance={};region={};t={t_us}", field_safe(instance), field_safe(region));
    if let Some(state) = state {
        s.push_str(";state=");
        s.push_str(&field_safe(state));
    }
    header(&s)
}

/// What `fly-replay-failed` reports to the machine a failed replay falls back to.
#[derive(Clone, Copy, Debug)]
pub struct Failed<'a> {
    /// The machine the replay tried (empty when none was chosen).
    pub instance: &'a str,
    pub app: &'a str,
    pub region: &'a str,
    /// The machine that asked for the replay.
    pub replay_source: &'a str,
    /// `timeout`, `retries_exhausted` or `no_candidate`.
    pub reason: &'a str,
    pub elapsed_ms: u64,
}

/// `fly-replay-failed: instance=…;app=…;region=…;replay_source=…;reason=…;elapsed_ms=…`.
pub fn failed_header(f: &Failed<'_>) -> HeaderValue {
    header(&format!(
        "instance={};app={};region={};replay_source={};reason={};elapsed_ms={}",
        field_safe(f.instance),
        field_safe(f.app),
        field_safe(f.region),
        field_safe(f.replay_source),
        field_safe(f.reason),
        f.elapsed_ms
    ))
}

/// The region groups fly-proxy accepts in `region` and `fly-prefer-region`. `any` is not a
/// group: it matches every region ([`region_matches`]).
pub fn region_group(code: &str) -> Option<&'static [&'static str]> {
    const US: &[&str] = &["atl", "bos", "den", "dfw", "ewr", "iad", "lax", "mia", "ord", "phx", "sea", "sjc"];
    const NA: &[&str] =
        &["atl", "bos", "den", "dfw", "ewr", "iad", "lax", "mia", "ord", "phx", "sea", "sjc", "yul", "yyz"];
    const EU: &[&str] = &["ams", "arn", "cdg", "fra", "lhr", "mad", "otp", "waw"];
    const SA: &[&str] = &["bog", "eze", "gdl", "gig", "gru", "qro", "scl"];
    const APAC: &[&str] = &["bom", "hkg", "nrt", "sin", "syd"];
    match code {
        "us" | "usa" => Some(US),
        "na" => Some(NA),
        "eu" => Some(EU),
        "sa" => Some(SA),
        "apac" => Some(APAC),
        _ => None,
    }
}

/// Whether a machine in `region` is one of `wanted` (codes, groups or `any`). An empty
/// `wanted` matches nothing: the caller asked for no region.
pub fn region_matches(wanted: &[String], region: &str) -> bool {
    wanted.iter().any(|w| {
        w == "any" || w.eq_ignore_ascii_case(region) || region_group(w).is_some_and(|g| g.contains(&region))
    })
}

#[cfg(test)]
mod tests;
