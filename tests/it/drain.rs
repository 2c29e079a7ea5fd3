//! Gradual drain: on SIGTERM the real `tern` binary ends its long-lived exchanges spread over
//! `[shutdown] drain_window`, each cleanly: SSE after a whole event, WebSockets with close
//! 1001, keep-alive connections with `Connection: close` on a response. No request fails.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::backend::Backend;
use crate::harness::{self, Ca, HttpVersion, ServeProcess, app_decl, eventually};

const WINDOW: Duration = Duration::from_secs(3);
const SSE_H1: usize = 20;
const SSE_H2: usize = 4;
const WEBSOCKETS: usize = 6;
const KEEP_ALIVE: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_and_connections_spread_over_the_window() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    let decl = app_decl("live", &["live.test"], &[("m1", b.addr, "started")], "")
        + &ca.decl("live.test", &["live.test"]);
    harness::apply_decl(&db, &decl);
    let config = dir.path().join("tern.toml");
    let extra = format!("[shutdown]\ndrain_window = \"{}ms\"\n", WINDOW.as_millis());
    std::fs::write(&config, harness::node_config(&db, &extra) + "format = \"json\"\n").unwrap();
    let mut tern = ServeProcess::start(&config).await;

    // A request in flight for the whole drain: it must finish, not be cut.
    let h1 = harness::client_for(tern.http, tern.https, &ca, HttpVersion::Http1);
    let hang = tokio::spawn({
        let (client, url) = (h1.clone(), format!("http://live.test:{}/hang", tern.http.port()));
        async move { client.get(url).send().await.unwrap().status() }
    });
    eventually(Duration::from_secs(5), || async {
        (b.requests.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
    })
    .await
    .unwrap();

    let (ready, mut readies) = mpsc::unbounded_channel();
    let mut sse = Vec::new();
    let ticks = "/ticks?n=1000000&gap_ms=20";
    for _ in 0..SSE_H1 {
        let url = format!("http://live.test:{}{ticks}", tern.http.port());
        sse.push(tokio::spawn(sse_until_the_end(h1.clone(), url, ready.clone())));
    }
    let h2 = harness::client_for(tern.http, tern.https, &ca, HttpVersion::Http2);
    for _ in 0..SSE_H2 {
        let url = format!("https://live.test:{}{ticks}", tern.https.port());
        sse.push(tokio::spawn(sse_until_the_end(h2.clone(), url, ready.clone())));
    }
    let ws: Vec<_> =
        (0..WEBSOCKETS).map(|_| tokio::spawn(websocket_until_closed(tern.http, ready.clone()))).collect();
    let kept: Vec<_> =
        (0..KEEP_ALIVE).map(|_| tokio::spawn(keep_alive_until_closed(tern.http, ready.clone()))).collect();
    for _ in 0..SSE_H1 + SSE_H2 + WEBSOCKETS + KEEP_ALIVE {
        tokio::time::timeout(Duration::from_secs(20), readies.recv()).await.unwrap().unwrap();
    }

    let start = Instant::now();
    std::process::Command::new("kill").args(["-TERM", &tern.pid().to_string()]).status().unwrap();
    let mut ends = Vec::new();
    for t in sse.into_iter().chain(ws).chain(kept) {
        let ended = tokio::time::timeout(WINDOW * 3, t).await.expect("an exchange was never ended").unwrap();
        ends.push(ended - start);
    }
    ends.sort_unstable();
    let ms: Vec<u128> = ends.iter().map(Duration::as_millis).collect();
    println!("end times (ms after SIGTERM): {ms:?}");
    let (first, last) = (ends[0], ends[ends.len() - 1]);
    assert!(last <= WINDOW + Duration::from_secs(1), "ended after the window: {ms:?}");
    assert!(last - first >= WINDOW / 2, "not spread over the window: {ms:?}");
    let early = ends.iter().filter(|e| **e < WINDOW / 10).count();
    assert!(early * 10 <= ends.len() * 3, "{early} of {} in the window's first tenth: {ms:?}", ends.len());

    let admin = tern.admin;
    let metrics = reqwest::get(format!("http://{admin}/metrics")).await.unwrap().text().await.unwrap();
    let total = SSE_H1 + SSE_H2;
    assert!(metrics.contains(&format!("tern_drain_ended_total{{kind=\"sse\"}} {total}")), "{metrics}");
    assert!(metrics.contains(&format!("tern_drain_ended_total{{kind=\"ws\"}} {WEBSOCKETS}")), "{metrics}");

    // The request in flight all along still gets its answer.
    b.gate.notify_one();
    assert_eq!(hang.await.unwrap(), 200);
    let status = tokio::time::timeout(Duration::from_secs(20), tern.child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
    // Each machine side of a WebSocket got a close frame too.
    eventually(Duration::from_secs(5), || async { (b.ws_closes.lock().len() == WEBSOCKETS).then_some(()) })
        .await;
    assert_eq!(*b.ws_closes.lock(), vec![1001; WEBSOCKETS]);

    let (mut began, mut finished) = (None, None);
    while let Some(v) = tern.logs.recv().await {
        let message = v["message"].as_str().unwrap_or("");
        if message.starts_with("drain begins") {
            began = Some(v);
        } else if message.starts_with("drain finished") {
            finished = Some(v);
        }
    }
    let began = began.expect("no drain begins line");
    let finished = finished.expect("no drain finished line");
    assert_eq!(began["window_ms"], WINDOW.as_millis() as u64);
    // Streams: the SSE responses and the tunnels; connections: one per HTTP/1.1 SSE stream,
    // the HTTP/2 one, the keep-alive ones and the one with the request in flight (a client
    // may hold one more, idle).
    assert_eq!(began["streams"], total + WEBSOCKETS, "{began}");
    assert!(began["connections"].as_u64().unwrap() >= (SSE_H1 + 1 + KEEP_ALIVE + 1) as u64, "{began}");
    assert_eq!(finished["sse"], total, "{finished}");
    assert_eq!(finished["ws"], WEBSOCKETS, "{finished}");
    assert_eq!(finished["h2"], 1, "{finished}");
    assert!(finished["h1"].as_u64().unwrap() >= (KEEP_ALIVE + 1) as u64, "{finished}");
    assert_eq!(finished["cut"], false, "{finished}");
}

/// Reads an SSE stream of `data: tick N` events until it ends; panics if it ends with an
/// error (cut) or in the middle of an event. Returns when it ended.
async fn sse_until_the_end(
    client: reqwest::Client,
    url: String,
    ready: mpsc::UnboundedSender<()>,
) -> Instant {
    let mut resp = client.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut seen = String::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if seen.is_empty() {
                    ready.send(()).unwrap();
                }
                seen.push_str(std::str::from_utf8(&chunk).unwrap());
            }
            Ok(None) => break,
            Err(e) => panic!("the stream was cut ({e}) after {seen:?}"),
        }
    }
    let ended = Instant::now();
    assert!(seen.ends_with("\n\n"), "a torn last event: {:?}", &seen[seen.len().saturating_sub(40)..]);
    for (i, event) in seen.trim_end_matches("\n\n").split("\n\n").enumerate() {
        assert_eq!(event, format!("data: tick {i}"), "events arrive whole and in order");
    }
    ended
}

/// A WebSocket that keeps sending messages (each echoed) until tern closes it; panics unless
/// that is a close frame with 1001 "proxy going away". Returns when the close frame came.
async fn websocket_until_closed(proxy: SocketAddr, ready: mpsc::UnboundedSender<()>) -> Instant {
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async("ws://live.test/ws", tcp).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::text("0")).await.unwrap();
    assert_eq!(rx.next().await.unwrap().unwrap(), Message::text("0"));
    ready.send(()).unwrap();
    let writer = tokio::spawn(async move {
        for i in 1.. {
            tokio::time::sleep(Duration::from_millis(25)).await;
            if tx.send(Message::text(i.to_string())).await.is_err() {
                return;
            }
        }
    });
    let mut echoed = 0;
    let ended = loop {
        match rx.next().await {
            Some(Ok(Message::Text(t))) => {
                echoed += 1;
                assert_eq!(t.as_str(), echoed.to_string(), "echoes come whole and in order");
            }
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1001);
                assert_eq!(frame.reason.as_str(), "proxy going away");
                break Instant::now();
            }
            other => panic!("expected an echo or a close frame, got {other:?}"),
        }
    };
    // Reading on sends tungstenite's answering close frame; then the connection ends.
    while let Some(Ok(_)) = rx.next().await {}
    writer.abort();
    ended
}

/// One HTTP/1.1 keep-alive connection sending `GET /id` every 20 ms. Each response must
/// come whole; the one that says `Connection: close` must be followed by the end of the
/// connection, never a reset. Returns when that response came.
async fn keep_alive_until_closed(proxy: SocketAddr, ready: mpsc::UnboundedSender<()>) -> Instant {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let mut buf = Vec::new();
    for i in 0.. {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tcp.write_all(b"GET /id HTTP/1.1\r\nhost: live.test\r\n\r\n").await.unwrap();
        let (head, body) = read_response(&mut tcp, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"m1");
        if i == 0 {
            ready.send(()).unwrap();
        }
        if head.to_ascii_lowercase().contains("\r\nconnection: close\r\n") {
            let ended = Instant::now();
            let mut rest = [0u8; 64];
            let n = tcp.read(&mut rest).await.expect("a reset after Connection: close");
            assert_eq!(n, 0, "more bytes after Connection: close");
            return ended;
        }
    }
    unreachable!()
}

/// Reads one response with a Content-Length body; panics if the connection ends or fails
/// before it is whole.
async fn read_response(tcp: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = tcp.read(&mut chunk).await.expect("a reset before a whole response");
        assert!(n > 0, "the connection ended before a whole response");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
        .expect("a Content-Length")
        .parse()
        .unwrap();
    while buf.len() < head_end + len {
        let n = tcp.read(&mut chunk).await.expect("a reset before a whole response");
        assert!(n > 0, "the connection ended before a whole body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    (head, body)
}

/// Keep-alive connections quiet long enough to wait in a worker's parking lot (with no task
/// of their own) still end at their times in the drain, spread over the window, each closed
/// cleanly without a byte; the drain counts them, and nothing has to be cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_end_at_their_times_in_the_drain() {
    const PARKED: usize = 8;
    let b = Backend::start("m1").await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    harness::apply_decl(&db, &app_decl("live", &["live.test"], &[("m1", b.addr, "started")], ""));
    let config = dir.path().join("tern.toml");
    let extra = format!("[shutdown]\ndrain_window = \"{}ms\"\n", WINDOW.as_millis());
    std::fs::write(&config, harness::node_config(&db, &extra) + "format = \"json\"\n").unwrap();
    let mut tern = ServeProcess::start(&config).await;
    let mut conns = Vec::new();
    let mut buf = Vec::new();
    for _ in 0..PARKED {
        let mut tcp = tokio::net::TcpStream::connect(tern.http).await.unwrap();
        tcp.write_all(b"GET /id HTTP/1.1\r\nhost: live.test\r\n\r\n").await.unwrap();
        let (head, _) = read_response(&mut tcp, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        conns.push(tcp);
    }
    let admin = tern.admin;
    let parked = || async move {
        let m = reqwest::get(format!("http://{admin}/metrics")).await.ok()?.text().await.ok()?;
        m.lines().find_map(|l| l.strip_prefix("tern_connections_parked ")?.parse::<usize>().ok())
    };
    eventually(Duration::from_secs(10), || async { (parked().await? == PARKED).then_some(()) })
        .await
        .expect("the quiet connections never all waited in the lot");

    let start = Instant::now();
    std::process::Command::new("kill").args(["-TERM", &tern.pid().to_string()]).status().unwrap();
    // Each read on its own task: a close is timed when it happens, not after the ones before.
    let closing: Vec<_> = conns
        .into_iter()
        .map(|mut tcp| {
            tokio::spawn(async move {
                let mut rest = Vec::new();
                let read = tokio::time::timeout(WINDOW * 3, tcp.read_to_end(&mut rest)).await;
                assert_eq!(read.expect("never closed").expect("a reset, not a close"), 0, "{rest:?}");
                start.elapsed()
            })
        })
        .collect();
    let mut ends = Vec::new();
    for c in closing {
        ends.push(c.await.unwrap());
    }
    ends.sort_unstable();
    let ms: Vec<u128> = ends.iter().map(Duration::as_millis).collect();
    println!("closed at (ms after SIGTERM): {ms:?}");
    assert!(ends[PARKED - 1] <= WINDOW + Duration::from_secs(1), "ended after the window: {ms:?}");
    assert!(ends[PARKED - 1] - ends[0] >= WINDOW / 2, "not spread over the window: {ms:?}");
    let status = tokio::time::timeout(Duration::from_secs(20), tern.child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
    let mut finished = None;
    while let Some(v) = tern.logs.recv().await {
        if v["message"].as_str().unwrap_or("").starts_with("drain finished") {
            finished = Some(v);
        }
    }
    let finished = finished.expect("no drain finished line");
    assert!(finished["h1"].as_u64().unwrap() >= PARKED as u64, "{finished}");
    assert_eq!(finished["cut"], false, "{finished}");
}

/// A keep-alive connection that went quiet only just before the drain (too soon to be parked)
/// is closed at its time, not a parking delay later: tern's own HTTP/1.1 server is woken by
/// the drain while it waits for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_quiet_for_less_than_a_second_close_at_their_times() {
    const CONNS: usize = 4;
    const SHORT: Duration = Duration::from_millis(200);
    let b = Backend::start("m1").await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("rib.db");
    harness::apply_decl(&db, &app_decl("live", &["live.test"], &[("m1", b.addr, "started")], ""));
    let config = dir.path().join("tern.toml");
    let extra = format!("[shutdown]\ndrain_window = \"{}ms\"\n", SHORT.as_millis());
    std::fs::write(&config, harness::node_config(&db, &extra) + "format = \"json\"\n").unwrap();
    let mut tern = ServeProcess::start(&config).await;
    let mut conns = Vec::new();
    let mut buf = Vec::new();
    for _ in 0..CONNS {
        let mut tcp = tokio::net::TcpStream::connect(tern.http).await.unwrap();
        tcp.write_all(b"GET /id HTTP/1.1\r\nhost: live.test\r\n\r\n").await.unwrap();
        let (head, _) = read_response(&mut tcp, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        conns.push(tcp);
    }
    let start = Instant::now();
    std::process::Command::new("kill").args(["-TERM", &tern.pid().to_string()]).status().unwrap();
    for mut tcp in conns {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
        assert_eq!(read.expect("never closed").expect("a reset, not a close"), 0, "{rest:?}");
    }
    // A connection waits a second of quiet before it could be parked; one the drain did not
    // wake would close only then.
    let ended = start.elapsed();
    assert!(ended < Duration::from_millis(800), "closed {ended:?} after SIGTERM, window {SHORT:?}");
    let status = tokio::time::timeout(Duration::from_secs(20), tern.child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}
