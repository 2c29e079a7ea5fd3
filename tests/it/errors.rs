//! Responses tern makes itself: each carries a `tern-error` code and is shaped by Accept.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::Backend;
use crate::harness::{Ca, HttpVersion, Proxy, app_decl, dead_addr};

async fn raw(proxy: &Proxy, request: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await.unwrap().unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_no_machine_and_refused_connection() {
    let ca = Ca::new();
    let dead = dead_addr();
    let decl = app_decl("sleepy", &["sleepy.test"], &[("s1", dead_addr(), "stopped")], "")
        + &app_decl("broken", &["broken.test"], &[("b1", dead, "started")], "");
    let proxy = Proxy::start(&decl).await;
    let client = proxy.client(&ca, HttpVersion::Http1);

    let r =
        client.get(proxy.url("nobody.test", "/")).header("accept", "application/json").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["tern-error"], "no_app");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "no_app");

    let r = client.get(proxy.url("sleepy.test", "/")).header("accept", "text/html").send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["tern-error"], "no_machine");
    assert!(r.headers().contains_key("retry-after"));
    assert!(r.text().await.unwrap().contains("<html>"));

    let r = client.get(proxy.url("broken.test", "/")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["tern-error"], "upstream_connect");
    assert!(r.headers()["fly-request-id"].to_str().unwrap().ends_with("-ams"));

    let m = proxy.metrics().await;
    for code in ["no_app", "no_machine", "upstream_connect"] {
        assert!(m.contains(&format!("tern_errors_total{{code=\"{code}\"}} 1")), "{code}: {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_on_another_machine() {
    let ca = Ca::new();
    let good = Backend::start("good").await;
    let dead = dead_addr();
    let proxy = Proxy::start(&app_decl(
        "app",
        &["app.test"],
        &[("dead", dead, "started"), ("good", good.addr, "started")],
        "",
    ))
    .await;
    let client = proxy.client(&ca, HttpVersion::Http1);
    for _ in 0..20 {
        let r = client.get(proxy.url("app.test", "/id")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "good");
    }
    let m = proxy.metrics().await;
    let retries: u64 =
        m.lines().find_map(|l| l.strip_prefix("tern_upstream_retries_total ")).unwrap().parse().unwrap();
    assert!(retries >= 1, "with random ties the dead machine is picked first about half the time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_4xx_with_a_code() {
    let b = Backend::start("m1").await;
    let proxy = Proxy::start_with(
        &app_decl("app", &["app.test"], &[("m1", b.addr, "started")], ""),
        "[limits]\nmax_header_bytes = 4096\n",
    )
    .await;

    let resp = raw(&proxy, "GET / HTTP/1.1\r\nHost: bad..host\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("tern-error: bad_host"), "{resp}");

    let resp = raw(&proxy, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(resp.contains("tern-error: bad_host"), "no Host at all: {resp}");

    let big = "x".repeat(6000);
    let resp = raw(
        &proxy,
        &format!("GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert!(resp.contains("tern-error: headers_too_large"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_that_never_answers_gets_504_after_the_idle_timeout() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl(
        "slow",
        &["slow.test"],
        &[("m1", b.addr, "started")],
        "idle_timeout = \"200ms\"",
    ))
    .await;
    let r = proxy.client(&ca, HttpVersion::Http1).get(proxy.url("slow.test", "/hang")).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["tern-error"], "upstream_timeout");
}
