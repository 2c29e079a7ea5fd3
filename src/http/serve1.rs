//! tern's own HTTP/1.1 server for the requests most traffic is made of: a head complete in
//! what has been read, HTTP/1.1, `GET`, `HEAD` or `OPTIONS` without a body, or `POST`, `PUT`,
//! `PATCH` or `DELETE` with one plain `Content-Length` of at most [`WHOLE_UP_TO`] (an API
//! call, an MCP client's JSON-RPC message), and nothing else that bears on how the
//! connection is framed or kept (no `Transfer-Encoding`, `Upgrade`, `Expect` or `TE`, and a
//! `Connection` that says only `keep-alive` or `close`, as browsers' and most libraries'
//! requests do). Its head is parsed in place (httparse) into a header map that goes round
//! (client request → machine request → machine response → client response → the next
//! request), its body, if any, read whole behind it (waited for if the client wrote it
//! apart), and both handed to the [`Handler`] in a reused box; the response is written with
//! its first body bytes in one write, the rest streamed as it comes.
//!
//! Anything else goes to hyper with every byte read so far, as if tern had never looked: a
//! head cut short (a slow client; hyper's header read timeout is the one that applies), one
//! httparse refuses (hyper answers it, and [`super::parser_replies`] makes that answer
//! tern's), a body framed otherwise (chunked, several lengths) or larger, or slow enough to
//! be quiet for [`PARK_AFTER`], an upgrade, `Expect: 100-continue`, HTTP/1.0. So every
//! edge the hostile-input tests cover is hyper's as before, and this server only ever sees
//! the plain case.
//!
//! The response is framed as hyper frames a server's response, so that which server answered
//! cannot be told from the wire: the same `Content-Length`, `Transfer-Encoding: chunked` or
//! close-delimited choice, the same bodies dropped for `HEAD`, 204 and 304, the same `date`.

use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::activity::ConnState;
use super::body::{ProxyBody, RequestBody};
use super::park::{PARK_AFTER, Prefixed, QUIET_RECHECK, QUIET_RECHECK_MAX};
use super::{ConnInfo, Handler, drain};
use crate::head;

/// The largest request body read whole here, with its head; a larger one (or one framed
/// otherwise) is hyper's, streamed to the machine as it comes.
const WHOLE_UP_TO: usize = 64 * 1024;

/// The read buffer a busy connection keeps between its requests.
const READ_BUF: usize = 4096;

/// Body bytes copied into the write buffer behind their head or chunk line, for one write;
/// larger frames are written as they are.
const COPY_UP_TO: usize = 16 * 1024;

/// A header map kept for the next request only while it is this small (in fields it has room
/// for): one grown by an unusual response is let go.
const SPARE_UP_TO: usize = 64;

/// How serving ended.
pub(super) enum Turn {
    /// The connection is done: the client closed, a drain or the response closed it, a write
    /// failed.
    Closed,
    /// Nothing in flight, nothing read ahead, and quiet for the time given: the caller parks
    /// the connection or waits for its next bytes itself.
    Quiet,
    /// A head this server does not take: every byte read is back in the connection, for hyper.
    Hyper,
}

/// What one connection's requests are served with.
pub(super) struct Ctx<'a> {
    pub(super) handler: &'a Arc<Handler>,
    pub(super) info: &'a Arc<ConnInfo>,
    pub(super) state: &'a Arc<ConnState>,
    /// The connection's TLS stream's shed signal, raised when an open exchange is quiet.
    pub(super) shed: Option<&'a crate::tls::Shed>,
    /// How long a connection between requests may be quiet before [`Turn::Quiet`].
    pub(super) quiet: Duration,
}

/// Serves requests on `io` while they are the plain kind, until the connection is quiet
/// between requests, closes, or brings a head for hyper.
pub(super) async fn serve<IO>(io: &mut Prefixed<IO>, cx: Ctx<'_>) -> Turn
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut rbuf = BytesMut::with_capacity(READ_BUF);
    let mut wbuf: Vec<u8> = Vec::new();
    let mut spare: Option<HeaderMap> = None;
    let mut running = None;
    let mut wait = Wait::new(cx.state, cx.quiet);
    loop {
        let (req, client_closes) = loop {
            if rbuf.is_empty() {
                match wait.for_bytes(io, &mut rbuf).await {
                    Between::Bytes => {}
                    Between::Quiet => return Turn::Quiet,
                    Between::Close => return close(io).await,
                    Between::Gone => return Turn::Closed,
                }
            }
            match take_request(&mut rbuf, &mut spare, cx.handler.max_header_bytes) {
                Ok(taken) => break taken,
                // The rest of the head may be on its way: take what has come, without waiting.
                Err(Decline::Partial) if rbuf.len() < cx.handler.max_header_bytes => {
                    if read_now(io, &mut rbuf).await {
                        continue;
                    }
                }
                // The body follows its head (a client may write them apart): waited for as
                // the next request is. A drain, or a body slow enough to be quiet for the
                // parking time, leaves the request to hyper, where it is read as it comes.
                Err(Decline::Body(total)) => {
                    rbuf.reserve(total - rbuf.len());
                    match wait.for_bytes(io, &mut rbuf).await {
                        Between::Bytes => continue,
                        Between::Gone => return Turn::Closed,
                        Between::Quiet | Between::Close => {}
                    }
                }
                Err(_) => {}
            }
            io.unread(rbuf.split().freeze());
            return Turn::Hyper;
        };
        let method = req.method().clone();
        // One box for the connection's exchanges, each made in the place of the one before:
        // the box is empty when the next is made, so it is written there, not made aside
        // and copied in (an exchange's future is several KiB).
        let slot = running.get_or_insert_with(|| Box::pin(None));
        slot.set(Some(cx.handler.clone().handle(req, cx.info.clone(), cx.state.clone())));
        let exchange = slot.as_mut().as_pin_mut().expect("just set");
        let answer = wait.for_answer(exchange, io, &mut rbuf, &cx).await;
        slot.set(None);
        let Some(resp) = answer else {
            return Turn::Closed;
        };
        let (mut parts, body) = resp.into_parts();
        if client_closes {
            // As hyper answers a request that asked to close: said in the response, and done.
            close_after(&mut parts.headers);
        }
        wbuf.clear();
        let Some(framing) = encode_head(&mut wbuf, &method, &mut parts, &body) else {
            return Turn::Closed;
        };
        parts.headers.clear();
        if parts.headers.capacity() <= SPARE_UP_TO {
            spare = Some(parts.headers);
        }
        let ended = if framing.body {
            let kept = Kept { rbuf: &mut rbuf, exchange: &mut running };
            wait.relay(body, framing, io, &mut wbuf, kept, &cx).await
        } else {
            // hyper drops a body it may not send without reading it; so does this.
            let written = io.write_all(&wbuf).await.is_ok();
            drop(body);
            (written && end(io).await).then_some(framing.last || wait.closing)
        };
        match ended {
            Some(false) => {}
            Some(true) => return close(io).await,
            None => return Turn::Closed,
        }
    }
}

/// What happened while a connection waited between requests.
enum Between {
    Bytes,
    Quiet,
    /// Its time in a drain came.
    Close,
    /// The client closed, or the read failed.
    Gone,
}

/// A connection's waits: for the next request, for the handler's answer, for its body. One
/// timer serves them all, moved on only when it fires (not at every request): it tells a
/// quiet spell between requests, and one inside an open exchange, for which the TLS stream's
/// buffers are given back.
struct Wait<'s> {
    closing_at: Pin<Box<dyn Future<Output = ()> + Send + 's>>,
    /// `closing_at` has been polled once, and so wakes the connection when a drain begins.
    watching: bool,
    /// The connection's activity, open exchanges and drain.
    state: &'s ConnState,
    /// The drain wants the connection closed: after the response in progress.
    closing: bool,
    tick: Pin<Box<tokio::time::Sleep>>,
    /// `tick` was last polled pending, and so wakes the connection when it fires; until it
    /// has, a look at its state stands in for a poll at every wake-up.
    tick_armed: bool,
    quiet: Duration,
    /// The activity the last shed followed, and how long until the same spell is looked at
    /// again.
    shed_after: Option<Instant>,
    recheck: Duration,
}

impl<'s> Wait<'s> {
    fn new(state: &'s ConnState, quiet: Duration) -> Self {
        Wait {
            closing_at: Box::pin(drain::time_to_close(state)),
            watching: false,
            state,
            closing: false,
            tick: Box::pin(tokio::time::sleep(quiet.min(PARK_AFTER))),
            tick_armed: false,
            quiet,
            shed_after: None,
            recheck: QUIET_RECHECK,
        }
    }

    fn poll_closing(&mut self, cx: &mut Context<'_>) -> bool {
        // Polled once, to be woken when a drain begins; after that only once one has (a
        // relaxed load), not at every wake-up: each poll locks the drain's waiter list, which
        // every connection of the process shares.
        if self.closing || (self.watching && !self.state.drain.draining()) {
            return self.closing;
        }
        self.watching = true;
        if self.closing_at.as_mut().poll(cx).is_ready() {
            self.closing = true;
        }
        self.closing
    }

    /// Polls the timer; when it fires, looks at the connection and sets it again. `true` when
    /// a connection between requests has been quiet for long enough.
    fn poll_tick(&mut self, cx: &mut Context<'_>, shed: Option<&crate::tls::Shed>) -> bool {
        let state = self.state;
        if self.tick_armed && !self.tick.is_elapsed() {
            return false;
        }
        while self.tick.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let last = state.activity.last();
            let open = state.open_exchanges() > 0;
            if !open && now >= last + self.quiet {
                self.tick_armed = false;
                return true;
            }
            let quiet_spell = now >= last + PARK_AFTER;
            let next = if !open {
                last + self.quiet
            } else if !quiet_spell {
                last + PARK_AFTER
            } else if self.shed_after.is_none_or(|after| last > after) {
                // A new quiet spell inside an exchange (a stream with nothing to say, a slow
                // machine): its TLS buffers go, unless records wait for a client not reading.
                self.shed_after = Some(last);
                self.recheck = QUIET_RECHECK;
                if let Some(shed) = shed
                    && !state.activity.write_blocked()
                {
                    shed.raise();
                }
                now + PARK_AFTER
            } else {
                // The same spell: looked at less and less often.
                let at = now + self.recheck;
                self.recheck = (self.recheck * 2).min(QUIET_RECHECK_MAX);
                at
            };
            self.tick.as_mut().reset(next.max(now + Duration::from_millis(1)));
        }
        self.tick_armed = true;
        false
    }

    async fn for_bytes<IO>(&mut self, io: &mut Prefixed<IO>, rbuf: &mut BytesMut) -> Between
    where
        IO: AsyncRead + Unpin,
    {
        std::future::poll_fn(|cx| {
            match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, rbuf) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Between::Gone),
                Poll::Ready(Ok(_)) => return Poll::Ready(Between::Bytes),
                Poll::Pending => {}
            }
            if self.poll_closing(cx) {
                return Poll::Ready(Between::Close);
            }
            if self.poll_tick(cx, None) {
                return Poll::Ready(Between::Quiet);
            }
            Poll::Pending
        })
        .await
    }

    /// Reads while `rbuf` is empty (a pipelined request waits there, unread further): the
    /// client closing ends the exchange, as with hyper. `false` when it has.
    fn poll_client<IO>(io: &mut Prefixed<IO>, rbuf: &mut BytesMut, cx: &mut Context<'_>) -> bool
    where
        IO: AsyncRead + Unpin,
    {
        if !rbuf.is_empty() {
            return true;
        }
        !matches!(tokio_util::io::poll_read_buf(Pin::new(io), cx, rbuf), Poll::Ready(Ok(0) | Err(_)))
    }

    /// The handler's response; `None` if the client went away first.
    async fn for_answer<F, IO>(
        &mut self,
        mut exchange: Pin<&mut F>,
        io: &mut Prefixed<IO>,
        rbuf: &mut BytesMut,
        c: &Ctx<'_>,
    ) -> Option<Response<ProxyBody>>
    where
        F: Future<Output = Response<ProxyBody>>,
        IO: AsyncRead + Unpin,
    {
        std::future::poll_fn(|cx| {
            if let Poll::Ready(resp) = exchange.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            if !Self::poll_client(io, rbuf, cx) {
                return Poll::Ready(None);
            }
            self.poll_closing(cx);
            self.poll_tick(cx, c.shed);
            Poll::Pending
        })
        .await
    }

    /// Writes the body after the head in `wbuf`, as it comes: what is ready goes out together,
    /// and everything is written whenever the body has nothing more yet. `Some(close)` once
    /// it is all written, `None` if the connection cannot go on (the client left, a write or
    /// the body failed).
    async fn relay<IO, R>(
        &mut self,
        body: ProxyBody,
        framing: Framing,
        io: &mut Prefixed<IO>,
        wbuf: &mut Vec<u8>,
        kept: Kept<'_, R>,
        c: &Ctx<'_>,
    ) -> Option<bool>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let Kept { rbuf, exchange } = kept;
        let mut body = body;
        let mut left = framing.length;
        let mut waited = false;
        loop {
            let frame = std::future::poll_fn(|cx| {
                if let Poll::Ready(frame) = Pin::new(&mut body).poll_frame(cx) {
                    return Poll::Ready(Some(frame));
                }
                if !wbuf.is_empty() {
                    // Nothing more yet: what there is goes out first.
                    return Poll::Ready(None);
                }
                if !waited {
                    // The body waits for its machine (a stream between events, a slow
                    // machine), which may be for hours: what is kept for the next request
                    // goes until the body ends.
                    waited = true;
                    *exchange = None;
                    self.state.let_timer_go();
                    if rbuf.is_empty() {
                        *rbuf = BytesMut::new();
                    }
                }
                if !Self::poll_client(io, rbuf, cx) {
                    return Poll::Ready(Some(Some(Err(gone()))));
                }
                self.poll_closing(cx);
                self.poll_tick(cx, c.shed);
                Poll::Pending
            })
            .await;
            match frame {
                None => {
                    if !flush(io, wbuf).await {
                        return None;
                    }
                }
                Some(None) => {
                    if framing.chunked {
                        wbuf.extend_from_slice(b"0\r\n\r\n");
                    }
                    let written = io.write_all(wbuf).await.is_ok();
                    wbuf.clear();
                    // The exchange ends with its body; the flush after it says that all of it
                    // is out (see super::parser_replies).
                    drop(body);
                    if !(written && end(io).await) {
                        return None;
                    }
                    if waited && rbuf.is_empty() {
                        *rbuf = BytesMut::with_capacity(READ_BUF);
                    }
                    // Shorter than it said: the client cannot tell where the next response
                    // starts, so there is none.
                    let short = left.is_some_and(|l| l > 0);
                    return Some(framing.last || short || self.closing || framing.close_delimited);
                }
                Some(Some(Err(e))) => {
                    tracing::debug!(target: "tern::http", error = %e, "response body ended with an error");
                    return None;
                }
                Some(Some(Ok(frame))) => {
                    // Trailers go only to clients that ask for them (TE: trailers), and those
                    // are hyper's.
                    let Ok(data) = frame.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    if let Some(left) = &mut left {
                        let n = data.len() as u64;
                        if n > *left {
                            tracing::debug!(target: "tern::http", "response body longer than its content-length");
                            return None;
                        }
                        *left -= n;
                    }
                    if !put_data(io, wbuf, data, framing.chunked).await {
                        return None;
                    }
                }
            }
        }
    }
}

/// What a connection keeps for its next request while a response streams: its read buffer
/// and the room for the next exchange, let go of while the body waits (see [`Wait::relay`]).
struct Kept<'k, R> {
    rbuf: &'k mut BytesMut,
    exchange: &'k mut Option<R>,
}

/// A frame of body data, after what `wbuf` holds: copied in if small (to go out with what
/// follows), else written out behind it. `false` if the client is gone.
async fn put_data<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    wbuf: &mut Vec<u8>,
    mut data: Bytes,
    chunked: bool,
) -> bool {
    if chunked {
        let _ = write!(wbuf, "{:x}\r\n", data.len());
    }
    if data.len() <= COPY_UP_TO {
        wbuf.extend_from_slice(&data);
    } else {
        if !flush(io, wbuf).await {
            return false;
        }
        while data.has_remaining() {
            match io.write(&data).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => data.advance(n),
            }
        }
    }
    if chunked {
        wbuf.extend_from_slice(b"\r\n");
    }
    true
}

fn gone() -> crate::upstream::BoxError {
    "the client closed the connection".into()
}

/// Writes out `wbuf` and flushes (TLS records go out); `false` if the client is gone.
async fn flush<IO: AsyncWrite + Unpin>(io: &mut IO, wbuf: &mut Vec<u8>) -> bool {
    let ok = io.write_all(wbuf).await.is_ok() && io.flush().await.is_ok();
    wbuf.clear();
    ok
}

/// Flushes the end of a response, written after its exchange ended.
async fn end<IO: AsyncWrite + Unpin>(io: &mut IO) -> bool {
    io.flush().await.is_ok()
}

/// Whatever the rest of a head, read if it is there already: `false` if nothing came.
async fn read_now<IO: AsyncRead + Unpin>(io: &mut Prefixed<IO>, rbuf: &mut BytesMut) -> bool {
    std::future::poll_fn(|cx| match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, rbuf) {
        Poll::Ready(Ok(n)) => Poll::Ready(n > 0),
        Poll::Ready(Err(_)) | Poll::Pending => Poll::Ready(false),
    })
    .await
}

/// Closes a connection at its end: TLS says close_notify, bounded, as the client may not be
/// reading.
async fn close<IO: AsyncWrite + Unpin>(io: &mut IO) -> Turn {
    let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
    Turn::Closed
}

/// Why a head is not taken here.
#[derive(Debug, PartialEq, Eq)]
enum Decline {
    /// Not all there yet.
    Partial,
    /// The head is all there and its body is not yet: this many bytes make the request.
    Body(usize),
    /// For hyper: a body framed otherwise or larger than [`WHOLE_UP_TO`], an upgrade,
    /// another version or method, or a head it must refuse.
    NotOurs,
}

/// The request whose head starts `rbuf`, taken off it, when it is the plain kind; and whether
/// the client asked to close the connection after it (`Connection: close`).
fn take_request(
    rbuf: &mut BytesMut,
    spare: &mut Option<HeaderMap>,
    max_head: usize,
) -> Result<(Request<RequestBody>, bool), Decline> {
    let mut table = head::table();
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(rbuf, &mut table) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) => return Err(Decline::Partial),
        Ok(httparse::Status::Complete(_)) | Err(_) => return Err(Decline::NotOurs),
    };
    if parsed.version != Some(1) {
        return Err(Decline::NotOurs);
    }
    // The methods browsers, APIs and MCP clients send; the last four only with a
    // `Content-Length` (below), their body read whole.
    let (method, bodied) = match parsed.method {
        Some("GET") => (Method::GET, false),
        Some("HEAD") => (Method::HEAD, false),
        Some("OPTIONS") => (Method::OPTIONS, false),
        Some("POST") => (Method::POST, true),
        Some("PUT") => (Method::PUT, true),
        Some("PATCH") => (Method::PATCH, true),
        Some("DELETE") => (Method::DELETE, true),
        _ => return Err(Decline::NotOurs),
    };
    let path = parsed.path.unwrap_or_default();
    if !path.starts_with('/') {
        return Err(Decline::NotOurs);
    }
    let (closes, length) = framing_fields(parsed.headers, bodied)?;
    let body = match (bodied, length) {
        (false, _) => None,
        (true, None) => return Err(Decline::NotOurs),
        (true, Some(n)) if rbuf.len() < len + n => return Err(Decline::Body(len + n)),
        (true, Some(n)) => Some(n),
    };
    // Where each part sits in `rbuf`, to share the head's bytes once it is split off.
    let target = path.as_ptr() as usize - rbuf.as_ptr() as usize;
    let target = target..target + path.len();
    let places = head::Places::of(rbuf, parsed.headers);
    // Built from the head's own bytes, shared rather than copied; a refusal puts them back.
    let head = rbuf.split_to(len).freeze();
    let built = (|| {
        let uri = Uri::from_maybe_shared(head.slice(target)).ok()?;
        let mut headers = spare.take().unwrap_or_default();
        headers.reserve(places.len());
        for (name, value) in places.iter() {
            let name = HeaderName::from_bytes(&head[name]).ok()?;
            let value = HeaderValue::from_maybe_shared(head.slice(value)).ok()?;
            // Read above (`closes`); the machine's request would have it stripped.
            if !head::only_this_hop(&name, value.as_bytes()) {
                headers.append(name, value);
            }
        }
        Some((uri, headers))
    })();
    let Some((uri, headers)) = built else {
        let mut whole = BytesMut::with_capacity(head.len() + rbuf.len());
        whole.extend_from_slice(&head);
        whole.extend_from_slice(rbuf);
        *rbuf = whole;
        return Err(Decline::NotOurs);
    };
    let body = match body {
        Some(n) => RequestBody::Whole(Some(rbuf.split_to(n).freeze())),
        None => RequestBody::Empty,
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Ok((req, closes))
}

/// What a head's fields say of how its connection is kept and its body framed, when this
/// server takes them: whether the client asked to close after the response, and the body's
/// length if it has one (`bodied` methods only).
fn framing_fields(fields: &[httparse::Header<'_>], bodied: bool) -> Result<(bool, Option<usize>), Decline> {
    let mut closes = false;
    let mut length = None;
    for field in fields {
        let name = field.name.as_bytes();
        // `Connection: keep-alive` (browsers send it) changes nothing on HTTP/1.1, and
        // `close` asks for the connection to end after the response: both are served here.
        // Any other token names a field to drop or asks for an upgrade: hyper's.
        if name.eq_ignore_ascii_case(b"connection") {
            for token in field.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    closes = true;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    return Err(Decline::NotOurs);
                }
            }
            continue;
        }
        // One `Content-Length`, plain digits, on a method that has a body: read whole. Any
        // other (two fields, a list, a sign, a leading zero, too long) is hyper's to judge.
        if bodied && length.is_none() && name.eq_ignore_ascii_case(b"content-length") {
            length = Some(whole_length(field.value).ok_or(Decline::NotOurs)?);
            continue;
        }
        let framing = [&b"content-length"[..], b"transfer-encoding", b"upgrade", b"expect", b"te"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n));
        if framing {
            return Err(Decline::NotOurs);
        }
    }
    Ok((closes, length))
}

/// A request body's length as this server takes it: 1 to 7 digits, no leading zero (`0`
/// itself aside), at most [`WHOLE_UP_TO`].
fn whole_length(value: &[u8]) -> Option<usize> {
    let plain = !value.is_empty()
        && value.len() <= 7
        && value.iter().all(u8::is_ascii_digit)
        && (value[0] != b'0' || value.len() == 1);
    let n = plain.then(|| value.iter().fold(0, |n, d| n * 10 + usize::from(d - b'0')))?;
    (n <= WHOLE_UP_TO).then_some(n)
}

/// Marks a response as the connection's last, as hyper's server does for a client that asked
/// to close: `close` added to its `Connection` values unless one says it already.
fn close_after(headers: &mut HeaderMap) {
    match headers.entry(header::CONNECTION) {
        header::Entry::Occupied(mut entry) => {
            if !entry.iter().any(|v| has_token(v, "close")) {
                entry.append(HeaderValue::from_static("close"));
            }
        }
        header::Entry::Vacant(entry) => {
            entry.insert(HeaderValue::from_static("close"));
        }
    }
}

/// How a response's body goes on the wire, as hyper's server would send it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Framing {
    /// Whether any body is written at all (none for `HEAD`, 1xx, 204, 304).
    body: bool,
    chunked: bool,
    /// The body's length, when the head said it.
    length: Option<u64>,
    /// No length and no chunks: the body ends when the connection does.
    close_delimited: bool,
    /// The response closes the connection (`Connection: close`).
    last: bool,
}

/// How much the body says about its own length.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Length {
    /// Already at its end: no body at all.
    None,
    Known(u64),
    Unknown,
}

/// Writes the response head into `w` the way hyper's server does, and says how the body
/// follows; `None` when the response cannot be sent (a 1xx answer, lengths that disagree),
/// which hyper answers by closing the connection too.
fn encode_head(
    w: &mut Vec<u8>,
    method: &Method,
    parts: &mut http::response::Parts,
    body: &ProxyBody,
) -> Option<Framing> {
    let status = parts.status;
    if status.is_informational() {
        tracing::debug!(target: "tern::http", %status, "an informational status as a final response; closing");
        return None;
    }
    let length = if body.is_end_stream() {
        Length::None
    } else {
        body.size_hint().exact().map_or(Length::Unknown, Length::Known)
    };
    let http10 = parts.version == Version::HTTP_10;
    let no_content = matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    status_line(w, status, parts.extensions.get::<hyper::ext::ReasonPhrase>(), http10);
    let mut head = Head {
        w,
        length,
        head: *method == Method::HEAD,
        http10,
        can_chunk: *method != Method::HEAD && !no_content,
        can_length: !no_content,
        framing: Framing { body: true, chunked: false, length: Some(0), close_delimited: false, last: false },
        wrote_len: false,
        wrote_date: false,
        declared: None,
        joined: None,
        needs_chunked: false,
    };
    for (name, value) in &parts.headers {
        head.field(name, value)?;
    }
    for (name, value) in body.late().into_iter().flat_map(|late| late.fields()) {
        head.field(&name, value)?;
    }
    Some(head.finish())
}

/// The state of one response head being written: what the fields so far said about framing.
struct Head<'w> {
    w: &'w mut Vec<u8>,
    length: Length,
    head: bool,
    http10: bool,
    /// Chunked framing is allowed (not for `HEAD`, 204 or 304).
    can_chunk: bool,
    /// A `content-length` may be written (not for 204 or 304).
    can_length: bool,
    framing: Framing,
    wrote_len: bool,
    wrote_date: bool,
    declared: Option<u64>,
    /// A name whose values go on one line, comma-joined (as hyper writes them).
    joined: Option<HeaderName>,
    /// The joined `transfer-encoding` line wants `, chunked` at its end.
    needs_chunked: bool,
}

impl Head<'_> {
    /// Writes one field; `None` when it makes the response unsendable.
    fn field(&mut self, name: &HeaderName, value: &HeaderValue) -> Option<()> {
        if self.joined.as_ref().is_some_and(|j| j == name) {
            self.w.extend_from_slice(b", ");
            self.w.extend_from_slice(value.as_bytes());
            if *name == header::TRANSFER_ENCODING {
                self.needs_chunked = !is_chunked(value);
            }
            if *name == header::CONNECTION && has_token(value, "close") {
                self.framing.last = true;
            }
            return Some(());
        }
        self.end_joined();
        match *name {
            header::CONTENT_LENGTH => return self.content_length(name, value),
            header::TRANSFER_ENCODING => {
                if self.http10 || !self.can_chunk {
                    return Some(());
                }
                self.wrote_len = true;
                self.framing.chunked = true;
                self.framing.length = None;
                self.needs_chunked = !is_chunked(value);
                self.start_joined(name, value);
                return Some(());
            }
            header::CONNECTION => {
                if has_token(value, "close") {
                    self.framing.last = true;
                }
                self.start_joined(name, value);
                return Some(());
            }
            header::TRAILER => {
                if !self.http10 && self.can_chunk {
                    self.start_joined(name, value);
                }
                return Some(());
            }
            header::DATE => self.wrote_date = true,
            _ => {}
        }
        line(self.w, name, value);
        Some(())
    }

    fn content_length(&mut self, name: &HeaderName, value: &HeaderValue) -> Option<()> {
        let n = match self.length {
            Length::Known(n) => n,
            Length::Unknown => {
                let n = std::str::from_utf8(value.as_bytes()).ok().and_then(|s| s.parse::<u64>().ok())?;
                if self.declared.is_some_and(|d| d != n) {
                    tracing::debug!(target: "tern::http", "response with content-lengths that disagree; closing");
                    return None;
                }
                n
            }
            Length::None => {
                if self.head {
                    self.wrote_len = true;
                    line(self.w, name, value);
                }
                return Some(());
            }
        };
        if self.declared.is_none() {
            self.declared = Some(n);
            self.framing.length = Some(n);
            line(self.w, name, value);
        }
        self.wrote_len = true;
        Some(())
    }

    fn start_joined(&mut self, name: &HeaderName, value: &HeaderValue) {
        self.w.extend_from_slice(name.as_str().as_bytes());
        self.w.extend_from_slice(b": ");
        self.w.extend_from_slice(value.as_bytes());
        self.joined = Some(name.clone());
    }

    fn end_joined(&mut self) {
        if self.joined.take().is_some() {
            self.w.extend_from_slice(if self.needs_chunked { b", chunked\r\n" } else { b"\r\n" });
        }
        self.needs_chunked = false;
    }

    /// Ends the head with the framing fields the machine left out, and a `date`.
    fn finish(mut self) -> Framing {
        self.end_joined();
        let mut framing = self.framing;
        if !self.wrote_len {
            match self.length {
                Length::Unknown if self.http10 || !self.can_chunk => {
                    framing.length = None;
                    framing.close_delimited = true;
                }
                Length::Unknown => {
                    self.w.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    framing.chunked = true;
                    framing.length = None;
                }
                Length::None | Length::Known(0) => {
                    if self.can_length && !self.head {
                        self.w.extend_from_slice(b"content-length: 0\r\n");
                    }
                }
                Length::Known(n) => {
                    if self.can_length {
                        let _ = write!(self.w, "content-length: {n}\r\n");
                        framing.length = Some(n);
                    }
                }
            }
        }
        if !self.can_chunk || self.length == Length::None {
            framing.body = false;
        }
        if !self.can_chunk {
            framing = Framing { chunked: false, length: Some(0), close_delimited: false, ..framing };
        }
        if !self.wrote_date {
            self.w.extend_from_slice(b"date: ");
            date::extend(self.w);
            self.w.extend_from_slice(b"\r\n");
        }
        self.w.extend_from_slice(b"\r\n");
        framing
    }
}

/// `HTTP/1.1 200 OK` and its kin, with the machine's own reason phrase when it sent one.
fn status_line(w: &mut Vec<u8>, status: StatusCode, reason: Option<&hyper::ext::ReasonPhrase>, http10: bool) {
    if !http10 && status == StatusCode::OK && reason.is_none() {
        w.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    w.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    w.extend_from_slice(status.as_str().as_bytes());
    w.push(b' ');
    match reason {
        Some(r) => w.extend_from_slice(r.as_bytes()),
        None => w.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
    }
    w.extend_from_slice(b"\r\n");
}

fn line(w: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    w.extend_from_slice(name.as_str().as_bytes());
    w.extend_from_slice(b": ");
    w.extend_from_slice(value.as_bytes());
    w.extend_from_slice(b"\r\n");
}

/// Whether a comma-separated header value lists `token`, in any case.
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Whether a `Transfer-Encoding` value ends in `chunked`.
fn is_chunked(value: &HeaderValue) -> bool {
    value
        .to_str()
        .is_ok_and(|v| v.rsplit(',').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked")))
}

/// The `date` header's value, made once a second per thread, as hyper does.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub(super) fn extend(w: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs || c.1.is_empty() {
                *c = (secs, httpdate::fmt_http_date(now));
            }
            w.extend_from_slice(c.1.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests;
