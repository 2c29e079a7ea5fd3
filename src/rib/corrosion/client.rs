//! A small HTTP/1.1 client for one Corrosion agent's API (the agent serves HTTP/1.1 only).
//! Unary calls (queries, transactions, health) reuse one idle keep-alive connection, because
//! `tern apply` makes its point reads one after another; a subscription stream gets a
//! connection of its own, with TCP keepalive, since an idle stream says nothing for as long
//! as nothing changes.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::wire::{self, Event};

/// How long connecting to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// TCP keepalive on stream connections: a peer that vanished (host down, path cut) shows
/// as an error on the stream within about a minute even if no probe runs.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(20);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A line longer than this is refused rather than buffered (a RIB row is a few KiB).
const MAX_LINE: usize = 64 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CorroError {
    /// No connection, or it broke: worth another try.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The agent answered with an error status (and its `{"error":…}` if it sent one).
    #[error("HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("sent something tern cannot read: {0}")]
    Decode(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl CorroError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, CorroError::Status { status: 404, .. })
    }
}

/// The agent at `host:port`.
pub struct Client {
    authority: String,
    idle: parking_lot::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl Client {
    pub fn new(authority: &str) -> Client {
        Client { authority: authority.to_string(), idle: parking_lot::Mutex::new(None) }
    }

    async fn connect(&self, keepalive: bool) -> Result<SendRequest<Full<Bytes>>, CorroError> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&self.authority))
            .await
            .map_err(|_| CorroError::Unreachable(format!("connecting timed out after {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| CorroError::Unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        if keepalive {
            let ka = socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE).with_interval(KEEPALIVE_INTERVAL);
            if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&ka) {
                tracing::debug!(target: "tern::rib", error = %e, "TCP keepalive not set on the Corrosion stream");
            }
        }
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| CorroError::Unreachable(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(target: "tern::rib", error = %e, "a connection to the Corrosion agent ended");
            }
        });
        Ok(send)
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Request<Full<Bytes>>, CorroError> {
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        req.body(Full::new(bytes)).map_err(|e| CorroError::Decode(format!("building the request: {e}")))
    }

    /// A unary call: the status and the whole body, within `deadline`. The connection goes
    /// back to the idle slot once its answer is read.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        deadline: Duration,
    ) -> Result<(StatusCode, Bytes), CorroError> {
        let req = self.request(method, path, body)?;
        let work = async {
            let reused = self.idle.lock().take();
            let mut send = match reused {
                Some(mut s) => match s.ready().await {
                    Ok(()) => s,
                    // Closed by the agent while idle: a new one.
                    Err(_) => self.connect(false).await?,
                },
                None => self.connect(false).await?,
            };
            let resp = send.send_request(req).await.map_err(|e| CorroError::Unreachable(e.to_string()))?;
            let status = resp.status();
            let body =
                resp.into_body().collect().await.map_err(|e| CorroError::Unreachable(e.to_string()))?;
            *self.idle.lock() = Some(send);
            Ok((status, body.to_bytes()))
        };
        tokio::time::timeout(deadline, work).await.map_err(|_| CorroError::Timeout(deadline))?
    }

    /// Opens a stream on a connection of its own: the response head within `deadline`, then
    /// its lines. A status other than 200 is an error carrying the agent's message.
    pub async fn stream(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        deadline: Duration,
    ) -> Result<(Response<()>, Lines), CorroError> {
        let req = self.request(method, path, body)?;
        let work = async {
            let mut send = self.connect(true).await?;
            let resp = send.send_request(req).await.map_err(|e| CorroError::Unreachable(e.to_string()))?;
            let (head, body) = resp.into_parts();
            if head.status != StatusCode::OK {
                let text = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                return Err(CorroError::Status {
                    status: head.status.as_u16(),
                    message: wire::error_text(&text),
                });
            }
            Ok((
                Response::from_parts(head, ()),
                Lines { body, buf: BytesMut::new(), done: false, failed: None },
            ))
        };
        tokio::time::timeout(deadline, work).await.map_err(|_| CorroError::Timeout(deadline))?
    }

    /// `POST /v1/queries`: the rows' cells, in order.
    pub async fn query(&self, stmt: &Value, deadline: Duration) -> Result<Vec<Vec<Value>>, CorroError> {
        let (status, body) = self.call(Method::POST, "/v1/queries", Some(stmt), deadline).await?;
        if status != StatusCode::OK {
            return Err(CorroError::Status { status: status.as_u16(), message: wire::error_text(&body) });
        }
        let mut rows = Vec::new();
        for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            match wire::parse_line(line).map_err(CorroError::Decode)? {
                Event::Row(_, cells) => rows.push(cells),
                Event::Eoq(_) => return Ok(rows),
                Event::Error(e) => return Err(CorroError::Status { status: 200, message: e }),
                Event::Columns(_) | Event::Change(..) => {}
            }
        }
        Err(CorroError::Decode("the query's answer ended before its end-of-query line".into()))
    }

    /// `POST /v1/transactions`: the statements run as one SQLite transaction on the agent;
    /// rows each changed. A failure rolled all of them back.
    pub async fn transact(&self, stmts: &[Value], deadline: Duration) -> Result<Vec<u64>, CorroError> {
        let body = Value::Array(stmts.to_vec());
        let (status, text) = self.call(Method::POST, "/v1/transactions", Some(&body), deadline).await?;
        let answer: Result<wire::TxAnswer, _> = serde_json::from_slice(&text);
        match answer {
            Ok(a) if status == StatusCode::OK && a.error().is_none() => Ok(a.rows_affected()),
            Ok(a) => Err(CorroError::Status {
                status: status.as_u16(),
                message: format!(
                    "{} (the transaction was rolled back)",
                    a.error().unwrap_or("no reason given")
                ),
            }),
            Err(_) if status != StatusCode::OK => {
                Err(CorroError::Status { status: status.as_u16(), message: wire::error_text(&text) })
            }
            Err(e) => Err(CorroError::Decode(format!("a transaction's answer: {e}"))),
        }
    }

    /// `GET /v1/health`: the agent answers, with a body that reads as its health.
    pub async fn health(&self, deadline: Duration) -> Result<wire::Health, CorroError> {
        let (status, body) = self.call(Method::GET, "/v1/health", None, deadline).await?;
        if status != StatusCode::OK {
            return Err(CorroError::Status { status: status.as_u16(), message: wire::error_text(&body) });
        }
        serde_json::from_slice(&body).map_err(|e| CorroError::Decode(format!("a health answer: {e}")))
    }
}

/// The lines of a streamed body.
pub struct Lines {
    body: Incoming,
    buf: BytesMut,
    done: bool,
    /// A break noticed while lines were being handed out: reported on the next call, so
    /// that the lines that came before it are used first.
    failed: Option<CorroError>,
}

impl Lines {
    /// Waits for at least one whole line, then also takes every line that has already
    /// arrived (the agent flushes what one transaction made together), without waiting for
    /// more. `None` once the body ended. Cancel-safe: the only wait is for the next frame,
    /// and a frame is buffered as soon as it is taken.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<Bytes>>, CorroError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        loop {
            let mut out = self.take_lines()?;
            if !out.is_empty() {
                loop {
                    match self.ready_frame().await {
                        Ok(true) => out.extend(self.take_lines()?),
                        Ok(false) => break,
                        Err(e) => {
                            self.failed = Some(e);
                            break;
                        }
                    }
                }
                return Ok(Some(out));
            }
            if self.done {
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    return Ok(None);
                }
                // A last line without its newline.
                return Ok(Some(vec![self.buf.split().freeze()]));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(CorroError::Unreachable(format!("the stream broke: {e}"))),
                None => self.done = true,
            }
        }
    }

    fn take_lines(&mut self) -> Result<Vec<Bytes>, CorroError> {
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let line = self.buf.split_to(i + 1).freeze().slice(..i);
            if !line.iter().all(u8::is_ascii_whitespace) {
                out.push(line);
            }
        }
        if self.buf.len() > MAX_LINE {
            return Err(CorroError::Decode(format!("a line longer than {MAX_LINE} bytes")));
        }
        Ok(out)
    }

    /// Buffers a frame that is already here; false if none is (or the body ended).
    async fn ready_frame(&mut self) -> Result<bool, CorroError> {
        let polled = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(
                match http_body::Body::poll_frame(std::pin::Pin::new(&mut self.body), cx) {
                    std::task::Poll::Ready(f) => Some(f),
                    std::task::Poll::Pending => None,
                },
            )
        })
        .await;
        match polled {
            Some(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    self.buf.extend_from_slice(&data);
                }
                Ok(true)
            }
            Some(Some(Err(e))) => Err(CorroError::Unreachable(format!("the stream broke: {e}"))),
            Some(None) => {
                self.done = true;
                Ok(false)
            }
            None => Ok(false),
        }
    }
}
