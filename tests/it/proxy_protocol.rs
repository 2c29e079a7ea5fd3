//! PROXY protocol in: a load balancer in front of tern says who the client is.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::backend::Backend;
use crate::harness::{Ca, Proxy, app_decl, eventually, reserve_port};
use crate::wake::metric;

/// Two PROXY protocol listeners (plain, then TLS) trusting 127.0.0.1 only, before the
/// usual two.
const LISTENERS: &str = "[[listen]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\nproxy_protocol_from = [\"127.0.0.1/32\"]\n\n\
    [[listen]]\naddr = \"127.0.0.1:0\"\ntls = true\nproxy_protocol = true\nproxy_protocol_from = [\"127.0.0.1/32\"]\n";

/// A v2 PROXY header for TCP over IPv4.
fn v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (source, destination) else { panic!("IPv4 only") };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

/// A v2 `LOCAL` header: the balancer's own connection (a health check).
const V2_LOCAL: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";

const ECHO: &[u8] = b"GET /echo HTTP/1.1\r\nHost: hello.test\r\nConnection: close\r\n\r\n";

/// Sends `bytes` and reads until the server closes: the response, whatever it was.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> String {
    // A refused connection may be closed before the bytes are all written.
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    // A TLS server may close without close_notify: what arrived is the answer.
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The request headers the app saw, from `/echo`'s answer.
fn app_headers(response: &str) -> Value {
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let body = response.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str::<Value>(body).unwrap()["headers"].clone()
}

/// A connection from `source` (a loopback address of the test's choosing) to `to`.
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

async fn hello_proxy(ca: &Ca, extra: &str) -> (Proxy, Backend) {
    let b = Backend::start("m1").await;
    let decl = app_decl("hello", &["hello.test"], &[("m1", b.addr, "started")], "")
        + &ca.decl("hello.test", &["hello.test"]);
    (Proxy::start_with(&decl, extra).await, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_a_proxy_header_names_is_the_client_the_app_sees() {
    let ca = Ca::new();
    let (proxy, _b) = hello_proxy(&ca, LISTENERS).await;
    let (plain, tls) = (proxy.listeners[0], proxy.listeners[1]);
    let client: SocketAddr = "203.0.113.9:51234".parse().unwrap();
    let reached: SocketAddr = "198.51.100.7:8443".parse().unwrap();

    // Version 1, in its own write.
    let mut s = TcpStream::connect(plain).await.unwrap();
    s.write_all(b"PROXY TCP4 203.0.113.9 198.51.100.7 51234 8443\r\n").await.unwrap();
    let h = app_headers(&exchange(&mut s, ECHO).await);
    assert_eq!(h["fly-client-ip"][0], "203.0.113.9");
    assert_eq!(h["x-forwarded-for"][0], "203.0.113.9");
    assert_eq!(h["x-forwarded-port"][0], "8443", "the port the client reached, as the header says");

    // Version 2, in one write with the request (tern must not eat the request's bytes).
    let mut s = TcpStream::connect(plain).await.unwrap();
    let h = app_headers(&exchange(&mut s, &[v2(client, reached), ECHO.to_vec()].concat()).await);
    assert_eq!(h["fly-client-ip"][0], "203.0.113.9");

    // HTTP/2 with prior knowledge after the header: the preface is told apart from
    // HTTP/1.1 past the header, and tern answers with its SETTINGS frame.
    let mut s = TcpStream::connect(plain).await.unwrap();
    let settings = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    let preface = [&v2(client, reached)[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", &settings].concat();
    s.write_all(&preface).await.unwrap();
    let mut frame = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut frame)).await.unwrap().unwrap();
    assert_eq!(frame[3], 4, "tern's first HTTP/2 frame is SETTINGS: {frame:?}");

    // LOCAL (the balancer's own health check): the connection's own address.
    let mut s = TcpStream::connect(plain).await.unwrap();
    let h = app_headers(&exchange(&mut s, &[V2_LOCAL, ECHO].concat()).await);
    assert_eq!(h["fly-client-ip"][0], "127.0.0.1");

    // TLS after the header: the handshake, then a request the app sees from the client.
    let mut s = TcpStream::connect(tls).await.unwrap();
    s.write_all(&v2(client, reached)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ca.client_config(&[b"http/1.1"])));
    let name = rustls::pki_types::ServerName::try_from("hello.test").unwrap();
    let mut s = connector.connect(name, s).await.unwrap();
    let h = app_headers(&exchange(&mut s, ECHO).await);
    assert_eq!(h["fly-client-ip"][0], "203.0.113.9");
    assert_eq!(h["x-forwarded-proto"][0], "https");

    // The listeners without proxy_protocol take no header, as before.
    let mut s = TcpStream::connect(proxy.http).await.unwrap();
    assert_eq!(app_headers(&exchange(&mut s, ECHO).await)["fly-client-ip"][0], "127.0.0.1");
    let m = proxy.metrics().await;
    assert!(!m.contains("tern_proxy_protocol_refused_total{"), "nothing refused: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_header_a_bad_one_or_an_untrusted_sender_is_closed_and_counted() {
    let ca = Ca::new();
    let (proxy, b) = hello_proxy(&ca, LISTENERS).await;
    let (plain, tls) = (proxy.listeners[0], proxy.listeners[1]);
    let header = b"PROXY TCP4 203.0.113.9 198.51.100.7 51234 80\r\n";
    let cases: [(&str, SocketAddr, Vec<u8>, &str); 5] = [
        ("a request without a header", plain, ECHO.to_vec(), "missing"),
        (
            "a TLS ClientHello without a header",
            tls,
            b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03".to_vec(),
            "missing",
        ),
        ("a header cut short", plain, b"PROXY TCP4 203.0.113.9\r\n".to_vec(), "malformed"),
        ("a v2 header of version 3", plain, b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c".to_vec(), "malformed"),
        (
            "a header from outside proxy_protocol_from",
            plain,
            [&header[..], ECHO].concat(),
            "untrusted_source",
        ),
    ];
    for (what, to, bytes, reason) in cases {
        // Read before connecting: an untrusted peer is refused as soon as it is accepted.
        let before = metric(
            &proxy.metrics().await,
            &format!("tern_proxy_protocol_refused_total{{reason=\"{reason}\"}}"),
        );
        let mut s = if reason == "untrusted_source" {
            connect_from("127.0.0.2", to).await
        } else {
            TcpStream::connect(to).await.unwrap()
        };
        let answer = exchange(&mut s, &bytes).await;
        assert_eq!(answer, "", "{what}: closed without a word");
        let after = metric(
            &proxy.metrics().await,
            &format!("tern_proxy_protocol_refused_total{{reason=\"{reason}\"}}"),
        );
        assert_eq!(after, before + 1.0, "{what}: counted as {reason}");
    }
    assert_eq!(
        b.requests.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no refused connection reached the app"
    );

    // The client closing inside the header.
    let mut s = TcpStream::connect(plain).await.unwrap();
    s.write_all(b"PROXY TCP4 203").await.unwrap();
    drop(s);
    let closed = eventually(Duration::from_secs(10), || async {
        let m = proxy.metrics().await;
        (metric(&m, "tern_proxy_protocol_refused_total{reason=\"closed\"}") == 1.0).then_some(())
    })
    .await;
    assert!(closed.is_some(), "a connection closed inside its header is counted as closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_that_never_completes_is_cut_at_the_header_read_timeout() {
    let ca = Ca::new();
    let extra = format!("{LISTENERS}\n[limits]\nheader_read_timeout = \"1s\"\n");
    let (proxy, _b) = hello_proxy(&ca, &extra).await;
    let mut s = TcpStream::connect(proxy.listeners[0]).await.unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(exchange(&mut s, b"PROXY TCP4 203.0.113.9 ").await, "");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "held until the timeout: {:?}",
        started.elapsed()
    );
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "tern_proxy_protocol_refused_total{reason=\"timeout\"}"), 1.0);
}

/// HAProxy from Debian in front of tern with `send-proxy-v2`: the app sees the address the
/// client connected to HAProxy from (127.0.0.5), not HAProxy's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_with_send_proxy_v2_the_app_sees_the_real_client() {
    let ca = Ca::new();
    let (proxy, _b) = hello_proxy(&ca, LISTENERS).await;
    // HAProxy binds with SO_REUSEPORT, as the reservation does; the reservation never listens.
    let front = SocketAddr::from(([127, 0, 0, 1], reserve_port()));
    let (_dir, mut child) = run_haproxy(&format!(
        "global\n  maxconn 256\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend fe\n  bind {front}\n  default_backend tern\n\
             backend tern\n  server tern {} send-proxy-v2\n",
        proxy.listeners[0]
    ));
    let up =
        eventually(Duration::from_secs(10), || async { TcpStream::connect(front).await.ok().map(|_| ()) })
            .await;
    assert!(up.is_some(), "haproxy did not start listening on {front}");

    let client = reqwest::Client::builder()
        .local_address("127.0.0.5".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let r = client.get(format!("http://{front}/echo")).header("host", "hello.test").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let app: Value = r.json().await.unwrap();
    assert_eq!(app["headers"]["fly-client-ip"][0], "127.0.0.5");
    assert_eq!(app["headers"]["x-forwarded-for"][0], "127.0.0.5");
    assert_eq!(app["headers"]["x-forwarded-port"][0], front.port().to_string().as_str());
    child.kill().await.unwrap();
}

/// Debian's HAProxy in the foreground on the configuration `text`, killed when dropped (with
/// the directory holding its file).
pub(crate) fn run_haproxy(text: &str) -> (tempfile::TempDir, tokio::process::Child) {
    let haproxy =
        which("haproxy").expect("haproxy is needed (Debian: apt-get install haproxy; .ci/run installs it)");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg, text).unwrap();
    let child = tokio::process::Command::new(haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (dir, child)
}

/// Where `name` is on the PATH (or in /usr/sbin, /sbin, where Debian puts daemons).
pub(crate) fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
}
