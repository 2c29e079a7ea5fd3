//! tern's own exchange against a machine that answers with scripted bytes, over loopback:
//! framing, refusals, and when a connection goes back to the pool.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::upstream::tests::pool;
use crate::upstream::{MachineBody, Pool, Proto, SendError, UpBody};

/// A machine that reads each request head and writes the next scripted answer; an answer
/// ending in `CLOSE` has its connection closed after it.
struct Machine {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    heads: Arc<parking_lot::Mutex<Vec<String>>>,
}

const CLOSE: &[u8] = b"<close>";

async fn machine(answers: &[&'static [u8]]) -> Machine {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let script = Arc::new(parking_lot::Mutex::new(answers.iter().copied().collect::<VecDeque<_>>()));
    let (count, seen) = (accepted.clone(), heads.clone());
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let (script, seen) = (script.clone(), seen.clone());
            tokio::spawn(async move {
                let mut read = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n @ 1..) = socket.read(&mut buf).await else { return };
                    read.extend_from_slice(&buf[..n]);
                    while let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.lock().push(String::from_utf8_lossy(&read[..end + 4]).into_owned());
                        read.drain(..end + 4);
                        let Some(answer) = script.lock().pop_front() else { return };
                        let (answer, close) = match answer.strip_suffix(CLOSE) {
                            Some(a) => (a, true),
                            None => (answer, false),
                        };
                        socket.write_all(answer).await.unwrap();
                        if close {
                            return;
                        }
                    }
                }
            });
        }
    });
    Machine { addr, accepted, heads }
}

fn get(method: &str, path: &str) -> Request<UpBody> {
    let body = UpBody::Whole(None);
    Request::builder().method(method).uri(path).header("host", "m").body(body).unwrap()
}

/// What a response came to: its status, body and trailers; or the error, from the head or
/// the body.
#[derive(Debug)]
struct Got {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
    trailers: Option<http::HeaderMap>,
}

async fn send(pool: &Arc<Pool>, addr: SocketAddr, method: &str) -> Result<Got, String> {
    let conn = pool.checkout(addr, Proto::Http1, false).await.unwrap();
    let (resp, lease) = match conn.send(get(method, "/x?y=1"), false).await {
        Ok(r) => r,
        Err(SendError::NotSent(_, e) | SendError::Failed(e)) => return Err(format!("head: {e}")),
    };
    assert!(lease.is_none(), "tern's own exchange gives its connection back from its body");
    assert!(matches!(resp.body(), MachineBody::Own(_)), "carried by tern's own exchange");
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let collected = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?;
    let trailers = collected.trailers().cloned();
    Ok(Got { status, headers, body: collected.to_bytes(), trailers })
}

/// Waits until the connection's socket has been given back to the pool or closed; over
/// loopback both are done once the body has been read, so this only lets a FIN land.
async fn settle() {
    tokio::task::yield_now().await;
}

#[tokio::test]
async fn a_length_framed_answer_is_read_and_its_connection_serves_the_next() {
    let m = machine(&[
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello",
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
    ])
    .await;
    let pool = pool();
    let got = send(&pool, m.addr, "GET").await.unwrap();
    assert_eq!((got.status, &got.body[..]), (200, &b"hello"[..]));
    let got = send(&pool, m.addr, "GET").await.unwrap();
    assert_eq!((got.status, got.body.len()), (404, 0));
    assert_eq!(m.accepted.load(Ordering::SeqCst), 1, "both on one connection");
    assert_eq!(m.heads.lock()[0], "GET /x?y=1 HTTP/1.1\r\nhost: m\r\n\r\n", "the head as written");
}

#[tokio::test]
async fn a_chunked_answer_is_read_by_its_chunks_extensions_and_trailers_included() {
    let m = machine(&[
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;name=v\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 7\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ])
    .await;
    let pool = pool();
    let got = send(&pool, m.addr, "GET").await.unwrap();
    assert_eq!(&got.body[..], b"hello world");
    assert_eq!(got.trailers.unwrap()["x-t"], "7");
    let got = send(&pool, m.addr, "GET").await.unwrap();
    assert_eq!(&got.body[..], b"ok");
    assert!(got.trailers.is_none());
    assert_eq!(m.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_answer_without_length_is_read_to_the_close_and_its_connection_not_reused() {
    let m =
        machine(&[b"HTTP/1.1 200 OK\r\n\r\nuntil the end<close>", b"HTTP/1.1 204 No Content\r\n\r\n"]).await;
    let pool = pool();
    assert_eq!(&send(&pool, m.addr, "GET").await.unwrap().body[..], b"until the end");
    assert_eq!(send(&pool, m.addr, "GET").await.unwrap().status, 204);
    assert_eq!(m.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn head_204_and_304_answers_have_no_body_whatever_their_length_says() {
    let m = machine(&[
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ])
    .await;
    let pool = pool();
    let got = send(&pool, m.addr, "HEAD").await.unwrap();
    assert_eq!((got.status, got.body.len()), (200, 0));
    assert_eq!(send(&pool, m.addr, "GET").await.unwrap().status, 204);
    assert_eq!(send(&pool, m.addr, "GET").await.unwrap().status, 304);
    assert_eq!(&send(&pool, m.addr, "GET").await.unwrap().body[..], b"ok", "the framing held");
    assert_eq!(m.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn informational_answers_are_read_past() {
    let m = machine(&[b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]).await;
    let got = send(&pool(), m.addr, "GET").await.unwrap();
    assert_eq!((got.status, &got.body[..]), (200, &b"ok"[..]));
}

#[tokio::test]
async fn connections_that_cannot_carry_another_exchange_are_closed() {
    for (method, answer) in [
        // Says so.
        ("GET", &b"HTTP/1.1 200 OK\r\nconnection: keep-alive, close\r\ncontent-length: 2\r\n\r\nok"[..]),
        // HTTP/1.0.
        ("GET", b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        // Framed two ways: read by its chunks.
        ("GET", b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        // More than its length said, in the same write.
        ("GET", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nno"),
        // A body after a HEAD answer.
        ("HEAD", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
        // Coded last by other than chunked, by the last of its fields: read to the close.
        ("GET", b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nok<close>"),
        ("GET", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\nok<close>"),
    ] {
        let what = String::from_utf8_lossy(answer);
        let m = machine(&[answer, b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes"]).await;
        let pool = pool();
        let got = send(&pool, m.addr, method).await.unwrap();
        assert_eq!(got.status, 200);
        let body: &[u8] = if method == "HEAD" { b"" } else { b"ok" };
        assert_eq!(&got.body[..], body, "{what}");
        settle().await;
        let next = send(&pool, m.addr, "GET").await.unwrap();
        assert_eq!(&next.body[..], b"yes", "{what}");
        assert_eq!(m.accepted.load(Ordering::SeqCst), 2, "{what}");
    }
}

#[tokio::test]
async fn malformed_answers_are_refused() {
    for (answer, expect) in [
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"[..],
            "head: a content-length",
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\nok", "head: a content-length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok", "head: a content-length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\nok", "head: a content-length"),
        (b"HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\n\r\n", "head: a malformed response head"),
        (b"HTTP/1.1 200 OK\r\nx-a : 1\r\n\r\n", "head: a malformed response head"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "head: a malformed response head"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", "body: a malformed chunked body"),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n",
            "body: a malformed chunked body",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokX\r\n0\r\n\r\n",
            "body: a malformed chunked body",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10000000000000000\r\n",
            "body: a malformed chunked body",
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort<close>", "body: the connection closed before"),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n<close>",
            "body: the connection closed before",
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-len<close>", "head: the connection closed in the response head"),
    ] {
        let m = machine(&[answer]).await;
        let got = send(&pool(), m.addr, "GET").await;
        let err = got.expect_err(&String::from_utf8_lossy(answer));
        assert!(err.starts_with(expect), "{err} for {}", String::from_utf8_lossy(answer));
    }
}

#[tokio::test]
async fn every_field_of_a_head_reaches_the_response_up_to_a_hundred() {
    let answer = |fields: usize| -> &'static [u8] {
        let fields: String = (0..fields).map(|i| format!("x-{i}: value {i}\r\n")).collect();
        format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{fields}\r\nok").into_bytes().leak()
    };
    // Up to the fields placed inline, one over, and the most a head may have.
    for fields in [23, 24, 99] {
        let m = machine(&[answer(fields)]).await;
        let got = send(&pool(), m.addr, "GET").await.unwrap();
        assert_eq!((got.status, &got.body[..]), (200, &b"ok"[..]));
        assert_eq!(got.headers.len(), fields + 1, "{fields} fields and the length");
        for i in 0..fields {
            assert_eq!(got.headers[format!("x-{i}").as_str()], format!("value {i}"), "field {i} of {fields}");
        }
    }
    let m = machine(&[answer(100)]).await;
    let err = send(&pool(), m.addr, "GET").await.unwrap_err();
    assert!(err.contains("over 100 header fields"), "{err}");
}

#[tokio::test]
async fn a_head_over_the_limit_is_refused_as_too_large() {
    let many: &'static [u8] = Box::leak(
        format!("HTTP/1.1 200 OK\r\n{}\r\n", "x-a: 1\r\n".repeat(101)).into_bytes().into_boxed_slice(),
    );
    let long: &'static [u8] = Box::leak(
        format!("HTTP/1.1 200 OK\r\nx-a: {}\r\n\r\n", "a".repeat(20 * 1024)).into_bytes().into_boxed_slice(),
    );
    for answer in [many, long] {
        let m = machine(&[answer]).await;
        let conn = pool().checkout(m.addr, Proto::Http1, false).await.unwrap();
        match conn.send(get("GET", "/"), false).await {
            Err(SendError::Failed(e)) => assert!(e.is_too_large(), "{e}"),
            Err(SendError::NotSent(_, e)) => panic!("refused, not handed back: {e}"),
            Ok((resp, _)) => panic!("refused, not answered {}", resp.status()),
        }
    }
}

#[tokio::test]
async fn a_pooled_connection_its_machine_closed_is_not_used() {
    let m = machine(&[
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok<close>",
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes",
    ])
    .await;
    let pool = pool();
    assert_eq!(&send(&pool, m.addr, "GET").await.unwrap().body[..], b"ok");
    // Closed by the machine without a word: the connection went back to the pool, and the
    // FIN comes after.
    let mut got = None;
    for _ in 0..2 {
        let conn = pool.checkout(m.addr, Proto::Http1, false).await.unwrap();
        match conn.send(get("GET", "/"), false).await {
            Ok((resp, _)) => {
                got = Some(resp.into_body().collect().await.unwrap().to_bytes());
                break;
            }
            // Seen dead only once written to: the request comes back, to go on a new one.
            Err(SendError::NotSent(..)) => {}
            Err(SendError::Failed(e)) => panic!("{e}"),
        }
    }
    assert_eq!(got.as_deref(), Some(&b"yes"[..]));
    assert_eq!(m.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_request_with_a_body_or_another_method_goes_through_hyper_on_the_same_pool() {
    let m = machine(&[
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ])
    .await;
    let pool = pool();
    send(&pool, m.addr, "GET").await.unwrap();
    let conn = pool.checkout(m.addr, Proto::Http1, false).await.unwrap();
    let Ok((resp, lease)) = conn.send(get("DELETE", "/"), false).await else { panic!("answered") };
    assert!(matches!(resp.body(), MachineBody::Hyper(_)));
    assert_eq!(resp.status(), 201);
    resp.into_body().collect().await.unwrap();
    lease.expect("hyper's connection is leased").release();
    settle().await;
    let conn = pool.checkout(m.addr, Proto::Http1, false).await.unwrap();
    assert!(conn.reused(), "the socket hyper had is taken again");
    let Ok((resp, _)) = conn.send(get("GET", "/"), false).await else { panic!("answered") };
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
    assert_eq!(m.accepted.load(Ordering::SeqCst), 1, "one socket, passed between the two");
}

fn post(body: &'static str, length: Option<&str>) -> Request<UpBody> {
    let mut req = Request::builder().method("POST").uri("/rpc").header("host", "m");
    if let Some(length) = length {
        req = req.header("content-length", length);
    }
    req.body(UpBody::Whole(Some(Bytes::from_static(body.as_bytes())))).unwrap()
}

#[tokio::test]
async fn a_whole_body_goes_with_its_head_and_is_never_sent_twice() {
    let m = machine(&[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", CLOSE]).await;
    let pool = pool();
    let conn = pool.checkout(m.addr, Proto::Http1, false).await.unwrap();
    let Ok((resp, _)) = conn.send(post("hello", Some("5")), false).await else { panic!("answered") };
    assert!(matches!(resp.body(), MachineBody::Own(_)), "carried by tern's own exchange");
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
    settle().await;
    // The machine closes the connection on the next request without a word: a POST it may
    // have acted on is not sent again on another connection.
    let conn = pool.checkout(m.addr, Proto::Http1, false).await.unwrap();
    assert!(conn.reused());
    match conn.send(post("again", Some("5")), false).await {
        Err(SendError::Failed(_)) => {}
        Err(SendError::NotSent(..)) => panic!("handed back to be sent again"),
        Ok((resp, _)) => panic!("answered {}", resp.status()),
    }
    let heads = m.heads.lock().clone();
    assert!(
        heads[0].starts_with("POST /rpc HTTP/1.1\r\n") && heads[0].contains("content-length: 5\r\n"),
        "{heads:?}"
    );
    // The machine reads heads only: the first body is what precedes the second head.
    assert!(heads[1].starts_with("helloPOST /rpc HTTP/1.1\r\n"), "{heads:?}");
    assert_eq!(m.accepted.load(Ordering::SeqCst), 1);
}

#[test]
fn a_whole_body_is_written_by_tern_only_as_long_as_its_length_says() {
    assert!(super::fits(&post("hello", Some("5")), false));
    assert!(super::fits(&post("", Some("0")), false));
    assert!(!super::fits(&post("hello", Some("5")), true), "an upgrade is hyper's");
    assert!(!super::fits(&post("hello", Some("4")), false), "a length that disagrees");
    assert!(!super::fits(&post("hello", None), false), "no length");
    assert!(!super::fits(&post("", None), false), "a POST without a length");
    assert!(super::fits(&get("GET", "/"), false));
}

/// Two fields beside the map's, as tern's forwarding fields go.
struct Beside;

impl crate::upstream::Extra for Beside {
    fn write(&self, buf: &mut bytes::BytesMut) {
        buf.extend_from_slice(b"x-one: 1\r\nx-two: 2\r\n");
    }

    fn add_to(&self, headers: &mut http::HeaderMap) {
        headers.insert("x-one", http::HeaderValue::from_static("1"));
        headers.insert("x-two", http::HeaderValue::from_static("2"));
    }
}

#[tokio::test]
async fn fields_beside_the_map_go_after_its_own_by_either_sender_and_are_not_kept() {
    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let m = machine(&[ok, ok]).await;
    let pool = pool();
    // tern's own exchange writes them into the head; the fields kept are the map's.
    let conn = pool.checkout(m.addr, Proto::Http1, false).await.unwrap();
    let mut kept = None;
    let Ok((resp, _)) = conn.send_keeping(get("GET", "/a"), false, Some(&mut kept), Some(&Beside)).await
    else {
        panic!("the machine answers")
    };
    assert!(matches!(resp.body(), MachineBody::Own(_)));
    resp.into_body().collect().await.unwrap();
    assert_eq!(m.heads.lock()[0], "GET /a HTTP/1.1\r\nhost: m\r\nx-one: 1\r\nx-two: 2\r\n\r\n");
    let kept = kept.expect("kept");
    assert_eq!(kept.len(), 1, "only the map's own: {kept:?}");

    // hyper's client gets them in the map; the fields kept are still the map's alone.
    let conn = pool.checkout(m.addr, Proto::Http1, false).await.unwrap();
    let body = UpBody::stream(
        http_body_util::Full::new(Bytes::from_static(b"hi"))
            .map_err(|e| -> crate::upstream::BoxError { match e {} }),
    );
    let post = Request::builder().method("POST").uri("/b").header("host", "m").body(body).unwrap();
    let mut kept = None;
    let Ok((resp, lease)) = conn.send_keeping(post, false, Some(&mut kept), Some(&Beside)).await else {
        panic!("the machine answers")
    };
    assert!(matches!(resp.body(), MachineBody::Hyper(_)), "a streamed body goes through hyper");
    resp.into_body().collect().await.unwrap();
    drop(lease);
    let head = m.heads.lock()[1].clone();
    assert!(head.starts_with("POST /b HTTP/1.1\r\n"), "{head}");
    for line in ["\r\nx-one: 1\r\n", "\r\nx-two: 2\r\n"] {
        assert_eq!(head.matches(line).count(), 1, "{line:?} once in {head}");
    }
    assert_eq!(kept.expect("kept").len(), 1);
}

#[tokio::test]
async fn fields_only_for_this_connection_are_left_out_unless_they_name_another() {
    let m = machine(&[
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\ncontent-length: 1\r\nx-a: 1\r\n\r\na",
        b"HTTP/1.1 200 OK\r\nconnection: Keep-Alive, x-hop\r\nx-hop: 2\r\ncontent-length: 1\r\n\r\nb",
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nc",
    ])
    .await;
    let pool = pool();
    let got = send(&pool, m.addr, "GET").await.unwrap();
    let names: Vec<&str> = got.headers.keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["content-length", "x-a"], "keep-alive and its connection field left out");
    let got = send(&pool, m.addr, "GET").await.unwrap();
    assert_eq!(got.headers["connection"], "Keep-Alive, x-hop", "kept: it names a field to strip");
    assert_eq!(got.headers["x-hop"], "2", "stripped on the client's side, not here");
    let got = send(&pool, m.addr, "GET").await.unwrap();
    assert_eq!((&got.body[..], got.headers.get("connection")), (&b"c"[..], None));
    settle().await;
    let _ = send(&pool, m.addr, "GET").await;
    assert_eq!(m.accepted.load(Ordering::SeqCst), 2, "a close still ends its connection");
}

/// A response body waiting for its machine (a stream between events) holds no read buffer:
/// an idle SSE stream kept 8 KiB for nothing. The bytes that come after the wait are read
/// whole, into a buffer made when they come.
#[tokio::test]
async fn a_body_waiting_for_its_machine_holds_no_read_buffer() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gate = Arc::new(tokio::sync::Notify::new());
    let open = gate.clone();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let mut read = Vec::new();
        while !read.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = socket.read(&mut buf).await.unwrap();
            read.extend_from_slice(&buf[..n]);
        }
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        socket.write_all(format!("{head}b\r\ndata: one\n\n\r\n").as_bytes()).await.unwrap();
        open.notified().await;
        socket.write_all(b"b\r\ndata: two\n\n\r\n0\r\n\r\n").await.unwrap();
        let _ = socket.read(&mut buf).await;
    });
    let pool = pool();
    let conn = pool.checkout(addr, Proto::Http1, false).await.unwrap();
    let Ok((resp, _)) = conn.send(get("GET", "/sse"), false).await else { panic!("no answer") };
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: one\n\n");
    // Nothing more until the machine says so: the body waits, and holds no buffer meanwhile.
    let waiting = futures_util::poll!(body.frame());
    assert!(waiting.is_pending(), "nothing came yet");
    let MachineBody::Own(own) = &body else { panic!("carried by tern's own exchange") };
    assert_eq!(own.buf.capacity(), 0, "no read buffer while the body waits");
    gate.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(&rest[..], b"data: two\n\n");
}
