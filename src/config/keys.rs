//! Key material named by the configuration: the client certificate (`client_certificate_file`:
//! PEM certificate + RSA private key) and the Google service account key
//! (`service_account_key_file`: JSON with `client_email`, `private_key`, `token_uri`).
//!
//! Owns reading and parsing them at load, so a file that cannot be used is a config error
//! naming file and key; signing with the key is [`RsaKey::sign_rs256`]. What is signed (the
//! JWTs) is the OAuth side's business (`oauth/credential.rs`). The private key never prints.

use ring::signature::RsaKeyPair;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An RSA private key for RS256 signatures; Debug shows nothing of it.
#[derive(Clone)]
pub struct RsaKey(Arc<RsaKeyPair>);

impl fmt::Debug for RsaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RsaKey([redacted])")
    }
}

/// The signature could not be made (ring refused; not expected with a parsed key).
#[derive(Debug, thiserror::Error)]
#[error("RSA signing failed")]
pub struct SignError;

impl RsaKey {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (JWS `RS256`) over `message`.
    pub fn sign_rs256(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let mut sig = vec![0u8; self.0.public().modulus_len()];
        self.0
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                message,
                &mut sig,
            )
            .map_err(|_| SignError)?;
        Ok(sig)
    }

    /// The SubjectPublicKeyInfo's RSA public key bytes (PKCS#1 RSAPublicKey).
    fn public_key(&self) -> &[u8] {
        use ring::signature::KeyPair as _;
        self.0.public_key().as_ref()
    }
}

/// Why a key or certificate file cannot be used (the file is named by the caller).
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} holds no CERTIFICATE block")]
    NoCertificate(String),
    #[error("{0} holds a certificate but no private key (append the key's PEM to the file)")]
    NoKey(String),
    #[error("{0}: the private key is not an RSA key (PKCS#8 or PKCS#1) of 2048 bits or more")]
    NotRsa(String),
    #[error("{path}: the certificate cannot be parsed ({reason})")]
    BadCertificate { path: String, reason: String },
    #[error("{path}: the certificate expired at unix time {not_after}; make and upload a new one")]
    Expired { path: String, not_after: i64 },
    #[error("{path} is not a service account JSON key ({reason})")]
    BadServiceAccount { path: String, reason: String },
}

/// `client_certificate_file`, parsed.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    pub path: PathBuf,
    /// SHA-256 of the DER certificate: the `x5t#S256` header (base64url) and the thumbprint
    /// `check` shows (hex).
    pub sha256: [u8; 32],
    /// The certificate's notAfter, unix seconds.
    pub not_after: i64,
    /// False when the key is not the certificate's (the token endpoint will refuse it).
    pub key_matches: bool,
    pub key: RsaKey,
}

impl ClientCertificate {
    /// The SHA-256 thumbprint in upper-case hex, as the Azure portal shows (SHA-1 there).
    pub fn thumbprint_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02X}")).collect()
    }
}

/// `service_account_key_file`, parsed; `subject` is the account's mailbox (domain-wide
/// delegation: the service account acts as it).
#[derive(Debug, Clone)]
pub struct ServiceAccountKey {
    pub path: PathBuf,
    pub client_email: String,
    pub token_uri: Option<String>,
    pub subject: String,
    pub key: RsaKey,
}

fn rsa_key(der: &[u8], pkcs8: bool, path: &str) -> Result<RsaKey, KeyFileError> {
    let parsed = if pkcs8 {
        RsaKeyPair::from_pkcs8(der)
    } else {
        RsaKeyPair::from_der(der)
    };
    parsed
        .map(|k| RsaKey(Arc::new(k)))
        .map_err(|_| KeyFileError::NotRsa(path.to_string()))
}

/// The first private key in PEM `text`, if any (PKCS#8 or PKCS#1 RSA; other kinds refused).
fn pem_key(text: &[u8], path: &str) -> Result<Option<RsaKey>, KeyFileError> {
    let mut reader = text;
    for item in rustls_pemfile::read_all(&mut reader).flatten() {
        match item {
            rustls_pemfile::Item::Pkcs8Key(k) => {
                return rsa_key(k.secret_pkcs8_der(), true, path).map(Some)
            }
            rustls_pemfile::Item::Pkcs1Key(k) => {
                return rsa_key(k.secret_pkcs1_der(), false, path).map(Some)
            }
            rustls_pemfile::Item::Sec1Key(_) => return Err(KeyFileError::NotRsa(path.to_string())),
            _ => {}
        }
    }
    Ok(None)
}

/// Reads `path`: the first CERTIFICATE and the first private key (RSA). An expired
/// certificate is an error; `now` is unix seconds.
pub(crate) fn client_certificate(path: &Path, now: u64) -> Result<ClientCertificate, KeyFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read(path).map_err(|source| KeyFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut reader = text.as_slice();
    let der = rustls_pemfile::certs(&mut reader)
        .flatten()
        .next()
        .ok_or_else(|| KeyFileError::NoCertificate(shown.clone()))?;
    let key = pem_key(&text, &shown)?.ok_or_else(|| KeyFileError::NoKey(shown.clone()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| KeyFileError::BadCertificate {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    let not_after = cert.validity().not_after.timestamp();
    if not_after <= i64::try_from(now).unwrap_or(i64::MAX) {
        return Err(KeyFileError::Expired {
            path: shown,
            not_after,
        });
    }
    let key_matches = cert.public_key().parsed().ok().is_some_and(|pk| match pk {
        x509_parser::public_key::PublicKey::RSA(rsa) => {
            // RSAPublicKey DER from ring vs the certificate's modulus.
            let m = rsa
                .modulus
                .iter()
                .skip_while(|b| **b == 0)
                .copied()
                .collect::<Vec<_>>();
            let ours = key.public_key();
            ours.windows(m.len().max(1)).any(|w| w == m.as_slice())
        }
        _ => false,
    });
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    let mut sha256 = [0u8; 32];
    sha256.copy_from_slice(digest.as_ref());
    Ok(ClientCertificate {
        path: path.to_path_buf(),
        sha256,
        not_after,
        key_matches,
        key,
    })
}

#[derive(serde::Deserialize)]
struct ServiceAccountJson {
    client_email: String,
    private_key: String,
    token_uri: Option<String>,
}

/// Reads a Google service account JSON key file.
pub(crate) fn service_account(
    path: &Path,
    subject: &str,
) -> Result<ServiceAccountKey, KeyFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read(path).map_err(|source| KeyFileError::Read {
        path: shown.clone(),
        source,
    })?;
    // serde_json's message names the field, never a value of the file.
    let json: ServiceAccountJson =
        serde_json::from_slice(&text).map_err(|e| KeyFileError::BadServiceAccount {
            path: shown.clone(),
            reason: match e.classify() {
                serde_json::error::Category::Data => {
                    "a field is missing or of the wrong type: client_email, private_key".into()
                }
                _ => format!("not JSON: line {} column {}", e.line(), e.column()),
            },
        })?;
    if !json.client_email.contains('@') {
        return Err(KeyFileError::BadServiceAccount {
            path: shown,
            reason: "client_email is not an address".into(),
        });
    }
    let key = pem_key(json.private_key.as_bytes(), &shown)?.ok_or_else(|| {
        KeyFileError::BadServiceAccount {
            path: shown.clone(),
            reason: "private_key holds no PEM private key".into(),
        }
    })?;
    Ok(ServiceAccountKey {
        path: path.to_path_buf(),
        client_email: json.client_email,
        token_uri: json.token_uri,
        subject: subject.to_string(),
        key,
    })
}
