//! A small gRPC client for etcd over hyper's HTTP/2 (cleartext, prior knowledge, as etcd's
//! client port serves it): unary calls and the bidirectional watch stream. One connection,
//! to one endpoint at a time; a failed connection moves on to the next endpoint, so a
//! cluster with a member down keeps answering. HTTP/2 pings find a dead peer that a quiet
//! connection would otherwise hide.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::mpsc;

/// How long connecting to one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings on an idle connection, and how long one may go unanswered.
const PING_EVERY: Duration = Duration::from_secs(3);
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// A gRPC message larger than this is refused (etcd's own default request limit is 1.5 MiB;
/// a range page of the RIB stays well under this).
const MAX_MESSAGE: usize = 64 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub enum GrpcError {
    /// No endpoint answered, or the connection broke: try again (perhaps elsewhere).
    #[error("etcd unreachable: {0}")]
    Unavailable(String),
    /// The server answered with a gRPC status other than OK.
    #[error("etcd: {message} (gRPC status {code})")]
    Status { code: u32, message: String },
    #[error("etcd sent a message tern cannot read: {0}")]
    Decode(String),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
}

impl GrpcError {
    /// Worth another try, perhaps at another member: no connection, or gRPC UNAVAILABLE
    /// (etcd's "leader changed", "no leader" while a cluster elects).
    pub fn is_transient(&self) -> bool {
        matches!(self, GrpcError::Unavailable(_) | GrpcError::Status { code: 14, .. })
    }

    /// gRPC OUT_OF_RANGE: etcd's answer to a read at a compacted revision.
    pub fn is_compacted(&self) -> bool {
        matches!(self, GrpcError::Status { code: 11, .. })
    }
}

type ReqBody = Pin<Box<dyn Body<Data = Bytes, Error = Infallible> + Send>>;

/// A request body fed from a channel: the client half of a bidirectional stream.
struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

struct OneShot(Option<Bytes>);

impl Body for OneShot {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

/// One gRPC message, length-prefixed and uncompressed.
fn frame(msg: &impl prost::Message) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    msg.encode(&mut b).expect("a BytesMut with room for the message");
    b.freeze()
}

/// Takes one whole message off the front of `buf`, if it holds one.
fn unframe<M: prost::Message + Default>(buf: &mut BytesMut) -> Result<Option<M>, GrpcError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err(GrpcError::Decode("a compressed message (tern asks for none)".into()));
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(GrpcError::Decode(format!("a message of {len} bytes")));
    }
    if buf.len() < 5 + len {
        buf.reserve(5 + len - buf.len());
        return Ok(None);
    }
    buf.advance(5);
    let msg = buf.split_to(len);
    M::decode(msg.freeze()).map(Some).map_err(|e| GrpcError::Decode(e.to_string()))
}

/// The gRPC status in `headers` (trailers, or the headers of a trailers-only answer).
fn status(headers: &http::HeaderMap) -> Option<Result<(), GrpcError>> {
    let code: u32 = headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    if code == 0 {
        return Some(Ok(()));
    }
    let message =
        headers.get("grpc-message").and_then(|m| m.to_str().ok()).map(percent_decode).unwrap_or_default();
    Some(Err(GrpcError::Status { code, message }))
}

/// gRPC percent-encodes its status message.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A client for a list of endpoints (`http://host:port`).
pub struct Grpc {
    endpoints: Vec<String>,
    conn: tokio::sync::Mutex<Option<(usize, SendRequest<ReqBody>)>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Grpc {
    pub fn new(endpoints: &[String]) -> Grpc {
        let endpoints = endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://").trim_end_matches('/').to_string())
            .collect();
        Grpc { endpoints, conn: tokio::sync::Mutex::new(None), next: Default::default() }
    }

    /// A sender on a live connection, connecting (endpoint after endpoint) if there is none.
    async fn sender(&self) -> Result<(usize, SendRequest<ReqBody>), GrpcError> {
        let mut conn = self.conn.lock().await;
        if let Some((i, s)) = conn.as_ref()
            && !s.is_closed()
        {
            return Ok((*i, s.clone()));
        }
        *conn = None;
        let mut last = String::from("no endpoints");
        for _ in 0..self.endpoints.len() {
            let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.endpoints.len();
            match self.connect(&self.endpoints[i]).await {
                Ok(s) => {
                    *conn = Some((i, s.clone()));
                    return Ok((i, s));
                }
                Err(e) => last = format!("{}: {e}", self.endpoints[i]),
            }
        }
        Err(GrpcError::Unavailable(last))
    }

    async fn connect(&self, addr: &str) -> Result<SendRequest<ReqBody>, String> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(PING_EVERY)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake::<_, ReqBody>(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(target: "tern::rib", error = %e, "etcd connection ended");
            }
        });
        Ok(send)
    }

    /// Forgets the current connection (it stopped answering though it is open), so the next
    /// call connects to the next endpoint.
    pub async fn reset(&self) {
        *self.conn.lock().await = None;
    }

    /// Forgets the connection of endpoint `i` (it failed), so the next call connects anew.
    async fn drop_conn(&self, i: usize) {
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_some_and(|(j, _)| *j == i) {
            *conn = None;
        }
    }

    async fn start(
        &self,
        path: &str,
        body: ReqBody,
    ) -> Result<(usize, hyper::Response<Incoming>), GrpcError> {
        let (i, mut send) = self.sender().await?;
        let req = http::Request::post(format!("http://{}{path}", self.endpoints[i]))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(body)
            .map_err(|e| GrpcError::Decode(e.to_string()))?;
        let resp = match send.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.drop_conn(i).await;
                return Err(GrpcError::Unavailable(format!("{}: {e}", self.endpoints[i])));
            }
        };
        if resp.status() != http::StatusCode::OK {
            self.drop_conn(i).await;
            return Err(GrpcError::Unavailable(format!("{}: HTTP {}", self.endpoints[i], resp.status())));
        }
        if let Some(Err(e)) = status(resp.headers()) {
            return Err(e);
        }
        Ok((i, resp))
    }

    /// One request, one answer, within `deadline`; retried (on the next endpoint, after a
    /// short pause) while the failure is transient and time is left.
    pub async fn unary<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        path: &str,
        req: &Req,
        deadline: Duration,
    ) -> Result<Resp, GrpcError> {
        let retried = async {
            let mut pause = Duration::from_millis(50);
            // A member that accepts but never answers (stopped, partitioned) must not take
            // the whole deadline: each attempt gets a part of it, then the next member.
            let attempt = (deadline / 3).max(Duration::from_millis(100));
            loop {
                let once = match tokio::time::timeout(attempt, self.unary_once(path, req)).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.reset().await;
                        Err(GrpcError::Unavailable(format!("no answer within {attempt:?}")))
                    }
                };
                match once {
                    Err(e) if e.is_transient() => {
                        tracing::debug!(target: "tern::rib", error = %e, "etcd call failed; trying again");
                        if let GrpcError::Status { .. } = e {
                            self.reset().await;
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(800));
                    }
                    other => return other,
                }
            }
        };
        match tokio::time::timeout(deadline, retried).await {
            Ok(r) => r,
            Err(_) => Err(GrpcError::Timeout(deadline)),
        }
    }

    async fn unary_once<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        path: &str,
        req: &Req,
    ) -> Result<Resp, GrpcError> {
        let (i, resp) = self.start(path, Box::pin(OneShot(Some(frame(req))))).await?;
        let collected = match resp.into_body().collect().await {
            Ok(c) => c,
            Err(e) => {
                self.drop_conn(i).await;
                return Err(GrpcError::Unavailable(format!("{}: {e}", self.endpoints[i])));
            }
        };
        if let Some(Err(e)) = collected.trailers().and_then(status) {
            return Err(e);
        }
        let mut buf = BytesMut::from(collected.to_bytes().as_ref());
        unframe::<Resp>(&mut buf)?.ok_or_else(|| GrpcError::Decode("an empty answer".into()))
    }

    /// Opens a bidirectional stream with `first` as its first message.
    pub async fn stream(&self, path: &str, first: &impl prost::Message) -> Result<Stream, GrpcError> {
        let (tx, rx) = mpsc::channel(16);
        tx.try_send(frame(first)).expect("a fresh channel has room");
        let (_, resp) = self.start(path, Box::pin(ChanBody(rx))).await?;
        Ok(Stream { tx, body: resp.into_body(), buf: BytesMut::new() })
    }
}

/// An open bidirectional stream. Dropping it ends the client's half (and the stream).
pub struct Stream {
    tx: mpsc::Sender<Bytes>,
    body: Incoming,
    buf: BytesMut,
}

impl Stream {
    pub async fn send(&self, msg: &impl prost::Message) -> Result<(), GrpcError> {
        self.tx.send(frame(msg)).await.map_err(|_| GrpcError::Unavailable("the stream closed".into()))
    }

    /// The next message; `Ok(None)` when the server ended the stream with status OK.
    pub async fn next<M: prost::Message + Default>(&mut self) -> Result<Option<M>, GrpcError> {
        loop {
            if let Some(m) = unframe(&mut self.buf)? {
                return Ok(Some(m));
            }
            match self.body.frame().await {
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => self.buf.extend_from_slice(&data),
                    Err(f) => {
                        if let Some(t) = f.trailers_ref()
                            && let Some(Err(e)) = status(t)
                        {
                            return Err(e);
                        }
                    }
                },
                Some(Err(e)) => return Err(GrpcError::Unavailable(e.to_string())),
                None => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_frame_and_unframe_across_partial_reads() {
        let msg =
            super::super::proto::PutRequest { key: b"k".to_vec(), value: vec![7; 300], ..Default::default() };
        let whole = frame(&msg);
        let mut buf = BytesMut::new();
        for chunk in whole.chunks(7) {
            assert_eq!(unframe::<super::super::proto::PutRequest>(&mut buf).unwrap(), None);
            buf.extend_from_slice(chunk);
        }
        assert_eq!(unframe::<super::super::proto::PutRequest>(&mut buf).unwrap(), Some(msg));
        assert!(buf.is_empty());
    }

    #[test]
    fn a_grpc_status_message_is_percent_decoded() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", "11".parse().unwrap());
        h.insert(
            "grpc-message",
            "etcdserver: mvcc: required revision has been compacted%21".parse().unwrap(),
        );
        let Some(Err(e)) = status(&h) else { panic!("an error status") };
        assert!(e.is_compacted());
        assert_eq!(
            e.to_string(),
            "etcd: etcdserver: mvcc: required revision has been compacted! (gRPC status 11)"
        );
    }
}
