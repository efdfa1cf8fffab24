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

use crate::config::Config;
use crate::oauth::manager::{AccessToken, TokenError, TokenManager};
use crate::relay::upstream::{UpReply, UpstreamError, UpstreamSession, UpstreamTarget};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// `max_sessions_per_mailbox` when this entry was made.
    capacity: usize,
    sessions: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
    /// Replaced or removed by a reload: sessions coming back are closed, not kept.
    retired: AtomicBool,
}

impl Mailbox {
    fn new(account: &str, mailbox: &str, capacity: usize) -> Arc<Mailbox> {
        Arc::new(Mailbox {
            account: account.to_string(),
            mailbox: mailbox.to_string(),
            capacity,
            sessions: Arc::new(Semaphore::new(capacity)),
            idle: Mutex::new(Vec::new()),
            retired: AtomicBool::new(false),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        crate::sync::lock(&self.idle)
    }

    /// Marks the entry out of use and closes its idle sessions.
    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
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
                    ),
                )
            })
            .collect();
        let pool = Pool {
            inner: Arc::new(PoolInner {
                target,
                tokens,
                idle_limit: config.upstream.idle,
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

    /// Follows a reloaded configuration: new accounts get a mailbox entry; an account whose
    /// mailbox or `max_sessions_per_mailbox` changed gets a fresh one; removed and replaced
    /// entries are retired (idle sessions closed; leases still out close theirs on return).
    /// Transactions in flight keep the entry they started with.
    pub(crate) fn reconfigure(&self, config: &Config) {
        let capacity = config.upstream.max_sessions_per_mailbox;
        let mut map = crate::sync::lock(&self.inner.mailboxes);
        let mut next = HashMap::new();
        for a in &config.accounts {
            let entry = match map.remove(&a.username) {
                Some(mb) if mb.mailbox == a.mailbox && mb.capacity == capacity => mb,
                old => {
                    if let Some(old) = old {
                        old.retire();
                    }
                    Mailbox::new(&a.username, &a.mailbox, capacity)
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
        let mailboxes: Vec<Arc<Mailbox>> =
            crate::sync::lock(&p.mailboxes).values().cloned().collect();
        for mb in mailboxes {
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
}
