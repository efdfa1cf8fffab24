//! The token manager: one access token per account, cached in memory and in the store,
//! refreshed ahead of expiry with at most one provider request in flight per account.
//!
//! Callers ask for `token(account)`; a fresh cached token is returned at once. When the token
//! is missing or near expiry, the first caller takes the account's refresh lock and asks the
//! provider; everyone else waits on that lock and then finds the new token. An upstream that
//! rejects a token calls `refresh_rejected` with the rejected generation, so N sessions that
//! saw the same rejection cause one refresh, not N. How tokens are persisted is `store`'s job;
//! the HTTP exchanges are in `flows`.

use crate::config::{Account, Config};
use crate::oauth::flows::{self, FlowError, TokenGrant};
use crate::oauth::provider::Flow;
use crate::oauth::secret::Secret;
use crate::oauth::store::{StoreError, StoredTokens, TokenStore};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Refresh this long before expiry at most (Microsoft tokens live 60-90 minutes).
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// ... and at most this fraction of the token's lifetime (short-lived tokens in tests).
const REFRESH_MARGIN_DIVISOR: u32 = 5;

/// A usable access token.
#[derive(Clone, Debug)]
pub struct AccessToken {
    pub secret: Arc<Secret>,
    pub expires_at: Instant,
    /// Refresh from `refresh_at` on; sessions authenticated with it stop being reused then.
    pub refresh_at: Instant,
    /// Increases with every new token of the account.
    pub generation: u64,
}

impl AccessToken {
    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.refresh_at
    }
}

/// Why an account has no usable token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The provider refused the refresh token (or none is stored): a person must log in.
    #[error("account {account} needs login: {reason}")]
    NeedsLogin { account: String, reason: String },
    /// The provider could not be reached or failed; retrying later may work.
    #[error("token request for account {account} failed: {reason}")]
    Provider { account: String, reason: String },
    #[error("unknown account {0}")]
    UnknownAccount(String),
}

/// What /readyz and `check` report for an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountStatus {
    Ready,
    NoTokenYet,
    NeedsLogin(String),
    Failing(String),
}

#[derive(Debug)]
struct AccountTokens {
    account: Account,
    current: Mutex<Option<AccessToken>>,
    refresh_token: Mutex<Option<Secret>>,
    status: Mutex<AccountStatus>,
    refresh_lock: tokio::sync::Mutex<()>,
    generation: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short locks cannot leave the data half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone)]
pub struct TokenManager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    accounts: HashMap<String, AccountTokens>,
    store: TokenStore,
    http: reqwest::Client,
    requests: std::sync::atomic::AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn margin(lifetime: Duration) -> Duration {
    (lifetime / REFRESH_MARGIN_DIVISOR).min(MAX_REFRESH_MARGIN)
}

impl TokenManager {
    /// Loads every account's stored tokens. A corrupt or unreadable store is an error.
    pub fn new(config: &Config) -> Result<TokenManager, StoreError> {
        let store = TokenStore::new(&config.state.dir);
        let mut accounts = HashMap::new();
        let now = Instant::now();
        let unix = unix_now();
        for a in &config.accounts {
            let stored = store.load(&a.username)?.unwrap_or_default();
            let current = stored.access_token.clone().and_then(|secret| {
                let left = Duration::from_secs(stored.expires_at.checked_sub(unix)?);
                (!left.is_zero()).then(|| AccessToken {
                    secret: Arc::new(secret),
                    expires_at: now + left,
                    // The original lifetime is unknown here; assume about an hour.
                    refresh_at: now
                        + left.saturating_sub(margin(Duration::from_secs(3600)).min(left / 2)),
                    generation: 1,
                })
            });
            let status = if current.is_some() {
                AccountStatus::Ready
            } else {
                AccountStatus::NoTokenYet
            };
            accounts.insert(
                a.username.clone(),
                AccountTokens {
                    account: a.clone(),
                    current: Mutex::new(current),
                    refresh_token: Mutex::new(stored.refresh_token),
                    status: Mutex::new(status),
                    refresh_lock: tokio::sync::Mutex::new(()),
                    generation: Mutex::new(1),
                },
            );
        }
        Ok(TokenManager {
            inner: Arc::new(Inner {
                accounts,
                store,
                http: flows::http_client(),
                requests: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    fn get(&self, account: &str) -> Result<&AccountTokens, TokenError> {
        self.inner
            .accounts
            .get(account)
            .ok_or_else(|| TokenError::UnknownAccount(account.to_string()))
    }

    /// The account's status (for readiness and `check`).
    pub fn status(&self, account: &str) -> Option<AccountStatus> {
        self.inner
            .accounts
            .get(account)
            .map(|a| lock(&a.status).clone())
    }

    /// Token requests sent to providers by this manager so far.
    pub fn provider_requests(&self) -> u64 {
        self.inner
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A fresh access token for `account`, refreshing first if needed.
    pub async fn token(&self, account: &str) -> Result<AccessToken, TokenError> {
        let acc = self.get(account)?;
        if let Some(t) = lock(&acc.current)
            .clone()
            .filter(|t| t.is_fresh(Instant::now()))
        {
            return Ok(t);
        }
        let _guard = acc.refresh_lock.lock().await;
        // Someone else may have refreshed while we waited for the lock.
        if let Some(t) = lock(&acc.current)
            .clone()
            .filter(|t| t.is_fresh(Instant::now()))
        {
            return Ok(t);
        }
        match self.refresh_locked(acc).await {
            // A provider hiccup while the old token is still valid: keep using it.
            Err(e @ TokenError::Provider { .. }) => lock(&acc.current)
                .clone()
                .filter(|t| Instant::now() < t.expires_at)
                .ok_or(e),
            other => other,
        }
    }

    /// The upstream rejected the token of `generation`: get a new one unless another session
    /// already did.
    pub async fn refresh_rejected(
        &self,
        account: &str,
        generation: u64,
    ) -> Result<AccessToken, TokenError> {
        let acc = self.get(account)?;
        let _guard = acc.refresh_lock.lock().await;
        if let Some(t) = lock(&acc.current)
            .clone()
            .filter(|t| t.generation != generation && t.is_fresh(Instant::now()))
        {
            return Ok(t);
        }
        self.refresh_locked(acc).await
    }

    async fn refresh_locked(&self, acc: &AccountTokens) -> Result<AccessToken, TokenError> {
        let name = &acc.account.username;
        let grant = match acc.account.oauth.flow {
            Flow::ClientCredentials => TokenGrant::ClientCredentials,
            Flow::AuthorizationCode | Flow::DeviceCode => match lock(&acc.refresh_token).clone() {
                Some(rt) => TokenGrant::RefreshToken(rt),
                None => {
                    let reason =
                        format!("no refresh token is stored; run: smtp-oauth-bridge login {name}");
                    *lock(&acc.status) = AccountStatus::NeedsLogin(reason.clone());
                    return Err(TokenError::NeedsLogin {
                        account: name.clone(),
                        reason,
                    });
                }
            },
        };
        self.inner
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        match flows::request_token(&self.inner.http, &acc.account.oauth, &grant).await {
            Ok(resp) => {
                let lifetime = resp.expires_in;
                let expires_at = started + lifetime;
                let generation = {
                    let mut g = lock(&acc.generation);
                    *g += 1;
                    *g
                };
                let token = AccessToken {
                    secret: Arc::new(resp.access_token),
                    expires_at,
                    refresh_at: expires_at - margin(lifetime),
                    generation,
                };
                // Persist first (a rotated refresh token must survive a crash), then publish.
                let refresh_token = resp
                    .refresh_token
                    .or_else(|| lock(&acc.refresh_token).clone());
                let stored = StoredTokens {
                    access_token: Some((*token.secret).clone()),
                    expires_at: unix_now() + lifetime.as_secs(),
                    refresh_token: refresh_token.clone(),
                };
                if let Err(e) = self.inner.store.save(name, &stored) {
                    tracing::error!(account = %name, error = %e, "could not persist tokens; keeping them in memory");
                }
                *lock(&acc.refresh_token) = refresh_token;
                *lock(&acc.current) = Some(token.clone());
                *lock(&acc.status) = AccountStatus::Ready;
                tracing::info!(account = %name, expires_in_secs = lifetime.as_secs(), generation, "access token obtained");
                Ok(token)
            }
            Err(FlowError::InvalidGrant(reason)) if grant.is_refresh() => {
                let reason = format!("{reason}; run: smtp-oauth-bridge login {name}");
                tracing::warn!(account = %name, %reason, "refresh token refused; account needs login");
                *lock(&acc.status) = AccountStatus::NeedsLogin(reason.clone());
                Err(TokenError::NeedsLogin {
                    account: name.clone(),
                    reason,
                })
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(account = %name, %reason, "token request failed");
                *lock(&acc.status) = AccountStatus::Failing(reason.clone());
                Err(TokenError::Provider {
                    account: name.clone(),
                    reason,
                })
            }
        }
    }
}
