//! TCP services on `kind = "tcp"` listeners: raw relays with half-close, TLS passthrough by
//! SNI, TLS terminated then relayed, PROXY v2 toward the machine, HTTP for one app, waking
//! and autostop counting open connections, and connections that match no service.
//!
//! Each tcp listener has a loopback address of its own and a reserved port, since services
//! are declared by the port they are reached on. The addresses are in 127.0.1.0/24, which no
//! test uses as a client's source: the port is reserved on 127.0.0.1 only, and a client's
//! connection from the listener's address in TIME_WAIT on that port would refuse the bind
//! (the fleet test's clients come from 127.0.0.9, with a thousand ephemeral ports).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{Ca, Proxy, eventually, reserve_port};
use crate::lifecycle::{machine, until_machine};
use crate::wake::metric;

fn tcp_listener(ip: &str, port: u16) -> String {
    format!("[[listen]]\naddr = \"{ip}:{port}\"\nkind = \"tcp\"\n\n")
}

/// An app with one service: public `port` → the machines' `internal_port`.
fn service_app(name: &str, extra: &str, internal_port: u16, port: u16, handlers: &str) -> String {
    format!(
        "[[apps]]\nname = \"{name}\"\nhostnames = [\"{name}.test\"]\n{extra}\n\
         [[apps.services]]\ninternal_port = {internal_port}\n\
         [[apps.services.ports]]\nport = {port}\nhandlers = [{handlers}]\n\n"
    )
}

fn started(app: &str, id: &str, addr: SocketAddr) -> String {
    format!("[[machines]]\nid = \"{id}\"\napp = \"{app}\"\naddr = \"{addr}\"\nstate = \"started\"\n\n")
}

/// A machine that echoes what it reads; when the client half-closes, it answers `bye`
/// and closes its side too. What it reads is also sent to `first`, if given.
async fn echo_machine(first: Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let first = first.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if let Some(tx) = &first {
                        let _ = tx.send(buf[..n].to_vec());
                    }
                    if n == 0 {
                        let _ = s.write_all(b"bye\n").await;
                        let _ = s.shutdown().await;
                        return;
                    }
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A machine that speaks TLS itself, with a certificate for `name`: it answers `name`.
async fn tls_machine(ca: &Ca, name: &'static str) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(ca.server_config(&[name])));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = tls.write_all(name.as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    addr
}

async fn connect_tls(
    ca: &Ca,
    to: SocketAddr,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ca.client_config(&[])));
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    connector.connect(name, TcpStream::connect(to).await?).await
}

async fn read_all<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes `bytes`, half-closes, and reads until the other side closes.
async fn send_and_half_close<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> String {
    s.write_all(bytes).await.unwrap();
    s.shutdown().await.unwrap();
    read_all(s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_service_relays_both_ways_and_passes_a_half_close_on() {
    let (port, other) = (reserve_port(), reserve_port());
    let m = echo_machine(None).await;
    let decl = service_app("db", "addrs = [\"127.0.1.5\"]", m.port(), port, "") + &started("db", "db-1", m);
    let listeners = tcp_listener("127.0.1.5", port) + &tcp_listener("127.0.1.6", other);
    let proxy = Proxy::start_with(&decl, &listeners).await;

    // Many round trips on one connection, then a half-close: the machine still answers.
    let mut s = TcpStream::connect(("127.0.1.5", port)).await.unwrap();
    let mut buf = [0u8; 5];
    for i in 0..50 {
        let msg = format!("m{i:03}\n");
        s.write_all(msg.as_bytes()).await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, msg.as_bytes());
    }
    assert_eq!(send_and_half_close(&mut s, b"last\n").await, "last\nbye\n");

    // A megabyte each way, written before anything is read back: back-pressure, no loss.
    let mut s = TcpStream::connect(("127.0.1.5", port)).await.unwrap();
    let big: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let (mut rx, mut tx) = s.split();
    let (_, got) = tokio::join!(
        async {
            tx.write_all(&big).await.unwrap();
            tx.shutdown().await.unwrap();
        },
        async {
            let mut out = Vec::new();
            rx.read_to_end(&mut out).await.unwrap();
            out
        }
    );
    assert_eq!(got.len(), big.len() + 4);
    assert!(got[..big.len()] == big[..] && got.ends_with(b"bye\n"));

    // The same port on an address no app has, with no ClientHello to go by: closed.
    let mut s = TcpStream::connect(("127.0.1.6", other)).await.unwrap();
    assert_eq!(send_and_half_close(&mut s, b"hello?\n").await, "");
    let text = proxy.metrics().await;
    assert_eq!(metric(&text, "tern_tcp_refused_total{reason=\"no_service\"}"), 1.0, "{text}");
    assert_eq!(metric(&text, "tern_tcp_relayed_total"), 2.0);
    let v: serde_json::Value =
        reqwest::get(format!("http://{}/v1/apps/db", proxy.admin)).await.unwrap().json().await.unwrap();
    assert_eq!(v["addrs"], serde_json::json!(["127.0.1.5"]));
    assert_eq!(v["services"][0]["ports"][0]["port"], port);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passthrough_by_sni_reaches_two_apps_on_one_address() {
    let ca = Ca::new();
    let port = reserve_port();
    let (a, b) = (tls_machine(&ca, "a.test").await, tls_machine(&ca, "b.test").await);
    // No dedicated addresses: both apps share the listener's, told apart by SNI.
    let decl = service_app("a", "", a.port(), port, "")
        + &started("a", "a-1", a)
        + &service_app("b", "", b.port(), port, "")
        + &started("b", "b-1", b);
    let proxy = Proxy::start_with(&decl, &tcp_listener("127.0.1.7", port)).await;
    let to: SocketAddr = format!("127.0.1.7:{port}").parse().unwrap();

    // The machines' own certificates verify: tern passed the handshake through.
    for (sni, want) in [("a.test", "a.test"), ("b.test", "b.test"), ("A.TEST", "a.test")] {
        let mut s = connect_tls(&ca, to, sni).await.unwrap();
        assert_eq!(read_all(&mut s).await, want, "{sni}");
    }
    // A name no app serves: closed before any handshake answer.
    assert!(connect_tls(&ca, to, "c.test").await.is_err());
    let text = proxy.metrics().await;
    assert_eq!(metric(&text, "tern_tcp_refused_total{reason=\"no_service\"}"), 1.0);
    assert_eq!(metric(&text, "tern_tls_handshakes_total"), 0.0, "tern terminated nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_terminated_then_relayed_and_proxy_v2_toward_the_machine() {
    let ca = Ca::new();
    let (tls_port, pp_port) = (reserve_port(), reserve_port());
    // What the PROXY machine reads, as read.
    let (tx, mut first) = tokio::sync::mpsc::unbounded_channel();
    let (plain, pp) = (echo_machine(None).await, echo_machine(Some(tx)).await);
    let decl = service_app("sec", "addrs = [\"127.0.1.8\"]", plain.port(), tls_port, "\"tls\"")
        + &started("sec", "sec-1", plain)
        + &ca.decl("sec.test", &["sec.test"])
        + &service_app("pp", "addrs = [\"127.0.1.9\"]", pp.port(), pp_port, "\"proxy_proto\"")
        + &started("pp", "pp-1", pp);
    let listeners = tcp_listener("127.0.1.8", tls_port) + &tcp_listener("127.0.1.9", pp_port);
    let proxy = Proxy::start_with(&decl, &listeners).await;

    // TLS with tern's certificate for the name; plaintext reaches the machine.
    let mut s = connect_tls(&ca, format!("127.0.1.8:{tls_port}").parse().unwrap(), "sec.test").await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), None, "no ALPN: the bytes inside are not tern's to read");
    assert_eq!(send_and_half_close(&mut s, b"secret\n").await, "secret\nbye\n");

    // PROXY v2 first, naming the client and the address it reached, byte for byte.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.33:0".parse().unwrap()).unwrap();
    let mut s = socket.connect(format!("127.0.1.9:{pp_port}").parse().unwrap()).await.unwrap();
    let client = s.local_addr().unwrap();
    let mut want = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    want.extend_from_slice(&[127, 0, 0, 33, 127, 0, 1, 9]);
    want.extend_from_slice(&client.port().to_be_bytes());
    want.extend_from_slice(&pp_port.to_be_bytes());
    want.extend_from_slice(b"hi\n");
    // The machine echoes it all, header included.
    s.write_all(b"hi\n").await.unwrap();
    s.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(echoed, [&want[..], b"bye\n"].concat());
    let mut seen = Vec::new();
    while seen.len() < want.len() {
        seen.extend(first.recv().await.unwrap());
    }
    assert_eq!(seen, want);
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_service_serves_its_app_whatever_the_host() {
    let b = crate::backend::Backend::start("web-1").await;
    let port = reserve_port();
    let extra = format!("addrs = [\"127.0.1.12\"]\ninternal_port = {}", b.addr.port());
    let decl = service_app("web", &extra, b.addr.port(), port, "\"http\"") + &started("web", "web-1", b.addr);
    let proxy = Proxy::start_with(&decl, &tcp_listener("127.0.1.12", port)).await;
    let mut s = TcpStream::connect(("127.0.1.12", port)).await.unwrap();
    s.write_all(b"GET /id HTTP/1.1\r\nHost: anything.example\r\nConnection: close\r\n\r\n").await.unwrap();
    let answer = read_all(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("web-1"), "{answer}");
    drop(proxy);
}

/// A keep-alive connection to an HTTP service over TLS waits for its next request with its
/// task (a service's connections are never parked), and gives its TLS buffers back a quiet
/// second after its response, as a parked one would; its next request is served all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_connection_to_an_https_service_gives_its_tls_buffers_back() {
    let ca = Ca::new();
    let b = crate::backend::Backend::start("web-1").await;
    let port = reserve_port();
    let extra = format!("addrs = [\"127.0.1.24\"]\ninternal_port = {}", b.addr.port());
    let decl = service_app("web", &extra, b.addr.port(), port, "\"tls\", \"http\"")
        + &started("web", "web-1", b.addr)
        + &ca.decl("web.test", &["web.test"]);
    let proxy = Proxy::start_with(&decl, &tcp_listener("127.0.1.24", port)).await;
    let sheds = async || metric(&proxy.metrics().await, "tern_tls_buffers_shed_total");
    let mut s = connect_tls(&ca, format!("127.0.1.24:{port}").parse().unwrap(), "web.test").await.unwrap();
    for n in 0..2 {
        s.write_all(b"GET /id HTTP/1.1\r\nHost: web.test\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        while !answer.ends_with(b"web-1") {
            let mut buf = [0; 1024];
            let read =
                tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.unwrap().unwrap();
            assert!(read > 0, "closed after {:?}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..read]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"), "request {n}: {}", String::from_utf8_lossy(&answer));
        if n == 0 {
            eventually(Duration::from_secs(10), || async { (sheds().await >= 1.0).then_some(()) })
                .await
                .expect("the quiet connection kept its TLS buffers");
        }
    }
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_connections_to_a_stopped_service_start_it_once_and_autostop_waits_for_the_last() {
    let (port, mport) = (reserve_port(), reserve_port());
    // The machine is an HTTP server process tern runs; through a raw service it is just TCP.
    let decl = service_app(
        "raw",
        "addrs = [\"127.0.1.13\"]\nauto_stop = \"stop\"\nauto_stop_after = \"1s\"",
        mport,
        port,
        "",
    ) + &machine("raw", "raw-1", mport, "stopped", &["START_DELAY_MS=300"]);
    let proxy = Proxy::start_with(&decl, &tcp_listener("127.0.1.13", port)).await;

    let get = b"GET /id HTTP/1.1\r\nHost: raw\r\nConnection: close\r\n\r\n";
    let clients = (0..100).map(|_| async {
        let mut s = TcpStream::connect(("127.0.1.13", port)).await.unwrap();
        s.write_all(get).await.unwrap();
        read_all(&mut s).await
    });
    let answers = futures_util::future::join_all(clients).await;
    let ok = answers.iter().filter(|a| a.starts_with("HTTP/1.1 200") && a.ends_with("raw-1")).count();
    assert_eq!(
        ok,
        100,
        "every connection reached the woken machine: {:?}",
        answers.iter().find(|a| !a.ends_with("raw-1"))
    );
    let text = proxy.metrics().await;
    assert_eq!(metric(&text, "tern_machine_actions_total{action=\"start\",reason=\"wake\"}"), 1.0, "{text}");

    // One connection stays open, silent: the machine is not stopped under it.
    let held = TcpStream::connect(("127.0.1.13", port)).await.unwrap();
    until_machine(&proxy, "raw", "raw-1", Duration::from_secs(5), |m| m["in_flight"] == 1).await;
    let stop = "tern_machine_actions_total{action=\"stop\",reason=\"autostop\"}";
    let early = eventually(Duration::from_secs(3), || async {
        (metric(&proxy.metrics().await, stop) > 0.0).then_some(())
    });
    assert!(early.await.is_none(), "an open TCP connection is load: no autostop under it");
    drop(held);
    until_machine(&proxy, "raw", "raw-1", Duration::from_secs(20), |m| m["state"] == "stopped").await;
    assert_eq!(metric(&proxy.metrics().await, stop), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_at_the_idle_timeout_and_connection_limits_hold() {
    let (port, m) = (reserve_port(), echo_machine(None).await);
    let extra = "addrs = [\"127.0.1.14\"]\nidle_timeout = \"300ms\"\n\
                 concurrency = { type = \"connections\", soft_limit = 1, hard_limit = 1 }";
    let decl = service_app("lim", extra, m.port(), port, "") + &started("lim", "lim-1", m);
    let proxy = Proxy::start_with(&decl, &tcp_listener("127.0.1.14", port)).await;

    // A connection that keeps talking outlives the idle timeout many times over.
    let mut busy = TcpStream::connect(("127.0.1.14", port)).await.unwrap();
    let mut buf = [0u8; 3];
    let began = tokio::time::Instant::now();
    while began.elapsed() < Duration::from_millis(1200) {
        busy.write_all(b"ok\n").await.unwrap();
        busy.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // At the hard limit of one connection, a second waits for the first to end.
    let mut second = TcpStream::connect(("127.0.1.14", port)).await.unwrap();
    second.write_all(b"2nd\n").await.unwrap();
    let mut got = [0u8; 4];
    let waited = tokio::time::timeout(Duration::from_millis(200), second.read_exact(&mut got)).await;
    assert!(waited.is_err(), "the second connection was not relayed while the first was open");
    drop(busy);
    tokio::time::timeout(Duration::from_secs(10), second.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(&got, b"2nd\n");

    // Silent past the idle timeout: closed (the machine then says bye as it sees the end).
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), second.read_to_end(&mut rest)).await.unwrap().unwrap();
    let text = proxy.metrics().await;
    assert!(metric(&text, "tern_idle_timeouts_total") >= 1.0, "{text}");
}

/// Debian's redis-server as the machine behind a raw service, `redis-cli` as the client
/// (skipped, saying so, where they are not installed; `.ci/run` installs them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_behind_a_raw_service_wakes_once_for_a_hundred_clients_and_stops_after_the_last() {
    let (Some(server), Some(cli)) =
        (crate::proxy_protocol::which("redis-server"), crate::proxy_protocol::which("redis-cli"))
    else {
        eprintln!(
            "SKIPPED: redis-server and redis-cli are not installed (apt-get install redis-server redis-tools)"
        );
        return;
    };
    // The port is held on 127.0.0.1 (redis-server would not share it): redis listens on .16.
    let (port, rport) = (reserve_port(), reserve_port());
    let cmd = format!(
        "[{:?}, \"--port\", \"{rport}\", \"--bind\", \"127.0.1.16\", \"--save\", \"\", \"--appendonly\", \"no\"]",
        server.display().to_string()
    );
    let decl = service_app(
        "cache",
        "addrs = [\"127.0.1.15\"]\nauto_stop = \"stop\"\nauto_stop_after = \"1s\"",
        rport,
        port,
        "",
    ) + &format!(
        "[[machines]]\nid = \"cache-1\"\napp = \"cache\"\naddr = \"127.0.1.16:{rport}\"\nstate = \"stopped\"\ncmd = {cmd}\n"
    );
    let proxy = Proxy::start_with(&decl, &tcp_listener("127.0.1.15", port)).await;
    let redis = |args: &[&str]| {
        let mut c = tokio::process::Command::new(&cli);
        c.args(["-h", "127.0.1.15", "-p", &port.to_string()]).args(args);
        c.kill_on_drop(true).output()
    };
    // A hundred clients at once on a stopped machine: one start, every command lands.
    let clients = (0..100).map(|_| redis(&["INCR", "hits"]));
    let outs = futures_util::future::join_all(clients).await;
    assert!(
        outs.iter().all(|o| o.as_ref().is_ok_and(|o| o.status.success())),
        "{:?}",
        outs.iter().find(|o| o.as_ref().map_or(true, |o| !o.status.success()))
    );
    let hits = redis(&["GET", "hits"]).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&hits.stdout).trim(), "100");
    let text = proxy.metrics().await;
    assert_eq!(metric(&text, "tern_machine_actions_total{action=\"start\",reason=\"wake\"}"), 1.0, "{text}");

    // A subscriber holds its connection: no autostop under it; once it leaves, the machine stops.
    let mut sub = tokio::process::Command::new(&cli);
    sub.args(["-h", "127.0.1.15", "-p", &port.to_string(), "SUBSCRIBE", "ch"])
        .stdout(std::process::Stdio::null());
    let mut sub = sub.kill_on_drop(true).spawn().unwrap();
    until_machine(&proxy, "cache", "cache-1", Duration::from_secs(5), |m| m["in_flight"] == 1).await;
    let stop = "tern_machine_actions_total{action=\"stop\",reason=\"autostop\"}";
    let early = eventually(Duration::from_secs(3), || async {
        (metric(&proxy.metrics().await, stop) > 0.0).then_some(())
    });
    assert!(early.await.is_none(), "no autostop while the subscriber is connected");
    sub.kill().await.unwrap();
    until_machine(&proxy, "cache", "cache-1", Duration::from_secs(20), |m| m["state"] == "stopped").await;
    assert!(std::net::TcpStream::connect(("127.0.1.16", rport)).is_err(), "redis-server is gone");
}

/// HAProxy from Debian as the machine, taking the PROXY v2 header tern sends
/// (`accept-proxy`): it answers with the client address and destination the header named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_as_the_machine_reads_the_client_from_terns_proxy_v2_header() {
    let (port, hport) = (reserve_port(), reserve_port());
    // HAProxy binds with SO_REUSEPORT, as the reservation does; the reservation never listens.
    let machine_addr = SocketAddr::from(([127, 0, 0, 1], hport));
    let (_dir, _child) = crate::proxy_protocol::run_haproxy(&format!(
        "global\n  maxconn 64\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend fe\n  bind {machine_addr} accept-proxy\n\
             \x20 http-request return status 200 content-type text/plain lf-string \"src=%[src] dst=%[dst]:%[dst_port]\"\n"
    ));
    let decl = service_app("hap", "addrs = [\"127.0.1.18\"]", hport, port, "\"proxy_proto\"")
        + &started("hap", "hap-1", machine_addr);
    let proxy = Proxy::start_with(&decl, &tcp_listener("127.0.1.18", port)).await;
    let up = eventually(Duration::from_secs(10), || async {
        TcpStream::connect(machine_addr).await.ok().map(|_| ())
    });
    assert!(up.await.is_some(), "haproxy did not start listening on {machine_addr}");

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.34:0".parse().unwrap()).unwrap();
    let mut s = socket.connect(format!("127.0.1.18:{port}").parse().unwrap()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: hap\r\nConnection: close\r\n\r\n").await.unwrap();
    let answer = read_all(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(&format!("src=127.0.0.34 dst=127.0.1.18:{port}")), "{answer}");
    drop(proxy);
}

/// The access log has a line for each relayed connection: app, machine, duration, bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_relayed_connection() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    let (port, m) = (reserve_port(), echo_machine(None).await);
    let decl = service_app("db", "addrs = [\"127.0.1.19\"]", m.port(), port, "") + &started("db", "db-1", m);
    crate::harness::apply_decl(&db, &decl);
    let config = dir.path().join("tern.toml");
    let text = crate::harness::node_config(&db, &tcp_listener("127.0.1.19", port))
        .replace("access = false", "access = true")
        + "format = \"json\"\n";
    std::fs::write(&config, text).unwrap();
    let mut tern = crate::harness::ServeProcess::start(&config).await;
    let mut s = TcpStream::connect(("127.0.1.19", port)).await.unwrap();
    assert_eq!(send_and_half_close(&mut s, b"twelve bytes").await, "twelve bytesbye\n");
    let line = loop {
        let v = tokio::time::timeout(Duration::from_secs(10), tern.logs.recv()).await.unwrap().unwrap();
        if v["target"] == "tern::access" {
            break v;
        }
    };
    assert_eq!(
        (&line["kind"], &line["app"], &line["machine"]),
        (&"tcp".into(), &"db".into(), &"db-1".into()),
        "{line}"
    );
    assert_eq!((&line["bytes_in"], &line["bytes_out"]), (&12.into(), &16.into()), "{line}");
    assert!(line["duration_ms"].is_number(), "{line}");
}

/// On a shared address, a client that starts a ClientHello and stalls is closed at the
/// header read timeout; on a port that terminates TLS, a name with no certificate is refused
/// in the handshake. Both are counted, and nothing reaches a machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_hellos_and_unknown_names_are_closed_and_counted() {
    let ca = Ca::new();
    let (shared, tls_port, m) = (reserve_port(), reserve_port(), echo_machine(None).await);
    let decl = service_app("sec", "addrs = [\"127.0.1.21\"]", m.port(), tls_port, "\"tls\"")
        + &started("sec", "sec-1", m)
        + &ca.decl("sec.test", &["sec.test"]);
    let listeners = tcp_listener("127.0.1.20", shared)
        + &tcp_listener("127.0.1.21", tls_port)
        + "[limits]\nheader_read_timeout = \"300ms\"\n";
    let proxy = Proxy::start_with(&decl, &listeners).await;

    let mut s = TcpStream::connect(("127.0.1.20", shared)).await.unwrap();
    s.write_all(b"\x16\x03\x01\x00\xc8\x01").await.unwrap();
    let began = tokio::time::Instant::now();
    assert_eq!(read_all(&mut s).await, "", "closed without a byte");
    assert!(began.elapsed() >= Duration::from_millis(250), "held to the timeout: {:?}", began.elapsed());

    assert!(connect_tls(&ca, format!("127.0.1.21:{tls_port}").parse().unwrap(), "other.test").await.is_err());
    let text = proxy.metrics().await;
    assert_eq!(metric(&text, "tern_tcp_refused_total{reason=\"no_service\"}"), 1.0, "{text}");
    assert_eq!(metric(&text, "tern_tcp_refused_total{reason=\"tls\"}"), 1.0, "{text}");
    assert_eq!(metric(&text, "tern_tls_handshake_failures_total{reason=\"unknown_sni\"}"), 1.0, "{text}");
    assert_eq!(metric(&text, "tern_tcp_relayed_total"), 0.0);
}

/// A service declared by `tern apply` while tern runs is served as one declared at boot, and
/// one removed stops taking new connections (an established one goes on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_applied_at_runtime_are_served_and_removed_ones_refused() {
    let (port, m) = (reserve_port(), echo_machine(None).await);
    let bare =
        "[[apps]]\nname = \"db\"\nhostnames = [\"db.test\"]\n\n".to_string() + &started("db", "db-1", m);
    let with_service =
        service_app("db", "addrs = [\"127.0.1.23\"]", m.port(), port, "") + &started("db", "db-1", m);
    let proxy = Proxy::start_with(&bare, &tcp_listener("127.0.1.23", port)).await;
    let mut s = TcpStream::connect(("127.0.1.23", port)).await.unwrap();
    assert_eq!(send_and_half_close(&mut s, b"x\n").await, "", "nothing declared yet");

    proxy.apply(&with_service);
    let served = eventually(Duration::from_secs(10), || async {
        let mut s = TcpStream::connect(("127.0.1.23", port)).await.ok()?;
        (send_and_half_close(&mut s, b"x\n").await == "x\nbye\n").then_some(())
    });
    assert!(served.await.is_some(), "the applied service is served");

    // Open across the removal: it keeps its machine.
    let mut held = TcpStream::connect(("127.0.1.23", port)).await.unwrap();
    held.write_all(b"before\n").await.unwrap();
    let mut buf = [0u8; 7];
    held.read_exact(&mut buf).await.unwrap();
    proxy.apply(&bare);
    let gone = eventually(Duration::from_secs(10), || async {
        let mut s = TcpStream::connect(("127.0.1.23", port)).await.ok()?;
        send_and_half_close(&mut s, b"x\n").await.is_empty().then_some(())
    });
    assert!(gone.await.is_some(), "the removed service takes no new connection");
    assert_eq!(
        send_and_half_close(&mut held, b"after\n").await,
        "after\nbye\n",
        "the established one goes on"
    );
}
