//! The token store: one versioned JSON file per account under `<state.dir>/tokens/`.
//!
//! Files are 0600 in 0700 directories, written to a temporary file, fsync'd, renamed over
//! the old one and the directory fsync'd, so a crash leaves either the old or the new file.
//! A corrupt or newer-version file is reported, never overwritten silently. With a state
//! key configured the tokens are sealed with ChaCha20-Poly1305 (the account name is the
//! associated data, so a file cannot be moved to another account); a wrong key, or a plain
//! file where a sealed one is expected, is a clear error. What the tokens mean and when to refresh them is the manager's business.

use crate::fsutil::{self, create_private_dir};
use crate::secret::{Secret, SecretKey};
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The file format version this build writes and reads.
pub(crate) const STORE_VERSION: u32 = 1;

/// What is persisted for one account.
#[derive(Debug, Clone, Default)]
pub struct StoredTokens {
    pub access_token: Option<Secret>,
    /// Unix seconds at which the access token expires.
    pub expires_at: u64,
    pub refresh_token: Option<Secret>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("token store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token store {path} is corrupt ({reason}); move it away and run `smtp-oauth-bridge login {account}`")]
    Corrupt {
        path: PathBuf,
        account: String,
        reason: String,
    },
    #[error("token store {path} has format version {found}, newer than this build understands ({STORE_VERSION}); upgrade smtp-oauth-bridge")]
    FutureVersion { path: PathBuf, found: u32 },
    #[error("token store {path} cannot be decrypted: wrong state key (state.key_file / state.key_env), or the file was altered")]
    WrongKey { path: PathBuf },
    #[error("token store {path} is encrypted but no state key is configured (state.key_file or state.key_env)")]
    KeyMissing { path: PathBuf },
    /// A state key is configured, so every token file must be sealed: a plain one was not
    /// written by us (or predates the key) and could have been put there by anyone who can
    /// write the directory.
    #[error("token store {path} is not sealed, but a state key is configured (state.key_file / state.key_env); remove the file or run `smtp-oauth-bridge login {account}` to write a sealed one")]
    NotSealed { path: PathBuf, account: String },
}

/// The 32-byte key that seals token files.
#[derive(Clone)]
pub struct StateKey(Key);

impl std::fmt::Debug for StateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateKey([redacted])")
    }
}

impl From<&SecretKey> for StateKey {
    /// The configured key bytes (validated by the configuration loader).
    fn from(key: &SecretKey) -> StateKey {
        StateKey(*Key::from_slice(key.expose()))
    }
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    alg: String,
    nonce: String,
    ciphertext: String,
}

/// The token fields, as sealed inside an encrypted file.
#[derive(Serialize, Deserialize)]
struct Inner {
    access_token: Option<String>,
    #[serde(default)]
    expires_at: u64,
    refresh_token: Option<String>,
}

const SEAL_ALG: &str = "chacha20poly1305";

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    #[serde(default)]
    account: String,
    #[serde(flatten)]
    plain: Option<Inner>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sealed: Option<Sealed>,
}

#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
    key: Option<StateKey>,
}

impl TokenStore {
    pub fn new(state_dir: &Path, key: Option<StateKey>) -> TokenStore {
        TokenStore {
            dir: state_dir.join("tokens"),
            key,
        }
    }

    /// When the account's file last changed (None if there is none).
    pub(crate) fn modified(&self, account: &str) -> Option<SystemTime> {
        fs::metadata(self.path(account))
            .and_then(|m| m.modified())
            .ok()
    }

    pub fn path(&self, account: &str) -> PathBuf {
        self.dir.join(format!("{account}.json"))
    }

    /// Reads an account's tokens; `Ok(None)` when nothing was stored yet.
    pub fn load(&self, account: &str) -> Result<Option<StoredTokens>, StoreError> {
        let path = self.path(account);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.clone(),
            account: account.to_string(),
            reason,
        };
        let file: File = serde_json::from_slice(&bytes).map_err(|e| {
            corrupt(format!(
                "not valid token JSON at line {} column {}",
                e.line(),
                e.column()
            ))
        })?;
        if file.version > STORE_VERSION {
            return Err(StoreError::FutureVersion {
                path,
                found: file.version,
            });
        }
        let inner = match (file.sealed, &self.key) {
            (Some(_), None) => return Err(StoreError::KeyMissing { path }),
            (Some(sealed), Some(key)) => {
                if sealed.alg != SEAL_ALG {
                    return Err(corrupt(format!("unknown encryption {:?}", sealed.alg)));
                }
                let b64 = base64::engine::general_purpose::STANDARD;
                let nonce = b64
                    .decode(&sealed.nonce)
                    .map_err(|_| corrupt("bad nonce".into()))?;
                let ct = b64
                    .decode(&sealed.ciphertext)
                    .map_err(|_| corrupt("bad ciphertext".into()))?;
                if nonce.len() != 12 {
                    return Err(corrupt("bad nonce".into()));
                }
                let plain = ChaCha20Poly1305::new(&key.0)
                    .decrypt(
                        Nonce::from_slice(&nonce),
                        Payload {
                            msg: &ct,
                            aad: account.as_bytes(),
                        },
                    )
                    .map_err(|_| StoreError::WrongKey { path: path.clone() })?;
                let plain = Secret::new(
                    String::from_utf8(plain).map_err(|_| corrupt("bad plaintext".into()))?,
                );
                serde_json::from_str::<Inner>(plain.expose())
                    .map_err(|_| corrupt("bad sealed content".into()))?
            }
            (None, Some(_)) => {
                return Err(StoreError::NotSealed {
                    path,
                    account: account.to_string(),
                })
            }
            (None, None) => file.plain.unwrap_or(Inner {
                access_token: None,
                expires_at: 0,
                refresh_token: None,
            }),
        };
        Ok(Some(StoredTokens {
            access_token: inner.access_token.map(Secret::new),
            expires_at: inner.expires_at,
            refresh_token: inner.refresh_token.map(Secret::new),
        }))
    }

    /// Writes an account's tokens atomically and durably.
    pub fn save(&self, account: &str, tokens: &StoredTokens) -> Result<(), StoreError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        create_private_dir(&self.dir).map_err(io(&self.dir))?;
        let path = self.path(account);
        let tmp = self.dir.join(format!(".{account}.json.tmp"));
        let inner = Inner {
            access_token: tokens.access_token.as_ref().map(|t| t.expose().to_string()),
            expires_at: tokens.expires_at,
            refresh_token: tokens
                .refresh_token
                .as_ref()
                .map(|t| t.expose().to_string()),
        };
        let file = match &self.key {
            None => File {
                version: STORE_VERSION,
                account: account.to_string(),
                plain: Some(inner),
                sealed: None,
            },
            Some(key) => {
                let plain = Secret::new(
                    serde_json::to_string(&inner)
                        .map_err(|e| io(&path)(std::io::Error::other(e)))?,
                );
                drop(inner);
                let mut nonce = [0u8; 12];
                getrandom::getrandom(&mut nonce)
                    .map_err(|e| io(&path)(std::io::Error::other(e)))?;
                let ct = ChaCha20Poly1305::new(&key.0)
                    .encrypt(
                        Nonce::from_slice(&nonce),
                        Payload {
                            msg: plain.expose().as_bytes(),
                            aad: account.as_bytes(),
                        },
                    )
                    .map_err(|_| io(&path)(std::io::Error::other("encryption failed")))?;
                let b64 = base64::engine::general_purpose::STANDARD;
                File {
                    version: STORE_VERSION,
                    account: account.to_string(),
                    plain: None,
                    sealed: Some(Sealed {
                        alg: SEAL_ALG.to_string(),
                        nonce: b64.encode(nonce),
                        ciphertext: b64.encode(ct),
                    }),
                }
            }
        };
        let body = Secret::new(
            serde_json::to_string_pretty(&file).map_err(|e| io(&path)(std::io::Error::other(e)))?,
        );
        drop(file);
        fsutil::write_atomic(&tmp, &path, &[body.expose().as_bytes()]).map_err(|e| StoreError::Io {
            path: e.path,
            source: e.source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TokenStore::new(&tmp.path().join("state"), None);
        assert!(store.load("scanner").unwrap().is_none());
        let t = StoredTokens {
            access_token: Some(Secret::new("at-123")),
            expires_at: 42,
            refresh_token: Some(Secret::new("rt-456")),
        };
        store.save("scanner", &t).unwrap();
        let back = store.load("scanner").unwrap().unwrap();
        assert_eq!(back.access_token.unwrap().expose(), "at-123");
        assert_eq!(back.refresh_token.unwrap().expose(), "rt-456");
        assert_eq!(back.expires_at, 42);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&store.path("scanner")), 0o600);
            assert_eq!(mode(&tmp.path().join("state/tokens")), 0o700);
        }
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(tmp.path().join("state/tokens"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("scanner.json")]);
    }

    #[test]
    fn corrupt_and_future_files_are_reported_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TokenStore::new(tmp.path(), None);
        create_private_dir(&tmp.path().join("tokens")).unwrap();
        fs::write(store.path("a"), b"{not json").unwrap();
        let e = store.load("a").unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("login a"), "{e}");
        fs::write(store.path("b"), br#"{"version":7}"#).unwrap();
        let e = store.load("b").unwrap_err();
        assert!(
            matches!(e, StoreError::FutureVersion { found: 7, .. }),
            "{e}"
        );
        assert_eq!(fs::read(store.path("a")).unwrap(), b"{not json");
    }

    fn state_key(b64: &str) -> StateKey {
        StateKey::from(&SecretKey::from_base64(b64).unwrap())
    }

    #[test]
    fn encrypted_store_round_trip_wrong_key_and_missing_key() {
        let tmp = tempfile::tempdir().unwrap();
        let key = state_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
        let sealed = TokenStore::new(tmp.path(), Some(key));
        let t = StoredTokens {
            access_token: Some(Secret::new("at-secret-value")),
            expires_at: 7,
            refresh_token: Some(Secret::new("rt-secret-value")),
        };
        sealed.save("acct", &t).unwrap();
        let raw = fs::read_to_string(sealed.path("acct")).unwrap();
        assert!(
            !raw.contains("secret-value"),
            "tokens are not in the clear: {raw}"
        );
        assert!(raw.contains("chacha20poly1305"));
        let back = sealed.load("acct").unwrap().unwrap();
        assert_eq!(back.refresh_token.unwrap().expose(), "rt-secret-value");

        let other = state_key("HwECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
        let e = TokenStore::new(tmp.path(), Some(other))
            .load("acct")
            .unwrap_err();
        assert!(matches!(e, StoreError::WrongKey { .. }), "{e}");
        assert!(e.to_string().contains("wrong state key"), "{e}");
        let e = TokenStore::new(tmp.path(), None).load("acct").unwrap_err();
        assert!(matches!(e, StoreError::KeyMissing { .. }), "{e}");

        // A file sealed for one account does not open as another.
        fs::copy(sealed.path("acct"), sealed.path("other")).unwrap();
        assert!(matches!(
            sealed.load("other").unwrap_err(),
            StoreError::WrongKey { .. }
        ));

        assert_eq!(
            format!(
                "{:?}",
                state_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
            ),
            "StateKey([redacted])"
        );
    }

    #[test]
    fn a_sealed_store_refuses_a_plain_file() {
        let tmp = tempfile::tempdir().unwrap();
        let plain = TokenStore::new(tmp.path(), None);
        let t = StoredTokens {
            access_token: Some(Secret::new("at-planted")),
            expires_at: 7,
            refresh_token: Some(Secret::new("rt-planted")),
        };
        plain.save("acct", &t).unwrap();
        let before = fs::read(plain.path("acct")).unwrap();
        let sealed = TokenStore::new(
            tmp.path(),
            Some(state_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")),
        );
        let e = sealed.load("acct").unwrap_err();
        assert!(
            matches!(&e, StoreError::NotSealed { path, account } if *path == plain.path("acct") && account == "acct"),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains(&plain.path("acct").display().to_string()),
            "{text}"
        );
        assert!(text.contains("is not sealed"), "{text}");
        assert!(text.contains("smtp-oauth-bridge login acct"), "{text}");
        assert!(!text.contains("planted") && !format!("{e:?}").contains("planted"));
        // Also a file with no token fields at all; the file is left as it was.
        fs::write(plain.path("empty"), br#"{"version":1,"account":"empty"}"#).unwrap();
        assert!(matches!(
            sealed.load("empty").unwrap_err(),
            StoreError::NotSealed { .. }
        ));
        assert_eq!(fs::read(plain.path("acct")).unwrap(), before);
        // Without a key the same file is read as before.
        assert_eq!(
            plain
                .load("acct")
                .unwrap()
                .unwrap()
                .refresh_token
                .unwrap()
                .expose(),
            "rt-planted"
        );
    }
}
