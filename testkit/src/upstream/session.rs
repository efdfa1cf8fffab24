//! One fake-upstream SMTP session, modelled on smtp.office365.com:587: greeting, EHLO
//! (no AUTH before TLS), STARTTLS, AUTH XOAUTH2 (and a basic-auth-disabled AUTH LOGIN),
//! MAIL/RCPT/DATA/BDAT/RSET/NOOP/QUIT with enhanced status codes and scripted replies, and
//! the injected faults (stalls, mid-DATA drops, broken STARTTLS, throttling, session limit,
//! a close or stall at any step), and which command lines arrived together (flights; a
//! pipelined command is refused when PIPELINING is not offered).
//!
//! Owns the protocol state machine; I/O is `conn.rs`, shared state and knobs `mod.rs`.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use base64::Engine as _;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::conn::{Conn, Input, Stream};
use super::{AuthSlot, FaultAction, FaultPoint, Inner, Received, Reply, Stall};

/// Host name in the greeting and replies.
const HOST: &str = "FAKE.outlook.office365.com";
/// Advertised SIZE, Microsoft 365's (150 MiB, including encoding overhead).
const MAX_MESSAGE_BYTES: usize = 157_286_400;
/// Recipients per message Microsoft 365 accepts.
const MAX_RECIPIENTS: usize = 500;
/// BDAT bytes read before a `close_mid_data` drop (fewer if the chunk is smaller).
const MID_CHUNK_BYTES: usize = 16;
/// Base64 of "Username:" and "Password:" for AUTH LOGIN prompts.
const LOGIN_USER_PROMPT: &str = "VXNlcm5hbWU6";
const LOGIN_PASS_PROMPT: &str = "UGFzc3dvcmQ6";

/// An open mail transaction.
#[derive(Debug, Default)]
struct Txn {
    from: String,
    params: String,
    rcpts: Vec<String>,
    /// BDAT chunks so far (`Some` once BDAT was used; then DATA is out of sequence).
    chunks: Option<Vec<u8>>,
    /// A BDAT chunk pushed the message over the size limit.
    too_big: bool,
    /// RCPT commands seen in this transaction, refused ones included (for `fail_at`).
    rcpt_commands: usize,
}

struct Session<'a> {
    inner: &'a Arc<Inner>,
    id: u64,
    peer: SocketAddr,
    ehlo: bool,
    /// `(user, token)` once AUTH succeeded.
    auth: Option<(String, String)>,
    /// Held while authenticated (counts towards `set_max_sessions`).
    auth_slot: Option<AuthSlot>,
    txn: Option<Txn>,
    /// The current flight of command lines (see `FakeUpstream::flights`).
    flight: u64,
}

/// What a command handler wants next.
enum Next {
    Continue,
    Close,
    StartTls,
    /// Drop the connection at once, without a reply or an orderly close.
    Drop,
    /// Never answer again: discard input until the client closes.
    Stall,
}

fn reply(code: u16, text: &str) -> Reply {
    Reply::new(code, text)
}

impl From<FaultAction> for Next {
    fn from(a: FaultAction) -> Next {
        match a {
            FaultAction::Close => Next::Drop,
            FaultAction::Stall => Next::Stall,
        }
    }
}

/// Serves one connection until QUIT, EOF, an error or an idle kick.
pub(super) async fn run(
    inner: &Arc<Inner>,
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    mut idle: watch::Receiver<u64>,
) -> io::Result<()> {
    let mut conn = if inner.implicit_tls {
        let tls = inner.acceptor.accept(tcp).await?;
        Conn::new(Stream::Tls(Box::new(tls)))
    } else {
        Conn::new(Stream::Plain(tcp))
    };
    let mut s = Session {
        inner,
        id,
        peer,
        ehlo: false,
        auth: None,
        auth_slot: None,
        txn: None,
        flight: 0,
    };
    if inner.stalls_at(Stall::Greeting) {
        return conn.discard_until_closed().await;
    }
    match inner.fault_at(FaultPoint::Greeting) {
        Some(FaultAction::Close) => return Ok(()),
        Some(FaultAction::Stall) => return conn.discard_until_closed().await,
        None => {}
    }
    let greeting = inner.script().greeting.clone();
    let greeting = greeting
        .unwrap_or_else(|| reply(220, &format!("{HOST} Microsoft ESMTP MAIL Service ready")));
    s.send(&mut conn, &greeting).await?;
    if greeting.code != 220 {
        return conn.shutdown().await;
    }
    loop {
        // Only kicks from now on count: this session is now waiting for a command.
        idle.borrow_and_update();
        let reads = conn.reads();
        let line = match conn.read_line(&mut idle).await? {
            Input::Line(line) => line,
            Input::Closed | Input::Idle => return Ok(()),
            Input::TooLong => {
                s.send(&mut conn, &reply(500, "5.5.6 Line too long"))
                    .await?;
                return conn.shutdown().await;
            }
        };
        // No read was needed for this line: it came with the previous command (or its
        // content), before that command's reply.
        let pipelined = conn.reads() == reads;
        if !pipelined {
            s.flight += 1;
        }
        inner.record_line(id, s.flight, &line);
        if pipelined && !inner.offers_pipelining() {
            inner.pipelining_violations.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(
                session = id,
                "fake upstream: command pipelined without PIPELINING offered"
            );
            s.send(
                &mut conn,
                &reply(554, "5.5.0 Error: improper command pipelining [FAKE]"),
            )
            .await?;
            continue;
        }
        if s.auth.is_some() && inner.stalls_at(Stall::AfterAuth) {
            return conn.discard_until_closed().await;
        }
        let next = match s.fault_point(&line).and_then(|p| inner.fault_at(p)) {
            Some(action) => Next::from(action),
            None => s.command(&mut conn, &line, &mut idle).await?,
        };
        match next {
            Next::Continue => {}
            Next::Close => return conn.shutdown().await,
            Next::Drop => {
                // The replies already given go out; then the connection drops.
                conn.flush_replies().await?;
                return Ok(());
            }
            Next::Stall => return conn.discard_until_closed().await,
            Next::StartTls if inner.tls_failure.load(Ordering::SeqCst) => {
                inner.fault();
                return conn.fail_tls().await;
            }
            Next::StartTls => {
                conn = conn.starttls(&inner.acceptor).await?;
                s.ehlo = false;
                s.auth = None;
                s.auth_slot = None;
                s.txn = None;
            }
        }
    }
}

impl Session<'_> {
    /// The `fail_at` point a command line is at (counting RCPTs of the transaction).
    fn fault_point(&mut self, line: &str) -> Option<FaultPoint> {
        let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
        Some(match verb.as_str() {
            "EHLO" | "HELO" => FaultPoint::Ehlo,
            "STARTTLS" => FaultPoint::StartTls,
            "AUTH" => FaultPoint::Auth,
            "MAIL" => FaultPoint::Mail,
            "RCPT" => {
                let txn = self.txn.as_mut()?;
                txn.rcpt_commands += 1;
                FaultPoint::Rcpt(txn.rcpt_commands)
            }
            "DATA" => FaultPoint::Data,
            "BDAT" if self.inner.offers_chunking() => {
                let first = self.txn.as_ref().is_some_and(|t| t.chunks.is_none());
                if !first {
                    return None;
                }
                FaultPoint::Data
            }
            "QUIT" => FaultPoint::Quit,
            _ => return None,
        })
    }

    async fn send(&self, conn: &mut Conn, r: &Reply) -> io::Result<()> {
        let delay = self.inner.script().delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        conn.write_reply(r).await
    }

    /// [`Session::send`], with `extra` raw bytes right after the reply in the same write.
    async fn send_with(&self, conn: &mut Conn, r: &Reply, extra: &[u8]) -> io::Result<()> {
        let delay = self.inner.script().delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        conn.write_reply_and(r, extra).await
    }

    async fn command(
        &mut self,
        conn: &mut Conn,
        line: &str,
        idle: &mut watch::Receiver<u64>,
    ) -> io::Result<Next> {
        let (verb, arg) = match line.split_once(' ') {
            Some((v, a)) => (v, a.trim()),
            None => (line.trim(), ""),
        };
        let r = match verb.to_ascii_uppercase().as_str() {
            "EHLO" | "HELO" if arg.is_empty() => reply(501, "5.5.4 Invalid domain name"),
            "EHLO" => {
                self.ehlo = true;
                self.txn = None;
                self.ehlo_reply(conn.is_tls())
            }
            "HELO" => {
                self.ehlo = true;
                self.txn = None;
                reply(250, &format!("{HOST} Hello [{}]", self.peer.ip()))
            }
            "STARTTLS" if conn.is_tls() => reply(503, "5.5.1 TLS already active"),
            "STARTTLS" if !self.inner.offer_starttls => reply(454, "4.7.0 TLS not available"),
            "STARTTLS" if !arg.is_empty() => reply(501, "5.5.4 Syntax error in parameters"),
            "STARTTLS" => {
                let inject = self.inner.script().starttls_inject.clone();
                let ready = reply(220, "2.0.0 SMTP server ready");
                match inject {
                    Some(bytes) => {
                        self.inner.fault();
                        self.send_with(conn, &ready, &bytes).await?;
                    }
                    None => self.send(conn, &ready).await?,
                }
                return Ok(Next::StartTls);
            }
            "AUTH" => {
                self.inner.auth_attempts.fetch_add(1, Ordering::SeqCst);
                let r = self.auth_command(conn, arg, idle).await?;
                self.limit_sessions(r)
            }
            "MAIL" => self.mail(arg),
            "RCPT" => self.rcpt(arg),
            "DATA" => return self.data(conn, arg).await,
            "BDAT" if self.inner.offers_chunking() => return self.bdat(conn, arg).await,
            "RSET" => {
                self.txn = None;
                reply(250, "2.0.0 Resetting")
            }
            "NOOP" => reply(250, "2.0.0 OK"),
            "VRFY" => reply(252, "2.1.5 Cannot VRFY user"),
            "QUIT" => {
                self.send(
                    conn,
                    &reply(221, "2.0.0 Service closing transmission channel"),
                )
                .await?;
                return Ok(Next::Close);
            }
            _ => reply(500, "5.3.3 Unrecognized command"),
        };
        self.send(conn, &r).await?;
        Ok(Next::Continue)
    }

    fn ehlo_reply(&self, tls: bool) -> Reply {
        let mut lines = vec![
            format!("{HOST} Hello [{}]", self.peer.ip()),
            format!("SIZE {MAX_MESSAGE_BYTES}"),
        ];
        if self.inner.offers_pipelining() {
            lines.push("PIPELINING".to_string());
        }
        lines.push("DSN".to_string());
        lines.push("ENHANCEDSTATUSCODES".to_string());
        if tls {
            lines.push("AUTH LOGIN XOAUTH2".to_string());
        } else if self.inner.offer_starttls {
            lines.push("STARTTLS".to_string());
        }
        let chunking = self.inner.offers_chunking();
        for ext in ["8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8"] {
            if chunking || !matches!(ext, "BINARYMIME" | "CHUNKING") {
                lines.push(ext.to_string());
            }
        }
        reply(250, &lines.join("\n"))
    }

    /// Reads one AUTH continuation line (logged like a command).
    async fn continuation(
        &mut self,
        conn: &mut Conn,
        prompt: &str,
        idle: &mut watch::Receiver<u64>,
    ) -> io::Result<Option<String>> {
        self.send(conn, &reply(334, prompt)).await?;
        match conn.read_line(idle).await? {
            Input::Line(line) => {
                // The client waited for the 334: a flight of its own.
                self.flight += 1;
                self.inner.record_line(self.id, self.flight, &line);
                Ok(Some(line))
            }
            _ => Ok(None),
        }
    }

    async fn auth_command(
        &mut self,
        conn: &mut Conn,
        arg: &str,
        idle: &mut watch::Receiver<u64>,
    ) -> io::Result<Reply> {
        if !conn.is_tls() {
            return Ok(reply(504, "5.7.4 Unrecognized authentication type"));
        }
        if !self.ehlo {
            return Ok(reply(503, "5.5.2 Send hello first"));
        }
        if self.auth.is_some() {
            return Ok(reply(503, "5.5.2 Already authenticated"));
        }
        if self.txn.is_some() {
            return Ok(reply(503, "5.5.1 Mail transaction in progress"));
        }
        let (mech, initial) = match arg.split_once(' ') {
            Some((m, i)) => (m, Some(i.trim().to_string())),
            None => (arg, None),
        };
        let user_token = match mech.to_ascii_uppercase().as_str() {
            "XOAUTH2" => {
                let response = match initial {
                    Some(r) => r,
                    None => match self.continuation(conn, "", idle).await? {
                        Some(r) => r,
                        None => return Err(io::ErrorKind::UnexpectedEof.into()),
                    },
                };
                if response == "*" {
                    return Ok(reply(501, "5.0.0 Authentication cancelled"));
                }
                let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(response.trim())
                else {
                    return Ok(reply(501, "5.5.2 Cannot Base64-decode Client responses"));
                };
                parse_xoauth2(&raw)
            }
            "LOGIN" => {
                let user = match initial {
                    Some(u) => u,
                    None => match self.continuation(conn, LOGIN_USER_PROMPT, idle).await? {
                        Some(u) => u,
                        None => return Err(io::ErrorKind::UnexpectedEof.into()),
                    },
                };
                if self
                    .continuation(conn, LOGIN_PASS_PROMPT, idle)
                    .await?
                    .is_none()
                {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                let user = base64::engine::general_purpose::STANDARD
                    .decode(user.trim())
                    .map(|u| String::from_utf8_lossy(&u).into_owned())
                    .unwrap_or_default();
                // Basic authentication is off in Microsoft 365 unless a script says otherwise.
                let forced = self.inner.script().auth.clone();
                let r = forced.unwrap_or_else(|| {
                    reply(
                        535,
                        "5.7.139 Authentication unsuccessful, basic authentication is disabled. [FAKE]",
                    )
                });
                if r.is_positive() {
                    self.auth = Some((user, String::new()));
                }
                return Ok(r);
            }
            _ => return Ok(reply(504, "5.7.4 Unrecognized authentication type")),
        };
        let forced = self.inner.script().auth.clone();
        if let Some(r) = forced {
            if r.is_positive() {
                self.auth = Some(user_token.unwrap_or_default());
            }
            return Ok(r);
        }
        let Some((user, token)) = user_token else {
            return Ok(reply(535, "5.7.3 Authentication unsuccessful [FAKE]"));
        };
        let token_ok = match &self.inner.tokens {
            Some(ep) => ep.is_valid(&token),
            None => !token.is_empty(),
        };
        let user_ok = match &self.inner.mailbox_ok {
            Some(list) => list.iter().any(|m| m.eq_ignore_ascii_case(&user)),
            None => !user.is_empty(),
        };
        if !(token_ok && user_ok) {
            return Ok(reply(535, "5.7.3 Authentication unsuccessful [FAKE]"));
        }
        self.auth = Some((user, token));
        Ok(reply(235, "2.7.0 Authentication successful"))
    }

    /// A session that just authenticated takes a `set_max_sessions` slot, or is refused
    /// with the session-limit reply (and is unauthenticated again) when none is left.
    fn limit_sessions(&mut self, r: Reply) -> Reply {
        if self.auth.is_none() || self.auth_slot.is_some() {
            return r;
        }
        match self.inner.take_auth_slot() {
            Some(slot) => {
                self.auth_slot = Some(slot);
                r
            }
            None => {
                self.auth = None;
                self.inner.fault();
                Reply::session_limit()
            }
        }
    }

    /// Shared precondition of MAIL/RCPT/DATA/BDAT.
    fn check_authenticated(&self) -> Option<Reply> {
        if !self.ehlo {
            Some(reply(503, "5.5.2 Send hello first"))
        } else if self.auth.is_none() {
            Some(reply(530, "5.7.57 Client not authenticated to send mail"))
        } else {
            None
        }
    }

    fn mail(&mut self, arg: &str) -> Reply {
        if let Some(r) = self.check_authenticated() {
            return r;
        }
        if self.txn.is_some() {
            return reply(503, "5.5.2 Sender already specified");
        }
        let throttle = self.inner.script().throttle.clone();
        if let Some(r) = throttle {
            self.inner.fault();
            return r;
        }
        let Some((from, params)) = parse_path(arg, "FROM:") else {
            return reply(501, "5.5.4 Invalid arguments");
        };
        let size = params.split_ascii_whitespace().find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.eq_ignore_ascii_case("SIZE")
                .then(|| v.parse::<u64>().ok())?
        });
        if size.is_some_and(|n| n > MAX_MESSAGE_BYTES as u64) {
            return reply(552, "5.3.4 Message size exceeds fixed maximum message size");
        }
        let r = self
            .inner
            .script()
            .mail
            .clone()
            .unwrap_or_else(|| reply(250, "2.1.0 Sender OK"));
        if r.is_positive() {
            self.txn = Some(Txn {
                from,
                params,
                ..Txn::default()
            });
        }
        r
    }

    fn rcpt(&mut self, arg: &str) -> Reply {
        if let Some(r) = self.check_authenticated() {
            return r;
        }
        let Some(txn) = self.txn.as_mut() else {
            return reply(503, "5.5.1 Need mail command");
        };
        let Some((to, _params)) = parse_path(arg, "TO:") else {
            return reply(501, "5.5.4 Invalid arguments");
        };
        if to.is_empty() {
            return reply(501, "5.1.3 Invalid address");
        }
        if txn.rcpts.len() >= MAX_RECIPIENTS {
            return reply(452, "4.5.3 Too many recipients");
        }
        let scripted = self
            .inner
            .script()
            .rcpt
            .get(&to.to_ascii_lowercase())
            .cloned();
        let r = scripted.unwrap_or_else(|| reply(250, "2.1.5 Recipient OK"));
        if r.is_positive() {
            txn.rcpts.push(to);
        }
        r
    }

    /// Why DATA/BDAT cannot start now, if it cannot.
    fn check_ready_for_data(&self) -> Option<Reply> {
        if let Some(r) = self.check_authenticated() {
            return Some(r);
        }
        match &self.txn {
            None => Some(reply(503, "5.5.1 Need mail command")),
            Some(t) if t.rcpts.is_empty() => Some(reply(503, "5.5.2 Need rcpt command")),
            Some(_) => None,
        }
    }

    async fn data(&mut self, conn: &mut Conn, arg: &str) -> io::Result<Next> {
        let refusal = if !arg.is_empty() {
            Some(reply(501, "5.5.4 Syntax error in parameters"))
        } else if self.txn.as_ref().is_some_and(|t| t.chunks.is_some()) {
            Some(reply(
                503,
                "5.5.1 Bad sequence of commands: BDAT in progress",
            ))
        } else {
            self.check_ready_for_data()
                .or_else(|| self.inner.script().data_command.clone())
        };
        if let Some(r) = refusal {
            self.send(conn, &r).await?;
            return Ok(Next::Continue);
        }
        self.send(
            conn,
            &reply(354, "Start mail input; end with <CRLF>.<CRLF>"),
        )
        .await?;
        if self.inner.take_mid_data_fault() {
            self.txn = None;
            conn.read_first_line().await?;
            return Ok(Next::Drop);
        }
        let mut data = Vec::new();
        let Some(fits) = conn.read_data(&mut data, MAX_MESSAGE_BYTES).await? else {
            return Ok(Next::Close);
        };
        self.finish(conn, data, fits).await
    }

    async fn bdat(&mut self, conn: &mut Conn, arg: &str) -> io::Result<Next> {
        let mut words = arg.split_ascii_whitespace();
        let size = words.next().and_then(|n| n.parse::<usize>().ok());
        let last = match words.next() {
            None => Some(false),
            Some(w) if w.eq_ignore_ascii_case("LAST") => Some(true),
            Some(_) => None,
        };
        let (Some(size), Some(last), None) = (size, last, words.next()) else {
            self.send(conn, &reply(501, "5.5.4 Syntax error in parameters"))
                .await?;
            return Ok(Next::Continue);
        };
        // The chunk must be read even when it is refused (RFC 3030). A scripted refusal of
        // the DATA command refuses the first chunk and leaves the transaction open.
        let first = self.txn.as_ref().is_some_and(|t| t.chunks.is_none());
        let refusal = self.check_ready_for_data().or_else(|| {
            first
                .then(|| self.inner.script().data_command.clone())
                .flatten()
        });
        let txn = match (&refusal, self.txn.as_mut()) {
            (None, Some(t)) => Some(t),
            _ => None,
        };
        if txn.as_ref().is_some_and(|t| t.chunks.is_none()) && self.inner.take_mid_data_fault() {
            conn.read_chunk(size.min(MID_CHUNK_BYTES), None).await?;
            return Ok(Next::Drop);
        }
        let complete = match txn {
            Some(t) => {
                let chunks = t.chunks.get_or_insert_with(Vec::new);
                let over = t.too_big || chunks.len() + size > MAX_MESSAGE_BYTES;
                if over {
                    t.too_big = true;
                    chunks.clear();
                }
                conn.read_chunk(size, (!over).then_some(chunks)).await?
            }
            None => conn.read_chunk(size, None).await?,
        };
        if !complete {
            return Ok(Next::Close);
        }
        if let Some(r) = refusal {
            self.send(conn, &r).await?;
            return Ok(Next::Continue);
        }
        if !last {
            self.send(conn, &reply(250, &format!("2.0.0 {size} octets received")))
                .await?;
            return Ok(Next::Continue);
        }
        let (data, fits) = match self.txn.as_mut() {
            Some(t) => (t.chunks.take().unwrap_or_default(), !t.too_big),
            None => (Vec::new(), false),
        };
        self.finish(conn, data, fits).await
    }

    /// Decides the final reply for a complete message, stores it if accepted, ends the
    /// transaction.
    async fn finish(&mut self, conn: &mut Conn, data: Vec<u8>, fits: bool) -> io::Result<Next> {
        let txn = self.txn.take().unwrap_or_default();
        if self.inner.stalls_at(Stall::AtDataEnd) {
            return Ok(Next::Stall);
        }
        if let Some(action) = self.inner.fault_at(FaultPoint::DataEnd) {
            return Ok(action.into());
        }
        let n = self.inner.messages.fetch_add(1, Ordering::SeqCst) + 1;
        let scripted = self.inner.script().data.clone();
        let mut r = match scripted {
            _ if !fits => reply(552, "5.3.4 Message size exceeds fixed maximum message size"),
            Some(r) => r,
            None => reply(
                250,
                &format!(
                    "2.6.0 <FAKE{n}.{}@{HOST}> [InternalId={n}, Hostname={HOST}] {} bytes in \
                     0.001, Queued mail for delivery",
                    self.id,
                    data.len()
                ),
            ),
        };
        if r.is_positive() {
            let (auth_user, auth_token) = self.auth.clone().unwrap_or_default();
            let mut path = None;
            if let Some(dir) = &self.inner.save_dir {
                let p = dir.join(format!("{n}.eml"));
                match tokio::fs::write(&p, &data).await {
                    Ok(()) => path = Some(p),
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "fake upstream: cannot save message");
                        r = reply(451, "4.3.0 Could not save message [FAKE]");
                    }
                }
            }
            if r.is_positive() {
                let lost = self.inner.fault_at(FaultPoint::DataReply);
                self.inner.store(Received {
                    mail_from: txn.from,
                    mail_params: txn.params,
                    rcpts: txn.rcpts,
                    data,
                    auth_user,
                    auth_token,
                    tls: conn.is_tls(),
                    session: self.id,
                    path,
                });
                if let Some(action) = lost {
                    return Ok(action.into());
                }
            }
        }
        self.send(conn, &r).await?;
        Ok(Next::Continue)
    }
}

/// `"FROM:<a@b> SIZE=1"` -> `("a@b", "SIZE=1")`. The keyword is matched case-insensitively,
/// spaces after the colon are tolerated, and a `>` inside a quoted local part is skipped.
fn parse_path(arg: &str, keyword: &str) -> Option<(String, String)> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start();
    let inner = rest.strip_prefix('<')?;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in inner.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '>' if !quoted => {
                let addr = inner[..i].to_string();
                let params = inner[i + 1..].trim().to_string();
                return Some((addr, params));
            }
            _ => {}
        }
    }
    None
}

/// `user=<u>\x01auth=Bearer <t>\x01\x01` -> `(u, t)`.
fn parse_xoauth2(raw: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut user = None;
    let mut token = None;
    for field in text.split('\x01') {
        if let Some(u) = field.strip_prefix("user=") {
            user = Some(u.to_string());
        } else if let Some(a) = field.strip_prefix("auth=") {
            let (scheme, t) = a.split_once(' ')?;
            if scheme.eq_ignore_ascii_case("bearer") {
                token = Some(t.trim().to_string());
            }
        }
    }
    Some((user?, token?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths() {
        assert_eq!(
            parse_path("FROM:<a@b.c> SIZE=10 BODY=8BITMIME", "FROM:"),
            Some(("a@b.c".into(), "SIZE=10 BODY=8BITMIME".into()))
        );
        assert_eq!(
            parse_path("from: <>", "FROM:"),
            Some((String::new(), String::new()))
        );
        assert_eq!(
            parse_path("TO:<\"x>y\"@b>", "TO:"),
            Some(("\"x>y\"@b".into(), String::new()))
        );
        assert_eq!(parse_path("TO:a@b", "TO:"), None);
        assert_eq!(parse_path("FROM:<a@b", "FROM:"), None);
        assert_eq!(parse_path("TO:<a@b>", "FROM:"), None);
        assert_eq!(parse_path("", "FROM:"), None);
    }

    #[test]
    fn parses_xoauth2() {
        assert_eq!(
            parse_xoauth2(b"user=u@x\x01auth=Bearer tok\x01\x01"),
            Some(("u@x".into(), "tok".into()))
        );
        assert_eq!(parse_xoauth2(b"user=u@x\x01\x01"), None);
        assert_eq!(parse_xoauth2(b"auth=Bearer t\x01\x01"), None);
    }

    #[test]
    fn multiline_reply_wire_format() {
        let r = Reply::new(250, "a\nb\nc");
        assert_eq!(r.to_wire(), "250-a\r\n250-b\r\n250 c\r\n");
        assert_eq!(Reply::new(221, "bye").to_wire(), "221 bye\r\n");
    }
}
