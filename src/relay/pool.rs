//! Authenticated upstream sessions per mailbox: a concurrency cap, reuse, idle expiry.
//!
//! At most `max_sessions_per_mailbox` sessions exist per account (a semaphore permit travels
//! with each [`Lease`]). A lease goes back to the idle list only through
//! [`Lease::release`] with `clean = true`; a lease dropped any other way (an error, a
//! cancelled command) closes its session, so a half-finished command is never reused.
//! Idle sessions older than `idle_secs`, or authenticated with a token that is due for
//! refresh, are closed. A reused session that turns out to be dead when the transaction
//! starts is replaced before the client sees anything ([`Pool::begin`]).

use crate::config::Config;
use crate::oauth::manager::{AccessToken, TokenError, TokenManager};
use crate::relay::upstream::{UpReply, UpstreamError, UpstreamSession, UpstreamTarget};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How often idle sessions are checked for expiry (at most; shorter idle_secs check sooner).
const REAP_INTERVAL: Duration = Duration::from_secs(5);

/// Why no upstream transaction could be started.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BeginError {
    /// Every session of the mailbox stayed busy for the upstream timeout.
    #[error("every upstream session of the mailbox is busy")]
    Busy,
    #[error("{0}")]
    Token(TokenError),
    /// The upstream refused our (fresh) token: configuration or permission problem.
    #[error("upstream refused AUTH: {0}")]
    AuthRejected(UpReply),
    /// The upstream answered AUTH with a 4xx (432 4.3.2: too many sessions for the mailbox):
    /// transient, not a verdict on the credentials.
    #[error("upstream deferred AUTH: {0}")]
    AuthDeferred(UpReply),
    #[error("{0}")]
    Upstream(UpstreamError),
}

struct Idle {
    session: UpstreamSession,
    token: AccessToken,
    since: Instant,
}

struct Mailbox {
    account: String,
    mailbox: String,
    sessions: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
}

impl Mailbox {
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        crate::sync::lock(&self.idle)
    }
}

/// The upstream session pool of all accounts.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    target: UpstreamTarget,
    tokens: TokenManager,
    idle_limit: Duration,
    max_sessions: usize,
    mailboxes: HashMap<String, Arc<Mailbox>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

/// One upstream session lent to one local transaction.
pub struct Lease {
    session: Option<UpstreamSession>,
    token: AccessToken,
    mailbox: Arc<Mailbox>,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("account", &self.mailbox.account)
            .finish_non_exhaustive()
    }
}

impl Lease {
    pub fn session(&mut self) -> &mut UpstreamSession {
        self.session
            .as_mut()
            .expect("a lease holds its session until release or drop")
    }

    /// Returns the session to the pool if `clean` (no transaction open, nothing broken, token
    /// still fresh); otherwise closes it.
    pub fn release(mut self, clean: bool) {
        let Some(session) = self.session.take() else {
            return;
        };
        if clean && !session.is_broken() && self.token.is_fresh(Instant::now()) {
            self.mailbox.idle().push(Idle {
                session,
                token: self.token.clone(),
                since: Instant::now(),
            });
        } else if !session.is_broken() {
            tokio::spawn(session.close());
        }
    }
}

impl Pool {
    pub fn new(config: &Config, target: UpstreamTarget, tokens: TokenManager) -> Pool {
        let mailboxes = config
            .accounts
            .iter()
            .map(|a| {
                (
                    a.username.clone(),
                    Arc::new(Mailbox {
                        account: a.username.clone(),
                        mailbox: a.mailbox.clone(),
                        sessions: Arc::new(Semaphore::new(
                            config.upstream.max_sessions_per_mailbox,
                        )),
                        idle: Mutex::new(Vec::new()),
                    }),
                )
            })
            .collect();
        let pool = Pool {
            inner: Arc::new(PoolInner {
                target,
                tokens,
                idle_limit: config.upstream.idle,
                max_sessions: config.upstream.max_sessions_per_mailbox,
                mailboxes,
            }),
        };
        let weak = Arc::downgrade(&pool.inner);
        let every = REAP_INTERVAL.min(config.upstream.idle);
        tokio::spawn(reap(weak, every));
        pool
    }

    pub fn tokens(&self) -> &TokenManager {
        &self.inner.tokens
    }

    /// Sessions currently idle for `account` (for tests and metrics).
    pub fn idle_sessions(&self, account: &str) -> usize {
        self.inner
            .mailboxes
            .get(account)
            .map_or(0, |m| m.idle().len())
    }

    /// Sessions lent to transactions now for `account` (for metrics).
    pub fn busy_sessions(&self, account: &str) -> usize {
        self.inner.mailboxes.get(account).map_or(0, |m| {
            self.inner.max_sessions - m.sessions.available_permits()
        })
    }

    /// Takes a session for `account` and sends `MAIL FROM` on it. A reused session that
    /// fails before answering MAIL (closed by the server while idle) is replaced by a new one.
    pub async fn begin(
        &self,
        account: &str,
        mail_command: &str,
    ) -> Result<(Lease, UpReply), BeginError> {
        let mb = self
            .inner
            .mailboxes
            .get(account)
            .ok_or_else(|| BeginError::Token(TokenError::UnknownAccount(account.into())))?
            .clone();
        let permit = tokio::time::timeout(
            self.inner.target.timeout,
            mb.sessions.clone().acquire_owned(),
        )
        .await
        .map_err(|_| BeginError::Busy)?
        .map_err(|_| BeginError::Busy)?;
        let mut permit = Some(permit);
        // Try idle sessions first (newest first), then one new session.
        loop {
            let idle = self.take_idle(&mb);
            let reused = idle.is_some();
            let (session, token) = match idle {
                Some(i) => (i.session, i.token),
                None => self.connect(&mb).await?,
            };
            let mut lease = Lease {
                session: Some(session),
                token,
                mailbox: mb.clone(),
                _permit: permit
                    .take()
                    .expect("permit is put back before every retry"),
            };
            match lease.session().command(mail_command).await {
                Ok(r) => return Ok((lease, r)),
                Err(UpstreamError::Lost(_))
                | Err(UpstreamError::Reply(UpReply { code: 421, .. }))
                    if reused =>
                {
                    tracing::debug!(account = %mb.account, "pooled upstream session was closed while idle; replacing it");
                    let Lease { _permit, .. } = lease;
                    permit = Some(_permit);
                }
                Err(UpstreamError::Reply(r)) => {
                    // A negative MAIL reply leaves the session usable.
                    lease.release(true);
                    return Err(BeginError::Upstream(UpstreamError::Reply(r)));
                }
                Err(e) => return Err(BeginError::Upstream(e)),
            }
        }
    }

    fn take_idle(&self, mb: &Mailbox) -> Option<Idle> {
        let now = Instant::now();
        let mut idle = mb.idle();
        while let Some(i) = idle.pop() {
            if now.duration_since(i.since) < self.inner.idle_limit && i.token.is_fresh(now) {
                return Some(i);
            }
            tokio::spawn(i.session.close());
        }
        None
    }

    /// A new authenticated session with the account's current token.
    async fn connect(&self, mb: &Mailbox) -> Result<(UpstreamSession, AccessToken), BeginError> {
        let token = self
            .inner
            .tokens
            .token(&mb.account)
            .await
            .map_err(BeginError::Token)?;
        authenticate(
            &self.inner.target,
            &self.inner.tokens,
            &mb.account,
            &mb.mailbox,
            token,
        )
        .await
    }
}

/// Connects, secures and authenticates a session for `account` with `token`. A 535 5.7.3
/// (token rejected) triggers one forced refresh and one more attempt on a new connection.
/// Used by the pool and by `check`.
pub async fn authenticate(
    target: &UpstreamTarget,
    tokens: &TokenManager,
    account: &str,
    mailbox: &str,
    mut token: AccessToken,
) -> Result<(UpstreamSession, AccessToken), BeginError> {
    let mut retried = false;
    loop {
        let mut s = UpstreamSession::connect(target)
            .await
            .map_err(BeginError::Upstream)?;
        match s.auth_xoauth2(mailbox, &token.secret).await {
            Ok(_) => return Ok((s, token)),
            Err(UpstreamError::Reply(r))
                if r.code == 535 && !retried && r.text.starts_with("5.7.3") =>
            {
                tracing::info!(
                    account,
                    "upstream rejected the access token; refreshing once"
                );
                retried = true;
                tokio::spawn(s.close());
                token = tokens
                    .refresh_rejected(account, token.generation)
                    .await
                    .map_err(BeginError::Token)?;
            }
            Err(UpstreamError::Reply(r)) => {
                tokio::spawn(s.close());
                return Err(if r.code < 500 {
                    BeginError::AuthDeferred(r)
                } else {
                    BeginError::AuthRejected(r)
                });
            }
            Err(e) => return Err(BeginError::Upstream(e)),
        }
    }
}

/// Closes idle sessions past `idle_secs` or with a token due for refresh, until the pool is gone.
async fn reap(pool: Weak<PoolInner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(p) = pool.upgrade() else { return };
        let now = Instant::now();
        for mb in p.mailboxes.values() {
            let expired: Vec<Idle> = {
                let mut idle = mb.idle();
                let (keep, gone) = std::mem::take(&mut *idle).into_iter().partition(|i| {
                    now.duration_since(i.since) < p.idle_limit && i.token.is_fresh(now)
                });
                *idle = keep;
                gone
            };
            for i in expired {
                tokio::spawn(i.session.close());
            }
        }
    }
}
