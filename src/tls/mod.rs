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
pub use stream::{Session, Shed, Stream};

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

/// The server configs every TLS listener chooses between, by what the client's hello prefers.
///
/// tern picks the cipher suite, the way Go's crypto/tls (Caddy, Traefik) does, rather than
/// taking the client's first choice: AES-128-GCM, AES-256-GCM, then ChaCha20-Poly1305 where
/// this machine has AES instructions and the client lists an AES-GCM suite before ChaCha20
/// (it has them too); ChaCha20, AES-128-GCM, AES-256-GCM otherwise. AES-128 is the cheapest
/// suite with hardware AES, and its SHA-256 key schedule runs on the CPU's SHA instructions
/// where ring's SHA-384 has none: a resumed TLS 1.3 handshake costs about a tenth less CPU
/// (OpenSSL clients list AES-256-GCM first, which this passes over).
#[derive(Clone)]
pub struct ServerConfigs {
    aes_first: Arc<ServerConfig>,
    chacha_first: Arc<ServerConfig>,
}

impl ServerConfigs {
    /// For HTTP: ALPN `h2` and `http/1.1`.
    pub fn http(catalog: Arc<Catalog>) -> Result<ServerConfigs, rustls::Error> {
        ServerConfigs::new(catalog, vec![b"h2".to_vec(), b"http/1.1".to_vec()])
    }

    /// For TCP services that terminate TLS and relay what is inside (`handlers = ["tls"]`):
    /// the same certificates, no ALPN (the bytes inside are the machine's protocol, not HTTP).
    pub fn raw(catalog: Arc<Catalog>) -> Result<ServerConfigs, rustls::Error> {
        ServerConfigs::new(catalog, Vec::new())
    }

    fn new(catalog: Arc<Catalog>, alpn: Vec<Vec<u8>>) -> Result<ServerConfigs, rustls::Error> {
        let resolver = Arc::new(CertResolver { catalog });
        // Stateless tickets for resumption: nothing shared to lock per handshake but the
        // ticketer's key, which rotates rarely. One ticketer for both orders, so a ticket from
        // either resumes with either.
        let ticketer = rustls::crypto::ring::Ticketer::new()?;
        let config = |aes_first: bool| -> Result<Arc<ServerConfig>, rustls::Error> {
            let mut provider = rustls::crypto::ring::default_provider();
            provider.cipher_suites.sort_by_key(|suite| suite_rank(suite.suite(), aes_first));
            let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                .with_no_client_auth()
                .with_cert_resolver(resolver.clone());
            config.alpn_protocols = alpn.clone();
            config.ignore_client_order = true;
            config.ticketer = ticketer.clone();
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            Ok(Arc::new(config))
        };
        let chacha_first = config(false)?;
        let aes_first = if aes_in_hardware() { config(true)? } else { chacha_first.clone() };
        Ok(ServerConfigs { aes_first, chacha_first })
    }

    /// The config for a client whose hello lists an AES-GCM suite before any ChaCha20 one
    /// (`prefers_aes`), or does not.
    pub fn for_client(&self, prefers_aes: bool) -> &Arc<ServerConfig> {
        if prefers_aes { &self.aes_first } else { &self.chacha_first }
    }
}

/// Where a suite goes in tern's order: TLS 1.3's before TLS 1.2's, and within each, by bulk
/// cipher as [`ServerConfigs`] says.
fn suite_rank(suite: rustls::CipherSuite, aes_first: bool) -> (bool, u8) {
    use rustls::CipherSuite as S;
    let tls12 = !matches!(
        suite,
        S::TLS13_AES_128_GCM_SHA256 | S::TLS13_AES_256_GCM_SHA384 | S::TLS13_CHACHA20_POLY1305_SHA256
    );
    let bulk = match (bulk_of(suite), aes_first) {
        (Some(Bulk::Aes128), true) | (Some(Bulk::ChaCha20), false) => 0,
        (Some(Bulk::Aes256), true) | (Some(Bulk::Aes128), false) => 1,
        (Some(Bulk::ChaCha20), true) | (Some(Bulk::Aes256), false) => 2,
        (None, _) => 3,
    };
    (tls12, bulk)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bulk {
    Aes128,
    Aes256,
    ChaCha20,
}

/// The bulk cipher of the suites tern offers (ring's); `None` for any other.
fn bulk_of(suite: rustls::CipherSuite) -> Option<Bulk> {
    use rustls::CipherSuite as S;
    match suite {
        S::TLS13_AES_128_GCM_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Some(Bulk::Aes128),
        S::TLS13_AES_256_GCM_SHA384
        | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Some(Bulk::Aes256),
        S::TLS13_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Some(Bulk::ChaCha20),
        _ => None,
    }
}

/// Whether the client lists an AES-GCM suite before any ChaCha20 one: the first suite in its
/// list that is either decides. A client without AES instructions lists ChaCha20 first. (Go
/// decides by the first suite it knows at all, so a client listing a CBC suite first gets
/// ChaCha20 there and AES-GCM here; tern offers no CBC suite.)
fn prefers_aes(suites: &[rustls::CipherSuite]) -> bool {
    suites.iter().find_map(|s| bulk_of(*s)).is_none_or(|bulk| bulk != Bulk::ChaCha20)
}

/// Whether this machine encrypts AES-GCM in hardware (AES and carry-less multiply).
fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
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
    let name = read_hello(first)?.name?.trim_end_matches('.').to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

/// What tern reads from a ClientHello before the handshake.
struct Hello {
    /// The server name it asks for, if any.
    name: Option<String>,
    /// It lists an AES-GCM suite before any ChaCha20 one.
    prefers_aes: bool,
}

/// The ClientHello at the start of `first`: `None` if it is not one rustls can read.
fn read_hello(first: &[u8]) -> Option<Hello> {
    let mut acceptor = Acceptor::default();
    let mut rest = first;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let accepted = acceptor.accept().ok()??;
    let hello = accepted.client_hello();
    Some(Hello {
        name: hello.server_name().map(str::to_owned),
        prefers_aes: prefers_aes(hello.cipher_suites()),
    })
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
/// or a session, never in a panic, and without waiting once the input has all been read. The
/// configs are [`accept`]'s own ([`ServerConfigs::http`], the one picked by the hello's suite
/// preference as `accept` picks it) over an empty catalog: no certificate is offered, so
/// every handshake is refused once the hello is read, and what runs is the reading of the
/// hello, the suite choice and the failure and alert paths.
pub fn fuzz_handshake(data: &[u8]) {
    static CONFIGS: std::sync::OnceLock<ServerConfigs> = std::sync::OnceLock::new();
    let configs = CONFIGS.get_or_init(|| {
        ServerConfigs::http(Arc::new(Catalog::new())).expect("the ring provider supports TLS 1.2 and 1.3")
    });
    let mut io = tokio::io::join(data, tokio::io::sink());
    let handshake = std::pin::pin!(async move {
        let Ok(first) = hello::read(&mut io).await else { return };
        let config = configs.for_client(read_hello(&first).is_none_or(|h| h.prefers_aes)).clone();
        let _ = Stream::handshake(io, first, config).await;
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
    configs: &ServerConfigs,
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
        let hello = read_hello(&first);
        let known = match &hello {
            None => Ok(()),
            Some(Hello { name: None, .. }) => Err(HandshakeFailure::NoSni),
            Some(Hello { name: Some(name), .. }) => {
                lookup(&catalog.load(), name).map(|_| ()).ok_or(HandshakeFailure::UnknownSni)
            }
        };
        if let Err(reason) = known {
            // Best effort: the client may already be gone, and we close either way.
            let _ = io.write_all(&UNRECOGNIZED_NAME_ALERT).await;
            let _ = io.shutdown().await;
            return Err(reason);
        }
        let config = configs.for_client(hello.is_none_or(|h| h.prefers_aes)).clone();
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
    fn the_suite_order_follows_what_the_client_lists_first_among_aes_gcm_and_chacha20() {
        use rustls::CipherSuite as S;
        // The first AES-GCM or ChaCha20 suite decides; others (CBC, unknown codes) are passed over.
        let cbc = S::TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA;
        for (listed, aes) in [
            (vec![S::TLS13_AES_256_GCM_SHA384, S::TLS13_CHACHA20_POLY1305_SHA256], true),
            (
                vec![cbc, S::Unknown(0x9999), S::TLS13_CHACHA20_POLY1305_SHA256, S::TLS13_AES_128_GCM_SHA256],
                false,
            ),
            (vec![cbc, S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, S::TLS13_CHACHA20_POLY1305_SHA256], true),
            // Nothing tern offers: either order, and the handshake is refused by rustls.
            (vec![cbc], true),
            (vec![], true),
        ] {
            assert_eq!(prefers_aes(&listed), aes, "{listed:?}");
        }
        // Each order, as rustls will walk it: TLS 1.3 first, then by bulk cipher.
        let order = |aes_first| {
            let mut suites = rustls::crypto::ring::default_provider().cipher_suites;
            suites.sort_by_key(|s| suite_rank(s.suite(), aes_first));
            suites.iter().map(|s| s.suite()).take(3).collect::<Vec<_>>()
        };
        assert_eq!(
            order(true),
            [S::TLS13_AES_128_GCM_SHA256, S::TLS13_AES_256_GCM_SHA384, S::TLS13_CHACHA20_POLY1305_SHA256]
        );
        assert_eq!(
            order(false),
            [S::TLS13_CHACHA20_POLY1305_SHA256, S::TLS13_AES_128_GCM_SHA256, S::TLS13_AES_256_GCM_SHA384]
        );
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
