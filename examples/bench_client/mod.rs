//! What the load harness's own clients (`bench_idle`, `bench_rate`) share: a TCP or TLS 1.3
//! connection to a proxy and one HTTP/1.1 request/response on it, written by hand so that
//! the client costs little CPU on the load generators' core.
//!
//! The clients measure proxies, not certificates: the server's certificate is accepted as it
//! is (the harness makes a self-signed one), but its handshake signature is still checked,
//! so the server does all the work of a real handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

/// A connection to the proxy: plain TCP or TLS.
pub type Stream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// Where and how to connect: the proxy's address, and TLS (with the SNI to send) or not.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Target {
    /// A target for `addr`; with `tls`, TLS 1.3 offering only `http/1.1`, with `host` as SNI.
    pub fn new(addr: SocketAddr, host: &str, tls: bool) -> anyhow::Result<Target> {
        let tls =
            if tls { Some((connector(b"http/1.1")?, ServerName::try_from(host.to_owned())?)) } else { None };
        Ok(Target { addr, tls })
    }

    /// A target for `addr` over TLS 1.3 offering only `h2`, with `host` as SNI.
    #[allow(dead_code)] // bench_idle's; bench_rate speaks HTTP/1.1 only
    pub fn h2(addr: SocketAddr, host: &str) -> anyhow::Result<Target> {
        Ok(Target { addr, tls: Some((connector(b"h2")?, ServerName::try_from(host.to_owned())?)) })
    }

    pub async fn connect(&self) -> std::io::Result<Stream> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => Ok(Either::Left(tcp)),
            Some((connector, name)) => {
                Ok(Either::Right(Box::new(connector.connect(name.clone(), tcp).await?)))
            }
        }
    }
}

fn connector(alpn: &[u8]) -> anyhow::Result<TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    // One protocol offered, so that the connection is the kind the run measures.
    config.alpn_protocols = vec![alpn.to_vec()];
    // Every connection a full handshake, as from as many different clients.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Accepts any certificate, but checks that the server signed the handshake with its key.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `GET path` for `host`, keep-alive.
pub fn request(host: &str, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tern-bench\r\n\r\n").into_bytes()
}

/// Sends `req` and reads one whole response (Content-Length or chunked body) into `buf`,
/// within `timeout`; returns its status. A response the proxy cut short is an error.
pub async fn exchange<S>(s: &mut S, req: &[u8], buf: &mut Vec<u8>, timeout: Duration) -> std::io::Result<u16>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(timeout, exchange_inner(s, req, buf)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn exchange_inner<S>(s: &mut S, req: &[u8], buf: &mut Vec<u8>) -> std::io::Result<u16>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (status, body, head_end) = send_and_read_head(s, req, buf).await?;
    match body {
        Body::Length(n) => {
            while buf.len() < head_end + n {
                read_more(s, buf).await?;
            }
        }
        // The harness's backend never sends trailers, so the last chunk ends the body.
        Body::Chunked => {
            while !buf[head_end..].ends_with(b"0\r\n\r\n") {
                read_more(s, buf).await?;
            }
        }
    }
    Ok(status)
}

/// Sends `req` and reads the response head alone, within `timeout`; returns its status. The
/// body is left unread: a stream to hold open.
#[allow(dead_code)] // bench_idle's
pub async fn open_stream<S>(
    s: &mut S,
    req: &[u8],
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> std::io::Result<u16>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(timeout, send_and_read_head(s, req, buf)).await {
        Ok(r) => r.map(|(status, ..)| status),
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Sends `req`, reads into `buf` until the response head's end: its status, its body's
/// framing and where the head ends in `buf`.
async fn send_and_read_head<S>(
    s: &mut S,
    req: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<(u16, Body, usize)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    s.write_all(req).await?;
    s.flush().await?;
    buf.clear();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        read_more(s, buf).await?;
    };
    let (status, body) = parse_head(&buf[..head_end])?;
    Ok((status, body, head_end))
}

enum Body {
    Length(usize),
    Chunked,
}

fn parse_head(head: &[u8]) -> std::io::Result<(u16, Body)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let head = std::str::from_utf8(head).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        if name.eq_ignore_ascii_case("content-length") {
            return Ok((status, Body::Length(value.trim().parse().map_err(|_| bad("bad content-length"))?)));
        }
        if name.eq_ignore_ascii_case("transfer-encoding") && value.trim().eq_ignore_ascii_case("chunked") {
            return Ok((status, Body::Chunked));
        }
    }
    Err(bad("response without a length"))
}

async fn read_more<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.reserve(4096);
    if s.read_buf(buf).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}
