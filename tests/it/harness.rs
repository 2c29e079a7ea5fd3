//! The test bench: a CA that mints real certificates, a real SQLite RIB in a temp dir, a
//! proxy on 127.0.0.1:0 (in-process, or the real `tern` binary), and real clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

use tern::config::Config;
use tern::proxy::{self, Bound};
use tern::rib::sqlite::{SqliteRib, Store};

/// A certificate authority for the test; clients trust only it.
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    pub fn new() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "tern test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        Ca { issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap() }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf for `names`, as (certificate PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A `[[certificates]]` declaration block with inline PEM.
    pub fn decl(&self, hostname: &str, names: &[&str]) -> String {
        let (cert, key) = self.leaf(names);
        format!(
            "[[certificates]]\nhostname = \"{hostname}\"\ncert_pem = '''\n{cert}'''\nkey_pem = '''\n{key}'''\n\n"
        )
    }

    /// A rustls server config with a leaf for `names`: a machine that speaks TLS itself.
    pub fn server_config(&self, names: &[&str]) -> rustls::ServerConfig {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key.into())
            .unwrap()
    }

    /// A rustls client config trusting only this CA, offering h2 and http/1.1.
    pub fn client_config(&self, alpn: &[&[u8]]) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let mut c =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        c
    }
}

/// A declaration for one app with the given machines (id, addr, state).
pub fn app_decl(name: &str, hosts: &[&str], machines: &[(&str, SocketAddr, &str)], extra: &str) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    let mut s = format!("[[apps]]\nname = \"{name}\"\nhostnames = [{}]\n{extra}\n", hosts.join(", "));
    for (id, addr, state) in machines {
        s += &format!(
            "[[machines]]\nid = \"{id}\"\napp = \"{name}\"\nregion = \"ams\"\naddr = \"{addr}\"\nstate = \"{state}\"\n\n"
        );
    }
    s
}

/// Applies declaration text to the RIB at `db` through the library (what `tern apply` does).
pub fn apply_decl(db: &Path, text: &str) {
    let decl = tern::decl::parse(text, "test.toml", Path::new(".")).unwrap_or_else(|p| panic!("{p}"));
    let mut store = Store::open(db).unwrap();
    tern::decl::apply(&mut store, &decl, false, false).unwrap();
}

/// Like [`apply_decl`], with `--prune`: whatever `text` does not name leaves the RIB.
pub fn apply_decl_pruning(db: &Path, text: &str) {
    let decl = tern::decl::parse(text, "test.toml", Path::new(".")).unwrap_or_else(|p| panic!("{p}"));
    let mut store = Store::open(db).unwrap();
    tern::decl::apply(&mut store, &decl, true, false).unwrap();
}

pub fn tern_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tern")
}

/// Node config text listening on port 0 (plain and TLS) with the given extra settings. Unless
/// `extra` has a `[shutdown]` table, stopping drains over one second: tests stop tern often,
/// and a drain over the default minute spreads two idle connections half a minute apart.
pub fn node_config(db: &Path, extra: &str) -> String {
    let shutdown = if extra.contains("[shutdown]") { "" } else { "[shutdown]\ndrain_window = \"1s\"\n" };
    // A test machine busy with other tests can stall a runtime now and then, and in the
    // test process a bounce would start the test binary: report wedges, do not bounce,
    // unless the test is about the watchdog (it sets [watchdog] itself).
    let watchdog = if extra.contains("[watchdog]") { "" } else { "[watchdog]\naction = \"log\"\n" };
    format!(
        "region = \"ams\"\n{extra}\n{shutdown}\n{watchdog}\n[[listen]]\naddr = \"127.0.0.1:0\"\n\n[[listen]]\naddr = \"127.0.0.1:0\"\ntls = true\n\n\
         [admin]\naddr = \"127.0.0.1:0\"\n\n[rib]\npath = \"{}\"\n\n[log]\naccess = false\n",
        db.display()
    )
}

/// A proxy running inside the test process.
pub struct Proxy {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    /// Every listener's address, in the node config's order (`extra`'s first).
    pub listeners: Vec<SocketAddr>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<Result<(), proxy::StartError>>>,
}

impl Proxy {
    pub async fn start(decl: &str) -> Proxy {
        Self::start_with(decl, "").await
    }

    /// Starts a proxy over a fresh RIB holding `decl`; `extra` goes into the node config
    /// (a `[limits]` table, say).
    pub async fn start_with(decl: &str, extra: &str) -> Proxy {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("rib.db");
        apply_decl(&db, decl);
        Self::serve(dir, db, extra)
    }

    /// A proxy serving the RIB at `db` (kept alive by `dir`).
    fn serve(dir: tempfile::TempDir, db: PathBuf, extra: &str) -> Proxy {
        // node_config reports wedges only unless the test sets [watchdog]: in this process a
        // bounce would start the test binary.
        let config = Config::parse(&node_config(&db, extra)).unwrap();
        let bound = Bound::bind(&config).unwrap();
        // In the config's order; `http` and `https` are the first public ones taking no PROXY header.
        let addrs = bound.addrs();
        let listeners: Vec<SocketAddr> = addrs.iter().map(|(a, _)| *a).collect();
        let first = |tls: bool| {
            config
                .listen
                .iter()
                .zip(&addrs)
                .find(|(c, _)| c.tls == tls && !c.proxy_protocol && !c.private)
                .unwrap()
                .1
                .0
        };
        let (http, https) = (first(false), first(true));
        let admin = bound.admin_addr().unwrap();
        let rib = SqliteRib::open(&db, config.rib.poll_interval).unwrap();
        let (stop, rx) = watch::channel(false);
        let task =
            tokio::spawn(proxy::run(config, bound, Arc::new(rib), rx, tern::watchdog::Parking::default()));
        Proxy { dir, db, http, https, admin, listeners, stop, task: Some(task) }
    }

    /// A second node on this proxy's RIB (as two `tern serve` sharing one database).
    pub async fn join(other: &Proxy) -> Proxy {
        install_crypto();
        Self::serve(tempfile::tempdir().unwrap(), other.db.clone(), "")
    }

    pub fn apply(&self, decl: &str) {
        apply_decl(&self.db, decl);
    }

    /// `tern apply --prune`.
    pub fn apply_pruning(&self, decl: &str) {
        apply_decl_pruning(&self.db, decl);
    }

    /// Starts graceful shutdown; returns the proxy's run task to await.
    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<Result<(), proxy::StartError>> {
        self.stop.send(true).unwrap();
        self.task.take().unwrap()
    }

    /// An HTTP client whose requests for any host go to this proxy; TLS trusts `ca`.
    pub fn client(&self, ca: &Ca, version: HttpVersion) -> reqwest::Client {
        client_for(self.http, self.https, ca, version)
    }

    pub fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.http.port())
    }

    pub fn tls_url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.https.port())
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin)).await.unwrap().text().await.unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    /// HTTP/2: ALPN over TLS, prior knowledge (h2c) over plain TCP.
    Http2,
}

/// Plain `reqwest::get` needs a process-wide TLS provider; tern itself never relies on one.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Resolves every host the tests use to the proxy's loopback address.
pub fn client_for(http: SocketAddr, https: SocketAddr, ca: &Ca, version: HttpVersion) -> reqwest::Client {
    let alpn: &[&[u8]] = match version {
        HttpVersion::Http1 => &[b"http/1.1"],
        HttpVersion::Http2 => &[b"h2"],
    };
    let _ = https;
    let resolver = Arc::new(Loopback(http.ip()));
    let mut b = reqwest::Client::builder()
        .tls_backend_preconfigured(ca.client_config(alpn))
        .dns_resolver(resolver)
        .no_proxy()
        .timeout(Duration::from_secs(60));
    b = match version {
        HttpVersion::Http1 => b.http1_only(),
        HttpVersion::Http2 => b.http2_prior_knowledge(),
    };
    b.build().unwrap()
}

struct Loopback(std::net::IpAddr);

impl reqwest::dns::Resolve for Loopback {
    fn resolve(&self, _name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let addr = SocketAddr::new(self.0, 0);
        Box::pin(async move { Ok(Box::new(std::iter::once(addr)) as reqwest::dns::Addrs) })
    }
}

/// The real `tern serve` binary on port 0, with JSON logs parsed for its addresses.
pub struct ServeProcess {
    pub child: tokio::process::Child,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
    pub logs: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
}

impl ServeProcess {
    pub async fn start(config_path: &Path) -> ServeProcess {
        // Tests talk to it with reqwest, which needs a process-wide TLS provider.
        install_crypto();
        let mut child = tokio::process::Command::new(tern_bin())
            .args(["serve", "-c"])
            .arg(config_path)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, mut logs) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    let _ = tx.send(v);
                } else {
                    eprintln!("tern: {line}");
                }
            }
        });
        let (mut http, mut https, mut admin) = (None, None, None);
        while http.is_none() || https.is_none() || admin.is_none() {
            let v = tokio::time::timeout(Duration::from_secs(30), logs.recv())
                .await
                .expect("tern serve did not report its addresses")
                .expect("tern serve exited early");
            // The [backhaul] listener takes only other nodes' hand-overs; tcp and private
            // listeners are not where a test sends its HTTP requests.
            let public_http = v["kind"] != "tcp" && v["private"] != true;
            if v["message"] == "listening" && v["backhaul"] != true && public_http {
                let addr: SocketAddr = v["addr"].as_str().unwrap().parse().unwrap();
                match (v["admin"].as_bool(), v["tls"].as_bool()) {
                    (Some(true), _) => admin = Some(addr),
                    (_, Some(true)) => https = Some(addr),
                    _ => http = Some(addr),
                }
            }
        }
        ServeProcess { child, http: http.unwrap(), https: https.unwrap(), admin: admin.unwrap(), logs }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }
}

/// A test that ends with its tern still running stops it as an operator would (SIGTERM),
/// so the machines it started are stopped with it instead of outliving the test; SIGKILL
/// (`kill_on_drop`) only if it has not exited within a few seconds.
impl Drop for ServeProcess {
    fn drop(&mut self) {
        let Some(pid) = self.child.id() else { return };
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Peak resident memory of a process, in KiB (VmHWM).
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Polls `f` every few milliseconds until it returns Some, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Ports [`reserve_port`] holds until the test process exits.
static RESERVED: parking_lot::Mutex<Vec<socket2::Socket>> = parking_lot::Mutex::new(Vec::new());

/// A loopback port held for the rest of this test process, for a machine tern starts later
/// (its declaration must name the port first) or for an address that refuses connections.
///
/// Binding a port and releasing it to hand it on races: before the machine binds it, another
/// test's listener or any outgoing connection may take it. Here the port stays bound, never
/// listening, until the process exits. The machines the tests run (`test_machine`,
/// `bench_backend`) bind with SO_REUSEPORT, which Linux lets them share with this socket
/// because both set it and both belong to the same user. Nothing else can take the port: a
/// bind to port 0 never picks a bound port, nor does an outgoing connection (checked: 0 of
/// 30,000 loopback connects took one of 3,000 such ports), and a bind without SO_REUSEPORT
/// fails. While no machine listens there, connecting is refused (ECONNREFUSED) at once.
/// Holding it until exit rather than in a guard keeps call sites to a `u16`; under nextest
/// each test is a process of its own anyway.
pub fn reserve_port() -> u16 {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    RESERVED.lock().push(socket);
    port
}

/// An address where nothing listens and nothing else can start listening: connecting is
/// refused (ECONNREFUSED), for the whole test.
pub fn dead_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], reserve_port()))
}

/// One request for `path` on `app.test` over a new connection (`Connection: close`), within
/// 15 s: its status, or what went wrong (`connect: …` when the connection was refused).
pub async fn fresh_get(addr: SocketAddr, path: &str) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&out);
        text.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no status in {text:?}"))
    };
    tokio::time::timeout(Duration::from_secs(15), attempt).await.unwrap_or_else(|_| Err("timeout".into()))
}

/// Kills a process the test did not spawn itself (the new tern of an upgrade or a bounce)
/// when the test ends, however it ends.
pub struct Reap(pub u32);

impl Drop for Reap {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}
