//! Test certificate authority: a fresh self-signed CA per [`TestCa`] and the server
//! certificates it issues for the fake upstream (valid for `localhost`, `127.0.0.1`, `::1`).
//!
//! Owns certificate generation only; loading PEM into rustls configs is left to the servers
//! and clients that use them. Keys are ECDSA P-256 generated with ring (through rcgen).

use std::fmt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Names every issued server certificate is valid for: the loopback host name and both
/// loopback addresses, so clients may connect by any of them.
const SERVER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A throwaway certificate authority. Trust [`TestCa::ca_cert_pem`] in a client to accept
/// the certificates from [`TestCa::issue_server_cert`].
pub struct TestCa {
    /// The CA certificate, PEM encoded (a single `CERTIFICATE` block).
    pub ca_cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .finish_non_exhaustive()
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    /// A fresh self-signed CA (new key every call).
    pub fn new() -> TestCa {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "smtp-oauth-bridge test CA");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "smtp-oauth-bridge testkit");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("ring can generate an ECDSA P-256 key");
        let cert = params
            .self_signed(&key)
            .expect("fixed CA parameters always serialize");
        TestCa {
            ca_cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A new server certificate signed by this CA, for `localhost`, `127.0.0.1` and `::1`.
    ///
    /// Returns `(chain_pem, key_pem)`: the chain is the leaf followed by the CA certificate,
    /// the key is PKCS#8 (`BEGIN PRIVATE KEY`).
    pub fn issue_server_cert(&self) -> (String, String) {
        let names: Vec<String> = SERVER_NAMES.iter().map(|s| s.to_string()).collect();
        let mut params =
            CertificateParams::new(names).expect("the fixed server names are valid SANs");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("ring can generate an ECDSA P-256 key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("fixed server parameters always serialize");
        let chain = format!("{}{}", cert.pem(), self.ca_cert_pem);
        (chain, key.serialize_pem())
    }

    /// Writes the CA certificate (PEM) to `path`, e.g. for a config's `upstream.ca_file`.
    pub fn write_ca_pem(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.ca_cert_pem.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_leaf_and_chain_pem() {
        let ca = TestCa::new();
        assert!(ca.ca_cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let (chain, key) = ca.issue_server_cert();
        assert_eq!(chain.matches("-----BEGIN CERTIFICATE-----").count(), 2);
        assert!(chain.ends_with(&ca.ca_cert_pem));
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        // Two CAs never share a key or certificate.
        assert_ne!(TestCa::new().ca_cert_pem, ca.ca_cert_pem);
    }

    #[test]
    fn writes_ca_pem() {
        let ca = TestCa::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        ca.write_ca_pem(&path).expect("write");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            ca.ca_cert_pem
        );
    }
}
