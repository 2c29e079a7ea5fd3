//! A real HTTP/1.1 (and h2c) server on 127.0.0.1:0, standing in for an app's machine.
//!
//! Paths:
//! - `/echo`: JSON with the method, path, version and every request header
//! - `/id`: the backend's name (its machine id)
//! - `/sse`: `text/event-stream`; sends "one", waits for the test to open the gate, sends "two"
//! - `/ticks?n=N&gap_ms=G`: N events, G ms apart
//! - `/silent`: response head, then nothing, forever
//! - `/hang`: no response until the gate opens, then 200 "released"
//! - `/download?bytes=N`: N bytes in 64 KiB chunks, streamed
//! - `/upload`: reads the body as it streams and answers with its length
//! - `/trailers`: reads the body and answers with its trailers (`name=value`), chunked, with a
//!   `x-checksum` trailer of its own (the body's length)
//! - `/ws`: WebSocket echo
//! - `/seq`: how many requests this backend has had, this one included (arrival order)
//! - `/pid`: the process id of the machine (for a backend in its own process)
//! - `/release`: opens the gate (for a backend in another process: `examples/test_machine.rs`)
//! - `/healthz`: 200 "ok", or 503 after `/sick` until `/well`

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;

type Body = BoxBody<Bytes, Infallible>;

pub struct Backend {
    pub addr: SocketAddr,
    /// Opens `/sse` and `/hang`.
    pub gate: Arc<Notify>,
    pub requests: Arc<AtomicUsize>,
    /// TCP connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    /// The status code of each WebSocket close frame `/ws` has received.
    pub ws_closes: Arc<parking_lot::Mutex<Vec<u16>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct State {
    name: String,
    gate: Arc<Notify>,
    requests: Arc<AtomicUsize>,
    sick: std::sync::atomic::AtomicBool,
    ws_closes: Arc<parking_lot::Mutex<Vec<u16>>>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Listens on `addr` with SO_REUSEPORT, so a port the test reserved
    /// (`harness::reserve_port`) can be taken.
    pub async fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let listener = listen_shared(addr);
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(Notify::new());
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = connections.clone();
        let ws_closes = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let state = Arc::new(State {
            name: name.into(),
            gate: gate.clone(),
            requests: requests.clone(),
            sick: std::sync::atomic::AtomicBool::new(false),
            ws_closes: ws_closes.clone(),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(state, req).await) }
                    });
                    // auto: HTTP/1.1 with upgrades, or h2c with prior knowledge.
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend { addr, gate, requests, connections, ws_closes, task }
    }
}

/// A listener that may share its port with the test's reservation of it (same user, both
/// SO_REUSEPORT); the reservation never listens, so every connection comes here.
fn listen_shared(addr: SocketAddr) -> TcpListener {
    let socket =
        socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.set_reuse_port(true).unwrap();
    socket.set_nonblocking(true).unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(1024).unwrap();
    TcpListener::from_std(socket.into()).unwrap()
}

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed()
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Every `key=value` of the query, percent-decoded.
fn params(req: &Request<Incoming>) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' if i + 2 < b.len() => {
                    out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                    i += 3;
                }
                b'+' => {
                    out.push(b' ');
                    i += 1;
                }
                c => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8(out).unwrap()
    }
    let Some(q) = req.uri().query() else { return Vec::new() };
    q.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (decode(k), decode(v))).collect()
}

async fn handle(state: Arc<State>, mut req: Request<Incoming>) -> Response<Body> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    // `replay=VALUE` answers any path with `fly-replay: VALUE`, on the machine `only` names
    // (every machine without it), unless the request has the header `unless` names; each
    // `replay_header=name:value` adds a header to that answer.
    let params = params(&req);
    let mine = params.iter().filter(|(k, _)| k == "only").all(|(_, v)| *v == state.name)
        && !params.iter().any(|(k, v)| k == "unless" && req.headers().contains_key(v.as_str()));
    if mine && let Some((_, value)) = params.iter().find(|(k, _)| k == "replay") {
        // Read first, as a well-behaved server does: one that closes with a body unread
        // resets the connection, and the client may lose the answer with it.
        let _ = req.into_body().collect().await;
        let mut r = Response::new(full("replay elsewhere"));
        r.headers_mut().insert("fly-replay", value.parse().unwrap());
        for (_, v) in params.iter().filter(|(k, _)| k == "replay_header") {
            let (name, value) = v.split_once(':').unwrap();
            r.headers_mut()
                .append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        return r;
    }
    match req.uri().path() {
        "/id" => Response::new(full(state.name.clone())),
        "/pid" => Response::new(full(std::process::id().to_string())),
        "/seq" => Response::new(full(state.requests.load(Ordering::SeqCst).to_string())),
        "/echo" => {
            let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (k, v) in req.headers() {
                headers.entry(k.as_str().into()).or_default().push(v.to_str().unwrap_or("").into());
            }
            let (method, path, version) =
                (req.method().to_string(), req.uri().path().to_string(), format!("{:?}", req.version()));
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            if mine && let Some((_, json)) = params.iter().find(|(k, _)| k == "replay_json") {
                let mut r = Response::new(full(json.clone()));
                r.headers_mut().insert("content-type", "application/vnd.fly.replay+json".parse().unwrap());
                return r;
            }
            let v = serde_json::json!({
                "method": method,
                "path": path,
                "version": version,
                "headers": headers,
                "machine": state.name,
                "body": String::from_utf8_lossy(&body),
            });
            let mut r = Response::new(full(v.to_string()));
            r.headers_mut().insert("content-type", "application/json".parse().unwrap());
            // `set=name:value` adds a response header, on the machine `only` names (all without
            // it); `set_any=name:value` on every machine.
            for (k, v) in &params {
                if (k == "set" && mine || k == "set_any")
                    && let Some((name, value)) = v.split_once(':')
                {
                    r.headers_mut().append(
                        http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                        value.parse().unwrap(),
                    );
                }
            }
            r
        }
        "/sse" => {
            let gate = state.gate.clone();
            let stream = async_stream(move |tx| async move {
                let _ = tx.send(Bytes::from_static(b"data: one\n\n")).await;
                gate.notified().await;
                let _ = tx.send(Bytes::from_static(b"data: two\n\n")).await;
            });
            sse(stream)
        }
        "/ticks" => {
            let n = query(&req, "n").unwrap_or(5);
            let gap = Duration::from_millis(query(&req, "gap_ms").unwrap_or(10));
            sse(async_stream(move |tx| async move {
                for i in 0..n {
                    if tx.send(Bytes::from(format!("data: tick {i}\n\n"))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(gap).await;
                }
            }))
        }
        "/silent" => sse(async_stream(|tx| async move {
            let _open = tx;
            std::future::pending::<()>().await
        })),
        "/hang" => {
            state.gate.notified().await;
            Response::new(full("released"))
        }
        "/download" => {
            let total = query(&req, "bytes").unwrap_or(0);
            let mut r = Response::new(BoxBody::new(StreamBody::new(
                async_stream(move |tx| async move {
                    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                    let mut left = total as usize;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        if tx.send(chunk.slice(..n)).await.is_err() {
                            return;
                        }
                        left -= n;
                    }
                })
                .map(|b| Ok::<_, Infallible>(Frame::data(b))),
            )));
            r.headers_mut().insert("content-length", total.into());
            r
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut n: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => break,
                }
            }
            Response::new(full(n.to_string()))
        }
        "/trailers" => trailers(req.into_body()).await,
        "/ws" => websocket(&mut req, state.ws_closes.clone()),
        "/release" => {
            state.gate.notify_waiters();
            Response::new(full("released"))
        }
        "/sick" | "/well" => {
            state.sick.store(req.uri().path() == "/sick", Ordering::SeqCst);
            Response::new(full("ok"))
        }
        "/healthz" if state.sick.load(Ordering::SeqCst) => {
            let mut r = Response::new(full("sick"));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        }
        "/healthz" => Response::new(full("ok")),
        _ => {
            let mut r = Response::new(full("not found"));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}

async fn trailers(mut body: Incoming) -> Response<Body> {
    let (mut len, mut got) = (0usize, Vec::new());
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            len += d.len();
        }
        if let Some(t) = frame.trailers_ref() {
            got.extend(t.iter().map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or(""))));
        }
    }
    let mut trailer = http::HeaderMap::new();
    trailer.insert("x-checksum", len.into());
    let frames =
        vec![Ok::<_, Infallible>(Frame::data(Bytes::from(got.join(",")))), Ok(Frame::trailers(trailer))];
    let mut r = Response::new(BoxBody::new(StreamBody::new(futures_util::stream::iter(frames))));
    r.headers_mut().insert("trailer", "x-checksum".parse().unwrap());
    r
}

fn sse(stream: impl futures_util::Stream<Item = Bytes> + Send + Sync + 'static) -> Response<Body> {
    let body = StreamBody::new(stream.map(|b| Ok::<_, Infallible>(Frame::data(b))));
    let mut r = Response::new(BoxBody::new(body));
    r.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
    r
}

/// A stream fed by a task: back-pressure comes from the channel's capacity of one.
fn async_stream<F, Fut>(f: F) -> impl futures_util::Stream<Item = Bytes> + Send + Sync + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(f(tx));
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) })
}

fn websocket(req: &mut Request<Incoming>, closes: Arc<parking_lot::Mutex<Vec<u16>>>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let mut r = Response::new(full("not a websocket request"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else { return };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let (mut tx, mut rx) = ws.split();
        while let Some(Ok(msg)) = rx.next().await {
            if msg.is_text() || msg.is_binary() {
                if tx.send(msg).await.is_err() {
                    return;
                }
            } else if let tokio_tungstenite::tungstenite::Message::Close(frame) = msg {
                closes.lock().push(frame.map_or(1005, |f| u16::from(f.code)));
                return;
            }
        }
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", "websocket".parse().unwrap());
    h.insert("connection", "Upgrade".parse().unwrap());
    h.insert("sec-websocket-accept", accept.parse().unwrap());
    r
}
