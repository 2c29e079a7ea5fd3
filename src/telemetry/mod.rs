//! Metrics and logs. Every metric name tern exports is defined in this module and nowhere
//! else; every stage logs under a fixed `tracing` target (`tern::listener`, `tern::tls`,
//! `tern::http`, `tern::access`, `tern::upstream`, `tern::catalog`, `tern::rib`, `tern::watchdog`).
//!
//! A leaf: it imports nothing of ours.

use std::sync::OnceLock;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

mod logging;
pub use logging::{LogGuard, init_logging};

/// Latency buckets from half a millisecond to a minute.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// All of tern's metrics, registered in a registry of their own so that several proxies can
/// run in one process (as the integration tests do).
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub errors: IntCounterVec,
    pub upstream_connect_duration: Histogram,
    pub upstream_connect_errors: IntCounter,
    pub upstream_retries: IntCounter,
    pub machine_ejections: IntCounter,
    pub open_connections: IntGaugeVec,
    pub connections: IntCounterVec,
    pub connections_rejected: IntCounter,
    pub connections_parked: IntCounter,
    pub connections_parked_now: prometheus::IntGauge,
    pub proxy_protocol_refused: IntCounterVec,
    pub tcp_refused: IntCounterVec,
    pub tcp_relayed: IntCounter,
    pub accept_errors: IntCounterVec,
    pub tls_handshakes: IntCounter,
    pub tls_buffers_shed: IntCounter,
    pub tls_handshake_failures: IntCounterVec,
    pub catalog_apps: IntGauge,
    pub catalog_machines: IntGauge,
    pub catalog_certificates: IntGauge,
    pub catalog_apply_lag: Histogram,
    pub catalog_changes: IntCounter,
    pub rib_rows_skipped: IntCounterVec,
    pub rib_rows_kept: IntCounterVec,
    pub rib_errors: IntCounter,
    pub rib_connected: IntGauge,
    pub rib_staleness: prometheus::Gauge,
    pub rib_resyncs: IntCounterVec,
    pub streams_cut_idle: IntCounter,
    pub streams_ended: IntCounterVec,
    pub drain_ended: IntCounterVec,
    pub wake_duration: HistogramVec,
    pub wakes: IntCounterVec,
    pub held_requests: IntGauge,
    pub machine_actions: IntCounterVec,
    pub machines: IntGaugeVec,
    pub supervisor_passes: IntCounter,
    pub checks: IntCounterVec,
    pub routing_decisions: IntCounterVec,
    pub sessions: IntCounterVec,
    pub replays: IntCounterVec,
    pub watchdog_stalls: IntCounterVec,
    pub watchdog_bounces: IntCounter,
    pub heartbeat_age: GaugeVec,
    pub spurious_wakeups: IntCounterVec,
    pub task_panics: IntCounterVec,
    /// The request-path series of requests that reached no app (`app="-"`).
    pub unrouted: AppSeries,
}

/// Waking spans milliseconds (a suspended machine) to tens of seconds (a cold start).
const WAKE_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

impl Metrics {
    pub fn new() -> Self {
        Self::try_new().expect("metric definitions are static and valid")
    }

    #[allow(clippy::too_many_lines)] // a flat list of definitions reads best in one place
    fn try_new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new("tern_requests_total", "Requests answered, by app and status class."),
                &["app", "class"],
            )?,
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "tern_request_duration_seconds",
                    "Time from a request's arrival to its response head, by app.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["app"],
            )?,
            errors: IntCounterVec::new(
                Opts::new("tern_errors_total", "Responses tern made itself, by tern-error code."),
                &["code"],
            )?,
            upstream_connect_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "tern_upstream_connect_duration_seconds",
                    "Time to open a new connection to a machine.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )?,
            upstream_connect_errors: IntCounter::new(
                "tern_upstream_connect_errors_total",
                "Connections to machines that failed to open.",
            )?,
            upstream_retries: IntCounter::new(
                "tern_upstream_retries_total",
                "Requests sent to a second machine after the connection to the first failed (refused or timed out).",
            )?,
            machine_ejections: IntCounter::new(
                "tern_machine_ejections_total",
                "Times a machine was taken out of selection for a back-off after a failed connect.",
            )?,
            open_connections: IntGaugeVec::new(
                Opts::new("tern_open_connections", "Client connections open now, by listener."),
                &["listener"],
            )?,
            connections: IntCounterVec::new(
                Opts::new("tern_connections_total", "Client connections accepted, by listener."),
                &["listener"],
            )?,
            connections_rejected: IntCounter::new(
                "tern_connections_at_limit_total",
                "Times the accept loop paused because max_connections were open.",
            )?,
            connections_parked_now: prometheus::IntGauge::new(
                "tern_connections_parked",
                "Quiet HTTP/1.1 connections (plain or TLS) waiting in a worker's parking lot, with \
                 no task of their own, for their client's next bytes.",
            )?,
            connections_parked: IntCounter::new(
                "tern_connections_parked_total",
                "Times a quiet HTTP/1.1 keep-alive connection was parked: hyper's buffers for it \
                 freed until the client sends again.",
            )?,
            proxy_protocol_refused: IntCounterVec::new(
                Opts::new(
                    "tern_proxy_protocol_refused_total",
                    "Connections to a proxy_protocol listener closed before any request, by reason: \
                     untrusted_source, missing, malformed, timeout, closed.",
                ),
                &["reason"],
            )?,
            tcp_refused: IntCounterVec::new(
                Opts::new(
                    "tern_tcp_refused_total",
                    "Connections to a tcp listener closed without reaching a machine, by reason: \
                     no_service, private_forbidden, tls, no_machine, wake_timeout, queue_full, \
                     wake_failed, upstream_connect.",
                ),
                &["reason"],
            )?,
            tcp_relayed: IntCounter::new(
                "tern_tcp_relayed_total",
                "Connections to TCP services relayed to a machine (TLS passthrough, raw, or after TLS).",
            )?,
            accept_errors: IntCounterVec::new(
                Opts::new("tern_accept_errors_total", "Failed accept(2) calls, by reason."),
                &["reason"],
            )?,
            tls_handshakes: IntCounter::new("tern_tls_handshakes_total", "TLS handshakes completed.")?,
            tls_buffers_shed: IntCounter::new(
                "tern_tls_buffers_shed_total",
                "Times a quiet TLS connection kept by its task (HTTP/2; HTTP/1.1 with a response \
                 open, or kept out of the parking lot) gave its TLS buffers back.",
            )?,
            tls_handshake_failures: IntCounterVec::new(
                Opts::new("tern_tls_handshake_failures_total", "TLS handshakes failed, by reason."),
                &["reason"],
            )?,
            catalog_apps: IntGauge::new("tern_catalog_apps", "Apps in the catalog.")?,
            catalog_machines: IntGauge::new("tern_catalog_machines", "Machines in the catalog.")?,
            catalog_certificates: IntGauge::new("tern_catalog_certificates", "Certificates in the catalog.")?,
            catalog_apply_lag: Histogram::with_opts(
                HistogramOpts::new(
                    "tern_catalog_apply_lag_seconds",
                    "Time from a change's commit in the RIB to its publication in the catalog.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )?,
            catalog_changes: IntCounter::new(
                "tern_catalog_changes_applied_total",
                "RIB changes applied to the catalog.",
            )?,
            rib_rows_skipped: IntCounterVec::new(
                Opts::new(
                    "tern_rib_rows_skipped_total",
                    "RIB rows that did not decode and were skipped, by table.",
                ),
                &["table"],
            )?,
            rib_rows_kept: IntCounterVec::new(
                Opts::new(
                    "tern_rib_rows_kept_total",
                    "RIB rows that did not decode while an earlier version of the row keeps serving, by table.",
                ),
                &["table"],
            )?,
            rib_errors: IntCounter::new(
                "tern_rib_errors_total",
                "Failed reads of the RIB (retried with back-off).",
            )?,
            rib_connected: IntGauge::new(
                "tern_rib_connected",
                "1 while the catalog follows the RIB; 0 while the store is unreachable (the last catalog serves on).",
            )?,
            rib_staleness: prometheus::Gauge::new(
                "tern_rib_staleness_seconds",
                "Seconds since the catalog was last known to be current with the RIB (0 while connected).",
            )?,
            rib_resyncs: IntCounterVec::new(
                Opts::new(
                    "tern_rib_resyncs_total",
                    "Fresh RIB snapshots diffed into the catalog because the change stream could not be trusted, by reason.",
                ),
                &["reason"],
            )?,
            streams_cut_idle: IntCounter::new(
                "tern_idle_timeouts_total",
                "Exchanges and tunnels closed after the app's idle_timeout of silence.",
            )?,
            streams_ended: IntCounterVec::new(
                Opts::new(
                    "tern_streams_ended_total",
                    "Streams tern ended because their machine was stopping or tern was shutting \
                     down, by kind (sse, websocket, tunnel) and how (clean: at an event or frame \
                     boundary, with a close frame for WebSockets; cut: not in time).",
                ),
                &["kind", "how"],
            )?,
            drain_ended: IntCounterVec::new(
                Opts::new(
                    "tern_drain_ended_total",
                    "Connections and streams a drain ended at their time in its window, by kind (h1: \
                     Connection: close or closed once quiet; h2: GOAWAY; sse; ws; other).",
                ),
                &["kind"],
            )?,
            wake_duration: HistogramVec::new(
                HistogramOpts::new(
                    "tern_wake_duration_seconds",
                    "Time a request waited for a machine to wake (arrival to forwarding), by app and result.",
                )
                .buckets(WAKE_BUCKETS.to_vec()),
                &["app", "result"],
            )?,
            wakes: IntCounterVec::new(
                Opts::new(
                    "tern_wakes_total",
                    "Machine wakes (one per start, however many requests waited), by result.",
                ),
                &["result"],
            )?,
            held_requests: IntGauge::new(
                "tern_held_requests",
                "Requests held now, waiting for a machine to wake or for room on one.",
            )?,
            machine_actions: IntCounterVec::new(
                Opts::new(
                    "tern_machine_actions_total",
                    "Machine starts, stops and suspends tern asked its driver for, and machine exits it saw, by action and reason.",
                ),
                &["action", "reason"],
            )?,
            machines: IntGaugeVec::new(
                Opts::new(
                    "tern_machines",
                    "Machines in the catalog by lifecycle state, as of the last supervisor pass.",
                ),
                &["state"],
            )?,
            supervisor_passes: IntCounter::new(
                "tern_supervisor_passes_total",
                "Passes of the lifecycle supervisor (checks and autostop), one a second while it is healthy.",
            )?,
            checks: IntCounterVec::new(
                Opts::new(
                    "tern_checks_total",
                    "Health-check rounds run against started machines, by app and result.",
                ),
                &["app", "result"],
            )?,
            routing_decisions: IntCounterVec::new(
                Opts::new(
                    "tern_routing_decisions_total",
                    "Requests routed to a machine, by app and why that machine (least_loaded, \
                     session, cookie, forced, preferred, region, replay, replay_cache).",
                ),
                &["app", "why"],
            )?,
            sessions: IntCounterVec::new(
                Opts::new(
                    "tern_sessions_total",
                    "Requests to apps with affinity, by app and what their session said: hit (routed \
                     to its machine), miss (none carried, or a cookie whose machine is gone), \
                     invalid (a token that does not open), gone (its machine left the catalog), \
                     opened (a machine's response began one).",
                ),
                &["app", "result"],
            )?,
            replays: IntCounterVec::new(
                Opts::new(
                    "tern_replays_total",
                    "fly-replay hops, by app (of the machine that asked) and how: header, json, \
                     cache (a cached decision), fallback (the target failed; back to the origin).",
                ),
                &["app", "how"],
            )?,
            watchdog_stalls: IntCounterVec::new(
                Opts::new(
                    "tern_watchdog_stalls_total",
                    "Wedges the watchdog reported, by what: heartbeat (a runtime or loop stopped \
                     ticking), deadlock (a cycle of tracked locks), lock_held (a tracked lock held \
                     past stall_after).",
                ),
                &["what"],
            )?,
            watchdog_bounces: IntCounter::new(
                "tern_watchdog_bounces_total",
                "Times a wedged tern handed its listening sockets to a fresh process.",
            )?,
            heartbeat_age: GaugeVec::new(
                Opts::new(
                    "tern_heartbeat_age_seconds",
                    "Age of each heartbeat at the watchdog's last look (it looks every stall_after/8).",
                ),
                &["what"],
            )?,
            spurious_wakeups: IntCounterVec::new(
                Opts::new(
                    "tern_spurious_wakeups_total",
                    "Connections closed for spinning: polled again and again without moving a byte, \
                     by protocol.",
                ),
                &["protocol"],
            )?,
            task_panics: IntCounterVec::new(
                Opts::new(
                    "tern_task_panics_total",
                    "Background tasks that panicked, by task (restarted, or escalated to the watchdog).",
                ),
                &["task"],
            )?,
            unrouted: AppSeries::default(),
            registry,
        };
        m.register_all()?;
        Ok(m)
    }

    fn register_all(&self) -> prometheus::Result<()> {
        let r = &self.registry;
        r.register(Box::new(self.requests.clone()))?;
        r.register(Box::new(self.request_duration.clone()))?;
        r.register(Box::new(self.errors.clone()))?;
        r.register(Box::new(self.upstream_connect_duration.clone()))?;
        r.register(Box::new(self.upstream_connect_errors.clone()))?;
        r.register(Box::new(self.upstream_retries.clone()))?;
        r.register(Box::new(self.machine_ejections.clone()))?;
        r.register(Box::new(self.open_connections.clone()))?;
        r.register(Box::new(self.connections.clone()))?;
        r.register(Box::new(self.connections_rejected.clone()))?;
        r.register(Box::new(self.connections_parked.clone()))?;
        r.register(Box::new(self.connections_parked_now.clone()))?;
        r.register(Box::new(self.proxy_protocol_refused.clone()))?;
        r.register(Box::new(self.tcp_refused.clone()))?;
        r.register(Box::new(self.tcp_relayed.clone()))?;
        r.register(Box::new(self.accept_errors.clone()))?;
        r.register(Box::new(self.tls_handshakes.clone()))?;
        r.register(Box::new(self.tls_buffers_shed.clone()))?;
        r.register(Box::new(self.tls_handshake_failures.clone()))?;
        r.register(Box::new(self.catalog_apps.clone()))?;
        r.register(Box::new(self.catalog_machines.clone()))?;
        r.register(Box::new(self.catalog_certificates.clone()))?;
        r.register(Box::new(self.catalog_apply_lag.clone()))?;
        r.register(Box::new(self.catalog_changes.clone()))?;
        r.register(Box::new(self.rib_rows_skipped.clone()))?;
        r.register(Box::new(self.rib_rows_kept.clone()))?;
        r.register(Box::new(self.rib_errors.clone()))?;
        r.register(Box::new(self.rib_connected.clone()))?;
        r.register(Box::new(self.rib_staleness.clone()))?;
        r.register(Box::new(self.rib_resyncs.clone()))?;
        r.register(Box::new(self.streams_cut_idle.clone()))?;
        r.register(Box::new(self.streams_ended.clone()))?;
        r.register(Box::new(self.drain_ended.clone()))?;
        r.register(Box::new(self.wake_duration.clone()))?;
        r.register(Box::new(self.wakes.clone()))?;
        r.register(Box::new(self.held_requests.clone()))?;
        r.register(Box::new(self.machine_actions.clone()))?;
        r.register(Box::new(self.machines.clone()))?;
        r.register(Box::new(self.supervisor_passes.clone()))?;
        r.register(Box::new(self.checks.clone()))?;
        r.register(Box::new(self.routing_decisions.clone()))?;
        r.register(Box::new(self.sessions.clone()))?;
        r.register(Box::new(self.replays.clone()))?;
        r.register(Box::new(self.watchdog_stalls.clone()))?;
        r.register(Box::new(self.watchdog_bounces.clone()))?;
        r.register(Box::new(self.heartbeat_age.clone()))?;
        r.register(Box::new(self.spurious_wakeups.clone()))?;
        r.register(Box::new(self.task_panics.clone()))?;
        Ok(())
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(target: "tern::telemetry", error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Removes every series of an app that left the catalog, so that apps that come and go
    /// do not pile up series (and the memory behind them).
    pub fn forget_app(&self, app: &str) {
        for class in STATUS_CLASSES {
            let _ = self.requests.remove_label_values(&[app, class]);
        }
        let _ = self.request_duration.remove_label_values(&[app]);
        for result in WAKE_RESULTS {
            let _ = self.wake_duration.remove_label_values(&[app, result]);
        }
        for result in ["pass", "fail"] {
            let _ = self.checks.remove_label_values(&[app, result]);
        }
        for why in ROUTING_WHY {
            let _ = self.routing_decisions.remove_label_values(&[app, why]);
        }
        for result in SESSION_RESULTS {
            let _ = self.sessions.remove_label_values(&[app, result]);
        }
        for how in REPLAY_HOW {
            let _ = self.replays.remove_label_values(&[app, how]);
        }
    }

    /// Removes every series whose `app` label satisfies `gone`, whatever its other labels:
    /// for series written after their app left (by an exchange that outlived it). Reads
    /// every app-labelled series, so it is for an occasional sweep, not each removal.
    pub fn forget_apps_where(&self, gone: impl Fn(&str) -> bool) {
        fn sweep<T: prometheus::core::MetricVecBuilder>(
            vec: &prometheus::core::MetricVec<T>,
            gone: &dyn Fn(&str) -> bool,
        ) {
            use prometheus::core::Collector;
            for family in vec.collect() {
                for metric in family.get_metric() {
                    let labels: std::collections::HashMap<&str, &str> =
                        metric.get_label().iter().map(|l| (l.name(), l.value())).collect();
                    if labels.get("app").is_some_and(|app| gone(app)) {
                        let _ = vec.remove(&labels);
                    }
                }
            }
        }
        sweep(&self.requests, &gone);
        sweep(&self.request_duration, &gone);
        sweep(&self.wake_duration, &gone);
        sweep(&self.checks, &gone);
        sweep(&self.routing_decisions, &gone);
        sweep(&self.sessions, &gone);
        sweep(&self.replays, &gone);
    }
}

/// An app's series on the request path, looked up once (per catalog entry of the app)
/// rather than per request: a lookup by label values takes the metric family's lock, which
/// a writer (a new series, a removed app) can hold; a handle is an atomic.
///
/// Each handle is resolved on first use, so an app shows only the series it has used, as
/// with labels looked up each time. A handle kept past its app's removal counts into a
/// series no longer exported (it is not recreated, unlike a lookup by labels).
///
/// The handles live in one allocation made on the app's first request: an app nobody asks
/// for (most of a million-app catalog) holds a pointer's worth.
#[derive(Default)]
pub struct AppSeries(OnceLock<Box<Handles>>);

#[derive(Default)]
struct Handles {
    requests: [OnceLock<IntCounter>; STATUS_CLASSES.len()],
    duration: OnceLock<Histogram>,
    routed: [OnceLock<IntCounter>; ROUTING_WHY.len()],
    sessions: [OnceLock<IntCounter>; SESSION_RESULTS.len()],
}

impl std::fmt::Debug for AppSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppSeries").finish_non_exhaustive()
    }
}

impl AppSeries {
    fn handles(&self) -> &Handles {
        self.0.get_or_init(Box::default)
    }

    /// Counts one answered request of `app` (`tern_requests_total`, and its duration).
    pub fn request(&self, metrics: &Metrics, app: &str, status: u16, elapsed: std::time::Duration) {
        let class = status_class(status);
        let i = STATUS_CLASSES.iter().position(|c| *c == class).unwrap_or(STATUS_CLASSES.len() - 1);
        let h = self.handles();
        h.requests[i].get_or_init(|| metrics.requests.with_label_values(&[app, class])).inc();
        h.duration
            .get_or_init(|| metrics.request_duration.with_label_values(&[app]))
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one routing decision of `app` (`tern_routing_decisions_total`); `why` is one
    /// of [`ROUTING_WHY`].
    pub fn routed(&self, metrics: &Metrics, app: &str, why: &'static str) {
        inc_labelled(&self.handles().routed, &ROUTING_WHY, &metrics.routing_decisions, app, why);
    }

    /// Counts one session outcome of `app` (`tern_sessions_total`); `result` is one of
    /// [`SESSION_RESULTS`].
    pub fn session(&self, metrics: &Metrics, app: &str, result: &'static str) {
        inc_labelled(&self.handles().sessions, &SESSION_RESULTS, &metrics.sessions, app, result);
    }
}

/// Adds one to series (`app`, `label`) of `vec` through its handle cached in `slots` (one
/// per label of `labels`); a label outside `labels` is looked up each time.
fn inc_labelled(
    slots: &[OnceLock<IntCounter>],
    labels: &[&'static str],
    vec: &IntCounterVec,
    app: &str,
    label: &'static str,
) {
    match labels.iter().position(|l| *l == label) {
        Some(i) => slots[i].get_or_init(|| vec.with_label_values(&[app, label])).inc(),
        None => vec.with_label_values(&[app, label]).inc(),
    }
}

/// Every value [`status_class`] gives.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The `result` labels of `tern_wake_duration_seconds` (see the request path).
const WAKE_RESULTS: [&str; 5] = ["ok", "timeout", "queue_full", "nothing_to_wake", "failed"];

/// The `why` labels of `tern_routing_decisions_total` (routing's `Why`).
pub const ROUTING_WHY: [&str; 9] = [
    "least_loaded",
    "session",
    "cookie",
    "forced",
    "preferred",
    "region",
    "replay",
    "replay_cache",
    "nearest",
];

/// The `result` labels of `tern_sessions_total`.
pub const SESSION_RESULTS: [&str; 5] = ["hit", "miss", "invalid", "gone", "opened"];

/// The `how` labels of `tern_replays_total`.
pub const REPLAY_HOW: [&str; 4] = ["header", "json", "cache", "fallback"];

/// "2xx", "4xx", …: the status class label of `tern_requests_total`.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_apps_series_can_be_forgotten_whatever_their_other_labels() {
        let m = Metrics::new();
        m.requests.with_label_values(&["gone", "2xx"]).inc();
        m.requests.with_label_values(&["kept", "2xx"]).inc();
        m.wake_duration.with_label_values(&["gone", "a-result-added-later"]).observe(0.1);
        m.checks.with_label_values(&["gone", "pass"]).inc();
        m.forget_app("gone");
        let text = m.render();
        assert!(text.contains("a-result-added-later"), "forget_app knows the labels in use");
        m.forget_apps_where(|app| app == "gone");
        let text = m.render();
        assert!(!text.contains("app=\"gone\""), "{text}");
        assert!(text.contains("app=\"kept\""));
    }

    #[test]
    fn every_metric_renders_with_the_tern_prefix() {
        let m = Metrics::new();
        m.requests.with_label_values(&["a", "2xx"]).inc();
        m.errors.with_label_values(&["no_app"]).inc();
        m.request_duration.with_label_values(&["a"]).observe(0.1);
        m.open_connections.with_label_values(&["x"]).set(0);
        m.connections.with_label_values(&["x"]).inc();
        m.accept_errors.with_label_values(&["emfile"]).inc();
        m.tls_handshake_failures.with_label_values(&["unknown_sni"]).inc();
        m.rib_rows_skipped.with_label_values(&["apps"]).inc();
        let text = m.render();
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(names.len() >= 20, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("tern_")), "{names:?}");
    }
}
