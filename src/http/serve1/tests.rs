use super::*;

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;

/// The date in a head, whoever wrote it, as one placeholder: two writers a second apart
/// differ there and nowhere else.
fn undated(head: &[u8]) -> String {
    let text = String::from_utf8_lossy(head);
    text.split("\r\n")
        .map(|l| if l.starts_with("date: ") { "date: <date>" } else { l })
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// The head hyper's HTTP/1.1 server writes for `make()`'s response to a `method` request.
async fn hyper_head(method: &str, make: fn() -> Response<ProxyBody>) -> String {
    hyper_head_asked(method, "", make).await
}

/// [`hyper_head`] for a request whose head also holds the field lines `extra`.
async fn hyper_head_asked(method: &str, extra: &str, make: fn() -> Response<ProxyBody>) -> String {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let svc = service_fn(move |_req| async move { Ok::<_, std::convert::Infallible>(make()) });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), svc);
    let serving = tokio::spawn(conn);
    let mut client = client;
    client.write_all(format!("{method} / HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = client.read(&mut byte).await.unwrap();
        assert_eq!(n, 1, "hyper closed before the end of its head: {:?}", String::from_utf8_lossy(&got));
        got.push(byte[0]);
    }
    serving.abort();
    undated(&got)
}

fn own_head(method: &Method, make: fn() -> Response<ProxyBody>) -> (String, Framing) {
    let (mut parts, body) = make().into_parts();
    let mut w = Vec::new();
    let framing = encode_head(&mut w, method, &mut parts, &body).expect("sendable");
    (undated(&w), framing)
}

fn with(status: u16, headers: &[(&'static str, &'static str)], body: ProxyBody) -> Response<ProxyBody> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    for (n, v) in headers {
        r.headers_mut().append(*n, HeaderValue::from_static(v));
    }
    r
}

/// Every head tern's own server writes is the one hyper's server would have written for the
/// same response, byte for byte (the date aside): lengths added or kept, bodies framed or
/// dropped for HEAD, 204 and 304, joined `connection` values, reasons, HTTP/1.0 answers.
#[tokio::test]
async fn response_heads_are_hypers_byte_for_byte() {
    let cases: Vec<fn() -> Response<ProxyBody>> = vec![
        || with(200, &[], ProxyBody::full(Bytes::from_static(b"hello"))),
        || with(200, &[], ProxyBody::empty()),
        || with(200, &[("content-length", "5"), ("x-a", "1")], ProxyBody::full(Bytes::from_static(b"hello"))),
        || with(200, &[("content-length", "5")], ProxyBody::empty()),
        || with(404, &[("content-type", "text/plain")], ProxyBody::full(Bytes::from_static(b"nope"))),
        || with(204, &[("content-length", "0"), ("x-b", "2")], ProxyBody::empty()),
        || with(304, &[("etag", "\"x\"")], ProxyBody::empty()),
        || with(304, &[("content-length", "12")], ProxyBody::empty()),
        || with(200, &[("connection", "close")], ProxyBody::full(Bytes::from_static(b"bye"))),
        || with(200, &[("connection", "x-one"), ("connection", "close")], ProxyBody::empty()),
        || with(200, &[("date", "Sun, 06 Nov 1994 08:49:37 GMT")], ProxyBody::empty()),
        || {
            with(
                200,
                &[("set-cookie", "a=1"), ("set-cookie", "b=2"), ("via", "1.1 tern")],
                ProxyBody::empty(),
            )
        },
        || with(503, &[("trailer", "x-sum")], ProxyBody::full(Bytes::from_static(b"x"))),
        || with(599, &[], ProxyBody::empty()),
        || {
            let mut r = with(200, &[], ProxyBody::full(Bytes::from_static(b"ok")));
            r.extensions_mut().insert(hyper::ext::ReasonPhrase::from_static(b"Fine Thanks"));
            r
        },
        || {
            let mut r = with(200, &[], ProxyBody::full(Bytes::from_static(b"ok")));
            *r.version_mut() = Version::HTTP_10;
            r
        },
    ];
    for (i, make) in cases.into_iter().enumerate() {
        for method in [Method::GET, Method::HEAD] {
            let theirs = hyper_head(method.as_str(), make).await;
            let (ours, framing) = own_head(&method, make);
            assert_eq!(ours, theirs, "case {i}, {method}");
            let status = make().status();
            let bodiless = method == Method::HEAD
                || matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
                || make().body().is_end_stream();
            assert_eq!(framing.body, !bodiless, "case {i}, {method}: {framing:?}");
        }
    }
}

/// A `Connection: close` answer is the connection's last; lengths that disagree are not sent.
#[test]
fn the_framing_says_when_the_connection_ends() {
    let (_, f) = own_head(&Method::GET, || with(200, &[("connection", "Close")], ProxyBody::empty()));
    assert!(f.last);
    let (_, f) = own_head(&Method::GET, || with(200, &[], ProxyBody::full(Bytes::from_static(b"abc"))));
    assert_eq!((f.last, f.length, f.chunked), (false, Some(3), false));
    let (mut parts, body) = with(100, &[], ProxyBody::empty()).into_parts();
    assert!(encode_head(&mut Vec::new(), &Method::GET, &mut parts, &body).is_none(), "a 1xx final answer");
}

fn take(bytes: &[u8]) -> (Result<Request<RequestBody>, Decline>, BytesMut) {
    let (r, rbuf) = take_asked(bytes);
    (r.map(|(req, _)| req), rbuf)
}

/// [`take`], with whether the client asked to close after the request.
fn take_asked(bytes: &[u8]) -> (Result<(Request<RequestBody>, bool), Decline>, BytesMut) {
    let mut rbuf = BytesMut::from(bytes);
    let r = take_request(&mut rbuf, &mut None, 64 * 1024);
    (r, rbuf)
}

/// Browsers send `Connection: keep-alive`, and many clients `Connection: close`: both are
/// served here, and only the second ends the connection. A `Connection` that names anything
/// else (a field to drop, an upgrade) is hyper's.
#[test]
fn keep_alive_and_close_are_taken_and_any_other_connection_token_is_not() {
    for (head, closes) in [
        (&b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"[..], false),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive\r\n\r\n", false),
        (b"GET / HTTP/1.1\r\nHost: a\r\nconnection: close\r\n\r\n", true),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, CLOSE\r\n\r\n", true),
        (b"GET / HTTP/1.1\r\nConnection: keep-alive\r\nHost: a\r\nConnection: close\r\n\r\n", true),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection:\r\n\r\n", false),
        (b"GET / HTTP/1.1\r\nKeep-Alive: 300\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", false),
    ] {
        let (r, rest) = take_asked(head);
        let (req, asked) =
            r.unwrap_or_else(|e| panic!("{:?} not taken: {e:?}", String::from_utf8_lossy(head)));
        assert_eq!(asked, closes, "{:?}", String::from_utf8_lossy(head));
        assert!(rest.is_empty());
        assert_eq!(req.headers()["host"], "a");
        // Read, and not kept for the machine's request, which would have them stripped.
        assert_eq!(req.headers().len(), 1, "{:?}", String::from_utf8_lossy(head));
    }
    for head in [
        &b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-secret\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nConnection: upgrade\r\n\r\n",
    ] {
        let (r, rest) = take_asked(head);
        assert!(r.is_err(), "{:?} was taken", String::from_utf8_lossy(head));
        assert_eq!(&rest[..], head, "left whole");
    }
}

/// The answer to a request that asked to close is hyper's, byte for byte: `close` said in
/// its `Connection` (added, or joined to what the response had), and the connection ends.
/// One that said `keep-alive` is answered as one that said nothing.
#[tokio::test]
async fn a_request_that_asks_to_close_is_answered_as_hyper_answers_it() {
    let cases: Vec<fn() -> Response<ProxyBody>> = vec![
        || with(200, &[], ProxyBody::full(Bytes::from_static(b"hello"))),
        || with(404, &[("content-type", "text/plain")], ProxyBody::empty()),
        || with(200, &[("connection", "close")], ProxyBody::full(Bytes::from_static(b"bye"))),
        || with(200, &[("connection", "x-one")], ProxyBody::full(Bytes::from_static(b"x"))),
    ];
    for (i, make) in cases.into_iter().enumerate() {
        for method in [Method::GET, Method::HEAD] {
            let theirs = hyper_head_asked(method.as_str(), "Connection: close\r\n", make).await;
            let (mut parts, body) = make().into_parts();
            close_after(&mut parts.headers);
            let mut w = Vec::new();
            let framing = encode_head(&mut w, &method, &mut parts, &body).expect("sendable");
            assert_eq!(undated(&w), theirs, "case {i}, {method}");
            assert!(framing.last, "case {i}, {method}: the connection ends after it");

            let theirs = hyper_head_asked(method.as_str(), "Connection: keep-alive\r\n", make).await;
            assert_eq!(own_head(&method, make).0, theirs, "case {i}, {method}, keep-alive");
        }
    }
}

/// A plain GET is taken off the buffer, head and nothing more; what follows it (a pipelined
/// request) stays.
#[test]
fn a_plain_request_is_taken_and_what_follows_stays() {
    let (req, rest) = take(b"GET /a?b=c HTTP/1.1\r\nHost: app.test\r\nX-Two: 1\r\nx-two: 2\r\n\r\nGET /next");
    let req = req.expect("taken");
    assert_eq!((req.method(), req.uri().to_string().as_str()), (&Method::GET, "/a?b=c"));
    assert_eq!(req.headers()["host"], "app.test");
    assert_eq!(req.headers().get_all("x-two").iter().count(), 2);
    assert!(req.body().is_end_stream());
    assert_eq!(&rest[..], b"GET /next");
    // Bare LF line ends are httparse's to accept, for hyper as here.
    let (req, _) = take(b"GET / HTTP/1.1\nHost: a\n\n");
    assert_eq!(req.expect("taken").headers()["host"], "a");
    for method in ["HEAD", "OPTIONS"] {
        let (req, _) = take(format!("{method} / HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
        assert_eq!(req.expect("taken").method().as_str(), method);
    }
}

/// Everything that bears on framing, another version or method, a target that is not a path,
/// and anything httparse refuses is hyper's; the buffer is left whole for it.
#[test]
fn every_other_head_is_left_whole_for_hyper() {
    let not_ours: &[&[u8]] = &[
        b"POST / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nconnection: close, x-drop-me\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
        b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"G\x01T / HTTP/1.1\r\nHost: a\r\n\r\n",
        // httparse takes these targets, the URI parser does not: refused after the head is
        // split off, and put back with what follows it.
        b"GET /a<b HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /`x` HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n",
        // A body framed any way but one plain length, or larger than is read whole.
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +2\r\n\r\nab",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 02\r\n\r\nab",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 65537\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
        b"PROPFIND / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab",
    ];
    for head in not_ours {
        let (r, rest) = take(head);
        assert!(r.is_err(), "{:?} was taken", String::from_utf8_lossy(head));
        assert_eq!(&rest[..], *head, "left whole");
    }
    let (r, rest) = take(b"GET / HTTP/1.1\r\nHost: a\r\n");
    assert_eq!(r.unwrap_err(), Decline::Partial);
    assert_eq!(&rest[..], b"GET / HTTP/1.1\r\nHost: a\r\n");
    // Up to the fields placed inline, one over, and the most a head may have: all taken.
    for count in [24, 25, 100] {
        let fields: String = (0..count).map(|i| format!("x-{i}: value {i}\r\n")).collect();
        let (r, rest) = take(format!("GET / HTTP/1.1\r\n{fields}\r\n").as_bytes());
        let headers = r.expect("taken").into_parts().0.headers;
        assert!(rest.is_empty());
        assert_eq!(headers.len(), count);
        assert!((0..count).all(|i| headers[format!("x-{i}").as_str()] == format!("value {i}").as_str()));
    }
    let fields: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
    let (r, _) = take(format!("GET / HTTP/1.1\r\n{fields}\r\n").as_bytes());
    assert_eq!(r.unwrap_err(), Decline::NotOurs, "over 100 fields: hyper refuses it");
    let mut rbuf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..]);
    assert_eq!(take_request(&mut rbuf, &mut None, 20).unwrap_err(), Decline::NotOurs, "over the head limit");
}

/// A body with one plain length is read whole behind its head, what follows it left for
/// the next request; one not all there yet says how many bytes make the request, and
/// leaves the buffer whole.
#[test]
fn a_body_with_a_plain_length_is_taken_whole_once_it_is_all_there() {
    let (r, rest) =
        take(b"POST /rpc HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n");
    let req = r.expect("taken");
    assert_eq!((req.method(), req.headers()["content-length"].as_bytes()), (&Method::POST, &b"5"[..]));
    assert_eq!(req.body().whole().map(|b| &b[..]), Some(&b"hello"[..]));
    assert_eq!(&rest[..], b"GET / HTTP/1.1\r\n");
    let (r, _) = take(b"DELETE /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(r.expect("taken").body().whole().map(|b| b.len()), Some(0));
    let head = b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel";
    let (r, rest) = take(head);
    assert_eq!(r.unwrap_err(), Decline::Body(head.len() + 2));
    assert_eq!(&rest[..], &head[..], "left whole");
}
