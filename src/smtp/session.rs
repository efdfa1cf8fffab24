//! One local SMTP connection: the command state machine, and nothing else.
//!
//! It reads lines through `framing`, decodes AUTH with `sasl`, verifies with `auth`, asks
//! `policy` who may send what, parses MAIL/RCPT into typed envelope values
//! (`relay::envelope`), and drives the upstream only through `relay::transport`. In sync
//! mode the upstream transaction is opened at the first RCPT (MAIL is checked locally and
//! answered 250, so a mailbox's few sessions are not held across the client's round trip),
//! each RCPT is forwarded live, the content streams upstream piece by piece as it arrives,
//! and DATA is answered only after the upstream answered it. In spool mode the content
//! streams into the spool file and is stored durably before 250. A message is never held
//! whole in memory. Every reply that depends on the upstream comes from `relay::outcome`.
//! Accepting connections and TLS are `listener`'s.

use crate::config::Account;
use crate::metrics::Metrics;
use crate::oauth::manager::{AccountStatus, TokenManager};
use crate::relay::deliver::{Pacers, Queue};
use crate::relay::envelope::{self, Address, EnvelopeError, MailFrom};
use crate::relay::outcome;
use crate::relay::spool::{Envelope, SpoolError, SPOOL_VERSION};
use crate::relay::transport::{Transaction, Transport};
use crate::relay::upstream::UpstreamError;
use crate::reply::Reply;
use crate::secret::Secret;
use crate::smtp::auth::{LocalAuth, Verdict};
use crate::smtp::framing::{sanitize, trim_crlf, DataIn, Framed, Line, Piece, Stop, DATA_READ};
use crate::smtp::policy::{self, RelayNetworks, Via};
use crate::smtp::reply;
use crate::smtp::sasl::{self, SaslError};
use crate::telemetry::{self, Outcome, RelayEvent};
use smtp_proto::{Request, AUTH_LOGIN, AUTH_PLAIN};
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long we wait for the next command (RFC 5321 4.5.3.2: at least 5 minutes).
#[cfg(test)]
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// RCPT commands a transaction may try, as a multiple of `max_recipients` (refused ones
/// included: a few typos are fine, an address-probing loop is not).
const MAX_RCPT_ATTEMPTS_FACTOR: usize = 2;
/// Failed AUTH attempts per connection before it is closed with 421.
pub(crate) const MAX_AUTH_FAILURES: u32 = 5;
/// The longest the failed-AUTH delay grows to.
const MAX_AUTH_FAILURE_DELAY: Duration = Duration::from_secs(5);
/// After the first failed AUTH of a connection the client waits this long for the 535.
pub(crate) const AUTH_FAILURE_DELAY: Duration = Duration::from_millis(250);

/// Everything a session needs that outlives it.
#[derive(Debug, Clone)]
pub(crate) struct SessionContext {
    pub hostname: String,
    pub auth: LocalAuth,
    pub transport: Transport,
    pub tokens: TokenManager,
    pub max_message_bytes: usize,
    pub max_recipients: usize,
    pub require_tls_for_auth: bool,
    pub starttls_available: bool,
    pub shutdown: CancellationToken,
    /// Fires when the shutdown grace period is over: sessions still busy get 421.
    pub hard_stop: CancellationToken,
    pub command_timeout: Duration,
    pub session_timeout: Duration,
    /// How long a transaction may hold an upstream session before DATA (`upstream.timeout_secs`):
    /// one of a mailbox's few sessions must not be kept by a client that dawdles (or NOOPs).
    pub upstream_hold: Duration,
    /// Delay before answering the first failed AUTH of a connection; doubles with each.
    pub auth_failure_delay: Duration,
    /// Spool mode: accept after fsync and deliver in the background.
    pub queue: Option<Arc<Queue>>,
    /// Per-account send rate (held in spool mode, reported in sync mode).
    pub pacers: Arc<Pacers>,
    pub messages_per_minute: u32,
    pub metrics: Arc<Metrics>,
    /// Clients from these networks may send without AUTH, as the network's account.
    pub relay_networks: RelayNetworks,
}

/// How a session ended.
#[derive(Debug)]
pub(crate) enum End<S> {
    Closed,
    /// The client asked for STARTTLS and got 220: upgrade `S` and start a new session.
    StartTls(S),
}

/// Where a transaction stands with the upstream.
enum Upstream {
    /// Spool mode: the upstream is the deliverer's business.
    Spool,
    /// Sync mode, before the first RCPT: no upstream transaction yet.
    Waiting,
    /// Sync mode: an upstream transaction, MAIL accepted.
    Ready(Box<Transaction>),
    /// Sync mode: no transaction, MAIL refused, or the transaction broke; every later RCPT
    /// and DATA get this reply.
    Failed(Reply),
}

struct Txn {
    id: String,
    upstream: Upstream,
    /// The last temporary RCPT refusal: DATA without recipients answers with it (4xx, so
    /// the client retries), not with a permanent "no valid recipients".
    transient: Option<Reply>,
    mail: MailFrom,
    rcpts: Vec<Address>,
    started: Instant,
    /// Since when this transaction holds an upstream session (sync mode, from the first RCPT).
    held_since: Option<Instant>,
    /// RCPT commands tried, accepted or not: each may cost an upstream round trip, so a
    /// client cannot probe addresses without end ([`MAX_RCPT_ATTEMPTS_FACTOR`]).
    rcpt_attempts: usize,
}

impl Txn {
    /// When the upstream session this transaction holds must be given back, if it holds one.
    fn hold_deadline(&self, hold: Duration) -> Option<Instant> {
        match self.upstream {
            Upstream::Ready(_) => self.held_since.map(|t| t + hold),
            _ => None,
        }
    }

    fn rcpt_strings(&self) -> Vec<String> {
        self.rcpts.iter().map(ToString::to_string).collect()
    }
}

/// What the command loop does next.
enum Flow {
    Continue,
    Quit,
    StartTls,
}

/// The per-connection state machine.
pub(crate) struct Session<'a, S> {
    ctx: &'a SessionContext,
    io: Framed<S>,
    peer: SocketAddr,
    tls: bool,
    helo: Option<String>,
    user: Option<Arc<Account>>,
    /// The account of the `[[relay_network]]` the client is in: used when it did not AUTH.
    network: Option<Arc<Account>>,
    txn: Option<Txn>,
    auth_failures: u32,
    started: Instant,
}

impl<S> std::fmt::Debug for Session<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("peer", &self.peer)
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|a| &a.username))
            .finish_non_exhaustive()
    }
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Session<'a, S> {
    pub fn new(ctx: &'a SessionContext, io: S, peer: SocketAddr, tls: bool) -> Self {
        Session {
            ctx,
            io: Framed::new(io, ctx.hard_stop.clone()),
            peer,
            tls,
            helo: None,
            user: None,
            network: ctx.relay_networks.account_for(peer.ip()),
            txn: None,
            auth_failures: 0,
            started: Instant::now(),
        }
    }

    fn reply(&mut self, r: &Reply) {
        self.io.reply(r);
    }

    /// Who the client sends as: the account it authenticated as (AUTH wins), else its relay
    /// network's account.
    fn sender(&self) -> Option<(&Arc<Account>, Via)> {
        match (&self.user, &self.network) {
            (Some(a), _) => Some((a, Via::Auth)),
            (None, Some(a)) => Some((a, Via::Network)),
            (None, None) => None,
        }
    }

    fn account_name(&self) -> &str {
        self.sender().map_or("", |(a, _)| a.username.as_str())
    }

    /// The next command line; between transactions a shutdown ends the session politely.
    async fn next_line(&mut self, idle: bool) -> Result<Option<Line>, Stop> {
        let shutdown = (idle && self.txn.is_none()).then(|| self.ctx.shutdown.clone());
        self.io
            .next_line(self.ctx.command_timeout, shutdown.as_ref())
            .await
    }

    /// The next command line of the command loop. While a transaction holds an upstream
    /// session, waiting for the client is bounded by [`SessionContext::upstream_hold`]: when
    /// it runs out, the upstream session is given back and the transaction fails with 451
    /// (a partial line stays buffered; the client's own command timeout still applies).
    async fn next_command_line(&mut self) -> Result<Option<Line>, Stop> {
        let hold = self.ctx.upstream_hold;
        loop {
            let Some(deadline) = self.txn.as_ref().and_then(|t| t.hold_deadline(hold)) else {
                return self.next_line(true).await;
            };
            let now = Instant::now();
            let wait = deadline.saturating_duration_since(now);
            if wait < self.ctx.command_timeout {
                if wait.is_zero() {
                    self.release_held_upstream().await;
                    continue;
                }
                match self.io.next_line(wait, None).await {
                    Err(Stop::TimedOut) => {
                        self.release_held_upstream().await;
                        continue;
                    }
                    r => return r,
                }
            }
            return self.next_line(true).await;
        }
    }

    /// The transaction kept its upstream session too long: RSET it back to the pool; the
    /// client's next RCPT or DATA gets 451 4.4.2 and it starts again with MAIL.
    async fn release_held_upstream(&mut self) {
        let Some(txn) = self.txn.as_mut() else { return };
        let previous = std::mem::replace(&mut txn.upstream, Upstream::Failed(reply::HELD_TOO_LONG));
        if let Upstream::Ready(t) = previous {
            tracing::info!(peer = %self.peer, id = %txn.id, held_secs = self.ctx.upstream_hold.as_secs(), "transaction held its upstream session too long before DATA; released");
            t.abort().await;
        }
    }

    /// Runs the session until QUIT, EOF, an I/O error, or STARTTLS.
    pub(crate) async fn run(mut self, greet: bool) -> End<S> {
        if greet {
            let greeting = format!(
                "220 {} ESMTP smtp-oauth-bridge ready\r\n",
                self.ctx.hostname
            );
            self.io.raw(greeting.as_bytes());
        }
        let end = self.serve().await;
        if let Some(txn) = self.txn.take() {
            abort_txn(txn).await;
        }
        let last = match &end {
            Ok(Flow::StartTls) => {
                let _ = self.io.flush().await;
                return End::StartTls(self.io.into_inner());
            }
            Ok(_) | Err(Stop::Eof) => None,
            Err(Stop::AuthFailures) => Some(&reply::TOO_MANY_AUTH_FAILURES),
            Err(Stop::GraceOver) => {
                self.io.clear_output();
                Some(&reply::SHUTTING_DOWN)
            }
            Err(Stop::Shutdown) => Some(&reply::SHUTTING_DOWN),
            Err(Stop::TimedOut) => Some(&reply::IDLE_TIMEOUT),
            Err(Stop::Io(e)) => {
                tracing::debug!(peer = %self.peer, error = %e, "connection failed");
                None
            }
        };
        if let Some(r) = last {
            self.reply(r);
        }
        if let Err(stop) = &end {
            tracing::debug!(peer = %self.peer, reason = ?stop, "session ended");
        }
        self.io.close().await;
        End::Closed
    }

    async fn serve(&mut self) -> Result<Flow, Stop> {
        loop {
            // Checked inside a transaction too (run() aborts the open one).
            if self.started.elapsed() >= self.ctx.session_timeout {
                self.reply(&reply::SESSION_TOO_LONG);
                return Ok(Flow::Quit);
            }
            let line = match self.next_command_line().await? {
                None => return Err(Stop::Eof),
                Some(Line::TooLong) => {
                    self.reply(&reply::LINE_TOO_LONG);
                    continue;
                }
                Some(Line::Ok(l)) => l,
            };
            // A NUL or a CR inside a command line is never legitimate (and a way to make two
            // parsers disagree); the line is refused as a whole.
            let text = trim_crlf(&line);
            if text.iter().any(|b| *b == 0 || *b == b'\r') {
                self.reply(&reply::BAD_COMMAND_BYTES);
                continue;
            }
            let cmd = match envelope_verb(text) {
                Some((Verb::Mail, args)) => Command::Mail(args.to_vec()),
                Some((Verb::Rcpt, args)) => Command::Rcpt(args.to_vec()),
                None => match Request::parse(&mut line.iter()).map(Request::into_owned) {
                    Ok(req) => Command::Other(req),
                    Err(e) => {
                        let r = parse_error_reply(&e, &line);
                        self.reply(&r);
                        continue;
                    }
                },
            };
            let flow = self.command_until_hard_stop(cmd).await?;
            match flow {
                Flow::Continue => {}
                end => return Ok(end),
            }
        }
    }

    /// A command may wait on the upstream; past the grace period it is abandoned (its
    /// upstream transaction closed) and the client gets 421.
    async fn command_until_hard_stop(&mut self, cmd: Command) -> Result<Flow, Stop> {
        let stop = self.ctx.hard_stop.clone();
        tokio::select! {
            // Polled first, so a command that notices the stop itself (DATA logs it) does.
            biased;
            r = self.command(cmd) => r,
            _ = stop.cancelled() => Err(Stop::GraceOver),
        }
    }

    async fn command(&mut self, cmd: Command) -> Result<Flow, Stop> {
        let req = match cmd {
            Command::Mail(args) => {
                self.mail(&args);
                return Ok(Flow::Continue);
            }
            Command::Rcpt(args) => {
                self.rcpt(&args).await;
                return Ok(Flow::Continue);
            }
            Command::Other(req) => req,
        };
        match req {
            Request::Ehlo { host } => {
                self.reset().await;
                self.ehlo(&host);
            }
            Request::Helo { host } => {
                self.reset().await;
                let text = format!("250 {} Hello {}\r\n", self.ctx.hostname, sanitize(&host));
                self.io.raw(text.as_bytes());
                self.helo = Some(host);
            }
            Request::Lhlo { .. } => self.reply(&reply::UNKNOWN_COMMAND),
            Request::StartTls => {
                if self.tls {
                    self.reply(&reply::TLS_ALREADY);
                } else if !self.ctx.starttls_available {
                    self.reply(&reply::TLS_UNAVAILABLE);
                } else {
                    self.reset().await;
                    self.reply(&reply::READY_TLS);
                    // Anything pipelined after STARTTLS is discarded (no command injection).
                    self.io.discard_input();
                    return Ok(Flow::StartTls);
                }
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => {
                if let Some(r) = self.auth(mechanism, initial_response).await? {
                    self.reply(&r);
                }
            }
            // `envelope_verb` hands every MAIL and RCPT line to `relay::envelope`; a line
            // smtp-proto still reads as one had no space after the verb.
            Request::Mail { .. } => self.reply(&reply::SYNTAX_SENDER),
            Request::Rcpt { .. } => self.reply(&reply::SYNTAX_RECIPIENT),
            Request::Data => self.data().await?,
            Request::Bdat { .. } => self.reply(&reply::NOT_IMPLEMENTED),
            Request::Rset => {
                self.reset().await;
                self.reply(&reply::RESET_OK);
            }
            Request::Noop { .. } => self.reply(&reply::OK),
            Request::Vrfy { .. } => self.reply(&reply::VRFY),
            Request::Help { .. } => self.reply(&reply::HELP),
            Request::Quit => {
                self.reset().await;
                self.reply(&reply::BYE);
                return Ok(Flow::Quit);
            }
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.reply(&reply::NOT_IMPLEMENTED),
        }
        Ok(Flow::Continue)
    }

    fn auth_offered(&self) -> bool {
        self.tls || !self.ctx.require_tls_for_auth
    }

    fn ehlo(&mut self, host: &str) {
        let mut lines = vec![
            format!("{} Hello {}", self.ctx.hostname, sanitize(host)),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.ctx.max_message_bytes),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
        ];
        if self.auth_offered() && self.user.is_none() {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        if self.ctx.starttls_available && !self.tls {
            lines.push("STARTTLS".to_string());
        }
        lines.push("HELP".to_string());
        let last = lines.len() - 1;
        for (i, l) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            self.io.raw(format!("250{sep}{l}\r\n").as_bytes());
        }
        self.helo = Some(host.to_string());
    }

    /// Ends the current transaction, if any, and returns its upstream session to the pool.
    async fn reset(&mut self) {
        if let Some(txn) = self.txn.take() {
            abort_txn(txn).await;
        }
    }

    /// Sends a 334 challenge and reads the client's response line; `None` at EOF.
    async fn auth_line(&mut self, prompt: &str) -> Result<Option<String>, Stop> {
        self.io.raw(format!("334 {prompt}\r\n").as_bytes());
        Ok(match self.next_line(false).await? {
            None => None,
            Some(Line::TooLong) => Some(String::new()),
            Some(Line::Ok(l)) => Some(String::from_utf8_lossy(trim_crlf(&l)).into_owned()),
        })
    }

    /// The AUTH dialogue and its verdict; `None` when the connection ended during it.
    async fn auth(&mut self, mechanism: u64, initial: String) -> Result<Option<Reply>, Stop> {
        if self.helo.is_none() {
            return Ok(Some(reply::BAD_SEQUENCE_HELO));
        }
        if self.user.is_some() {
            return Ok(Some(reply::AUTH_ALREADY));
        }
        if !self.auth_offered() {
            return Ok(Some(reply::TLS_REQUIRED));
        }
        if self.txn.is_some() {
            return Ok(Some(reply::BAD_SEQUENCE_NESTED_MAIL));
        }
        let decoded = if mechanism == AUTH_PLAIN {
            let response = if initial.is_empty() {
                match self.auth_line("").await? {
                    None => return Ok(None),
                    Some(l) => Secret::new(l),
                }
            } else {
                Secret::new(initial)
            };
            sasl::plain(response.expose())
        } else if mechanism == AUTH_LOGIN {
            let user = if initial.is_empty() || initial == "=" {
                match self.auth_line("VXNlcm5hbWU6").await? {
                    None => return Ok(None),
                    Some(l) => l,
                }
            } else {
                initial
            };
            match sasl::decode(&user) {
                Err(e) => Err(e),
                Ok(user) => match self.auth_line("UGFzc3dvcmQ6").await? {
                    None => return Ok(None),
                    Some(l) => {
                        let line = Secret::new(l);
                        sasl::decode(line.expose()).map(|pw| (user.expose().to_string(), pw))
                    }
                },
            }
        } else {
            return Ok(Some(reply::AUTH_MECH));
        };
        let (user, pass) = match decoded {
            Ok(v) => v,
            Err(SaslError::Cancelled) => return Ok(Some(reply::AUTH_CANCELLED)),
            Err(SaslError::BadBase64) => return Ok(Some(reply::AUTH_BAD_BASE64)),
            Err(SaslError::AuthzidMismatch) => return Ok(Some(reply::AUTHZID_REFUSED)),
        };
        let account = match self.ctx.auth.verify(self.peer.ip(), &user, pass).await {
            Verdict::Ok(account) => account,
            Verdict::Busy => {
                // Not the client's fault, so not counted as a failure; but it waits like one,
                // so retrying at once cannot spin (or flood the log).
                tracing::debug!(peer = %self.peer, "too many password checks waiting; AUTH deferred");
                return self.after_failure(reply::AUTH_BUSY).await;
            }
            Verdict::Throttled => {
                self.ctx.metrics.auth_failed();
                tracing::warn!(peer = %self.peer, user = %sanitize(&user), "too many failed AUTHs from this address; not checked");
                self.auth_failures += 1;
                return self.after_failure(reply::AUTH_THROTTLED).await;
            }
            Verdict::Denied => {
                self.ctx.metrics.auth_failed();
                self.auth_failures += 1;
                tracing::warn!(peer = %self.peer, user = %sanitize(&user), failures = self.auth_failures, "local authentication failed");
                return self.after_failure(reply::AUTH_FAILED).await;
            }
        };
        if let Some(AccountStatus::NeedsLogin(_)) = self.ctx.tokens.status(&account.username) {
            tracing::warn!(peer = %self.peer, account = %account.username, "authenticated, but the account needs login");
            return Ok(Some(outcome::needs_login(&account.username)));
        }
        tracing::debug!(peer = %self.peer, account = %account.username, "local client authenticated");
        self.user = Some(account);
        Ok(Some(reply::AUTH_OK))
    }

    /// Slows down guessing: each failure on this connection waits longer before its reply
    /// (the delay only ever holds back the failing client); too many end the connection.
    async fn after_failure(&mut self, r: Reply) -> Result<Option<Reply>, Stop> {
        let delay = self
            .ctx
            .auth_failure_delay
            .saturating_mul(1 << self.auth_failures.saturating_sub(1).min(8))
            .min(MAX_AUTH_FAILURE_DELAY);
        tokio::time::sleep(delay).await;
        if self.auth_failures >= MAX_AUTH_FAILURES {
            return Err(Stop::AuthFailures);
        }
        Ok(Some(r))
    }

    fn mail(&mut self, args: &[u8]) {
        let Some((account, via)) = self.sender().map(|(a, v)| (a.clone(), v)) else {
            return self.reply(&reply::AUTH_REQUIRED);
        };
        if self.txn.is_some() {
            return self.reply(&reply::BAD_SEQUENCE_NESTED_MAIL);
        }
        if via == Via::Network {
            // AUTH checks this for an authenticated client; a network's client is checked here.
            if let Some(AccountStatus::NeedsLogin(_)) = self.ctx.tokens.status(&account.username) {
                tracing::warn!(peer = %self.peer, account = %account.username, "relay network's account needs login");
                return self.reply(&outcome::needs_login(&account.username));
            }
        }
        let mail = match envelope::parse_mail_args(args) {
            Ok(m) => m,
            Err(e) => return self.reply(&envelope_error_reply(&e, true)),
        };
        if mail.params.size > self.ctx.max_message_bytes {
            return self.reply(&reply::TOO_BIG);
        }
        if let Some(queue) = &self.ctx.queue {
            if !queue.has_room(mail.params.size) {
                tracing::warn!(peer = %self.peer, size = mail.params.size, "spool full (queue.max_bytes); MAIL refused");
                return self.reply(&reply::SPOOL_FULL);
            }
        }
        if !policy::sender_allowed(&account, &mail.from) {
            tracing::warn!(peer = %self.peer, account = %account.username, from = %sanitize(&mail.from.to_string()), "sender not in allowed_from");
            return self.reply(&reply::NOT_ALLOWED_FROM);
        }
        // Sync mode: the upstream transaction is opened when the first RCPT arrives, so a
        // session of the mailbox (Microsoft 365 allows 3) is not held across the client's
        // round trip, and the upstream's verdict on the sender comes back at that RCPT.
        let upstream = if self.ctx.queue.is_some() {
            Upstream::Spool
        } else {
            Upstream::Waiting
        };
        self.txn = Some(Txn {
            id: telemetry::new_message_id(),
            upstream,
            transient: None,
            mail,
            rcpts: Vec::new(),
            started: Instant::now(),
            held_since: None,
            rcpt_attempts: 0,
        });
        self.reply(&reply::SENDER_OK);
    }

    async fn rcpt(&mut self, args: &[u8]) {
        let max = self.ctx.max_recipients;
        let account = self.account_name().to_string();
        let Some(txn) = self.txn.as_mut() else {
            return self.reply(&reply::BAD_SEQUENCE_MAIL);
        };
        if txn.rcpts.len() >= max
            || txn.rcpt_attempts >= max.saturating_mul(MAX_RCPT_ATTEMPTS_FACTOR)
        {
            return self.reply(&reply::TOO_MANY_RECIPIENTS);
        }
        txn.rcpt_attempts += 1;
        let to = match envelope::parse_rcpt_args(args, txn.mail.params.smtputf8) {
            Ok(a) => a,
            Err(e) => return self.reply(&envelope_error_reply(&e, false)),
        };
        // Refused here, before anything goes upstream (in sync mode not even the transaction).
        let refused = match (&self.user, &self.network) {
            (Some(a), _) | (None, Some(a)) => !policy::recipient_allowed(a, &to),
            (None, None) => false,
        };
        if refused {
            tracing::warn!(peer = %self.peer, account = %account, to = %sanitize(&to.to_string()), "recipient not in allowed_rcpt");
            return self.reply(&reply::NOT_ALLOWED_RCPT);
        }
        let (reply, next) = match std::mem::replace(&mut txn.upstream, Upstream::Waiting) {
            Upstream::Spool => {
                // Recipients are checked by the upstream at delivery.
                txn.rcpts.push(to);
                (reply::RECIPIENT_OK, Upstream::Spool)
            }
            Upstream::Failed(r) => (r.clone(), Upstream::Failed(r)),
            Upstream::Ready(t) => forward_rcpt(t, to, &mut txn.rcpts).await,
            Upstream::Waiting => {
                // MAIL and this first RCPT go together (one flight where the upstream
                // pipelines); a refused MAIL is this RCPT's reply.
                let m = &txn.mail;
                let result = self
                    .ctx
                    .transport
                    .begin(
                        &account,
                        &m.from,
                        &m.params,
                        Some(m.params.size),
                        std::slice::from_ref(&to),
                    )
                    .await;
                let r = outcome::mail_reply(result.as_ref().map(|(_, r, _)| r));
                match result {
                    Ok((t, _, mut verdicts)) if r.is_positive() => {
                        let verdict = verdicts.pop().unwrap_or_else(|| {
                            Err(UpstreamError::Lost("no verdict on the recipient".into()))
                        });
                        rcpt_verdict(Box::new(t), to, verdict, &mut txn.rcpts)
                    }
                    Ok((t, _, _)) => {
                        t.finish().await;
                        (r.clone(), Upstream::Failed(r))
                    }
                    Err(_) => {
                        tracing::warn!(peer = %self.peer, account = %account, reply = %r, "could not start an upstream transaction");
                        (r.clone(), Upstream::Failed(r))
                    }
                }
            }
        };
        if matches!(next, Upstream::Ready(_)) && txn.held_since.is_none() {
            txn.held_since = Some(Instant::now());
        }
        txn.upstream = next;
        if !reply.is_positive() && reply.code < 500 {
            txn.transient = Some(reply.clone());
        }
        self.reply(&reply);
    }

    async fn data(&mut self) -> Result<(), Stop> {
        let Some(txn) = self.txn.as_mut() else {
            self.reply(&reply::BAD_SEQUENCE_MAIL);
            return Ok(());
        };
        let refusal = match (&txn.upstream, &txn.transient) {
            (Upstream::Failed(r), _) => Some(r.clone()),
            _ if !txn.rcpts.is_empty() => None,
            (_, Some(r)) => Some(r.clone()),
            _ => Some(reply::NO_VALID_RECIPIENTS),
        };
        if let Some(r) = refusal {
            // The transaction is over; the client starts again with MAIL.
            self.reset().await;
            self.reply(&r);
            return Ok(());
        }
        let upstream = match std::mem::replace(&mut txn.upstream, Upstream::Spool) {
            Upstream::Ready(t) => Some(*t),
            _ => None,
        };
        self.reply(&reply::START_DATA);
        let rx = DataIn::new(self.ctx.max_message_bytes);
        // Any failure from here on (EOF, timeout, hard stop) drops the upstream transaction
        // with its connection, mid-DATA: the upstream never sees a final dot.
        match upstream {
            Some(t) => self.data_sync(t, rx).await,
            None => self.data_spool(rx).await,
        }
    }

    /// The content was too big: the rest is read away, the client gets 552.
    async fn too_big(&mut self, rx: &mut DataIn) -> Result<(), Stop> {
        self.io.discard_data(rx).await?;
        if let Some(txn) = self.txn.take() {
            let limit = self.ctx.max_message_bytes;
            let why = format!("message exceeds listen.max_message_bytes ({limit})");
            self.log_relay(&txn, 0, Outcome::Rejected, 0, &why);
        }
        self.reply(&reply::TOO_BIG);
        Ok(())
    }

    /// Sync mode: each piece of content goes upstream as it arrives; the upstream's final
    /// reply is the client's. DATA goes upstream while the client starts sending.
    async fn data_sync(&mut self, mut t: Transaction, mut rx: DataIn) -> Result<(), Stop> {
        let (started, flushed) = tokio::join!(t.start_data(), self.io.flush());
        flushed?;
        let mut upstream = Some(t);
        // The upstream refused DATA or broke: the rest is read away and this is the answer.
        let mut failure = started.err();
        // Double-buffered: the piece read last goes upstream while the next one is read from
        // the client, so neither side waits for the other (a large message moves at the pace
        // of the slower side, not of both added up).
        let mut out = Vec::with_capacity(2 * DATA_READ);
        let mut sending = Vec::with_capacity(2 * DATA_READ);
        let mut unsent = false;
        let mut bytes = 0usize;
        while failure.is_none() {
            out.clear();
            let (piece, sent) = match upstream.as_mut() {
                Some(t) if unsent => {
                    let (piece, sent) =
                        tokio::join!(self.io.read_data(&mut rx, &mut out), t.send_chunk(&sending));
                    (piece, Some(sent))
                }
                _ => (self.io.read_data(&mut rx, &mut out).await, None),
            };
            if let Some(Err(e)) = sent {
                failure = Some(e);
                if let Some(t) = upstream.take() {
                    t.abandon();
                }
            }
            let piece = piece?;
            if piece == Piece::TooBig {
                // Never a final dot for it: the upstream connection is dropped.
                if let Some(t) = upstream.take() {
                    t.abandon();
                }
                return self.too_big(&mut rx).await;
            }
            bytes += out.len();
            std::mem::swap(&mut out, &mut sending);
            unsent = true;
            if piece == Piece::End {
                break;
            }
        }
        if let (true, None, Some(t)) = (unsent, &failure, upstream.as_mut()) {
            if let Err(e) = t.send_chunk(&sending).await {
                failure = Some(e);
                if let Some(t) = upstream.take() {
                    t.abandon();
                }
            }
        }
        if failure.is_some() && !rx.is_done() {
            self.io.discard_data(&mut rx).await?;
        }
        let Some(txn) = self.txn.take() else {
            return Ok(());
        };
        let result = match (failure, upstream.as_mut()) {
            (Some(e), _) => Err(e),
            (None, None) => Err(UpstreamError::Lost("upstream transaction gone".into())),
            (None, Some(t)) => {
                let stop = self.ctx.hard_stop.clone();
                tokio::select! {
                    r = t.finish_content() => r,
                    _ = stop.cancelled() => {
                        // The grace period is over; the upstream's answer will not come in time.
                        drop(upstream);
                        self.log_relay(&txn, bytes, Outcome::Deferred, 0, "shut down before the upstream answered");
                        return Err(Stop::GraceOver);
                    }
                }
            }
        };
        let (reply, outcome) = outcome::data_reply(&result, &txn.id);
        let (code, text) = match &result {
            Ok(r) => (r.code, Cow::Borrowed(r.text.as_str())),
            Err(UpstreamError::Reply(r)) => (r.code, Cow::Borrowed(r.text.as_str())),
            Err(e) => (0, Cow::Owned(e.to_string())),
        };
        // Graph: the HTTP status that decided it (SPEC: the relay log's upstream_code).
        let code = upstream
            .as_ref()
            .and_then(Transaction::upstream_status)
            .unwrap_or(code);
        self.log_relay(&txn, bytes, outcome, code, &text);
        // After any final DATA reply the upstream session is idle again, unless it broke.
        if let Some(t) = upstream {
            t.finish().await;
        }
        if result.is_ok() {
            self.note_rate();
        }
        self.reply(&reply);
        Ok(())
    }

    /// Spool mode: the content goes to the spool file as it arrives; fsync'd and renamed
    /// before 250, the disk work off the runtime's worker threads (`spool::SpoolSink`). A full spool (`queue.max_bytes`) or a storage failure is 452 4.3.1 and
    /// nothing is kept.
    async fn data_spool(&mut self, mut rx: DataIn) -> Result<(), Stop> {
        let Some(txn) = self.txn.as_ref() else {
            self.reply(&reply::INTERNAL);
            return Ok(());
        };
        let env = Envelope {
            version: SPOOL_VERSION,
            id: txn.id.clone(),
            account: self.account_name().to_string(),
            from: txn.mail.from.to_string(),
            params: txn.mail.params.stored(),
            rcpts: txn.rcpt_strings(),
            received_at: crate::clock::unix_now(),
            bytes: 0,
        };
        let mut writer = match &self.ctx.queue {
            Some(queue) => queue.create(&env),
            // Unreachable by construction (sync mode always has an upstream transaction
            // here); never leave the client without a reply.
            None => Err(SpoolError::NotSpooling),
        };
        let mut out = Vec::with_capacity(2 * DATA_READ);
        while writer.is_ok() {
            out.clear();
            let piece = self.io.read_data(&mut rx, &mut out).await?;
            if piece == Piece::TooBig {
                // Dropping the writer removes its temporary file.
                drop(writer);
                return self.too_big(&mut rx).await;
            }
            if let Ok(w) = writer.as_mut() {
                if let Err(e) = w.write(&out).await {
                    writer = Err(e);
                }
            }
            if piece == Piece::End {
                break;
            }
        }
        if writer.is_err() && !rx.is_done() {
            self.io.discard_data(&mut rx).await?;
        }
        let Some(txn) = self.txn.take() else {
            return Ok(());
        };
        let stored = match (writer, &self.ctx.queue) {
            (Ok(w), Some(queue)) => queue.commit(w, env).await,
            (Ok(_), None) => Err(SpoolError::NotSpooling),
            (Err(e), _) => Err(e),
        };
        match stored {
            Ok(bytes) => {
                self.log_relay(&txn, bytes, Outcome::Spooled, 0, "");
                self.reply(&Reply::new(
                    250,
                    "2.0.0",
                    format!("{} queued for delivery", txn.id),
                ));
            }
            Err(SpoolError::NotSpooling) => self.reply(&reply::INTERNAL),
            Err(e) => {
                match &e {
                    SpoolError::Full { .. } => {
                        tracing::warn!(id = %txn.id, error = %e, "spool full; message refused");
                    }
                    _ => {
                        tracing::error!(id = %txn.id, error = %e, "cannot write the message to the spool");
                    }
                }
                self.reply(&reply::SPOOL_FULL);
            }
        }
        Ok(())
    }

    /// Sync mode cannot hold messages back: exceeding the rate is reported instead.
    fn note_rate(&self) {
        let (Some((user, _)), limit) = (self.sender(), self.ctx.messages_per_minute) else {
            return;
        };
        let Some(pacer) = self.ctx.pacers.get(&user.username) else {
            return;
        };
        let n = pacer.note();
        if limit > 0 && n == limit as usize + 1 {
            tracing::warn!(account = %user.username, limit, "more than upstream.messages_per_minute messages in the last minute; Microsoft 365 may throttle this mailbox (spool mode would pace them)");
        }
    }

    fn log_relay(&self, txn: &Txn, bytes: usize, outcome: Outcome, code: u16, reply: &str) {
        self.ctx.metrics.record(&RelayEvent {
            id: &txn.id,
            account: self.account_name(),
            from: &txn.mail.from.to_string(),
            rcpts: &txn.rcpt_strings(),
            bytes,
            outcome,
            upstream_code: code,
            upstream_reply: reply,
            ms: txn.started.elapsed().as_millis() as u64,
            via: self.sender().map(|(_, v)| v),
        });
    }
}

/// A command line, sorted: MAIL and RCPT are parsed by `relay::envelope` from the client's
/// own bytes; everything else by smtp-proto.
enum Command {
    Mail(Vec<u8>),
    Rcpt(Vec<u8>),
    Other(Request<String>),
}

enum Verb {
    Mail,
    Rcpt,
}

/// `MAIL <args>` / `RCPT <args>` (verb case-insensitive) -> the arguments.
fn envelope_verb(line: &[u8]) -> Option<(Verb, &[u8])> {
    let verb = line.get(..4)?;
    let verb = if verb.eq_ignore_ascii_case(b"MAIL") {
        Verb::Mail
    } else if verb.eq_ignore_ascii_case(b"RCPT") {
        Verb::Rcpt
    } else {
        return None;
    };
    match line.get(4) {
        Some(b' ') => Some((verb, &line[5..])),
        _ => None,
    }
}

fn envelope_error_reply(e: &EnvelopeError, sender: bool) -> Reply {
    match e {
        EnvelopeError::Syntax | EnvelopeError::TooLong if sender => reply::SYNTAX_SENDER,
        EnvelopeError::Syntax | EnvelopeError::TooLong => reply::SYNTAX_RECIPIENT,
        EnvelopeError::NeedsUtf8 => reply::NEEDS_SMTPUTF8,
        EnvelopeError::UnsupportedParameter(p) => reply::parameter(p),
        EnvelopeError::InvalidParameter(p) => {
            Reply::new(501, "5.5.4", format!("Invalid parameter {p}"))
        }
    }
}

/// Sends one RCPT on an open transaction: the local reply, and where the transaction stands
/// after it. An accepted recipient joins `rcpts`.
async fn forward_rcpt(
    mut t: Box<Transaction>,
    to: Address,
    rcpts: &mut Vec<Address>,
) -> (Reply, Upstream) {
    let r = t.rcpt(&to).await;
    rcpt_verdict(t, to, r, rcpts)
}

/// The upstream's verdict `r` on recipient `to` of an open transaction: the local reply, and
/// where the transaction stands after it. An accepted recipient joins `rcpts`.
fn rcpt_verdict(
    mut t: Box<Transaction>,
    to: Address,
    r: Result<crate::relay::upstream::UpReply, UpstreamError>,
    rcpts: &mut Vec<Address>,
) -> (Reply, Upstream) {
    let reply = outcome::rcpt_reply(&r);
    if reply.is_positive() {
        rcpts.push(to);
    }
    if t.is_broken() {
        // The upstream session is gone: so is this transaction upstream, and DATA gets
        // this reply instead of a 354 (nothing would answer it).
        let lost = outcome::transaction_lost(&reply);
        return (reply, Upstream::Failed(lost));
    }
    (reply, Upstream::Ready(t))
}

/// Ends an open upstream transaction (RSET), the session back to the pool if that worked.
async fn abort_txn(txn: Txn) {
    if let Upstream::Ready(t) = txn.upstream {
        t.abort().await;
    }
}

fn parse_error_reply(e: &smtp_proto::Error, line: &[u8]) -> Reply {
    use smtp_proto::Error as E;
    let verb: String = line
        .iter()
        .take_while(|b| b.is_ascii_alphabetic())
        .map(|b| b.to_ascii_uppercase() as char)
        .collect();
    match e {
        E::UnknownCommand => reply::UNKNOWN_COMMAND,
        E::InvalidSenderAddress => reply::SYNTAX_SENDER,
        E::InvalidRecipientAddress => reply::SYNTAX_RECIPIENT,
        E::SyntaxError { syntax } => reply::syntax(syntax),
        E::InvalidParameter { param } => reply::parameter(param),
        E::UnsupportedParameter { param } => reply::parameter(&sanitize(param)),
        E::ResponseTooLong => reply::LINE_TOO_LONG,
        E::NeedsMoreData { .. } | E::InvalidResponse { .. } => {
            reply::syntax(if verb.is_empty() { "command" } else { &verb })
        }
    }
}

/// A session context for tests: one account `u` (password from the environment), upstream
/// on `127.0.0.1:port` (nothing is expected to reach it), no failure delay.
#[cfg(test)]
fn test_context(
    port: u16,
    password: &str,
    timeout: Duration,
    max_recipients: usize,
) -> SessionContext {
    use crate::config::Config;
    use crate::oauth::manager::TokenManager;
    use crate::relay::upstream::UpstreamTarget;
    let toml = format!("[upstream]\nhost = \"127.0.0.1\"\nport = {port}\ntimeout_secs = 1\n[[account]]\nusername = \"u\"\npassword_env = \"PW\"\nmailbox = \"u@example.com\"\n[account.oauth]\nflow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"c\"\nclient_secret_env = \"PW\"\n");
    let dir = std::env::temp_dir();
    let config = Config::from_toml(&toml, "t.toml", &dir, &|_| Some(password.to_string()))
        .expect("test config");
    let tokens = TokenManager::new(&config).expect("token manager");
    let pool = crate::relay::pool::Pool::new(
        &config,
        UpstreamTarget::new(&config.upstream).expect("target"),
        tokens.clone(),
    );
    SessionContext {
        hostname: "bridge.test".into(),
        auth: LocalAuth::new(&config),
        transport: Transport::smtp(pool),
        tokens,
        max_message_bytes: 1000,
        max_recipients,
        require_tls_for_auth: false,
        starttls_available: false,
        shutdown: CancellationToken::new(),
        hard_stop: CancellationToken::new(),
        command_timeout: timeout,
        session_timeout: Duration::from_secs(3600),
        upstream_hold: Duration::from_secs(60),
        auth_failure_delay: Duration::ZERO,
        queue: None,
        pacers: Arc::new(Pacers::default()),
        messages_per_minute: 0,
        metrics: Arc::new(Metrics::default()),
        relay_networks: RelayNetworks::default(),
    }
}

#[cfg(test)]
mod spool_tests {
    //! Spool mode over in-memory streams: a message file's fsync runs off the runtime's
    //! worker thread, so one slow disk write holds up only its own message.
    use super::*;
    use crate::relay::deliver::Queue;
    use base64::Engine as _;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    type Client = (
        BufReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
        tokio::io::WriteHalf<tokio::io::DuplexStream>,
    );

    /// A session of `ctx` on an in-memory stream, its greeting read.
    async fn connect(ctx: &SessionContext) -> Client {
        let ctx = ctx.clone();
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer = "127.0.0.1:1".parse().expect("peer");
        tokio::spawn(async move { Session::new(&ctx, server, peer, false).run(true).await });
        let (r, w) = tokio::io::split(client);
        let mut c = (BufReader::new(r), w);
        assert!(reply(&mut c).await.starts_with("220 "));
        c
    }

    /// The last line of the next reply.
    async fn reply(c: &mut Client) -> String {
        loop {
            let mut l = String::new();
            c.0.read_line(&mut l).await.expect("read");
            assert!(l.len() >= 4, "connection closed: {l:?}");
            if l.as_bytes()[3] != b'-' {
                return l;
            }
        }
    }

    async fn say(c: &mut Client, line: &str) -> String {
        c.1.write_all(line.as_bytes()).await.expect("write");
        reply(c).await
    }

    /// EHLO and AUTH as `u`.
    async fn hello(c: &mut Client) {
        assert!(say(c, "EHLO c\r\n").await.starts_with("250 "));
        let auth = base64::engine::general_purpose::STANDARD.encode("\0u\0pw");
        assert!(say(c, &format!("AUTH PLAIN {auth}\r\n"))
            .await
            .starts_with("235 "));
    }

    /// A session context in spool mode (state in `dir`); the deliverer's upstream and token
    /// endpoint are unreachable loopback ports, so nothing leaves the spool.
    fn spool_context(dir: &std::path::Path) -> SessionContext {
        use crate::config::Config;
        let mut ctx = test_context(9, "pw", Duration::from_secs(300), 2);
        let toml = format!("[upstream]\nhost = \"127.0.0.1\"\nport = 9\ntimeout_secs = 1\n[queue]\nmode = \"spool\"\n[state]\ndir = \"{}\"\n[[account]]\nusername = \"u\"\npassword_env = \"PW\"\nmailbox = \"u@example.com\"\n[account.oauth]\nflow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"c\"\nclient_secret_env = \"PW\"\ntoken_url = \"http://127.0.0.1:9/token\"\n", dir.display());
        let config = Config::from_toml(&toml, "t.toml", dir, &|_| Some("pw".to_string()))
            .expect("spool config");
        let q = config.queue.clone().expect("[queue]");
        let queue = Queue::start(
            &config,
            &q,
            ctx.transport.clone(),
            ctx.pacers.clone(),
            ctx.metrics.clone(),
            ctx.shutdown.clone(),
        )
        .expect("queue");
        ctx.queue = Some(queue);
        ctx
    }

    /// Session A's message file fsync blocks (until the test lets it go); meanwhile session B,
    /// on the same single-threaded runtime, is served. Had the fsync run on the runtime's
    /// thread, B would get no reply until the hook gave up, and the test fails on that.
    /// A hears 250 only after its fsync, and the spool holds its exact content.
    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_fsync_does_not_hold_up_another_session() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = spool_context(dir.path());
        let queue = ctx.queue.clone().expect("queue");
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = std::sync::Mutex::new(released);
        let gave_up = Arc::new(AtomicBool::new(false));
        let first = AtomicBool::new(true);
        {
            let gave_up = gave_up.clone();
            queue.spool().sync_hook().set(move || {
                if !first.swap(false, Ordering::SeqCst) {
                    return;
                }
                let _ = entered_tx.send(());
                let waited = crate::sync::lock(&released).recv_timeout(Duration::from_secs(30));
                if waited.is_err() {
                    gave_up.store(true, Ordering::SeqCst);
                }
            });
        }

        let mut a = connect(&ctx).await;
        hello(&mut a).await;
        assert!(say(&mut a, "MAIL FROM:<u@example.com>\r\n")
            .await
            .starts_with("250 "));
        assert!(say(&mut a, "RCPT TO:<x@example.net>\r\n")
            .await
            .starts_with("250 "));
        assert!(say(&mut a, "DATA\r\n").await.starts_with("354 "));
        a.1.write_all(b"Subject: slow\r\n\r\n..dot\r\nbody\r\n.\r\n")
            .await
            .expect("content");
        entered.recv().await.expect("A's fsync started");

        // A's fsync is still blocked: B gets every reply.
        let mut b = connect(&ctx).await;
        hello(&mut b).await;
        assert!(say(&mut b, "MAIL FROM:<u@example.com>\r\n")
            .await
            .starts_with("250 "));
        assert!(say(&mut b, "RCPT TO:<y@example.net>\r\n")
            .await
            .starts_with("250 "));
        assert!(say(&mut b, "RSET\r\n").await.starts_with("250 "));
        assert!(say(&mut b, "QUIT\r\n").await.starts_with("221 "));

        release.send(()).expect("release");
        let done = reply(&mut a).await;
        assert!(
            !gave_up.load(Ordering::SeqCst),
            "session B was served only after A's fsync gave up: the fsync blocked the runtime"
        );
        let id = done
            .strip_prefix("250 2.0.0 ")
            .and_then(|r| r.strip_suffix(" queued for delivery\r\n"))
            .unwrap_or_else(|| panic!("{done:?}"));
        assert_eq!(
            queue.spool().body(id).expect("spooled"),
            b"Subject: slow\r\n\r\n.dot\r\nbody\r\n"
        );
        ctx.shutdown.cancel();
    }
}

#[cfg(test)]
mod wire_tests {
    //! The state machine over an in-memory duplex stream (no upstream is reached).
    use super::*;
    use crate::smtp::framing::MAX_LINE;
    use base64::Engine as _;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    fn ctx(timeout: Duration) -> SessionContext {
        test_context(9, "pw", timeout, 2)
    }

    async fn line(r: &mut BufReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>) -> String {
        let mut l = String::new();
        r.read_line(&mut l).await.unwrap();
        l
    }

    #[tokio::test]
    async fn sequence_errors_auth_and_long_lines() {
        let ctx = ctx(COMMAND_TIMEOUT);
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer = "127.0.0.1:1".parse().unwrap();
        let task =
            tokio::spawn(async move { Session::new(&ctx, server, peer, false).run(true).await });
        let (r, mut w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        assert_eq!(
            line(&mut r).await,
            "220 bridge.test ESMTP smtp-oauth-bridge ready\r\n"
        );
        let b64 = base64::engine::general_purpose::STANDARD;
        let long = "X".repeat(MAX_LINE + 10);
        let script = format!(
            "AUTH PLAIN {}\r\nMAIL FROM:<u@example.com>\r\nEHLO c\r\n{long}\r\nNOOP\r\nAUTH PLAIN !!!\r\nAUTH CRAM-MD5\r\nAUTH PLAIN {}\r\nAUTH PLAIN {}\r\nRCPT TO:<a@b.c>\r\nDATA\r\nVRFY x\r\nBDAT 10 LAST\r\nFOO\r\nQUIT\r\n",
            b64.encode("\0u\0pw"),
            b64.encode("\0u\0wrong"),
            b64.encode("\0u\0pw"),
        );
        w.write_all(script.as_bytes()).await.unwrap();
        let mut codes = Vec::new();
        loop {
            let l = line(&mut r).await;
            assert!(l.ends_with("\r\n"), "{l:?}");
            if l.as_bytes()[3] == b'-' {
                continue;
            }
            let code: u16 = l[..3].parse().unwrap();
            // Every reply except EHLO's carries an enhanced status code.
            if l != "250 HELP\r\n" {
                let enhanced = l[4..].split(' ').next().unwrap();
                assert_eq!(enhanced.as_bytes()[0], l.as_bytes()[0], "{l}");
                assert_eq!(enhanced.matches('.').count(), 2, "{l}");
            }
            codes.push(code);
            if code == 221 {
                break;
            }
        }
        assert_eq!(
            codes,
            vec![503, 530, 250, 500, 250, 501, 504, 535, 235, 503, 503, 252, 502, 500, 221]
        );
        assert!(matches!(task.await.unwrap(), End::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_client_gets_421_after_the_command_timeout() {
        let ctx = ctx(Duration::from_secs(300));
        let (client, server) = tokio::io::duplex(1024);
        let peer = "127.0.0.1:1".parse().unwrap();
        let task =
            tokio::spawn(async move { Session::new(&ctx, server, peer, false).run(true).await });
        let (r, _w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        assert!(line(&mut r).await.starts_with("220 "));
        let started = tokio::time::Instant::now();
        assert_eq!(
            line(&mut r).await,
            "421 4.4.2 Idle timeout, closing connection\r\n"
        );
        assert!(started.elapsed() >= Duration::from_secs(300));
        task.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_tells_an_idle_client_421() {
        let ctx = ctx(COMMAND_TIMEOUT);
        let shutdown = ctx.shutdown.clone();
        let (client, server) = tokio::io::duplex(1024);
        let peer = "127.0.0.1:1".parse().unwrap();
        let task =
            tokio::spawn(async move { Session::new(&ctx, server, peer, false).run(true).await });
        let (r, mut w) = tokio::io::split(client);
        let mut r = BufReader::new(r);
        assert!(line(&mut r).await.starts_with("220 "));
        w.write_all(b"NOOP\r\n").await.unwrap();
        assert!(line(&mut r).await.starts_with("250 2.0.0"));
        shutdown.cancel();
        assert_eq!(
            line(&mut r).await,
            "421 4.3.2 Service shutting down, try again later\r\n"
        );
        task.await.unwrap();
    }
}

#[cfg(test)]
mod prop_tests {
    //! Arbitrary byte streams, split at arbitrary points: the session never panics, every
    //! reply is a well-formed SMTP reply line, and nothing reaches the upstream without a
    //! successful AUTH (the password is never among the inputs).
    use super::*;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TOKENS: &[&[u8]] = &[
        b"EHLO client\r\n",
        b"HELO x\r\n",
        b"MAIL FROM:<u@example.com>\r\n",
        b"MAIL FROM:<> SIZE=10 BODY=8BITMIME SMTPUTF8\r\n",
        b"RCPT TO:<a@b.c>\r\n",
        b"DATA\r\n",
        b".\r\n",
        b"..x\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"QUIT\r\n",
        b"VRFY x\r\n",
        b"STARTTLS\r\n",
        b"BDAT 5 LAST\r\n",
        b"AUTH PLAIN AHUAd3Jvbmc=\r\n",
        b"AUTH PLAIN\r\n",
        b"AUTH LOGIN\r\n",
        b"dQ==\r\n",
        b"*\r\n",
        b"\r\n",
        b"\n",
        b"\r",
        b"\0",
        b"\xff\xfe",
    ];

    fn input() -> impl Strategy<Value = Vec<Vec<u8>>> {
        let piece = prop_oneof![
            3 => proptest::sample::select(TOKENS).prop_map(|t| t.to_vec()),
            1 => proptest::collection::vec(any::<u8>(), 0..40),
        ];
        proptest::collection::vec(piece, 0..40)
    }

    fn well_formed(out: &[u8]) -> Result<(), String> {
        if out.is_empty() {
            return Ok(());
        }
        if !out.ends_with(b"\r\n") {
            return Err("output does not end with CRLF".into());
        }
        let mut rest = out;
        while !rest.is_empty() {
            let end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or("line without CRLF")?;
            let line = &rest[..end];
            rest = &rest[end + 2..];
            if line.contains(&b'\r') || line.contains(&b'\n') {
                return Err("bare CR or LF in output".into());
            }
            let ok = line.len() >= 4
                && line[..3].iter().all(u8::is_ascii_digit)
                && (b'2'..=b'5').contains(&line[0])
                && (line[3] == b' ' || line[3] == b'-')
                && line.iter().all(|b| !b.is_ascii_control());
            if !ok {
                return Err(format!(
                    "malformed reply line {:?}",
                    String::from_utf8_lossy(line)
                ));
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_input_gives_well_formed_replies_and_no_upstream(pieces in input(), cut in 1usize..64) {
            let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            upstream.set_nonblocking(true).unwrap();
            let port = upstream.local_addr().unwrap().port();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let out = rt.block_on(async move {
                let ctx = test_context(port, "the-password", Duration::from_secs(5), 3);
                let (client, server) = tokio::io::duplex(1 << 16);
                let peer = "127.0.0.1:1".parse().unwrap();
                let session = tokio::spawn(async move { Session::new(&ctx, server, peer, false).run(true).await; });
                let (mut r, mut w) = tokio::io::split(client);
                let reader = tokio::spawn(async move {
                    let mut out = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut out)).await;
                    out
                });
                let all: Vec<u8> = pieces.concat();
                for chunk in all.chunks(cut) {
                    if w.write_all(chunk).await.is_err() {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                let _ = w.shutdown().await;
                let _ = tokio::time::timeout(Duration::from_secs(10), session).await;
                reader.await.unwrap()
            });
            prop_assert!(well_formed(&out).is_ok(), "{:?}\n{}", well_formed(&out), String::from_utf8_lossy(&out));
            prop_assert!(out.starts_with(b"220 "), "{}", String::from_utf8_lossy(&out));
            let reached = upstream.accept();
            prop_assert!(matches!(&reached, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock), "something connected upstream");
            let text = String::from_utf8_lossy(&out);
            prop_assert!(!text.lines().any(|l| l.starts_with("235")), "AUTH succeeded without the password");
        }
    }
}
