//! The records tern keeps about the world: apps, machines and certificates.
//!
//! The same types are read from declarations (TOML), stored in the RIB (JSON) and decoded
//! into the catalog, so a field means the same thing everywhere. Field names follow
//! fly.toml where fly.toml has one. Nothing here does I/O.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::{de_duration, ser_duration};

mod app_de;
pub mod cert;
pub mod names;
pub mod seal;
pub mod session;
pub mod session_key;

pub use session::{Affinity, ReplayCacheKind, ReplayCacheRule, SessionField};

/// An app as declared. Deserialized through [`app_de::RawApp`], which holds the defaults
/// and accepts `replay_buffer` inside `[apps.affinity]` too (see there); serialized (into
/// the RIB) with every field at the top level.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "app_de::RawApp")]
pub struct AppSpec {
    pub name: String,
    pub org: String,
    pub hostnames: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_region: Option<String>,
    /// The port the app's machines serve HTTP on, for machines declared by bare IP.
    pub internal_port: u16,
    pub auto_stop: AutoStop,
    pub auto_start: bool,
    pub min_machines_running: u32,
    /// How long an exchange may stay silent in both directions, streams included.
    #[serde(serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    pub concurrency: Concurrency,
    #[serde(serialize_with = "ser_duration")]
    pub auto_stop_after: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub kill_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub wake_timeout: Duration,
    /// How long one start of a machine may take to become ready, whoever waits on it.
    #[serde(serialize_with = "ser_duration")]
    pub start_timeout: Duration,
    pub max_pending: u32,
    pub wake_ignore_user_agents: Vec<String>,
    pub checks: Vec<Check>,
    pub http_options: HttpOptions,
    /// Sessions bound to a machine by a response header or a cookie.
    pub affinity: Affinity,
    /// Request body kept so a fly-replay can send the request again (bytes).
    pub replay_buffer: u64,
    /// fly-proxy's session replay cache rules.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replay_cache: Vec<ReplayCacheRule>,
    /// The app's private (Flycast) addresses: a connection to one of them on a private
    /// listener goes to this app, if its source is in the org's `networks`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub private_addrs: Vec<IpAddr>,
    /// Served on public listeners (by hostname). `false`: only ever on private ones.
    #[serde(skip_serializing_if = "is_true")]
    pub public: bool,
    /// Dedicated public addresses: a connection to one of them on a `kind = "tcp"`
    /// listener goes to the app's service on that port.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addrs: Vec<IpAddr>,
    /// TCP services (`[[apps.services]]`), reached on `kind = "tcp"` listeners.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
}

/// One TCP service of an app: the machines' port and the public ports that lead to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub internal_port: u16,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

/// A public port of a service and what tern does with its connections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    #[serde(default)]
    pub handlers: Vec<ServiceHandler>,
}

/// What tern does to a service's connections before (or instead of) relaying bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceHandler {
    /// Terminate TLS (the certificate chosen by SNI), then relay the plaintext.
    Tls,
    /// Serve HTTP, as on an HTTP listener but for this app only.
    Http,
    /// Send a PROXY protocol v2 header to the machine first, naming the client.
    ProxyProto,
}

/// How a service port's connections are handled, once its handlers are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handling {
    pub tls: bool,
    pub http: bool,
    pub proxy_proto: bool,
}

impl ServicePort {
    /// The handlers as one of the combinations tern serves: `[]`, `["tls"]`,
    /// `["proxy_proto"]`, `["tls", "proxy_proto"]`, `["http"]` or `["tls", "http"]`.
    pub fn handling(&self) -> Result<Handling, String> {
        use ServiceHandler as H;
        let h = &self.handlers;
        let has = |x: H| h.contains(&x);
        let mut seen = Vec::new();
        for x in h {
            if seen.contains(x) {
                return Err(format!("handler {x:?} is listed twice"));
            }
            seen.push(*x);
        }
        if h.contains(&H::Tls) && h.first() != Some(&H::Tls) {
            return Err("\"tls\" comes first: TLS is the outermost layer".into());
        }
        if has(H::Http) && has(H::ProxyProto) {
            return Err(
                "\"http\" and \"proxy_proto\" do not combine: tern speaks HTTP to the machine itself".into(),
            );
        }
        Ok(Handling { tls: has(H::Tls), http: has(H::Http), proxy_proto: has(H::ProxyProto) })
    }
}

fn is_true(b: &bool) -> bool {
    *b
}

impl AppSpec {
    /// The rule `tern apply` holds private addresses to: each a plain address of the
    /// family it is written in (an IPv4-mapped IPv6 one would never match: connections are
    /// compared in their IPv4 form), declared once.
    pub fn check_private_addrs(&self) -> Result<(), (usize, String)> {
        for (i, a) in self.private_addrs.iter().enumerate() {
            if let IpAddr::V6(v6) = a
                && let Some(v4) = v6.to_ipv4_mapped()
            {
                return Err((i, format!("{a} is IPv4-mapped: write it as {v4}")));
            }
            if a.is_unspecified() || a.is_multicast() {
                return Err((i, format!("{a} cannot be a private address")));
            }
            if self.private_addrs[..i].contains(a) {
                return Err((i, format!("{a} is listed twice")));
            }
        }
        Ok(())
    }
}

impl AppSpec {
    /// The service and port a connection to public port `port` is for.
    pub fn service_for(&self, port: u16) -> Option<(&Service, &ServicePort)> {
        self.services.iter().find_map(|s| s.ports.iter().find(|p| p.port == port).map(|p| (s, p)))
    }

    /// The rules `tern apply` and the catalog's RIB reader hold services to; the error names
    /// the field under `services` (`[0].ports[1].handlers`).
    pub fn check_services(&self) -> Result<(), String> {
        let mut ports = Vec::new();
        for (i, s) in self.services.iter().enumerate() {
            if s.internal_port == 0 {
                return Err(format!("[{i}].internal_port: must be a port number from 1 to 65535"));
            }
            if s.ports.is_empty() {
                return Err(format!("[{i}].ports: a service needs at least one port"));
            }
            for (j, p) in s.ports.iter().enumerate() {
                if p.port == 0 {
                    return Err(format!("[{i}].ports[{j}].port: must be a port number from 1 to 65535"));
                }
                if ports.contains(&p.port) {
                    return Err(format!("[{i}].ports[{j}].port: port {} is used twice in the app", p.port));
                }
                ports.push(p.port);
                let h = p.handling().map_err(|e| format!("[{i}].ports[{j}].handlers: {e}"))?;
                if h.http && s.internal_port != self.internal_port {
                    return Err(format!(
                        "[{i}].internal_port: an \"http\" service forwards to the app's internal_port ({}), \
                         not {}: make them equal",
                        self.internal_port, s.internal_port
                    ));
                }
            }
        }
        for (i, a) in self.addrs.iter().enumerate() {
            if a.is_unspecified() || a.is_multicast() || self.addrs[..i].contains(a) {
                return Err(format!("addrs[{i}]: {a} cannot be a dedicated address (or is listed twice)"));
            }
        }
        Ok(())
    }
}

/// An organisation: the apps that name it in `org` share its private network. Only
/// sources inside `networks` are served on its apps' private addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgSpec {
    pub name: String,
    #[serde(default)]
    pub networks: Vec<crate::net::Prefix>,
}

impl OrgSpec {
    /// Whether `source` is inside the org's private network.
    pub fn admits(&self, source: IpAddr) -> bool {
        self.networks.iter().any(|n| n.contains(source))
    }
}

impl AppSpec {
    /// The rule `tern apply` and the catalog's RIB reader both hold `start_timeout` to: at
    /// zero every start would fail before the machine could answer.
    pub fn check_start_timeout(&self) -> Result<(), String> {
        if self.start_timeout.is_zero() { Err("must be above zero".into()) } else { Ok(()) }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoStop {
    #[default]
    Off,
    Stop,
    Suspend,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyType {
    #[default]
    Requests,
    Connections,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    #[serde(rename = "type", default)]
    pub kind: ConcurrencyType,
    #[serde(default = "default_soft_limit")]
    pub soft_limit: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_limit: Option<u32>,
}

impl Concurrency {
    /// The rules `tern apply` and the catalog's RIB reader both hold a row to.
    pub fn check(&self) -> Result<(), String> {
        if self.soft_limit == 0 {
            return Err("soft_limit must be at least 1".into());
        }
        match self.hard_limit {
            Some(hard) if hard < self.soft_limit => {
                Err(format!("hard_limit ({hard}) is below soft_limit ({})", self.soft_limit))
            }
            _ => Ok(()),
        }
    }
}

impl Default for Concurrency {
    fn default() -> Self {
        Concurrency { kind: ConcurrencyType::Requests, soft_limit: default_soft_limit(), hard_limit: None }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    #[default]
    Http,
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    #[serde(rename = "type", default)]
    pub kind: CheckType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(
        default = "default_check_interval",
        deserialize_with = "de_duration",
        serialize_with = "ser_duration"
    )]
    pub interval: Duration,
    #[serde(
        default = "default_check_timeout",
        deserialize_with = "de_duration",
        serialize_with = "ser_duration"
    )]
    pub timeout: Duration,
    #[serde(default, deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub grace_period: Duration,
}

impl Check {
    /// The rules `tern apply` and the catalog's RIB reader both hold a check to (a zero
    /// interval would probe a machine in a tight loop).
    pub fn check(&self) -> Result<(), String> {
        if self.kind == CheckType::Http && !self.path.as_deref().is_some_and(|p| p.starts_with('/')) {
            return Err("an http check needs a path starting with '/'".into());
        }
        if self.interval.is_zero() || self.timeout.is_zero() {
            return Err("interval and timeout must be above zero".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpOptions {
    /// Speak HTTP/2 with prior knowledge (h2c) to the app's machines, as gRPC needs.
    #[serde(default)]
    pub h2_backend: bool,
    /// Protocols other than `websocket` that clients may switch to with `Upgrade` (tokens
    /// such as `"tcp-tunnel"`, lower case). Any other upgrade is dropped from the request,
    /// which then goes to the machine as a plain one. Never `h2c`: an h2c connection would
    /// run past tern, with nothing checked, logged or counted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upgrades: Vec<String>,
}

impl HttpOptions {
    pub fn check(&self) -> Result<(), String> {
        for u in &self.upgrades {
            let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b);
            if u.is_empty() || !u.bytes().all(token) || u.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(format!("upgrades: {u:?} is not a lower-case protocol token"));
            }
            if is_http2(u) {
                return Err(format!(
                    "upgrades: {u:?} cannot be allowed: an h2c upgrade would hand the connection to \
                     the machine past tern (use http_options.h2_backend to speak HTTP/2 to machines)"
                ));
            }
        }
        Ok(())
    }

    /// Whether a client may switch to `protocol` (one token of an `Upgrade` header).
    pub fn allows_upgrade(&self, protocol: &str) -> bool {
        if is_http2(protocol) {
            return false;
        }
        protocol.eq_ignore_ascii_case("websocket")
            || self.upgrades.iter().any(|u| u.eq_ignore_ascii_case(protocol))
    }
}

/// `h2c`, `h2` or `HTTP/2…`: protocols that would turn the connection into HTTP/2.
fn is_http2(protocol: &str) -> bool {
    let name = protocol.split('/').next().unwrap_or(protocol);
    name.eq_ignore_ascii_case("h2c")
        || name.eq_ignore_ascii_case("h2")
        || (name.eq_ignore_ascii_case("http") && protocol.get(5..).is_some_and(|v| v.starts_with('2')))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    Started,
    Stopped,
    Suspended,
    Starting,
    Stopping,
    Suspending,
    Destroyed,
}

impl MachineState {
    /// A small stable number for packing into atomics.
    pub fn code(self) -> u8 {
        match self {
            MachineState::Started => 0,
            MachineState::Stopped => 1,
            MachineState::Suspended => 2,
            MachineState::Starting => 3,
            MachineState::Stopping => 4,
            MachineState::Suspending => 5,
            MachineState::Destroyed => 6,
        }
    }

    pub fn from_code(code: u8) -> MachineState {
        match code {
            0 => MachineState::Started,
            2 => MachineState::Suspended,
            3 => MachineState::Starting,
            4 => MachineState::Stopping,
            5 => MachineState::Suspending,
            6 => MachineState::Destroyed,
            _ => MachineState::Stopped,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Started => "started",
            MachineState::Stopped => "stopped",
            MachineState::Suspended => "suspended",
            MachineState::Starting => "starting",
            MachineState::Stopping => "stopping",
            MachineState::Suspending => "suspending",
            MachineState::Destroyed => "destroyed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineSpec {
    /// `Arc<str>` here and below: a catalog of millions of machines shares one allocation
    /// per id (with its maps' keys), per app name and per region instead of one per use.
    pub id: Arc<str>,
    pub app: Arc<str>,
    #[serde(default = "no_region", skip_serializing_if = "str::is_empty")]
    pub region: Arc<str>,
    /// Where the machine serves: `ip:port`, or a bare IP meaning the app's internal_port.
    pub addr: MachineAddr,
    pub state: MachineState,
    /// Process driver: how to start the machine. Without it, someone else runs the machine
    /// and tern only routes to it while it is started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// The node whose driver runs the machine (its owner): only that node starts, stops and
    /// probes it; others route to it while it is started and its owner is alive. Without
    /// it, every node that can run the machine manages it (one node, or a shared host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Arc<str>>,
}

fn no_region() -> Arc<str> {
    Arc::from("")
}

/// A row of the RIB's `nodes` table: a node says it is alive (and where other nodes reach
/// it) by rewriting its row every heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRow {
    pub node: String,
    #[serde(default)]
    pub region: String,
    /// Where other nodes reach this one (`[backhaul] addr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backhaul: Option<String>,
    #[serde(default)]
    pub pid: u32,
    /// The node's wall clock at this beat, in milliseconds since the Unix epoch (for
    /// people; liveness is judged by when a reader heard the beat, immune to clock skew).
    #[serde(default)]
    pub beat_ms: i64,
}

/// A row of the RIB's `machine_states` table: a machine's lifecycle state as recorded by
/// the node that manages it. `version` only grows; a reader keeps the highest it has seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRow {
    pub state: MachineState,
    pub version: u64,
    /// Why it changed: `wake`, `autostop`, `exited`, `start_failed`, `shutdown`, …
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The node that recorded it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// When, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub at_ms: i64,
}

/// `ip:port`, or a bare IP whose port is the app's `internal_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MachineAddr {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl MachineAddr {
    pub fn resolve(self, internal_port: u16) -> SocketAddr {
        SocketAddr::new(self.ip, self.port.unwrap_or(internal_port))
    }
}

impl std::str::FromStr for MachineAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(MachineAddr { ip: sa.ip(), port: Some(sa.port()) });
        }
        let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
        bare.parse::<IpAddr>().map(|ip| MachineAddr { ip, port: None }).map_err(|_| {
            format!("{s:?} is not an address (\"10.0.0.5:8080\", \"[fd00::5]:8080\" or a bare IP)")
        })
    }
}

impl std::fmt::Display for MachineAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => SocketAddr::new(self.ip, p).fmt(f),
            None => self.ip.fmt(f),
        }
    }
}

impl Serialize for MachineAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MachineAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A certificate as the RIB stores it: the PEM text itself, so that a node never needs the
/// files the operator applied from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertSpec {
    pub hostname: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn default_org() -> String {
    "personal".into()
}
fn default_internal_port() -> u16 {
    8080
}
fn yes() -> bool {
    true
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_auto_stop_after() -> Duration {
    Duration::from_secs(300)
}
fn default_kill_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_wake_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_start_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_max_pending() -> u32 {
    1000
}
fn default_soft_limit() -> u32 {
    20
}
fn default_check_interval() -> Duration {
    Duration::from_secs(15)
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_defaults_and_json_round_trip() {
        let app: AppSpec = toml::from_str("name = \"hello\"\nhostnames = [\"a.example\"]").unwrap();
        assert_eq!(app.internal_port, 8080);
        assert_eq!(app.idle_timeout, Duration::from_secs(60));
        assert_eq!(app.org, "personal");
        assert!(app.auto_start);
        let json = serde_json::to_string(&app).unwrap();
        let back: AppSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(app, back);
    }

    #[test]
    fn machine_addr_forms() {
        let a: MachineAddr = "127.0.0.1:9001".parse().unwrap();
        assert_eq!(a.resolve(80).to_string(), "127.0.0.1:9001");
        let b: MachineAddr = "10.0.0.5".parse().unwrap();
        assert_eq!(b.resolve(8080).to_string(), "10.0.0.5:8080");
        let c: MachineAddr = "[fd00::5]:8080".parse().unwrap();
        assert_eq!(c.resolve(1).to_string(), "[fd00::5]:8080");
        let d: MachineAddr = "fd00::5".parse().unwrap();
        assert_eq!(d.to_string(), "fd00::5");
        assert!("localhost:80".parse::<MachineAddr>().is_err());
    }
}
