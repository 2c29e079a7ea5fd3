//! What an app declares about sessions and replay: `[apps.affinity]`, `replay_buffer` and
//! `[[apps.replay_cache]]`, with the rules `tern apply` and the catalog's RIB reader both
//! hold them to. Nothing here does I/O or routes anything; `routing::replay` uses it.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use super::{AppSpec, names};

/// Which response headers open a session and which cookie tern routes by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Affinity {
    /// Response headers that open a session (case-insensitive names). Default
    /// `["Mcp-Session-Id"]`, so MCP servers keep their sessions without configuration;
    /// `[]` turns it off.
    #[serde(default = "default_affinity_headers")]
    pub headers: Vec<String>,
    /// A cookie tern sets and routes by; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
}

impl Default for Affinity {
    fn default() -> Self {
        Affinity { headers: default_affinity_headers(), cookie: None }
    }
}

pub(super) fn default_affinity_headers() -> Vec<String> {
    vec!["Mcp-Session-Id".into()]
}

/// fly-proxy's session replay cache: a replay decision remembered per cookie or header
/// value, for requests under `path_prefix`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayCacheRule {
    /// `"/api"`, or `"host.example/api"` to cover one hostname only (fly-proxy allows a host).
    pub path_prefix: String,
    #[serde(rename = "type")]
    pub kind: ReplayCacheKind,
    /// The cookie or header whose value keys the cache.
    pub name: String,
    /// At least 10, as fly-proxy requires: a shorter cache would mostly add churn.
    pub ttl_seconds: u64,
    /// Clients may skip the cache with `fly-replay-cache-control: skip`.
    #[serde(default)]
    pub allow_bypass: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayCacheKind {
    Cookie,
    Header,
}

impl ReplayCacheRule {
    /// The host part of `path_prefix` (as written) and its path, which starts with '/'.
    pub fn host_and_path(&self) -> (Option<&str>, &str) {
        match self.path_prefix.find('/') {
            Some(0) | None => (None, &self.path_prefix),
            Some(i) => (Some(&self.path_prefix[..i]), &self.path_prefix[i..]),
        }
    }
}

/// Default for `replay_buffer`: fly-proxy's documented replay limit.
pub const DEFAULT_REPLAY_BUFFER: u64 = 1024 * 1024;
/// Largest `replay_buffer`: the buffer is held in memory per request in flight, so a large
/// one multiplied by `max_pending` could exhaust the node.
pub const MAX_REPLAY_BUFFER: u64 = 64 * 1024 * 1024;
/// Shortest `ttl_seconds` of a replay cache, as fly-proxy requires.
pub const MIN_REPLAY_CACHE_TTL: u64 = 10;

pub(super) fn default_replay_buffer() -> u64 {
    DEFAULT_REPLAY_BUFFER
}

/// Parses a byte size: "1MiB", "512KiB", "10MB", "2048" (bytes). Units are B, KB, MB, GB
/// (powers of 1000) and KiB, MiB, GiB (powers of 1024), in any case.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("{s:?} is not a size (try \"1MiB\", \"512KiB\", \"10MB\" or a number of bytes)");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).ok_or_else(|| format!("{s:?} is out of range"))
}

/// serde: a size written as a string ("1MiB") or a number of bytes.
pub(super) fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Bytes(n) => Ok(n),
        Raw::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// serde: an optional size, for fields whose absence means something.
pub(super) fn de_size_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size(d).map(Some)
}

/// The field of an app's session settings that broke a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionField {
    AffinityHeader(usize),
    AffinityCookie,
    ReplayBuffer,
    /// A `[[apps.replay_cache]]` rule and its field.
    ReplayCache(usize, &'static str),
}

impl fmt::Display for SessionField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionField::AffinityHeader(i) => write!(f, "affinity.headers[{i}]"),
            SessionField::AffinityCookie => f.write_str("affinity.cookie"),
            SessionField::ReplayBuffer => f.write_str("replay_buffer"),
            SessionField::ReplayCache(i, k) => write!(f, "replay_cache[{i}].{k}"),
        }
    }
}

impl AppSpec {
    /// The rules `tern apply` and the catalog's RIB reader both hold an app's affinity and
    /// replay settings to, with the field that broke one.
    pub fn check_sessions(&self) -> Result<(), (SessionField, String)> {
        for (i, h) in self.affinity.headers.iter().enumerate() {
            check_affinity_header(h).map_err(|m| (SessionField::AffinityHeader(i), m))?;
            if self.affinity.headers[..i].iter().any(|o| o.eq_ignore_ascii_case(h)) {
                return Err((SessionField::AffinityHeader(i), format!("{h:?} is listed twice")));
            }
        }
        if let Some(c) = &self.affinity.cookie {
            check_cookie_name(c).map_err(|m| (SessionField::AffinityCookie, m))?;
        }
        if self.replay_buffer > MAX_REPLAY_BUFFER {
            return Err((
                SessionField::ReplayBuffer,
                format!("{} bytes is over the limit of 64MiB", self.replay_buffer),
            ));
        }
        for (i, r) in self.replay_cache.iter().enumerate() {
            r.check().map_err(|(k, m)| (SessionField::ReplayCache(i, k), m))?;
            let key = |r: &ReplayCacheRule| r.path_prefix.to_ascii_lowercase();
            if self.replay_cache[..i].iter().any(|o| key(o) == key(r)) {
                return Err((
                    SessionField::ReplayCache(i, "path_prefix"),
                    format!(
                        "{:?} has two rules; the longest prefix decides, so one would never apply",
                        r.path_prefix
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl ReplayCacheRule {
    fn check(&self) -> Result<(), (&'static str, String)> {
        if self.ttl_seconds < MIN_REPLAY_CACHE_TTL {
            return Err(("ttl_seconds", format!("must be at least {MIN_REPLAY_CACHE_TTL}")));
        }
        let name = match self.kind {
            ReplayCacheKind::Cookie => check_cookie_name(&self.name),
            ReplayCacheKind::Header => check_header_name(&self.name),
        };
        name.map_err(|m| ("name", m))?;
        let (host, path) = self.host_and_path();
        let bad = |why: &str| {
            Err((
                "path_prefix",
                format!("{:?} {why} (write \"/path\" or \"host.example/path\")", self.path_prefix),
            ))
        };
        if !path.starts_with('/') {
            return bad("does not start with '/' or a hostname then '/'");
        }
        if !path.bytes().all(|b| b.is_ascii_graphic()) {
            return bad("has a character a request path cannot");
        }
        if host.is_some_and(|h| !names::is_dns_name(&h.to_ascii_lowercase())) {
            return bad("has a host that is not a hostname (no port, no wildcard)");
        }
        Ok(())
    }
}

/// An affinity header: a valid field name that neither frames the message nor is one tern
/// sets or reads itself, since binding a session to those would fight tern's own use.
pub fn check_affinity_header(name: &str) -> Result<(), String> {
    check_header_name(name)?;
    let n = name.to_ascii_lowercase();
    const OWNED: [&str; 11] = [
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "set-cookie",
        "cookie",
        "via",
    ];
    const OWNED_PREFIXES: [&str; 4] = ["proxy-", "x-forwarded-", "fly-", "tern-"];
    if OWNED.contains(&n.as_str()) || OWNED_PREFIXES.iter().any(|p| n.starts_with(p)) {
        return Err(format!(
            "{name:?} frames the message or is a header tern owns; it cannot carry a session"
        ));
    }
    Ok(())
}

/// An HTTP field name (RFC 9110 token).
pub fn check_header_name(name: &str) -> Result<(), String> {
    if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(format!("{name:?} is not an HTTP header name"));
    }
    Ok(())
}

/// A cookie name: an RFC 6265 token (visible ASCII without separators).
pub fn check_cookie_name(name: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("{name:?} is not a cookie name (letters, digits and !#$%&'*+-.^_`|~)"));
    }
    Ok(())
}
