//! tern's own HTTP/1.1 exchange with a machine, for most of the traffic: a `GET`, `HEAD` or
//! `OPTIONS` without a body, or a request whose body tern holds whole (read in with its head
//! by its own server), on a connection that does not upgrade ([`fits`]).
//!
//! The request head (and a whole body behind it) is written from the request's parts in one
//! buffer and one write; the
//! response head is read into the same buffer and parsed in place (httparse), its header
//! values shared with that buffer rather than copied; the body is read off the socket by
//! whoever polls it. No task and no channel stand between the client's exchange and the
//! machine's socket, which is what hyper's client costs per request (a connection task and
//! a dispatch channel). Everything else (a body sent as it is read, an upgrade, h2c) still
//! goes through hyper.
//!
//! The response is framed as RFC 9112 §6.3 says, and strictly: a `Content-Length` that does
//! not parse, or several that disagree, is refused; a chunked body is read by its chunks,
//! each line ending in CRLF; a response framed both ways is read by its chunks and its
//! connection closed after. A connection goes back to the pool only when its response was
//! read to the end with nothing after it, on HTTP/1.1 without `Connection: close`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{HostPool, Pool, UpBody};
use crate::head::{self, MAX_FIELDS};

/// The first read's room; a body that fills its reads gets bigger ones, up to [`MAX_READ`].
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailer fields after a chunked body.
const MAX_TRAILERS: usize = 16 * 1024;

thread_local! {
    /// Header maps done with (a request's fields once its answer is served), kept for the
    /// response heads read next on this thread: about one per exchange in flight, so a busy
    /// worker reads most responses into a map it already has.
    static SPARE_FIELDS: std::cell::RefCell<Vec<HeaderMap>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Most maps kept per thread, and the most fields one may have room for to be kept (a map
/// grown by an unusual head is let go).
const SPARE_MAPS: usize = 32;
const SPARE_UP_TO: usize = 64;

/// A header map for a response head: a spare one, emptied, or a new one.
fn spare_fields() -> HeaderMap {
    SPARE_FIELDS.with_borrow_mut(Vec::pop).unwrap_or_default()
}

/// Gives a header map that is done with back, emptied, for the next response heads read on
/// this thread.
pub fn give_back_fields(mut map: HeaderMap) {
    if map.capacity() > SPARE_UP_TO {
        return;
    }
    map.clear();
    SPARE_FIELDS.with_borrow_mut(|spare| {
        if spare.len() < SPARE_MAPS {
            spare.push(map);
        }
    });
}

/// Whether tern's own exchange carries the request: one that does not upgrade, and either
/// has no body and a method that may be sent again when a pooled connection turns out dead
/// under it (`GET`, `HEAD`, `OPTIONS`), or has its body whole in hand, as long as its
/// `Content-Length` says (written with the head; such a request is not sent twice).
pub fn fits(req: &Request<UpBody>, upgrade: bool) -> bool {
    if upgrade {
        return false;
    }
    let resendable = resendable(req.method());
    match req.body().whole() {
        Some(body) => match content_length(req.headers()) {
            Ok(Some(n)) => n == body.len() as u64,
            Ok(None) => body.is_empty() && resendable,
            Err(_) => false,
        },
        None => resendable && http_body::Body::is_end_stream(req.body()),
    }
}

/// A method whose request may go again on another connection when the first closed before
/// a byte of response: the machine may have seen it, and it asks for nothing to change.
fn resendable(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the connection closed before a response")]
    Closed,
    #[error("the connection closed in the response head")]
    ClosedInHead,
    #[error("the connection closed {0}")]
    ClosedInBody(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the response head is over {0} bytes")]
    HeadTooLarge(usize),
    #[error("the response head has over {MAX_FIELDS} header fields")]
    TooManyHeaders,
    #[error("a malformed response head: {0}")]
    Parse(httparse::Error),
    #[error("a content-length that does not parse, or several that disagree")]
    BadLength,
    #[error("a malformed chunked body: {0}")]
    BadChunk(&'static str),
}

impl Error {
    /// Over the size the response head may have (its bytes, or its number of fields).
    pub fn is_too_large(&self) -> bool {
        matches!(self, Error::HeadTooLarge(_) | Error::TooManyHeaders)
    }
}

/// Why an exchange failed, and whether the machine can have seen nothing of it: the
/// connection failed before a byte of response came (a pooled connection its machine had
/// closed), so the request may go again on another.
pub struct Failure {
    pub error: Error,
    pub unanswered: bool,
}

/// Where a connection goes back to once its response has been read to the end.
pub(super) struct Home {
    pub(super) pool: Arc<Pool>,
    pub(super) host: Arc<HostPool>,
}

/// A connection for tern's own exchange: its socket, and the buffer its exchanges are
/// written and read through, kept with the connection while it is warm so that an exchange
/// allocates nothing for it (the buffer's bytes are reused once the client has been sent
/// the last response's).
pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) buf: BytesMut,
}

impl Conn {
    pub(super) fn new(stream: TcpStream) -> Conn {
        Conn { stream, buf: BytesMut::new() }
    }
}

/// Sends `req` (no body: see [`fits`]) on `conn` and reads the response head; the body is
/// read as it is polled, and gives the connection back to `home` at its end. The response
/// head is read into the request's header map, emptied (its room is what hyper's server
/// reuses for the client's next request). The request is left whole while it may still be
/// sent again ([`Failure::unanswered`]).
pub(super) async fn exchange(
    conn: Conn,
    // Only read, but held across awaits: `&mut` keeps the future `Send` for a body that is
    // not `Sync`.
    req: &mut Request<UpBody>,
    extra: Option<&dyn super::Extra>,
    max_head: usize,
    home: Home,
) -> Result<Response<Body>, Failure> {
    let Conn { mut stream, mut buf } = conn;
    buf.clear();
    if buf.capacity() < FIRST_READ {
        buf.reserve(FIRST_READ);
    }
    write_head(&mut buf, req, extra);
    if let UpBody::Whole(Some(body)) = req.body() {
        buf.put_slice(body);
    }
    // Only a request that may go twice is sent again (see [`fits`]): one with a body, or of
    // another method, fails with the connection it went out on.
    let resendable = resendable(req.method());
    if let Err(e) = stream.write_all(&buf).await {
        return Err(Failure { error: e.into(), unanswered: resendable });
    }
    buf.clear();
    let head_room = max_head.max(8192) + 1024;
    let mut heard = false;
    // Read, then look for the whole head in what has come (nothing has, before the first read).
    loop {
        let read = std::future::poll_fn(|cx| poll_fill(&mut stream, &mut buf, FIRST_READ, cx)).await;
        match read {
            Ok(0) if !heard => return Err(Failure { error: Error::Closed, unanswered: resendable }),
            Ok(0) => return Err(Failure { error: Error::ClosedInHead, unanswered: false }),
            Ok(_) => heard = true,
            Err(e) => return Err(Failure { error: e.into(), unanswered: resendable && !heard }),
        }
        match parse_head(&mut buf, req, head_room) {
            Ok(Some(head)) => return Ok(head.into_response(stream, buf, home)),
            Ok(None) => {}
            Err(error) => return Err(Failure { error, unanswered: false }),
        }
    }
}

/// The request line and header fields, as the request has them (names are lowercase in a
/// `HeaderMap`, as hyper writes them too), then `extra`'s.
fn write_head<B>(buf: &mut BytesMut, req: &Request<B>, extra: Option<&dyn super::Extra>) {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    buf.put_slice(req.method().as_str().as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(path.as_bytes());
    buf.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        buf.put_slice(name.as_str().as_bytes());
        buf.put_slice(b": ");
        buf.put_slice(value.as_bytes());
        buf.put_slice(b"\r\n");
    }
    if let Some(extra) = extra {
        extra.write(buf);
    }
    buf.put_slice(b"\r\n");
}

/// Reads what the socket has into `buf`, with room for at least `room` more if it has
/// little left. Ready(Ok(0)) at the end of the stream. Through `AsyncRead`, so that a read
/// shorter than the room clears the socket's readiness (Tokio knows it drained the socket),
/// and [`still_open`] then costs no system call.
fn poll_fill(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    room: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(room);
    }
    tokio_util::io::poll_read_buf(Pin::new(stream), cx, buf)
}

/// A response head, parsed; its header values share the head's bytes.
struct Head {
    status: StatusCode,
    version: Version,
    reason: Option<Bytes>,
    headers: HeaderMap,
    framing: Framing,
    reusable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Read to the end of the connection.
    Close,
}

/// The response head at the start of `buf`, taken off it, once it is all there (`None`
/// until then); its fields go into `req`'s header map, emptied. Informational responses
/// (other than 101) are read past, as hyper's client does.
fn parse_head<B>(buf: &mut BytesMut, req: &Request<B>, head_room: usize) -> Result<Option<Head>, Error> {
    loop {
        let mut table = head::table();
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut table,
        ) {
            Ok(httparse::Status::Complete(len)) if len > head_room => {
                return Err(Error::HeadTooLarge(head_room));
            }
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > head_room => {
                return Err(Error::HeadTooLarge(head_room));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Error::TooManyHeaders),
            Err(e) => return Err(Error::Parse(e)),
        };
        let code = parsed.code.unwrap_or_default();
        if (100..200).contains(&code) && code != 101 {
            buf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| Error::Parse(httparse::Error::Status))?;
        let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
        // Where each field sits in `buf`, to share the head's bytes once it is split off.
        let reason = parsed.reason.filter(|r| Some(*r) != status.canonical_reason()).map(|r| {
            let at = r.as_ptr() as usize - buf.as_ptr() as usize;
            at..at + r.len()
        });
        let places = head::Places::of(buf, parsed.headers);
        let head = buf.split_to(len).freeze();
        let mut headers = spare_fields();
        headers.reserve(places.len());
        // The fields that frame the body are read on the way, not looked up after.
        let mut framed = Framed::default();
        for (name, value) in places.iter() {
            let name =
                HeaderName::from_bytes(&head[name]).map_err(|_| Error::Parse(httparse::Error::HeaderName))?;
            let value = HeaderValue::from_maybe_shared(head.slice(value))
                .map_err(|_| Error::Parse(httparse::Error::HeaderValue))?;
            framed.see(&name, value.as_bytes())?;
            // The client's side would strip them: left out, they are neither hashed in nor
            // looked up and removed.
            if !head::only_this_hop(&name, value.as_bytes()) {
                headers.append(name, value);
            }
        }
        let reason = reason.map(|r| head.slice(r));
        let (framing, reusable) = framing(req.method(), status, version, &framed);
        return Ok(Some(Head { status, version, reason, headers, framing, reusable }));
    }
}

/// What a response's `Connection`, `Content-Length` and `Transfer-Encoding` fields say, read
/// field by field as the head is taken.
#[derive(Default)]
struct Framed {
    /// `Connection` has `close`.
    close: bool,
    /// Every `Content-Length` value (repeated fields, comma lists) is this number.
    length: Option<u64>,
    /// With a `Transfer-Encoding` field: whether the last coding of the last one is `chunked`.
    chunked: Option<bool>,
}

impl Framed {
    fn see(&mut self, name: &HeaderName, value: &[u8]) -> Result<(), Error> {
        if *name == header::CONNECTION {
            self.close |= value.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        } else if *name == header::CONTENT_LENGTH {
            length_of(value, &mut self.length)?;
        } else if *name == header::TRANSFER_ENCODING {
            let last = value.rsplit(|b| *b == b',').next().map(<[u8]>::trim_ascii);
            self.chunked = Some(last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")));
        }
        Ok(())
    }
}

/// How the body is framed (RFC 9112 §6.3), and whether the connection may carry another
/// exchange after it.
fn framing(method: &Method, status: StatusCode, version: Version, framed: &Framed) -> (Framing, bool) {
    let keep = version == Version::HTTP_11 && !framed.close && status != StatusCode::SWITCHING_PROTOCOLS;
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return (Framing::Empty, keep);
    }
    let length = framed.length;
    match framed.chunked {
        // Framed two ways: read by its chunks, and never trusted with another exchange.
        Some(true) => return (Framing::Chunked, keep && length.is_none()),
        Some(false) => return (Framing::Close, false),
        None => {}
    }
    match length {
        Some(0) => (Framing::Empty, keep),
        Some(n) => (Framing::Length(n), keep),
        None => (Framing::Close, false),
    }
}

/// The `Content-Length`, if any: every value (repeated fields, comma lists) must be the
/// same number of at most 19 digits.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Error> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        length_of(value.as_bytes(), &mut length)?;
    }
    Ok(length)
}

/// One `Content-Length` value, checked against the `length` earlier ones said.
fn length_of(value: &[u8], length: &mut Option<u64>) -> Result<(), Error> {
    for part in value.split(|b| *b == b',') {
        let digits = part.trim_ascii();
        if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
            return Err(Error::BadLength);
        }
        let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != n) {
            return Err(Error::BadLength);
        }
        *length = Some(n);
    }
    Ok(())
}

impl Head {
    fn into_response(self, stream: TcpStream, buf: BytesMut, home: Home) -> Response<Body> {
        let state = match self.framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::Close => State::Close,
        };
        let mut body = Body {
            stream: Some(stream),
            buf,
            state,
            reusable: self.reusable,
            home: Some(home),
            room: FIRST_READ,
        };
        if body.state == State::Done {
            body.finish();
        }
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        *resp.version_mut() = self.version;
        *resp.headers_mut() = self.headers;
        if let Some(reason) = self.reason.and_then(|r| hyper::ext::ReasonPhrase::try_from(r).ok()) {
            resp.extensions_mut().insert(reason);
        }
        resp
    }
}

/// A response body read off the machine's socket as it is polled.
pub struct Body {
    /// `None` once the body ended: given back to the pool, or closed.
    stream: Option<TcpStream>,
    buf: BytesMut,
    state: State,
    reusable: bool,
    home: Option<Home>,
    /// The next read's room: doubled while reads fill it.
    room: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Bytes of the body still to come.
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// A chunk-size line.
    Size,
    /// Bytes of the chunk still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer fields, then the blank line.
    Trailers,
}

impl Body {
    /// The body ended: its connection goes back to the pool if the response was read to
    /// its end with nothing after it, and is closed otherwise.
    fn finish(&mut self) {
        self.state = State::Done;
        let stream = self.stream.take();
        let mut buf = std::mem::take(&mut self.buf);
        if buf.capacity() > 2 * FIRST_READ {
            // Grown for a big body: not kept with an idle connection.
            buf = BytesMut::new();
        }
        if let (Some(stream), Some(home), true, true) =
            (stream, self.home.take(), self.reusable, buf.is_empty())
        {
            home.pool.put_raw(&home.host, Conn { stream, buf });
        }
    }

    /// The next frame the bytes in `buf` make, if they make one.
    fn step(&mut self) -> Result<Step, Error> {
        loop {
            match self.state {
                State::Done => return Ok(Step::End),
                State::Length(n) => {
                    if self.buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(self.buf.len());
                    let data = self.buf.split_to(take).freeze();
                    self.state = State::Length(n - take as u64);
                    if n == take as u64 {
                        self.finish();
                    }
                    return Ok(Step::Frame(Frame::data(data)));
                }
                State::Close if self.buf.is_empty() => return Ok(Step::More),
                State::Close => return Ok(Step::Frame(Frame::data(self.buf.split().freeze()))),
                State::Chunked(chunk) => match self.chunk(chunk)? {
                    Step::More if self.state != State::Chunked(chunk) => {}
                    step => return Ok(step),
                },
            }
        }
    }

    /// One step through a chunked body; `More` with the state moved on means go on.
    fn chunk(&mut self, chunk: Chunk) -> Result<Step, Error> {
        match chunk {
            Chunk::Size => {
                let Some(end) = self.buf.windows(2).take(MAX_CHUNK_LINE).position(|w| w == b"\r\n") else {
                    if self.buf.len() >= MAX_CHUNK_LINE {
                        return Err(Error::BadChunk("a chunk-size line too long"));
                    }
                    return Ok(Step::More);
                };
                let size = chunk_size(&self.buf[..end])?;
                self.buf.advance(end + 2);
                self.state = State::Chunked(if size == 0 { Chunk::Trailers } else { Chunk::Data(size) });
                Ok(Step::More)
            }
            Chunk::Data(n) => {
                if self.buf.is_empty() {
                    return Ok(Step::More);
                }
                let take = usize::try_from(n).unwrap_or(usize::MAX).min(self.buf.len());
                let data = self.buf.split_to(take).freeze();
                let left = n - take as u64;
                self.state = State::Chunked(if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) });
                Ok(Step::Frame(Frame::data(data)))
            }
            Chunk::DataEnd => {
                if self.buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &self.buf[..2] != b"\r\n" {
                    return Err(Error::BadChunk("no CRLF after a chunk's data"));
                }
                self.buf.advance(2);
                self.state = State::Chunked(Chunk::Size);
                Ok(Step::More)
            }
            Chunk::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
                let (len, trailers) = match httparse::parse_headers(&self.buf, &mut fields) {
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let mut map = HeaderMap::with_capacity(fields.len());
                        for f in fields {
                            let name = HeaderName::from_bytes(f.name.as_bytes());
                            let value = HeaderValue::from_bytes(f.value);
                            if let (Ok(name), Ok(value)) = (name, value) {
                                map.append(name, value);
                            }
                        }
                        (len, map)
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() > MAX_TRAILERS => {
                        return Err(Error::BadChunk("trailer fields too large"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(Step::More),
                    Err(_) => return Err(Error::BadChunk("malformed trailer fields")),
                };
                self.buf.advance(len);
                self.finish();
                Ok(if trailers.is_empty() { Step::End } else { Step::Frame(Frame::trailers(trailers)) })
            }
        }
    }
}

enum Step {
    Frame(Frame<Bytes>),
    /// Nothing to give until more bytes come.
    More,
    End,
}

/// A chunk-size line's size: hex digits, then optional extensions (`;` and anything but a
/// line end), which are ignored.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(Error::BadChunk("a chunk size that is not hex, or too big"));
    }
    let rest = &line[digits..];
    let rest = &rest[rest.iter().take_while(|b| matches!(b, b' ' | b'\t')).count()..];
    if !(rest.is_empty() || rest[0] == b';') || rest.iter().any(|b| matches!(b, b'\r' | b'\n')) {
        return Err(Error::BadChunk("a malformed chunk-size line"));
    }
    let hex = |b: u8| u64::from((b as char).to_digit(16).unwrap_or(0));
    Ok(line[..digits].iter().fold(0u64, |n, b| (n << 4) | hex(*b)))
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        loop {
            match this.step() {
                Ok(Step::Frame(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(Step::End) => return Poll::Ready(None),
                Ok(Step::More) => {}
                Err(e) => {
                    this.close();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(stream) = &mut this.stream else { return Poll::Ready(None) };
            let room = this.room;
            // Nothing buffered and nothing to read (a stream between events, a slow
            // machine): the wait holds no buffer; one is made when bytes come. A body whose
            // reads fill their room (a download) keeps its growing buffer.
            if this.buf.is_empty() && room == FIRST_READ && stream.poll_read_ready(cx).is_pending() {
                if this.buf.capacity() > 0 {
                    this.buf = BytesMut::new();
                }
                return Poll::Pending;
            }
            let read = ready!(poll_fill(stream, &mut this.buf, room, cx));
            match read {
                Ok(0) if this.state == State::Close => {
                    this.reusable = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.close();
                    let e = match this.state {
                        State::Length(_) => "before the body's length was read",
                        _ => "before the chunked body's end",
                    };
                    return Poll::Ready(Some(Err(Error::ClosedInBody(e))));
                }
                Ok(n) => {
                    if n >= room {
                        this.room = (room * 2).min(MAX_READ);
                    }
                }
                Err(e) => {
                    this.close();
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Body {
    /// Ends the body with its connection closed: it failed midway.
    fn close(&mut self) {
        self.reusable = false;
        self.finish();
    }
}

/// Whether a pooled connection's socket is still open and quiet: nothing came on it since
/// its response was read (a machine that closed it sent a FIN; one that sent more broke
/// the framing, as a body sent after a `HEAD` answer does). A read is tried only if the
/// reactor says the socket is readable; after a response read short of its buffer it does
/// not, and this costs no system call.
pub(super) fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests;
