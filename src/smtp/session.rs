//! One local SMTP connection: the command state machine, generic over AsyncRead+AsyncWrite.
//!
//! Owns line framing (with a length limit), PIPELINING (replies are buffered and flushed
//! only before the session would wait for input), AUTH PLAIN/LOGIN, MAIL/RCPT/DATA with
//! the limits, and the synchronous relay: MAIL takes an upstream session from the pool,
//! each RCPT is forwarded live, DATA is answered only after the upstream answered it.
//! smtp-proto parses commands and unstuffs DATA; `relay::outcome` decides every reply that
//! depends on the upstream. Accepting connections and the TLS upgrade are `server`'s.

use crate::config::Account;
use crate::metrics::Metrics;
use crate::oauth::manager::AccountStatus;
use crate::oauth::secret::Secret;
use crate::relay::deliver::{Pacer, Queue};
use crate::relay::outcome;
use crate::relay::pool::{Lease, Pool};
use crate::relay::spool::{Envelope, SPOOL_VERSION};
use crate::relay::upstream::UpstreamError;
use crate::smtp::auth::LocalAuth;
use crate::smtp::data::normalize_line_endings;
use crate::smtp::reply::{self, Reply};
use crate::telemetry::{self, RelayEvent};
use base64::Engine as _;
use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver};
use smtp_proto::{Request, AUTH_LOGIN, AUTH_PLAIN, MAIL_BODY_8BITMIME, MAIL_SMTPUTF8};
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Longest command or AUTH line we accept (RFC 5321 needs 512; AUTH responses are longer).
pub const MAX_LINE: usize = 4096;
/// How long we wait for the next command (RFC 5321 4.5.3.2: at least 5 minutes).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// How long we wait for the next chunk of message data (RFC 5321: 3 minutes per block).
pub const DATA_TIMEOUT: Duration = Duration::from_secs(180);
/// Buffer reserved for reading commands (one line is at most MAX_LINE).
const COMMAND_READ: usize = 4096;
/// Buffer reserved for reading message data.
const DATA_READ: usize = 64 * 1024;
/// Failed AUTH attempts per connection before it is closed with 421.
pub const MAX_AUTH_FAILURES: u32 = 5;
/// The longest the failed-AUTH delay grows to.
const MAX_AUTH_FAILURE_DELAY: Duration = Duration::from_secs(5);
/// After the first failed AUTH of a connection the client waits this long for the 535.
pub const AUTH_FAILURE_DELAY: Duration = Duration::from_millis(250);

/// Everything a session needs that outlives it.
#[derive(Debug, Clone)]
pub struct SessionContext {
    pub hostname: String,
    pub auth: LocalAuth,
    pub pool: Pool,
    pub max_message_bytes: usize,
    pub max_recipients: usize,
    pub require_tls_for_auth: bool,
    pub starttls_available: bool,
    pub shutdown: CancellationToken,
    /// Fires when the shutdown grace period is over: sessions still busy get 421.
    pub hard_stop: CancellationToken,
    pub command_timeout: Duration,
    pub session_timeout: Duration,
    /// Delay before answering the first failed AUTH of a connection; doubles with each.
    pub auth_failure_delay: Duration,
    /// Spool mode: accept after fsync and deliver in the background.
    pub queue: Option<Arc<Queue>>,
    /// Per-account send rate (held in spool mode, reported in sync mode).
    pub pacers: Arc<HashMap<String, Pacer>>,
    pub messages_per_minute: u32,
    pub metrics: Arc<Metrics>,
}

/// How a session ended.
#[derive(Debug)]
pub enum End<S> {
    Closed,
    /// The client asked for STARTTLS and got 220: upgrade `S` and start a new session.
    StartTls(S),
}

/// Where a transaction stands with the upstream.
enum Upstream {
    /// Spool mode: the upstream is the deliverer's business.
    Spool,
    /// Sync mode, before the first RCPT: the MAIL command to send when a session is taken.
    Waiting(String),
    /// Sync mode: a session, MAIL accepted.
    Ready(Box<Lease>),
    /// Sync mode: no session or MAIL refused; every RCPT (and DATA) gets this reply.
    Failed(Reply),
}

struct Txn {
    id: String,
    upstream: Upstream,
    /// The last temporary RCPT refusal: DATA without recipients answers with it (4xx, so
    /// the client retries), not with a permanent "no valid recipients".
    transient: Option<Reply>,
    from: String,
    /// MAIL parameters to forward (BODY=8BITMIME, SMTPUTF8), for the spool.
    params: String,
    rcpts: Vec<String>,
    started: Instant,
    /// SIZE= from MAIL: the receive buffer is sized once instead of growing.
    size_hint: usize,
}

enum Line {
    Ok(Vec<u8>),
    TooLong,
}

/// The per-connection state machine.
pub struct Session<'a, S> {
    ctx: &'a SessionContext,
    io: S,
    peer: SocketAddr,
    tls: bool,
    inbuf: Vec<u8>,
    pos: usize,
    out: Vec<u8>,
    helo: Option<String>,
    user: Option<Arc<Account>>,
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
            io,
            peer,
            tls,
            inbuf: Vec::with_capacity(1024),
            pos: 0,
            out: Vec::with_capacity(512),
            helo: None,
            user: None,
            txn: None,
            auth_failures: 0,
            started: Instant::now(),
        }
    }

    fn reply(&mut self, r: &Reply) {
        r.write_to(&mut self.out);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
            self.io.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads more input (reserving `want` bytes) before `deadline`; `Ok(false)` on EOF.
    /// Flushes pending replies first. The buffer is never zero-filled, so an idle session
    /// costs only what it has received.
    async fn fill(&mut self, deadline: Instant, want: usize) -> std::io::Result<bool> {
        self.flush().await?;
        if self.ctx.hard_stop.is_cancelled() {
            return Err(std::io::Error::other(HARD_STOP));
        }
        if self.pos > 0 {
            self.inbuf.drain(..self.pos);
            self.pos = 0;
        }
        self.inbuf.reserve(want);
        let stop = self.ctx.hard_stop.clone();
        let r = tokio::select! {
            r = tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.inbuf)) => r,
            _ = stop.cancelled() => Ok(Err(std::io::Error::other(HARD_STOP))),
        };
        match r {
            Ok(Ok(n)) => Ok(n > 0),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "read timeout",
            )),
        }
    }

    /// The next line (with its LF), reading as needed; `None` on EOF. The whole line must
    /// arrive within the command timeout (a byte a second does not keep a session alive).
    async fn next_line(&mut self, idle: bool) -> std::io::Result<Option<Line>> {
        let deadline = Instant::now() + self.ctx.command_timeout;
        loop {
            let avail = &self.inbuf[self.pos..];
            if let Some(i) = memchr::memchr(b'\n', avail) {
                let line = avail[..=i].to_vec();
                self.pos += i + 1;
                if line.len() > MAX_LINE {
                    return Ok(Some(Line::TooLong));
                }
                return Ok(Some(Line::Ok(line)));
            }
            if avail.len() > MAX_LINE {
                // Drop what we have and the rest of this line.
                self.pos = self.inbuf.len();
                loop {
                    if !self.fill(deadline, COMMAND_READ).await? {
                        return Ok(None);
                    }
                    if let Some(i) = memchr::memchr(b'\n', &self.inbuf) {
                        self.pos = i + 1;
                        return Ok(Some(Line::TooLong));
                    }
                    self.pos = self.inbuf.len();
                }
            }
            let more = if idle && self.txn.is_none() {
                // Between transactions a shutdown ends the session politely.
                let shutdown = self.ctx.shutdown.clone();
                tokio::select! {
                    r = self.fill(deadline, COMMAND_READ) => r?,
                    _ = shutdown.cancelled() => {
                        self.reply(&reply::SHUTTING_DOWN);
                        self.flush().await?;
                        return Ok(None);
                    }
                }
            } else {
                self.fill(deadline, COMMAND_READ).await?
            };
            if !more {
                return Ok(None);
            }
        }
    }

    /// Runs the session until QUIT, EOF, an I/O error, or STARTTLS.
    pub async fn run(mut self, greet: bool) -> End<S> {
        if greet {
            let greeting = format!(
                "220 {} ESMTP smtp-oauth-bridge ready\r\n",
                self.ctx.hostname
            );
            self.out.extend_from_slice(greeting.as_bytes());
        }
        let end = self.serve().await;
        if let Some(txn) = self.txn.take() {
            abort_txn(txn).await;
        }
        match end {
            Ok(true) => {
                let _ = self.flush().await;
                End::StartTls(self.io)
            }
            Ok(false) => {
                let _ = self.flush().await;
                let _ = self.io.shutdown().await;
                End::Closed
            }
            Err(e) => {
                if e.to_string() == TOO_MANY_AUTH_FAILURES {
                    self.reply(&reply::TOO_MANY_AUTH_FAILURES);
                    let _ = self.flush().await;
                } else if self.ctx.hard_stop.is_cancelled() {
                    self.out.clear();
                    self.reply(&reply::SHUTTING_DOWN);
                    let _ = self.flush().await;
                } else if e.kind() == std::io::ErrorKind::TimedOut {
                    self.reply(&reply::IDLE_TIMEOUT);
                    let _ = self.flush().await;
                }
                tracing::debug!(peer = %self.peer, error = %e, "session ended");
                End::Closed
            }
        }
    }

    /// `Ok(true)` means: upgrade to TLS now.
    async fn serve(&mut self) -> std::io::Result<bool> {
        loop {
            if self.txn.is_none() && self.started.elapsed() >= self.ctx.session_timeout {
                self.reply(&reply::SESSION_TOO_LONG);
                return Ok(false);
            }
            let line = match self.next_line(true).await? {
                None => return Ok(false),
                Some(Line::TooLong) => {
                    self.reply(&reply::LINE_TOO_LONG);
                    continue;
                }
                Some(Line::Ok(l)) => l,
            };
            // A NUL or a CR inside a command line is never legitimate (and a way to make two
            // parsers disagree); the line is refused as a whole.
            if trim_crlf(&line).iter().any(|b| *b == 0 || *b == b'\r') {
                self.reply(&reply::BAD_COMMAND_BYTES);
                continue;
            }
            let parsed = Request::parse(&mut line.iter()).map(Request::into_owned);
            match parsed {
                Ok(req) => match self.command_until_hard_stop(req).await? {
                    Flow::Continue => {}
                    Flow::Quit => return Ok(false),
                    Flow::StartTls => return Ok(true),
                },
                Err(e) => {
                    let r = parse_error_reply(&e, &line);
                    self.reply(&r);
                }
            }
        }
    }

    /// A command may wait on the upstream or the pool; past the grace period it is abandoned
    /// (its upstream session closed) and the client gets 421.
    async fn command_until_hard_stop(&mut self, req: Request<String>) -> std::io::Result<Flow> {
        let stop = self.ctx.hard_stop.clone();
        tokio::select! {
            // Polled first, so a command that notices the stop itself (DATA logs it) does.
            biased;
            r = self.command(req) => r,
            _ = stop.cancelled() => Err(std::io::Error::other(HARD_STOP)),
        }
    }

    async fn command(&mut self, req: Request<String>) -> std::io::Result<Flow> {
        match req {
            Request::Ehlo { host } => {
                self.reset().await;
                self.ehlo(&host);
            }
            Request::Helo { host } => {
                self.reset().await;
                let text = format!("250 {} Hello {}\r\n", self.ctx.hostname, sanitize(&host));
                self.out.extend_from_slice(text.as_bytes());
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
                    self.inbuf.clear();
                    self.pos = 0;
                    return Ok(Flow::StartTls);
                }
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response).await?,
            Request::Mail { from } => self.mail(from).await,
            Request::Rcpt { to } => self.rcpt(to).await,
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
            self.out
                .extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
        }
        self.helo = Some(host.to_string());
    }

    /// Ends the current transaction, if any, and returns its upstream session to the pool.
    async fn reset(&mut self) {
        if let Some(txn) = self.txn.take() {
            abort_txn(txn).await;
        }
    }

    async fn auth_line(&mut self, prompt: &str) -> std::io::Result<Option<Vec<u8>>> {
        self.out
            .extend_from_slice(format!("334 {prompt}\r\n").as_bytes());
        match self.next_line(false).await? {
            None => Ok(None),
            Some(Line::TooLong) => Ok(Some(Vec::new())),
            Some(Line::Ok(l)) => Ok(Some(l)),
        }
    }

    async fn auth(&mut self, mechanism: u64, initial: String) -> std::io::Result<()> {
        if let Some(r) = self.auth_exchange(mechanism, initial).await? {
            self.reply(&r);
        }
        Ok(())
    }

    /// The AUTH dialogue; `None` when the connection ended during it.
    async fn auth_exchange(
        &mut self,
        mechanism: u64,
        initial: String,
    ) -> std::io::Result<Option<Reply>> {
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
        let b64 = base64::engine::general_purpose::STANDARD;
        // Returns None when the client cancelled with "*" or the connection ended.
        let (user, pass) = if mechanism == AUTH_PLAIN {
            let resp = if initial.is_empty() {
                match self.auth_line("").await? {
                    None => return Ok(None),
                    Some(l) => Secret::new(String::from_utf8_lossy(trim_crlf(&l)).into_owned()),
                }
            } else {
                Secret::new(initial)
            };
            if resp.expose() == "*" {
                return Ok(Some(reply::AUTH_CANCELLED));
            }
            let decoded = match decode(&b64, resp.expose()) {
                Some(d) => d,
                None => return Ok(Some(reply::AUTH_BAD_BASE64)),
            };
            // authzid NUL authcid NUL passwd
            let mut parts = decoded.expose().splitn(3, '\0');
            let (_authz, authc, pw) = (parts.next(), parts.next(), parts.next());
            match (authc, pw) {
                (Some(u), Some(p)) => (u.to_string(), Secret::new(p)),
                _ => return Ok(Some(reply::AUTH_BAD_BASE64)),
            }
        } else if mechanism == AUTH_LOGIN {
            let user_b64 = if initial.is_empty() || initial == "=" {
                match self.auth_line("VXNlcm5hbWU6").await? {
                    None => return Ok(None),
                    Some(l) => String::from_utf8_lossy(trim_crlf(&l)).into_owned(),
                }
            } else {
                initial
            };
            if user_b64 == "*" {
                return Ok(Some(reply::AUTH_CANCELLED));
            }
            let Some(user) = decode(&b64, &user_b64) else {
                return Ok(Some(reply::AUTH_BAD_BASE64));
            };
            let pw_line = match self.auth_line("UGFzc3dvcmQ6").await? {
                None => return Ok(None),
                Some(l) => Secret::new(String::from_utf8_lossy(trim_crlf(&l)).into_owned()),
            };
            if pw_line.expose() == "*" {
                return Ok(Some(reply::AUTH_CANCELLED));
            }
            let Some(pw) = decode(&b64, pw_line.expose()) else {
                return Ok(Some(reply::AUTH_BAD_BASE64));
            };
            (user.expose().to_string(), pw)
        } else {
            return Ok(Some(reply::AUTH_MECH));
        };
        match self.ctx.auth.verify(&user, pass).await {
            Some(account) => {
                if let Some(AccountStatus::NeedsLogin(_)) =
                    self.ctx.pool.tokens().status(&account.username)
                {
                    let name = &account.username;
                    tracing::warn!(peer = %self.peer, account = %name, "authenticated, but the account needs login");
                    return Ok(Some(Reply::new(
                        454,
                        "4.7.0",
                        format!("Account {name} needs login; run: smtp-oauth-bridge login {name}"),
                    )));
                }
                tracing::debug!(peer = %self.peer, account = %account.username, "local client authenticated");
                self.user = Some(account);
                Ok(Some(reply::AUTH_OK))
            }
            None => {
                self.ctx.metrics.auth_failed();
                self.auth_failures += 1;
                tracing::warn!(peer = %self.peer, user = %sanitize(&user), failures = self.auth_failures, "local authentication failed");
                // Slow down guessing: each failure on this connection waits longer; the
                // delay only ever holds back the failing client.
                let delay = self
                    .ctx
                    .auth_failure_delay
                    .saturating_mul(1 << (self.auth_failures - 1).min(8))
                    .min(MAX_AUTH_FAILURE_DELAY);
                tokio::time::sleep(delay).await;
                if self.auth_failures >= MAX_AUTH_FAILURES {
                    return Err(std::io::Error::other(TOO_MANY_AUTH_FAILURES));
                }
                Ok(Some(reply::AUTH_FAILED))
            }
        }
    }

    async fn mail(&mut self, from: smtp_proto::MailFrom<String>) {
        let Some(account) = self.user.clone() else {
            return self.reply(&reply::AUTH_REQUIRED);
        };
        if self.txn.is_some() {
            return self.reply(&reply::BAD_SEQUENCE_NESTED_MAIL);
        }
        if from.size > self.ctx.max_message_bytes {
            return self.reply(&reply::TOO_BIG);
        }
        if !from.address.is_empty() && !sender_allowed(&account.allowed_from, &from.address) {
            tracing::warn!(peer = %self.peer, account = %account.username, from = %sanitize(&from.address), "sender not in allowed_from");
            return self.reply(&reply::NOT_ALLOWED_FROM);
        }
        let mut params = Vec::new();
        if from.flags & MAIL_BODY_8BITMIME != 0 {
            params.push("BODY=8BITMIME");
        }
        if from.flags & MAIL_SMTPUTF8 != 0 {
            params.push("SMTPUTF8");
        }
        let params = params.join(" ");
        if self.ctx.queue.is_some() {
            self.txn = Some(Txn {
                id: telemetry::new_message_id(),
                upstream: Upstream::Spool,
                transient: None,
                from: from.address,
                params,
                rcpts: Vec::new(),
                started: Instant::now(),
                size_hint: from.size,
            });
            return self.reply(&reply::SENDER_OK);
        }
        let mut cmd = format!("MAIL FROM:<{}>", from.address);
        if from.size > 0 {
            cmd.push_str(&format!(" SIZE={}", from.size));
        }
        if !params.is_empty() {
            cmd.push(' ');
            cmd.push_str(&params);
        }
        // The session is taken, and MAIL sent, when the first RCPT arrives: a session of
        // the mailbox (Microsoft 365 allows 3) is then not held across the client's round
        // trip, and the upstream's verdict on the sender comes back as that RCPT's reply.
        self.txn = Some(Txn {
            id: telemetry::new_message_id(),
            upstream: Upstream::Waiting(cmd),
            transient: None,
            from: from.address,
            params,
            rcpts: Vec::new(),
            started: Instant::now(),
            size_hint: from.size,
        });
        self.reply(&reply::SENDER_OK);
    }

    async fn rcpt(&mut self, to: smtp_proto::RcptTo<String>) {
        let max = self.ctx.max_recipients;
        let Some(txn) = self.txn.as_mut() else {
            return self.reply(&reply::BAD_SEQUENCE_MAIL);
        };
        if txn.rcpts.len() >= max {
            return self.reply(&reply::TOO_MANY_RECIPIENTS);
        }
        // smtp-proto reads <postmaster> as the empty address.
        let addr = if to.address.is_empty() {
            "postmaster".to_string()
        } else {
            to.address
        };
        if let Upstream::Waiting(mail) = &txn.upstream {
            let result = self.ctx.pool.begin(&account_name(&self.user), mail).await;
            let r = outcome::mail_reply(result.as_ref().map(|(_, r)| r));
            txn.upstream = match result {
                Ok((lease, _)) if r.is_positive() => Upstream::Ready(Box::new(lease)),
                Ok((lease, _)) => {
                    lease.release(true);
                    Upstream::Failed(r)
                }
                Err(_) => {
                    tracing::warn!(peer = %self.peer, account = %account_name(&self.user), reply = %r, "could not start an upstream transaction");
                    Upstream::Failed(r)
                }
            };
        }
        let reply = match &mut txn.upstream {
            Upstream::Spool => {
                // Recipients are checked by the upstream at delivery.
                txn.rcpts.push(addr);
                reply::RECIPIENT_OK
            }
            Upstream::Failed(r) => r.clone(),
            Upstream::Waiting(_) => reply::INTERNAL,
            Upstream::Ready(lease) => {
                let r = lease.session().command(&format!("RCPT TO:<{addr}>")).await;
                let reply = outcome::rcpt_reply(&r);
                if reply.is_positive() {
                    txn.rcpts.push(addr);
                } else if reply.code < 500 {
                    txn.transient = Some(reply.clone());
                }
                if lease.session().is_broken() {
                    // The upstream session is gone: so is this transaction upstream.
                    txn.upstream = Upstream::Failed(reply.clone());
                }
                reply
            }
        };
        if !reply.is_positive() && reply.code < 500 {
            txn.transient = Some(reply.clone());
        }
        self.reply(&reply);
    }

    async fn data(&mut self) -> std::io::Result<()> {
        let Some(txn) = self.txn.as_mut() else {
            self.reply(&reply::BAD_SEQUENCE_MAIL);
            return Ok(());
        };
        if txn.rcpts.is_empty() {
            let r = match (&txn.upstream, &txn.transient) {
                (Upstream::Failed(r), _) => r.clone(),
                (_, Some(r)) => r.clone(),
                _ => reply::NO_VALID_RECIPIENTS,
            };
            // The transaction is over; the client starts again with MAIL.
            self.reset().await;
            self.reply(&r);
            return Ok(());
        }
        let hint = txn.size_hint;
        let mut lease = match std::mem::replace(&mut txn.upstream, Upstream::Spool) {
            Upstream::Ready(l) => Some(*l),
            _ => None,
        };
        self.reply(&reply::START_DATA);
        // Sync mode: DATA goes upstream while the content arrives (one round trip less per
        // message); the upstream's answer to it is looked at once the content is complete.
        // Any failure from here on drops the lease, closing a session that may be in DATA.
        let (upstream_data, received) = match lease.as_mut() {
            Some(l) => {
                let (up, local) =
                    tokio::join!(l.session().command("DATA"), self.receive_data(hint));
                (Some(up), local)
            }
            None => (None, self.receive_data(hint).await),
        };
        let Some(content) = received? else {
            // Too big: the data was read and discarded, and the upstream gets no content.
            drop(lease);
            if let Some(txn) = self.txn.take() {
                let why = format!(
                    "message exceeds listen.max_message_bytes ({})",
                    self.ctx.max_message_bytes
                );
                self.log_relay(&txn, 0, "rejected", 0, &why);
            }
            self.reply(&reply::TOO_BIG);
            return Ok(());
        };
        let Some(txn) = self.txn.take() else {
            return Ok(());
        };
        let received = &content[DATA_PREFIX.len()..];
        let normalized = normalize_line_endings(received);
        if normalized.is_some() {
            tracing::info!(id = %txn.id, "message had bare LF or CR line endings; normalized to CRLF");
        }
        let body: &[u8] = normalized.as_deref().unwrap_or(received);
        let (Some(mut lease), Some(upstream_data)) = (lease, upstream_data) else {
            return self.spool(txn, body);
        };
        let stop = self.ctx.hard_stop.clone();
        let result = match upstream_data {
            // The upstream refused DATA itself: its reply is the answer.
            Err(e) => Err(e),
            Ok(_) => tokio::select! {
                r = lease.session().body(body) => r,
                _ = stop.cancelled() => {
                    // The grace period is over; the upstream's answer will not come in time.
                    drop(lease);
                    self.log_relay(&txn, body.len(), "deferred", 0, "shut down before the upstream answered");
                    return Err(std::io::Error::other(HARD_STOP));
                }
            },
        };
        let (reply, outcome) = outcome::data_reply(&result, &txn.id);
        let (code, text) = match &result {
            Ok(r) => (r.code, Cow::Borrowed(r.text.as_str())),
            Err(UpstreamError::Reply(r)) => (r.code, Cow::Borrowed(r.text.as_str())),
            Err(e) => (0, Cow::Owned(e.to_string())),
        };
        self.log_relay(&txn, body.len(), outcome.as_str(), code, &text);
        // After any final DATA reply the upstream session is idle again, unless it broke.
        lease.release(true);
        if result.is_ok() {
            self.note_rate();
        }
        self.reply(&reply);
        Ok(())
    }

    /// Sync mode cannot hold messages back: exceeding the rate is reported instead.
    fn note_rate(&self) {
        let (Some(user), limit) = (&self.user, self.ctx.messages_per_minute) else {
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

    /// Spool mode: store durably, then 250; a storage failure is 452 4.3.1 and nothing is kept.
    fn spool(&mut self, txn: Txn, body: &[u8]) -> std::io::Result<()> {
        let Some(queue) = self.ctx.queue.clone() else {
            return Ok(());
        };
        let account = self
            .user
            .as_ref()
            .map_or("", |a| a.username.as_str())
            .to_string();
        let env = Envelope {
            version: SPOOL_VERSION,
            id: txn.id.clone(),
            account,
            from: txn.from.clone(),
            params: txn.params.clone(),
            rcpts: txn.rcpts.clone(),
            received_at: crate::clock::unix_now(),
            bytes: body.len(),
        };
        match queue.accept(env, body) {
            Ok(()) => {
                self.log_relay(&txn, body.len(), "spooled", 0, "");
                self.reply(&Reply::new(
                    250,
                    "2.0.0",
                    format!("{} queued for delivery", txn.id),
                ));
            }
            Err(e) => {
                tracing::error!(id = %txn.id, error = %e, "cannot write the message to the spool");
                self.reply(&reply::SPOOL_FULL);
            }
        }
        Ok(())
    }

    fn log_relay(&self, txn: &Txn, bytes: usize, outcome: &'static str, code: u16, reply: &str) {
        self.ctx.metrics.record(&RelayEvent {
            id: &txn.id,
            account: self.user.as_ref().map_or("", |a| a.username.as_str()),
            from: &txn.from,
            rcpts: &txn.rcpts,
            bytes,
            outcome,
            upstream_code: code,
            upstream_reply: reply,
            ms: txn.started.elapsed().as_millis() as u64,
        });
    }

    /// Reads message data up to CRLF.CRLF. Returns the unstuffed content prefixed with
    /// [`DATA_PREFIX`], or `None` when it exceeded the size limit (then it was discarded).
    async fn receive_data(&mut self, hint: usize) -> std::io::Result<Option<Vec<u8>>> {
        let mut rx = DataReceiver::new();
        let mut buf = Vec::with_capacity(hint.clamp(16 * 1024, self.ctx.max_message_bytes) + 2);
        // smtp-proto only recognises a terminator or a stuffed dot after a line break; seed
        // one so that the very first line is handled too.
        rx.ingest(&mut DATA_PREFIX.iter(), &mut buf);
        let limit = self.ctx.max_message_bytes + DATA_PREFIX.len();
        loop {
            let avail = &self.inbuf[self.pos..];
            let mut it = avail.iter();
            let done = rx.ingest(&mut it, &mut buf);
            self.pos += avail.len() - it.as_slice().len();
            if buf.len() > limit {
                let mut dummy = DummyDataReceiver::new_data(&rx);
                drop(buf);
                return self.discard_data(&mut dummy).await.map(|_| None);
            }
            if done {
                // Give back the large read buffer; the session may now idle for a long time.
                if self.inbuf.capacity() > 4 * COMMAND_READ {
                    self.inbuf.drain(..self.pos);
                    self.pos = 0;
                    self.inbuf.shrink_to(COMMAND_READ);
                }
                return Ok(Some(buf));
            }
            if !self.fill(Instant::now() + DATA_TIMEOUT, DATA_READ).await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn discard_data(&mut self, rx: &mut DummyDataReceiver) -> std::io::Result<()> {
        loop {
            let avail = &self.inbuf[self.pos..];
            let mut it = avail.iter();
            let done = rx.ingest(&mut it);
            self.pos += avail.len() - it.as_slice().len();
            if done {
                return Ok(());
            }
            if !self.fill(Instant::now() + DATA_TIMEOUT, DATA_READ).await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

const DATA_PREFIX: &[u8] = b"\r\n";

enum Flow {
    Continue,
    Quit,
    StartTls,
}

/// Ends an open upstream transaction: RSET, and back to the pool if that worked.
async fn abort_txn(txn: Txn) {
    if let Upstream::Ready(mut lease) = txn.upstream {
        let ok = lease.session().command("RSET").await.is_ok();
        lease.release(ok);
    }
}

fn account_name(user: &Option<Arc<Account>>) -> String {
    user.as_ref()
        .map_or_else(String::new, |a| a.username.clone())
}

/// The error that ends a session after MAX_AUTH_FAILURES failed AUTH attempts.
const TOO_MANY_AUTH_FAILURES: &str = "too many authentication failures";

/// The error that ends sessions still busy when the shutdown grace period is over.
const HARD_STOP: &str = "shutdown grace period over";

fn decode(b64: &base64::engine::GeneralPurpose, s: &str) -> Option<Secret> {
    let s = s.trim();
    if s == "=" {
        return Some(Secret::new(""));
    }
    let bytes = b64.decode(s).ok()?;
    String::from_utf8(bytes).ok().map(Secret::new)
}

fn trim_crlf(l: &[u8]) -> &[u8] {
    let l = l.strip_suffix(b"\n").unwrap_or(l);
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// Client-supplied text made safe for replies and logs (bounded, no control characters).
fn sanitize(s: &str) -> String {
    s.chars()
        .take(255)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Whether `from` matches an `allowed_from` entry (exact address or `*@domain`), ignoring case.
pub fn sender_allowed(allowed: &[String], from: &str) -> bool {
    allowed.iter().any(|a| match a.strip_prefix("*@") {
        Some(domain) => from
            .rsplit_once('@')
            .is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain)),
        None => a.eq_ignore_ascii_case(from) || a.to_lowercase() == from.to_lowercase(),
    })
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
    let pool = Pool::new(
        &config,
        UpstreamTarget::new(&config.upstream).expect("target"),
        tokens,
    );
    SessionContext {
        hostname: "bridge.test".into(),
        auth: LocalAuth::new(&config),
        pool,
        max_message_bytes: 1000,
        max_recipients,
        require_tls_for_auth: false,
        starttls_available: false,
        shutdown: CancellationToken::new(),
        hard_stop: CancellationToken::new(),
        command_timeout: timeout,
        session_timeout: Duration::from_secs(3600),
        auth_failure_delay: Duration::ZERO,
        queue: None,
        pacers: Arc::new(HashMap::new()),
        messages_per_minute: 0,
        metrics: Arc::new(Metrics::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_from_matching() {
        let allowed = vec![
            "scanner@contoso.com".to_string(),
            "*@fabrikam.com".to_string(),
        ];
        assert!(sender_allowed(&allowed, "scanner@contoso.com"));
        assert!(sender_allowed(&allowed, "Scanner@Contoso.com"));
        assert!(sender_allowed(&allowed, "anyone@FABRIKAM.com"));
        assert!(!sender_allowed(&allowed, "ceo@contoso.com"));
        assert!(!sender_allowed(&allowed, "x@sub.fabrikam.com"));
    }
}

#[cfg(test)]
mod wire_tests {
    //! The state machine over an in-memory duplex stream (no upstream is reached).
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};

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
    use tokio::io::AsyncReadExt;

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
