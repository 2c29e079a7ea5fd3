//! The errors tern answers itself, instead of the app.
//!
//! Every response tern makes on its own carries `tern-error: <code>`; the code, status and
//! the operator-facing explanation live here and in `docs/errors.md`, nowhere else. This is
//! a leaf: it imports nothing of ours.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

/// Where a failure came from. Metric labels and logs use it to tell a client's mistake
/// from a broken machine from a tern bug.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Client,
    Upstream,
    Internal,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Client => "client",
            Origin::Upstream => "upstream",
            Origin::Internal => "internal",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the request has no usable Host header or :authority")]
    BadHost,
    #[error("the request's headers take {size} bytes, over the limit of {limit}")]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("the request's body is malformed: {0}")]
    BadBody(String),
    #[error("the client sent part of its request body, then nothing for {timeout:?}")]
    BodyTimeout { timeout: Duration },
    #[error("the request target is longer than tern reads")]
    UriTooLong,
    #[error("method {0} is not served (tern does not tunnel CONNECT)")]
    MethodNotAllowed(http::Method),
    #[error("no app serves the hostname {host:?}")]
    NoApp { host: String },
    #[error("app {app} has no started machine")]
    NoMachine { app: Arc<str> },
    #[error("app {app}: no machine became ready within the wake timeout of {timeout:?}")]
    WakeTimeout { app: Arc<str>, timeout: Duration },
    #[error("app {app}: no machine could be started: {reason}")]
    WakeFailed { app: Arc<str>, reason: String },
    #[error("app {app} already holds {limit} requests (max_pending)")]
    QueueFull { app: Arc<str>, limit: u32 },
    #[error("app {app}: every machine stayed at its hard_limit ({hard_limit}) for {waited:?}")]
    NoRoom { app: Arc<str>, hard_limit: u32, waited: Duration },
    #[error("could not connect to machine {machine} at {addr}: {source}")]
    UpstreamConnect {
        machine: Arc<str>,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("machine {machine} sent no response for {timeout:?}")]
    UpstreamTimeout { machine: Arc<str>, timeout: Duration },
    #[error("machine {machine} broke off the exchange: {detail}")]
    UpstreamError { machine: Arc<str>, detail: String },
    #[error("machine {machine} sent a response head over the limit of {limit} bytes ({detail})")]
    ResponseHeadersTooLarge { machine: Arc<str>, limit: usize, detail: String },
    #[error("app {app}: the session token does not open ({detail})")]
    SessionInvalid { app: Arc<str>, detail: String },
    #[error("app {app}: the session's machine {machine} is no longer in the catalog")]
    SessionGone { app: Arc<str>, machine: String },
    #[error("app {app}: machine {machine} cannot take the request: {reason}")]
    InstanceUnavailable { app: Arc<str>, machine: String, reason: String },
    #[error("app {app} has no machine in the regions {regions}")]
    RegionUnavailable { app: Arc<str>, regions: String },
    #[error("app {app}: more than {limit} fly-replay hops")]
    ReplayLoop { app: Arc<str>, limit: u32 },
    #[error("app {app}: the request body is over the replay_buffer of {limit} bytes and cannot be replayed")]
    ReplayTooLarge { app: Arc<str>, limit: u64 },
    #[error("app {app}: fly-replay to app {target} of another org")]
    ReplayUnauthorized { app: Arc<str>, target: String },
    #[error("machine {machine}: fly-replay it cannot act on: {detail}")]
    ReplayInvalid { machine: Arc<str>, detail: String },
    /// The node that owns the machine cannot take this request for it now (the machine is
    /// stopping, gone, at its hard limit, or no longer owned here): the edge that handed it
    /// over routes it elsewhere.
    #[error("machine {machine} cannot take a handed-over request here: {reason}")]
    RetryElsewhere { machine: String, reason: String },
    /// A request on the backhaul listener without a token this fleet's keys sealed.
    #[error("backhaul request refused: {0}")]
    BackhaulForbidden(String),
    /// A private (Flycast) address reached from a source outside its app's org networks.
    #[error("app {app}: source {source_ip} is outside org {org}'s networks")]
    PrivateForbidden { app: Arc<str>, org: String, source_ip: std::net::IpAddr },
    #[error("tern is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// The stable code sent in `tern-error` and used as a metric label. Never change one
    /// once released: scripts and dashboards match on them.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadHost => "bad_host",
            ProxyError::HeadersTooLarge { .. } => "headers_too_large",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::BadBody(_) => "bad_body",
            ProxyError::BodyTimeout { .. } => "body_timeout",
            ProxyError::UriTooLong => "uri_too_long",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::NoApp { .. } => "no_app",
            ProxyError::NoMachine { .. } => "no_machine",
            ProxyError::WakeTimeout { .. } => "wake_timeout",
            ProxyError::QueueFull { .. } | ProxyError::NoRoom { .. } => "queue_full",
            ProxyError::WakeFailed { .. } => "wake_failed",
            ProxyError::UpstreamConnect { .. } => "upstream_connect",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::UpstreamError { .. } => "upstream_error",
            ProxyError::ResponseHeadersTooLarge { .. } => "response_headers_too_large",
            ProxyError::SessionInvalid { .. } => "session_invalid",
            ProxyError::SessionGone { .. } => "session_gone",
            ProxyError::InstanceUnavailable { .. } => "instance_unavailable",
            ProxyError::RegionUnavailable { .. } => "region_unavailable",
            ProxyError::ReplayLoop { .. } => "replay_loop",
            ProxyError::ReplayTooLarge { .. } => "replay_too_large",
            ProxyError::ReplayUnauthorized { .. } => "replay_unauthorized",
            ProxyError::ReplayInvalid { .. } => "replay_invalid",
            ProxyError::RetryElsewhere { .. } => "retry_elsewhere",
            ProxyError::BackhaulForbidden(_) => "backhaul_forbidden",
            ProxyError::PrivateForbidden { .. } => "private_forbidden",
            ProxyError::ShuttingDown => "shutting_down",
            ProxyError::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadHost | ProxyError::BadRequest(_) | ProxyError::BadBody(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::UriTooLong => StatusCode::URI_TOO_LONG,
            ProxyError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::NoApp { .. } | ProxyError::SessionInvalid { .. } | ProxyError::SessionGone { .. } => {
                StatusCode::NOT_FOUND
            }
            ProxyError::ReplayTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ReplayLoop { .. } => StatusCode::LOOP_DETECTED,
            ProxyError::ReplayUnauthorized { .. } | ProxyError::ReplayInvalid { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::InstanceUnavailable { .. } | ProxyError::RegionUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::NoMachine { .. }
            | ProxyError::WakeTimeout { .. }
            | ProxyError::QueueFull { .. }
            | ProxyError::NoRoom { .. }
            | ProxyError::WakeFailed { .. }
            | ProxyError::RetryElsewhere { .. }
            | ProxyError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BackhaulForbidden(_) | ProxyError::PrivateForbidden { .. } => StatusCode::FORBIDDEN,
            ProxyError::UpstreamConnect { .. }
            | ProxyError::UpstreamError { .. }
            | ProxyError::ResponseHeadersTooLarge { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn origin(&self) -> Origin {
        match self {
            ProxyError::BadHost
            | ProxyError::HeadersTooLarge { .. }
            | ProxyError::BadRequest(_)
            | ProxyError::BadBody(_)
            | ProxyError::BodyTimeout { .. }
            | ProxyError::UriTooLong
            | ProxyError::MethodNotAllowed(_)
            | ProxyError::NoApp { .. }
            | ProxyError::SessionInvalid { .. }
            | ProxyError::SessionGone { .. }
            | ProxyError::ReplayTooLarge { .. }
            | ProxyError::BackhaulForbidden(_)
            | ProxyError::PrivateForbidden { .. } => Origin::Client,
            ProxyError::InstanceUnavailable { .. }
            | ProxyError::RegionUnavailable { .. }
            | ProxyError::ReplayLoop { .. }
            | ProxyError::ReplayUnauthorized { .. }
            | ProxyError::ReplayInvalid { .. } => Origin::Upstream,
            ProxyError::NoMachine { .. }
            | ProxyError::WakeTimeout { .. }
            | ProxyError::QueueFull { .. }
            | ProxyError::NoRoom { .. }
            | ProxyError::WakeFailed { .. }
            | ProxyError::UpstreamConnect { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::UpstreamError { .. }
            | ProxyError::ResponseHeadersTooLarge { .. }
            | ProxyError::RetryElsewhere { .. } => Origin::Upstream,
            ProxyError::ShuttingDown | ProxyError::Internal(_) => Origin::Internal,
        }
    }

    /// Whether the client may safely send the same request again. Only failures where the
    /// app cannot have seen the request qualify.
    pub fn retry_safe(&self) -> bool {
        matches!(
            self,
            ProxyError::NoMachine { .. }
                | ProxyError::WakeTimeout { .. }
                | ProxyError::QueueFull { .. }
                | ProxyError::NoRoom { .. }
                | ProxyError::WakeFailed { .. }
                | ProxyError::UpstreamConnect { .. }
                | ProxyError::RetryElsewhere { .. }
                | ProxyError::ShuttingDown
        )
    }

    /// A one-line explanation for people, safe to show to any client: it names no address
    /// or internal detail.
    pub fn public_message(&self) -> &'static str {
        match self {
            ProxyError::BadHost => "The request did not say which host it is for.",
            ProxyError::HeadersTooLarge { .. } => "The request's headers are too large.",
            ProxyError::BadRequest(_) => "The request is malformed.",
            ProxyError::BadBody(_) => "The request's body is malformed.",
            ProxyError::BodyTimeout { .. } => "The request's body stopped arriving.",
            ProxyError::UriTooLong => "The request's target is too long.",
            ProxyError::MethodNotAllowed(_) => "This method is not served here.",
            ProxyError::NoApp { .. } => "No app is served at this address.",
            ProxyError::NoMachine { .. } => "The app has no machine running right now.",
            ProxyError::WakeTimeout { .. } => "The app is starting up and was not ready in time; try again.",
            ProxyError::QueueFull { .. } | ProxyError::NoRoom { .. } => "The app is busy; try again shortly.",
            ProxyError::WakeFailed { .. } => "The app could not be started; try again later.",
            ProxyError::UpstreamConnect { .. } => "The app could not be reached.",
            ProxyError::UpstreamTimeout { .. } => "The app did not answer in time.",
            ProxyError::UpstreamError { .. } => "The app closed the connection unexpectedly.",
            ProxyError::ResponseHeadersTooLarge { .. } => "The app's response headers are too large.",
            ProxyError::SessionInvalid { .. } => "The session is not valid for this app.",
            ProxyError::SessionGone { .. } => "The session has ended; start a new one.",
            ProxyError::InstanceUnavailable { .. } => "The requested instance cannot take the request.",
            ProxyError::RegionUnavailable { .. } => "The app has no machine in the requested region.",
            ProxyError::ReplayLoop { .. } => "The request was replayed too many times.",
            ProxyError::ReplayTooLarge { .. } => "The request's body is too large to be replayed.",
            ProxyError::ReplayUnauthorized { .. } | ProxyError::ReplayInvalid { .. } => {
                "The app redirected the request somewhere it cannot go."
            }
            ProxyError::RetryElsewhere { .. } => "The app's machine cannot take the request here; try again.",
            ProxyError::BackhaulForbidden(_) => "This address serves other tern nodes only.",
            ProxyError::PrivateForbidden { .. } => "This private address is not reachable from your network.",
            ProxyError::ShuttingDown => "This server is restarting; try again.",
            ProxyError::Internal(_) => "Something went wrong inside the proxy.",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_statuses_are_errors() {
        let all = [
            ProxyError::BadHost,
            ProxyError::HeadersTooLarge { size: 2, limit: 1 },
            ProxyError::BadRequest("x"),
            ProxyError::BadBody("x".into()),
            ProxyError::BodyTimeout { timeout: Duration::from_secs(1) },
            ProxyError::UriTooLong,
            ProxyError::MethodNotAllowed(http::Method::CONNECT),
            ProxyError::ResponseHeadersTooLarge { machine: "m".into(), limit: 1, detail: "x".into() },
            ProxyError::NoApp { host: "a".into() },
            ProxyError::NoMachine { app: "a".into() },
            ProxyError::WakeTimeout { app: "a".into(), timeout: Duration::from_secs(1) },
            ProxyError::QueueFull { app: "a".into(), limit: 1 },
            ProxyError::WakeFailed { app: "a".into(), reason: "x".into() },
            ProxyError::UpstreamConnect {
                machine: "m".into(),
                addr: "127.0.0.1:1".parse().unwrap(),
                source: std::io::ErrorKind::ConnectionRefused.into(),
            },
            ProxyError::UpstreamTimeout { machine: "m".into(), timeout: Duration::from_secs(1) },
            ProxyError::UpstreamError { machine: "m".into(), detail: "x".into() },
            ProxyError::SessionInvalid { app: "a".into(), detail: "x".into() },
            ProxyError::SessionGone { app: "a".into(), machine: "m".into() },
            ProxyError::InstanceUnavailable { app: "a".into(), machine: "m".into(), reason: "x".into() },
            ProxyError::RegionUnavailable { app: "a".into(), regions: "x".into() },
            ProxyError::ReplayLoop { app: "a".into(), limit: 10 },
            ProxyError::ReplayTooLarge { app: "a".into(), limit: 1 },
            ProxyError::ReplayUnauthorized { app: "a".into(), target: "b".into() },
            ProxyError::ReplayInvalid { machine: "m".into(), detail: "x".into() },
            ProxyError::RetryElsewhere { machine: "m".into(), reason: "x".into() },
            ProxyError::BackhaulForbidden("x".into()),
            ProxyError::PrivateForbidden {
                app: "a".into(),
                org: "o".into(),
                source_ip: [127, 0, 0, 1].into(),
            },
            ProxyError::ShuttingDown,
            ProxyError::Internal("x".into()),
        ];
        let mut codes: Vec<_> = all.iter().map(ProxyError::code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len(), "each error has its own code");
        assert!(all.iter().all(|e| e.status().as_u16() >= 400));
        // docs/errors.md is the operator's reference: every code must be listed there.
        let doc = include_str!("../docs/errors.md");
        for code in codes {
            assert!(doc.contains(&format!("`{code}`")), "docs/errors.md lacks {code}");
        }
    }
}
