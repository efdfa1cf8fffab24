//! The token manager: one access token per account, cached in memory and in the store,
//! refreshed ahead of expiry with at most one provider request in flight per account.
//!
//! Callers ask for `token(account)`; a fresh cached token is returned at once. When the token
//! is missing or due, the first caller takes the account's refresh lock and asks the provider;
//! everyone else waits on that lock and then finds the new token. With `spawn_refresher` a
//! background task refreshes ahead of expiry, so in the steady state nobody waits.
//!
//! A token store write that fails (full disk, broken directory) is retried, logged at ERROR,
//! counted, and keeps the account not ready until a write succeeds: a rotated refresh token
//! that exists only in memory is lost at the next restart.
//!
//! Failures: a transient provider failure (network, 5xx, 429) keeps the refresh token and the
//! current access token (used while valid) and retries with exponential backoff. A refused
//! refresh token (invalid_grant) marks the account "needs login"; from then on the provider is
//! not asked again until the store file changes (`login` wrote a new token), which is picked up
//! without a restart. An upstream that rejects a token calls `refresh_rejected` with the
//! rejected generation, so N sessions that saw the same rejection cause one refresh.
//!
//! A configuration reload ([`TokenManager::reload`]) keeps the state of every account whose
//! oauth settings are unchanged (no new token request), drops removed accounts, and gives an
//! added account, or one whose oauth settings changed (client id or secret, tenant, token
//! URL, scopes, flow...), a fresh entry that obtains its own token like at start (a changed
//! account's cached access token is discarded). Each entry's background refresher ends with
//! the entry.
//!
//! Time comes from the injected [`Clock`] (tokio's clock, so unit tests run under
//! `tokio::time::pause` and `advance`); token requests are `flows`' business.

use crate::clock::Clock;
use crate::config::{Account, Config, Flow, OAuth};
use crate::oauth::flows::{
    self, FlowError, HttpClientError, TokenGrant, TokenResponse, MAX_TOKEN_LIFETIME,
};
use crate::oauth::store::{StateKey, StoreError, StoredTokens, TokenStore};
use crate::secret::Secret;
use crate::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
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
/// Writes of new tokens tried at once before a failure is reported (a rotated refresh token
/// that is not saved is lost at the next restart: the account would need a new login).
const STORE_WRITE_ATTEMPTS: u32 = 3;
/// Pause before the second write attempt; doubles before each further one.
const STORE_WRITE_BACKOFF: Duration = Duration::from_millis(100);
/// While tokens are unsaved, the background refresher tries to write them this often (and
/// every refresh writes its new tokens anyway).
const STORE_RETRY: Duration = Duration::from_secs(30);

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
    pub(crate) fn is_fresh(&self, now: Instant) -> bool {
        now < self.refresh_at
    }

    pub(crate) fn is_valid(&self, now: Instant) -> bool {
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

/// Why the token manager could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// A corrupt or undecryptable token store.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    HttpClient(#[from] HttpClientError),
}

/// What /readyz and `check` report for an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountStatus {
    Ready,
    NoTokenYet,
    NeedsLogin(String),
    Failing(String),
    /// Tokens work, but the latest could not be written to the store (a restart would
    /// lose a rotated refresh token): the reason.
    StoreFailing(String),
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
    /// Failed writes to the token store (each attempt).
    store_failures: u64,
    /// Tokens that could not be written to the store yet, and why.
    unsaved: Option<(StoredTokens, String)>,
}

#[derive(Debug)]
struct AccountTokens {
    account: Account,
    state: Mutex<State>,
    refresh_lock: tokio::sync::Mutex<()>,
    /// Fires when a reload removed or replaced this entry: its refresher ends.
    retired: CancellationToken,
}

impl AccountTokens {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
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
    /// Replaced as a whole by [`TokenManager::reload`]; entries are shared with callers.
    accounts: Mutex<HashMap<String, Arc<AccountTokens>>>,
    store: TokenStore,
    http: reqwest::Client,
    clock: Clock,
    /// The shutdown token once `spawn_refresher` ran (reloads start refreshers for new
    /// entries with it).
    refresher: Mutex<Option<CancellationToken>>,
}

/// Whether two accounts' oauth settings would obtain the same tokens.
fn same_oauth(a: &OAuth, b: &OAuth) -> bool {
    let secret = |o: &OAuth| o.client_secret.as_ref().map(|s| s.expose().to_string());
    a.provider == b.provider
        && a.tenant == b.tenant
        && a.flow == b.flow
        && a.client_id == b.client_id
        && secret(a) == secret(b)
        && a.scopes == b.scopes
        && a.token_url == b.token_url
        && a.authorize_url == b.authorize_url
        && a.device_authorization_url == b.device_authorization_url
        && a.redirect_port == b.redirect_port
}

/// What a reload did to the accounts (names, sorted).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TokenChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Oauth settings changed: the cached token was discarded.
    pub changed: Vec<String>,
}

/// An account's entry as at start: its stored tokens, if any.
fn load_entry(store: &TokenStore, a: &Account, clock: &Clock) -> Result<AccountTokens, StoreError> {
    let store_seen = store.modified(&a.username);
    let stored = store.load(&a.username)?.unwrap_or_default();
    let current = token_from_store(&stored, 1, clock);
    let status = if current.is_some() {
        AccountStatus::Ready
    } else if !a.oauth.flow.is_app_only() && stored.refresh_token.is_none() {
        AccountStatus::NeedsLogin(format!(
            "no refresh token is stored; {}",
            login_hint(&a.username)
        ))
    } else {
        AccountStatus::NoTokenYet
    };
    Ok(AccountTokens {
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
        retired: CancellationToken::new(),
    })
}

fn margin(lifetime: Duration) -> Duration {
    (lifetime / REFRESH_MARGIN_DIVISOR).min(MAX_REFRESH_MARGIN)
}

/// An access token read from the store, if still valid.
fn token_from_store(stored: &StoredTokens, generation: u64, clock: &Clock) -> Option<AccessToken> {
    let secret = stored.access_token.clone()?;
    // A tampered or absurd `expires_at` (up to u64::MAX) counts as MAX_TOKEN_LIFETIME.
    let left = Duration::from_secs(stored.expires_at.checked_sub(clock.unix_now())?)
        .min(MAX_TOKEN_LIFETIME);
    if left.is_zero() {
        return None;
    }
    let now = clock.now();
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
    pub fn new(config: &Config) -> Result<TokenManager, ManagerError> {
        Self::with_clock(config, Clock::system())
    }

    /// As [`TokenManager::new`], with time from `clock`.
    pub(crate) fn with_clock(config: &Config, clock: Clock) -> Result<TokenManager, ManagerError> {
        let store = TokenStore::new(
            &config.state.dir,
            config.state.key.as_ref().map(|k| StateKey::from(&k.value)),
        );
        let mut accounts = HashMap::new();
        for a in &config.accounts {
            let entry = load_entry(&store, a, &clock)?;
            accounts.insert(a.username.clone(), Arc::new(entry));
        }
        Ok(TokenManager {
            inner: Arc::new(Inner {
                accounts: Mutex::new(accounts),
                store,
                http: flows::http_client()?,
                clock,
                refresher: Mutex::new(None),
            }),
        })
    }

    /// Follows a reloaded configuration (see the module doc). Fails, changing nothing, when
    /// an added account's stored tokens cannot be read.
    pub fn reload(&self, config: &Config) -> Result<TokenChanges, ManagerError> {
        let old: HashMap<String, Arc<AccountTokens>> = lock(&self.inner.accounts).clone();
        let mut next = HashMap::new();
        let mut changes = TokenChanges::default();
        for a in &config.accounts {
            let entry = match old.get(&a.username) {
                Some(e) if same_oauth(&e.account.oauth, &a.oauth) => e.clone(),
                Some(e) => {
                    changes.changed.push(a.username.clone());
                    Arc::new(self.replacement(e, a))
                }
                None => {
                    changes.added.push(a.username.clone());
                    Arc::new(load_entry(&self.inner.store, a, &self.inner.clock)?)
                }
            };
            next.insert(a.username.clone(), entry);
        }
        changes.removed = old
            .keys()
            .filter(|k| !next.contains_key(*k))
            .cloned()
            .collect();
        changes.added.sort();
        changes.removed.sort();
        changes.changed.sort();
        let fresh: Vec<Arc<AccountTokens>> = changes
            .added
            .iter()
            .chain(&changes.changed)
            .filter_map(|n| next.get(n).cloned())
            .collect();
        *lock(&self.inner.accounts) = next;
        for name in changes.removed.iter().chain(&changes.changed) {
            if let Some(e) = old.get(name) {
                e.retired.cancel();
            }
        }
        let shutdown = lock(&self.inner.refresher).clone();
        if let Some(shutdown) = shutdown {
            for acc in fresh {
                self.spawn_one(acc, shutdown.clone());
            }
        }
        Ok(changes)
    }

    /// A new entry for an account whose oauth settings changed: the cached access token is
    /// discarded; a stored refresh token is kept (a provider that refuses it under the new
    /// settings makes the account "needs login", as at start).
    fn replacement(&self, old: &AccountTokens, a: &Account) -> AccountTokens {
        let st = old.state();
        let status = if !a.oauth.flow.is_app_only() && st.refresh_token.is_none() {
            AccountStatus::NeedsLogin(format!(
                "no refresh token is stored; {}",
                login_hint(&a.username)
            ))
        } else {
            AccountStatus::NoTokenYet
        };
        AccountTokens {
            account: a.clone(),
            state: Mutex::new(State {
                current: None,
                refresh_token: st.refresh_token.clone(),
                status: Some(status),
                // Rejections of the old generations must not be taken for this one's.
                generation: st.generation + 1,
                store_seen: st.store_seen,
                refreshes: st.refreshes,
                failures: st.failures,
                store_failures: st.store_failures,
                ..State::default()
            }),
            refresh_lock: tokio::sync::Mutex::new(()),
            retired: CancellationToken::new(),
        }
    }

    /// The configured account names, sorted (admin's list follows reloads).
    pub fn account_names(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.inner.accounts).keys().cloned().collect();
        v.sort();
        v
    }

    fn entry(&self, account: &str) -> Option<Arc<AccountTokens>> {
        lock(&self.inner.accounts).get(account).cloned()
    }

    fn now(&self) -> Instant {
        self.inner.clock.now()
    }

    fn get(&self, account: &str) -> Result<Arc<AccountTokens>, TokenError> {
        self.entry(account)
            .ok_or_else(|| TokenError::UnknownAccount(account.to_string()))
    }

    /// The account's status (for readiness, local AUTH and `check`). An account that needs
    /// login looks at the store first, so a `login` done meanwhile is seen at once.
    pub fn status(&self, account: &str) -> Option<AccountStatus> {
        let acc = self.entry(account)?;
        if acc.needs_login().is_some() {
            self.reload_if_changed(&acc);
        }
        let st = acc.state();
        if let (Some((_, reason)), false) = (
            &st.unsaved,
            matches!(st.status, Some(AccountStatus::NeedsLogin(_))),
        ) {
            return Some(AccountStatus::StoreFailing(reason.clone()));
        }
        Some(match &st.status {
            Some(AccountStatus::Ready) | None
                if !st.current.as_ref().is_some_and(|t| t.is_valid(self.now())) =>
            {
                AccountStatus::NoTokenYet
            }
            Some(s) => s.clone(),
            None => AccountStatus::NoTokenYet,
        })
    }

    /// Seconds until the account's access token expires (None without a token).
    pub fn expires_in(&self, account: &str) -> Option<Duration> {
        let acc = self.entry(account)?;
        let st = acc.state();
        st.current
            .as_ref()
            .map(|t| t.expires_at.saturating_duration_since(self.now()))
    }

    /// Failed writes of the account's tokens to the store so far (for metrics).
    pub fn store_write_failures(&self, account: &str) -> u64 {
        self.entry(account)
            .map_or(0, |acc| acc.state().store_failures)
    }

    /// Account names, token requests that succeeded and failed, for metrics.
    pub fn counts(&self) -> Vec<(String, u64, u64)> {
        let mut v: Vec<_> = lock(&self.inner.accounts)
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
        let Some(acc) = self.entry(account) else {
            return false;
        };
        if acc.needs_login().is_some() {
            self.reload_if_changed(&acc);
        }
        let st = acc.state();
        !matches!(st.status, Some(AccountStatus::NeedsLogin(_)))
            && st.unsaved.is_none()
            && st.current.as_ref().is_some_and(|t| t.is_valid(self.now()))
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
        st.current = token_from_store(&stored, st.generation, &self.inner.clock);
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
        self.token_of(&acc).await
    }

    async fn token_of(&self, acc: &AccountTokens) -> Result<AccessToken, TokenError> {
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
        let now = self.now();
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
            .filter(|t| t.generation != generation && t.is_fresh(self.now()))
        {
            return Ok(t);
        }
        self.refresh_locked(&acc).await
    }

    /// Asks the provider for a new token now, whatever the cache holds (`check` uses this so
    /// an expired secret or revoked consent shows up today, not at the next refresh).
    pub async fn force_refresh(&self, account: &str) -> Result<AccessToken, TokenError> {
        let acc = self.get(account)?;
        let _guard = acc.refresh_lock.lock().await;
        acc.state().next_attempt = None;
        match self.refresh_locked(&acc).await {
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
        let now = self.now();
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
            Flow::ClientCredentials | Flow::ServiceAccount => TokenGrant::ClientCredentials,
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
        let started = self.now();
        match flows::request_token(&self.inner.http, &acc.account.oauth, &grant).await {
            Ok(resp) => Ok(self.adopt(acc, resp, started).await),
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
                st.next_attempt = Some(self.now() + st.backoff);
                st.status = Some(AccountStatus::Failing(reason.clone()));
                tracing::warn!(account = %name, %reason, retry_in_ms = st.backoff.as_millis() as u64, "token request failed");
                let fallback = st.current.clone().filter(|t| t.is_valid(self.now()));
                drop(st);
                fallback.ok_or(TokenError::Provider {
                    account: name,
                    reason,
                })
            }
        }
    }

    /// Persists (first: a rotated refresh token must survive a crash), then publishes.
    async fn adopt(
        &self,
        acc: &AccountTokens,
        resp: TokenResponse,
        started: Instant,
    ) -> AccessToken {
        let name = acc.name();
        // Capped where the response is parsed too; here so no TokenResponse can overflow.
        let lifetime = resp.expires_in.min(MAX_TOKEN_LIFETIME);
        let expires_at = started + lifetime;
        let refresh_token = resp
            .refresh_token
            .or_else(|| acc.state().refresh_token.clone());
        let stored = StoredTokens {
            access_token: Some(resp.access_token.clone()),
            expires_at: self
                .inner
                .clock
                .unix_now()
                .saturating_add(lifetime.as_secs()),
            refresh_token: refresh_token.clone(),
        };
        self.persist(acc, stored).await;
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

    /// Writes `stored` to the store, trying [`STORE_WRITE_ATTEMPTS`] times. A failure is an
    /// emergency (a rotated refresh token lost at the next restart means a new login): it
    /// is logged at ERROR, counted, makes the account not ready, and the tokens are kept to
    /// be written again (every [`STORE_RETRY`], and by every later refresh).
    async fn persist(&self, acc: &AccountTokens, stored: StoredTokens) {
        let name = acc.name();
        let mut reason = String::new();
        for attempt in 0..STORE_WRITE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(STORE_WRITE_BACKOFF * (1 << (attempt - 1))).await;
            }
            match self.inner.store.save(name, &stored) {
                Ok(()) => {
                    if acc.state().unsaved.take().is_some() {
                        tracing::info!(account = %name, "token store written again; account ready");
                    }
                    return;
                }
                Err(e) => {
                    acc.state().store_failures += 1;
                    reason = e.to_string();
                }
            }
        }
        tracing::error!(account = %name, error = %reason, attempts = STORE_WRITE_ATTEMPTS, "cannot write the token store: new tokens are only in memory, and a restart would need a new login; free space or fix permissions in state.dir (retried)");
        acc.state().unsaved = Some((stored, reason));
    }

    /// Writes tokens that could not be written before, if any (the background refresher).
    async fn retry_unsaved(&self, acc: &AccountTokens) {
        let _guard = acc.refresh_lock.lock().await;
        let Some((stored, _)) = acc.state().unsaved.clone() else {
            return;
        };
        self.persist(acc, stored).await;
        let seen = self.inner.store.modified(acc.name());
        acc.state().store_seen = seen;
    }

    /// Refreshes every account ahead of expiry in the background until `shutdown`.
    /// Entries added by later reloads get theirs at once; a removed or replaced entry's
    /// refresher ends.
    pub fn spawn_refresher(&self, shutdown: CancellationToken) {
        *lock(&self.inner.refresher) = Some(shutdown.clone());
        let entries: Vec<Arc<AccountTokens>> =
            lock(&self.inner.accounts).values().cloned().collect();
        for acc in entries {
            self.spawn_one(acc, shutdown.clone());
        }
    }

    /// The background refresher of one entry, until `shutdown` or its retirement.
    fn spawn_one(&self, acc: Arc<AccountTokens>, shutdown: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let wait = me.next_refresh_in(&acc);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return,
                    _ = acc.retired.cancelled() => return,
                }
                if acc.needs_login().is_some() {
                    me.reload_if_changed(&acc);
                    continue;
                }
                me.retry_unsaved(&acc).await;
                // Errors are logged and counted inside; the loop decides when to retry.
                let _ = me.token_of(&acc).await;
            }
        });
    }

    /// How long the background refresher sleeps before looking at `acc` again.
    fn next_refresh_in(&self, acc: &AccountTokens) -> Duration {
        if acc.needs_login().is_some() {
            return STORE_POLL;
        }
        let now = self.now();
        let st = acc.state();
        let due = match &st.current {
            Some(t) => t.refresh_at,
            None => now,
        };
        let due = match st.next_attempt {
            Some(n) if n > due => n,
            _ => due,
        };
        let wait = due.saturating_duration_since(now);
        if st.unsaved.is_some() {
            return wait.min(STORE_RETRY);
        }
        wait
    }
}

/// The token manager under paused time, against testkit's fake token endpoint over real
/// (loopback) HTTP. Time moves only by `tokio::time::advance`: see [`tests::Frozen`].
#[cfg(test)]
mod tests {
    use super::*;
    use testkit::{FakeTokenEndpoint, TokenOptions};

    const USER: &str = "u";
    const HOUR: Duration = Duration::from_secs(3600);
    const MS: Duration = Duration::from_millis(1);

    /// While alive, tokio's paused clock does not jump ahead by itself (a running blocking
    /// task inhibits auto-advance): real HTTP to the fake endpoint cannot make a timeout
    /// fire, and time moves only by `advance`.
    struct Frozen(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

    fn freeze() -> Frozen {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        tokio::task::spawn_blocking(move || {
            let _ = rx.recv();
        });
        Frozen(tx)
    }

    struct Setup {
        tokens: FakeTokenEndpoint,
        manager: TokenManager,
        config: Config,
        clock: Clock,
        _dir: tempfile::TempDir,
        _frozen: Frozen,
    }

    impl Setup {
        /// `flow` is "client_credentials" or "authorization_code" (then the store holds a
        /// refresh token the fake endpoint accepts).
        async fn new(lifetime: Duration, flow: &str) -> Setup {
            let frozen = freeze();
            let delegated = flow != "client_credentials";
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let tokens = FakeTokenEndpoint::start(
                listener,
                TokenOptions {
                    lifetime,
                    client_secret: (!delegated).then(|| "test-secret".to_string()),
                    ..TokenOptions::default()
                },
            )
            .await;
            let dir = tempfile::tempdir().expect("tempdir");
            let secret = if delegated {
                ""
            } else {
                "client_secret_env = \"SECRET\"\n"
            };
            let toml = format!(
                "[upstream]\nhost = \"127.0.0.1\"\nport = 9\n[state]\ndir = \"state\"\n\
                 [[account]]\nusername = \"{USER}\"\npassword_env = \"PW\"\nmailbox = \"u@example.com\"\n\
                 [account.oauth]\nflow = \"{flow}\"\ntenant = \"t\"\nclient_id = \"test-client\"\n\
                 {secret}token_url = \"{}\"\n",
                tokens.token_url()
            );
            let config = Config::from_toml(&toml, "t.toml", dir.path(), &|k| {
                Some(if k == "SECRET" { "test-secret" } else { "pw" }.to_string())
            })
            .expect("test config");
            if delegated {
                store_refresh_token(&config, tokens.issue_refresh_token());
            }
            let clock = Clock::following_tokio();
            let manager = TokenManager::with_clock(&config, clock).expect("manager");
            Setup {
                tokens,
                manager,
                config,
                clock,
                _dir: dir,
                _frozen: frozen,
            }
        }

        fn requests(&self) -> usize {
            self.tokens.requests()
        }

        async fn token(&self) -> AccessToken {
            self.manager.token(USER).await.expect("a token")
        }
    }

    /// What `login` does: a new refresh token in the store.
    fn store_refresh_token(config: &Config, refresh_token: String) {
        TokenStore::new(
            &config.state.dir,
            config.state.key.as_ref().map(|k| StateKey::from(&k.value)),
        )
        .save(
            USER,
            &StoredTokens {
                access_token: None,
                expires_at: 0,
                refresh_token: Some(Secret::new(refresh_token)),
            },
        )
        .expect("save");
    }

    /// Runs other tasks (and their loopback HTTP) until `f` holds; 10 s of real time at most.
    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_is_due_a_quarter_of_the_lifetime_before_expiry_and_at_most_5_minutes() {
        // (lifetime, margin): a quarter of 400 s is 100 s; of an hour, capped at 5 minutes.
        for (lifetime, margin) in [
            (Duration::from_secs(400), Duration::from_secs(100)),
            (HOUR, Duration::from_secs(300)),
        ] {
            let s = Setup::new(lifetime, "client_credentials").await;
            let t0 = tokio::time::Instant::now();
            let first = s.token().await;
            assert_eq!(s.requests(), 1);
            assert_eq!(first.expires_at - t0, lifetime);
            assert_eq!(first.expires_at - first.refresh_at, margin);

            tokio::time::advance(lifetime - margin - MS).await;
            let same = s.token().await;
            assert_eq!((same.generation, s.requests()), (first.generation, 1));
            assert!(same.is_fresh(tokio::time::Instant::now()));

            tokio::time::advance(MS).await;
            let next = s.token().await;
            assert_eq!(s.requests(), 2, "refreshed at {lifetime:?} - {margin:?}");
            assert_eq!(next.generation, first.generation + 1);
            assert_ne!(next.secret.expose(), first.secret.expose());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_refresher_fetches_at_start_and_again_at_the_refresh_point_without_callers() {
        let s = Setup::new(HOUR, "client_credentials").await;
        let stop = CancellationToken::new();
        s.manager.spawn_refresher(stop.clone());
        until("the start-up token", || s.manager.is_usable(USER)).await;
        assert_eq!(s.requests(), 1);
        let started = tokio::time::Instant::now();

        tokio::time::advance(HOUR - Duration::from_secs(300) - MS).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(s.requests(), 1, "nothing before the refresh point");
        tokio::time::advance(MS).await;
        until("the refresh", || s.manager.counts()[0].1 == 2).await;
        assert_eq!(s.requests(), 2);
        let t = s
            .manager
            .get(USER)
            .unwrap()
            .state()
            .current
            .clone()
            .unwrap();
        assert_eq!(
            t.expires_at - started,
            HOUR + HOUR - Duration::from_secs(300)
        );
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_from_a_quarter_second_to_a_minute_while_the_old_token_is_used() {
        let s = Setup::new(HOUR, "client_credentials").await;
        let old = s.token().await;
        tokio::time::advance(old.refresh_at - tokio::time::Instant::now()).await;
        let failures = 11;
        s.tokens.fail_next(
            failures,
            503,
            r#"{"error":"temporarily_unavailable","error_description":"AADSTS50196: try again"}"#,
        );
        let expected: Vec<Duration> = [250, 500, 1000, 2000, 4000, 8000, 16000, 32000]
            .into_iter()
            .chain([60_000; 3])
            .map(Duration::from_millis)
            .collect();
        assert_eq!(expected.len(), failures);
        for (i, backoff) in expected.iter().enumerate() {
            // Due: one request, which fails; the old token is still valid and is used.
            let t = s.token().await;
            assert_eq!(s.requests(), 2 + i, "failure {i}");
            assert_eq!(t.generation, old.generation);
            assert_eq!(t.secret.expose(), old.secret.expose());
            assert!(matches!(
                s.manager.status(USER),
                Some(AccountStatus::Failing(r)) if r.contains("temporarily_unavailable")
            ));
            // No request until the backoff is over.
            s.token().await;
            tokio::time::advance(*backoff - MS).await;
            assert_eq!(s.token().await.generation, old.generation);
            assert_eq!(s.requests(), 2 + i, "no request within {backoff:?}");
            tokio::time::advance(MS).await;
        }
        // The provider is back: the next request gets a new token.
        let new = s.token().await;
        assert_eq!(s.requests(), 2 + failures);
        assert_eq!(new.generation, old.generation + 1);
        assert_eq!(s.manager.status(USER), Some(AccountStatus::Ready));
        assert_eq!(
            s.manager.counts(),
            vec![(USER.to_string(), 2, failures as u64)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_valid_token_a_failing_provider_is_an_error() {
        let s = Setup::new(HOUR, "client_credentials").await;
        s.tokens.fail_next(
            1,
            500,
            r#"{"error":"server_error","error_description":"boom"}"#,
        );
        match s.manager.token(USER).await {
            Err(TokenError::Provider { account, reason }) => {
                assert_eq!(account, USER);
                assert!(reason.starts_with("server_error: boom"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Backing off: not asked again at once, and the caller is told when.
        match s.manager.token(USER).await {
            Err(TokenError::Provider { reason, .. }) => {
                assert_eq!(reason, "provider failing; next attempt in 250 ms")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.requests(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn fifty_callers_with_an_expired_token_cause_exactly_one_token_request() {
        let s = Setup::new(HOUR, "client_credentials").await;
        let first = s.token().await;
        assert_eq!(s.requests(), 1);
        tokio::time::advance(HOUR + MS).await;
        assert!(!first.is_valid(tokio::time::Instant::now()));

        let callers: Vec<_> = (0..50)
            .map(|_| {
                let m = s.manager.clone();
                tokio::spawn(async move { m.token(USER).await.map(|t| t.generation) })
            })
            .collect();
        for c in callers {
            assert_eq!(c.await.unwrap().unwrap(), first.generation + 1);
        }
        assert_eq!(s.requests(), 2, "one request for fifty callers");

        // Fifty sessions whose upstream rejected the same token: one refresh.
        let rejected = first.generation + 1;
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let m = s.manager.clone();
                tokio::spawn(async move {
                    m.refresh_rejected(USER, rejected)
                        .await
                        .map(|t| t.generation)
                })
            })
            .collect();
        for c in callers {
            assert_eq!(c.await.unwrap().unwrap(), rejected + 1);
        }
        assert_eq!(s.requests(), 3, "one request for fifty rejections");
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_grant_means_needs_login_and_the_provider_is_not_asked_again() {
        let s = Setup::new(HOUR, "authorization_code").await;
        let first = s.token().await;
        assert_eq!(s.tokens.requests_by_grant("refresh_token"), 1);
        s.tokens.revoke_refresh_tokens();
        tokio::time::advance(HOUR + MS).await;

        match s.manager.token(USER).await {
            Err(TokenError::NeedsLogin { account, reason }) => {
                assert_eq!(account, USER);
                assert!(reason.starts_with("invalid_grant"), "{reason}");
                assert!(
                    reason.ends_with("run: smtp-oauth-bridge login u"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.requests(), 2);
        assert!(matches!(
            s.manager.status(USER),
            Some(AccountStatus::NeedsLogin(_))
        ));
        assert!(!s.manager.is_usable(USER));

        // Callers, rejections, forced refreshes and the refresher over ten minutes: no request.
        let stop = CancellationToken::new();
        s.manager.spawn_refresher(stop.clone());
        for _ in 0..60 {
            tokio::time::advance(Duration::from_secs(10)).await;
            assert!(matches!(
                s.manager.token(USER).await,
                Err(TokenError::NeedsLogin { .. })
            ));
        }
        assert!(s
            .manager
            .refresh_rejected(USER, first.generation)
            .await
            .is_err());
        assert!(s.manager.force_refresh(USER).await.is_err());
        assert_eq!(s.requests(), 2, "the provider was asked again");

        // `login` stores a new refresh token: the next caller gets a token, without a restart.
        store_refresh_token(&s.config, s.tokens.issue_refresh_token());
        let t = s.token().await;
        assert_eq!(s.requests(), 3);
        assert!(t.generation > first.generation);
        assert_eq!(s.manager.status(USER), Some(AccountStatus::Ready));
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_lifetimes_are_capped_at_a_day_not_a_panic() {
        let s = Setup::new(HOUR, "client_credentials").await;
        let acc = s.manager.get(USER).unwrap();
        // From the token endpoint: expires_in up to u64::MAX seconds.
        for secs in [u64::MAX, i64::MAX as u64 + 1, 86_401, 10 * 365 * 86_400] {
            let started = tokio::time::Instant::now();
            let t = s
                .manager
                .adopt(
                    &acc,
                    TokenResponse {
                        access_token: Secret::new("at"),
                        refresh_token: None,
                        expires_in: Duration::from_secs(secs),
                    },
                    started,
                )
                .await;
            assert_eq!(t.expires_at - started, MAX_TOKEN_LIFETIME, "{secs}");
            assert_eq!(
                t.expires_at - t.refresh_at,
                Duration::from_secs(300),
                "{secs}"
            );
            let stored = s.manager.inner.store.load(USER).unwrap().unwrap();
            assert_eq!(
                stored.expires_at,
                s.clock.unix_now() + MAX_TOKEN_LIFETIME.as_secs(),
                "{secs}"
            );
        }
        // From a tampered token store: expires_at up to u64::MAX (and past i64::MAX).
        for expires_at in [u64::MAX, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX - 1] {
            TokenStore::new(&s.config.state.dir, None)
                .save(
                    USER,
                    &StoredTokens {
                        access_token: Some(Secret::new("tampered")),
                        expires_at,
                        refresh_token: None,
                    },
                )
                .unwrap();
            let m = TokenManager::with_clock(&s.config, s.clock).unwrap();
            assert_eq!(m.expires_in(USER), Some(MAX_TOKEN_LIFETIME), "{expires_at}");
            let t = m.token(USER).await.unwrap();
            assert_eq!(t.secret.expose(), "tampered");
            assert!(t.refresh_at < t.expires_at);
        }
        // A negative or too large number: no panic, and no access token taken from it.
        for bad in ["-1", "18446744073709551616", "1e30", "-9223372036854775809"] {
            let path = s.manager.inner.store.path(USER);
            std::fs::write(
                &path,
                format!(r#"{{"version":1,"account":"u","access_token":"x","expires_at":{bad},"refresh_token":null}}"#),
            )
            .unwrap();
            let loaded = s.manager.inner.store.load(USER);
            assert!(
                !matches!(&loaded, Ok(Some(t)) if t.access_token.is_some()),
                "{bad}"
            );
            let m = TokenManager::with_clock(&s.config, s.clock).unwrap();
            assert_eq!(m.expires_in(USER), None, "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stored_token_is_used_until_its_refresh_point_by_the_wall_clock() {
        let s = Setup::new(HOUR, "client_credentials").await;
        let t = s.token().await;
        assert_eq!(s.requests(), 1);
        // A restart 50 minutes later finds the token in the store with 10 minutes left.
        tokio::time::advance(Duration::from_secs(50 * 60)).await;
        let again = TokenManager::with_clock(&s.config, s.clock).unwrap();
        assert!(again.is_usable(USER));
        assert_eq!(again.expires_in(USER), Some(Duration::from_secs(600)));
        let stored = again.token(USER).await.unwrap();
        assert_eq!(stored.secret.expose(), t.secret.expose());
        assert_eq!(s.requests(), 1);
        // Its lifetime is unknown: refreshed when half of what is left (5 minutes) is left.
        tokio::time::advance(Duration::from_secs(300) - MS).await;
        again.token(USER).await.unwrap();
        assert_eq!(s.requests(), 1);
        tokio::time::advance(MS).await;
        let new = again.token(USER).await.unwrap();
        assert_eq!(s.requests(), 2);
        assert_ne!(new.secret.expose(), t.secret.expose());
    }

    /// `s.config` with its oauth table's `key = "old"` line replaced (the same file and
    /// environment otherwise).
    fn reconfigured(s: &Setup, secret: &str, tenant: &str) -> Config {
        let mut c = s.config.clone();
        let oauth = &mut c.accounts[0].oauth;
        if let Some(cs) = &mut oauth.client_secret {
            cs.value = Secret::new(secret);
        }
        oauth.tenant = tenant.to_string();
        c
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_unchanged_tokens_and_gets_new_ones_for_changed_oauth_settings() {
        let s = Setup::new(HOUR, "client_credentials").await;
        let stop = CancellationToken::new();
        s.manager.spawn_refresher(stop.clone());
        until("the start-up token", || s.manager.is_usable(USER)).await;
        let first = s.token().await;
        assert_eq!(s.requests(), 1);

        // Unchanged (a password or mailbox change is not the manager's business): same
        // token, no request, now or from the refresher.
        let mut same = s.config.clone();
        same.accounts[0].mailbox = "other@example.com".into();
        let changes = s.manager.reload(&same).unwrap();
        assert_eq!(changes, TokenChanges::default());
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        let t = s.token().await;
        assert_eq!(
            (t.generation, t.secret.expose(), s.requests()),
            (first.generation, first.secret.expose(), 1)
        );

        // A changed tenant: the cached token is discarded; the refresher (a new one for
        // the new entry) gets a new token at once, exactly one request.
        let changes = s
            .manager
            .reload(&reconfigured(&s, "test-secret", "t2"))
            .unwrap();
        assert_eq!(changes.changed, vec![USER.to_string()]);
        until("the new entry's token", || s.requests() == 2).await;
        until("adopted", || s.manager.is_usable(USER)).await;
        let t = s.token().await;
        assert_eq!(s.requests(), 2);
        assert!(t.generation > first.generation);
        assert_ne!(t.secret.expose(), first.secret.expose());

        // A changed client secret: a new request with it (the fake endpoint refuses that
        // secret), and the old token is not handed out any more.
        s.manager
            .reload(&reconfigured(&s, "rotated-secret", "t2"))
            .unwrap();
        until("the request with the new secret", || s.requests() == 3).await;
        assert!(matches!(
            s.manager.token(USER).await,
            Err(TokenError::Provider { .. })
        ));
        assert!(!s.manager.is_usable(USER));

        // Removed: unknown at once; added back: loaded like at start (the stored token,
        // as a restart would).
        let mut none = s.config.clone();
        none.accounts.clear();
        let changes = s.manager.reload(&none).unwrap();
        assert_eq!(changes.removed, vec![USER.to_string()]);
        assert!(matches!(
            s.manager.token(USER).await,
            Err(TokenError::UnknownAccount(_))
        ));
        assert!(s.manager.account_names().is_empty());
        let before = s.requests();
        let changes = s.manager.reload(&s.config).unwrap();
        assert_eq!(changes.added, vec![USER.to_string()]);
        until("the re-added account's token", || s.manager.is_usable(USER)).await;
        assert_eq!(s.requests(), before);
        assert_eq!(s.token().await.secret.expose(), t.secret.expose());
        stop.cancel();
    }

    const SECOND: Duration = Duration::from_secs(1);

    /// Moves paused time on in 50 ms steps (letting tasks and loopback I/O run in between)
    /// until `f` holds; two minutes of paused time at most.
    async fn advance_until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..2400 {
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            if f() {
                return;
            }
            tokio::time::advance(Duration::from_millis(50)).await;
        }
        panic!("{what} did not happen within two minutes");
    }

    /// The stored refresh token, read back as a restart would.
    fn stored_refresh_token(config: &Config) -> Option<String> {
        TokenStore::new(&config.state.dir, None)
            .load(USER)
            .expect("readable store")
            .and_then(|t| t.refresh_token)
            .map(|t| t.expose().to_string())
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_token_store_write_is_retried_counted_and_keeps_the_account_not_ready() {
        let s = Setup::new(HOUR, "authorization_code").await;
        let original = stored_refresh_token(&s.config).expect("stored by login");
        // The tokens directory becomes a regular file: every write fails, even as root.
        let dir = s.config.state.dir.join("tokens");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, b"not a directory").unwrap();

        let m = s.manager.clone();
        let caller = tokio::spawn(async move { m.token(USER).await });
        // Three attempts, 100 ms and then 200 ms apart.
        until("the first write", || {
            s.manager.store_write_failures(USER) == 1
        })
        .await;
        tokio::time::advance(STORE_WRITE_BACKOFF - MS).await;
        assert_eq!(s.manager.store_write_failures(USER), 1);
        tokio::time::advance(MS).await;
        until("the second write", || {
            s.manager.store_write_failures(USER) == 2
        })
        .await;
        tokio::time::advance(2 * STORE_WRITE_BACKOFF).await;
        // The token works from memory meanwhile.
        let t = caller.await.unwrap().expect("a token");
        assert_eq!(s.manager.store_write_failures(USER), 3);
        assert_eq!(s.requests(), 1);
        match s.manager.status(USER) {
            Some(AccountStatus::StoreFailing(r)) => {
                assert!(r.contains("tokens"), "{r}")
            }
            other => panic!("{other:?}"),
        }
        assert!(!s.manager.is_usable(USER));
        assert_eq!(s.token().await.generation, t.generation);

        // The background refresher writes again every STORE_RETRY, without a new request.
        let stop = CancellationToken::new();
        s.manager.spawn_refresher(stop.clone());
        let started = tokio::time::Instant::now();
        advance_until("the first retry", || {
            s.manager.store_write_failures(USER) == 4
        })
        .await;
        let waited = started.elapsed();
        assert!(
            waited >= STORE_RETRY && waited < STORE_RETRY + SECOND,
            "{waited:?}"
        );
        advance_until("the retry's attempts", || {
            s.manager.store_write_failures(USER) == 6
        })
        .await;
        assert!(!s.manager.is_usable(USER));
        // The disk is fixed: the next retry saves the rotated refresh token.
        std::fs::remove_file(&dir).unwrap();
        advance_until("the write", || s.manager.is_usable(USER)).await;
        assert_eq!(s.manager.status(USER), Some(AccountStatus::Ready));
        assert_eq!(s.manager.store_write_failures(USER), 6);
        assert_eq!(s.requests(), 1);
        let saved = stored_refresh_token(&s.config).expect("saved");
        assert_ne!(saved, original);
        assert_eq!(s.tokens.valid_refresh_tokens(), vec![saved]);
        stop.cancel();
    }
}
