//! The token manager: one access token per account, cached in memory and in the store,
//! refreshed ahead of expiry with at most one provider request in flight per account.
//!
//! Callers ask for `token(account)`; a fresh cached token is returned at once. When the token
//! is missing or due, the first caller takes the account's refresh lock and asks the provider;
//! everyone else waits on that lock and then finds the new token. With `spawn_refresher` a
//! background task refreshes ahead of expiry, so in the steady state nobody waits.
//!
//! Failures: a transient provider failure (network, 5xx, 429) keeps the refresh token and the
//! current access token (used while valid) and retries with exponential backoff. A refused
//! refresh token (invalid_grant) marks the account "needs login"; from then on the provider is
//! not asked again until the store file changes (`login` wrote a new token), which is picked up
//! without a restart. An upstream that rejects a token calls `refresh_rejected` with the
//! rejected generation, so N sessions that saw the same rejection cause one refresh.

use crate::config::{Account, Config, Flow};
use crate::oauth::flows::{self, FlowError, TokenGrant, TokenResponse};
use crate::oauth::store::{StateKey, StoreError, StoredTokens, TokenStore};
use crate::secret::Secret;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Refresh this long before expiry at most (Microsoft tokens live 60-90 minutes).
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// ... and at most this fraction of the token's lifetime (short-lived tokens in tests).
const REFRESH_MARGIN_DIVISOR: u32 = 4;
/// First retry delay after a transient provider failure; doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often an account that needs login looks for a new token in the store.
const STORE_POLL: Duration = Duration::from_secs(1);

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

    pub fn is_valid(&self, now: Instant) -> bool {
        now < self.expires_at
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

#[derive(Debug, Default)]
struct State {
    current: Option<AccessToken>,
    refresh_token: Option<Secret>,
    status: Option<AccountStatus>,
    generation: u64,
    /// No provider request before this (backoff after a transient failure).
    next_attempt: Option<Instant>,
    backoff: Duration,
    refreshes: u64,
    failures: u64,
    /// The store file's mtime when we last read or wrote it.
    store_seen: Option<SystemTime>,
}

#[derive(Debug)]
struct AccountTokens {
    account: Account,
    state: Mutex<State>,
    refresh_lock: tokio::sync::Mutex<()>,
}

impl AccountTokens {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this short lock cannot leave the data half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn name(&self) -> &str {
        &self.account.username
    }

    fn needs_login(&self) -> Option<String> {
        match &self.state().status {
            Some(AccountStatus::NeedsLogin(r)) => Some(r.clone()),
            _ => None,
        }
    }
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

/// An access token read from the store, if still valid.
fn token_from_store(stored: &StoredTokens, generation: u64) -> Option<AccessToken> {
    let secret = stored.access_token.clone()?;
    let left = Duration::from_secs(stored.expires_at.checked_sub(unix_now())?);
    if left.is_zero() {
        return None;
    }
    let now = Instant::now();
    // The original lifetime is unknown here; assume about an hour.
    let refresh_at = now + left.saturating_sub(margin(Duration::from_secs(3600)).min(left / 2));
    Some(AccessToken {
        secret: Arc::new(secret),
        expires_at: now + left,
        refresh_at,
        generation,
    })
}

fn login_hint(name: &str) -> String {
    format!("run: smtp-oauth-bridge login {name}")
}

impl TokenManager {
    /// Loads every account's stored tokens. A corrupt or undecryptable store is an error.
    pub fn new(config: &Config) -> Result<TokenManager, StoreError> {
        let store = TokenStore::new(
            &config.state.dir,
            config.state.key.as_ref().map(|k| StateKey::from(&k.value)),
        );
        let mut accounts = HashMap::new();
        for a in &config.accounts {
            let store_seen = store.modified(&a.username);
            let stored = store.load(&a.username)?.unwrap_or_default();
            let current = token_from_store(&stored, 1);
            let status = if current.is_some() {
                AccountStatus::Ready
            } else if a.oauth.flow != Flow::ClientCredentials && stored.refresh_token.is_none() {
                AccountStatus::NeedsLogin(format!(
                    "no refresh token is stored; {}",
                    login_hint(&a.username)
                ))
            } else {
                AccountStatus::NoTokenYet
            };
            accounts.insert(
                a.username.clone(),
                AccountTokens {
                    account: a.clone(),
                    state: Mutex::new(State {
                        current,
                        refresh_token: stored.refresh_token,
                        status: Some(status),
                        generation: 1,
                        store_seen,
                        ..State::default()
                    }),
                    refresh_lock: tokio::sync::Mutex::new(()),
                },
            );
        }
        Ok(TokenManager {
            inner: Arc::new(Inner {
                accounts,
                store,
                http: flows::http_client(),
            }),
        })
    }

    fn get(&self, account: &str) -> Result<&AccountTokens, TokenError> {
        self.inner
            .accounts
            .get(account)
            .ok_or_else(|| TokenError::UnknownAccount(account.to_string()))
    }

    /// The account's status (for readiness, local AUTH and `check`). An account that needs
    /// login looks at the store first, so a `login` done meanwhile is seen at once.
    pub fn status(&self, account: &str) -> Option<AccountStatus> {
        let acc = self.inner.accounts.get(account)?;
        if acc.needs_login().is_some() {
            self.reload_if_changed(acc);
        }
        let st = acc.state();
        Some(match &st.status {
            Some(AccountStatus::Ready) | None
                if !st
                    .current
                    .as_ref()
                    .is_some_and(|t| t.is_valid(Instant::now())) =>
            {
                AccountStatus::NoTokenYet
            }
            Some(s) => s.clone(),
            None => AccountStatus::NoTokenYet,
        })
    }

    /// Seconds until the account's access token expires (None without a token).
    pub fn expires_in(&self, account: &str) -> Option<Duration> {
        let acc = self.inner.accounts.get(account)?;
        let st = acc.state();
        st.current
            .as_ref()
            .map(|t| t.expires_at.saturating_duration_since(Instant::now()))
    }

    /// Account names, token requests that succeeded and failed, for metrics.
    pub fn counts(&self) -> Vec<(String, u64, u64)> {
        let mut v: Vec<_> = self
            .inner
            .accounts
            .iter()
            .map(|(name, acc)| {
                let st = acc.state();
                (name.clone(), st.refreshes, st.failures)
            })
            .collect();
        v.sort();
        v
    }

    /// An access token is usable now and the account does not need login (for /readyz).
    pub fn is_usable(&self, account: &str) -> bool {
        let Some(acc) = self.inner.accounts.get(account) else {
            return false;
        };
        if acc.needs_login().is_some() {
            self.reload_if_changed(acc);
        }
        let st = acc.state();
        !matches!(st.status, Some(AccountStatus::NeedsLogin(_)))
            && st
                .current
                .as_ref()
                .is_some_and(|t| t.is_valid(Instant::now()))
    }

    /// Adopts tokens that another process (`login`) wrote to the store since we last looked.
    fn reload_if_changed(&self, acc: &AccountTokens) -> bool {
        let name = acc.name();
        let seen = self.inner.store.modified(name);
        if seen.is_none() || seen == acc.state().store_seen {
            return false;
        }
        let stored = match self.inner.store.load(name) {
            Ok(Some(s)) => s,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(account = %name, error = %e, "cannot read the token store");
                return false;
            }
        };
        let mut st = acc.state();
        st.store_seen = seen;
        let changed = match (&stored.refresh_token, &st.refresh_token) {
            (Some(new), Some(old)) => new != old,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !changed {
            return false;
        }
        st.generation += 1;
        st.current = token_from_store(&stored, st.generation);
        st.refresh_token = stored.refresh_token;
        st.status = Some(if st.current.is_some() {
            AccountStatus::Ready
        } else {
            AccountStatus::NoTokenYet
        });
        st.next_attempt = None;
        st.backoff = Duration::ZERO;
        tracing::info!(account = %name, "new tokens found in the store; account no longer needs login");
        true
    }

    /// A fresh access token for `account`, refreshing first if needed. While a refresh is
    /// backing off after a transient failure, a still-valid token is returned.
    pub async fn token(&self, account: &str) -> Result<AccessToken, TokenError> {
        let acc = self.get(account)?;
        if let Some(t) = self.usable(acc) {
            return Ok(t);
        }
        let _guard = acc.refresh_lock.lock().await;
        // Someone else may have refreshed while we waited for the lock.
        if let Some(t) = self.usable(acc) {
            return Ok(t);
        }
        self.refresh_locked(acc).await
    }

    /// The cached token if no refresh is needed (or none may be attempted yet).
    fn usable(&self, acc: &AccountTokens) -> Option<AccessToken> {
        let now = Instant::now();
        let st = acc.state();
        let t = st.current.as_ref()?;
        let backing_off = st.next_attempt.is_some_and(|n| now < n);
        (t.is_fresh(now) || (backing_off && t.is_valid(now))).then(|| t.clone())
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
        if let Some(t) = acc
            .state()
            .current
            .clone()
            .filter(|t| t.generation != generation && t.is_fresh(Instant::now()))
        {
            return Ok(t);
        }
        self.refresh_locked(acc).await
    }

    /// Asks the provider for a new token now, whatever the cache holds (`check` uses this so
    /// an expired secret or revoked consent shows up today, not at the next refresh).
    pub async fn force_refresh(&self, account: &str) -> Result<AccessToken, TokenError> {
        let acc = self.get(account)?;
        let _guard = acc.refresh_lock.lock().await;
        acc.state().next_attempt = None;
        match self.refresh_locked(acc).await {
            // refresh_locked falls back to a still-valid token on transient errors; here the
            // failure is the answer.
            Ok(t) if acc.state().next_attempt.is_some() => {
                let reason = match acc.state().status.clone() {
                    Some(AccountStatus::Failing(r)) => r,
                    _ => "token request failed".into(),
                };
                drop(t);
                Err(TokenError::Provider {
                    account: account.to_string(),
                    reason,
                })
            }
            other => other,
        }
    }

    async fn refresh_locked(&self, acc: &AccountTokens) -> Result<AccessToken, TokenError> {
        let name = acc.name().to_string();
        if acc.needs_login().is_some() {
            self.reload_if_changed(acc);
        }
        if let Some(reason) = acc.needs_login() {
            return Err(TokenError::NeedsLogin {
                account: name,
                reason,
            });
        }
        let now = Instant::now();
        if let Some(next) = acc.state().next_attempt.filter(|n| now < *n) {
            let reason = format!(
                "provider failing; next attempt in {} ms",
                next.duration_since(now).as_millis()
            );
            return Err(TokenError::Provider {
                account: name,
                reason,
            });
        }
        let grant = match acc.account.oauth.flow {
            Flow::ClientCredentials => TokenGrant::ClientCredentials,
            Flow::AuthorizationCode | Flow::DeviceCode => match acc.state().refresh_token.clone() {
                Some(rt) => TokenGrant::RefreshToken(rt),
                None => {
                    let reason = format!("no refresh token is stored; {}", login_hint(&name));
                    acc.state().status = Some(AccountStatus::NeedsLogin(reason.clone()));
                    return Err(TokenError::NeedsLogin {
                        account: name,
                        reason,
                    });
                }
            },
        };
        let started = Instant::now();
        match flows::request_token(&self.inner.http, &acc.account.oauth, &grant).await {
            Ok(resp) => Ok(self.adopt(acc, resp, started)),
            Err(FlowError::InvalidGrant(reason)) if grant.is_refresh() => {
                let reason = format!("{reason}; {}", login_hint(&name));
                tracing::warn!(account = %name, %reason, "refresh token refused; account needs login");
                let mut st = acc.state();
                st.failures += 1;
                st.status = Some(AccountStatus::NeedsLogin(reason.clone()));
                st.current = None;
                Err(TokenError::NeedsLogin {
                    account: name,
                    reason,
                })
            }
            Err(e) => {
                let reason = e.to_string();
                let mut st = acc.state();
                st.failures += 1;
                st.backoff = (st.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
                st.next_attempt = Some(Instant::now() + st.backoff);
                st.status = Some(AccountStatus::Failing(reason.clone()));
                tracing::warn!(account = %name, %reason, retry_in_ms = st.backoff.as_millis() as u64, "token request failed");
                let fallback = st.current.clone().filter(|t| t.is_valid(Instant::now()));
                drop(st);
                fallback.ok_or(TokenError::Provider {
                    account: name,
                    reason,
                })
            }
        }
    }

    /// Persists (first: a rotated refresh token must survive a crash), then publishes.
    fn adopt(&self, acc: &AccountTokens, resp: TokenResponse, started: Instant) -> AccessToken {
        let name = acc.name();
        let lifetime = resp.expires_in;
        let expires_at = started + lifetime;
        let refresh_token = resp
            .refresh_token
            .or_else(|| acc.state().refresh_token.clone());
        let stored = StoredTokens {
            access_token: Some(resp.access_token.clone()),
            expires_at: unix_now() + lifetime.as_secs(),
            refresh_token: refresh_token.clone(),
        };
        if let Err(e) = self.inner.store.save(name, &stored) {
            tracing::error!(account = %name, error = %e, "could not persist tokens; keeping them in memory");
        }
        let mut st = acc.state();
        st.store_seen = self.inner.store.modified(name);
        st.generation += 1;
        st.refreshes += 1;
        let token = AccessToken {
            secret: Arc::new(resp.access_token),
            expires_at,
            refresh_at: expires_at - margin(lifetime),
            generation: st.generation,
        };
        st.refresh_token = refresh_token;
        st.current = Some(token.clone());
        st.status = Some(AccountStatus::Ready);
        st.next_attempt = None;
        st.backoff = Duration::ZERO;
        tracing::info!(account = %name, expires_in_secs = lifetime.as_secs(), generation = st.generation, "access token obtained");
        token
    }

    /// Refreshes every account ahead of expiry in the background until `shutdown`.
    pub fn spawn_refresher(&self, shutdown: CancellationToken) {
        for name in self.inner.accounts.keys() {
            let me = self.clone();
            let name = name.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let wait = me.next_refresh_in(&name);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    if let Ok(acc) = me.get(&name) {
                        if acc.needs_login().is_some() {
                            me.reload_if_changed(acc);
                            continue;
                        }
                    }
                    // Errors are logged and counted inside; the loop decides when to retry.
                    let _ = me.token(&name).await;
                }
            });
        }
    }

    /// How long the background refresher sleeps before looking at `account` again.
    fn next_refresh_in(&self, account: &str) -> Duration {
        let Ok(acc) = self.get(account) else {
            return MAX_BACKOFF;
        };
        if acc.needs_login().is_some() {
            return STORE_POLL;
        }
        let now = Instant::now();
        let st = acc.state();
        let due = match &st.current {
            Some(t) => t.refresh_at,
            None => now,
        };
        let due = match st.next_attempt {
            Some(n) if n > due => n,
            _ => due,
        };
        due.saturating_duration_since(now)
    }
}
