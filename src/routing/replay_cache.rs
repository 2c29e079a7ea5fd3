//! Remembered replays: fly-proxy's path replay cache (`fly-replay-cache`) and session
//! replay cache (`[[apps.replay_cache]]`). An optimisation, not a guarantee, as in
//! fly-proxy: entries expire, are bounded in number, and go with their app.
//!
//! Time is `crate::clock::now_ms()`, tokio's clock, so tests pause and advance it. No I/O;
//! the maps are sharded (`DashMap`) and no guard outlives a call.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use http::HeaderMap;

use super::replay::CacheDirective;
use crate::clock::now_ms;
use crate::model::{AppSpec, ReplayCacheKind};

/// Where a cached replay sends requests: the target as the original directive named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub app: Option<String>,
    pub instance: Option<String>,
    pub region: Vec<String>,
    pub prefer_instance: Option<String>,
}

/// A path replay found for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathHit {
    pub target: Target,
    /// Clients may skip it with `fly-replay-cache-control: skip`.
    pub allow_bypass: bool,
    /// The prefix it is stored under.
    pub prefix: String,
}

/// Entries kept at most, path and session together (inserts racing past a full check may
/// add one each). Each is small (a target and a key), so the bound keeps the cache to a few
/// megabytes whatever apps send.
pub const CAPACITY: usize = 65_536;

#[derive(Clone)]
struct Entry {
    target: Target,
    allow_bypass: bool,
    expires_ms: u64,
}

impl Entry {
    fn live(&self, now: u64) -> bool {
        self.expires_ms > now
    }
}

/// One app's entries. Dropping it (its app forgotten, the last lookup done) takes its
/// entries out of the shared count.
struct AppCache {
    /// host → path prefix → entry; a lookup probes the request path's own prefixes, so it
    /// costs the path's depth, not the number of entries.
    paths: DashMap<String, HashMap<String, Entry>>,
    /// cookie or header value → (rule index, entry); a value rarely has more than one rule.
    sessions: DashMap<String, Vec<(usize, Entry)>>,
    entries: AtomicUsize,
    total: Arc<AtomicUsize>,
}

impl AppCache {
    fn added(&self) {
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    fn removed(&self, n: usize) {
        if n > 0 {
            self.entries.fetch_sub(n, Ordering::Relaxed);
            self.total.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// Drops the entries `keep` refuses, returning how many went.
    fn retain(&self, mut keep: impl FnMut(&Entry) -> bool) -> usize {
        let mut gone = 0;
        self.paths.retain(|_, m| {
            let before = m.len();
            m.retain(|_, e| keep(e));
            gone += before - m.len();
            !m.is_empty()
        });
        self.sessions.retain(|_, v| {
            let before = v.len();
            v.retain(|(_, e)| keep(e));
            gone += before - v.len();
            !v.is_empty()
        });
        self.removed(gone);
        gone
    }
}

impl Drop for AppCache {
    fn drop(&mut self) {
        self.total.fetch_sub(*self.entries.get_mut(), Ordering::Relaxed);
    }
}

/// Both replay caches, for every app.
pub struct ReplayCache {
    apps: DashMap<String, Arc<AppCache>>,
    total: Arc<AtomicUsize>,
    capacity: usize,
    /// Set while one caller makes room, so a full cache is swept once, not by every insert.
    sweeping: AtomicBool,
}

impl Default for ReplayCache {
    fn default() -> Self {
        ReplayCache::with_capacity(CAPACITY)
    }
}

impl ReplayCache {
    /// A cache of at most `capacity` entries (tests use small ones).
    pub fn with_capacity(capacity: usize) -> Self {
        ReplayCache {
            apps: DashMap::new(),
            total: Arc::new(AtomicUsize::new(0)),
            capacity,
            sweeping: AtomicBool::new(false),
        }
    }

    /// Entries held, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn app(&self, app: &str) -> Option<Arc<AppCache>> {
        // Most nodes hold no replay at all: a load, where the map's look-up hashes the name
        // and locks a shard, for every request.
        if self.is_empty() {
            return None;
        }
        self.apps.get(app).map(|a| Arc::clone(a.value()))
    }

    /// The app's entries, created on first use; `None` when the cache is full even after
    /// making room (the entry is then simply not remembered).
    fn app_for_insert(&self, app: &str) -> Option<Arc<AppCache>> {
        if self.len() >= self.capacity && !self.make_room() {
            return None;
        }
        if let Some(a) = self.app(app) {
            return Some(a);
        }
        let entry = self.apps.entry(app.to_string()).or_insert_with(|| {
            Arc::new(AppCache {
                paths: DashMap::new(),
                sessions: DashMap::new(),
                entries: AtomicUsize::new(0),
                total: Arc::clone(&self.total),
            })
        });
        Some(Arc::clone(entry.value()))
    }

    /// Drops expired entries and, if that is not enough, the eighth of the entries closest
    /// to expiry, so that the next inserts do not each pay for a sweep. False when another
    /// caller is sweeping and the cache is still full.
    fn make_room(&self) -> bool {
        if self.sweeping.swap(true, Ordering::Acquire) {
            return self.len() < self.capacity;
        }
        let now = now_ms();
        let apps: Vec<Arc<AppCache>> = self.apps.iter().map(|a| Arc::clone(a.value())).collect();
        for a in &apps {
            a.retain(|e| e.live(now));
        }
        if self.len() >= self.capacity {
            let mut expiries: Vec<u64> = Vec::with_capacity(self.len());
            for a in &apps {
                a.paths.iter().for_each(|m| expiries.extend(m.values().map(|e| e.expires_ms)));
                a.sessions.iter().for_each(|v| expiries.extend(v.iter().map(|(_, e)| e.expires_ms)));
            }
            let cut = (expiries.len() / 8).max(1).min(expiries.len());
            if cut > 0 {
                let (_, threshold, _) = expiries.select_nth_unstable(cut - 1);
                let threshold = *threshold;
                for a in &apps {
                    a.retain(|e| e.expires_ms > threshold);
                }
            }
        }
        // An app left empty goes too. An insert racing with this may land in the dropped
        // map and be lost: acceptable for a cache that promises nothing, and its count still
        // goes when the map is dropped.
        self.apps.retain(|_, a| a.entries.load(Ordering::Relaxed) > 0);
        self.sweeping.store(false, Ordering::Release);
        self.len() < self.capacity
    }

    /// Remembers a path replay (`fly-replay-cache`) for `host` (normalised) under
    /// `c.prefix`, replacing one there. An invalidation stores nothing (see
    /// [`Self::invalidate_path`]).
    pub fn put_path(&self, app: &str, host: &str, c: &CacheDirective, target: Target) {
        if c.invalidate {
            return;
        }
        let Some(a) = self.app_for_insert(app) else { return };
        let entry = Entry { target, allow_bypass: c.allow_bypass, expires_ms: expiry(c.ttl) };
        let mut hosts = a.paths.entry(host.to_string()).or_default();
        if hosts.insert(c.prefix.clone(), entry).is_none() {
            a.added();
        }
    }

    /// The path replay covering `path` (without query) on `host`: the longest live prefix,
    /// with whether clients may bypass it.
    pub fn path(&self, app: &str, host: &str, path: &str) -> Option<(Target, bool)> {
        self.path_hit(app, host, path).map(|h| (h.target, h.allow_bypass))
    }

    /// As [`Self::path`], with the prefix the entry is stored under: what
    /// [`Self::invalidate_path`] takes to forget the entry that routed a request.
    pub fn path_hit(&self, app: &str, host: &str, path: &str) -> Option<PathHit> {
        let a = self.app(app)?;
        let now = now_ms();
        let mut expired = false;
        let found = {
            let hosts = a.paths.get(host)?;
            let mut found = None;
            for prefix in prefixes(path) {
                match hosts.get(prefix) {
                    Some(e) if e.live(now) => {
                        found = Some(PathHit {
                            target: e.target.clone(),
                            allow_bypass: e.allow_bypass,
                            prefix: prefix.to_owned(),
                        });
                        break;
                    }
                    Some(_) => expired = true,
                    None => {}
                }
            }
            found
        };
        if expired {
            let mut gone = 0;
            if let Some(mut m) = a.paths.get_mut(host) {
                let before = m.len();
                m.retain(|_, e| e.live(now));
                gone = before - m.len();
            }
            a.paths.remove_if(host, |_, m| m.is_empty());
            a.removed(gone);
        }
        found
    }

    /// Forgets the path replay stored for exactly `prefix` (as [`CacheDirective::prefix`]
    /// gives it) on `host`.
    pub fn invalidate_path(&self, app: &str, host: &str, prefix: &str) {
        let Some(a) = self.app(app) else { return };
        let gone = a.paths.get_mut(host).and_then(|mut m| m.remove(prefix)).is_some();
        a.paths.remove_if(host, |_, m| m.is_empty());
        a.removed(usize::from(gone));
    }

    /// Remembers a session replay: requests covered by rule `rule` of the app's
    /// `replay_cache` that carry `value` go to `target` for `ttl`.
    pub fn put_session(&self, app: &str, rule: usize, value: &str, ttl: Duration, target: Target) {
        let Some(a) = self.app_for_insert(app) else { return };
        let entry = Entry { target, allow_bypass: false, expires_ms: expiry(ttl) };
        let mut rules = a.sessions.entry(value.to_string()).or_default();
        match rules.iter_mut().find(|(r, _)| *r == rule) {
            Some((_, e)) => *e = entry,
            None => {
                rules.push((rule, entry));
                a.added();
            }
        }
    }

    /// The live session replay for `value` under rule `rule`.
    pub fn session(&self, app: &str, rule: usize, value: &str) -> Option<Target> {
        let a = self.app(app)?;
        let now = now_ms();
        let live = {
            let rules = a.sessions.get(value)?;
            let (_, e) = rules.iter().find(|(r, _)| *r == rule)?;
            e.live(now).then(|| e.target.clone())
        };
        if live.is_none() {
            self.drop_session(&a, rule, value, |e| !e.live(now));
        }
        live
    }

    /// Forgets the session replay for `value` under rule `rule`.
    pub fn invalidate_session(&self, app: &str, rule: usize, value: &str) {
        if let Some(a) = self.app(app) {
            self.drop_session(&a, rule, value, |_| true);
        }
    }

    fn drop_session(&self, a: &AppCache, rule: usize, value: &str, doomed: impl Fn(&Entry) -> bool) {
        let mut gone = 0;
        if let Some(mut rules) = a.sessions.get_mut(value) {
            let before = rules.len();
            rules.retain(|(r, e)| *r != rule || !doomed(e));
            gone = before - rules.len();
        }
        a.sessions.remove_if(value, |_, v| v.is_empty());
        a.removed(gone);
    }

    /// Drops everything of an app (it was removed or redeclared: its rules' indices and its
    /// machines may mean something else now).
    pub fn forget_app(&self, app: &str) {
        self.apps.remove(app);
    }
}

fn expiry(ttl: Duration) -> u64 {
    now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}

/// `/a/b/c` → `/a/b/c`, `/a/b`, `/a`, `/`: the prefixes a path cache entry may be stored
/// under, longest first (a trailing '/' is ignored, as stored prefixes have none).
fn prefixes(path: &str) -> impl Iterator<Item = &str> {
    let mut next = Some(path.trim_end_matches('/'));
    std::iter::from_fn(move || {
        let current = next?;
        if current.is_empty() {
            next = None;
            return Some("/");
        }
        next = Some(current.rfind('/').map_or("", |i| &current[..i]));
        Some(current)
    })
}

/// The `[[apps.replay_cache]]` rule (index into `spec.replay_cache`) that covers this
/// request: the longest `path_prefix` the path starts with, a rule with a host only for that
/// host (and preferred over a host-less rule of the same length). With it, the cookie or
/// header value it keys by; `None` when no rule covers the request or the request carries
/// no value for it. `host` is normalised (lower-case).
pub fn session_rule<'a>(
    spec: &AppSpec,
    host: &str,
    path: &str,
    headers: &'a HeaderMap,
) -> Option<(usize, Cow<'a, str>)> {
    let mut best: Option<(usize, (usize, bool))> = None;
    for (i, rule) in spec.replay_cache.iter().enumerate() {
        let (rule_host, rule_path) = rule.host_and_path();
        if rule_host.is_some_and(|h| !h.eq_ignore_ascii_case(host)) || !path.starts_with(rule_path) {
            continue;
        }
        let rank = (rule_path.len(), rule_host.is_some());
        if best.is_none_or(|(_, r)| rank > r) {
            best = Some((i, rank));
        }
    }
    let (i, _) = best?;
    let rule = &spec.replay_cache[i];
    let value = match rule.kind {
        ReplayCacheKind::Header => headers
            .get_all(rule.name.as_str())
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .find(|v| !v.is_empty())?,
        ReplayCacheKind::Cookie => cookie(headers, &rule.name)?,
    };
    Some((i, Cow::Borrowed(value)))
}

/// The first non-empty value of cookie `name` in the request's `Cookie` headers (there may
/// be several, as HTTP/2 clients send one per cookie), without surrounding quotes.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(n, _)| n.trim() == name)
        .map(|(_, v)| {
            let v = v.trim();
            v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v)
        })
        .find(|v| !v.is_empty())
}

#[cfg(test)]
mod tests;
