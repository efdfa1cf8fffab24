//! TLS for the local listener (STARTTLS): load the certificate and key, or generate a
//! self-signed `localhost` certificate when both files are missing.
//!
//! Always uses the ring provider explicitly; never relies on a process-wide default.

use crate::fsutil::create_private_dir;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fs::OpenOptions;
use std::io::Write;
#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// Builds the acceptor from PEM files, generating them first if both are absent.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    if !cert.exists() && !key.exists() {
        generate_self_signed(cert, key)?;
        tracing::info!(cert = %cert.display(), "generated a self-signed localhost certificate for STARTTLS");
    }
    let cert_pem =
        std::fs::read(cert).map_err(|e| format!("listen.tls_cert {}: {e}", cert.display()))?;
    let key_pem =
        std::fs::read(key).map_err(|e| format!("listen.tls_key {}: {e}", key.display()))?;
    acceptor_from_pem(&cert_pem, &key_pem).map_err(|e| {
        format!(
            "listen.tls_cert/tls_key {} {}: {e}",
            cert.display(),
            key.display()
        )
    })
}

pub fn acceptor_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in PEM".into());
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("bad key PEM: {e}"))?
        .ok_or("no private key in PEM")?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| e.to_string())?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn generate_self_signed(cert: &Path, key: &Path) -> Result<(), String> {
    let ck = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(|e| format!("cannot generate a certificate: {e}"))?;
    for (path, body, mode) in [
        (cert, ck.cert.pem(), 0o644),
        (key, ck.signing_key.serialize_pem(), 0o600),
    ] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                create_private_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
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
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
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
