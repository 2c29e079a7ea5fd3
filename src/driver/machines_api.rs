//! The `machines-api` driver: machines are run by an orchestrator that speaks the Fly Machines
//! API, and tern asks it over HTTP to start, stop and suspend them.
//!
//! ```text
//!  start    POST {url}/v1/apps/{app}/machines/{id}/start
//!           GET  {url}/v1/apps/{app}/machines/{id}/wait?state=started&timeout=60
//!  stop     POST {url}/v1/apps/{app}/machines/{id}/stop     {"signal":"SIGTERM","timeout":"5s"}
//!           GET  {url}/v1/apps/{app}/machines/{id}                  (its instance_id)
//!           GET  {url}/v1/apps/{app}/machines/{id}/wait?instance_id=…&state=stopped&timeout=N
//!  suspend  POST {url}/v1/apps/{app}/machines/{id}/suspend
//! ```
//!
//! Every call carries `Authorization: Bearer <token>` and has a deadline (30 s; the wait gets
//! its own 60 s plus that margin; a stop gets `kill_timeout` more). A non-2xx answer becomes
//! [`DriverError::Api`] with the status and the start of the body. `stop` returns once the
//! orchestrator says the machine is `stopped` (its stop call only begins the stop), so a wake
//! right after an autostop never asks to start a machine still stopping; an orchestrator
//! that answers that wait with 400 is taken at its stop call's word. `start` returns
//! once the orchestrator says the machine is `started`; whether it accepts connections is still the
//! lifecycle manager's probe, as with any driver.
//!
//! What this driver decides, and why:
//! - **Every machine is managed**: the orchestrator runs them all. A declared `cmd` is ignored
//!   (how a machine runs is the orchestrator's business: its image and config).
//! - **The token** is `token` in the config, or `token_env`, the name of an environment
//!   variable read once when the driver is built (exactly one of the two). It is sent as
//!   `Bearer <token>` (a token that already names its scheme, Fly's `FlyV1 …`, goes as it is)
//!   and never logged.
//! - **`running(id)`** cannot look at processes. It answers from a set of the machines whose
//!   start this driver saw the orchestrator accept and that it has not stopped since (suspended
//!   ones stay in it). So, as with the `process` driver, shutdown stops what this tern woke or
//!   adopted (below), and leaves alone machines it never touched. There is no exit watcher: a
//!   machine that stops on its own is not noticed (no [`super::DriverEvent`]s); requests to it
//!   fail to connect until a wake or a declaration says otherwise.
//! - **At tern start**, the lifecycle manager wakes machines recorded `started` that the driver
//!   does not run, which here is all of them. That adopts them: `start` on a started machine is
//!   a no-op for Fly-like orchestrators, and if one refuses instead (a 409 or 412, say), `start`
//!   asks the wait endpoint whether the machine is started anyway and then counts it as done
//!   (never for 401, 403 or 404, which are final). So a restart of tern never stops a running
//!   machine. Requests arriving during the adoption are held for those few calls.
//! - **Stop** sends `SIGTERM` with `kill_timeout` as the grace before the orchestrator kills the
//!   machine (the `timeout` is a Go-style duration string, as fly-go sends it), and returns once
//!   the orchestrator accepted it.
//! - **Plain HTTP only**, one connection per call (calls are rare: one per wake or stop). An
//!   orchestrator behind https is reached through a local TLS sidecar.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::{BoxFuture, Driver, DriverError, Target};
use crate::config::{ApiToken, MachinesApi};

/// Deadline of one call to the orchestrator.
/// The most of a successful answer tern reads.
const ANSWER_BYTES: usize = 64 * 1024;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `start` asks the orchestrator to wait for `started` (Fly's API allows at most 60).
const WAIT_SECS: u64 = 60;
/// How much of an error body goes into the error message.
const EXCERPT_BYTES: usize = 200;

pub struct MachinesApiDriver {
    host: String,
    port: u16,
    authority: HeaderValue,
    prefix: String,
    auth: HeaderValue,
    /// Machines this driver started (or adopted) and has not stopped since, as started.
    running: DashMap<Arc<str>, Target>,
}

/// What a call came back with, or why it did not.
#[derive(Debug)]
enum CallError {
    /// The orchestrator answered with a non-2xx status.
    Status { status: StatusCode, excerpt: String },
    /// No answer: connection, protocol or deadline.
    Transport(String),
}

impl MachinesApiDriver {
    /// Resolves the token (`token_env` is read here, so an unset variable fails `tern serve`
    /// at start rather than at the first wake).
    pub fn new(settings: &MachinesApi) -> Result<Self, String> {
        let token = match &settings.token {
            ApiToken::Literal(t) => t.clone(),
            ApiToken::Env(name) => std::env::var(name).map_err(|e| match e {
                std::env::VarError::NotPresent => format!("[driver] token_env: {name} is not set"),
                std::env::VarError::NotUnicode(_) => format!("[driver] token_env: {name} is not UTF-8"),
            })?,
        };
        let token = token.trim();
        if !crate::config::valid_token(token) {
            return Err("[driver] the token must be non-empty printable ASCII, without line breaks".into());
        }
        // Fly's scoped tokens (`fly tokens create`) carry their own scheme, `FlyV1 …`, and
        // go out as they are; anything else is a bearer token.
        let value = if token.starts_with("FlyV1 ") { token.to_string() } else { format!("Bearer {token}") };
        let mut auth = HeaderValue::from_str(&value)
            .map_err(|_| "[driver] the token does not fit in an HTTP header".to_string())?;
        auth.set_sensitive(true);
        let authority = HeaderValue::from_str(&settings.authority)
            .map_err(|_| format!("[driver] url: {:?} is not a valid host", settings.authority))?;
        Ok(MachinesApiDriver {
            host: settings.host.clone(),
            port: settings.port,
            authority,
            prefix: settings.prefix.clone(),
            auth,
            running: DashMap::new(),
        })
    }

    /// `{prefix}/v1/apps/{app}/machines/{id}/{action}`, each name percent-encoded.
    fn path(&self, m: &Target, action: &str) -> String {
        format!("{}/v1/apps/{}/machines/{}/{action}", self.prefix, segment(&m.app), segment(&m.id))
    }

    /// One request on its own connection, within `deadline`. Only a 2xx answer is `Ok`.
    async fn call(
        &self,
        method: Method,
        path: String,
        body: Option<serde_json::Value>,
        deadline: Duration,
    ) -> Result<Bytes, CallError> {
        match tokio::time::timeout(deadline, self.exchange(method, path, body)).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Transport(format!("no answer within {deadline:?}"))),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: String,
        body: Option<serde_json::Value>,
    ) -> Result<Bytes, CallError> {
        let transport = |what: &str, e: &dyn std::fmt::Display| {
            CallError::Transport(format!("{what} {}:{}: {e}", self.host, self.port))
        };
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| transport("could not connect to", &e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport("could not talk to", &e))?;
        // The connection lives exactly as long as this call, even when its deadline cancels it.
        let _conn = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(target: "tern::driver", error = %e, "orchestrator connection ended");
            }
        }));
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.authority.clone())
            .header(header::AUTHORIZATION, self.auth.clone())
            .header(header::USER_AGENT, concat!("tern/", env!("CARGO_PKG_VERSION")));
        let body = match body {
            Some(json) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(json.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).map_err(|e| CallError::Transport(format!("bad request: {e}")))?;
        let resp = sender.send_request(req).await.map_err(|e| transport("no answer from", &e))?;
        let status = resp.status();
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        if status.is_success() {
            // What tern reads of an answer (a machine's JSON) is small; more is cut off.
            while buf.len() < ANSWER_BYTES {
                match body.frame().await {
                    Some(Ok(frame)) => buf.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
                    Some(Err(e)) => return Err(transport("a broken answer from", &e)),
                    None => break,
                }
            }
            return Ok(Bytes::from(buf));
        }
        while buf.len() < EXCERPT_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => buf.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
                Some(Err(_)) | None => break,
            }
        }
        Err(CallError::Status { status, excerpt: excerpt(&buf) })
    }

    /// Whether the orchestrator says the machine is started, asking with a short wait.
    async fn is_started(&self, m: &Target) -> bool {
        let path = format!("{}?state=started&timeout=1", self.path(m, "wait"));
        self.call(Method::GET, path, None, CALL_TIMEOUT).await.is_ok()
    }

    /// The machine's current instance_id (`GET …/machines/{id}`), if the orchestrator says.
    async fn instance_id(&self, m: &Target) -> Option<String> {
        let path = format!("{}/v1/apps/{}/machines/{}", self.prefix, segment(&m.app), segment(&m.id));
        let answer = self.call(Method::GET, path, None, CALL_TIMEOUT).await.ok()?;
        let machine: serde_json::Value = serde_json::from_slice(&answer).ok()?;
        let id = machine.get("instance_id")?.as_str()?;
        // It goes into a query string as it is: only take what needs no escaping.
        id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_').then(|| id.to_string())
    }

    async fn start_machine(&self, m: &Target) -> Result<(), DriverError> {
        match self.call(Method::POST, self.path(m, "start"), None, CALL_TIMEOUT).await {
            Ok(_) => {}
            // Refused, but perhaps only because it is started already (adopting machines at
            // tern start). Auth failures and unknown machines are final.
            Err(CallError::Status { status, .. })
                if !matches!(status.as_u16(), 401 | 403 | 404) && self.is_started(m).await =>
            {
                tracing::info!(target: "tern::driver", machine = %m.id, %status,
                    "orchestrator refused the start of a machine that is started already; adopting it");
            }
            Err(e) => return Err(api_error("start", m, e)),
        }
        // Accepted: from here on a stop is due, whatever the wait says.
        self.running.insert(m.id.clone(), m.clone());
        tracing::info!(target: "tern::driver", machine = %m.id, app = %m.app, "orchestrator started the machine");
        let wait = format!("{}?state=started&timeout={WAIT_SECS}", self.path(m, "wait"));
        let deadline = Duration::from_secs(WAIT_SECS) + CALL_TIMEOUT;
        self.call(Method::GET, wait, None, deadline).await.map(drop).map_err(|e| match e {
            CallError::Status { status: StatusCode::REQUEST_TIMEOUT, .. } => DriverError::Api(format!(
                "machine {} was not started within {WAIT_SECS}s (wait answered 408)",
                m.id
            )),
            e => api_error("wait for", m, e),
        })
    }
}

impl Driver for MachinesApiDriver {
    fn manages(&self, _m: &crate::model::MachineSpec) -> bool {
        true
    }

    fn start<'a>(&'a self, m: &'a Target) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(self.start_machine(m))
    }

    fn stop<'a>(&'a self, m: &'a Target, kill_timeout: Duration) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let body = serde_json::json!({ "signal": "SIGTERM", "timeout": go_duration(kill_timeout) });
            self.call(Method::POST, self.path(m, "stop"), Some(body), kill_timeout + CALL_TIMEOUT)
                .await
                .map_err(|e| api_error("stop", m, e))?;
            self.running.remove(&m.id);
            // The machine gets its kill_timeout and a little more to go down. Fly's API waits
            // for `stopped` only given the machine's current instance_id, so ask for it first.
            let secs = (kill_timeout.as_secs() + 5).min(WAIT_SECS);
            let instance = self.instance_id(m).await.map_or(String::new(), |i| format!("instance_id={i}&"));
            let wait = format!("{}?{instance}state=stopped&timeout={secs}", self.path(m, "wait"));
            match self.call(Method::GET, wait, None, Duration::from_secs(secs) + CALL_TIMEOUT).await {
                Ok(_) => {}
                // An orchestrator that cannot wait for `stopped` this way (some want the
                // machine's instance_id too) has still accepted the stop.
                Err(CallError::Status { status: StatusCode::BAD_REQUEST, excerpt }) => {
                    tracing::debug!(target: "tern::driver", machine = %m.id, %excerpt,
                        "orchestrator would not wait for the stop; not waiting");
                }
                Err(e) => return Err(api_error("wait for the stop of", m, e)),
            }
            tracing::info!(target: "tern::driver", machine = %m.id, app = %m.app, "orchestrator stopped the machine");
            Ok(())
        })
    }

    fn suspend<'a>(&'a self, m: &'a Target) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            self.call(Method::POST, self.path(m, "suspend"), None, CALL_TIMEOUT)
                .await
                .map(drop)
                .map_err(|e| api_error("suspend", m, e))
        })
    }

    fn running(&self, id: &str) -> bool {
        self.running.contains_key(id)
    }

    fn running_targets(&self) -> Vec<Target> {
        self.running.iter().map(|t| t.value().clone()).collect()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn api_error(what: &str, m: &Target, e: CallError) -> DriverError {
    DriverError::Api(match e {
        CallError::Status { status, excerpt } if excerpt.is_empty() => {
            format!("{what} machine {}: {status}", m.id)
        }
        CallError::Status { status, excerpt } => format!("{what} machine {}: {status}: {excerpt}", m.id),
        CallError::Transport(why) => format!("{what} machine {}: {why}", m.id),
    })
}

/// The start of an error body, on one line.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES)]);
    let line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    line.trim().to_string()
}

/// A path segment, percent-encoded except for RFC 3986 unreserved characters.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A duration as Go's `time.ParseDuration` reads it: "5s", or "1500ms" below whole seconds.
fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_and_durations_read_as_go_writes_them() {
        assert_eq!(segment("hello-1.a_b~"), "hello-1.a_b~");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
        assert_eq!(go_duration(Duration::from_secs(5)), "5s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(excerpt(b"{\"error\":\n\"unauthorized\"}\n"), "{\"error\": \"unauthorized\"}");
    }
}
