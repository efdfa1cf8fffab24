//! Authenticated upstream sessions per mailbox: a concurrency cap, reuse, idle expiry.
//!
//! At most `max_sessions_per_mailbox` sessions exist per account (a semaphore permit travels
//! with each [`Lease`]). A lease goes back to the idle list only through
//! [`Lease::release`] with `clean = true`; a lease dropped any other way (an error, a
//! cancelled command) closes its session, so a half-finished command is never reused.
//! Idle sessions older than `idle_secs`, or authenticated with a token that is due for
//! refresh, are closed. A reused session that turns out to be dead when the transaction
//! starts is replaced before the client sees anything ([`Pool::begin`]).
//!
//! A configuration reload ([`Pool::reconfigure`]) gives new accounts a mailbox entry and
//! a changed mailbox or `max_sessions_per_mailbox` a fresh one; the idle sessions of removed
//! or replaced entries are closed, and a lease still out on one closes its session when it
//! comes back instead of returning it to the idle list.
//!
//! Warm sessions (`upstream.warm_sessions`, per mailbox): the newest `warm_sessions` idle
//! sessions are exempt from `idle_secs`, and a keeper round (started by the reaper's tick,
//! at most one per mailbox at a time) NOOPs each one that has been quiet for
//! [`WARM_NOOP_INTERVAL`] (or `idle_secs`, if shorter), replaces one whose token is due for
//! refresh by a session authenticated with the new token, and opens sessions while fewer
//! than `warm_sessions` exist (idle + lent). A session lent to a message counts: it comes
//! back. The cap holds because a session outside the idle list always travels with a
//! semaphore permit (the keeper takes one to NOOP or replace a session, and opens a new one
//! only while `idle + permits held <= max_sessions_per_mailbox`), and `begin` connects only
//! when the idle list is empty. A failed NOOP (EOF, 421, timeout) drops the session and the
//! same round reopens it; failures to open back off ([`WARM_RETRY_MIN`] doubling to
//! [`WARM_RETRY_MAX`]), logged once per streak.

use crate::config::Config;
use crate::oauth::manager::{AccessToken, TokenError, TokenManager};
use crate::relay::upstream::{UpReply, UpstreamError, UpstreamSession, UpstreamTarget};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How often idle sessions are checked for expiry (at most; shorter idle_secs check sooner).
/// Also how often a mailbox with warm sessions gets a keeper round.
const REAP_INTERVAL: Duration = Duration::from_secs(5);
/// A warm session quiet this long gets a NOOP (sooner if `idle_secs` is shorter). Exchange
/// Online drops an SMTP session idle for a few minutes (Exchange's receive connectors
/// default to a 5-minute `ConnectionInactivityTimeout`), and NAT gateways on the way often
/// forget a quiet TCP flow after 4 minutes (Azure's default): a minute stays well below
/// both at one small command per minute. It also bounds how long a warm session the
/// upstream closed goes unnoticed.
const WARM_NOOP_INTERVAL: Duration = Duration::from_secs(60);
/// The keeper's first wait after failing to open a warm session; doubled per failure in a
/// row, up to [`WARM_RETRY_MAX`]: no tight loop while the upstream is down or the account
/// needs login.
const WARM_RETRY_MIN: Duration = Duration::from_secs(5);
/// The longest wait between attempts to open a warm session.
const WARM_RETRY_MAX: Duration = Duration::from_secs(300);

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
    /// Last use: released by a lease, opened or NOOPed by the keeper. The list is in this
    /// order (oldest first).
    since: Instant,
}

/// Why the keeper could not open a warm session.
#[derive(Debug, thiserror::Error)]
enum WarmError {
    #[error("{0}")]
    Open(BeginError),
    /// The token provider is failing and only a token due for refresh is at hand.
    #[error("no fresh access token (the token provider is failing)")]
    NoFreshToken,
}

/// The keeper's state of one mailbox.
#[derive(Debug, Default)]
struct Keeper {
    /// A round is under way.
    running: bool,
    /// Rounds in a row that failed to open a warm session.
    failures: u32,
    /// No round before this (back-off after a failure).
    retry_at: Option<Instant>,
}

struct Mailbox {
    account: String,
    mailbox: String,
    /// `max_sessions_per_mailbox` when this entry was made.
    capacity: usize,
    sessions: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
    /// Replaced or removed by a reload: sessions coming back are closed, not kept.
    retired: AtomicBool,
    /// `upstream.warm_sessions`; a reload changes it in place.
    warm: AtomicUsize,
    keeper: Mutex<Keeper>,
}

impl Mailbox {
    fn new(account: &str, mailbox: &str, capacity: usize, warm: usize) -> Arc<Mailbox> {
        Arc::new(Mailbox {
            account: account.to_string(),
            mailbox: mailbox.to_string(),
            capacity,
            sessions: Arc::new(Semaphore::new(capacity)),
            idle: Mutex::new(Vec::new()),
            retired: AtomicBool::new(false),
            warm: AtomicUsize::new(warm),
            keeper: Mutex::new(Keeper::default()),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        crate::sync::lock(&self.idle)
    }

    fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// How many sessions to keep warm (never more than the cap).
    fn warm(&self) -> usize {
        self.warm.load(Ordering::Relaxed).min(self.capacity)
    }

    /// Sessions lent out or being opened, NOOPed or replaced (semaphore permits held).
    fn held(&self) -> usize {
        self.capacity
            .saturating_sub(self.sessions.available_permits())
    }

    /// Claims the next keeper round if one is due: warm sessions wanted, the entry in use,
    /// no round under way and no back-off pending (`slack`: half a tick, so a back-off that
    /// ends just after a tick, as it does when it starts just after one, is taken then).
    fn claim_round(&self, now: Instant, slack: Duration) -> bool {
        if self.warm() == 0 || self.is_retired() {
            return false;
        }
        let mut k = crate::sync::lock(&self.keeper);
        if k.running || k.retry_at.is_some_and(|t| now + slack < t) {
            return false;
        }
        k.running = true;
        true
    }

    /// Ends a round: a failure sets the back-off (logged at the first failure in a row),
    /// a success clears it.
    fn end_round(&self, result: Result<(), WarmError>) {
        let mut k = crate::sync::lock(&self.keeper);
        k.running = false;
        match result {
            Ok(()) => {
                if k.failures > 0 {
                    tracing::info!(account = %self.account, "warm upstream sessions open again");
                }
                k.failures = 0;
                k.retry_at = None;
            }
            Err(e) => {
                k.failures = k.failures.saturating_add(1);
                let wait = retry_delay(k.failures);
                k.retry_at = Some(Instant::now() + wait);
                if k.failures == 1 {
                    tracing::warn!(account = %self.account, error = %e, retry_in_secs = wait.as_secs(), "cannot open a warm upstream session; retrying with back-off");
                } else {
                    tracing::debug!(account = %self.account, error = %e, failures = k.failures, retry_in_secs = wait.as_secs(), "warm upstream session still cannot be opened");
                }
            }
        }
    }

    /// Puts a session the keeper opened or NOOPed at the newest end of the idle list (or
    /// closes it if the entry was retired meanwhile).
    fn keep_idle(&self, session: UpstreamSession, token: AccessToken) {
        let mut idle = self.idle();
        if self.is_retired() {
            drop(idle);
            tokio::spawn(session.close());
            return;
        }
        idle.push(Idle {
            session,
            token,
            since: Instant::now(),
        });
    }

    /// Takes out the first kept-warm session (the newest `warm`) due for a NOOP (quiet for
    /// `noop_every`) or a new token.
    fn take_due(&self, now: Instant, noop_every: Duration) -> Option<Idle> {
        let mut idle = self.idle();
        let n = idle.len();
        let i = (n.saturating_sub(self.warm())..n).find(|&i| {
            let s = &idle[i];
            !s.token.is_fresh(now) || now.duration_since(s.since) >= noop_every
        })?;
        Some(idle.remove(i))
    }

    /// Marks the entry out of use and closes its idle sessions.
    fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        for i in std::mem::take(&mut *self.idle()) {
            tokio::spawn(i.session.close());
        }
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
    /// A kept-warm session quiet this long gets a NOOP.
    noop_every: Duration,
    /// Replaced as a whole by [`Pool::reconfigure`].
    mailboxes: Mutex<HashMap<String, Arc<Mailbox>>>,
}

impl PoolInner {
    fn mailbox(&self, account: &str) -> Option<Arc<Mailbox>> {
        crate::sync::lock(&self.mailboxes).get(account).cloned()
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

/// One upstream session lent to one local transaction.
pub(crate) struct Lease {
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
    pub(crate) fn session(&mut self) -> &mut UpstreamSession {
        self.session
            .as_mut()
            .expect("a lease holds its session until release or drop")
    }

    /// Returns the session to the pool if `clean` (no transaction open, nothing broken, token
    /// still fresh); otherwise closes it.
    pub(crate) fn release(mut self, clean: bool) {
        let Some(session) = self.session.take() else {
            return;
        };
        if clean
            && !session.is_broken()
            && self.token.is_fresh(Instant::now())
            && !self.mailbox.retired.load(Ordering::Relaxed)
        {
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
                    Mailbox::new(
                        &a.username,
                        &a.mailbox,
                        config.upstream.max_sessions_per_mailbox,
                        config.upstream.warm_sessions,
                    ),
                )
            })
            .collect();
        let pool = Pool {
            inner: Arc::new(PoolInner {
                target,
                tokens,
                idle_limit: config.upstream.idle,
                noop_every: WARM_NOOP_INTERVAL.min(config.upstream.idle),
                mailboxes: Mutex::new(mailboxes),
            }),
        };
        let weak = Arc::downgrade(&pool.inner);
        let every = REAP_INTERVAL.min(config.upstream.idle);
        tokio::spawn(reap(weak, every));
        pool
    }

    /// Sessions currently idle for `account` (for tests and metrics).
    pub fn idle_sessions(&self, account: &str) -> usize {
        self.inner.mailbox(account).map_or(0, |m| m.idle().len())
    }

    /// Sessions lent to transactions now for `account` (for metrics).
    pub fn busy_sessions(&self, account: &str) -> usize {
        self.inner.mailbox(account).map_or(0, |m| {
            m.capacity.saturating_sub(m.sessions.available_permits())
        })
    }

    /// Failed keeper rounds in a row for `account` (tests).
    #[cfg(test)]
    fn warm_failures(&self, account: &str) -> u32 {
        self.inner
            .mailbox(account)
            .map_or(0, |m| crate::sync::lock(&m.keeper).failures)
    }

    /// Follows a reloaded configuration: new accounts get a mailbox entry; an account whose
    /// mailbox or `max_sessions_per_mailbox` changed gets a fresh one; removed and replaced
    /// entries are retired (idle sessions, warm ones included, closed; leases still out
    /// close theirs on return). A changed `warm_sessions` applies to the entry in place
    /// from the next keeper round (sessions no longer kept warm expire after `idle_secs`).
    /// Transactions in flight keep the entry they started with.
    pub(crate) fn reconfigure(&self, config: &Config) {
        let capacity = config.upstream.max_sessions_per_mailbox;
        let warm = config.upstream.warm_sessions;
        let mut map = crate::sync::lock(&self.inner.mailboxes);
        let mut next = HashMap::new();
        for a in &config.accounts {
            let entry = match map.remove(&a.username) {
                Some(mb) if mb.mailbox == a.mailbox && mb.capacity == capacity => {
                    mb.warm.store(warm, Ordering::Relaxed);
                    mb
                }
                old => {
                    if let Some(old) = old {
                        old.retire();
                    }
                    Mailbox::new(&a.username, &a.mailbox, capacity, warm)
                }
            };
            next.insert(a.username.clone(), entry);
        }
        for (_, gone) in map.drain() {
            gone.retire();
        }
        *map = next;
    }

    /// [`Pool::begin_envelope`] without recipients.
    #[cfg(test)]
    pub(crate) async fn begin(
        &self,
        account: &str,
        mail_command: &str,
    ) -> Result<(Lease, UpReply), BeginError> {
        let (lease, reply, _) = self.begin_envelope(account, mail_command, &[]).await?;
        Ok((lease, reply))
    }

    /// Takes a session for `account` and sends `MAIL FROM` on it, and the `RCPT TO` lines
    /// `rcpt_commands` (in the same flight where the upstream pipelines). The MAIL reply and
    /// each RCPT's verdict. A reused session that fails before answering MAIL (closed by
    /// the server while idle) is replaced by a new one.
    pub(crate) async fn begin_envelope(
        &self,
        account: &str,
        mail_command: &str,
        rcpt_commands: &[String],
    ) -> Result<(Lease, UpReply, Vec<Result<UpReply, UpstreamError>>), BeginError> {
        let mb = self
            .inner
            .mailbox(account)
            .ok_or_else(|| BeginError::Token(TokenError::UnknownAccount(account.into())))?;
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
            match lease.session().envelope(mail_command, rcpt_commands).await {
                Ok((r, verdicts)) => return Ok((lease, r, verdicts)),
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

    /// The newest usable idle session: token fresh, and quiet for less than `idle_secs`
    /// unless it is one of the newest `warm_sessions` (kept alive by the keeper's NOOPs).
    /// Unusable ones on the way are closed.
    fn take_idle(&self, mb: &Mailbox) -> Option<Idle> {
        let now = Instant::now();
        let mut kept_warm = mb.warm();
        let mut idle = mb.idle();
        while let Some(i) = idle.pop() {
            let warm = kept_warm > 0;
            kept_warm = kept_warm.saturating_sub(1);
            if (warm || now.duration_since(i.since) < self.inner.idle_limit)
                && i.token.is_fresh(now)
            {
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

/// Until the pool is gone: closes idle sessions past `idle_secs` or with a token due for
/// refresh, and starts the keeper rounds of mailboxes with warm sessions. The newest
/// `warm_sessions` idle sessions are exempt from `idle_secs`, and from the token check
/// when a keeper round starts now (it replaces them: new session first).
async fn reap(pool: Weak<PoolInner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(p) = pool.upgrade() else { return };
        let now = Instant::now();
        let mailboxes: Vec<Arc<Mailbox>> =
            crate::sync::lock(&p.mailboxes).values().cloned().collect();
        for mb in mailboxes {
            let keeping = mb.claim_round(now, every / 2);
            if keeping {
                tokio::spawn(keep(p.clone(), mb.clone()));
            }
            let warm = mb.warm();
            let expired: Vec<Idle> = {
                let mut idle = mb.idle();
                let n = idle.len();
                let mut keep = Vec::with_capacity(n);
                let mut gone = Vec::new();
                for (pos, i) in std::mem::take(&mut *idle).into_iter().enumerate() {
                    let kept_warm = pos + warm >= n;
                    let young = now.duration_since(i.since) < p.idle_limit;
                    let fresh = i.token.is_fresh(now);
                    if (young || kept_warm) && (fresh || (kept_warm && keeping)) {
                        keep.push(i);
                    } else {
                        gone.push(i);
                    }
                }
                *idle = keep;
                gone
            };
            for i in expired {
                tokio::spawn(i.session.close());
            }
        }
    }
}

/// The wait before the next keeper round after `failures` failed ones in a row.
fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    WARM_RETRY_MIN
        .saturating_mul(1 << doublings)
        .min(WARM_RETRY_MAX)
}

/// One keeper round of `mb`; see the module doc.
async fn keep(p: Arc<PoolInner>, mb: Arc<Mailbox>) {
    let result = keep_round(&p, &mb).await;
    mb.end_round(result);
}

async fn keep_round(p: &PoolInner, mb: &Arc<Mailbox>) -> Result<(), WarmError> {
    // Upkeep of the sessions kept warm. Each is taken out of the idle list under a permit,
    // so that `begin` never counts on it nor opens one more in its place beyond the cap.
    for _ in 0..mb.warm() {
        if mb.is_retired() {
            return Ok(());
        }
        let Ok(permit) = mb.sessions.clone().try_acquire_owned() else {
            // Every permit is out: the warm sessions are in use or about to be.
            break;
        };
        let now = Instant::now();
        let Some(due) = mb.take_due(now, p.noop_every) else {
            break;
        };
        if due.token.is_fresh(now) {
            let Idle {
                mut session, token, ..
            } = due;
            match session.command("NOOP").await {
                Ok(_) => mb.keep_idle(session, token),
                Err(e) => {
                    tracing::debug!(account = %mb.account, error = %e, "warm upstream session failed its NOOP; reopening it");
                    if !session.is_broken() {
                        tokio::spawn(session.close());
                    }
                }
            }
            drop(permit);
        } else {
            replace(p, mb, due, permit).await?;
        }
    }
    // Open sessions while fewer than `warm` exist (idle + lent; our permit not counted).
    // With warm <= capacity this also keeps idle + permits held <= capacity.
    loop {
        if mb.is_retired() {
            return Ok(());
        }
        let Ok(permit) = mb.sessions.clone().try_acquire_owned() else {
            return Ok(());
        };
        let open = mb.idle().len() + mb.held().saturating_sub(1);
        if open >= mb.warm() {
            return Ok(());
        }
        let (session, token) = open_warm(p, mb).await?;
        mb.keep_idle(session, token);
        drop(permit);
    }
}

/// Replaces kept-warm `old`, whose token is due for refresh (it is out of the idle list
/// under `permit`), by a session authenticated with the refreshed token: the new one first
/// if a second permit keeps the total within the cap, else the old one is closed first.
async fn replace(
    p: &PoolInner,
    mb: &Arc<Mailbox>,
    old: Idle,
    permit: OwnedSemaphorePermit,
) -> Result<(), WarmError> {
    let second = mb
        .sessions
        .clone()
        .try_acquire_owned()
        .ok()
        .filter(|_| mb.idle().len() <= mb.sessions.available_permits());
    let opened = if second.is_some() {
        let opened = open_warm(p, mb).await;
        old.session.close().await;
        opened
    } else {
        old.session.close().await;
        open_warm(p, mb).await
    };
    let (session, token) = opened?;
    tracing::debug!(account = %mb.account, "warm upstream session re-authenticated with a refreshed token");
    mb.keep_idle(session, token);
    drop((second, permit));
    Ok(())
}

/// A new session for the keeper, authenticated with a fresh token.
async fn open_warm(
    p: &PoolInner,
    mb: &Mailbox,
) -> Result<(UpstreamSession, AccessToken), WarmError> {
    let token = p
        .tokens
        .token(&mb.account)
        .await
        .map_err(|e| WarmError::Open(BeginError::Token(e)))?;
    if !token.is_fresh(Instant::now()) {
        return Err(WarmError::NoFreshToken);
    }
    authenticate(&p.target, &p.tokens, &mb.account, &mb.mailbox, token)
        .await
        .map_err(WarmError::Open)
}

#[cfg(test)]
pub(crate) mod tests {
    //! The pool against testkit's fake upstream and token endpoint, with the waiting done
    //! in paused time.
    //!
    //! The fakes run on real loopback sockets in the test's current-thread runtime. Paused
    //! time auto-advances to the next timer whenever the runtime is idle, and tokio does so
    //! even while a loopback read is about to become ready (the fakes do not set TCP_NODELAY,
    //! so a reply can wait a delayed ACK): under `start_paused` a transaction's 5 s timeouts
    //! fire in the middle of it. So socket I/O runs in real time, and the minutes between
    //! transactions are skipped with `pause()` + [`skip`] (`advance` in 1 ms steps, so
    //! every timer on the way fires in order, at its virtual instant) + `resume()`. A test
    //! whose waiting involves no socket runs paused throughout.
    use super::*;
    use testkit::{FakeTokenEndpoint, FakeUpstream, FakeUpstreamOptions, TestCa, TokenOptions};
    use tokio::net::TcpListener;

    pub(crate) const ACCOUNT: &str = "u";
    pub(crate) const MAILBOX: &str = "u@example.com";
    const MAIL: &str = "MAIL FROM:<u@example.com>";

    /// The fakes and a configuration (through the real loader) pointing at them.
    pub(crate) struct Remote {
        pub(crate) _dir: tempfile::TempDir,
        pub(crate) tokens: FakeTokenEndpoint,
        pub(crate) upstream: FakeUpstream,
        pub(crate) config: Config,
    }

    /// Fakes on 127.0.0.1:0; tokens live `lifetime`; `upstream` and `extra` are TOML lines
    /// added to `[upstream]` and to the end of the file. The upstream timeout is 5 s.
    pub(crate) async fn remote(lifetime: Duration, upstream: &str, extra: &str) -> Remote {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new();
        ca.write_ca_pem(&dir.path().join("ca.pem"))
            .expect("CA file");
        let bind = || TcpListener::bind("127.0.0.1:0");
        let tokens = FakeTokenEndpoint::start(
            bind().await.expect("bind"),
            TokenOptions {
                lifetime,
                ..TokenOptions::default()
            },
        )
        .await;
        let (cert, key) = ca.issue_server_cert();
        let mut uo = FakeUpstreamOptions::new(cert, key);
        uo.tokens = Some(tokens.clone());
        uo.mailbox_ok = Some(vec![MAILBOX.to_string()]);
        let fake = FakeUpstream::start(bind().await.expect("bind"), uo).await;
        let toml = format!(
            "[upstream]\nhost = \"127.0.0.1\"\nport = {port}\nca_file = \"ca.pem\"\ntimeout_secs = 5\n{upstream}\n[state]\ndir = \"state\"\n\n[[account]]\nusername = \"{ACCOUNT}\"\npassword_env = \"PW\"\nmailbox = \"{MAILBOX}\"\n[account.oauth]\nflow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"test-client\"\nclient_secret_env = \"SECRET\"\ntoken_url = \"{url}\"\n{extra}\n",
            port = fake.addr().port(),
            url = tokens.token_url(),
        );
        let env = |k: &str| match k {
            "PW" => Some("local-pw".to_string()),
            "SECRET" => Some("test-secret".to_string()),
            _ => None,
        };
        let config = Config::from_toml(&toml, "t.toml", dir.path(), &env).expect("test config");
        Remote {
            _dir: dir,
            tokens,
            upstream: fake,
            config,
        }
    }

    /// Moves paused time on by `d` in 1 ms steps (the timer resolution): every timer due on
    /// the way fires at its instant, in order, and the tasks it wakes run before the next
    /// step.
    pub(crate) async fn skip(d: Duration) {
        skip_by(d, Duration::from_millis(1)).await;
    }

    /// [`skip`] in coarser steps, for long waits where no timer's exact instant matters:
    /// a timer on the way fires at most `step` late.
    pub(crate) async fn skip_by(d: Duration, step: Duration) {
        let end = Instant::now() + d;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            tokio::time::advance(left.min(step)).await;
        }
    }

    /// Waits in real time (at most 10 s) until `done` holds.
    pub(crate) async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..2_000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn pool(r: &Remote) -> Pool {
        let tokens = TokenManager::new(&r.config).expect("token manager");
        let target = UpstreamTarget::new(&r.config.upstream).expect("target");
        Pool::new(&r.config, target, tokens)
    }

    /// One whole message on a lease; the session goes back to the pool clean.
    async fn send_one(pool: &Pool) {
        let (mut lease, r) = pool.begin(ACCOUNT, MAIL).await.expect("begin");
        assert_eq!(r.code, 250);
        let s = lease.session();
        assert_eq!(
            s.command("RCPT TO:<x@example.org>").await.unwrap().code,
            250
        );
        assert_eq!(s.command("DATA").await.unwrap().code, 354);
        assert_eq!(s.body(b"Subject: t\r\n\r\nhi\r\n").await.unwrap().code, 250);
        lease.release(true);
    }

    fn count(up: &FakeUpstream, line: &str) -> usize {
        up.log().iter().filter(|l| l.ends_with(line)).count()
    }

    fn sessions(up: &FakeUpstream) -> Vec<u64> {
        up.received().iter().map(|m| m.session).collect()
    }

    #[tokio::test]
    async fn a_released_clean_session_is_reused() {
        let r = remote(Duration::from_secs(3600), "", "").await;
        let pool = pool(&r);
        send_one(&pool).await;
        assert_eq!(pool.idle_sessions(ACCOUNT), 1);
        assert_eq!(pool.busy_sessions(ACCOUNT), 0);
        send_one(&pool).await;
        assert_eq!(sessions(&r.upstream), [1, 1]);
        assert_eq!(r.upstream.connections(), 1);
        assert_eq!(r.upstream.auth_attempts(), 1);
        assert_eq!(r.tokens.requests(), 1);
        assert_eq!(count(&r.upstream, &format!("S1 {MAIL}")), 2);
        assert_eq!(count(&r.upstream, "QUIT"), 0);
        assert_eq!(pool.idle_sessions(ACCOUNT), 1);
    }

    #[tokio::test]
    async fn idle_sessions_expire_after_idle_secs_with_quit() {
        let r = remote(Duration::from_secs(3600), "idle_secs = 10", "").await;
        let pool = pool(&r);
        send_one(&pool).await;
        tokio::time::pause();
        // Kept until idle_secs...
        skip(Duration::from_millis(9_900)).await;
        assert_eq!(pool.idle_sessions(ACCOUNT), 1);
        // ...and closed by the reaper (every min(5 s, idle_secs)) within one more round.
        skip(REAP_INTERVAL + Duration::from_millis(200)).await;
        assert_eq!(pool.idle_sessions(ACCOUNT), 0);
        tokio::time::resume();
        until("QUIT on session 1", || count(&r.upstream, "S1 QUIT") == 1).await;
        // The next transaction needs a new connection.
        send_one(&pool).await;
        assert_eq!(r.upstream.connections(), 2);
        assert_eq!(sessions(&r.upstream), [1, 2]);
    }

    #[tokio::test]
    async fn a_session_past_idle_secs_is_not_taken_even_before_the_reaper_sees_it() {
        let r = remote(Duration::from_secs(3600), "idle_secs = 10", "").await;
        let pool = pool(&r);
        // The reaper ticks every 5 s from the pool's start; releasing 2 s later puts its
        // rounds at 8 s and 13 s of the session's idle time.
        tokio::time::pause();
        skip(Duration::from_secs(2)).await;
        tokio::time::resume();
        send_one(&pool).await;
        tokio::time::pause();
        skip(Duration::from_millis(10_050)).await;
        assert_eq!(
            pool.idle_sessions(ACCOUNT),
            1,
            "still listed, past idle_secs"
        );
        tokio::time::resume();
        send_one(&pool).await;
        assert_eq!(sessions(&r.upstream), [1, 2]);
        until("QUIT on session 1", || count(&r.upstream, "S1 QUIT") == 1).await;
    }

    #[tokio::test]
    async fn at_most_max_sessions_then_busy_after_the_upstream_timeout() {
        let r = remote(
            Duration::from_secs(3600),
            "max_sessions_per_mailbox = 3",
            "",
        )
        .await;
        let pool = pool(&r);
        let mut leases = Vec::new();
        for _ in 0..3 {
            leases.push(pool.begin(ACCOUNT, MAIL).await.expect("begin").0);
        }
        assert_eq!(pool.busy_sessions(ACCOUNT), 3);
        assert_eq!(r.upstream.open_sessions(), 3);

        // A 4th waits (no socket is touched: fully paused) for the upstream timeout, 5 s,
        // then gives up without connecting.
        tokio::time::pause();
        let started = Instant::now();
        let e = pool.begin(ACCOUNT, MAIL).await.unwrap_err();
        assert!(matches!(e, BeginError::Busy), "{e:?}");
        // (Timers round up to the next millisecond.)
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(5) && waited <= Duration::from_millis(5_001),
            "{waited:?}"
        );
        assert_eq!(r.upstream.connections(), 3);

        // A 4th that is waiting gets the session one of the three hands back.
        let p = pool.clone();
        let started = Instant::now();
        let waiting = tokio::spawn(async move {
            let r = p.begin(ACCOUNT, MAIL).await;
            (r.map(|(l, _)| l), started.elapsed())
        });
        skip(Duration::from_secs(2)).await;
        assert!(!waiting.is_finished());
        tokio::time::resume();
        let mut first = leases.remove(0);
        assert_eq!(first.session().command("RSET").await.unwrap().code, 250);
        first.release(true);
        let (lease, waited) = waiting.await.unwrap();
        let lease = lease.expect("the freed session");
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert_eq!(r.upstream.connections(), 3);
        assert_eq!(r.upstream.peak_sessions(), 3);
        assert_eq!(pool.busy_sessions(ACCOUNT), 3);
        drop((lease, leases));
        assert_eq!(pool.busy_sessions(ACCOUNT), 0);
    }

    #[tokio::test]
    async fn a_session_whose_token_is_no_longer_fresh_is_not_reused() {
        // 40 s tokens are due for refresh from 30 s on (a quarter of the lifetime before
        // expiry); idle_secs is far away.
        let r = remote(Duration::from_secs(40), "idle_secs = 600", "").await;
        let tokens = TokenManager::new(&r.config).expect("token manager");
        let fetched = Instant::now();
        tokens.token(ACCOUNT).await.expect("token");
        // The pool (and its reaper, every 5 s from now) starts 2 s into the token's life,
        // so the reaper looks at 27 s and 32 s: at 30.5 s only `begin` can notice.
        tokio::time::pause();
        skip(Duration::from_secs(2)).await;
        tokio::time::resume();
        let target = UpstreamTarget::new(&r.config.upstream).expect("target");
        let pool = Pool::new(&r.config, target, tokens);
        send_one(&pool).await;
        let first_token = r.upstream.received()[0].auth_token.clone();
        tokio::time::pause();
        skip((fetched + Duration::from_secs(29)).saturating_duration_since(Instant::now())).await;
        assert_eq!(pool.idle_sessions(ACCOUNT), 1);
        skip(Duration::from_millis(1_500)).await;
        // Past refresh_at, before the reaper's next round: still listed, but not taken.
        assert_eq!(pool.idle_sessions(ACCOUNT), 1);
        tokio::time::resume();
        send_one(&pool).await;
        let got = r.upstream.received();
        assert_eq!(sessions(&r.upstream), [1, 2]);
        assert_ne!(
            got[1].auth_token, first_token,
            "a new token for the new session"
        );
        assert_eq!(r.tokens.requests(), 2);
        until("QUIT on session 1", || count(&r.upstream, "S1 QUIT") == 1).await;
    }

    #[tokio::test]
    async fn the_reaper_closes_a_session_whose_token_went_stale() {
        let r = remote(Duration::from_secs(40), "idle_secs = 600", "").await;
        let pool = pool(&r);
        send_one(&pool).await;
        tokio::time::pause();
        skip(Duration::from_secs(29)).await;
        assert_eq!(pool.idle_sessions(ACCOUNT), 1);
        skip(Duration::from_secs(1) + REAP_INTERVAL).await;
        assert_eq!(pool.idle_sessions(ACCOUNT), 0);
        tokio::time::resume();
        until("QUIT on session 1", || count(&r.upstream, "S1 QUIT") == 1).await;
    }

    #[tokio::test]
    async fn a_session_handed_back_after_its_token_went_stale_is_closed() {
        let r = remote(Duration::from_secs(40), "idle_secs = 600", "").await;
        let pool = pool(&r);
        let (mut lease, _) = pool.begin(ACCOUNT, MAIL).await.expect("begin");
        tokio::time::pause();
        skip(Duration::from_secs(31)).await;
        tokio::time::resume();
        assert_eq!(lease.session().command("RSET").await.unwrap().code, 250);
        lease.release(true);
        assert_eq!(pool.idle_sessions(ACCOUNT), 0);
        until("QUIT on session 1", || count(&r.upstream, "S1 QUIT") == 1).await;
        send_one(&pool).await;
        assert_eq!(r.upstream.connections(), 2);
    }

    // ---- warm sessions ----

    /// Moves paused time on to `at` (in 1 ms steps) and resumes real time, so that the I/O
    /// a timer at `at` starts runs in real time (see the module doc).
    async fn skip_to_then_resume(at: Instant) {
        tokio::time::pause();
        skip(at.saturating_duration_since(Instant::now())).await;
        tokio::time::resume();
    }

    fn position(up: &FakeUpstream, what: impl Fn(&str) -> bool) -> usize {
        up.log()
            .iter()
            .position(|l| what(l))
            .unwrap_or_else(|| panic!("not in the upstream log: {:?}", up.log()))
    }

    #[tokio::test]
    async fn no_warm_sessions_by_default() {
        let r = remote(Duration::from_secs(3600), "idle_secs = 1", "").await;
        let _pool = pool(&r);
        // Several reaper rounds (every second), in real time.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert_eq!(r.upstream.connections(), 0);
        assert_eq!(r.tokens.requests(), 0);
    }

    #[tokio::test]
    async fn one_warm_session_opens_at_start_and_is_kept_past_idle_secs_with_noop() {
        let r = remote(
            Duration::from_secs(3600),
            "idle_secs = 12\nwarm_sessions = 1",
            "",
        )
        .await;
        let t0 = Instant::now();
        let pool = pool(&r);
        until("the warm session", || pool.idle_sessions(ACCOUNT) == 1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(r.upstream.connections(), 1, "exactly one, without traffic");
        assert_eq!(r.upstream.auth_attempts(), 1);
        assert_eq!(r.upstream.open_sessions(), 1);
        assert_eq!(count(&r.upstream, "S1 NOOP"), 0);
        // Quiet for idle_secs (12 s, also the NOOP interval here): not closed; the reaper's
        // round at 15 s NOOPs it.
        skip_to_then_resume(t0 + Duration::from_millis(14_900)).await;
        assert_eq!(pool.idle_sessions(ACCOUNT), 1);
        assert_eq!(count(&r.upstream, "S1 NOOP"), 0);
        skip_to_then_resume(t0 + Duration::from_millis(15_050)).await;
        until("a NOOP", || count(&r.upstream, "S1 NOOP") == 1).await;
        until("back in the pool", || pool.idle_sessions(ACCOUNT) == 1).await;
        assert_eq!(count(&r.upstream, "QUIT"), 0);
        // The next message uses it: no handshake.
        send_one(&pool).await;
        assert_eq!(sessions(&r.upstream), [1]);
        assert_eq!(r.upstream.connections(), 1);
        assert_eq!(r.upstream.auth_attempts(), 1);
    }

    #[tokio::test]
    async fn a_warm_session_closed_by_the_upstream_is_replaced_before_the_next_message() {
        let r = remote(
            Duration::from_secs(3600),
            "idle_secs = 12\nwarm_sessions = 1",
            "",
        )
        .await;
        let t0 = Instant::now();
        let pool = pool(&r);
        until("the warm session", || pool.idle_sessions(ACCOUNT) == 1).await;
        r.upstream.close_idle_sessions();
        until("the upstream closed it", || r.upstream.open_sessions() == 0).await;
        // The NOOP at the round at 15 s finds it closed; the same round opens another.
        skip_to_then_resume(t0 + Duration::from_millis(15_050)).await;
        until("a new warm session", || {
            r.upstream.connections() == 2 && pool.idle_sessions(ACCOUNT) == 1
        })
        .await;
        let (connections, auths) = (r.upstream.connections(), r.upstream.auth_attempts());
        assert_eq!(auths, 2);
        send_one(&pool).await;
        assert_eq!(r.upstream.connections(), connections, "no new connection");
        assert_eq!(r.upstream.auth_attempts(), auths, "no new AUTH");
        assert_eq!(sessions(&r.upstream), [2]);
        assert_eq!(pool.warm_failures(ACCOUNT), 0);
    }

    /// 40 s tokens are due for refresh from 30 s on. The token is fetched 2.5 s before the
    /// pool starts, so the reaper's rounds fall at 27.5 s and 32.5 s of its life.
    async fn reauth_before_expiry(cap: usize) -> (Remote, Pool) {
        let r = remote(
            Duration::from_secs(40),
            &format!("idle_secs = 600\nwarm_sessions = 1\nmax_sessions_per_mailbox = {cap}"),
            "",
        )
        .await;
        let tokens = TokenManager::new(&r.config).expect("token manager");
        let fetched = Instant::now();
        tokens.token(ACCOUNT).await.expect("token");
        skip_to_then_resume(fetched + Duration::from_millis(2_500)).await;
        let target = UpstreamTarget::new(&r.config.upstream).expect("target");
        let pool = Pool::new(&r.config, target, tokens);
        until("the warm session", || pool.idle_sessions(ACCOUNT) == 1).await;
        send_one(&pool).await;
        let first = r.upstream.received()[0].auth_token.clone();
        skip_to_then_resume(fetched + Duration::from_millis(32_400)).await;
        assert_eq!(r.upstream.auth_attempts(), 1, "not yet");
        assert_eq!(r.tokens.requests(), 1);
        skip_to_then_resume(fetched + Duration::from_millis(32_550)).await;
        until("the re-authenticated session", || {
            r.upstream.auth_attempts() == 2
                && count(&r.upstream, "S1 QUIT") == 1
                && pool.idle_sessions(ACCOUNT) == 1
        })
        .await;
        // Well before the first token's expiry at 40 s.
        assert!(
            fetched.elapsed() < Duration::from_secs(36),
            "{:?}",
            fetched.elapsed()
        );
        assert_eq!(r.tokens.requests(), 2);
        // The message after it goes on the new session, with the new token, no handshake.
        send_one(&pool).await;
        let got = r.upstream.received();
        assert_eq!(sessions(&r.upstream), [1, 2]);
        assert_ne!(got[1].auth_token, first, "a new token");
        assert!(r.tokens.is_valid(&got[1].auth_token));
        assert_eq!(r.upstream.connections(), 2);
        assert_eq!(r.upstream.auth_attempts(), 2);
        (r, pool)
    }

    #[tokio::test]
    async fn a_warm_session_is_reauthenticated_before_its_token_expires_new_one_first() {
        let (r, _pool) = reauth_before_expiry(3).await;
        let auth2 = position(&r.upstream, |l| l.starts_with("S2 AUTH"));
        let quit1 = position(&r.upstream, |l| l == "S1 QUIT");
        assert!(
            auth2 < quit1,
            "the new session first: {:?}",
            r.upstream.log()
        );
        assert_eq!(r.upstream.peak_sessions(), 2);
    }

    #[tokio::test]
    async fn at_the_cap_the_old_warm_session_is_closed_before_the_new_one_opens() {
        let (r, _pool) = reauth_before_expiry(1).await;
        let auth2 = position(&r.upstream, |l| l.starts_with("S2 AUTH"));
        let quit1 = position(&r.upstream, |l| l == "S1 QUIT");
        assert!(
            quit1 < auth2,
            "the old session first: {:?}",
            r.upstream.log()
        );
        assert_eq!(r.upstream.peak_sessions(), 1);
    }

    #[tokio::test]
    async fn warm_sessions_count_the_ones_lent_out() {
        let r = remote(
            Duration::from_secs(3600),
            "idle_secs = 1\nwarm_sessions = 2\nmax_sessions_per_mailbox = 3",
            "",
        )
        .await;
        let pool = pool(&r);
        until("two warm sessions", || pool.idle_sessions(ACCOUNT) == 2).await;
        let (a, _) = pool.begin(ACCOUNT, MAIL).await.expect("begin");
        let (b, _) = pool.begin(ACCOUNT, MAIL).await.expect("begin");
        assert_eq!(pool.busy_sessions(ACCOUNT), 2);
        // Rounds pass (every second): two sessions exist, none is opened.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert_eq!(r.upstream.connections(), 2);
        assert_eq!(pool.idle_sessions(ACCOUNT), 0);
        // One comes back broken (dropped): the keeper opens one in its place.
        drop(a);
        until("a replacement", || {
            r.upstream.connections() == 3 && pool.idle_sessions(ACCOUNT) == 1
        })
        .await;
        drop(b);
        until("another", || {
            r.upstream.connections() == 4 && pool.idle_sessions(ACCOUNT) == 2
        })
        .await;
        assert!(r.upstream.peak_sessions() <= 3);
    }

    #[tokio::test]
    async fn warm_sessions_never_exceed_the_cap_under_load() {
        let r = remote(
            Duration::from_secs(3600),
            "idle_secs = 1\nwarm_sessions = 2\nmax_sessions_per_mailbox = 3",
            "",
        )
        .await;
        let pool = pool(&r);
        until("two warm sessions", || pool.idle_sessions(ACCOUNT) == 2).await;
        for _ in 0..3 {
            let burst: Vec<_> = (0..10)
                .map(|_| {
                    let p = pool.clone();
                    tokio::spawn(async move { send_one(&p).await })
                })
                .collect();
            for t in burst {
                t.await.expect("message");
            }
            // The upstream drops the idle ones; the keeper (NOOP every second) notices and
            // reopens while the next burst competes for the same three slots.
            r.upstream.close_idle_sessions();
            tokio::time::sleep(Duration::from_millis(1_100)).await;
        }
        assert_eq!(r.upstream.received().len(), 30);
        assert!(r.upstream.connections() > 3, "the keeper reopened sessions");
        assert!(
            r.upstream.peak_sessions() <= 3,
            "peak {}",
            r.upstream.peak_sessions()
        );
        until("warm again", || pool.idle_sessions(ACCOUNT) >= 2).await;
        assert!(r.upstream.peak_sessions() <= 3);
    }

    #[tokio::test]
    async fn opening_warm_sessions_backs_off_while_the_upstream_is_down() {
        let r = remote(Duration::from_secs(3600), "warm_sessions = 1", "").await;
        r.upstream.pause();
        let t0 = Instant::now();
        let pool = pool(&r);
        until("a first attempt", || pool.warm_failures(ACCOUNT) == 1).await;
        assert_eq!(r.upstream.connections(), 1);
        // Back-off 5 s: the next round at 5 s, then 10 s: none at 10 s, one at 15 s.
        skip_to_then_resume(t0 + Duration::from_millis(4_900)).await;
        assert_eq!(r.upstream.connections(), 1, "no tight loop");
        skip_to_then_resume(t0 + Duration::from_millis(5_050)).await;
        until("a second attempt", || pool.warm_failures(ACCOUNT) == 2).await;
        assert_eq!(r.upstream.connections(), 2);
        skip_to_then_resume(t0 + Duration::from_millis(14_900)).await;
        assert_eq!(r.upstream.connections(), 2, "the back-off doubled");
        r.upstream.resume();
        skip_to_then_resume(t0 + Duration::from_millis(15_050)).await;
        until("warm again", || pool.idle_sessions(ACCOUNT) == 1).await;
        assert_eq!(pool.warm_failures(ACCOUNT), 0);
        assert_eq!(r.upstream.connections(), 3);
    }

    #[test]
    fn the_retry_delay_doubles_up_to_its_bound() {
        let secs: Vec<u64> = (1..=9).map(|f| retry_delay(f).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(retry_delay(u32::MAX), WARM_RETRY_MAX);
    }

    #[tokio::test]
    async fn an_account_that_needs_login_gets_no_warm_session_and_no_loop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new();
        ca.write_ca_pem(&dir.path().join("ca.pem"))
            .expect("CA file");
        let r = remote(Duration::from_secs(3600), "", "").await;
        // A delegated account with no stored refresh token: it needs `login`.
        let toml = format!(
            "[upstream]\nhost = \"127.0.0.1\"\nport = {port}\nca_file = \"ca.pem\"\ntimeout_secs = 5\nwarm_sessions = 1\n[state]\ndir = \"state\"\n\n[[account]]\nusername = \"{ACCOUNT}\"\npassword_env = \"PW\"\nmailbox = \"{MAILBOX}\"\n[account.oauth]\nflow = \"authorization_code\"\ntenant = \"t\"\nclient_id = \"test-client\"\ntoken_url = \"{url}\"\n",
            port = r.upstream.addr().port(),
            url = r.tokens.token_url(),
        );
        let env = |k: &str| (k == "PW").then(|| "local-pw".to_string());
        let config = Config::from_toml(&toml, "t.toml", dir.path(), &env).expect("config");
        tokio::time::pause();
        let tokens = TokenManager::new(&config).expect("token manager");
        let target = UpstreamTarget::new(&config.upstream).expect("target");
        let pool = Pool::new(&config, target, tokens);
        // Ten minutes: rounds at 0, 5, 15, 35, 75, 155, 315 s and then every 300 s at most.
        skip_by(Duration::from_secs(600), Duration::from_millis(100)).await;
        let failures = pool.warm_failures(ACCOUNT);
        assert!((6..=8).contains(&failures), "{failures} attempts");
        assert_eq!(pool.idle_sessions(ACCOUNT), 0);
        assert_eq!(r.upstream.connections(), 0);
        assert_eq!(r.tokens.requests(), 0);
    }

    #[tokio::test]
    async fn reload_follows_warm_sessions_and_retired_mailboxes_close_theirs() {
        let r = remote(
            Duration::from_secs(3600),
            "idle_secs = 1\nwarm_sessions = 1",
            "",
        )
        .await;
        let pool = pool(&r);
        until("one warm session", || pool.idle_sessions(ACCOUNT) == 1).await;
        let mut config = r.config.clone();
        config.upstream.warm_sessions = 2;
        pool.reconfigure(&config);
        until("two", || {
            pool.idle_sessions(ACCOUNT) == 2 && r.upstream.connections() == 2
        })
        .await;
        // Down to none: they expire after idle_secs like any idle session.
        config.upstream.warm_sessions = 0;
        pool.reconfigure(&config);
        until("none", || {
            pool.idle_sessions(ACCOUNT) == 0 && count(&r.upstream, "QUIT") == 2
        })
        .await;
        config.upstream.warm_sessions = 1;
        pool.reconfigure(&config);
        until("one again", || {
            pool.idle_sessions(ACCOUNT) == 1 && r.upstream.connections() == 3
        })
        .await;
        // The account goes: its warm session is closed and not reopened.
        config.accounts.clear();
        pool.reconfigure(&config);
        until("closed", || count(&r.upstream, "S3 QUIT") == 1).await;
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert_eq!(r.upstream.connections(), 3);
        assert_eq!(r.upstream.open_sessions(), 0);
    }
}
