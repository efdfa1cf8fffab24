//! SASL PLAIN (RFC 4616) and LOGIN decoding: base64 text in, user name and password out.
//! Pure: no socket, no verification (that is `auth`), no dialogue (that is `session`).

use crate::secret::Secret;
use base64::Engine as _;

/// Why a SASL response is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SaslError {
    /// The client sent `*` (RFC 4954 section 4).
    #[error("authentication cancelled")]
    Cancelled,
    #[error("cannot decode the base64 response")]
    BadBase64,
    /// PLAIN with an authorization identity other than the user (RFC 4616 section 2: we
    /// cannot act as another identity, so we refuse instead of ignoring it).
    #[error("authorization identity differs from the user")]
    AuthzidMismatch,
}

/// Decodes one base64 response line (`=` is the empty response).
pub(crate) fn decode(line: &str) -> Result<Secret, SaslError> {
    let s = line.trim();
    if s == "*" {
        return Err(SaslError::Cancelled);
    }
    if s == "=" {
        return Ok(Secret::new(""));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| SaslError::BadBase64)?;
    String::from_utf8(bytes)
        .map(Secret::new)
        .map_err(|_| SaslError::BadBase64)
}

/// PLAIN: `authzid NUL authcid NUL passwd` -> (authcid, passwd). An empty authzid, or one
/// equal to the user, is accepted.
pub(crate) fn plain(response: &str) -> Result<(String, Secret), SaslError> {
    let decoded = decode(response)?;
    let mut parts = decoded.expose().splitn(3, '\0');
    let (Some(authz), Some(user), Some(pw)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(SaslError::BadBase64);
    };
    if !authz.is_empty() && authz != user {
        return Err(SaslError::AuthzidMismatch);
    }
    Ok((user.to_string(), Secret::new(pw)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn plain_decoding() {
        let (u, p) = plain(&b64("\0user\0pw")).unwrap();
        assert_eq!((u.as_str(), p.expose()), ("user", "pw"));
        let (u, _) = plain(&b64("user\0user\0pw")).unwrap();
        assert_eq!(u, "user");
        assert_eq!(
            plain(&b64("admin\0user\0pw")).unwrap_err(),
            SaslError::AuthzidMismatch
        );
        assert_eq!(plain(&b64("user-only")).unwrap_err(), SaslError::BadBase64);
        assert_eq!(plain("!!!").unwrap_err(), SaslError::BadBase64);
        assert_eq!(plain("*").unwrap_err(), SaslError::Cancelled);
        assert_eq!(
            plain(&base64::engine::general_purpose::STANDARD.encode([0, 0xff, 0])).unwrap_err(),
            SaslError::BadBase64
        );
    }

    #[test]
    fn login_lines() {
        assert_eq!(decode("=").unwrap().expose(), "");
        assert_eq!(decode(&b64("me")).unwrap().expose(), "me");
        assert_eq!(decode(" *\r").unwrap_err(), SaslError::Cancelled);
    }
}
