//! SNI: exact, wildcard, unknown; certificates that come and go without a restart.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_both_work_and_alpn_offers_h2() {
    let ca = Ca::new();
    let b = Backend::start("m1").await;
    let proxy = Proxy::start(
        &(app_decl("site", &["v.test"], &[("m1", b.addr, "started")], "") + &ca.decl("v.test", &["v.test"])),
    )
    .await;
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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

use rustls::pki_types::pem::PemObject;
