//! Local credentials: which local user name and password open which account.
//!
//! Verification of argon2 hashes runs on the blocking pool (it is deliberately slow); a
//! plain `password_env` password is compared in constant time. An unknown user costs the same
//! as a known one. A successful argon2 verification is remembered as a keyed BLAKE2b hash of
//! user and password under a random per-process key, so the same client's next AUTH costs
//! microseconds while any other password still pays the full argon2 price. A wrong password
//! never reaches the token store. Throttling of repeated failures and the SMTP dialogue are
//! the session's business.

use crate::config::{Account, Config, LocalPassword};
use crate::oauth::secret::Secret;
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Verified against when the user name is unknown, so timing does not reveal user names.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Jp1ow0uvWhc1W3f1KrGmwcdG7OcaI+UEmOsLVYaHy6k";

#[derive(Clone)]
pub struct LocalAuth {
    users: Arc<HashMap<String, Arc<Account>>>,
    /// Per-process random key for the verified-password cache.
    key: Arc<[u8; 32]>,
    /// user -> keyed hash of the password that last verified.
    verified: Arc<Mutex<HashMap<String, [u8; 32]>>>,
}

impl std::fmt::Debug for LocalAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalAuth")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Keyed BLAKE2b-256 of `user NUL password`.
fn fingerprint(key: &[u8; 32], user: &str, password: &Secret) -> [u8; 32] {
    use blake2::digest::{Mac, Update};
    let mut mac = blake2::Blake2bMac::<blake2::digest::consts::U32>::new_from_slice(key)
        .expect("a 32-byte key is valid for BLAKE2b");
    Update::update(&mut mac, user.as_bytes());
    Update::update(&mut mac, &[0]);
    Update::update(&mut mac, password.expose().as_bytes());
    mac.finalize().into_bytes().into()
}

impl LocalAuth {
    pub fn new(config: &Config) -> LocalAuth {
        let mut key = [0u8; 32];
        // Without randomness the cache is still correct, only its key is guessable; the
        // cached values never leave the process.
        let _ = getrandom::getrandom(&mut key);
        LocalAuth {
            key: Arc::new(key),
            verified: Arc::new(Mutex::new(HashMap::new())),
            users: Arc::new(
                config
                    .accounts
                    .iter()
                    .map(|a| (a.username.clone(), Arc::new(a.clone())))
                    .collect(),
            ),
        }
    }

    /// The account if `username` / `password` match, else `None`.
    pub async fn verify(&self, username: &str, password: Secret) -> Option<Arc<Account>> {
        let account = self.users.get(username).cloned();
        let hash = match account.as_ref().map(|a| &a.password) {
            Some(LocalPassword::Plain(expected)) => {
                return ct_eq(expected.expose().as_bytes(), password.expose().as_bytes())
                    .then(|| account.clone())
                    .flatten();
            }
            Some(LocalPassword::Hash(h)) => h.expose().to_string(),
            None => DUMMY_HASH.to_string(),
        };
        let fp = fingerprint(&self.key, username, &password);
        let cached = self.cache().get(username).is_some_and(|c| ct_eq(c, &fp));
        if cached && account.is_some() {
            return account;
        }
        let ok = tokio::task::spawn_blocking(move || verify_hash(&hash, &password))
            .await
            .unwrap_or(false);
        if ok && account.is_some() {
            self.cache().insert(username.to_string(), fp);
            account
        } else {
            None
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, [u8; 32]>> {
        crate::sync::lock(&self.verified)
    }
}

/// Verifies `password` against a PHC string (argon2id, argon2i or argon2d).
pub fn verify_hash(phc: &str, password: &Secret) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default()
            .verify_password(password.expose().as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// Creates an argon2id PHC string with a random salt (for `hash-password`).
pub fn hash_password(password: &Secret) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|_| argon2::password_hash::Error::Crypto)?;
    let salt = SaltString::encode_b64(&salt)?;
    Ok(Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)?
        .to_string())
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let pw = Secret::new("correct horse");
        let h = hash_password(&pw).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_hash(&h, &pw));
        assert!(!verify_hash(&h, &Secret::new("correct horsf")));
        assert!(!verify_hash("garbage", &pw));
    }

    #[tokio::test]
    async fn verified_passwords_are_remembered_wrong_ones_are_not() {
        let pw = Secret::new("s3cret");
        let toml = format!(
            "[[account]]\nusername = \"u\"\npassword_hash = \"{}\"\nmailbox = \"u@x.y\"\n[account.oauth]\nflow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"c\"\nclient_secret_env = \"S\"\n",
            hash_password(&pw).unwrap()
        );
        let config =
            Config::from_toml(&toml, "t", std::path::Path::new("."), &|_| Some("x".into()))
                .unwrap();
        let auth = LocalAuth::new(&config);
        assert!(auth.verify("u", Secret::new("wrong")).await.is_none());
        assert!(auth.cache().is_empty(), "failures are not cached");
        assert!(auth.verify("u", pw.clone()).await.is_some());
        assert_eq!(auth.cache().len(), 1);
        // The cached value is a keyed hash, not the password.
        let cached = auth.cache()["u"];
        assert_ne!(&cached[..6], b"s3cret");
        assert!(
            auth.verify("u", pw.clone()).await.is_some(),
            "second AUTH from the cache"
        );
        assert!(
            auth.verify("u", Secret::new("wrong")).await.is_none(),
            "a wrong password still fails"
        );
        assert!(auth.verify("nobody", pw).await.is_none());
        assert!(!format!("{auth:?}").contains("s3cret"));
    }

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(!ct_eq(b"", b"a"));
    }
}
