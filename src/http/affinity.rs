//! Session affinity on the wire: sealed tokens in place of a machine's session values.
//!
//! When a machine's response carries one of its app's `[apps.affinity] headers` (by default
//! `Mcp-Session-Id`), the client sees, in place of the machine's value, a token sealed with
//! the keyring every node sharing the RIB holds (see [`crate::routing::seal`]): it names the
//! app, the machine and the value. A request that carries the token goes to that machine,
//! which sees its own value again. Any node opens any token, so there is no session table
//! to share. With `[apps.affinity] cookie`, tern also sets a sealed cookie naming the
//! machine, for browsers (EventSource reconnects, WebSockets, login sessions).
//!
//! ```text
//!  machine ── Mcp-Session-Id: 5f1c… ──▶ tern ── Mcp-Session-Id: t1.AAAAAQ… ──▶ client
//!  client  ── Mcp-Session-Id: t1.AAAAAQ… ──▶ tern (opens: app ok, machine m2, value 5f1c…)
//!                                           └── Mcp-Session-Id: 5f1c… ──▶ m2, never another
//! ```
//!
//! A header token that does not open is refused (`404 session_invalid`) before any machine
//! sees the request; one whose machine left the catalog gets `404 session_gone`, the MCP
//! specification's signal to start a new session. A cookie is the browser's, which cannot
//! act on an error: one that does not open, or names a machine that is gone, is ignored and
//! replaced.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::catalog::{AppEntry, Machine};
use crate::error::ProxyError;
use crate::routing::Router;
use crate::routing::decide::Why;
use crate::routing::seal::Keyring;
use crate::telemetry::Metrics;

/// What a request's session says, kept for its response.
#[derive(Default)]
pub struct Session {
    /// The machine the session is on, and whether a header token or the cookie named it.
    pub pinned: Option<(Arc<Machine>, Why)>,
    /// The app of that machine when it is not the app the hostname names: a session that a
    /// `fly-replay` `app=` (same org) began on another app's machine.
    pub app: Option<Arc<AppEntry>>,
    /// The token the client sent and the value it opened to, when it is sealed with the key
    /// that seals now: a response that repeats the value gets the same token back, without
    /// sealing again.
    echo: Option<(HeaderName, HeaderValue, HeaderValue)>,
    /// The machine the request's valid cookie names (no new cookie is needed for it).
    cookie_for: Option<Arc<str>>,
}

/// The purpose a cookie token is sealed for (a header's is its lower-case name).
const COOKIE: &str = "cookie";

/// Where an opened token leads.
enum Found {
    /// A machine of the app (or, with `Some`, of another app of its org).
    Machine(Arc<Machine>, Option<Arc<AppEntry>>),
    /// Its machine (or app) left the catalog.
    Gone(String),
}

/// The machine an opened token names: `id` for one of `app`'s machines, `other/id` for one
/// of another app of the same org (a session begun after a `fly-replay` `app=`).
fn find(router: &Router, app: &AppEntry, named: &str) -> Found {
    let gone = || Found::Gone(named.to_owned());
    match named.split_once('/') {
        None => router.machine_of(app, named).map_or_else(gone, |m| Found::Machine(m, None)),
        Some((other, id)) => {
            let Some(target) = router.app_named(other).filter(|t| t.spec.org == app.spec.org) else {
                return gone();
            };
            router.machine_of(&target, id).map_or_else(gone, |m| Found::Machine(m, Some(target)))
        }
    }
}

/// Reads the request's session: opens a token in each of the app's affinity headers
/// present (rewriting it to the machine's own value) and the affinity cookie.
pub fn open(
    app: &AppEntry,
    keyring: &Keyring,
    router: &Router,
    headers: &mut HeaderMap,
    metrics: &Metrics,
) -> Result<Session, ProxyError> {
    let affinity = &app.spec.affinity;
    let mut session = Session::default();
    if affinity.headers.is_empty() && affinity.cookie.is_none() {
        return Ok(session);
    }
    let count = |result: &'static str| app.series.session(metrics, &app.name, result);
    // Read once, and only for a token to open: most requests carry none.
    let mut now = None;
    let mut now = || *now.get_or_insert_with(crate::clock::unix_ms);
    for name in &affinity.headers {
        // Looked for among the names present first (no allocation, no hashing): most
        // requests carry no session.
        if !super::headers::has_named(headers, name) {
            continue;
        }
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else { continue };
        let Some(token) = headers.get(&name) else { continue };
        let invalid = |detail: String| {
            count("invalid");
            ProxyError::SessionInvalid { app: app.name.clone(), detail }
        };
        if headers.get_all(&name).iter().nth(1).is_some() {
            return Err(invalid(format!("two {name} headers")));
        }
        let opened = keyring
            .open_as(&app.name, name.as_str(), token.as_bytes(), now())
            .map_err(|e| invalid(e.to_string()))?;
        let value =
            HeaderValue::from_bytes(&opened.value).map_err(|_| invalid("not a header value".into()))?;
        // Every affinity header present must open, and to one machine: none reaches the
        // machine unchecked.
        match (&session.pinned, find(router, app, &opened.machine)) {
            (Some((m, _)), Found::Machine(found, _)) if Arc::ptr_eq(m, &found) => {}
            (Some(_), _) => {
                return Err(invalid(format!("{name} names another machine than the other session header")));
            }
            (None, Found::Machine(m, other)) => {
                count("hit");
                session.pinned = Some((m, Why::Session));
                session.app = other;
            }
            (None, Found::Gone(machine)) => {
                count("gone");
                return Err(ProxyError::SessionGone { app: app.name.clone(), machine });
            }
        }
        let current = keyring.sealing_id() == Some(opened.key);
        if current && session.echo.is_none() {
            session.echo = Some((name.clone(), value.clone(), token.clone()));
        }
        headers.insert(name, value);
    }
    if let Some(cookie) = &affinity.cookie {
        let opened =
            cookie_value(headers, cookie).map(|v| keyring.open_as(&app.name, COOKIE, v.as_bytes(), now()));
        match opened {
            Some(Ok(opened)) => match find(router, app, &opened.machine) {
                Found::Machine(m, other) => {
                    // One sealed under a key that no longer seals is set again, so it
                    // outlives the rotation's grace.
                    if keyring.sealing_id() == Some(opened.key) {
                        session.cookie_for = Some(m.id.clone());
                    }
                    if session.pinned.is_none() {
                        count("hit");
                        session.pinned = Some((m, Why::Cookie));
                        session.app = other;
                    }
                }
                // Its machine is gone: a normal pick, and a new cookie for the one chosen.
                Found::Gone(_) => count("gone"),
            },
            Some(Err(_)) => count("invalid"),
            None if session.pinned.is_none() => count("miss"),
            None => {}
        }
    } else if session.pinned.is_none() {
        count("miss");
    }
    Ok(session)
}

impl Session {
    /// Seals the session values in a machine's response, and sets the affinity cookie when
    /// the request did not carry a valid one for this machine. `host` is the app the
    /// hostname names, which the tokens are sealed for; `app` is the machine's (another
    /// after a `fly-replay` `app=`).
    #[allow(clippy::too_many_arguments)]
    pub fn seal(
        &self,
        host: &AppEntry,
        app: &AppEntry,
        machine: &Machine,
        keyring: &Keyring,
        headers: &mut HeaderMap,
        tls: bool,
        metrics: &Metrics,
    ) {
        let affinity = &host.spec.affinity;
        let named: std::borrow::Cow<'_, str> = if std::ptr::eq(host, app) || host.name == app.name {
            std::borrow::Cow::Borrowed(&machine.id)
        } else {
            std::borrow::Cow::Owned(format!("{}/{}", app.name, machine.id))
        };
        for name in &affinity.headers {
            // Looked for among the names present first (no allocation, no hashing): most
            // responses open no session.
            if !super::headers::has_named(headers, name) {
                continue;
            }
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else { continue };
            let header::Entry::Occupied(mut entry) = headers.entry(name) else { continue };
            let mut values: Vec<HeaderValue> = Vec::new();
            for value in entry.iter() {
                let sealed = match &self.echo {
                    Some((n, v, token)) if n == entry.key() && v == value && self.on(machine) => {
                        Some(token.clone())
                    }
                    _ => keyring
                        .seal_as(&host.name, entry.key().as_str(), &named, value.as_bytes())
                        .and_then(|t| HeaderValue::from_str(&t).ok())
                        .inspect(|_| host.series.session(metrics, &host.name, "opened")),
                };
                match sealed {
                    Some(v) => values.push(v),
                    None => {
                        // No key to seal with (the RIB has none yet): the raw value could not
                        // be routed back, and would only confuse; say so loudly.
                        tracing::error!(target: "tern::http", app = %host.name,
                            "no session key in the catalog; session header dropped");
                    }
                }
            }
            let mut values = values.into_iter();
            match values.next() {
                Some(first) => {
                    entry.insert(first);
                    for v in values {
                        entry.append(v);
                    }
                }
                None => {
                    entry.remove();
                }
            }
        }
        if let Some(cookie) = &affinity.cookie
            && self.cookie_for.as_deref() != Some(&*machine.id)
            && let Some(token) = keyring.seal_as(&host.name, COOKIE, &named, b"")
        {
            let secure = if tls { "; Secure" } else { "" };
            if let Ok(v) =
                HeaderValue::from_str(&format!("{cookie}={token}; Path=/; HttpOnly; SameSite=Lax{secure}"))
            {
                headers.append(header::SET_COOKIE, v);
            }
        }
    }

    /// Whether the request's session was on this machine.
    fn on(&self, machine: &Machine) -> bool {
        self.pinned.as_ref().is_some_and(|(m, _)| m.id == machine.id)
    }
}

/// The value of cookie `name` in the request's `Cookie` headers, if it has one.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|line| {
        line.split(';').find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"'))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_values_are_found_among_others_and_across_headers() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; tern_affinity=t1.xyz"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie_value(&h, "tern_affinity"), Some("t1.xyz"));
        assert_eq!(cookie_value(&h, "b"), Some("2"));
        assert_eq!(cookie_value(&h, "tern"), None, "a prefix is not the name");
    }
}
