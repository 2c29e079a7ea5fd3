//! hyper answers an HTTP/1.1 request head it cannot parse by itself (400, 414 or 431) and
//! closes the connection. No request ever reaches tern's handler then, so that answer would
//! carry no `tern-error` code. This I/O wrapper recognises those answers on their way out
//! and writes tern's own coded response in their place.
//!
//! hyper's answer has an exact shape: one of three status lines, then only `connection:
//! close`, `content-length: 0` and `date`, written as one buffer while no exchange is open on
//! the connection. Every response tern's handler makes carries `fly-request-id` and `via`,
//! so none of them can match; neither can body bytes, which are written while their
//! exchange is open.

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
}

impl<IO> ParserReplies<IO> {
    pub fn new(inner: IO, conn: Arc<ConnState>, handler: Arc<Handler>, peer: SocketAddr) -> Self {
        ParserReplies { inner, conn, handler, peer, pending: Vec::new(), written: 0 }
    }

    /// tern's replacement, if `buf` is one of hyper's own answers.
    fn replacement(&self, buf: &[u8]) -> Option<Vec<u8>> {
        if !buf.starts_with(b"HTTP/1.1 4") || self.conn.open_exchanges() > 0 {
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
            ("date", d) => date = d,
            _ => return None,
        }
    }
    Some((refusal, date))
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
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ParserReplies<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(with) = self.replacement(buf) {
            return self.replace(cx, buf.len(), with);
        }
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
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
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
    }
}
