//! Local credentials: which local user name and password open which account.
//!
//! Verification of argon2 hashes runs on the blocking pool (it is deliberately slow); a
//! plain `password_env` password is compared in constant time. An unknown user costs the same
//! as a known one. A wrong password never reaches the token store. Throttling of repeated
//! failures and the SMTP dialogue are the session's business.

use crate::config::{Account, Config, LocalPassword};
use crate::oauth::secret::Secret;
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use std::collections::HashMap;
use std::sync::Arc;

/// Verified against when the user name is unknown, so timing does not reveal user names.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Jp1ow0uvWhc1W3f1KrGmwcdG7OcaI+UEmOsLVYaHy6k";

#[derive(Debug, Clone)]
pub struct LocalAuth {
    users: Arc<HashMap<String, Arc<Account>>>,
}

impl LocalAuth {
    pub fn new(config: &Config) -> LocalAuth {
        LocalAuth {
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
            Some(LocalPassword::Hash(h)) => h.clone(),
            None => DUMMY_HASH.to_string(),
        };
        let ok = tokio::task::spawn_blocking(move || verify_hash(&hash, &password))
            .await
            .unwrap_or(false);
        if ok {
            account
        } else {
            None
        }
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

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(!ct_eq(b"", b"a"));
    }
}
