//! The token store: one versioned JSON file per account under `<state.dir>/tokens/`.
//!
//! Files are 0600 in 0700 directories, written to a temporary file, fsync'd, renamed over
//! the old one and the directory fsync'd, so a crash leaves either the old or the new file.
//! A corrupt or newer-version file is reported, never overwritten silently. What the tokens
//! mean and when to refresh them is the manager's business.

use crate::oauth::secret::Secret;
use serde::{Deserialize, Serialize};
use std::fs::{self, OpenOptions};
use std::io::Write;
#[cfg(unix)]
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The file format version this build writes and reads.
pub const STORE_VERSION: u32 = 1;

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
}

#[derive(Serialize)]
struct FileOut<'a> {
    version: u32,
    account: &'a str,
    access_token: Option<&'a str>,
    expires_at: u64,
    refresh_token: Option<&'a str>,
}

#[derive(Deserialize)]
struct FileIn {
    version: u32,
    access_token: Option<String>,
    #[serde(default)]
    expires_at: u64,
    refresh_token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    pub fn new(state_dir: &Path) -> TokenStore {
        TokenStore {
            dir: state_dir.join("tokens"),
        }
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
        let file: FileIn = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            account: account.to_string(),
            reason: format!(
                "not valid token JSON at line {} column {}",
                e.line(),
                e.column()
            ),
        })?;
        if file.version > STORE_VERSION {
            return Err(StoreError::FutureVersion {
                path,
                found: file.version,
            });
        }
        Ok(Some(StoredTokens {
            access_token: file.access_token.map(Secret::new),
            expires_at: file.expires_at,
            refresh_token: file.refresh_token.map(Secret::new),
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
        let body = serde_json::to_vec_pretty(&FileOut {
            version: STORE_VERSION,
            account,
            access_token: tokens.access_token.as_ref().map(Secret::expose),
            expires_at: tokens.expires_at,
            refresh_token: tokens.refresh_token.as_ref().map(Secret::expose),
        })
        .map_err(|e| io(&path)(std::io::Error::other(e)))?;
        {
            let mut opts = OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            opts.mode(0o600);
            let mut f = opts.open(&tmp).map_err(io(&tmp))?;
            f.write_all(&body).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io(&path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }
}

/// Creates `dir` (and parents) with mode 0700 and tightens an existing one to 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    b.mode(0o700);
    b.create(dir)?;
    #[cfg(unix)]
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TokenStore::new(&tmp.path().join("state"));
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
        let store = TokenStore::new(tmp.path());
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
}
