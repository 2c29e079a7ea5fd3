//! Long-lived streams through a proxy, for the upgrade and drain harnesses
//! (`tests/upgrade/run.sh`): N SSE streams and M WebSockets, each on its own connection,
//! every one reconnected at once when it ends, with a record of how and when each ended.
//!
//! Usage:
//! `stream_load --addr 127.0.0.1:PORT --host streams.test --sse 500 --ws 100 [--status FILE]`
//!
//! - SSE: `GET --sse-path` (default `/ticks?n=1000000&gap_ms=500`, the test backend's endless
//!   ticker). A stream's end is `sse_boundary` (the body ended cleanly right after a blank
//!   line: a whole last event), `sse_cut` (ended cleanly mid-event), `sse_empty` (no byte),
//!   or `sse_error` (the connection broke before the body's end).
//! - WebSocket: `GET --ws-path` (default `/ws`, an echo), a text message every
//!   `--ws-interval-ms`; its end is `ws_close` with the close code, `ws_eof` (closed without a
//!   close frame) or `ws_error`.
//! - A failed (re)connect is recorded (`refused`, `reset`, `timeout`, `status 502 …`, …) and
//!   retried after 100 ms; `--no-reconnect` stops a slot after its first stream ends.
//!
//! Every `--status-ms` it replaces `--status FILE` with the counts so far (open streams, the
//! oldest open stream's start, the stalest open stream's last data). On SIGTERM, SIGINT or
//! after `--duration` seconds it prints one JSON summary on stdout (`--out FILE` instead):
//! every connection (`opened`, `ended`, `end`, `code`, `events`), every failed connect, and
//! the counts. Times are seconds since the Unix epoch, so a driver can line them up with its
//! own clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Where to connect (the proxy's listener).
    #[arg(long)]
    addr: std::net::SocketAddr,
    /// The Host header (and WebSocket URL authority).
    #[arg(long)]
    host: String,
    #[arg(long, default_value_t = 500)]
    sse: usize,
    #[arg(long, default_value_t = 100)]
    ws: usize,
    #[arg(long, default_value = "/ticks?n=1000000&gap_ms=500")]
    sse_path: String,
    #[arg(long, default_value = "/ws")]
    ws_path: String,
    #[arg(long, default_value_t = 500)]
    ws_interval_ms: u64,
    /// Stop each slot after its first stream ends.
    #[arg(long)]
    no_reconnect: bool,
    /// First connections opened at once (the initial ramp only; reconnects are not held back).
    #[arg(long, default_value_t = 50)]
    ramp: usize,
    /// Time for a connect plus response head (or WebSocket handshake).
    #[arg(long, default_value_t = 5000)]
    connect_timeout_ms: u64,
    #[arg(long)]
    status: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 250)]
    status_ms: u64,
    /// Stop by itself after this many seconds (0: only on a signal).
    #[arg(long, default_value_t = 0)]
    duration: u64,
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

const CONNECTING: u8 = 0;
const OPEN: u8 = 1;
const DONE: u8 = 2;

/// One stream's live state, read by the status writer.
#[derive(Default)]
struct Slot {
    state: AtomicU8,
    /// f64 bits: when the current stream opened, and when it last received data.
    opened: AtomicU64,
    last_data: AtomicU64,
}

impl Slot {
    fn set_time(cell: &AtomicU64, t: f64) {
        cell.store(t.to_bits(), Ordering::Relaxed);
    }
    fn time(cell: &AtomicU64) -> f64 {
        f64::from_bits(cell.load(Ordering::Relaxed))
    }
}

struct Shared {
    args: Args,
    slots: Vec<Slot>,
    conns: parking_lot::Mutex<Vec<Value>>,
    failures: parking_lot::Mutex<Vec<Value>>,
    ends: AtomicUsize,
    ramp: Semaphore,
    stop: watch::Receiver<bool>,
}

/// How one stream ended, and when (the end of the body, the close frame's arrival, the error).
struct End {
    end: String,
    code: Option<u16>,
    events: u64,
    detail: String,
    at: f64,
}

impl End {
    fn new(end: &str, events: u64, detail: impl Into<String>) -> End {
        End { end: end.into(), code: None, events, detail: detail.into(), at: now() }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let (stop_tx, stop) = watch::channel(false);
    let total = args.sse + args.ws;
    let shared = Arc::new(Shared {
        slots: (0..total).map(|_| Slot::default()).collect(),
        conns: parking_lot::Mutex::new(Vec::new()),
        failures: parking_lot::Mutex::new(Vec::new()),
        ends: AtomicUsize::new(0),
        ramp: Semaphore::new(args.ramp.max(1)),
        stop,
        args: args.clone(),
    });
    let started = now();
    let tasks: Vec<_> = (0..total).map(|i| tokio::spawn(run_slot(shared.clone(), i))).collect();
    let status = tokio::spawn(write_status(shared.clone()));
    wait_for_stop(args.duration).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
    }
    status.abort();
    write_status_once(&shared);
    let summary = summary(&shared, started);
    let text = serde_json::to_string(&summary).unwrap_or_default();
    match &args.out {
        Some(path) => std::fs::write(path, text)?,
        None => println!("{text}"),
    }
    Ok(())
}

async fn wait_for_stop(duration: u64) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        eprintln!("stream_load: no signal handlers");
        return;
    };
    let limit = async {
        if duration == 0 {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_secs(duration)).await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        () = limit => {}
    }
}

fn summary(shared: &Shared, started: f64) -> Value {
    let conns = shared.conns.lock().clone();
    let failures = shared.failures.lock().clone();
    json!({
        "started": started,
        "finished": now(),
        "sse": shared.args.sse,
        "ws": shared.args.ws,
        "counts": counts(shared),
        "conns": conns,
        "failures": failures,
    })
}

fn counts(shared: &Shared) -> Value {
    let (mut open_sse, mut open_ws, mut connecting, mut done) = (0, 0, 0, 0);
    let (mut oldest_open, mut stalest_data) = (f64::INFINITY, f64::INFINITY);
    for (i, s) in shared.slots.iter().enumerate() {
        match s.state.load(Ordering::Relaxed) {
            OPEN => {
                if i < shared.args.sse {
                    open_sse += 1;
                } else {
                    open_ws += 1;
                }
                oldest_open = oldest_open.min(Slot::time(&s.opened));
                stalest_data = stalest_data.min(Slot::time(&s.last_data));
            }
            DONE => done += 1,
            _ => connecting += 1,
        }
    }
    let finite = |v: f64| if v.is_finite() { json!(v) } else { Value::Null };
    json!({
        "t": now(),
        "open_sse": open_sse,
        "open_ws": open_ws,
        "open": open_sse + open_ws,
        "connecting": connecting,
        "done": done,
        "ends": shared.ends.load(Ordering::Relaxed),
        "connect_failures": shared.failures.lock().len(),
        "oldest_open": finite(oldest_open),
        "stalest_data": finite(stalest_data),
    })
}

async fn write_status(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(shared.args.status_ms.max(10)));
    loop {
        tick.tick().await;
        write_status_once(&shared);
    }
}

fn write_status_once(shared: &Shared) {
    let Some(path) = &shared.args.status else { return };
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, counts(shared).to_string()).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// One slot: open a stream, wait for its end, record it, open the next at once.
async fn run_slot(shared: Arc<Shared>, i: usize) {
    let ws = i >= shared.args.sse;
    let kind = if ws { "ws" } else { "sse" };
    let slot = &shared.slots[i];
    let mut stop = shared.stop.clone();
    let mut first = true;
    let mut conn_no = 0u32;
    loop {
        if *stop.borrow() {
            break;
        }
        slot.state.store(CONNECTING, Ordering::Relaxed);
        let permit = if first { shared.ramp.acquire().await.ok() } else { None };
        let started = now();
        let opened = if ws { open_ws(&shared, slot).await } else { open_sse(&shared, slot).await };
        drop(permit);
        let stream = match opened {
            Ok(s) => s,
            Err(error) => {
                shared.failures.lock().push(json!({
                    "slot": i, "kind": kind, "at": now(), "started": started, "error": error,
                    "reconnect": !first,
                }));
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    _ = stop.changed() => break,
                }
            }
        };
        first = false;
        conn_no += 1;
        let opened_at = Slot::time(&slot.opened);
        let end = tokio::select! {
            end = stream.finish(slot, &shared.args) => end,
            _ = stop.wait_for(|s| *s) => End::new("open_at_exit", 0, ""),
        };
        shared.ends.fetch_add(usize::from(end.end != "open_at_exit"), Ordering::Relaxed);
        shared.conns.lock().push(json!({
            "slot": i, "kind": kind, "conn": conn_no, "connect_started": started,
            "opened": opened_at, "ended": end.at, "end": end.end, "code": end.code,
            "events": end.events, "detail": end.detail,
        }));
        if shared.args.no_reconnect || *stop.borrow() {
            break;
        }
    }
    slot.state.store(DONE, Ordering::Relaxed);
}

enum Stream {
    Sse(hyper::body::Incoming),
    Ws(Box<tokio_tungstenite::WebSocketStream<TcpStream>>),
}

impl Stream {
    async fn finish(self, slot: &Slot, args: &Args) -> End {
        match self {
            Stream::Sse(body) => read_sse(body, slot).await,
            Stream::Ws(ws) => run_ws(*ws, slot, args).await,
        }
    }
}

async fn connect(addr: std::net::SocketAddr) -> Result<TcpStream, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| io_kind(&e))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

fn io_kind(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused".into(),
        std::io::ErrorKind::ConnectionReset => "reset".into(),
        std::io::ErrorKind::ConnectionAborted => "aborted".into(),
        std::io::ErrorKind::TimedOut => "timeout".into(),
        _ => format!("io: {e}"),
    }
}

/// The error and its sources, on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn mark_open(slot: &Slot) {
    let t = now();
    Slot::set_time(&slot.opened, t);
    Slot::set_time(&slot.last_data, t);
    slot.state.store(OPEN, Ordering::Relaxed);
}

async fn open_sse(shared: &Shared, slot: &Slot) -> Result<Stream, String> {
    let args = &shared.args;
    let attempt = async {
        let tcp = connect(args.addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {}", chain(&e)))?;
        tokio::spawn(conn);
        let req = http::Request::get(args.sse_path.as_str())
            .header(http::header::HOST, args.host.as_str())
            .header(http::header::ACCEPT, "text/event-stream")
            .body(Empty::new())
            .map_err(|e| format!("request: {e}"))?;
        let resp = sender.send_request(req).await.map_err(|e| {
            let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
            io.map_or_else(|| format!("send: {}", chain(&e)), io_kind)
        })?;
        if resp.status() != http::StatusCode::OK {
            let code = resp.headers().get("tern-error").and_then(|v| v.to_str().ok()).unwrap_or("");
            return Err(format!("status {} {code}", resp.status().as_u16()).trim_end().to_string());
        }
        Ok(Stream::Sse(resp.into_body()))
    };
    let timeout = Duration::from_millis(args.connect_timeout_ms);
    let stream = tokio::time::timeout(timeout, attempt).await.map_err(|_| "timeout".to_string())??;
    mark_open(slot);
    Ok(stream)
}

async fn read_sse(mut body: hyper::body::Incoming, slot: &Slot) -> End {
    // The last bytes seen: a boundary is a blank line (`\n\n`, `\r\n\r\n` or `\r\r`).
    let mut tail: Vec<u8> = Vec::with_capacity(8);
    let (mut events, mut bytes) = (0u64, 0u64);
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else { continue };
                Slot::set_time(&slot.last_data, now());
                bytes += data.len() as u64;
                for &b in data.iter() {
                    tail.push(b);
                    if tail.len() > 4 {
                        tail.remove(0);
                    }
                    if at_boundary(&tail) && b == b'\n' {
                        events += 1;
                    }
                }
            }
            Some(Err(e)) => return End::new("sse_error", events, chain(&e)),
            None if bytes == 0 => return End::new("sse_empty", events, ""),
            None if at_boundary(&tail) => return End::new("sse_boundary", events, ""),
            None => return End::new("sse_cut", events, String::from_utf8_lossy(&tail).into_owned()),
        }
    }
}

fn at_boundary(tail: &[u8]) -> bool {
    tail.ends_with(b"\n\n") || tail.ends_with(b"\r\n\r\n") || tail.ends_with(b"\r\r")
}

async fn open_ws(shared: &Shared, slot: &Slot) -> Result<Stream, String> {
    let args = &shared.args;
    let attempt = async {
        let tcp = connect(args.addr).await?;
        let url = format!("ws://{}{}", args.host, args.ws_path);
        let req = url.into_client_request().map_err(|e| format!("request: {e}"))?;
        match tokio_tungstenite::client_async(req, tcp).await {
            Ok((ws, _)) => Ok(Stream::Ws(Box::new(ws))),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let code = resp.headers().get("tern-error").and_then(|v| v.to_str().ok()).unwrap_or("");
                Err(format!("status {} {code}", resp.status().as_u16()).trim_end().to_string())
            }
            Err(tokio_tungstenite::tungstenite::Error::Io(e)) => Err(io_kind(&e)),
            Err(e) => Err(format!("handshake: {e}")),
        }
    };
    let timeout = Duration::from_millis(args.connect_timeout_ms);
    let stream = tokio::time::timeout(timeout, attempt).await.map_err(|_| "timeout".to_string())??;
    mark_open(slot);
    Ok(stream)
}

async fn run_ws(ws: tokio_tungstenite::WebSocketStream<TcpStream>, slot: &Slot, args: &Args) -> End {
    let (mut tx, mut rx) = ws.split();
    let mut tick = tokio::time::interval(Duration::from_millis(args.ws_interval_ms.max(10)));
    let (mut sent, mut echoed) = (0u64, 0u64);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                sent += 1;
                if let Err(e) = tx.send(Message::text(format!("ping {sent}"))).await {
                    return End::new("ws_error", echoed, format!("send: {e}"));
                }
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(_) | Message::Binary(_))) => {
                    echoed += 1;
                    Slot::set_time(&slot.last_data, now());
                }
                Some(Ok(Message::Close(frame))) => {
                    let at = now();
                    let code = frame.as_ref().map_or(1005, |f| u16::from(f.code));
                    let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                    // Let tungstenite send its answering close frame, then see the socket close.
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        while let Some(Ok(_)) = rx.next().await {}
                    })
                    .await;
                    return End { end: "ws_close".into(), code: Some(code), events: echoed, detail: reason, at };
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return End::new("ws_error", echoed, e.to_string()),
                None => return End::new("ws_eof", echoed, ""),
            }
        }
    }
}
