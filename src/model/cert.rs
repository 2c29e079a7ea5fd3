//! Certificates: PEM decoding and the checks made when one is applied, never during a
//! handshake. A certificate is accepted only if its private key matches the leaf and the
//! leaf's names cover the hostname it is declared for.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::CertSpec;
use super::names::cert_name_covers;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("the certificate PEM holds no certificate")]
    NoCertificate,
    #[error("the certificate PEM does not parse: {0}")]
    BadCertificatePem(String),
    #[error("the key PEM holds no private key: {0}")]
    BadKeyPem(String),
    #[error("the private key type is not supported (RSA, ECDSA P-256/P-384 and Ed25519 are)")]
    UnsupportedKey,
    #[error("the private key does not match the certificate (the key belongs to another certificate)")]
    KeyMismatch,
    #[error("the leaf certificate does not parse as X.509: {0}")]
    BadX509(String),
    #[error("the certificate's names {names:?} do not cover {hostname:?}")]
    NameNotCovered { hostname: String, names: Vec<String> },
}

/// A certificate that passed every check, ready for the TLS resolver.
#[derive(Debug)]
pub struct ParsedCert {
    pub key: Arc<CertifiedKey>,
    /// The DNS names of the leaf (subjectAltName, or the common name when it has none).
    pub names: Vec<String>,
    /// The leaf's notAfter, as seconds since the Unix epoch.
    pub not_after: i64,
}

/// Decodes and checks a certificate for `spec.hostname`.
pub fn parse(spec: &CertSpec) -> Result<ParsedCert, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(spec.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::BadCertificatePem(e.to_string()))?;
    let leaf = chain.first().ok_or(CertError::NoCertificate)?;
    let key_der = PrivateKeyDer::from_pem_slice(spec.key_pem.as_bytes())
        .map_err(|e| CertError::BadKeyPem(e.to_string()))?;
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|_| CertError::UnsupportedKey)?;
    let (names, not_after) = leaf_names(leaf)?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        // ring cannot derive the public key of every key type; those are checked by clients.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => return Err(CertError::KeyMismatch),
    }
    if !names.iter().any(|n| cert_name_covers(n, &spec.hostname)) {
        return Err(CertError::NameNotCovered { hostname: spec.hostname.clone(), names });
    }
    Ok(ParsedCert { key: Arc::new(certified), names, not_after })
}

fn leaf_names(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64), CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| CertError::BadX509(e.to_string()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_ascii_lowercase),
        );
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).unwrap();
        (ck.cert.pem(), ck.signing_key.serialize_pem())
    }

    #[test]
    fn accepts_matching_certificates() {
        let (cert_pem, key_pem) = self_signed(&["hello.example.com", "*.hello.example.com"]);
        for hostname in ["hello.example.com", "a.hello.example.com", "*.hello.example.com"] {
            let spec =
                CertSpec { hostname: hostname.into(), cert_pem: cert_pem.clone(), key_pem: key_pem.clone() };
            let parsed = parse(&spec).unwrap();
            assert_eq!(parsed.names.len(), 2);
        }
    }

    #[test]
    fn refuses_foreign_key_and_uncovered_names_saying_which() {
        let (cert_pem, _) = self_signed(&["hello.example.com"]);
        let (_, other_key) = self_signed(&["hello.example.com"]);
        let spec =
            CertSpec { hostname: "hello.example.com".into(), cert_pem: cert_pem.clone(), key_pem: other_key };
        assert!(matches!(parse(&spec), Err(CertError::KeyMismatch)));

        let (cert_pem, key_pem) = self_signed(&["hello.example.com"]);
        let spec = CertSpec { hostname: "other.example.com".into(), cert_pem, key_pem };
        let err = parse(&spec).unwrap_err();
        assert!(err.to_string().contains("other.example.com"), "{err}");
        assert!(err.to_string().contains("hello.example.com"), "{err}");
    }

    #[test]
    fn refuses_garbage() {
        let spec = CertSpec { hostname: "a.b".into(), cert_pem: "nope".into(), key_pem: "nope".into() };
        assert!(parse(&spec).is_err());
    }
}
