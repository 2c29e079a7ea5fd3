//! HTTP/1.1 and HTTP/2 clients, the headers tern adds, and header hygiene.

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::Backend;
use crate::harness::{Ca, HttpVersion, Proxy, app_decl};

/// What the app saw, and the response head the client got.
struct Echo {
    version: reqwest::Version,
    headers: reqwest::header::HeaderMap,
    app: Value,
}

async fn echo(client: &reqwest::Client, url: String, headers: &[(&str, &str)]) -> Echo {
    let mut req = client.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (version, headers) = (r.version(), r.headers().clone());
    Echo { version, headers, app: r.json().await.unwrap() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_clients_over_plain_and_tls() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let decl = app_decl("hello", &["hello.test"], &[("m1", b.addr, "started")], "")
        + &ca.decl("hello.test", &["hello.test"]);
    let proxy = Proxy::start(&decl).await;
    for (version, tls) in [
        (HttpVersion::Http1, false),
        (HttpVersion::Http1, true),
        (HttpVersion::Http2, false),
        (HttpVersion::Http2, true),
    ] {
        let client = proxy.client(&ca, version);
        let url = if tls { proxy.tls_url("hello.test", "/echo") } else { proxy.url("hello.test", "/echo") };
        let Echo { version: got, headers, app } = echo(&client, url, &[]).await;
        let (want_version, via) = match version {
            HttpVersion::Http1 => (reqwest::Version::HTTP_11, "1.1 tern"),
            HttpVersion::Http2 => (reqwest::Version::HTTP_2, "2 tern"),
        };
        assert_eq!(got, want_version);
        assert_eq!(headers["via"], via);
        // Machines always get HTTP/1.1 (h2c is a per-app option), with Host set.
        assert_eq!(app["version"], "HTTP/1.1");
        assert_eq!(app["headers"]["host"][0].as_str().unwrap().split(':').next(), Some("hello.test"));
        assert_eq!(app["headers"]["x-forwarded-proto"][0], if tls { "https" } else { "http" });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_added_and_cannot_be_spoofed() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let decl = app_decl("hello", &["hello.test"], &[("m1", b.addr, "started")], "")
        + &ca.decl("hello.test", &["hello.test"]);
    let proxy = Proxy::start(&decl).await;
    let client = proxy.client(&ca, HttpVersion::Http1);
    let spoof = [
        ("x-forwarded-for", "10.9.9.9"),
        ("fly-client-ip", "10.6.6.6"),
        ("fly-region", "fake"),
        ("x-forwarded-proto", "gopher"),
        ("fly-request-id", "forged"),
    ];
    let Echo { headers, app, .. } = echo(&client, proxy.tls_url("hello.test", "/echo"), &spoof).await;
    let h = &app["headers"];
    assert_eq!(h["x-forwarded-for"][0], "10.9.9.9, 127.0.0.1", "the last hop is tern's view");
    assert_eq!(h["fly-client-ip"][0], "127.0.0.1");
    assert_eq!(h["fly-region"][0], "ams");
    assert_eq!(h["x-forwarded-proto"][0], "https");
    assert_eq!(h["x-forwarded-ssl"][0], "on");
    let port = proxy.https.port().to_string();
    assert_eq!(h["x-forwarded-port"][0], port.as_str());
    assert_eq!(h["fly-forwarded-port"][0], port.as_str());
    assert_eq!(h["via"][0], "1.1 tern");
    let id = h["fly-request-id"][0].as_str().unwrap();
    assert!(id.ends_with("-ams") && id.len() == 30, "{id}");
    assert_eq!(headers["fly-request-id"], id, "the client sees the id the app saw");
    assert_eq!(headers["via"], "1.1 tern");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_stop_at_tern() {
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl("hello", &["hello.test"], &[("m1", b.addr, "started")], "")).await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let req = "GET /echo HTTP/1.1\r\nHost: hello.test\r\nConnection: close, X-Private\r\nX-Private: secret\r\n\
               Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Public: yes\r\n\r\n";
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let body = raw.split("\r\n\r\n").nth(1).unwrap();
    let app: Value = serde_json::from_str(body).unwrap();
    let h = app["headers"].as_object().unwrap();
    for gone in ["x-private", "keep-alive", "proxy-connection", "connection"] {
        assert!(!h.contains_key(gone), "{gone} reached the app: {h:?}");
    }
    assert_eq!(h["x-public"][0], "yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_to_machines_is_a_per_app_option() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let decl = app_decl(
        "grpcish",
        &["g.test"],
        &[("m1", b.addr, "started")],
        "[apps.http_options]\nh2_backend = true\n",
    );
    let proxy = Proxy::start(&decl).await;
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        let Echo { app, .. } =
            echo(&proxy.client(&ca, version), proxy.url("g.test", "/echo"), &[("te", "trailers")]).await;
        assert_eq!(app["version"], "HTTP/2.0");
        assert_eq!(app["headers"]["fly-region"][0], "ams");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_connections_are_reused_once_a_response_is_read_to_the_end() {
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::Ordering::SeqCst;

    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl("hello", &["hello.test"], &[("m1", b.addr, "started")], "")).await;
    // One client connection (a pooling client could open a second one in a race, and
    // land on another worker with its own machine pool).
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(proxy.http).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let mut get = async |path: &str| {
        sender.ready().await.unwrap();
        let req = http::Request::get(path).header("host", "hello.test").body(Empty::<bytes::Bytes>::new());
        let resp = sender.send_request(req.unwrap()).await.unwrap();
        (resp.status(), resp.into_body())
    };
    // Sized and chunked bodies, small and large, one after another.
    for path in ["/id", "/download?bytes=300000", "/echo", "/download?bytes=1", "/id"].repeat(4) {
        let (status, body) = get(path).await;
        assert_eq!(status, 200);
        body.collect().await.unwrap();
    }
    assert_eq!(b.requests.load(SeqCst), 20);
    assert_eq!(b.connections.load(SeqCst), 1, "one pooled connection to the machine");

    // A response abandoned midway leaves its machine connection unusable: the next request
    // gets a fresh one and still succeeds.
    let client = proxy.client(&Ca::new(), HttpVersion::Http1);
    let r = client.get(proxy.url("hello.test", "/download?bytes=50000000")).send().await.unwrap();
    drop(r);
    let r = client.get(proxy.url("hello.test", "/id")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "m1");
}
