//! Fake Microsoft 365 SMTP submission server (smtp.office365.com:587 lookalike) on a
//! listener the caller bound: real sockets, real STARTTLS (or implicit TLS), XOAUTH2 checked
//! against a [`FakeTokenEndpoint`], scripted replies, and a record of what it received.
//!
//! Owns the public handle [`FakeUpstream`] and its options, the accept loop, pause/resume,
//! the fault-injection knobs (mid-DATA drops, stalls, broken TLS, throttling, a concurrent
//! session limit, a close or stall at any protocol step, refused connections), whether
//! PIPELINING and CHUNKING are offered (a client that pipelines anyway is refused, like a
//! strict server), and the shared state sessions report into (the command log, grouped into
//! flights: the commands that arrived together). The per-connection protocol is `session.rs`,
//! buffered I/O `conn.rs`, DATA decoding `dot.rs`.

mod conn;
mod dot;
mod session;

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::token::FakeTokenEndpoint;

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// One SMTP reply. `text` carries the enhanced status code, e.g.
/// `Reply::new(550, "5.1.10 RESOLVER.ADR.RecipientNotFound; not found")`. A `\n` in `text`
/// makes a multi-line reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, text: &str) -> Reply {
        Reply {
            code,
            text: text.to_string(),
        }
    }

    /// What Microsoft 365 answers an AUTH beyond its concurrent-session limit (and what
    /// [`FakeUpstream::set_max_sessions`] sends):
    /// `432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded`.
    pub fn session_limit() -> Reply {
        Reply::new(
            432,
            "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
        )
    }

    /// 2xx (or 3xx) reply: the command was accepted.
    fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// The reply as sent: `code-line` CRLF for every line but the last, `code line` CRLF.
    fn to_wire(&self) -> String {
        let lines: Vec<&str> = self
            .text
            .split('\n')
            .map(|l| l.trim_end_matches('\r'))
            .collect();
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            out.push_str(&format!("{}{sep}{line}\r\n", self.code));
        }
        out
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// Where [`FakeUpstream::set_stall`] makes the server stop answering. A stalled session keeps
/// its socket open, reads and discards whatever the client sends and never replies again,
/// until the client closes it (or [`FakeUpstream::pause`]); clearing the knob does not revive
/// it. Each stalled session counts as one fault in [`FakeUpstream::data_faults`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    /// No greeting at all (after the TLS handshake, with implicit TLS).
    Greeting,
    /// The first command an authenticated session sends (MAIL FROM, NOOP, RSET, QUIT...) gets
    /// no reply. The AUTH itself is still answered `235`; sessions that authenticated before
    /// the knob was set stall at their next command too.
    AfterAuth,
    /// The DATA content (or BDAT LAST chunk) is read to its end, but the final reply is never
    /// sent and the message is not stored.
    AtDataEnd,
}

/// Where [`FakeUpstream::fail_at`] breaks a session: one point for each step of a submission
/// at which a real upstream (or the network) can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// Instead of the greeting (after the TLS handshake, with implicit TLS).
    Greeting,
    /// At an EHLO or HELO command (before or after TLS), before its reply.
    Ehlo,
    /// At STARTTLS, before its `220`.
    StartTls,
    /// At AUTH (any mechanism), before any reply.
    Auth,
    /// At MAIL FROM, before its reply.
    Mail,
    /// At the n-th RCPT TO (1-based) of a transaction, before its reply; RCPTs refused by a
    /// script count too.
    Rcpt(usize),
    /// At the DATA command, before its `354`; or at the first BDAT of a transaction, before
    /// its chunk is read (the point where a client commits to sending content).
    Data,
    /// After the whole content (the final dot) was read, before the message is stored: the
    /// upstream never took it.
    DataEnd,
    /// After the message was accepted and stored: its final `250` is lost. The one case in
    /// which a client cannot know the message went through.
    DataReply,
    /// At QUIT, before its `221`.
    Quit,
}

/// What [`FakeUpstream::fail_at`] does at its [`FaultPoint`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// Drop the TCP connection at once, without a reply (no TLS close_notify).
    Close,
    /// Never answer again: read and discard input until the client closes (or `pause`).
    Stall,
}

/// How the fake upstream behaves. Build with [`FakeUpstreamOptions::new`], then adjust.
#[derive(Clone, Debug)]
pub struct FakeUpstreamOptions {
    /// Server certificate chain (PEM), e.g. from `TestCa::issue_server_cert`.
    pub cert_pem: String,
    /// Its PKCS#8 private key (PEM).
    pub key_pem: String,
    /// Validate bearer tokens against this endpoint; `None` accepts any non-empty token.
    pub tokens: Option<FakeTokenEndpoint>,
    /// If set, the XOAUTH2 `user=` must be one of these (ASCII case-insensitive).
    pub mailbox_ok: Option<Vec<String>>,
    /// Advertise and accept STARTTLS (default true).
    pub offer_starttls: bool,
    /// TLS from the first byte, like port 465 (default false).
    pub implicit_tls: bool,
    /// Delay before every reply, greeting included (default zero).
    pub delay: Duration,
    /// If set, every accepted message is also written there as `<n>.eml` (n from 1).
    pub save_dir: Option<PathBuf>,
    /// Advertise PIPELINING (RFC 2920; default true, as Microsoft 365). When off, a command
    /// sent before the reply to the previous one (it arrived in the same read) is refused
    /// with `554 5.5.0` and counted in [`FakeUpstream::pipelining_violations`].
    pub offer_pipelining: bool,
    /// Advertise CHUNKING and BINARYMIME (RFC 3030; default true, as Microsoft 365). When
    /// off, BDAT is an unknown command (`500`, its chunk is not read: the session desyncs, as
    /// on a server that never heard of BDAT).
    pub offer_chunking: bool,
}

impl FakeUpstreamOptions {
    pub fn new(cert_pem: String, key_pem: String) -> Self {
        FakeUpstreamOptions {
            cert_pem,
            key_pem,
            tokens: None,
            mailbox_ok: None,
            offer_starttls: true,
            implicit_tls: false,
            delay: Duration::ZERO,
            save_dir: None,
            offer_pipelining: true,
            offer_chunking: true,
        }
    }
}

/// One message the fake upstream accepted (its DATA/BDAT got a 2xx reply).
#[derive(Clone, Debug)]
pub struct Received {
    /// The reverse path between `<>` exactly as sent (`""` for the null sender).
    pub mail_from: String,
    /// Everything after the closing `>` of MAIL FROM, trimmed (`"SIZE=123 BODY=8BITMIME"`).
    pub mail_params: String,
    /// Accepted recipients, exactly as sent between `<>`, in order.
    pub rcpts: Vec<String>,
    /// Message bytes after dot-unstuffing, without the terminating `.` line: exactly what
    /// the client submitted (normally ending in CRLF).
    pub data: Vec<u8>,
    /// The XOAUTH2 `user=`.
    pub auth_user: String,
    /// The bearer token the session authenticated with.
    pub auth_token: String,
    /// The session was under TLS.
    pub tls: bool,
    /// Connection number (1-based) the message came on.
    pub session: u64,
    /// Where it was saved, when `save_dir` is set.
    pub path: Option<PathBuf>,
}

/// Handle to a running fake upstream. Clones share the same server and state. The server
/// runs until the tokio runtime it was started on shuts down.
#[derive(Clone)]
pub struct FakeUpstream {
    inner: Arc<Inner>,
}

impl fmt::Debug for FakeUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeUpstream")
            .field("addr", &self.inner.addr)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

/// Replies and timing tests can change while the server runs.
#[derive(Debug, Default)]
struct Script {
    greeting: Option<Reply>,
    mail: Option<Reply>,
    /// Keyed by lower-cased address.
    rcpt: HashMap<String, Reply>,
    data: Option<Reply>,
    /// Reply to the DATA command itself (a refusal keeps the transaction open, as Postfix).
    data_command: Option<Reply>,
    auth: Option<Reply>,
    delay: Duration,
    stall: Option<Stall>,
    throttle: Option<Reply>,
    max_sessions: Option<usize>,
    starttls_inject: Option<Vec<u8>>,
    /// `fail_at`: where, what, and how many more times.
    fault: Option<(FaultPoint, FaultAction, usize)>,
}

pub(super) struct Inner {
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    tokens: Option<FakeTokenEndpoint>,
    mailbox_ok: Option<Vec<String>>,
    offer_starttls: bool,
    implicit_tls: bool,
    save_dir: Option<PathBuf>,
    offer_pipelining: AtomicBool,
    offer_chunking: AtomicBool,
    /// Commands refused because they were pipelined while PIPELINING was not offered.
    pipelining_violations: AtomicUsize,
    script: Mutex<Script>,
    received: Mutex<Vec<Received>>,
    /// `Message-ID` of each entry of `received`, same order; only locked while `received` is.
    message_ids: Mutex<Vec<String>>,
    log: Mutex<Vec<Logged>>,
    received_notify: Notify,
    connections: AtomicU64,
    auth_attempts: AtomicU64,
    /// Numbers messages (for `<n>.eml` and queue ids).
    messages: AtomicU64,
    open_sessions: AtomicU64,
    peak_sessions: AtomicU64,
    paused: AtomicBool,
    keep_data: AtomicBool,
    /// DATA transfers still to be cut off by `close_mid_data`.
    close_mid_data: AtomicUsize,
    /// `set_tls_failure`: answer STARTTLS with garbage instead of a handshake.
    tls_failure: AtomicBool,
    /// Faults injected so far (`data_faults`).
    faults: AtomicUsize,
    /// Sessions currently authenticated (for `set_max_sessions`).
    authenticated: AtomicUsize,
    /// Bumped by `pause`: every session ends.
    kill: watch::Sender<u64>,
    /// Bumped by `close_idle_sessions`: sessions waiting for a command end.
    idle: watch::Sender<u64>,
    /// `refuse_connections`: what the tests asked for (true = no listening socket).
    refuse: watch::Sender<bool>,
    /// What the accept loop did about it: true while the listening socket is closed.
    refusing: watch::Sender<bool>,
    /// The socket bound again by `refuse_connections(false)`, for the accept loop to take.
    /// While refusing: the port, bound but not listening.
    relisten: Mutex<Option<tokio::net::TcpSocket>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test double's state stays usable after a panic elsewhere; don't cascade panics.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// rustls server config from PEM, with the ring provider (never a process default).
fn tls_acceptor(cert_pem: &str, key_pem: &str) -> Result<TlsAcceptor, String> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cert_pem: {e}"))?;
    if certs.is_empty() {
        return Err("cert_pem holds no certificate".to_string());
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("key_pem: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| e.to_string())?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl FakeUpstream {
    /// Starts serving on `listener` (already bound, e.g. to `127.0.0.1:0`) in a spawned task.
    ///
    /// # Panics
    /// If `cert_pem`/`key_pem` are not a PEM certificate chain and its private key (a
    /// caller bug: use `TestCa::issue_server_cert`).
    pub async fn start(listener: TcpListener, opts: FakeUpstreamOptions) -> FakeUpstream {
        let addr = listener
            .local_addr()
            .expect("a bound TcpListener has a local address");
        let acceptor = tls_acceptor(&opts.cert_pem, &opts.key_pem)
            .unwrap_or_else(|e| panic!("FakeUpstreamOptions: invalid certificate or key: {e}"));
        let inner = Arc::new(Inner {
            addr,
            acceptor,
            tokens: opts.tokens,
            mailbox_ok: opts.mailbox_ok,
            offer_starttls: opts.offer_starttls,
            implicit_tls: opts.implicit_tls,
            save_dir: opts.save_dir,
            offer_pipelining: AtomicBool::new(opts.offer_pipelining),
            offer_chunking: AtomicBool::new(opts.offer_chunking),
            pipelining_violations: AtomicUsize::new(0),
            script: Mutex::new(Script {
                delay: opts.delay,
                ..Script::default()
            }),
            received: Mutex::new(Vec::new()),
            message_ids: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            received_notify: Notify::new(),
            connections: AtomicU64::new(0),
            auth_attempts: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            open_sessions: AtomicU64::new(0),
            peak_sessions: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            keep_data: AtomicBool::new(true),
            close_mid_data: AtomicUsize::new(0),
            tls_failure: AtomicBool::new(false),
            faults: AtomicUsize::new(0),
            authenticated: AtomicUsize::new(0),
            kill: watch::Sender::new(0),
            idle: watch::Sender::new(0),
            refuse: watch::Sender::new(false),
            refusing: watch::Sender::new(false),
            relisten: Mutex::new(None),
        });
        tokio::spawn(accept_loop(listener, inner.clone()));
        FakeUpstream { inner }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Messages accepted so far, in the order their final reply was decided.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.inner.received).clone()
    }

    /// Waits until at least `n` messages were received or `timeout` passed; returns what
    /// is there either way.
    pub async fn wait_received(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.inner.received_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.inner.received).len() >= n {
                return self.received();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.received();
            }
        }
    }

    /// The `Message-ID` header value of every received message, in [`FakeUpstream::received`]
    /// order: the first `Message-ID:` field of the header block (name matched ASCII
    /// case-insensitively, folded lines unfolded, value trimmed), or `""` if there is none.
    /// Taken before `set_keep_data(false)` discards the bytes, so it works either way.
    pub fn message_ids(&self) -> Vec<String> {
        let _received = lock(&self.inner.received);
        lock(&self.inner.message_ids).clone()
    }

    /// How many messages were accepted so far (cheap: clones nothing).
    pub fn received_count(&self) -> usize {
        lock(&self.inner.received).len()
    }

    /// Whether [`Received::data`] keeps the message bytes (default true). Benchmarks that
    /// push many large messages can turn it off to save memory: `data` is then recorded
    /// empty (`save_dir` still gets the full message).
    pub fn set_keep_data(&self, keep: bool) {
        self.inner.keep_data.store(keep, Ordering::SeqCst);
    }

    /// TCP connections accepted so far (including those closed at once while paused).
    pub fn connections(&self) -> u64 {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// AUTH commands seen (any mechanism, any outcome, before or after TLS).
    pub fn auth_attempts(&self) -> u64 {
        self.inner.auth_attempts.load(Ordering::SeqCst)
    }

    /// Sessions currently open.
    pub fn open_sessions(&self) -> u64 {
        self.inner.open_sessions.load(Ordering::SeqCst)
    }

    /// Most sessions ever open at once (to check a client's concurrency cap).
    pub fn peak_sessions(&self) -> u64 {
        self.inner.peak_sessions.load(Ordering::SeqCst)
    }

    /// Every command line received, in order, as `"S<n> <line>"` (DATA content excluded;
    /// AUTH continuation lines included).
    pub fn log(&self) -> Vec<String> {
        lock(&self.inner.log).iter().map(Logged::text).collect()
    }

    /// [`FakeUpstream::log`] grouped into flights, in order of each flight's first line: the
    /// command lines of one session that arrived without the server waiting for more input
    /// in between (e.g. `MAIL` and `RCPT` sent in one write by a pipelining client). A
    /// command following DATA content or a BDAT chunk in the same read belongs to the
    /// flight of the DATA or BDAT command.
    pub fn flights(&self) -> Vec<Vec<String>> {
        let log = lock(&self.inner.log);
        let mut keys: Vec<(u64, u64)> = Vec::new();
        let mut flights: Vec<Vec<String>> = Vec::new();
        for l in log.iter() {
            let key = (l.session, l.flight);
            match keys.iter().rposition(|k| *k == key) {
                Some(i) => flights[i].push(l.text()),
                None => {
                    keys.push(key);
                    flights.push(vec![l.text()]);
                }
            }
        }
        flights
    }

    /// Commands refused because the client sent them before the reply to the previous one
    /// while PIPELINING was not offered (see [`FakeUpstreamOptions::offer_pipelining`]).
    pub fn pipelining_violations(&self) -> usize {
        self.inner.pipelining_violations.load(Ordering::SeqCst)
    }

    /// Whether EHLO replies from now on offer PIPELINING (and pipelined commands are
    /// accepted); sessions check it at every command.
    pub fn set_offer_pipelining(&self, on: bool) {
        self.inner.offer_pipelining.store(on, Ordering::SeqCst);
    }

    /// Whether EHLO replies from now on offer CHUNKING (and BDAT is understood).
    pub fn set_offer_chunking(&self, on: bool) {
        self.inner.offer_chunking.store(on, Ordering::SeqCst);
    }

    /// Scripted reply to `RCPT TO:<addr>` (address compared ASCII case-insensitively);
    /// `None` restores the default `250 2.1.5 Recipient OK`. Non-2xx: not accepted.
    pub fn set_rcpt_reply(&self, addr: &str, reply: Option<Reply>) {
        let key = addr.to_ascii_lowercase();
        let mut s = lock(&self.inner.script);
        match reply {
            Some(r) => s.rcpt.insert(key, r),
            None => s.rcpt.remove(&key),
        };
    }

    /// Scripted final reply after DATA content (or BDAT LAST). The message is stored only if
    /// it is 2xx. `None`: `250 2.6.0 <id> [InternalId=...] Queued mail for delivery`.
    pub fn set_data_reply(&self, reply: Option<Reply>) {
        lock(&self.inner.script).data = reply;
    }

    /// Scripted refusal of the DATA command itself (no 354), or of the first BDAT chunk of a
    /// transaction (its bytes are read and discarded); the transaction stays open, so the
    /// next MAIL without RSET gets `503 5.5.2 Sender already specified`.
    pub fn set_data_command_reply(&self, reply: Option<Reply>) {
        lock(&self.inner.script).data_command = reply;
    }

    /// Scripted reply to MAIL FROM; non-2xx starts no transaction.
    pub fn set_mail_reply(&self, reply: Option<Reply>) {
        lock(&self.inner.script).mail = reply;
    }

    /// Forces the result of every later AUTH (after TLS and EHLO), whatever the token;
    /// 2xx authenticates. E.g. `535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.`
    pub fn set_auth_reply(&self, reply: Option<Reply>) {
        lock(&self.inner.script).auth = reply;
    }

    /// Replaces the greeting. A non-220 greeting (e.g. `421 4.3.2 Service not available`)
    /// is sent and the connection closed.
    pub fn set_greeting(&self, reply: Option<Reply>) {
        lock(&self.inner.script).greeting = reply;
    }

    /// Delay before every reply from now on.
    pub fn set_delay(&self, d: Duration) {
        lock(&self.inner.script).delay = d;
    }

    /// Simulates the upstream going down: open sessions are closed at once, and new
    /// connections are accepted and closed immediately (the client sees EOF or a reset
    /// before any greeting) until [`FakeUpstream::resume`].
    pub fn pause(&self) {
        self.inner.paused.store(true, Ordering::SeqCst);
        self.inner.kill.send_modify(|g| *g += 1);
    }

    /// Serves new connections again, on the same address.
    pub fn resume(&self) {
        self.inner.paused.store(false, Ordering::SeqCst);
    }

    /// Drops every connection that is waiting for its next command (as a server idle
    /// timeout would), without a reply. Sessions busy with a command are not affected.
    pub fn close_idle_sessions(&self) {
        self.inner.idle.send_modify(|g| *g += 1);
    }

    /// Cuts off the next `times` DATA transfers (on any session; replaces the previous
    /// count, `0` cancels): after the `354`, the server reads the content up to at least
    /// its first line (or a BDAT chunk's first bytes), then drops the TCP connection
    /// without a reply (no QUIT reply, no TLS close_notify). Nothing is stored. Each drop
    /// counts one fault.
    pub fn close_mid_data(&self, times: usize) {
        self.inner.close_mid_data.store(times, Ordering::SeqCst);
    }

    /// Makes sessions stop answering at `stall` (see [`Stall`]) from now on; `None` makes
    /// new sessions and commands behave normally again (already stalled sessions stay so).
    pub fn set_stall(&self, stall: Option<Stall>) {
        lock(&self.inner.script).stall = stall;
    }

    /// While on, every STARTTLS is answered `220 2.0.0 SMTP server ready` and then, instead
    /// of a TLS ServerHello, the server writes non-TLS garbage and closes the connection, so
    /// the client's handshake fails. Each counts one fault.
    pub fn set_tls_failure(&self, on: bool) {
        self.inner.tls_failure.store(on, Ordering::SeqCst);
    }

    /// While set, every MAIL FROM of an authenticated session without an open transaction
    /// gets `reply` (whatever `set_mail_reply` says), e.g.
    /// `451 4.7.500 Server busy. Please try again later` or
    /// `432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded`. Meant for 4xx/5xx: no
    /// transaction starts (a 2xx here is sent but starts none either). Each counts one fault.
    pub fn set_throttle(&self, reply: Option<Reply>) {
        lock(&self.inner.script).throttle = reply;
    }

    /// Microsoft 365's concurrent-connection limit: while `n` sessions are authenticated, a
    /// further successful AUTH is answered [`Reply::session_limit`] (`432 4.3.2
    /// STOREDRV.ClientSubmit; sender thread limit exceeded`) and the session stays open,
    /// unauthenticated (it may retry AUTH). Authenticated sessions are counted whether or not
    /// a limit is set; a session frees its slot when it ends. Each refusal counts one fault.
    pub fn set_max_sessions(&self, n: Option<usize>) {
        lock(&self.inner.script).max_sessions = n;
    }

    /// While set, every `220` to STARTTLS is followed, in the same write and still in
    /// plaintext, by these bytes (e.g. `b"250 2.0.0 Queued\r\n"`): STARTTLS response
    /// injection by the server or by anyone on the path. The handshake then proceeds as
    /// usual; a client that keeps the bytes would read them as replies inside TLS. Each
    /// counts one fault.
    pub fn set_starttls_inject(&self, bytes: Option<Vec<u8>>) {
        lock(&self.inner.script).starttls_inject = bytes;
    }

    /// Breaks the next `times` sessions that reach `point` (on any session; replaces the
    /// previous `fail_at`, `0` cancels): `action` happens there instead of the reply. With
    /// [`FaultAction::Close`], nothing is stored unless `point` is
    /// [`FaultPoint::DataReply`]. Each counts one fault. Once `times` are used up, sessions
    /// behave normally again (a stalled session stays stalled).
    pub fn fail_at(&self, point: FaultPoint, action: FaultAction, times: usize) {
        lock(&self.inner.script).fault = (times > 0).then_some((point, action, times));
    }

    /// How many `fail_at` faults are still to come (0 once used up or cancelled).
    pub fn faults_pending(&self) -> usize {
        lock(&self.inner.script).fault.map_or(0, |(_, _, n)| n)
    }

    /// `true`: closes the listening socket, so that new connections are refused (RST, like
    /// a host with nothing on the port); sessions already open go on. `false`: listens again
    /// on the same address. Returns once the socket is closed or listening again.
    ///
    /// # Panics
    /// If the address cannot be bound again (another process took the port meanwhile).
    pub async fn refuse_connections(&self, on: bool) {
        self.inner.refuse.send_replace(on);
        let mut refusing = self.inner.refusing.subscribe();
        refusing.wait_for(|r| *r == on).await.unwrap_or_else(|_| {
            panic!(
                "fake upstream on {}: the accept loop ended",
                self.inner.addr
            )
        });
    }

    /// Faults injected so far, of every kind: mid-DATA drops, stalled sessions, failed TLS
    /// handshakes, STARTTLS injections, throttled MAIL FROMs, session-limit AUTH refusals and
    /// `fail_at` faults.
    pub fn data_faults(&self) -> usize {
        self.inner.faults.load(Ordering::SeqCst)
    }
}

impl Inner {
    fn script(&self) -> MutexGuard<'_, Script> {
        lock(&self.script)
    }

    fn record_line(&self, session: u64, flight: u64, line: &str) {
        lock(&self.log).push(Logged {
            session,
            flight,
            line: line.to_string(),
        });
    }

    fn offers_pipelining(&self) -> bool {
        self.offer_pipelining.load(Ordering::SeqCst)
    }

    fn offers_chunking(&self) -> bool {
        self.offer_chunking.load(Ordering::SeqCst)
    }

    fn store(&self, mut msg: Received) {
        let id = message_id(&msg.data);
        if !self.keep_data.load(Ordering::SeqCst) {
            msg.data = Vec::new();
        }
        let mut received = lock(&self.received);
        received.push(msg);
        lock(&self.message_ids).push(id);
        drop(received);
        self.received_notify.notify_waiters();
    }

    fn fault(&self) {
        self.faults.fetch_add(1, Ordering::SeqCst);
    }

    /// Takes one `close_mid_data` drop, if any are left.
    fn take_mid_data_fault(&self) -> bool {
        let taken = self
            .close_mid_data
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if taken {
            self.fault();
        }
        taken
    }

    /// The `fail_at` action at `point`, if one is due there now; counts the fault if so.
    fn fault_at(&self, point: FaultPoint) -> Option<FaultAction> {
        let mut script = self.script();
        let (at, action, times) = script.fault?;
        if at != point {
            return None;
        }
        script.fault = (times > 1).then_some((at, action, times - 1));
        drop(script);
        self.fault();
        Some(action)
    }

    /// Whether sessions should stall at `at` now; counts the fault if so.
    fn stalls_at(&self, at: Stall) -> bool {
        let stall = self.script().stall == Some(at);
        if stall {
            self.fault();
        }
        stall
    }

    /// Claims an authenticated-session slot, unless `set_max_sessions` is reached.
    fn take_auth_slot(self: &Arc<Self>) -> Option<AuthSlot> {
        let max = self.script().max_sessions.unwrap_or(usize::MAX);
        self.authenticated
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| AuthSlot(self.clone()))
    }
}

/// One command line received: its session, its flight within the session (see
/// [`FakeUpstream::flights`]) and the line.
struct Logged {
    session: u64,
    flight: u64,
    line: String,
}

impl Logged {
    fn text(&self) -> String {
        format!("S{} {}", self.session, self.line)
    }
}

/// One authenticated session, counted for `set_max_sessions` until dropped.
pub(super) struct AuthSlot(Arc<Inner>);

impl Drop for AuthSlot {
    fn drop(&mut self) {
        self.0.authenticated.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The first `Message-ID:` field of the header block of `data` (unfolded, trimmed), or `""`.
fn message_id(data: &[u8]) -> String {
    let mut value: Option<Vec<u8>> = None;
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let folded = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        match value.as_mut() {
            Some(v) if folded => v.extend_from_slice(line),
            Some(_) => break,
            None => {
                let Some(colon) = line.iter().position(|&b| b == b':') else {
                    continue;
                };
                if line[..colon]
                    .trim_ascii_end()
                    .eq_ignore_ascii_case(b"message-id")
                {
                    value = Some(line[colon + 1..].to_vec());
                }
            }
        }
    }
    value
        .map(|v| String::from_utf8_lossy(v.trim_ascii()).into_owned())
        .unwrap_or_default()
}

/// A socket bound to `addr` (SO_REUSEADDR, as listeners are) but not listening.
fn hold_port(addr: SocketAddr) -> tokio::net::TcpSocket {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    };
    socket
        .and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(addr)?;
            Ok(s)
        })
        .unwrap_or_else(|e| panic!("fake upstream: cannot hold {addr} while refusing: {e}"))
}

/// Decrements the open-session count when a session ends, however it ends.
struct OpenGuard(Arc<Inner>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open_sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    let mut listener = Some(listener);
    let mut refuse = inner.refuse.subscribe();
    loop {
        let refusing = *refuse.borrow_and_update();
        if refusing && listener.is_some() {
            // The port stays ours while we refuse: a socket bound but not listening makes
            // the kernel answer connections with RST (refused), and no other test can take
            // the port meanwhile; listening again is `listen()` on that same socket.
            listener = None;
            *lock(&inner.relisten) = Some(hold_port(inner.addr));
            inner.refusing.send_replace(true);
        } else if !refusing && listener.is_none() {
            let held = lock(&inner.relisten).take();
            listener = held.map(|s| {
                s.listen(1024).unwrap_or_else(|e| {
                    panic!("fake upstream: cannot listen on {} again: {e}", inner.addr)
                })
            });
            if listener.is_some() {
                inner.refusing.send_replace(false);
            }
        }
        let Some(l) = listener.as_ref() else {
            if refuse.changed().await.is_err() {
                return;
            }
            continue;
        };
        let (tcp, peer) = tokio::select! {
            changed = refuse.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            conn = l.accept() => match conn {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "fake upstream: accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        // Like a production MTA's reply path: a reply is never held back by Nagle waiting
        // for the ACK of the previous one (which a client's delayed ACK turns into a 40 ms
        // stall per exchange, an artifact no real upstream shows).
        let _ = tcp.set_nodelay(true);
        let id = inner.connections.fetch_add(1, Ordering::SeqCst) + 1;
        // Subscribe before checking `paused`, so a concurrent `pause` either is seen here
        // or bumps `kill` after we subscribed.
        let mut kill = inner.kill.subscribe();
        let idle = inner.idle.subscribe();
        if inner.paused.load(Ordering::SeqCst) {
            drop(tcp);
            continue;
        }
        let open = inner.open_sessions.fetch_add(1, Ordering::SeqCst) + 1;
        inner.peak_sessions.fetch_max(open, Ordering::SeqCst);
        let guard = OpenGuard(inner.clone());
        let inner = inner.clone();
        tokio::spawn(async move {
            let _guard = guard;
            tokio::select! {
                biased;
                _ = kill.changed() => {}
                done = session::run(&inner, tcp, peer, id, idle) => {
                    if let Err(e) = done {
                        tracing::debug!(session = id, error = %e, "fake upstream: session ended");
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod tests;
