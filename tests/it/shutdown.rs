//! Graceful shutdown: stop accepting, let in-flight requests finish, exit 0.

use std::time::Duration;

use crate::backend::Backend;
use crate::harness::{self, Ca, HttpVersion, Proxy, ServeProcess, app_decl, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_in_flight_request_finish() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let mut proxy = Proxy::start(&app_decl("app", &["app.test"], &[("m1", b.addr, "started")], "")).await;
    let client = proxy.client(&ca, HttpVersion::Http1);
    let in_flight = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url("app.test", "/hang"));
        async move { client.get(url).send().await.map(|r| r.status()) }
    });
    eventually(Duration::from_secs(5), || async {
        (b.requests.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
    })
    .await
    .unwrap();

    let run = proxy.shutdown();
    let admin = proxy.admin;
    let draining = eventually(Duration::from_secs(5), || async {
        let r = reqwest::get(format!("http://{admin}/healthz")).await.ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
    assert!(draining.is_some(), "/healthz turns 503 while draining");
    let refused = eventually(Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(proxy.http).await.is_err().then_some(())
    })
    .await;
    assert!(refused.is_some(), "no new connections once draining");
    assert!(!run.is_finished(), "tern waits for the in-flight request");

    b.gate.notify_one();
    assert_eq!(in_flight.await.unwrap().unwrap(), 200);
    tokio::time::timeout(Duration::from_secs(10), run).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    harness::apply_decl(&db, &app_decl("app", &["app.test"], &[("m1", b.addr, "started")], ""));
    let config = dir.path().join("tern.toml");
    std::fs::write(&config, harness::node_config(&db, "") + "format = \"json\"\n").unwrap();
    harness::install_crypto();
    let mut tern = ServeProcess::start(&config).await;
    let client = harness::client_for(tern.http, tern.https, &ca, HttpVersion::Http1);
    let in_flight = tokio::spawn({
        let url = format!("http://app.test:{}/hang", tern.http.port());
        async move { client.get(url).send().await.map(|r| r.status()) }
    });
    eventually(Duration::from_secs(5), || async {
        (b.requests.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
    })
    .await
    .unwrap();

    let pid = tern.pid();
    std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    // tern says it is draining, then waits for the request.
    loop {
        let v = tern.logs.recv().await.expect("tern exited before draining");
        if v["message"].as_str().is_some_and(|m| m.starts_with("shutting down")) {
            assert_eq!(v["open_connections"], 1);
            break;
        }
    }
    let health = reqwest::get(format!("http://{}/healthz", tern.admin)).await.unwrap();
    assert_eq!(health.status(), 503, "a draining node tells its load balancer");
    b.gate.notify_one();
    assert_eq!(in_flight.await.unwrap().unwrap(), 200);
    let status = tokio::time::timeout(Duration::from_secs(10), tern.child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_sse_and_websockets_cleanly_instead_of_waiting_for_them() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let decl = app_decl("live", &["live.test"], &[("m1", b.addr, "started")], "")
        + &ca.decl("live.test", &["live.test"]);
    // A short drain window: the streams end one by one within it.
    let mut proxy = Proxy::start_with(&decl, "[shutdown]\ndrain_window = \"1s\"").await;
    let mut sse = Vec::new();
    for (version, tls) in [(HttpVersion::Http1, false), (HttpVersion::Http2, true)] {
        let client = proxy.client(&ca, version);
        let url = if tls { proxy.tls_url("live.test", "/sse") } else { proxy.url("live.test", "/sse") };
        let mut resp = client.get(url).send().await.unwrap();
        assert_eq!(resp.chunk().await.unwrap().unwrap(), "data: one\n\n");
        sse.push(resp);
    }
    let tcp = tokio::net::TcpStream::connect(proxy.http).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("ws://live.test/ws", tcp).await.unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));
    let tcp = tokio::net::TcpStream::connect(proxy.https).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(ca.client_config(&[b"http/1.1"])))
        .connect(rustls::pki_types::ServerName::try_from("live.test").unwrap(), tcp)
        .await
        .unwrap();
    let (mut wss, _) = tokio_tungstenite::client_async("wss://live.test/ws", tls).await.unwrap();
    wss.send(Message::text("over tls")).await.unwrap();
    assert_eq!(wss.next().await.unwrap().unwrap(), Message::text("over tls"));

    let run = proxy.shutdown();
    // Each WebSocket client is told the server is going away…
    expect_going_away(&mut ws).await;
    expect_going_away(&mut wss).await;
    // …and each SSE stream ends cleanly after its last whole event: not cut, not hanging
    // until the drain window and the 30 s shutdown deadline after it.
    for mut resp in sse {
        let mut tail = resp.chunk().await.expect("a clean end, not an error");
        while tail.as_ref().is_some_and(|c| c.is_empty()) {
            tail = resp.chunk().await.expect("a clean end, not an error");
        }
        assert!(tail.is_none(), "got {tail:?}");
    }
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("shutdown did not wait for streams")
        .unwrap()
        .unwrap();
    // The machine was sent a close frame too (masked, as a client's must be), which it read.
    eventually(Duration::from_secs(5), || async { (b.ws_closes.lock().len() == 2).then_some(()) }).await;
    assert_eq!(*b.ws_closes.lock(), vec![1001, 1001]);
}

/// The next message is a close frame saying the proxy is going away (1001); reading on
/// sends the client's answering close frame, then the connection ends.
async fn expect_going_away<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("no close frame came") {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 1001);
            assert_eq!(frame.reason.as_str(), "proxy going away");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    while let Some(Ok(_)) = ws.next().await {}
}
