//! The floor: the least CPU a purpose-built HTTP/1.1 relay on Tokio spends per request on this
//! machine, for the load harness (`benches/load/run.sh`) to set beside tern, nginx and HAProxy.
//! Not a proxy anyone should run: one machine, HTTP/1.1 (keep-alive unless the client says
//! `Connection: close` or speaks HTTP/1.0), one machine connection per client connection,
//! `Content-Length` bodies only (a response to HEAD, or a 204 or 304, is not told apart), no routing, no
//! limits, no timeouts, no metrics, no error pages.
//!
//! What it does do is what a request costs at the least: one task per client connection that
//! serves both sides in turn (no task, channel or boxed future per exchange), one buffer each
//! way per connection, reused; the head parsed in place (httparse), the hop-by-hop headers
//! dropped and tern's forwarding headers added (`X-Forwarded-*`, `Fly-*`, `Via`, a request id)
//! as bytes copied into one write; the response head rewritten the same way and sent with the
//! body bytes read with it, in one write. Over keep-alive, the same four socket calls a request
//! as tern, nginx and HAProxy make (with `Connection: close` it also connects to the machine
//! and closes for each request, where they reuse pooled connections).
//!
//! Over TLS it is tokio-rustls (TLS 1.3, ALPN `http/1.1`) around the same relay.
//!
//! It takes tern's command line as far as the harness uses it: `apply` does nothing, `serve -c
//! DIR/tern.toml` reads the machine's address and the certificate's files from
//! `DIR/decl.toml`, listens on two ports of its own choosing (plain and TLS), and logs them as
//! tern does. The harness runs it with `FLOOR=1 SKIP_IDLE=1 benches/load/run.sh`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const HOP_BY_HOP: [&str; 6] =
    ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade"];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("apply" | "--version") => {}
        Some("serve") => {
            let config = args.iter().skip_while(|a| *a != "-c").nth(1).expect("serve -c CONFIG");
            let decl = Path::new(config).with_file_name("decl.toml");
            let text = std::fs::read_to_string(&decl).expect("decl.toml beside the config");
            let value = |key: &str| {
                let found = text.lines().find_map(|l| {
                    Some(l.trim().strip_prefix(key)?.strip_prefix(" = \"")?.strip_suffix('"')?.to_owned())
                });
                found.unwrap_or_else(|| panic!("no {key} in decl.toml"))
            };
            let machine: SocketAddr = value("addr").parse().expect("a machine's addr in decl.toml");
            let cert = CertificateDer::pem_file_iter(value("cert_file"))
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .expect("the certificate");
            let key = PrivateKeyDer::from_pem_file(value("key_file")).expect("the key");
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut tls = rustls::ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3")
                .with_no_client_auth()
                .with_single_cert(cert, key)
                .expect("a usable certificate and key");
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            let tls = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(serve(machine, tls));
        }
        _ => eprintln!("usage: bench_floor serve -c DIR/tern.toml"),
    }
}

async fn serve(machine: SocketAddr, acceptor: tokio_rustls::TlsAcceptor) {
    for tls in [false, true] {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("its address");
        eprintln!("{{\"message\":\"listening\",\"addr\":\"{addr}\",\"tls\":{tls}}}");
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let mut next_id = 0u64;
            loop {
                let Ok((client, peer)) = listener.accept().await else { continue };
                let _ = client.set_nodelay(true);
                next_id += 1 << 32;
                let side = Client { peer, port: addr.port(), tls, id: next_id };
                if tls {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        if let Ok(client) = acceptor.accept(client).await {
                            connection(client, side, machine).await;
                        }
                    });
                } else {
                    tokio::spawn(connection(client, side, machine));
                }
            }
        });
    }
    std::future::pending::<()>().await;
}

/// Who the client is, as the forwarding headers say it; `id` numbers its requests.
struct Client {
    peer: SocketAddr,
    port: u16,
    tls: bool,
    id: u64,
}

/// One side's socket and the bytes read from it and not yet used (`buf[..filled]`).
struct Side<IO> {
    io: IO,
    buf: Vec<u8>,
    filled: usize,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Side<IO> {
    fn new(io: IO) -> Self {
        Side { io, buf: vec![0; 8192], filled: 0 }
    }

    /// Reads until a whole head is buffered; its length, or `None` at EOF or if it does not fit.
    async fn read_head(&mut self) -> Option<usize> {
        loop {
            if let Some(end) = self.buf[..self.filled].windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(end + 4);
            }
            if self.filled == self.buf.len() {
                return None;
            }
            let n = self.io.read(&mut self.buf[self.filled..]).await.ok()?;
            if n == 0 {
                return None;
            }
            self.filled += n;
        }
    }

    /// Appends to `out` the first `body` bytes after the head (`end` long) that are already
    /// here, and drops the head and them from the buffer; returns how many of `body` are left.
    fn take_after_head(&mut self, end: usize, body: usize, out: &mut Vec<u8>) -> usize {
        let with_head = (self.filled - end).min(body);
        out.extend_from_slice(&self.buf[end..end + with_head]);
        self.buf.copy_within(end + with_head..self.filled, 0);
        self.filled -= end + with_head;
        body - with_head
    }

    /// Copies the next `left` bytes read from this side to `to`; what comes after them stays.
    async fn copy_to<W: AsyncWrite + Unpin>(&mut self, to: &mut W, mut left: usize) -> Option<()> {
        while left > 0 {
            let n = self.io.read(&mut self.buf).await.ok().filter(|&n| n > 0)?;
            let used = n.min(left);
            to.write_all(&self.buf[..used]).await.ok()?;
            left -= used;
            self.buf.copy_within(used..n, 0);
            self.filled = n - used;
        }
        Some(())
    }
}

fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Copies the headers that are not hop-by-hop; returns the `Content-Length` and whether a
/// `Connection` header says `close`.
fn copy_headers(headers: &[httparse::Header<'_>], out: &mut Vec<u8>) -> (Option<usize>, bool) {
    let (mut length, mut close) = (None, false);
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok());
        }
        if h.name.eq_ignore_ascii_case("connection") {
            close |= h.value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        if is_hop_by_hop(h.name) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    (length, close)
}

/// The request head for the machine, in `out`; its body's length, and whether the connection
/// ends with this exchange (HTTP/1.0, or `Connection: close`).
fn request_head(head: &[u8], client: &Client, out: &mut Vec<u8>) -> Option<(usize, bool)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    out.clear();
    let _ = write!(out, "{} {} HTTP/1.1\r\n", req.method?, req.path?);
    let (length, close) = copy_headers(req.headers, out);
    let (ip, port, id) = (client.peer.ip(), client.port, client.id);
    let (proto, ssl) = if client.tls { ("https", "on") } else { ("http", "off") };
    let _ = write!(
        out,
        "x-forwarded-for: {ip}\r\nfly-client-ip: {ip}\r\nx-forwarded-proto: {proto}\r\n\
         x-forwarded-ssl: {ssl}\r\nx-forwarded-port: {port}\r\nfly-forwarded-port: {port}\r\n\
         fly-region: bench\r\nfly-request-id: {id:026x}-bench\r\nvia: 1.1 tern\r\n\r\n"
    );
    Some((length.unwrap_or(0), close || req.version != Some(1)))
}

/// The response head for the client, in `out`; its body's length (only `Content-Length`
/// bodies are relayed).
fn response_head(head: &[u8], client: &Client, last: bool, out: &mut Vec<u8>) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    if !matches!(resp.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    out.clear();
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", resp.code?, resp.reason.unwrap_or(""));
    let (length, _) = copy_headers(resp.headers, out);
    let close = if last { "connection: close\r\n" } else { "" };
    let _ = write!(out, "via: 1.1 tern\r\nfly-request-id: {:026x}-bench\r\n{close}\r\n", client.id);
    length
}

/// Serves a client connection: each request to the machine and its response back, in turn.
async fn connection<IO: AsyncRead + AsyncWrite + Unpin>(io: IO, mut client: Client, machine: SocketAddr) {
    let mut down = Side::new(io);
    let mut up: Option<Side<TcpStream>> = None;
    let mut out = Vec::with_capacity(4096);
    loop {
        let Some(end) = down.read_head().await else { return };
        client.id += 1;
        let Some((body, last)) = request_head(&down.buf[..end], &client, &mut out) else { return };
        let left = down.take_after_head(end, body, &mut out);
        if up.is_none() {
            let Ok(socket) = TcpStream::connect(machine).await else { return };
            let _ = socket.set_nodelay(true);
            up = Some(Side::new(socket));
        }
        let Some(machine_side) = up.as_mut() else { return };
        if machine_side.io.write_all(&out).await.is_err()
            || down.copy_to(&mut machine_side.io, left).await.is_none()
        {
            return;
        }
        let Some(end) = machine_side.read_head().await else { return };
        let Some(body) = response_head(&machine_side.buf[..end], &client, last, &mut out) else { return };
        let left = machine_side.take_after_head(end, body, &mut out);
        // Flushed: over TLS, records the socket did not take yet wait in rustls until then.
        if down.io.write_all(&out).await.is_err()
            || machine_side.copy_to(&mut down.io, left).await.is_none()
            || down.io.flush().await.is_err()
        {
            return;
        }
        if last {
            let _ = down.io.shutdown().await;
            return;
        }
    }
}
