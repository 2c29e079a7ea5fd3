//! The wire is hostile. Each test sends raw bytes (over TCP, or TLS with a chosen ALPN) the
//! way an attacker or a broken machine would, and checks what tern does with them: a coded
//! refusal, never a request smuggled past it, never a response it cannot frame.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::backend::Backend;
use crate::harness::{Ca, HttpVersion, Proxy, app_decl, eventually};
use crate::wake::metric;

const LIMIT: Duration = Duration::from_secs(10);

/// Writes `bytes` and reads until the peer closes.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(LIMIT, tcp.read_to_end(&mut out)).await.expect("the peer never closed");
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes `bytes` on a new connection and reads one response.
async fn one_response(addr: SocketAddr, bytes: &[u8]) -> Raw {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    read_response(&mut tcp, &mut Vec::new()).await
}

/// One HTTP/1.1 response as read off the wire.
#[derive(Debug)]
struct Raw {
    /// Status line and header lines, header names lower-cased.
    head: String,
    body: Vec<u8>,
    /// Trailer lines of a chunked body, names lower-cased.
    trailers: String,
}

impl Raw {
    fn status(&self) -> u16 {
        self.head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
    }
}

/// Reads one response (head, then a body framed by Content-Length or chunked encoding) and
/// leaves the connection open for the next. 1xx responses are returned like any other.
async fn read_response<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Raw {
    tokio::time::timeout(LIMIT, read_response_inner(s, buf)).await.expect("no whole response in time")
}

async fn fill<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 16 * 1024];
    let n = s.read(&mut chunk).await.unwrap();
    assert!(n > 0, "connection closed mid-response; got {:?}", String::from_utf8_lossy(buf));
    buf.extend_from_slice(&chunk[..n]);
}

async fn read_line<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> String {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..i]).into_owned();
            buf.drain(..i + 2);
            return line;
        }
        fill(s, buf).await;
    }
}

async fn read_response_inner<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Raw {
    let mut head = String::new();
    loop {
        let line = read_line(s, buf).await;
        if line.is_empty() {
            break;
        }
        let line = match line.split_once(':') {
            Some((name, value)) if !head.is_empty() => format!("{}:{value}", name.to_ascii_lowercase()),
            _ => line,
        };
        head += &line;
        head += "\n";
    }
    let mut raw = Raw { head, body: Vec::new(), trailers: String::new() };
    let status = raw.status();
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return raw;
    }
    if raw.header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let size = read_line(s, buf).await;
            let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
            if size == 0 {
                loop {
                    let line = read_line(s, buf).await;
                    if line.is_empty() {
                        return raw;
                    }
                    raw.trailers += &line.to_ascii_lowercase();
                    raw.trailers += "\n";
                }
            }
            while buf.len() < size + 2 {
                fill(s, buf).await;
            }
            raw.body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    }
    let len: usize = raw.header("content-length").map_or(0, |v| v.parse().unwrap());
    while buf.len() < len {
        fill(s, buf).await;
    }
    raw.body = buf.drain(..len).collect();
    raw
}

/// A machine that speaks raw bytes, for answers no well-behaved server would give. It
/// records each request head it reads (and, after answering 101, every byte that follows)
/// and answers with whatever `answer` returns for the head.
struct RawMachine {
    addr: SocketAddr,
    heads: Arc<parking_lot::Mutex<Vec<String>>>,
    after_upgrade: Arc<parking_lot::Mutex<Vec<u8>>>,
    /// Connections the machine accepted.
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawMachine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawMachine {
    async fn start(answer: fn(&str) -> Vec<u8>) -> RawMachine {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let after_upgrade = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (h, a, c) = (heads.clone(), after_upgrade.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_raw(tcp, answer, h.clone(), a.clone()));
            }
        });
        RawMachine { addr, heads, after_upgrade, connections, task }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().clone()
    }
}

async fn serve_raw(
    mut tcp: TcpStream,
    answer: fn(&str) -> Vec<u8>,
    heads: Arc<parking_lot::Mutex<Vec<String>>>,
    after: Arc<parking_lot::Mutex<Vec<u8>>>,
) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        buf.drain(..end);
        heads.lock().push(head.clone());
        let reply = answer(&head);
        if tcp.write_all(&reply).await.is_err() {
            return;
        }
        if reply.starts_with(b"HTTP/1.1 101") {
            after.lock().extend_from_slice(&buf);
            let mut chunk = [0u8; 4096];
            while let Ok(n) = tcp.read(&mut chunk).await {
                if n == 0 {
                    return;
                }
                after.lock().extend_from_slice(&chunk[..n]);
            }
            return;
        }
    }
}

fn ok_plain(_: &str) -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain".to_vec()
}

/// Answers 101 to anything, as a machine that honours `Upgrade: h2c` (or a careless one) does.
fn always_101(_: &str) -> Vec<u8> {
    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n".to_vec()
}

/// Answers 101 (to the protocol asked for) only to a request that asks to upgrade, and 200
/// otherwise.
fn upgrade_if_asked(head: &str) -> Vec<u8> {
    let asked = head.lines().find_map(|l| l.strip_prefix("upgrade:")).map(str::trim);
    match asked {
        Some(p) => format!("HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {p}\r\n\r\n")
            .into_bytes(),
        None => ok_plain(head),
    }
}

const H2C_UPGRADE: &str = "GET / HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
     Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";

/// What a client that got its h2c upgrade would send next: the h2 preface, then a request for
/// another host, with a spoofed client address.
const SMUGGLED: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nGET /admin HTTP/1.1\r\nHost: other.test\r\nFly-Client-IP: 10.0.0.1\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_never_forwarded() {
    // A machine that upgrades whenever asked: tern must not ask on the client's behalf.
    let m = RawMachine::start(upgrade_if_asked).await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", m.addr, "started")], "")).await;
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(H2C_UPGRADE.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut tcp, &mut buf).await;
    assert_eq!(r.status(), 200, "served as a plain request: {r:?}");
    assert_eq!(r.body, b"plain");
    let heads = m.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(!heads[0].contains("upgrade") && !heads[0].contains("http2-settings"), "{heads:?}");

    // A machine that answers 101 to anything: the client gets a coded 502, never a tunnel.
    let m = RawMachine::start(always_101).await;
    proxy.apply(&app_decl("app", &["app.test"], &[("m1", m.addr, "started")], ""));
    let got = eventually(LIMIT, || async {
        let r = one_response(proxy.http, H2C_UPGRADE.as_bytes()).await;
        (r.body != b"plain").then_some(r)
    })
    .await
    .unwrap();
    assert_eq!(got.status(), 502, "{got:?}");
    assert_eq!(got.header("tern-error"), Some("upstream_error"), "{got:?}");
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(H2C_UPGRADE.as_bytes()).await.unwrap();
    let _ = tcp.write_all(SMUGGLED).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(LIMIT, tcp.read_to_end(&mut rest)).await;
    assert!(m.after_upgrade.lock().is_empty(), "bytes after the 101 reached the machine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_other_than_websocket_need_the_apps_consent() {
    let m = RawMachine::start(upgrade_if_asked).await;
    let decl = |extra: &str| app_decl("app", &["app.test"], &[("m1", m.addr, "started")], extra);
    let proxy = Proxy::start(&decl("")).await;
    let ask = "GET / HTTP/1.1\r\nHost: app.test\r\nConnection: upgrade\r\nUpgrade: tcp-tunnel\r\n\r\n";
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(ask.as_bytes()).await.unwrap();
    let r = read_response(&mut tcp, &mut Vec::new()).await;
    assert_eq!(r.status(), 200, "not opted in: a plain request: {r:?}");
    assert!(!m.heads()[0].contains("upgrade"), "{:?}", m.heads());

    proxy.apply(&decl("[apps.http_options]\nupgrades = [\"tcp-tunnel\"]"));
    let got = eventually(LIMIT, || async {
        let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
        tcp.write_all(ask.as_bytes()).await.unwrap();
        let r = read_response(&mut tcp, &mut Vec::new()).await;
        (r.status() == 101).then_some(tcp)
    })
    .await;
    let mut tcp = got.expect("the opted-in upgrade is forwarded");
    tcp.write_all(b"hello through the tunnel").await.unwrap();
    let arrived = eventually(LIMIT, || async {
        let after = m.after_upgrade.lock().clone();
        (after == b"hello through the tunnel").then_some(())
    })
    .await;
    assert!(arrived.is_some(), "{:?}", String::from_utf8_lossy(&m.after_upgrade.lock()));

    // h2c can never be opted into: it would hand the connection to the machine.
    let bad = tern::decl::parse(
        &decl("[apps.http_options]\nupgrades = [\"h2c\"]"),
        "t.toml",
        std::path::Path::new("."),
    )
    .unwrap_err();
    assert!(bad.to_string().contains("h2c"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_hosts_and_targets_get_400() {
    let b = Backend::start("m1").await;
    let proxy =
        Proxy::start(&app_decl("app", &["app.test", "b.test"], &[("m1", b.addr, "started")], "")).await;
    let cases = [
        "GET /echo HTTP/1.1\r\nHost: app.test\r\nHost: b.test\r\n\r\n",
        "GET /echo HTTP/1.1\r\nHost: app.test\r\nHost: app.test\r\n\r\n",
        "GET /echo HTTP/1.1\r\n\r\n",
        "GET * HTTP/1.1\r\nHost: app.test\r\n\r\n",
    ];
    for case in cases {
        let r = one_response(proxy.http, case.as_bytes()).await;
        assert_eq!(r.status(), 400, "{case:?}: {r:?}");
        assert!(matches!(r.header("tern-error"), Some("bad_host" | "bad_request")), "{case:?}: {r:?}");
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), 0, "none reached the machine");
    // OPTIONS * is the one request whose target may be "*".
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(b"OPTIONS * HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let r = read_response(&mut tcp, &mut Vec::new()).await;
    assert_ne!(r.status(), 400, "{r:?}");
    assert_eq!(b.requests.load(Ordering::SeqCst), 1);

    // HTTP/2: `:path *` on a GET.
    let tcp = TcpStream::connect(proxy.http).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let uri = http::Uri::builder().scheme("http").authority("app.test").path_and_query("*").build().unwrap();
    let req = http::Request::builder().method("GET").uri(uri).body(()).unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["tern-error"], "bad_request");
    assert_eq!(b.requests.load(Ordering::SeqCst), 1);
}

/// Content-Length 5, but chunked encoding carrying 16 bytes: the chunked framing wins.
fn length_and_chunked(_: &str) -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n"
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_both_length_and_chunked_is_framed_by_chunks() {
    let ca = Ca::new();
    let m = RawMachine::start(length_and_chunked).await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", m.addr, "started")], "")).await;
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        // Twice on one connection: the first response's framing must not desync the second.
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
        let r = read_response(&mut tcp, &mut buf).await;
        assert_eq!(r.status(), 200, "{r:?}");
        assert_eq!(r.header("content-length"), None, "{r:?}");
        assert_eq!(r.body, b"0123456789abcdef");
    }
    assert_eq!(m.connections.load(Ordering::SeqCst), 2, "a connection framed two ways is not reused");
    let r = proxy.client(&ca, HttpVersion::Http2).get(proxy.url("app.test", "/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"0123456789abcdef");
}

/// A machine that names itself in `Via` and sends a `fly-request-id` of its own when the
/// path says so.
fn own_via_if_asked(head: &str) -> Vec<u8> {
    if head.split(' ').nth(1) == Some("/theirs") {
        b"HTTP/1.1 200 OK\r\nvia: 1.1 cdn\r\nfly-request-id: forged\r\ncontent-length: 2\r\n\r\nok".to_vec()
    } else {
        b"HTTP/1.1 200 OK\r\nx-app: a\r\ncontent-length: 2\r\n\r\nok".to_vec()
    }
}

async fn get_kept_alive(tcp: &mut TcpStream, buf: &mut Vec<u8>, path: &str, version: &str) -> Raw {
    let req = format!("GET {path} HTTP/{version}\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    read_response(tcp, buf).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_response_names_tern_once_in_via_and_carries_one_request_id() {
    let m = RawMachine::start(own_via_if_asked).await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", m.addr, "started")], "")).await;
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    let mut buf = Vec::new();
    let lines = |r: &Raw, name: &str| -> Vec<String> {
        let prefix = format!("{name}:");
        r.head.lines().filter_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().to_owned()).collect()
    };
    // On one connection: HTTP/1.1 twice, then HTTP/1.0 (kept alive, as asked).
    for (version, via) in [("1.1", "1.1 tern"), ("1.1", "1.1 tern"), ("1.0", "1.0 tern")] {
        let r = get_kept_alive(&mut tcp, &mut buf, "/ours", version).await;
        assert_eq!(r.status(), 200, "{r:?}");
        assert_eq!(lines(&r, "via"), [via], "{r:?}");
        let ids = lines(&r, "fly-request-id");
        assert!(ids.len() == 1 && ids[0].len() == 30, "{r:?}");
        let at = |prefix: &str| r.head.lines().position(|l| l.starts_with(prefix));
        let (machines, ours, id) = (at("content-length:"), at("via:"), at("fly-request-id:"));
        assert!(machines < ours && ours.map(|v| v + 1) == id, "tern's fields after the machine's: {r:?}");
        assert_eq!(r.body, b"ok");

        let r = get_kept_alive(&mut tcp, &mut buf, "/theirs", version).await;
        assert_eq!(lines(&r, "via"), [format!("1.1 cdn, {via}")], "{r:?}");
        let ids = lines(&r, "fly-request-id");
        assert!(ids.len() == 1 && ids[0] != "forged" && ids[0].len() == 30, "{r:?}");
    }
    // A chunked request goes to hyper, which writes the head from the map alone.
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    for path in ["/ours", "/theirs"] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let r = read_response(&mut tcp, &mut buf).await;
        assert_eq!(r.status(), 200, "{r:?}");
        assert_eq!(lines(&r, "via").len(), 1, "{r:?}");
        assert_eq!(lines(&r, "fly-request-id").len(), 1, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_the_clients_fault() {
    let b = Backend::start("m1").await;
    let decl = app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "idle_timeout = \"300ms\"");
    let proxy = Proxy::start(&decl).await;
    let bodies: [&[u8]; 5] = [
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"100000000000000005\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello, and more than five\r\n0\r\n\r\n",
        b"5\r\nhello0\r\n\r\n",
    ];
    for body in bodies {
        let mut req =
            b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        req.extend_from_slice(body);
        let shown = String::from_utf8_lossy(body);
        let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
        tcp.write_all(&req).await.unwrap();
        let r = read_response(&mut tcp, &mut Vec::new()).await;
        assert_eq!(r.status(), 400, "{shown:?}: {r:?}");
        assert_eq!(r.header("tern-error"), Some("bad_body"), "{shown:?}: {r:?}");
        // The client's framing cannot be trusted any more: the connection closes.
        let rest = read_all(&mut tcp).await;
        assert!(rest.is_empty(), "{shown:?}: {:?}", String::from_utf8_lossy(&rest));
    }
    // A chunk of 2^64 - 1 bytes parses (hyper refuses only sizes that overflow 64 bits), so
    // the client owes the rest of it: once it has been silent for idle_timeout, that is its
    // fault too, not the app's.
    let r = one_response(
        proxy.http,
        b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), 408, "{r:?}");
    assert_eq!(r.header("tern-error"), Some("body_timeout"));
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "tern_errors_total{code=\"bad_body\"}"), 5.0, "{m}");
    assert_eq!(metric(&m, "tern_requests_total{app=\"app\",class=\"4xx\"}"), 6.0, "{m}");
    assert_eq!(metric(&m, "tern_errors_total{code=\"upstream_error\"}"), 0.0, "{m}");
    assert_eq!(metric(&m, "tern_errors_total{code=\"upstream_timeout\"}"), 0.0, "{m}");
    // The machine is fine: a good request after all that is answered.
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(b"POST /upload HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut tcp, &mut Vec::new()).await;
    assert_eq!((r.status(), r.body.as_slice()), (200, &b"5"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_with_a_code() {
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "")).await;
    let r = one_response(proxy.http, b"CONNECT app.test:443 HTTP/1.1\r\nHost: app.test:443\r\n\r\n").await;
    assert_eq!(r.status(), 405, "{r:?}");
    assert_eq!(r.header("tern-error"), Some("method_not_allowed"), "{r:?}");
    assert!(r.header("allow").is_some_and(|a| a.contains("GET") && !a.contains("CONNECT")), "{r:?}");
    // Over HTTP/2 too.
    let tcp = TcpStream::connect(proxy.http).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder().method("CONNECT").uri("app.test:443").body(()).unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["tern-error"], "method_not_allowed");
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
}

/// A 200 whose head is far larger than any client accepts.
fn huge_head(_: &str) -> Vec<u8> {
    let mut r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-big: ".to_vec();
    r.extend(std::iter::repeat_n(b'x', 200 * 1024));
    r.extend_from_slice(b"\r\n\r\nok");
    r
}

/// A 200 with a 60 KB header, within a 64 KiB limit.
fn near_limit(_: &str) -> Vec<u8> {
    let mut r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-big: ".to_vec();
    r.extend(std::iter::repeat_n(b'x', 60 * 1000));
    r.extend_from_slice(b"\r\n\r\nok");
    r
}

/// A 200 with its length, then `count` fields `x-r{i}: answer {i}`, and the body `ok`.
fn with_fields(count: usize) -> Vec<u8> {
    let mut r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n".to_vec();
    for i in 0..count {
        r.extend_from_slice(format!("x-r{i}: answer {i}\r\n").as_bytes());
    }
    r.extend_from_slice(b"\r\nok");
    r
}

/// A 200 with 300 small header fields, 6 KB in all.
fn many_fields(_: &str) -> Vec<u8> {
    with_fields(300)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_heads_are_capped() {
    let big = RawMachine::start(huge_head).await;
    let many = RawMachine::start(many_fields).await;
    let near = RawMachine::start(near_limit).await;
    let decl = app_decl("big", &["big.test"], &[("b1", big.addr, "started")], "")
        + &app_decl("many", &["many.test"], &[("m1", many.addr, "started")], "")
        + &app_decl("near", &["near.test"], &[("n1", near.addr, "started")], "");
    let proxy = Proxy::start_with(&decl, "[limits]\nmax_response_header_bytes = 65536\n").await;
    let resp = exchange(proxy.http, b"GET / HTTP/1.1\r\nHost: big.test\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{}", &resp[..resp.len().min(300)]);
    assert!(resp.contains("tern-error: response_headers_too_large"), "{}", &resp[..resp.len().min(300)]);
    assert!(resp.len() < 4096, "the big head never reaches the client");
    // More than 100 fields, as HAProxy also refuses by default.
    let r = one_response(proxy.http, b"GET / HTTP/1.1\r\nHost: many.test\r\n\r\n").await;
    assert_eq!(r.status(), 502, "{r:?}");
    assert_eq!(r.header("tern-error"), Some("response_headers_too_large"));
    // Just under the limit passes whole.
    let r = one_response(proxy.http, b"GET / HTTP/1.1\r\nHost: near.test\r\n\r\n").await;
    assert_eq!(r.status(), 200, "{}", r.head.len());
    assert_eq!(r.header("x-big").map(str::len), Some(60 * 1000));
}

/// A 200 with 60 header fields, more than tern's parsers place inline (24).
fn sixty_fields(_: &str) -> Vec<u8> {
    with_fields(60)
}

/// Heads with more fields than are placed inline (tern's own server and exchange keep the
/// places of up to 24 on the stack, more in a vector) cross whole, both ways, keep-alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_of_many_fields_cross_whole_both_ways() {
    let m = RawMachine::start(sixty_fields).await;
    let proxy = Proxy::start(&app_decl("many", &["many.test"], &[("m1", m.addr, "started")], "")).await;
    let fields: String = (0..60).map(|i| format!("X-Q{i}: question {i}\r\n")).collect();
    let head = format!("GET /many HTTP/1.1\r\nHost: many.test\r\n{fields}\r\n");
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    for round in 0..2 {
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let r = read_response(&mut tcp, &mut buf).await;
        assert_eq!((r.status(), &r.body[..]), (200, &b"ok"[..]), "round {round}: {r:?}");
        for i in 0..60 {
            assert_eq!(r.header(&format!("x-r{i}")), Some(format!("answer {i}").as_str()), "round {round}");
        }
        let sent = &m.heads()[round];
        for i in 0..60 {
            assert!(
                sent.contains(&format!("\r\nx-q{i}: question {i}\r\n")),
                "round {round}, field {i}: {sent}"
            );
        }
    }
    assert_eq!(m.heads().len(), 2);
}

/// A machine whose body, sent after its head, is exactly hyper's own refusal.
async fn body_shaped_like_a_refusal(tcp: TcpStream) {
    let mut tcp = tcp;
    let mut buf = [0u8; 4096];
    let _ = tcp.read(&mut buf).await;
    let body = "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\
                date: Sun, 29 Nov 2026 16:51:12 GMT\r\n\r\n";
    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.flush().await.unwrap();
    // Long enough for tern to have flushed the head on its own.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tcp.write_all(body.as_bytes()).await.unwrap();
    let _ = tcp.read(&mut buf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_shaped_like_a_parser_refusal_is_passed_on_untouched() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let machine = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(body_shaped_like_a_refusal(tcp));
        }
    });
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", addr, "started")], "")).await;
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let r = read_response(&mut tcp, &mut Vec::new()).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.body.starts_with(b"HTTP/1.1 400 Bad Request\r\nconnection: close"),
        "{:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.header("tern-error"), None);
    let m = proxy.metrics().await;
    assert_eq!(metric(&m, "tern_errors_total{code=\"bad_request\"}"), 0.0, "no refusal was made");
    machine.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_carries_a_code_even_those_the_parser_makes() {
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "")).await;
    let fields: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            format!("GET / HTTP/1.1\r\nHost: app.test\r\n{fields}\r\n").into_bytes(),
            "431",
            "headers_too_large",
        ),
        (
            format!("GET /{} HTTP/1.1\r\nHost: app.test\r\n\r\n", "a".repeat(70_000)).into_bytes(),
            "414",
            "uri_too_long",
        ),
        (b"GET / HTTP/1.1\r\nHo st: app.test\r\n\r\n".to_vec(), "400", "bad_request"),
        (b"GET / HTTP/9.9\r\nHost: app.test\r\n\r\n".to_vec(), "400", "bad_request"),
        (b"G\x01T / HTTP/1.1\r\nHost: app.test\r\n\r\n".to_vec(), "400", "bad_request"),
        (
            b"GET / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"
                .to_vec(),
            "400",
            "bad_request",
        ),
    ];
    for (req, status, code) in &cases {
        let resp = exchange(proxy.http, req).await;
        let shown = String::from_utf8_lossy(&req[..req.len().min(60)]).into_owned();
        assert!(resp.starts_with(&format!("HTTP/1.1 {status}")), "{shown:?}: {resp}");
        assert!(resp.contains(&format!("tern-error: {code}")), "{shown:?}: {resp}");
        assert!(resp.contains("fly-request-id: "), "{shown:?}: {resp}");
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
    // The same on a connection that has served a request already.
    for (req, status, code) in &cases {
        let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
        tcp.write_all(b"GET /id HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        assert_eq!(read_response(&mut tcp, &mut buf).await.status(), 200);
        tcp.write_all(req).await.unwrap();
        let r = read_response(&mut tcp, &mut buf).await;
        assert_eq!(r.status().to_string(), *status, "{r:?}");
        assert_eq!(r.header("tern-error"), Some(*code), "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_pass_both_ways() {
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "")).await;
    let request = |te: &str| {
        format!(
            "POST /trailers HTTP/1.1\r\nHost: app.test\r\n{te}Trailer: x-sum\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\nx-sum: 42\r\n\r\n"
        )
    };
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(request("TE: trailers\r\n").as_bytes()).await.unwrap();
    let r = read_response(&mut tcp, &mut Vec::new()).await;
    assert_eq!(r.status(), 200, "{r:?}");
    assert_eq!(String::from_utf8_lossy(&r.body), "x-sum=42", "the machine got the request's trailers");
    assert_eq!(r.trailers, "x-checksum: 5\n", "the client asked for trailers and got them: {r:?}");

    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(request("").as_bytes()).await.unwrap();
    let r = read_response(&mut tcp, &mut Vec::new()).await;
    assert_eq!(String::from_utf8_lossy(&r.body), "x-sum=42");
    assert_eq!(r.trailers, "", "no TE: trailers, no trailers: {r:?}");
}

fn unauthorized(_: &str) -> Vec<u8> {
    b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 6\r\n\r\nno way".to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_reflects_the_machine() {
    let b = Backend::start("m1").await;
    let refuses = RawMachine::start(unauthorized).await;
    let decl = app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "")
        + &app_decl("strict", &["strict.test"], &[("s1", refuses.addr, "started")], "")
        + &app_decl("asleep", &["asleep.test"], &[("z1", crate::harness::dead_addr(), "stopped")], "");
    let proxy = Proxy::start(&decl).await;
    let head = |host: &str| {
        format!("POST /upload HTTP/1.1\r\nHost: {host}\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    };

    // A machine that wants the body: its 100 comes through, then its answer.
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(head("app.test").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let r = read_response(&mut tcp, &mut buf).await;
    assert_eq!(r.status(), 100, "{r:?}");
    tcp.write_all(b"hello").await.unwrap();
    let r = read_response(&mut tcp, &mut buf).await;
    assert_eq!((r.status(), r.body.as_slice()), (200, &b"5"[..]));

    // A machine that refuses at once: its refusal, and no 100 from tern before it.
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(head("strict.test").as_bytes()).await.unwrap();
    let r = read_response(&mut tcp, &mut Vec::new()).await;
    assert_eq!(r.status(), 401, "{r:?}");
    assert_eq!(r.body, b"no way");

    // tern's own refusal, before any body was asked for.
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(head("asleep.test").as_bytes()).await.unwrap();
    let r = read_response(&mut tcp, &mut Vec::new()).await;
    assert_eq!(r.status(), 503, "{r:?}");
    assert_eq!(r.header("tern-error"), Some("no_machine"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_on_an_upgrade_or_an_empty_body_holds_nothing_back() {
    let m = RawMachine::start(upgrade_if_asked).await;
    let b = Backend::start("b1").await;
    let decl = app_decl("app", &["app.test"], &[("m1", m.addr, "started")], "")
        + &app_decl("empty", &["empty.test"], &[("b1", b.addr, "started")], "");
    let proxy = Proxy::start(&decl).await;
    // An upgrade with Expect and a body: the body goes with the upgrade, not held for a 100
    // that will never come.
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\
          Expect: 100-continue\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let mut r = read_response(&mut tcp, &mut buf).await;
    if r.status() == 100 {
        // tern read the body the client sent along, and hyper said so.
        r = read_response(&mut tcp, &mut buf).await;
    }
    assert_eq!(r.status(), 101, "{r:?}");
    assert!(!m.heads()[0].contains("expect"), "{:?}", m.heads());
    tcp.write_all(b"through").await.unwrap();
    let arrived =
        eventually(LIMIT, || async { (m.after_upgrade.lock().as_slice() == b"hellothrough").then_some(()) })
            .await;
    assert!(arrived.is_some(), "{:?}", String::from_utf8_lossy(&m.after_upgrade.lock()));
    // The client leaves: the exchange ends and the machine is idle again.
    drop(tcp);
    let idle = eventually(LIMIT, || async {
        let v: serde_json::Value =
            reqwest::get(format!("http://{}/v1/apps/app", proxy.admin)).await.ok()?.json().await.ok()?;
        (v["machines"][0]["in_flight"] == 0).then_some(())
    })
    .await;
    assert!(idle.is_some(), "the upgraded exchange never ended");

    // Expect with an empty body: nothing to wait for, and the machine connection is reused.
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    let mut buf = Vec::new();
    for _ in 0..2 {
        tcp.write_all(
            b"POST /upload HTTP/1.1\r\nHost: empty.test\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
        )
        .await
        .unwrap();
        let r = read_response(&mut tcp, &mut buf).await;
        assert_eq!((r.status(), r.body.as_slice()), (200, &b"0"[..]), "{r:?}");
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 1, "the machine connection was kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_silent_after_the_whole_body_is_the_machines_fault() {
    let b = Backend::start("m1").await;
    let decl = app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "idle_timeout = \"300ms\"");
    let proxy = Proxy::start(&decl).await;
    for req in [
        &b"POST /hang HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello"[..],
        b"POST /hang HTTP/1.1\r\nHost: app.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let r = one_response(proxy.http, req).await;
        assert_eq!(r.status(), 504, "{r:?}");
        assert_eq!(r.header("tern-error"), Some("upstream_timeout"));
    }
}

/// A TLS connection to the proxy offering exactly `alpn`.
async fn tls_with_alpn(ca: &Ca, proxy: &Proxy, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ca.client_config(alpn)));
    let tcp = TcpStream::connect(proxy.https).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("app.test").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

async fn read_all<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(LIMIT, s.read_to_end(&mut out)).await.expect("the proxy never closed");
    out
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_speaks_exactly_the_protocol_alpn_chose() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let decl = app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "")
        + &ca.decl("app.test", &["app.test"]);
    let proxy = Proxy::start(&decl).await;

    // ALPN h2, then HTTP/1.1: no HTTP/1.1 answer; at most HTTP/2 frames (a GOAWAY).
    let mut tls = tls_with_alpn(&ca, &proxy, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls.write_all(b"GET /id HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let got = read_all(&mut tls).await;
    assert!(!got.starts_with(b"HTTP/"), "{:?}", String::from_utf8_lossy(&got));
    // ALPN http/1.1, or no ALPN at all, then the HTTP/2 preface: not served as HTTP/2.
    for alpn in [&[&b"http/1.1"[..]][..], &[]] {
        let mut tls = tls_with_alpn(&ca, &proxy, alpn).await;
        tls.write_all(H2_PREFACE).await.unwrap();
        let got = read_all(&mut tls).await;
        let h2_settings = got.len() >= 9 && got[3] == 0x04;
        assert!(!h2_settings, "{alpn:?}: answered as HTTP/2: {got:?}");
    }
    assert_eq!(b.requests.load(Ordering::SeqCst), 0);
    // And what was negotiated works.
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        let r = proxy.client(&ca, version).get(proxy.tls_url("app.test", "/id")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// A real ClientHello for `sni`, grown by a padding extension to `size` bytes of handshake
/// message, split into records of `record` bytes.
fn client_hello(ca: &Ca, sni: &str, size: usize, record: usize) -> Vec<u8> {
    let config = Arc::new(ca.client_config(&[b"http/1.1"]));
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut wire = Vec::new();
    conn.write_tls(&mut wire).unwrap();
    // One record holding one handshake message: the ClientHello.
    let mut hello = wire[5..].to_vec();
    assert_eq!(hello[0], 1, "a ClientHello");
    // Body: version (2), random (32), session id, cipher suites, compression, extensions.
    let mut at = 4 + 2 + 32;
    at += 1 + hello[at] as usize;
    at += 2 + u16::from_be_bytes([hello[at], hello[at + 1]]) as usize;
    at += 1 + hello[at] as usize;
    let ext_len_at = at;
    let grow = size - hello.len();
    assert!(grow >= 4);
    let pad = grow - 4;
    hello.extend_from_slice(&[0x00, 0x15]);
    hello.extend_from_slice(&u16::try_from(pad).unwrap().to_be_bytes());
    hello.extend(std::iter::repeat_n(0u8, pad));
    let ext_len = u16::from_be_bytes([hello[ext_len_at], hello[ext_len_at + 1]]) as usize + grow;
    hello[ext_len_at..ext_len_at + 2].copy_from_slice(&u16::try_from(ext_len).unwrap().to_be_bytes());
    let body_len = hello.len() - 4;
    hello[1..4].copy_from_slice(&u32::try_from(body_len).unwrap().to_be_bytes()[1..]);
    let mut out = Vec::new();
    for chunk in hello.chunks(record) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// Reads TLS records until one arrives or the proxy closes; returns the first record's
/// content type and payload.
async fn first_record(tcp: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    tokio::time::timeout(LIMIT, tcp.read_exact(&mut head)).await.expect("no answer in time").ok()?;
    let len = u16::from_be_bytes([head[3], head[4]]) as usize;
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.ok()?;
    Some((head[0], payload))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_end_with_an_alert_and_big_hellos_are_read() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let decl = app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "")
        + &ca.decl("app.test", &["app.test"]);
    let proxy = Proxy::start(&decl).await;
    let cases: [(&str, Vec<u8>); 3] = [
        ("a truncated ClientHello", vec![0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0xff]),
        ("HTTP on the TLS port", b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n".to_vec()),
        ("a record too long for TLS", {
            let mut r = vec![0x16, 0x03, 0x01, 0x48, 0x01];
            r.extend(std::iter::repeat_n(0u8, 0x4801));
            r
        }),
    ];
    for (what, bytes) in cases {
        let mut tcp = TcpStream::connect(proxy.https).await.unwrap();
        tcp.write_all(&bytes).await.unwrap();
        let record = first_record(&mut tcp).await;
        let Some((kind, payload)) = record else { panic!("{what}: closed without an alert") };
        assert_eq!(kind, 0x15, "{what}: an alert record");
        assert_eq!(payload[0], 2, "{what}: a fatal alert: {payload:?}");
    }
    // A ClientHello of almost 64 KiB (post-quantum key shares and big tickets make them
    // grow), whole or in small records, is read like any other: the server answers with its
    // ServerHello.
    for (size, record) in [(65_000, 16 * 1024), (65_000, 512), (65_500, 1024)] {
        let mut tcp = TcpStream::connect(proxy.https).await.unwrap();
        tcp.write_all(&client_hello(&ca, "app.test", size, record)).await.unwrap();
        let answer = first_record(&mut tcp).await;
        let (kind, payload) = answer.unwrap_or_else(|| panic!("{size} in {record}: no answer"));
        assert_eq!(kind, 0x16, "{size} in {record}: a handshake record, not an alert: {payload:?}");
        assert_eq!(payload[0], 2, "a ServerHello");
    }
    // A whole ClientHello followed, in its own record, by the start of another handshake
    // message: a fatal alert (it once panicked the connection's task instead).
    let mut client = rustls::ClientConnection::new(
        Arc::new(ca.client_config(&[b"http/1.1"])),
        "app.test".try_into().unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    hello.extend_from_slice(&[0x14, 0, 0, 0]);
    let len = u16::from_be_bytes([hello[3], hello[4]]) + 4;
    hello[3..5].copy_from_slice(&len.to_be_bytes());
    let mut tcp = TcpStream::connect(proxy.https).await.unwrap();
    tcp.write_all(&hello).await.unwrap();
    let (kind, payload) = first_record(&mut tcp).await.expect("an alert for bytes after the hello");
    assert_eq!((kind, payload[0]), (0x15, 2), "a fatal alert: {payload:?}");
    // A hello that says it is larger than can be buffered: an alert, not silence.
    let mut tcp = TcpStream::connect(proxy.https).await.unwrap();
    let mut huge = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x01, 0x11, 0x70];
    huge.extend(std::iter::repeat_n(0u8, 0x4000 - 4));
    tcp.write_all(&huge).await.unwrap();
    let (kind, payload) = first_record(&mut tcp).await.expect("an alert for an oversized hello");
    assert_eq!((kind, payload[0]), (0x15, 2), "a fatal alert: {payload:?}");
}

/// `tern_connections_parked_total`, once it is at least `at_least`.
async fn parked_at_least(proxy: &Proxy, at_least: f64) -> f64 {
    eventually(LIMIT, || async {
        let n = metric(&proxy.metrics().await, "tern_connections_parked_total");
        (n >= at_least).then_some(n)
    })
    .await
    .expect("the connection was never parked")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_serves_its_next_requests_pipelined_or_not() {
    let m = RawMachine::start(ok_plain).await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", m.addr, "started")], "")).await;
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    let mut buf = Vec::new();
    let get = "GET /one HTTP/1.1\r\nHost: app.test\r\n\r\n";
    tcp.write_all(get.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut tcp, &mut buf).await.status(), 200);
    // Quiet for a second: hyper's state for it is freed, the socket kept.
    parked_at_least(&proxy, 1.0).await;
    let pair = "GET /two HTTP/1.1\r\nHost: app.test\r\n\r\nGET /three HTTP/1.1\r\nHost: app.test\r\n\r\n";
    tcp.write_all(pair.as_bytes()).await.unwrap();
    for _ in 0..2 {
        let r = read_response(&mut tcp, &mut buf).await;
        assert_eq!((r.status(), r.body.as_slice()), (200, b"plain".as_slice()));
    }
    parked_at_least(&proxy, 2.0).await;
    tcp.write_all(get.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut tcp, &mut buf).await.status(), 200);
    let paths: Vec<String> =
        m.heads().iter().map(|h| h.split(' ').nth(1).unwrap_or_default().to_string()).collect();
    assert_eq!(paths, ["/one", "/two", "/three", "/one"], "each request reached the machine once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_cut_off_by_a_park_is_read_whole_when_the_rest_arrives() {
    let m = RawMachine::start(ok_plain).await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", m.addr, "started")], "")).await;
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    let mut buf = Vec::new();
    tcp.write_all(b"GET /first HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut tcp, &mut buf).await.status(), 200);
    parked_at_least(&proxy, 1.0).await;
    // Half a head, then quiet until the connection is parked again with it half read.
    tcp.write_all(b"GET /split HTTP/1.1\r\nHo").await.unwrap();
    parked_at_least(&proxy, 2.0).await;
    tcp.write_all(b"st: app.test\r\nX-Rest: here\r\n\r\n").await.unwrap();
    let r = read_response(&mut tcp, &mut buf).await;
    assert_eq!(r.status(), 200, "{}", r.head);
    let last = m.heads().last().cloned().unwrap();
    assert!(last.starts_with("get /split http/1.1") && last.contains("x-rest: here"), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_still_closes_at_the_keep_alive_timeout() {
    let m = RawMachine::start(ok_plain).await;
    let decl = app_decl("app", &["app.test"], &[("m1", m.addr, "started")], "");
    let proxy = Proxy::start_with(&decl, "[limits]\nkeepalive_timeout = \"2s\"\n").await;
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut tcp, &mut buf).await.status(), 200);
    parked_at_least(&proxy, 1.0).await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(LIMIT, tcp.read_to_end(&mut rest)).await.expect("never closed").unwrap();
    assert_eq!(n, 0, "closed without another byte: {:?}", String::from_utf8_lossy(&rest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_tls_connection_serves_its_next_request() {
    let ca = Ca::new();
    let m = RawMachine::start(ok_plain).await;
    let decl = app_decl("app", &["app.test"], &[("m1", m.addr, "started")], "")
        + &ca.decl("app.test", &["app.test"]);
    let proxy = Proxy::start(&decl).await;
    let mut tls = tls_with_alpn(&ca, &proxy, &[b"http/1.1"]).await;
    let mut buf = Vec::new();
    let get = b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n";
    tls.write_all(get).await.unwrap();
    assert_eq!(read_response(&mut tls, &mut buf).await.status(), 200);
    parked_at_least(&proxy, 1.0).await;
    // With no task of its own: in its worker's lot, its TLS state with it.
    in_the_lot(&proxy, 1.0).await;
    tls.write_all(get).await.unwrap();
    let r = read_response(&mut tls, &mut buf).await;
    assert_eq!((r.status(), r.body.as_slice()), (200, b"plain".as_slice()));
    assert_eq!(m.heads().len(), 2);
    // Parked again after its second request, and served again.
    in_the_lot(&proxy, 1.0).await;
    tls.write_all(get).await.unwrap();
    assert_eq!(read_response(&mut tls, &mut buf).await.status(), 200);
    assert_eq!(m.heads().len(), 3);
}

/// `tern_connections_parked` (connections in the workers' lots), once it is `n`.
async fn in_the_lot(proxy: &Proxy, n: f64) {
    eventually(LIMIT, || async {
        (metric(&proxy.metrics().await, "tern_connections_parked") == n).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("never {n} connections in the lot"));
}

/// A client that half-closes a connection waiting in the lot gets it closed, with nothing
/// more written, and the lot lets it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_closing_a_connection_in_the_lot_ends_it() {
    let m = RawMachine::start(ok_plain).await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", m.addr, "started")], "")).await;
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    let mut buf = Vec::new();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut tcp, &mut buf).await.status(), 200);
    in_the_lot(&proxy, 1.0).await;
    tcp.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(LIMIT, tcp.read_to_end(&mut rest)).await.expect("never closed").unwrap();
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&rest));
    in_the_lot(&proxy, 0.0).await;
    assert_eq!(m.heads().len(), 1, "nothing more reached the machine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_connection_closed_in_the_lot_gets_close_notify() {
    let ca = Ca::new();
    let m = RawMachine::start(ok_plain).await;
    let decl = app_decl("app", &["app.test"], &[("m1", m.addr, "started")], "")
        + &ca.decl("app.test", &["app.test"]);
    let proxy = Proxy::start_with(&decl, "[limits]\nkeepalive_timeout = \"2s\"\n").await;
    let mut tls = tls_with_alpn(&ca, &proxy, &[b"http/1.1"]).await;
    let mut buf = Vec::new();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut tls, &mut buf).await.status(), 200);
    in_the_lot(&proxy, 1.0).await;
    // Closed at the keep-alive limit by the lot: a clean TLS end (rustls's client calls an
    // end without close_notify an error), nothing more.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(LIMIT, tls.read_to_end(&mut rest)).await.expect("never closed");
    assert_eq!(read.expect("an end without close_notify"), 0, "{:?}", String::from_utf8_lossy(&rest));
    in_the_lot(&proxy, 0.0).await;
}

/// One HTTP/2 frame: length, type, flags, stream id, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = u32::try_from(payload.len()).unwrap().to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Trailers may not carry pseudo-headers (RFC 9113 §8.1). The h2 crate hyper uses drops
/// them from a trailer block before tern sees it (it does not reset the stream, as the RFC
/// asks of a malformed request, and tern cannot), so what holds is that none reaches the
/// machine: its trailers arrive without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pseudo_headers_in_h2_trailers_never_reach_the_machine() {
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "")).await;
    // HPACK by hand: :method POST (static 3), :scheme http (6), :path (name 4) and
    // :authority (name 1) as literals with incremental indexing.
    let mut head = vec![0x83, 0x86, 0x44, 0x09];
    head.extend_from_slice(b"/trailers");
    head.extend_from_slice(&[0x41, 0x08]);
    head.extend_from_slice(b"app.test");
    // trailer: x-sum, announcing it (an HTTP/1.1 machine is sent the trailers announced).
    head.extend_from_slice(&[0x40, 0x07]);
    head.extend_from_slice(b"trailer");
    head.extend_from_slice(&[0x05]);
    head.extend_from_slice(b"x-sum");
    // Trailers: :path / (static 4), then x-sum: 42 as a literal with a new name.
    let mut trailers = vec![0x84, 0x40, 0x05];
    trailers.extend_from_slice(b"x-sum");
    trailers.extend_from_slice(&[0x02]);
    trailers.extend_from_slice(b"42");
    let mut wire = H2_PREFACE.to_vec();
    wire.extend(h2_frame(0x1, 0x4, 1, &head)); // HEADERS, END_HEADERS
    wire.extend(h2_frame(0x0, 0x0, 1, b"hello")); // DATA
    wire.extend(h2_frame(0x1, 0x5, 1, &trailers)); // END_STREAM | END_HEADERS
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(&wire).await.unwrap();
    // The response's DATA on stream 1, up to END_STREAM (or a reset: nothing more comes).
    let mut body = Vec::new();
    loop {
        let mut h = [0u8; 9];
        tokio::time::timeout(LIMIT, tcp.read_exact(&mut h)).await.unwrap().unwrap();
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.unwrap();
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        match (h[3], stream) {
            (0x0, 1) => {
                body.extend_from_slice(&payload);
                if h[4] & 0x1 != 0 {
                    break;
                }
            }
            (0x1, 1) if h[4] & 0x1 != 0 => break,
            (0x3, 1) | (0x7, _) => break,
            _ => {}
        }
    }
    assert_eq!(String::from_utf8_lossy(&body), "x-sum=42", "the machine's trailers: the real one, no :path");
}

/// A machine with two common faults: conflicting lengths on `/bad`, and a body after its
/// answer to `HEAD` (which a proxy that pooled the connection again would take for the next
/// response). Other requests get `next`.
fn framed_badly(head: &str) -> Vec<u8> {
    if head.starts_with("get /bad ") {
        return b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok".to_vec();
    }
    if head.starts_with("head ") {
        return b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain".to_vec();
    }
    b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext".to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_answer_framed_badly_is_a_coded_502_and_nothing_of_it_leaks_into_the_next() {
    let m = RawMachine::start(framed_badly).await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", m.addr, "started")], "")).await;
    let got = one_response(proxy.http, b"GET /bad HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    assert_eq!(got.status(), 502, "{got:?}");
    assert_eq!(got.header("tern-error"), Some("upstream_error"), "{got:?}");
    // Read by hand: a HEAD answer's length does not frame a body (the helper's would).
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(b"HEAD / HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(LIMIT, tcp.read(&mut byte)).await.unwrap().unwrap();
        assert_eq!(n, 1, "the HEAD answer's head ends: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    for _ in 0..3 {
        let got = one_response(proxy.http, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
        assert_eq!((got.status(), &got.body[..]), (200, &b"next"[..]), "{got:?}");
    }
    // Whether the HEAD answer's connection was pooled again is seen in the pool's own test
    // (`upstream::h1::tests`): here the client connections may land on different workers,
    // each with its own pool, so the machine's connection count says nothing.
    assert_eq!(m.heads().len(), 5);
}

/// tern's own server takes plain GET, HEAD and OPTIONS heads and hyper the rest; one write
/// that mixes them is answered in order, each framed as it should be, on one connection:
/// a machine's chunked event stream chunked, a HEAD with the length its GET would have and no
/// body, a POST's body read, and a plain GET after them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_write_of_mixed_requests_is_answered_in_order_on_one_connection() {
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "")).await;
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(
        b"GET /ticks?n=3&gap_ms=1 HTTP/1.1\r\nHost: app.test\r\n\r\n\
          HEAD /download?bytes=10 HTTP/1.1\r\nHost: app.test\r\n\r\n\
          POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n\r\nabc\
          OPTIONS /echo HTTP/1.1\r\nHost: app.test\r\n\r\n\
          GET /id HTTP/1.1\r\nHost: app.test\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let ticks = read_response(&mut tcp, &mut buf).await;
    assert_eq!(ticks.status(), 200, "{ticks:?}");
    assert_eq!(ticks.header("transfer-encoding"), Some("chunked"), "{ticks:?}");
    assert_eq!(String::from_utf8_lossy(&ticks.body), "data: tick 0\n\ndata: tick 1\n\ndata: tick 2\n\n");
    // A HEAD answer is its head alone: whatever follows it is the next response.
    let mut head = Vec::new();
    loop {
        let line = read_line(&mut tcp, &mut buf).await;
        if line.is_empty() {
            break;
        }
        head.push(line.to_ascii_lowercase());
    }
    assert!(
        head[0].starts_with("http/1.1 200") && head.contains(&"content-length: 10".to_string()),
        "{head:?}"
    );
    let post = read_response(&mut tcp, &mut buf).await;
    let v: serde_json::Value = serde_json::from_slice(&post.body).unwrap();
    assert_eq!((v["method"].as_str(), v["body"].as_str()), (Some("POST"), Some("abc")), "{post:?}");
    let options = read_response(&mut tcp, &mut buf).await;
    let v: serde_json::Value = serde_json::from_slice(&options.body).unwrap();
    assert_eq!(v["method"].as_str(), Some("OPTIONS"), "{options:?}");
    let id = read_response(&mut tcp, &mut buf).await;
    assert_eq!((id.status(), id.body.as_slice()), (200, b"m1".as_slice()), "{id:?}");
    assert!(id.header("date").is_some() && id.header("fly-request-id").is_some(), "{id:?}");
    // And the connection still serves.
    tcp.write_all(b"GET /id HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut tcp, &mut buf).await.body, b"m1");
}

/// Browsers send `Connection: keep-alive` and many libraries `Connection: close`, with
/// requests tern's own server takes. The first keeps the connection; the second is answered
/// with `connection: close` and ends it there: a request written after it goes unanswered.
/// The machine never sees the client's `Connection`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_keep_alive_keeps_the_connection_and_close_ends_it_after_its_answer() {
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "")).await;
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(
        b"GET /echo HTTP/1.1\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n\
          GET /id HTTP/1.1\r\nHost: app.test\r\nConnection: keep-alive\r\n\r\n\
          GET /echo HTTP/1.1\r\nHost: app.test\r\nConnection: Close\r\n\r\n\
          GET /id HTTP/1.1\r\nHost: app.test\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let echo = read_response(&mut tcp, &mut buf).await;
    assert_eq!((echo.status(), echo.header("connection")), (200, None), "{echo:?}");
    let v: serde_json::Value = serde_json::from_slice(&echo.body).unwrap();
    assert!(v["headers"].get("connection").is_none(), "the machine got {v}");
    let id = read_response(&mut tcp, &mut buf).await;
    assert_eq!((id.status(), id.body.as_slice()), (200, b"m1".as_slice()), "{id:?}");
    let last = read_response(&mut tcp, &mut buf).await;
    assert_eq!((last.status(), last.header("connection")), (200, Some("close")), "{last:?}");
    let v: serde_json::Value = serde_json::from_slice(&last.body).unwrap();
    assert!(v["headers"].get("connection").is_none(), "the machine got {v}");
    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, tcp.read_to_end(&mut rest)).await.expect("closed in time").unwrap();
    assert!(buf.is_empty() && rest.is_empty(), "after close: {:?}", String::from_utf8_lossy(&rest));
}

/// A client that leaves while its plain GET's event stream is open ends the exchange: the
/// machine is idle again, as when hyper served it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_an_open_stream_ends_its_exchange() {
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "")).await;
    let in_flight = |n: i64| {
        let admin = proxy.admin;
        async move {
            eventually(LIMIT, || async {
                let v: serde_json::Value =
                    reqwest::get(format!("http://{admin}/v1/apps/app")).await.ok()?.json().await.ok()?;
                (v["machines"][0]["in_flight"] == n).then_some(())
            })
            .await
        }
    };
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(b"GET /silent HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let mut head = String::new();
    while !head.contains("\r\n\r\n") {
        fill(&mut tcp, &mut buf).await;
        head = String::from_utf8_lossy(&buf).into_owned();
    }
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("transfer-encoding: chunked"), "{head}");
    assert!(in_flight(1).await.is_some(), "the stream is in flight");
    drop(tcp);
    assert!(in_flight(0).await.is_some(), "the exchange never ended");
}

/// Requests with a plain `Content-Length` body (what API and MCP clients send) are served by
/// tern's own server and exchange: pipelined with others, with their body written apart
/// from their head, with a length of 0, or larger than tern reads whole (hyper's then). Each
/// reaches the machine with its method, its exact body and its length, and the connection
/// goes on. Which server took them cannot be seen here (hyper would pass this too); that a
/// small POST takes tern's path is what `tests/allocs.rs` counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_with_a_length_reach_the_machine_whole_pipelined_or_written_apart() {
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "")).await;
    let mut tcp = TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(
        b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n{\"id\":1,\"x\":2}\
          PUT /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 0\r\n\r\n\
          DELETE /echo HTTP/1.1\r\nHost: app.test\r\ncontent-length: 3\r\n\r\nabc",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    for (method, body, length) in
        [("POST", "{\"id\":1,\"x\":2}", "14"), ("PUT", "", "0"), ("DELETE", "abc", "3")]
    {
        let r = read_response(&mut tcp, &mut buf).await;
        assert_eq!(r.status(), 200, "{r:?}");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!((v["method"].as_str(), v["body"].as_str()), (Some(method), Some(body)), "{v}");
        assert_eq!(v["headers"]["content-length"], serde_json::json!([length]), "{v}");
    }
    // The head in one write, its body in another: the body is waited for, not taken for the
    // next request's head.
    tcp.write_all(b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 6\r\n\r\n").await.unwrap();
    tcp.flush().await.unwrap();
    tcp.write_all(b"world!").await.unwrap();
    let r = read_response(&mut tcp, &mut buf).await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((v["method"].as_str(), v["body"].as_str()), (Some("POST"), Some("world!")), "{v}");
    // Over what tern reads whole: streamed, counted by the machine.
    let big = vec![b'x'; 70_000];
    let mut req = b"POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: 70000\r\n\r\n".to_vec();
    req.extend_from_slice(&big);
    req.extend_from_slice(b"GET /id HTTP/1.1\r\nHost: app.test\r\n\r\n");
    tcp.write_all(&req).await.unwrap();
    let r = read_response(&mut tcp, &mut buf).await;
    assert_eq!((r.status(), r.body.as_slice()), (200, b"70000".as_slice()), "{r:?}");
    let r = read_response(&mut tcp, &mut buf).await;
    assert_eq!((r.status(), r.body.as_slice()), (200, b"m1".as_slice()), "{r:?}");
}
