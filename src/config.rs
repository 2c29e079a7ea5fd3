//! The node config (`tern.toml`): where tern listens, where its RIB lives, its limits.
//!
//! A leaf: it imports nothing of ours but the duration syntax. Paths in a config file are relative to the file's
//! directory; the embedded default (no file at all) uses the working directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::duration::de_duration;

mod rib;
pub use rib::{Rib, RibKind};

pub const DEFAULT_CONFIG_FILE: &str = "tern.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid { path: PathBuf, line: usize, message: String },
}

/// Where the config came from, for logs and `tern check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Embedded,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's region code; sent to apps as `Fly-Region`.
    #[serde(default = "default_region")]
    pub region: String,
    /// Optional node name, for logs and metrics.
    #[serde(default)]
    pub node: Option<String>,
    /// Threads serving connections; 0 means one per CPU.
    #[serde(default)]
    pub workers: usize,
    #[serde(default = "default_listeners")]
    pub listen: Vec<Listen>,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub rib: Rib,
    #[serde(default)]
    pub driver: Driver,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub shutdown: Shutdown,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub watchdog: Watchdog,
    #[serde(default)]
    pub debug: Debug,
    /// Fleet: where other nodes reach this one. With it the node publishes a heartbeat in
    /// the RIB (`nodes`), and the machines it owns are routed to only while it beats.
    #[serde(default)]
    pub backhaul: Option<Backhaul>,
    /// Fleet: this node's distance to each region, for choosing the nearest machine.
    #[serde(default)]
    pub regions: RegionTable,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backhaul {
    pub addr: SocketAddr,
    /// How often this node rewrites its row in the RIB's `nodes`.
    #[serde(default = "default_heartbeat", deserialize_with = "de_duration")]
    pub heartbeat: Duration,
    /// A node not heard from for this long is dead: its machines leave routing.
    #[serde(default = "default_dead_after", deserialize_with = "de_duration")]
    pub dead_after: Duration,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionTable {
    /// Round-trip milliseconds from this node to each region; a region not listed is
    /// farther than every listed one.
    #[serde(default)]
    pub rtt_ms: std::collections::BTreeMap<String, u32>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub addr: SocketAddr,
    /// What the listener serves: HTTP (routed by Host, or by destination when `private`),
    /// or apps' TCP services (routed by destination address and port, or by SNI).
    #[serde(default)]
    pub kind: ListenKind,
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub private: bool,
    /// Each connection starts with a PROXY protocol (v1 or v2) header saying who the client
    /// is; only peers in `proxy_protocol_from` may send one.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The load balancers a `proxy_protocol` listener accepts connections from.
    #[serde(default)]
    pub proxy_protocol_from: Vec<crate::net::Prefix>,
    /// Bind the address even if no interface has it yet (IP_FREEBIND): an anycast address
    /// brought up after tern starts.
    #[serde(default)]
    pub freebind: bool,
    /// The kernel accept queue length (listen(2) backlog).
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    /// The `[backhaul]` listener (never set in `[[listen]]`): it takes only requests other
    /// nodes hand over for the machines this node owns.
    #[serde(skip)]
    pub backhaul: bool,
}

/// What a listener serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenKind {
    #[default]
    Http,
    Tcp,
}

impl Listen {
    /// What `tern check` refuses in one `[[listen]]`.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.kind == ListenKind::Tcp && self.tls {
            return Err((
                "tls",
                format!(
                    "{} is a tcp listener: TLS there is each service's (handlers = [\"tls\"]), or passed \
                     through to the machine (handlers = [])",
                    self.addr
                ),
            ));
        }
        if self.proxy_protocol && self.proxy_protocol_from.is_empty() {
            return Err((
                "proxy_protocol",
                format!(
                    "{} takes PROXY protocol headers: list the load balancers allowed to send them \
                     (proxy_protocol_from = [\"10.0.0.0/8\"]; [\"0.0.0.0/0\", \"::/0\"] trusts anyone)",
                    self.addr
                ),
            ));
        }
        if !self.proxy_protocol && !self.proxy_protocol_from.is_empty() {
            return Err((
                "proxy_protocol_from",
                format!("{} lists proxy_protocol_from without proxy_protocol = true", self.addr),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub addr: SocketAddr,
}

impl Default for Admin {
    fn default() -> Self {
        Admin { addr: SocketAddr::from(([127, 0, 0, 1], 9090)) }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DriverKind {
    Process,
    MachinesApi,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Driver {
    #[serde(default = "default_driver_kind")]
    pub kind: DriverKind,
    /// Driver-specific settings (the machines-api URL and token, say).
    #[serde(flatten)]
    pub options: toml::Table,
}

impl Default for Driver {
    fn default() -> Self {
        Driver { kind: DriverKind::Process, options: toml::Table::new() }
    }
}

/// The `machines-api` driver's settings, checked: see [`Driver::machines_api`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachinesApi {
    /// Host name or IP address to connect to (an IPv6 address without brackets).
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written in `url`, for the `Host` header.
    pub authority: String,
    /// Any path written before `/v1/...` (a gateway's prefix), without a trailing slash.
    pub prefix: String,
    pub token: ApiToken,
}

/// Where the bearer token comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum ApiToken {
    /// `token = "..."` in the config file.
    Literal(String),
    /// `token_env = "NAME"`: read from the environment when the driver is built (`tern serve`).
    Env(String),
}

impl std::fmt::Debug for ApiToken {
    // A token never reaches a log line through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiToken::Literal(_) => f.write_str("Literal(<redacted>)"),
            ApiToken::Env(name) => write!(f, "Env({name:?})"),
        }
    }
}

impl Driver {
    /// The `machines-api` settings: `url` (required, `http://host[:port][/prefix]`) and exactly one
    /// of `token` or `token_env`. Any other key is refused. The error is (field, message), as
    /// `Config::validate` reports it.
    pub fn machines_api(&self) -> Result<MachinesApi, (&'static str, String)> {
        const KNOWN: [&str; 3] = ["url", "token", "token_env"];
        if let Some(key) = self.options.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err((
                "[driver]",
                format!("unknown key {key:?} for the machines-api driver (known: url, token, token_env)"),
            ));
        }
        let Some(url) = self.options.get("url") else {
            return Err((
                "[driver]",
                "the machines-api driver needs url, the orchestrator's base URL (such as \
                 \"http://127.0.0.1:4280\")"
                    .into(),
            ));
        };
        let url = url.as_str().ok_or(("url", "must be a URL (a string)".to_string()))?;
        let (host, port, authority, prefix) = parse_api_url(url).map_err(|m| ("url", m))?;
        let as_str = |key: &'static str| -> Result<&str, (&'static str, String)> {
            self.options[key].as_str().ok_or((key, "must be a string".to_string()))
        };
        let token = match (self.options.contains_key("token"), self.options.contains_key("token_env")) {
            (true, true) => return Err(("token_env", "set token or token_env, not both".into())),
            (false, false) => {
                return Err((
                    "[driver]",
                    "the machines-api driver needs token (the bearer token) or token_env (the name of \
                     the environment variable that holds it)"
                        .into(),
                ));
            }
            (true, false) => {
                let t = as_str("token")?;
                if !valid_token(t) {
                    return Err(("token", "must be non-empty printable ASCII, without line breaks".into()));
                }
                ApiToken::Literal(t.to_string())
            }
            (false, true) => {
                let name = as_str("token_env")?;
                if name.is_empty() || name.contains(['=', '\0']) {
                    return Err(("token_env", format!("{name:?} is not an environment variable name")));
                }
                ApiToken::Env(name.to_string())
            }
        };
        Ok(MachinesApi { host, port, authority, prefix, token })
    }
}

/// A bearer token must fit in a header value: printable ASCII (spaces inside allowed).
pub fn valid_token(t: &str) -> bool {
    !t.trim().is_empty() && t.trim() == t && t.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// `http://host[:port][/prefix]` into (host, port, authority, prefix).
fn parse_api_url(url: &str) -> Result<(String, u16, String, String), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{url:?}: https is not supported yet; run a local TLS sidecar (stunnel, a proxy) \
                 and point url at it over http"
            ));
        }
        _ => return Err(format!("{url:?} must start with http://")),
    }
    let authority = uri.authority().ok_or_else(|| format!("{url:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("{url:?}: credentials in the URL are not supported; use token"));
    }
    if uri.query().is_some() || url.contains('#') {
        return Err(format!("{url:?}: a base URL takes no query or fragment"));
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    let port = authority.port_u16().unwrap_or(80);
    let prefix = uri.path().trim_end_matches('/').to_string();
    Ok((host.to_string(), port, authority.as_str().to_string(), prefix))
}

/// Node-wide limits. Every field has a default; see `docs/config.md`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open client connections across all listeners; past it tern stops accepting and the
    /// kernel queues new connections in the backlog.
    pub max_connections: usize,
    /// Time a client has to send a complete HTTP/1.1 request head (slowloris guard). hyper
    /// also applies it to the wait for the next request on an idle keep-alive connection.
    #[serde(deserialize_with = "de_duration")]
    pub header_read_timeout: Duration,
    /// Largest request head tern accepts (request line plus headers); larger gets 431.
    pub max_header_bytes: usize,
    /// Largest response head a machine may send (status line plus headers); larger gets the
    /// client a 502 `response_headers_too_large` instead.
    pub max_response_header_bytes: usize,
    #[serde(deserialize_with = "de_duration")]
    pub tls_handshake_timeout: Duration,
    /// Time to open a TCP connection to a machine.
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// How long a client connection with no request in flight may stay open.
    #[serde(deserialize_with = "de_duration")]
    pub keepalive_timeout: Duration,
    /// How long an unused pooled connection to a machine is kept.
    #[serde(deserialize_with = "de_duration")]
    pub upstream_idle_timeout: Duration,
    /// Most idle pooled connections kept per machine.
    pub upstream_max_idle: usize,
    /// Most connections each worker opens to one machine at once; a burst beyond that
    /// waits for one of them, or for a pooled connection to come back.
    pub upstream_max_connecting: usize,
    /// How long in-flight requests get to finish once a drain's window has passed (on
    /// SIGTERM/SIGINT: `[shutdown] drain_window`, then this), before they are cut.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            max_response_header_bytes: 64 * 1024,
            tls_handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(75),
            upstream_idle_timeout: Duration::from_secs(60),
            upstream_max_idle: 256,
            upstream_max_connecting: 8,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// How tern stops: `[shutdown]`. See `docs/drain.md`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    /// A drain (SIGTERM/SIGINT, an upgrade, `tern drain`) ends each long-lived exchange open
    /// when it begins at its own time, spread evenly over this window; whatever is still open
    /// at its end then gets `limits.shutdown_timeout` before it is cut.
    #[serde(deserialize_with = "de_duration")]
    pub drain_window: Duration,
    /// `tern drain`: how long `/healthz` answers 503 before the listeners close, so a BGP
    /// speaker or load balancer withdraws the node first.
    #[serde(deserialize_with = "de_duration")]
    pub drain_delay: Duration,
}

/// Longest `drain_window` or `drain_delay`: longer is almost surely a typo ("60m" for "60s").
const MAX_DRAIN: Duration = Duration::from_secs(3600);

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown { drain_window: Duration::from_secs(60), drain_delay: Duration::from_secs(5) }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    /// A tracing filter, such as `info` or `tern=debug`; `RUST_LOG` overrides it.
    pub level: String,
    /// One line per request under the `tern::access` target.
    pub access: bool,
}

impl Default for Log {
    fn default() -> Self {
        Log { format: LogFormat::Text, level: "info".into(), access: true }
    }
}

/// What the watchdog does about a wedge.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum WedgeAction {
    /// Start a fresh tern on the same listening sockets, then end this one.
    #[default]
    Bounce,
    /// Exit non-zero, for a supervisor (systemd) to restart.
    Exit,
    /// Only report it.
    Log,
}

/// `[watchdog]`: see `docs/watchdog.md`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Watchdog {
    /// A heartbeat or lock making no progress this long is a wedge.
    #[serde(deserialize_with = "de_duration")]
    pub stall_after: Duration,
    pub action: WedgeAction,
    /// Where the diagnostics of a wedge are written; relative to the RIB's directory.
    pub diagnostics_dir: PathBuf,
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog {
            stall_after: Duration::from_secs(2),
            action: WedgeAction::Bounce,
            diagnostics_dir: PathBuf::from("diagnostics"),
        }
    }
}

/// `[debug]`: switches for tests, never on in production.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Debug {
    /// Enables `POST /v1/debug/faults/...` on a loopback admin address.
    pub faults: bool,
}

fn default_region() -> String {
    "local".into()
}
fn default_backlog() -> u32 {
    4096
}
fn default_heartbeat() -> Duration {
    Duration::from_millis(500)
}
fn default_dead_after() -> Duration {
    Duration::from_millis(1500)
}
fn default_driver_kind() -> DriverKind {
    DriverKind::Process
}
fn default_listeners() -> Vec<Listen> {
    vec![
        Listen {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            kind: ListenKind::Http,
            tls: false,
            private: false,
            proxy_protocol: false,
            proxy_protocol_from: Vec::new(),
            freebind: false,
            backlog: default_backlog(),
            backhaul: false,
        },
        Listen {
            addr: SocketAddr::from(([127, 0, 0, 1], 8443)),
            kind: ListenKind::Http,
            tls: true,
            private: false,
            proxy_protocol: false,
            proxy_protocol_from: Vec::new(),
            freebind: false,
            backlog: default_backlog(),
            backhaul: false,
        },
    ]
}

impl Default for Config {
    /// The embedded default: plain HTTP on 127.0.0.1:8080, TLS on 127.0.0.1:8443, admin on
    /// 127.0.0.1:9090, RIB `./tern.db`, driver `process`.
    fn default() -> Self {
        Config {
            region: default_region(),
            node: None,
            workers: 0,
            listen: default_listeners(),
            admin: Admin::default(),
            rib: Rib::default(),
            driver: Driver::default(),
            limits: Limits::default(),
            shutdown: Shutdown::default(),
            log: Log::default(),
            watchdog: Watchdog::default(),
            debug: Debug::default(),
            backhaul: None,
            regions: RegionTable::default(),
        }
    }
}

impl Config {
    /// `-c FILE` if given; else `./tern.toml` if it exists; else the embedded default.
    pub fn load(explicit: Option<&Path>) -> Result<(Config, Source), ConfigError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_FILE);
                if !p.exists() {
                    return Ok((Config::default(), Source::Embedded));
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        let mut config = Config::parse(&text).map_err(|(line, message)| ConfigError::Invalid {
            path: path.clone(),
            line,
            message,
        })?;
        if let Some(dir) = path.parent() {
            config.resolve_paths(dir);
        }
        Ok((config, Source::File(path)))
    }

    /// Parses and validates config text. The error is (1-based line, message).
    pub fn parse(text: &str) -> Result<Config, (usize, String)> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |s| line_of(text, s.start));
            (line, e.message().to_string())
        })?;
        config.validate().map_err(|(field, message)| {
            (find_key_line(text, field).unwrap_or(1), format!("{field}: {message}"))
        })?;
        Ok(config)
    }

    fn validate_fleet(&self) -> Result<(), (&'static str, String)> {
        let Some(b) = &self.backhaul else { return Ok(()) };
        if self.node.as_deref().is_none_or(str::is_empty) {
            return Err((
                "node",
                "a node with a [backhaul] needs a name of its own (node = \"worker-1\")".into(),
            ));
        }
        if b.heartbeat < Duration::from_millis(50) || b.dead_after < b.heartbeat * 2 {
            return Err((
                "dead_after",
                "heartbeat must be at least 50ms and dead_after at least two heartbeats".into(),
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.listen.is_empty() {
            return Err(("listen", "at least one [[listen]] address is needed".into()));
        }
        if self.region.is_empty() || !self.region.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(("region", format!("{:?} is not a region code", self.region)));
        }
        check_log_filter(&self.log.level).map_err(|m| ("level", m))?;
        let mut seen = std::collections::HashSet::new();
        for l in &self.listen {
            // Port 0 asks the kernel for a free port: never a duplicate.
            if l.addr.port() != 0 && !seen.insert(l.addr) {
                return Err(("addr", format!("{} is listed twice", l.addr)));
            }
            l.validate()?;
        }
        self.rib.validate()?;
        self.validate_fleet()?;
        match self.driver.kind {
            DriverKind::MachinesApi => {
                self.driver.machines_api()?;
            }
            DriverKind::Process => {
                if let Some(key) = self.driver.options.keys().find(|k| k.as_str() != "log_dir") {
                    return Err((
                        "[driver]",
                        format!("unknown key {key:?} for the process driver (known: log_dir)"),
                    ));
                }
                if self.driver.options.get("log_dir").is_some_and(|v| !v.is_str()) {
                    return Err(("log_dir", "must be a path (a string)".into()));
                }
            }
        }
        if self.limits.max_connections == 0 {
            return Err(("max_connections", "must be at least 1".into()));
        }
        if self.limits.upstream_max_connecting == 0 {
            return Err(("upstream_max_connecting", "must be at least 1".into()));
        }
        if self.limits.max_header_bytes < 1024 {
            return Err(("max_header_bytes", "must be at least 1024".into()));
        }
        if !(1024..=16 << 20).contains(&self.limits.max_response_header_bytes) {
            return Err(("max_response_header_bytes", "must be from 1024 to 16 MiB".into()));
        }
        if self.watchdog.stall_after < Duration::from_millis(100) {
            return Err(("stall_after", "must be at least 100ms".into()));
        }
        if self.debug.faults && !self.admin.addr.ip().is_loopback() {
            return Err((
                "faults",
                format!("fault injection is refused on a non-loopback admin address ({})", self.admin.addr),
            ));
        }
        for (field, value) in
            [("drain_window", self.shutdown.drain_window), ("drain_delay", self.shutdown.drain_delay)]
        {
            if value > MAX_DRAIN {
                return Err((field, "must be at most 1h".into()));
            }
        }
        Ok(())
    }

    /// The number of worker threads: `workers`, or one per CPU.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// Where the watchdog writes a wedge's diagnostics: `[watchdog] diagnostics_dir`,
    /// relative to the RIB's directory.
    pub fn diagnostics_dir(&self) -> PathBuf {
        self.rib.path.parent().unwrap_or(Path::new(".")).join(&self.watchdog.diagnostics_dir)
    }

    /// Where the process driver writes each machine's stdout and stderr: `[driver] log_dir`,
    /// else `machine-logs` beside the RIB database.
    pub fn driver_log_dir(&self) -> std::path::PathBuf {
        match self.driver.options.get("log_dir").and_then(|v| v.as_str()) {
            Some(dir) => self.rib.path.parent().unwrap_or(Path::new(".")).join(dir),
            None => self.rib.path.parent().unwrap_or(Path::new(".")).join("machine-logs"),
        }
    }

    fn resolve_paths(&mut self, dir: &Path) {
        if self.rib.path.is_relative() {
            self.rib.path = dir.join(&self.rib.path);
        }
    }
}

/// `[log] level`: tracing's filter syntax, checked here so that a typo is an error at start
/// (tracing would quietly drop a bad directive, or read `loud` as a target name and log
/// nothing else). A bare word must be a level; a target at every level is `tern=trace`.
fn check_log_filter(filter: &str) -> Result<(), String> {
    use tracing_subscriber::filter::{Directive, LevelFilter};
    if filter.trim().is_empty() {
        return Err("must be a filter such as \"info\" or \"tern=debug\" (\"off\" for no logs)".into());
    }
    for d in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !d.contains(['=', '[']);
        if bare && d.parse::<LevelFilter>().is_err() {
            return Err(format!(
                "{d:?} is not a level (trace, debug, info, warn, error, off); for a target, \
                 write it with its level, as in \"tern=debug\""
            ));
        }
        if let Err(e) = d.parse::<Directive>() {
            return Err(format!("{d:?} is not a filter directive: {e}"));
        }
    }
    Ok(())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line where `key = …` first appears, for errors found after parsing.
fn find_key_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            // A table header (`[driver]`) matches itself; a key matches `key =`.
            if key.starts_with('[') {
                return l.trim_end() == key;
            }
            l.strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_and_debug_sections_parse_and_faults_stay_on_loopback() {
        let c =
            Config::parse("[watchdog]\nstall_after = \"500ms\"\naction = \"exit\"\n[debug]\nfaults = true\n")
                .unwrap();
        assert_eq!(c.watchdog.stall_after, Duration::from_millis(500));
        assert_eq!(c.watchdog.action, WedgeAction::Exit);
        assert!(c.debug.faults);
        let d = Config::default();
        assert_eq!(
            (d.watchdog.stall_after, d.watchdog.action),
            (Duration::from_secs(2), WedgeAction::Bounce)
        );
        assert!(!d.debug.faults, "never on by default");
        let (line, msg) =
            Config::parse("[admin]\naddr = \"0.0.0.0:9090\"\n[debug]\nfaults = true\n").unwrap_err();
        assert_eq!(line, 4);
        assert!(msg.contains("non-loopback"), "{msg}");
        let (_, msg) = Config::parse("[watchdog]\naction = \"reboot\"\n").unwrap_err();
        assert!(msg.contains("bounce"), "{msg}");
        let (_, msg) = Config::parse("[watchdog]\nstall_after = \"10ms\"\n").unwrap_err();
        assert!(msg.contains("at least 100ms"), "{msg}");
    }

    #[test]
    fn fleet_sections_parse_and_are_checked() {
        let c = Config::parse(
            "region = \"ams\"\nnode = \"edge-1\"\n[backhaul]\naddr = \"127.0.0.1:4280\"\n\
             [regions]\nrtt_ms = { ams = 0, fra = 9, iad = 80 }\n",
        )
        .unwrap();
        let b = c.backhaul.unwrap();
        assert_eq!((b.heartbeat, b.dead_after), (Duration::from_millis(500), Duration::from_millis(1500)));
        assert_eq!(c.regions.rtt_ms.get("iad"), Some(&80));
        let (_, msg) = Config::parse("[backhaul]\naddr = \"127.0.0.1:4280\"\n").unwrap_err();
        assert!(msg.contains("needs a name of its own"), "{msg}");
        let (_, msg) = Config::parse(
            "node = \"w\"\n[backhaul]\naddr = \"127.0.0.1:1\"\nheartbeat = \"1s\"\ndead_after = \"1s\"\n",
        )
        .unwrap_err();
        assert!(msg.contains("two heartbeats"), "{msg}");
    }

    #[test]
    fn embedded_default_matches_contract() {
        let c = Config::default();
        let addrs: Vec<_> = c.listen.iter().map(|l| (l.addr.to_string(), l.tls)).collect();
        assert_eq!(addrs, [("127.0.0.1:8080".to_string(), false), ("127.0.0.1:8443".to_string(), true)]);
        assert_eq!(c.admin.addr.to_string(), "127.0.0.1:9090");
        assert_eq!(c.rib.path, PathBuf::from("tern.db"));
        assert_eq!(c.driver.kind, DriverKind::Process);
    }

    #[test]
    fn contract_example_parses() {
        let text = r#"
region = "ams"
node = "edge-1"

[[listen]]
addr = "0.0.0.0:443"
tls = true

[[listen]]
addr = "[::]:80"

[admin]
addr = "127.0.0.1:9090"

[rib]
kind = "sqlite"
path = "tern.db"

[driver]
kind = "process"
"#;
        let c = Config::parse(text).unwrap();
        assert_eq!(c.region, "ams");
        assert_eq!(c.listen.len(), 2);
        assert!(c.listen[1].addr.is_ipv6());
    }

    #[test]
    fn driver_settings_are_checked() {
        let base = "[[listen]]\naddr = \"127.0.0.1:0\"\n[driver]\n";
        let c = Config::parse(&format!("{base}kind = \"process\"\nlog_dir = \"logs\"\n")).unwrap();
        assert!(c.driver_log_dir().ends_with("logs"));
        let (line, msg) = Config::parse(&format!("{base}kind = \"process\"\nlog_dri = \"x\"\n")).unwrap_err();
        assert!(msg.contains("log_dri"), "{msg}");
        assert_eq!(line, 3, "{msg}");
    }

    #[test]
    fn machines_api_settings_are_checked() {
        let base = "[[listen]]\naddr = \"127.0.0.1:0\"\n[driver]\nkind = \"machines-api\"\n";
        let ok =
            |extra: &str| Config::parse(&format!("{base}{extra}")).unwrap().driver.machines_api().unwrap();
        let err = |extra: &str| Config::parse(&format!("{base}{extra}")).unwrap_err();

        let api = ok("url = \"http://127.0.0.1:4280\"\ntoken = \"secret\"\n");
        assert_eq!((api.host.as_str(), api.port, api.prefix.as_str()), ("127.0.0.1", 4280, ""));
        assert_eq!(api.authority, "127.0.0.1:4280");
        assert_eq!(api.token, ApiToken::Literal("secret".into()));
        assert!(!format!("{api:?}").contains("secret"), "the token stays out of Debug");
        let api = ok("url = \"http://[::1]/flaps/\"\ntoken_env = \"FLY_API_TOKEN\"\n");
        assert_eq!((api.host.as_str(), api.port, api.prefix.as_str()), ("::1", 80, "/flaps"));
        assert_eq!(api.token, ApiToken::Env("FLY_API_TOKEN".into()));

        // (config text after the [driver] table's kind line, what the message names, its line)
        let cases = [
            ("token = \"t\"\n", "needs url", 3),
            ("url = \"http://h:1\"\n", "needs token", 3),
            ("url = \"http://h:1\"\ntoken = \"t\"\ntokn = \"x\"\n", "tokn", 3),
            ("url = \"https://api.machines.dev\"\ntoken = \"t\"\n", "sidecar", 5),
            ("url = \"ftp://h\"\ntoken = \"t\"\n", "http://", 5),
            ("url = \"not a url\"\ntoken = \"t\"\n", "not a URL", 5),
            ("url = 4280\ntoken = \"t\"\n", "url: must be a URL", 5),
            ("url = \"http://h:1\"\ntoken = \"\"\n", "token: must be non-empty", 6),
            ("url = \"http://h:1\"\ntoken = \"a\\nb\"\n", "token: must be non-empty", 6),
            ("url = \"http://h:1\"\ntoken = \"t\"\ntoken_env = \"T\"\n", "not both", 7),
            ("url = \"http://h:1\"\ntoken_env = \"\"\n", "token_env", 6),
            ("url = \"http://h:1\"\nlog_dir = \"x\"\ntoken = \"t\"\n", "log_dir", 3),
        ];
        for (extra, says, line) in cases {
            let (at, msg) = err(extra);
            assert!(msg.contains(says), "{extra:?}: {msg}");
            assert_eq!(at, line, "{extra:?}: {msg}");
        }
    }

    #[test]
    fn a_bad_log_filter_is_an_error_with_its_line() {
        for good in ["info", "warn,tern::access=info", "tern=debug,hyper=off", "TRACE", "info,"] {
            let text = format!("region = \"ams\"\n[log]\nlevel = \"{good}\"\n");
            assert!(Config::parse(&text).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("tern=loud", "\"tern=loud\" is not a filter directive"),
            ("loud", "\"loud\" is not a level"),
            ("info,garbage", "\"garbage\" is not a level"),
            ("tern=[", "is not a filter directive"),
            ("", "must be a filter"),
        ] {
            let text = format!("region = \"ams\"\n\n[log]\nformat = \"json\"\nlevel = \"{bad}\"\n");
            let (line, msg) = Config::parse(&text).unwrap_err();
            assert_eq!(line, 5, "{bad}: {msg}");
            assert!(msg.starts_with("level: ") && msg.contains(says), "{bad}: {msg}");
        }
    }

    #[test]
    fn shutdown_durations_have_defaults_and_bounds() {
        let c = Config::parse("region = \"ams\"\n").unwrap();
        assert_eq!(c.shutdown.drain_window, Duration::from_secs(60));
        assert_eq!(c.shutdown.drain_delay, Duration::from_secs(5));
        let c = Config::parse("[shutdown]\ndrain_window = \"2500ms\"\ndrain_delay = \"0s\"\n").unwrap();
        assert_eq!(c.shutdown.drain_window, Duration::from_millis(2500));
        assert_eq!(c.shutdown.drain_delay, Duration::ZERO);
        let (line, msg) =
            Config::parse("[shutdown]\ndrain_delay = \"1s\"\ndrain_window = \"2h\"\n").unwrap_err();
        assert_eq!((line, msg.as_str()), (3, "drain_window: must be at most 1h"));
        let (line, msg) = Config::parse("[shutdown]\ndrain_windw = \"1s\"\n").unwrap_err();
        assert!(line == 2 && msg.contains("drain_windw"), "{line}: {msg}");
        let (line, msg) = Config::parse("[shutdown]\ndrain_delay = \"soon\"\n").unwrap_err();
        assert!(line == 2 && msg.contains("soon"), "{line}: {msg}");
    }

    #[test]
    fn errors_name_the_line() {
        let text = "region = \"ams\"\n\n[[listen]]\naddr = \"not an address\"\n";
        let (line, msg) = Config::parse(text).unwrap_err();
        assert_eq!(line, 4, "{msg}");
        let text = "region = \"ams\"\n[limits]\nheader_read_timeout = \"soon\"\n";
        let (line, msg) = Config::parse(text).unwrap_err();
        assert_eq!(line, 3, "{msg}");
        assert!(msg.contains("soon"), "{msg}");
        let (line, msg) = Config::parse("regoin = \"ams\"\n").unwrap_err();
        assert_eq!(line, 1);
        assert!(msg.contains("regoin"), "{msg}");
    }

    #[test]
    fn tcp_listeners_leave_tls_to_their_services() {
        let base = "region = \"ams\"\n[[listen]]\naddr = \"127.0.0.1:5432\"\n";
        let ok = Config::parse(&format!("{base}kind = \"tcp\"\n")).unwrap();
        assert_eq!(ok.listen[0].kind, ListenKind::Tcp);
        assert!(Config::parse(&format!("{base}private = true\n")).unwrap().listen[0].private);
        let (line, msg) = Config::parse(&format!("{base}kind = \"tcp\"\ntls = true\n")).unwrap_err();
        assert!(line == 5 && msg.contains("handlers = [\"tls\"]"), "{line}: {msg}");
        let private_tcp = Config::parse(&format!("{base}kind = \"tcp\"\nprivate = true\n")).unwrap();
        assert!(private_tcp.listen[0].private && private_tcp.listen[0].kind == ListenKind::Tcp);
        let (_, msg) = Config::parse(&format!("{base}kind = \"udp\"\n")).unwrap_err();
        assert!(msg.contains("udp"), "{msg}");
    }

    #[test]
    fn a_proxy_protocol_listener_names_the_balancers_it_trusts() {
        let base = "region = \"ams\"\n[[listen]]\naddr = \"127.0.0.1:80\"\n";
        let ok = Config::parse(&format!(
            "{base}proxy_protocol = true\nproxy_protocol_from = [\"10.0.0.0/8\", \"::/0\"]\n"
        ))
        .unwrap();
        assert!(ok.listen[0].proxy_protocol);
        assert!(ok.listen[0].proxy_protocol_from[0].contains("10.9.8.7".parse().unwrap()));
        let (line, msg) = Config::parse(&format!("{base}proxy_protocol = true\n")).unwrap_err();
        assert!(msg.contains("proxy_protocol_from"), "{msg}");
        assert_eq!(line, 4, "points at the listener's proxy_protocol: {msg}");
        let (_, msg) = Config::parse(&format!("{base}proxy_protocol_from = [\"10.0.0.0/8\"]\n")).unwrap_err();
        assert!(msg.contains("without proxy_protocol"), "{msg}");
        let (line, msg) =
            Config::parse(&format!("{base}proxy_protocol = true\nproxy_protocol_from = [\"10.1.2.3/8\"]\n"))
                .unwrap_err();
        assert_eq!(line, 5, "{msg}");
        assert!(msg.contains("10.0.0.0/8"), "{msg}");
    }
}
