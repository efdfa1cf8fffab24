//! The client credential an account authenticates with at the token endpoint: a client
//! secret, a certificate (a fresh RS256 client assertion per request, RFC 7523 §2.2), a
//! federated assertion file (workload identity: read afresh per request), or a Google
//! service account (the JWT bearer grant's assertion, RFC 7523 §2.1).
//!
//! Owns building and signing the JWTs (ring, through [`crate::config::RsaKey`]) and reading
//! the assertion file; the key files themselves are read and checked at load
//! (`config/keys.rs`), and the requests are sent by `flows.rs`. Assertions are [`Secret`]s:
//! never logged, never in an error.

use crate::clock::unix_now;
use crate::config::{ClientCertificate, OAuth, ServiceAccountKey, SignError};
use crate::secret::Secret;
use base64::Engine as _;
use serde_json::json;
use std::path::{Path, PathBuf};

/// `client_assertion_type` of a JWT client assertion (RFC 7523 §2.2).
pub(crate) const CLIENT_ASSERTION_TYPE: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// `grant_type` of the JWT bearer authorization grant (RFC 7523 §2.1).
pub(crate) const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// A client assertion's lifetime: Microsoft accepts at most 10 minutes.
const CLIENT_ASSERTION_LIFETIME_SECS: u64 = 600;
/// A service-account assertion's lifetime: Google accepts at most an hour.
const SERVICE_ACCOUNT_LIFETIME_SECS: u64 = 3600;
/// Random bytes in a `jti` (unique per assertion).
const JTI_BYTES: usize = 16;
/// The largest assertion file we read (a projected token is about 1-2 KiB).
const MAX_ASSERTION_FILE_BYTES: u64 = 64 * 1024;

/// Why no credential could be presented. Never carries key material or an assertion.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("client assertion file {path}: cannot read it: {source}")]
    ReadAssertion {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "client assertion file {path} is empty (the federated token has not been written yet?)"
    )]
    EmptyAssertion { path: String },
    #[error("client assertion file {path} is larger than {MAX_ASSERTION_FILE_BYTES} bytes")]
    AssertionTooLarge { path: String },
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("no random numbers for the assertion's jti")]
    Random,
}

/// What authenticates the client, borrowed from the account's configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Credential<'a> {
    /// A public client: nothing (delegated flows only).
    None,
    Secret,
    Certificate(&'a ClientCertificate),
    AssertionFile(&'a Path),
    ServiceAccount(&'a ServiceAccountKey),
}

impl<'a> Credential<'a> {
    pub(crate) fn of(oauth: &'a OAuth) -> Credential<'a> {
        if let Some(sa) = &oauth.service_account {
            Credential::ServiceAccount(sa)
        } else if let Some(c) = &oauth.client_certificate {
            Credential::Certificate(c)
        } else if let Some(p) = &oauth.client_assertion_file {
            Credential::AssertionFile(p)
        } else if oauth.client_secret.is_some() {
            Credential::Secret
        } else {
            Credential::None
        }
    }
}

/// The `client_assertion` for a token request to `oauth.token_url`, if the credential is
/// one (certificate: signed now; assertion file: read now).
pub(crate) fn client_assertion(oauth: &OAuth) -> Result<Option<Secret>, CredentialError> {
    match Credential::of(oauth) {
        Credential::Certificate(c) => {
            certificate_assertion(c, &oauth.client_id, &oauth.token_url).map(Some)
        }
        Credential::AssertionFile(p) => read_assertion_file(p).map(Some),
        Credential::None | Credential::Secret | Credential::ServiceAccount(_) => Ok(None),
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn jti() -> Result<String, CredentialError> {
    let mut bytes = [0u8; JTI_BYTES];
    getrandom::getrandom(&mut bytes).map_err(|_| CredentialError::Random)?;
    Ok(b64url(&bytes))
}

/// `header.claims.signature`, RS256.
fn sign(
    key: &crate::config::RsaKey,
    header: &serde_json::Value,
    claims: &serde_json::Value,
) -> Result<Secret, CredentialError> {
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = key.sign_rs256(input.as_bytes())?;
    Ok(Secret::new(format!("{input}.{}", b64url(&sig))))
}

/// A client assertion (Microsoft identity platform's certificate credential): header
/// `x5t#S256`, `aud` = the token endpoint, `iss` = `sub` = client_id, a fresh `jti`,
/// valid from now for 10 minutes.
pub(crate) fn certificate_assertion(
    cert: &ClientCertificate,
    client_id: &str,
    token_url: &str,
) -> Result<Secret, CredentialError> {
    let now = unix_now();
    sign(
        &cert.key,
        &json!({"alg": "RS256", "typ": "JWT", "x5t#S256": b64url(&cert.sha256)}),
        &json!({
            "aud": token_url,
            "iss": client_id,
            "sub": client_id,
            "jti": jti()?,
            "nbf": now,
            "iat": now,
            "exp": now + CLIENT_ASSERTION_LIFETIME_SECS,
        }),
    )
}

/// The service account's assertion for the JWT bearer grant: `iss` = client_email, `sub` =
/// the mailbox, `scope`, `aud` = the token endpoint, valid an hour.
pub(crate) fn service_account_assertion(
    sa: &ServiceAccountKey,
    scopes: &[String],
    token_url: &str,
) -> Result<Secret, CredentialError> {
    let now = unix_now();
    sign(
        &sa.key,
        &json!({"alg": "RS256", "typ": "JWT"}),
        &json!({
            "iss": sa.client_email,
            "sub": sa.subject,
            "scope": scopes.join(" "),
            "aud": token_url,
            "iat": now,
            "exp": now + SERVICE_ACCOUNT_LIFETIME_SECS,
        }),
    )
}

/// The federated assertion file's content, trimmed; read for every request because the
/// kubelet rotates it.
fn read_assertion_file(path: &Path) -> Result<Secret, CredentialError> {
    use std::io::Read as _;
    let shown = || path.display().to_string();
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(MAX_ASSERTION_FILE_BYTES + 1)
                .read_to_string(&mut text)
        })
        .map_err(|source| CredentialError::ReadAssertion {
            path: shown(),
            source,
        })?;
    let text = Secret::new(text);
    if text.expose().len() as u64 > MAX_ASSERTION_FILE_BYTES {
        return Err(CredentialError::AssertionTooLarge { path: shown() });
    }
    let trimmed = text.expose().trim();
    if trimmed.is_empty() {
        return Err(CredentialError::EmptyAssertion { path: shown() });
    }
    Ok(Secret::new(trimmed))
}

/// What `check` says about the credential: its kind, and for a certificate the thumbprint
/// and expiry date.
pub fn describe(oauth: &OAuth) -> String {
    match Credential::of(oauth) {
        Credential::None => "none (public client)".into(),
        Credential::Secret => "client secret".into(),
        Credential::Certificate(c) => format!(
            "certificate (SHA-256 thumbprint {}, expires {})",
            c.thumbprint_hex(),
            date(c.not_after)
        ),
        Credential::AssertionFile(p) => {
            format!("federated assertion file {}", PathBuf::from(p).display())
        }
        Credential::ServiceAccount(sa) => format!("service account {}", sa.client_email),
    }
}

/// `YYYY-MM-DD` (UTC) of unix seconds (civil-from-days, Howard Hinnant's algorithm).
pub(crate) fn date(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    format!("{:04}-{m:02}-{d:02}", if m <= 2 { y + 1 } else { y })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(1_767_225_599), "2025-12-31");
    }

    #[test]
    fn assertion_file_is_trimmed_and_empty_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        assert!(matches!(
            read_assertion_file(&p),
            Err(CredentialError::ReadAssertion { .. })
        ));
        std::fs::write(&p, " \n").unwrap();
        let e = read_assertion_file(&p).unwrap_err();
        assert!(matches!(e, CredentialError::EmptyAssertion { .. }));
        assert!(e.to_string().contains("is empty"), "{e}");
        std::fs::write(&p, "eyJ.abc.def\n").unwrap();
        assert_eq!(read_assertion_file(&p).unwrap().expose(), "eyJ.abc.def");
    }
}
