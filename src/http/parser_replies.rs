//! hyper answers an HTTP/1.1 request head it cannot parse by itself (400, 414 or 431) and
//! closes the connection. No request ever reaches tern's handler then, so that answer would
//! carry no `tern-error` code. This I/O wrapper recognises those answers on their way out
//! and writes tern's own coded response in their place.
//!
//! hyper's answer has an exact shape: one of three status lines, then only `connection:
//! close`, `content-length: 0` and a well-formed `date`, written as one buffer. It comes only
//! between messages, and the wrapper replaces nothing else: a write is a candidate only at a
//! message boundary, that is before anything was written on the connection, or after a
//! flush that completed while no exchange was open (every byte of every finished response
//! is then on the wire). Body bytes never qualify, even those a machine shaped like hyper's
//! answer: hyper lets go of a body (ending its exchange) before it writes the body's last
//! bytes, and those are written after the last flush of the open exchange. An HTTP/2
//! connection (the preface seen on the sniffing listener) is left alone altogether.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Handler;
use super::activity::ConnState;

/// What the parser refused, as hyper's status says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 400: a request line or header that does not parse.
    Malformed,
    /// 414: a request target longer than hyper's buffer.
    UriTooLong,
    /// 431: a head over hyper's buffer, or over 100 header fields.
    HeadTooLarge,
}

pub struct ParserReplies<IO> {
    inner: IO,
    conn: Arc<ConnState>,
    /// Makes tern's response, and counts and logs it.
    handler: Arc<Handler>,
    peer: SocketAddr,
    /// tern's response, still being written.
    pending: Vec<u8>,
    written: usize,
    /// Everything written so far belongs to finished exchanges and has been flushed.
    at_boundary: bool,
    /// Whether the client's first bytes were read: they tell HTTP/1.1 from HTTP/2.
    sniffed: bool,
    /// An HTTP/2 connection: nothing of it is hyper's HTTP/1.1 answer.
    http2: bool,
}

impl<IO> ParserReplies<IO> {
    pub fn new(inner: IO, conn: Arc<ConnState>, handler: Arc<Handler>, peer: SocketAddr) -> Self {
        ParserReplies {
            inner,
            conn,
            handler,
            peer,
            pending: Vec::new(),
            written: 0,
            at_boundary: true,
            sniffed: false,
            http2: false,
        }
    }

    /// The IO itself, if none of tern's answer is left unwritten.
    pub fn into_inner(self) -> Result<IO, Self> {
        if self.written < self.pending.len() { Err(self) } else { Ok(self.inner) }
    }

    /// tern's replacement, if `buf` is one of hyper's own answers.
    fn replacement(&self, buf: &[u8]) -> Option<Vec<u8>> {
        if !self.at_boundary
            || self.http2
            || !buf.starts_with(b"HTTP/1.1 4")
            || self.conn.open_exchanges() > 0
        {
            return None;
        }
        let (refusal, date) = recognise(buf)?;
        Some(self.handler.parser_refusal(refusal, date, self.peer))
    }
}

/// Recognises hyper's automatic answer to a head it could not parse.
pub fn recognise(buf: &[u8]) -> Option<(Refusal, &str)> {
    if buf.len() > 256 || !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let text = std::str::from_utf8(buf).ok()?;
    let mut lines = text.split("\r\n");
    let refusal = match lines.next()? {
        "HTTP/1.1 400 Bad Request" => Refusal::Malformed,
        "HTTP/1.1 414 URI Too Long" => Refusal::UriTooLong,
        "HTTP/1.1 431 Request Header Fields Too Large" => Refusal::HeadTooLarge,
        _ => return None,
    };
    let mut date = "";
    for line in lines.filter(|l| !l.is_empty()) {
        match line.split_once(": ")? {
            ("connection", "close") | ("content-length", "0") => {}
            ("date", d) if is_http_date(d) => date = d,
            _ => return None,
        }
    }
    Some((refusal, date))
}

/// An IMF-fixdate as hyper writes it: `Sun, 06 Nov 1994 08:49:37 GMT`.
fn is_http_date(d: &str) -> bool {
    let b = d.as_bytes();
    b.len() == 29
        && d.ends_with(" GMT")
        && b[3] == b','
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b' ' | b',' | b':'))
}

impl<IO: AsyncWrite + Unpin> ParserReplies<IO> {
    /// Writes out what is left of tern's replacement, if anything.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Takes `buf` in place of hyper's answer: tern's goes out instead, now or on flush.
    fn replace(&mut self, cx: &mut Context<'_>, taken: usize, with: Vec<u8>) -> Poll<io::Result<usize>> {
        self.pending = with;
        match self.poll_pending(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            // What is left goes out on the flush hyper does next.
            _ => Poll::Ready(Ok(taken)),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ParserReplies<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !self.sniffed && buf.filled().len() > before {
            self.sniffed = true;
            // "PRI " starts only the HTTP/2 preface (no HTTP/1.1 method is PRI).
            self.http2 = buf.filled()[before..].starts_with(b"PRI ");
            if self.http2 {
                // A drain then ends it with GOAWAY.
                self.conn.drain.set_http2();
            }
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ParserReplies<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(with) = self.replacement(buf) {
            return self.replace(cx, buf.len(), with);
        }
        self.at_boundary = false;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (filled.next(), filled.next())
            && let Some(with) = self.replacement(only)
        {
            return self.replace(cx, only.len(), with);
        }
        self.at_boundary = false;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        // All written is out; if no exchange is open, the next write begins a message.
        self.at_boundary = self.conn.open_exchanges() == 0;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_hypers_own_answers() {
        let date = "Sun, 29 Nov 2026 16:51:12 GMT";
        let hyper = |status: &str| {
            format!("HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\ndate: {date}\r\n\r\n")
        };
        assert_eq!(recognise(hyper("400 Bad Request").as_bytes()), Some((Refusal::Malformed, date)));
        assert_eq!(recognise(hyper("414 URI Too Long").as_bytes()), Some((Refusal::UriTooLong, date)));
        assert_eq!(
            recognise(hyper("431 Request Header Fields Too Large").as_bytes()),
            Some((Refusal::HeadTooLarge, date))
        );
        // An app's 400 passed on by tern: it has tern's headers, so it never matches.
        let app =
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nvia: 1.1 tern\r\nfly-request-id: x\r\n\r\n";
        assert_eq!(recognise(app.as_bytes()), None);
        assert_eq!(recognise(hyper("404 Not Found").as_bytes()), None);
        assert_eq!(recognise(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"), None, "not a whole head");
        // A date line carrying anything but a date (a forged response, say) is not hyper's.
        let forged = "HTTP/1.1 400 Bad Request\r\ndate: HTTP/1.1 302 Found\nLocation: x\r\n\r\n";
        assert_eq!(recognise(forged.as_bytes()), None);
    }
}
