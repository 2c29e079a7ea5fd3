//! TLS termination. The certificate is chosen by SNI from the catalog snapshot (exact name,
//! then wildcard), with no lock on the handshake path: certificates were parsed and checked
//! when they were applied. An unknown or missing SNI is refused with an `unrecognized_name`
//! alert before any certificate work. TLS 1.2 and 1.3 only; ALPN `h2` and `http/1.1`.
//!
//! The ClientHello is read here before rustls sees it ([`hello`]), so that one that arrives
//! in many small records is handed over in as few as possible: rustls counts record headers
//! against its 64 KiB handshake buffer, and would otherwise drop a big, finely fragmented
//! hello without a word.

mod hello;
mod stream;
pub use stream::{Session, Stream};

use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::catalog::Catalog;
use crate::telemetry::Metrics;

/// Resolves certificates from the current catalog snapshot.
pub struct CertResolver {
    catalog: Arc<Catalog>,
}

impl std::fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertResolver")
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        let snap = self.catalog.load();
        lookup(&snap, name)
    }
}

fn lookup(snap: &crate::catalog::Snapshot, sni: &str) -> Option<Arc<CertifiedKey>> {
    let sni = sni.trim_end_matches('.');
    if sni.bytes().any(|b| b.is_ascii_uppercase()) {
        snap.cert_for(&sni.to_ascii_lowercase()).map(|c| c.key.clone())
    } else {
        snap.cert_for(sni).map(|c| c.key.clone())
    }
}

/// The server config shared by every TLS listener.
pub fn server_config(catalog: Arc<Catalog>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(CertResolver { catalog }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Stateless tickets for resumption: nothing shared to lock per handshake but the
    // ticketer's key, which rotates rarely.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The server config for TCP services that terminate TLS and relay what is inside
/// (`handlers = ["tls"]`): the same certificates, no ALPN (the bytes inside are the
/// machine's protocol, not HTTP).
pub fn raw_server_config(catalog: Arc<Catalog>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = (*server_config(catalog)?).clone();
    config.alpn_protocols.clear();
    Ok(Arc::new(config))
}

/// Reads a TLS client's first flight up to the end of its ClientHello, without answering:
/// the bytes (to pass on, or to hand to a handshake), and the server name the hello asks
/// for (lower-case, no trailing dot), if it is a ClientHello that names one. `None` when the
/// connection failed or closed first, or the hello is too large to be one.
pub async fn peek_sni<IO: AsyncRead + Unpin>(io: &mut IO) -> Option<(Vec<u8>, Option<String>)> {
    let first = hello::read(io).await.ok()?;
    let name = sni_of(&first);
    Some((first, name))
}

/// The server name in the ClientHello at the start of `first` (as [`hello`] gathers it:
/// one record, or the records re-framed), read by rustls's own parser.
pub fn sni_of(first: &[u8]) -> Option<String> {
    let name = hello_server_name(first)??.trim_end_matches('.').to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

/// What the ClientHello at the start of `first` asks for: `None` if it is not one rustls can
/// read, `Some(None)` if it names no server.
fn hello_server_name(first: &[u8]) -> Option<Option<String>> {
    let mut acceptor = Acceptor::default();
    let mut rest = first;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let accepted = acceptor.accept().ok()??;
    Some(accepted.client_hello().server_name().map(str::to_owned))
}

/// The fuzz target's property for the SNI peek: any client bytes either give a first
/// flight or not, never a panic; a name found is lower-case without a trailing dot, and the
/// flight handed on (re-framed, if the hello spanned records) names the same server.
pub fn fuzz_sni_peek(data: &[u8]) {
    let mut io = data;
    let mut peek = std::pin::pin!(peek_sni(&mut io));
    // Reading from a slice never waits: one poll settles it.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let std::task::Poll::Ready(found) = peek.as_mut().poll(&mut cx) else {
        panic!("reading from a slice never waits")
    };
    if let Some((first, name)) = found {
        assert!(first.len() <= data.len() + 5 * 5, "the flight grew past its re-framing");
        if let Some(n) = &name {
            assert!(!n.is_empty() && !n.ends_with('.') && *n == n.to_ascii_lowercase(), "{n:?}");
        }
        // Where rustls, reading the raw bytes itself, finds a name, the peek found the same.
        if let Some(direct) = sni_of(data) {
            assert_eq!(Some(direct), name);
        }
    }
}

/// The fuzz target's property for the server side of a handshake: whatever a client sends
/// (its first flight as [`hello`] reads it, then the rest), the handshake ends, in a refusal
/// or a session, never in a panic, and without waiting once the input has all been read. No
/// certificate is offered, so every handshake is refused once the hello is read: what runs is
/// the reading of the hello and the failure and alert paths.
pub fn fuzz_handshake(data: &[u8]) {
    #[derive(Debug)]
    struct NoCertificate;
    impl ResolvesServerCert for NoCertificate {
        fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            None
        }
    }
    static CONFIG: std::sync::OnceLock<Arc<ServerConfig>> = std::sync::OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(NoCertificate));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    });
    let mut io = tokio::io::join(data, tokio::io::sink());
    let handshake = std::pin::pin!(async move {
        let Ok(first) = hello::read(&mut io).await else { return };
        let _ = Stream::handshake(io, first, config.clone()).await;
    });
    // Reading from a slice and writing to a sink never wait: one poll settles it.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(handshake.poll(&mut cx).is_ready(), "the handshake waited with all its input read");
}

/// Why a handshake failed; also the `reason` label of `tern_tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    NoSni,
    UnknownSni,
    Timeout,
    Protocol,
    /// A ClientHello larger than rustls can buffer.
    HelloTooLarge,
}

impl HandshakeFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::NoSni => "no_sni",
            HandshakeFailure::UnknownSni => "unknown_sni",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::HelloTooLarge => "hello_too_large",
        }
    }
}

/// A fatal `unrecognized_name` (112) alert in a plaintext TLS record: what RFC 6066 says a
/// server that does not know the SNI name should send.
const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];

/// Completes a server handshake on `io`, or refuses it. The whole handshake shares one
/// deadline.
pub async fn accept<IO>(
    mut io: IO,
    config: Arc<ServerConfig>,
    catalog: &Catalog,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<Stream<IO>, HandshakeFailure>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let result = tokio::time::timeout_at(deadline, async {
        let first = match hello::read(&mut io).await {
            Ok(bytes) => bytes,
            Err(hello::HelloError::TooLarge) => {
                // Best effort, as for unknown names.
                let _ = io.write_all(&hello::ILLEGAL_PARAMETER_ALERT).await;
                let _ = io.shutdown().await;
                return Err(HandshakeFailure::HelloTooLarge);
            }
            Err(hello::HelloError::Io) => return Err(HandshakeFailure::Protocol),
        };
        // A hello rustls cannot read goes on to the handshake, which refuses it with the
        // alert rustls chooses.
        let known = match hello_server_name(&first) {
            None => Ok(()),
            Some(None) => Err(HandshakeFailure::NoSni),
            Some(Some(name)) => {
                lookup(&catalog.load(), &name).map(|_| ()).ok_or(HandshakeFailure::UnknownSni)
            }
        };
        if let Err(reason) = known {
            // Best effort: the client may already be gone, and we close either way.
            let _ = io.write_all(&UNRECOGNIZED_NAME_ALERT).await;
            let _ = io.shutdown().await;
            return Err(reason);
        }
        Stream::handshake(io, first, config).await.map_err(|_| HandshakeFailure::Protocol)
    })
    .await;
    let outcome = result.unwrap_or(Err(HandshakeFailure::Timeout));
    match &outcome {
        Ok(_) => metrics.tls_handshakes.inc(),
        Err(reason) => {
            metrics.tls_handshake_failures.with_label_values(&[reason.as_str()]).inc();
            tracing::debug!(target: "tern::tls", reason = reason.as_str(), "TLS handshake refused");
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello from rustls's client, asking for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    /// `hello` (one record) re-sent as records of at most `size` payload bytes each.
    fn split(hello: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in hello[5..].chunks(size) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn peek(data: &[u8]) -> Option<(Vec<u8>, Option<String>)> {
        let mut io = data;
        let mut fut = std::pin::pin!(peek_sni(&mut io));
        match fut.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => None,
        }
    }

    #[test]
    fn the_server_name_is_read_from_a_client_hello_in_one_record_or_many() {
        let hello = client_hello("Db.Example.COM");
        assert_eq!(sni_of(&hello).as_deref(), Some("db.example.com"));
        let (first, name) = peek(&[&hello[..], b"after"].concat()).unwrap();
        assert_eq!(name.as_deref(), Some("db.example.com"));
        assert_eq!(
            first,
            [&hello[..], b"after"].concat(),
            "one record: handed on as read, with what follows"
        );
        // Forty-byte records: gathered, re-framed, and still the same hello.
        let (first, name) = peek(&split(&hello, 40)).unwrap();
        assert_eq!(name.as_deref(), Some("db.example.com"));
        assert_eq!(sni_of(&first).as_deref(), Some("db.example.com"));
        fuzz_sni_peek(&split(&hello, 40));
    }

    #[test]
    fn a_handshake_on_any_bytes_ends_without_a_panic() {
        let hello = client_hello("a.test");
        // The start of another handshake message after the hello, in its record: this
        // panicked the stream once (its alert was taken from rustls over an empty buffer).
        let mut trailing = hello.clone();
        trailing.extend_from_slice(&[0x14, 0, 0, 0]);
        let len = u16::from_be_bytes([trailing[3], trailing[4]]) + 4;
        trailing[3..5].copy_from_slice(&len.to_be_bytes());
        for data in
            [&hello[..], &trailing, &split(&hello, 40), b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00", b""]
        {
            fuzz_handshake(data);
        }
    }

    #[test]
    fn what_is_not_a_hello_naming_a_server_gives_no_name() {
        let ip_hello = client_hello("127.0.0.1");
        for data in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"\x16\x03\x01\x00\x05hello", &ip_hello, b""] {
            let name = peek(data).and_then(|(_, n)| n);
            assert_eq!(name, None, "{data:?}");
            fuzz_sni_peek(data);
        }
        // Cut short: no flight at all.
        let hello = client_hello("a.test");
        assert!(peek(&hello[..hello.len() - 1]).is_none());
    }
}
