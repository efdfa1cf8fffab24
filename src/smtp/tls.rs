//! TLS for the local listeners (STARTTLS and implicit TLS): load the certificate and key, or
//! generate a self-signed `localhost` certificate when both files are missing.
//!
//! Always uses the ring provider explicitly; never relies on a process-wide default.

use crate::fsutil::create_private_dir;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fs::OpenOptions;
use std::io::Write;
#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// Why the listener's TLS could not be set up; each names the key and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{key} {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("listen.tls_cert/tls_key {cert} {key}: {source}")]
    Pem {
        cert: PathBuf,
        key: PathBuf,
        source: PemError,
    },
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What is wrong with a PEM certificate/key pair.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("bad certificate PEM: {0}")]
    BadCertificate(std::io::Error),
    #[error("no certificate in PEM")]
    NoCertificate,
    #[error("bad key PEM: {0}")]
    BadKey(std::io::Error),
    #[error("no private key in PEM")]
    NoKey,
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the acceptor from PEM files, generating them first if both are absent.
pub(crate) fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsSetupError> {
    if !cert.exists() && !key.exists() {
        generate_self_signed(cert, key)?;
        tracing::info!(cert = %cert.display(), "generated a self-signed localhost certificate for the listeners (STARTTLS, implicit TLS)");
    }
    let read = |k: &'static str, p: &Path| {
        std::fs::read(p).map_err(|source| TlsSetupError::Read {
            key: k,
            path: p.to_path_buf(),
            source,
        })
    };
    let cert_pem = read("listen.tls_cert", cert)?;
    let key_pem = read("listen.tls_key", key)?;
    acceptor_from_pem(&cert_pem, &key_pem).map_err(|source| TlsSetupError::Pem {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    })
}

pub(crate) fn acceptor_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsAcceptor, PemError> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(PemError::BadCertificate)?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate);
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(PemError::BadKey)?
        .ok_or(PemError::NoKey)?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn generate_self_signed(cert: &Path, key: &Path) -> Result<(), TlsSetupError> {
    let ck = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])?;
    for (path, body, mode) in [
        (cert, ck.cert.pem(), 0o644),
        (key, ck.signing_key.serialize_pem(), 0o600),
    ] {
        let write_err = |source| TlsSetupError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                create_private_dir(dir).map_err(|source| TlsSetupError::Write {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
        }
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        opts.mode(mode);
        #[cfg(not(unix))]
        let _ = mode;
        opts.open(path)
            .and_then(|mut f| f.write_all(body.as_bytes()))
            .map_err(write_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_then_reuses() {
        let tmp = tempfile::tempdir().unwrap();
        let (c, k) = (
            tmp.path().join("certs/b.crt"),
            tmp.path().join("certs/b.key"),
        );
        acceptor(&c, &k).unwrap();
        let first = std::fs::read(&c).unwrap();
        acceptor(&c, &k).unwrap();
        assert_eq!(
            std::fs::read(&c).unwrap(),
            first,
            "an existing certificate is not replaced"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&k).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }
}
