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
    /// The token the client sent and the value it opened to: a response that repeats the
    /// value gets the same token back, without sealing again.
    echo: Option<(HeaderName, HeaderValue, HeaderValue)>,
    /// The machine the request's valid cookie names (no new cookie is needed for it).
    cookie_for: Option<Arc<str>>,
}

/// Reads the request's session: opens a token in any of the app's affinity headers
/// (rewriting it to the machine's own value) and the affinity cookie.
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
    let count = |result: &str| metrics.sessions.with_label_values(&[&app.name, result]).inc();
    let now = crate::clock::unix_ms();
    for name in &affinity.headers {
        let Some(token) = headers.get(name.as_str()) else { continue };
        let invalid = |detail: String| {
            count("invalid");
            ProxyError::SessionInvalid { app: app.name.clone(), detail }
        };
        if headers.get_all(name.as_str()).iter().nth(1).is_some() {
            return Err(invalid(format!("two {name} headers")));
        }
        let opened = keyring.open(&app.name, token.as_bytes(), now).map_err(|e| invalid(e.to_string()))?;
        let value =
            HeaderValue::from_bytes(&opened.value).map_err(|_| invalid("not a header value".into()))?;
        let Some(machine) = router.machine_of(app, &opened.machine) else {
            count("gone");
            return Err(ProxyError::SessionGone { app: app.name.clone(), machine: opened.machine.into() });
        };
        count("hit");
        let token = token.clone();
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid("header name".into()))?;
        headers.insert(name.clone(), value.clone());
        session.echo = Some((name, value, token));
        session.pinned = Some((machine, Why::Session));
        break;
    }
    if let Some(cookie) = &affinity.cookie {
        match cookie_value(headers, cookie).map(|v| keyring.open(&app.name, v.as_bytes(), now)) {
            Some(Ok(opened)) => match router.machine_of(app, &opened.machine) {
                Some(m) => {
                    session.cookie_for = Some(m.id.clone());
                    if session.pinned.is_none() {
                        count("hit");
                        session.pinned = Some((m, Why::Cookie));
                    }
                }
                // Its machine is gone: a normal pick, and a new cookie for the one chosen.
                None => count("gone"),
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
    /// the request did not carry a valid one for this machine.
    pub fn seal(
        &self,
        app: &AppEntry,
        machine: &Machine,
        keyring: &Keyring,
        headers: &mut HeaderMap,
        tls: bool,
        metrics: &Metrics,
    ) {
        let affinity = &app.spec.affinity;
        for name in &affinity.headers {
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else { continue };
            let header::Entry::Occupied(mut entry) = headers.entry(name) else { continue };
            let mut values: Vec<HeaderValue> = Vec::new();
            for value in entry.iter() {
                let sealed = match &self.echo {
                    Some((n, v, token)) if n == entry.key() && v == value && self.on(machine) => {
                        Some(token.clone())
                    }
                    _ => keyring
                        .seal(&app.name, &machine.id, value.as_bytes())
                        .and_then(|t| HeaderValue::from_str(&t).ok())
                        .inspect(|_| metrics.sessions.with_label_values(&[&app.name, "opened"]).inc()),
                };
                match sealed {
                    Some(v) => values.push(v),
                    None => {
                        // No key to seal with (the RIB has none yet): the raw value could not
                        // be routed back, and would only confuse; say so loudly.
                        tracing::error!(target: "tern::http", app = %app.name,
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
            && let Some(token) = keyring.seal(&app.name, &machine.id, b"")
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
