//! Secret values: local passwords, client secrets, access and refresh tokens ([`Secret`]),
//! and the raw bytes of the state key ([`SecretKey`]).
//!
//! A secret never prints its content: Debug and Display show `[redacted]`. The only way
//! to read it is `expose()`, which keeps every place that handles the plain value greppable.
//! The memory is zeroed on drop. What a secret is used for is its owner's business
//! (the token store seals with the state key, the local AUTH compares passwords).

use base64::Engine as _;
use std::fmt;
use zeroize::Zeroize;

/// A string that must never reach a log line, an error message or Debug output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The plain value. Callers must not log or format it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

/// How to make a key, said in every key error.
const KEY_HINT: &str = "create one with: head -c 32 /dev/urandom | base64";

/// Why a text is not a 32-byte key in base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("is not base64 ({KEY_HINT})")]
    NotBase64,
    #[error("decodes to {0} bytes; 32 are needed ({KEY_HINT})")]
    WrongLength(usize),
}

/// 32 raw key bytes (the state key, `state.key_file` / `state.key_env`).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    /// Parses a key written as base64 (standard or URL-safe) of 32 bytes; surrounding
    /// whitespace (a trailing newline in a key file) is ignored.
    pub(crate) fn from_base64(text: &str) -> Result<SecretKey, KeyError> {
        let t = text.trim();
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(t)
            .or_else(|_| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t.trim_end_matches('='))
            })
            .map_err(|_| KeyError::NotBase64)?;
        let key = <[u8; 32]>::try_from(bytes.as_slice())
            .map(SecretKey)
            .map_err(|_| KeyError::WrongLength(bytes.len()));
        bytes.zeroize();
        key
    }

    /// The key bytes. Callers must not log or format them.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn key_parses_standard_and_url_safe_base64_of_32_bytes() {
        let k = SecretKey::from_base64(&format!("{KEY}\n")).unwrap();
        let expected: Vec<u8> = (0..32).collect();
        assert_eq!(k.expose().as_slice(), expected.as_slice());
        let url_safe =
            SecretKey::from_base64("_wECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8").unwrap();
        assert_eq!(url_safe.expose()[0], 0xff);
        assert_eq!(format!("{k:?}"), "SecretKey([redacted])");
    }

    #[test]
    fn key_errors_say_what_is_wrong_and_how_to_make_one() {
        let short = SecretKey::from_base64("c2hvcnQ=").unwrap_err();
        assert_eq!(short, KeyError::WrongLength(5));
        assert_eq!(
            short.to_string(),
            "decodes to 5 bytes; 32 are needed (create one with: head -c 32 /dev/urandom | base64)"
        );
        let garbage = SecretKey::from_base64("not base64 at all!").unwrap_err();
        assert_eq!(garbage, KeyError::NotBase64);
        assert_eq!(
            garbage.to_string(),
            "is not base64 (create one with: head -c 32 /dev/urandom | base64)"
        );
    }

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&s)), "Some(Secret([redacted]))");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }
}
