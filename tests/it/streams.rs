//! Streams: SSE events arrive one by one, WebSockets tunnel both ways, 100 MB bodies stream
//! with bounded proxy memory, and the idle timeout cuts only silent streams.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::backend::Backend;
use crate::harness::{self, Ca, HttpVersion, Proxy, ServeProcess, app_decl};

/// Reads body chunks until `needle` has arrived; returns everything read.
async fn read_until(resp: &mut reqwest::Response, seen: &mut String, needle: &str) {
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("{needle:?} did not arrive; got {seen:?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("stream ended before {needle:?}; got {seen:?}"));
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_arrive_one_by_one_before_the_app_finishes() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let decl = app_decl("sse", &["sse.test"], &[("m1", b.addr, "started")], "")
        + &ca.decl("sse.test", &["sse.test"]);
    let proxy = Proxy::start(&decl).await;
    for (version, tls) in [(HttpVersion::Http1, false), (HttpVersion::Http2, true)] {
        let client = proxy.client(&ca, version);
        let url = if tls { proxy.tls_url("sse.test", "/sse") } else { proxy.url("sse.test", "/sse") };
        let mut resp = client.get(url).send().await.unwrap();
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let mut seen = String::new();
        // The app is blocked on the gate: "one" can only arrive if nothing buffers it.
        read_until(&mut resp, &mut seen, "data: one\n\n").await;
        assert!(!seen.contains("two"));
        b.gate.notify_one();
        read_until(&mut resp, &mut seen, "data: two\n\n").await;
        // HTTP/2 may close with an empty DATA frame carrying END_STREAM.
        let mut tail = resp.chunk().await.unwrap();
        while tail.as_ref().is_some_and(|c| c.is_empty()) {
            tail = resp.chunk().await.unwrap();
        }
        assert!(tail.is_none(), "the stream ends when the app ends it, got {tail:?} after {seen:?}");
    }
}

/// While a stream waits for its app, tern's HTTP/1.1 server lets go of what the connection
/// keeps for its next request (the room for an exchange, the read buffer) and takes it again
/// after. A request the client writes on the same connection while the stream waits (longer
/// than what is read of a waiting connection at a time) is answered once the stream ends, and
/// the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_written_while_a_stream_waits_is_answered_after_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::start("m1").await;
    let decl = app_decl("sse", &["sse.test"], &[("m1", b.addr, "started")], "");
    let proxy = Proxy::start(&decl).await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    tcp.write_all(b"GET /sse HTTP/1.1\r\nhost: sse.test\r\n\r\n").await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut read_until = async |tcp: &mut tokio::net::TcpStream, seen: &mut Vec<u8>, needle: &[u8]| {
        while !seen.windows(needle.len()).any(|w| w == needle) {
            let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{:?} did not arrive", String::from_utf8_lossy(needle)))
                .unwrap();
            assert!(
                n > 0,
                "closed before {:?}: {}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    };
    read_until(&mut tcp, &mut seen, b"data: one\n\n").await;
    let next = format!("GET /echo HTTP/1.1\r\nhost: sse.test\r\nx-padding: {}\r\n\r\n", "p".repeat(200));
    tcp.write_all(next.as_bytes()).await.unwrap();
    b.gate.notify_one();
    read_until(&mut tcp, &mut seen, b"data: two\n\n").await;
    read_until(&mut tcp, &mut seen, "p".repeat(200).as_bytes()).await;
    let text = String::from_utf8_lossy(&seen);
    let second = text.rfind("HTTP/1.1 200").expect("a second response");
    assert!(text[..second].contains("\r\n0\r\n\r\n"), "the stream ended first: {text}");
    assert!(text[second..].contains("\"path\":\"/echo\""), "the request written during the stream: {text}");
    // The connection goes on as before.
    tcp.write_all(b"GET /id HTTP/1.1\r\nhost: sse.test\r\n\r\n").await.unwrap();
    let before = seen.len();
    read_until(&mut tcp, &mut seen, b"\r\n\r\nm1").await;
    assert!(String::from_utf8_lossy(&seen[before..]).starts_with("HTTP/1.1 200"));
}

/// A stream over TLS silent for longer than a connection takes to give its TLS buffers back
/// (a second) goes on: over HTTP/1.1 and HTTP/2, each event after a silence of 1.5 s arrives
/// whole, and the stream ends as the app ends it; the buffers were given back in between
/// (`tern_tls_buffers_shed_total`). The silences are the app's (its ticks' gap), the behaviour
/// under test, not a wait for tern.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_tls_goes_on_after_silences() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let decl = app_decl("sse", &["sse.test"], &[("m1", b.addr, "started")], "")
        + &ca.decl("sse.test", &["sse.test"]);
    let proxy = Proxy::start(&decl).await;
    let sheds = async || crate::wake::metric(&proxy.metrics().await, "tern_tls_buffers_shed_total");
    // One protocol at a time, so each one's silences are seen to give the buffers back.
    for version in [HttpVersion::Http1, HttpVersion::Http2] {
        let before = sheds().await;
        let client = proxy.client(&ca, version);
        let url = proxy.tls_url("sse.test", "/ticks?n=3&gap_ms=1500");
        let expected =
            if version == HttpVersion::Http2 { reqwest::Version::HTTP_2 } else { reqwest::Version::HTTP_11 };
        let resp = client.get(url).send().await.unwrap();
        assert_eq!(resp.version(), expected);
        let body = tokio::time::timeout(Duration::from_secs(30), resp.text()).await.unwrap().unwrap();
        assert_eq!(body, "data: tick 0\n\ndata: tick 1\n\ndata: tick 2\n\n", "over {expected:?}");
        // Two silences of 1.5 s with the response open: a quiet second into each, the
        // connection's TLS buffers are given back (twice, unless a slow machine shortens one).
        assert!(sheds().await > before, "no TLS buffers given back over {expected:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_tern_plain_and_tls() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let decl =
        app_decl("ws", &["ws.test"], &[("m1", b.addr, "started")], "") + &ca.decl("ws.test", &["ws.test"]);
    let proxy = Proxy::start(&decl).await;

    let tcp = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://ws.test/ws", tcp).await.unwrap();
    assert_eq!(resp.headers()["via"], "1.1 tern");
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(format!("hello {i}")));
    }
    ws.send(Message::binary(vec![7u8; 100_000])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(vec![7u8; 100_000]));
    ws.close(None).await.unwrap();

    let tcp = tokio::net::TcpStream::connect(proxy.https).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(ca.client_config(&[b"http/1.1"])))
        .connect(rustls::pki_types::ServerName::try_from("ws.test").unwrap(), tcp)
        .await
        .unwrap();
    let (mut wss, _) = tokio_tungstenite::client_async("wss://ws.test/ws", tls).await.unwrap();
    wss.send(Message::text("over tls")).await.unwrap();
    assert_eq!(wss.next().await.unwrap().unwrap(), Message::text("over tls"));
}

/// The real binary, so its memory can be measured apart from the test's: 100 MB each way
/// must not raise tern's peak RSS by anything near 100 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_each_way_with_bounded_memory() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    harness::apply_decl(&db, &app_decl("big", &["big.test"], &[("m1", b.addr, "started")], ""));
    let config = dir.path().join("tern.toml");
    std::fs::write(&config, harness::node_config(&db, "") + "format = \"json\"\n").unwrap();
    let tern = ServeProcess::start(&config).await;
    let client = harness::client_for(tern.http, tern.https, &ca, HttpVersion::Http1);
    let url = |p: &str| format!("http://big.test:{}{p}", tern.http.port());

    // Warm up (first connection, first allocations), then take the baseline.
    assert_eq!(
        client.get(url("/download?bytes=1048576")).send().await.unwrap().bytes().await.unwrap().len(),
        1 << 20
    );
    let before = harness::peak_rss_kib(tern.pid());

    let mut resp = client.get(url(&format!("/download?bytes={SIZE}"))).send().await.unwrap();
    let mut got = 0u64;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got += chunk.len() as u64;
    }
    assert_eq!(got, SIZE);

    let chunks = futures_util::stream::iter(
        (0..(SIZE / 65536)).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'u'; 65536]))),
    );
    let resp = client.post(url("/upload")).body(reqwest::Body::wrap_stream(chunks)).send().await.unwrap();
    assert_eq!(resp.text().await.unwrap(), SIZE.to_string());

    let grew_mib = (harness::peak_rss_kib(tern.pid()) - before) / 1024;
    println!("peak RSS grew by {grew_mib} MiB while streaming 2 x 100 MiB");
    assert!(grew_mib < 20, "tern's peak RSS grew by {grew_mib} MiB: a body was buffered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_cuts_silent_streams_only() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(&app_decl(
        "idle",
        &["idle.test"],
        &[("m1", b.addr, "started")],
        "idle_timeout = \"300ms\"",
    ))
    .await;
    let client = proxy.client(&ca, HttpVersion::Http1);

    // 12 events 100 ms apart: 1.2 s in all, four times the idle timeout, never silent.
    let resp = client.get(proxy.url("idle.test", "/ticks?n=12&gap_ms=100")).send().await.unwrap();
    let text = resp.text().await.unwrap();
    assert_eq!(text.matches("data: tick").count(), 12, "{text}");

    // Headers, then silence: cut after the timeout (the client sees the body break).
    let mut resp = client.get(proxy.url("idle.test", "/silent")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let end = tokio::time::timeout(Duration::from_secs(10), resp.chunk())
        .await
        .expect("the silent stream was never cut");
    assert!(end.is_err() || end.unwrap().is_none());
    let m = proxy.metrics().await;
    assert!(m.contains("tern_idle_timeouts_total 1"), "{m}");
}
