//! SNI: exact, wildcard, unknown; certificates that come and go without a restart.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::backend::Backend;
use crate::harness::{Ca, HttpVersion, Proxy, app_decl, eventually};

async fn handshake(ca: &Ca, proxy: &Proxy, sni: &str) -> Result<(), rustls::Error> {
    let connector = TlsConnector::from(Arc::new(ca.client_config(&[b"http/1.1"])));
    let tcp = TcpStream::connect(proxy.https).await.unwrap();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    match connector.connect(name, tcp).await {
        Ok(_) => Ok(()),
        Err(e) => {
            Err(*e.into_inner().expect("an inner error").downcast::<rustls::Error>().expect("a TLS error"))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_exact_then_wildcard_and_refuses_unknown_names() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let decl = app_decl("site", &["exact.test", "*.wild.test"], &[("m1", b.addr, "started")], "")
        + &ca.decl("exact.test", &["exact.test"])
        + &ca.decl("*.wild.test", &["*.wild.test"]);
    let proxy = Proxy::start(&decl).await;
    let client = proxy.client(&ca, HttpVersion::Http1);

    // The client verifies the chain and the name: the wrong certificate would fail here.
    for host in ["exact.test", "a.wild.test", "B.Wild.Test"] {
        let r = client.get(proxy.tls_url(host, "/id")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{host}");
        assert_eq!(r.text().await.unwrap(), "m1");
    }

    let err = handshake(&ca, &proxy, "unknown.test").await.unwrap_err();
    assert_eq!(err, rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName));
    // One label only: a.b.wild.test is not covered by *.wild.test.
    let err = handshake(&ca, &proxy, "a.b.wild.test").await.unwrap_err();
    assert_eq!(err, rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName));
    let metrics = proxy.metrics().await;
    assert!(metrics.contains("tern_tls_handshake_failures_total{reason=\"unknown_sni\"} 2"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_come_and_go_without_a_restart() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let base = app_decl("site", &["old.test", "new.test"], &[("m1", b.addr, "started")], "");
    let proxy = Proxy::start(&(base.clone() + &ca.decl("old.test", &["old.test"]))).await;
    assert!(handshake(&ca, &proxy, "new.test").await.is_err());

    proxy.apply(&ca.decl("new.test", &["new.test"]));
    let ok =
        eventually(Duration::from_secs(5), || async { handshake(&ca, &proxy, "new.test").await.ok() }).await;
    assert!(ok.is_some(), "an applied certificate is served without a restart");

    // Pruning the old certificate removes it from the running proxy.
    let decl =
        tern::decl::parse(&(base + &ca.decl("new.test", &["new.test"])), "t.toml", std::path::Path::new("."))
            .unwrap();
    let mut store = tern::rib::sqlite::Store::open(&proxy.db).unwrap();
    tern::decl::apply(&mut store, &decl, true, false).unwrap();
    // In the instant of the change the ClientHello check may still see the certificate and
    // the resolver no longer (rustls then says access_denied); settled, the name is unknown.
    let unknown = rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName);
    let gone = eventually(Duration::from_secs(5), || async {
        handshake(&ca, &proxy, "old.test").await.err().filter(|e| *e == unknown)
    })
    .await;
    assert_eq!(gone, Some(unknown), "the pruned certificate's name is unknown to the running proxy");
}

/// A client that trusts `ca` and speaks `version` only, with `provider`'s suites and `alpn`.
fn client_at(
    ca: &Ca,
    version: &'static rustls::SupportedProtocolVersion,
    provider: rustls::crypto::CryptoProvider,
    alpn: &[&[u8]],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_both_work_and_alpn_offers_h2() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(
        &(app_decl("site", &["v.test"], &[("m1", b.addr, "started")], "") + &ca.decl("v.test", &["v.test"])),
    )
    .await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let config = client_at(&ca, version, rustls::crypto::ring::default_provider(), &[b"h2", b"http/1.1"]);
        let tcp = TcpStream::connect(proxy.https).await.unwrap();
        let tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("v.test").unwrap(), tcp)
            .await
            .unwrap();
        let (_, conn) = tls.get_ref();
        assert_eq!(conn.protocol_version(), Some(version.version));
        assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
    }
}

/// tern picks the suite as Go's crypto/tls does: AES-128-GCM, then AES-256-GCM, for a client
/// that lists AES-GCM first (OpenSSL's clients list AES-256-GCM first), ChaCha20-Poly1305 for
/// one that lists it first, and what the client offers when it offers only one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cipher_suite_is_aes_128_unless_the_client_lists_chacha20_first() {
    use rustls::CipherSuite as S;
    use rustls::crypto::ring::cipher_suite as cs;
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(
        &(app_decl("site", &["v.test"], &[("m1", b.addr, "started")], "") + &ca.decl("v.test", &["v.test"])),
    )
    .await;
    #[cfg(target_arch = "x86_64")]
    let aes_in_hardware =
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq");
    #[cfg(target_arch = "aarch64")]
    let aes_in_hardware =
        std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull");
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let aes_in_hardware = false;
    let fast_aes = |aes, chacha| if aes_in_hardware { aes } else { chacha };
    let cases = [
        (
            &rustls::version::TLS13,
            vec![
                cs::TLS13_AES_256_GCM_SHA384,
                cs::TLS13_CHACHA20_POLY1305_SHA256,
                cs::TLS13_AES_128_GCM_SHA256,
            ],
            fast_aes(S::TLS13_AES_128_GCM_SHA256, S::TLS13_CHACHA20_POLY1305_SHA256),
        ),
        (
            &rustls::version::TLS13,
            vec![
                cs::TLS13_CHACHA20_POLY1305_SHA256,
                cs::TLS13_AES_256_GCM_SHA384,
                cs::TLS13_AES_128_GCM_SHA256,
            ],
            S::TLS13_CHACHA20_POLY1305_SHA256,
        ),
        (&rustls::version::TLS13, vec![cs::TLS13_AES_256_GCM_SHA384], S::TLS13_AES_256_GCM_SHA384),
        (
            &rustls::version::TLS13,
            vec![cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_CHACHA20_POLY1305_SHA256],
            fast_aes(S::TLS13_AES_256_GCM_SHA384, S::TLS13_CHACHA20_POLY1305_SHA256),
        ),
        (
            &rustls::version::TLS12,
            vec![
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ],
            fast_aes(
                S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ),
        ),
        (
            &rustls::version::TLS12,
            vec![
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ],
            S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
    ];
    for (version, suites, chosen) in cases {
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: suites.clone(),
            ..rustls::crypto::ring::default_provider()
        };
        let config = client_at(&ca, version, provider, &[b"http/1.1"]);
        let tcp = TcpStream::connect(proxy.https).await.unwrap();
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("v.test").unwrap(), tcp)
            .await
            .unwrap();
        let offered: Vec<_> = suites.iter().map(|s| s.suite()).collect();
        assert_eq!(
            tls.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()),
            Some(chosen),
            "offered {offered:?}"
        );
        // And the session carries a request.
        tls.write_all(b"GET /id HTTP/1.1\r\nHost: v.test\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await.unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "offered {offered:?}: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
}

use rustls::pki_types::pem::PemObject;
