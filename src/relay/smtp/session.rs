//! One upstream SMTP session: connect, STARTTLS (required, verified) or implicit TLS, AUTH
//! XOAUTH2, and the transaction commands, on our own client (`client.rs`).
//!
//! Round trips are what a distant upstream costs, so where the upstream offers them: the
//! envelope (MAIL and the recipients known so far) goes in one write with PIPELINING (RFC
//! 2920), each reply still read in order and matched to its own command; and content goes
//! as BDAT chunks with CHUNKING (RFC 3030): no DATA/354 round trip, chunks written without
//! waiting for their replies (which are read as they come, and all of them after the last
//! chunk), a small message as one `BDAT n LAST` write. Without them, one command per round
//! trip and DATA with dot-stuffing, as before.
//!
//! Every operation is bounded by `upstream.timeout_secs` (each piece of content too; the
//! final reply by a limit that grows with the message's size). Content is streamed: piece by
//! piece as the local client sends it (at most one BDAT chunk, [`BDAT_CHUNK`], is gathered),
//! never held whole. A session whose command failed on the network, timed out, broke the
//! protocol or got a 421 is broken and must not be reused. Pooling, token choice and reply
//! mapping live in `relay::pool` and `relay::outcome`.

use super::client::{ChunkBuf, ClientError, Connection, DotStuffer};
use super::reply::{Capabilities, Reply, UpReply};
use crate::config::{Upstream, UpstreamSecurity};
use crate::secret::Secret;
use base64::Engine as _;
use rustls::pki_types::ServerName;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::TlsConnector;

/// Slowest upload we wait for when sending a large message (bytes per second).
const MIN_UPLOAD_RATE: u64 = 256 * 1024;
/// How long a polite QUIT may take when we close an idle session.
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);
/// Content gathered before it goes as one BDAT chunk: large enough that a chunk's command
/// and reply cost nothing next to its bytes, small enough to bound memory per session.
pub(crate) const BDAT_CHUNK: usize = 128 * 1024;

/// Why the upstream target cannot be set up from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("upstream.ca_file {}: {source}", path.display())]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("upstream.ca_file {}: no certificate in it", path.display())]
    NoCertificate { path: PathBuf },
    #[error("upstream.ca_file {}: {source}", path.display())]
    BadCertificate {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("upstream TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("upstream.host {0:?} is not a valid TLS server name")]
    ServerName(String),
}

/// Where and how to reach the upstream; built once (TLS roots are loaded here).
#[derive(Clone)]
pub struct UpstreamTarget {
    pub host: String,
    pub port: u16,
    pub security: UpstreamSecurity,
    pub timeout: Duration,
    connector: TlsConnector,
    name: ServerName<'static>,
    hello: String,
}

impl fmt::Debug for UpstreamTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .finish_non_exhaustive()
    }
}

impl UpstreamTarget {
    /// A verifying rustls client (ring provider): system roots plus `ca_file`.
    pub fn new(cfg: &Upstream) -> Result<UpstreamTarget, TargetError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path).map_err(|source| TargetError::CaFile {
                path: path.clone(),
                source,
            })?;
            let mut found = false;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|source| TargetError::CaFile {
                    path: path.clone(),
                    source,
                })?;
                roots
                    .add(cert)
                    .map_err(|source| TargetError::BadCertificate {
                        path: path.clone(),
                        source,
                    })?;
                found = true;
            }
            if !found {
                return Err(TargetError::NoCertificate { path: path.clone() });
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = ServerName::try_from(cfg.host.clone())
            .map_err(|_| TargetError::ServerName(cfg.host.clone()))?;
        Ok(UpstreamTarget {
            host: cfg.host.clone(),
            port: cfg.port,
            security: cfg.security,
            timeout: cfg.timeout,
            connector: TlsConnector::from(Arc::new(config)),
            name,
            hello: local_hostname(),
        })
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// This host's name (for EHLO upstream and the local greeting), or `localhost`.
pub fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && h.is_ascii() && !h.contains(char::is_whitespace))
        .unwrap_or_else(|| "localhost".to_string())
}

/// Why an upstream operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// No usable session could be set up (connect, greeting, TLS, STARTTLS missing).
    #[error("cannot connect to upstream: {0}")]
    Connect(String),
    /// The session broke mid-way (network error, timeout, protocol garbage).
    #[error("lost connection to upstream: {0}")]
    Lost(String),
    /// The upstream answered with a negative reply.
    #[error("upstream replied {0}")]
    Reply(UpReply),
}

/// One command's exchange with a time limit: a timeout or a wire error is a lost session,
/// a negative reply an `UpstreamError::Reply`.
async fn bounded(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = Result<Reply, ClientError>>,
) -> Result<UpReply, UpstreamError> {
    match within(limit, fut).await {
        None => Err(UpstreamError::Lost(format!(
            "no answer to {what} within {}s",
            limit.as_secs()
        ))),
        Some(Err(e)) => Err(UpstreamError::Lost(format!("{what}: {e}"))),
        Some(Ok(r)) if r.code < 400 => Ok(r.to_up()),
        Some(Ok(r)) => Err(UpstreamError::Reply(r.to_up())),
    }
}

/// Runs `fut` with a time limit; `None` if it ran out.
async fn within<T>(limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(limit, fut).await.ok()
}

/// An authenticated (or about to be) upstream session.
pub struct UpstreamSession {
    conn: Connection,
    timeout: Duration,
    broken: bool,
    caps: Capabilities,
    /// The content being sent (after DATA's 354 or the decision to use BDAT, until the
    /// final reply).
    content: Option<Content>,
}

/// Content on its way.
#[derive(Debug)]
enum Content {
    /// After DATA's 354: the stuffing state across pieces and the bytes so far.
    Data { stuffer: DotStuffer, bytes: u64 },
    /// BDAT: the next chunk being gathered and the bytes so far.
    Bdat { chunk: ChunkBuf, bytes: u64 },
}

impl Default for Content {
    fn default() -> Self {
        Content::Data {
            stuffer: DotStuffer::new(),
            bytes: 0,
        }
    }
}

impl Content {
    fn add_bytes(&mut self, n: usize) {
        match self {
            Content::Data { bytes, .. } | Content::Bdat { bytes, .. } => *bytes += n as u64,
        }
    }
}

impl fmt::Debug for UpstreamSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamSession")
            .field("broken", &self.broken)
            .field("caps", &self.caps)
            .finish_non_exhaustive()
    }
}

impl UpstreamSession {
    /// Connects, reads the greeting, EHLO, and secures the session (STARTTLS or implicit
    /// TLS, then EHLO again).
    pub(crate) async fn connect(t: &UpstreamTarget) -> Result<UpstreamSession, UpstreamError> {
        let addr = t.addr();
        let fail = |m: String| UpstreamError::Connect(format!("{addr}: {m}"));
        let (conn, caps) = match within(t.timeout, Self::open(t)).await {
            None => return Err(UpstreamError::Connect(format!("{addr} timed out"))),
            Some(r) => r.map_err(fail)?,
        };
        let (conn, caps) = match t.security {
            UpstreamSecurity::Tls => (conn, caps),
            UpstreamSecurity::StartTls => {
                if !caps.starttls {
                    let mut conn = conn;
                    conn.shutdown().await;
                    return Err(UpstreamError::Connect(format!(
                        "{addr} does not offer STARTTLS; refusing to authenticate in plaintext"
                    )));
                }
                match within(t.timeout, Self::starttls(t, conn)).await {
                    None => return Err(fail("STARTTLS timed out".into())),
                    Some(r) => r.map_err(fail)?,
                }
            }
        };
        Ok(UpstreamSession {
            conn,
            timeout: t.timeout,
            broken: false,
            caps,
            content: None,
        })
    }

    /// TCP (and TLS, if implicit), the greeting, EHLO.
    async fn open(t: &UpstreamTarget) -> Result<(Connection, Capabilities), String> {
        let mut conn = Connection::connect(&t.host, t.port)
            .await
            .map_err(|e| e.to_string())?;
        if t.security == UpstreamSecurity::Tls {
            conn = conn
                .tls(&t.connector, &t.name)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
        }
        let greeting = conn
            .read_reply()
            .await
            .map_err(|e| format!("greeting: {e}"))?;
        if greeting.code != 220 {
            return Err(format!("said {}", greeting.to_up()));
        }
        let caps = ehlo(&mut conn, &t.hello).await?;
        Ok((conn, caps))
    }

    /// STARTTLS, the handshake, EHLO again. Nothing the server sent before the handshake
    /// may survive it.
    async fn starttls(
        t: &UpstreamTarget,
        mut conn: Connection,
    ) -> Result<(Connection, Capabilities), String> {
        let injected = |e: ClientError| match e {
            ClientError::Unsolicited(bytes) => {
                format!("sent data after its STARTTLS reply (\"{bytes}\"); refusing the session")
            }
            e => format!("STARTTLS failed: {e}"),
        };
        conn.send_line(b"STARTTLS")
            .await
            .map_err(|e| format!("STARTTLS: {e}"))?;
        let r = conn.read_reply().await.map_err(injected)?;
        if r.code != 220 {
            return Err(format!("STARTTLS failed: {}", r.to_up()));
        }
        let mut conn = conn
            .starttls(&t.connector, &t.name)
            .await
            .map_err(injected)?;
        let caps = ehlo(&mut conn, &t.hello).await?;
        Ok((conn, caps))
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken
    }

    /// Marks the session broken (e.g. mid-content with nothing more to send): it must be
    /// closed, never reused or ended with a final dot.
    pub(crate) fn break_off(&mut self) {
        self.broken = true;
        self.content = None;
    }

    /// What the upstream announced in its EHLO reply (after TLS).
    #[cfg(test)]
    pub(crate) fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// Reads the next owed reply within the timeout; marks the session broken as
    /// [`UpstreamSession::exchange`] does.
    async fn read_one(&mut self, what: &str) -> Result<UpReply, UpstreamError> {
        if self.broken {
            return Err(UpstreamError::Lost("session already broken".into()));
        }
        let r = bounded(what, self.timeout, self.conn.read_reply()).await;
        self.note(r)
    }

    /// MAIL and then RCPT for each of `rcpts` (command lines without CRLF): the MAIL
    /// verdict (`Err` if refused or lost, then no recipient counts) and each recipient's.
    /// With PIPELINING all of them go in one write and the replies are read in order, each
    /// matched to its own command (after a refused MAIL the recipients' replies are read
    /// and dropped); without it, one command per round trip, no RCPT after a refused MAIL.
    pub(crate) async fn envelope(
        &mut self,
        mail: &str,
        rcpts: &[String],
    ) -> Result<(UpReply, Vec<Result<UpReply, UpstreamError>>), UpstreamError> {
        if !self.caps.pipelining || rcpts.is_empty() {
            let m = self.command(mail).await?;
            let mut verdicts = Vec::with_capacity(rcpts.len());
            for r in rcpts {
                verdicts.push(self.command(r).await);
            }
            return Ok((m, verdicts));
        }
        if self.broken {
            return Err(UpstreamError::Lost("session already broken".into()));
        }
        let lines: Vec<&[u8]> = std::iter::once(mail)
            .chain(rcpts.iter().map(String::as_str))
            .map(str::as_bytes)
            .collect();
        let sent = within(self.timeout, self.conn.send_lines(&lines)).await;
        let lost = match sent {
            Some(Ok(())) => None,
            None => Some(format!("MAIL not taken within {}s", self.timeout.as_secs())),
            Some(Err(e)) => Some(format!("MAIL: {e}")),
        };
        if let Some(e) = lost {
            self.broken = true;
            return Err(UpstreamError::Lost(e));
        }
        let m = self.read_one("MAIL").await;
        let mut verdicts = Vec::with_capacity(rcpts.len());
        for _ in rcpts {
            verdicts.push(self.read_one("RCPT").await);
        }
        Ok((m?, verdicts))
    }

    /// Whether content goes as BDAT chunks (the upstream offers CHUNKING).
    pub(crate) fn chunking(&self) -> bool {
        self.caps.chunking
    }

    /// Announces the content: with CHUNKING nothing goes upstream yet (the first BDAT
    /// carries content) and `None` is returned; otherwise DATA, whose reply is returned
    /// (the caller checks it is 354).
    pub(crate) async fn start_content(&mut self) -> Result<Option<UpReply>, UpstreamError> {
        if self.broken {
            return Err(UpstreamError::Lost("session already broken".into()));
        }
        if self.caps.chunking {
            self.content = Some(Content::Bdat {
                chunk: ChunkBuf::new(),
                bytes: 0,
            });
            return Ok(None);
        }
        let r = self.command("DATA").await?;
        if r.code == 354 {
            self.content = Some(Content::default());
        }
        Ok(Some(r))
    }

    /// Sends `line` (without CRLF) and reads its reply; marks the session broken on a
    /// network failure, a protocol error, a timeout or a 421.
    async fn exchange(&mut self, what: &str, line: &[u8]) -> Result<UpReply, UpstreamError> {
        if self.broken {
            return Err(UpstreamError::Lost("session already broken".into()));
        }
        let conn = &mut self.conn;
        let r = bounded(what, self.timeout, async {
            conn.send_line(line).await?;
            conn.read_reply().await
        })
        .await;
        self.note(r)
    }

    /// Marks the session broken after a network failure, a timeout or a 421.
    fn note(&mut self, r: Result<UpReply, UpstreamError>) -> Result<UpReply, UpstreamError> {
        match &r {
            Err(UpstreamError::Lost(_)) => self.broken = true,
            Err(UpstreamError::Reply(rep)) if rep.code == 421 => self.broken = true,
            _ => {}
        }
        r
    }

    /// AUTH XOAUTH2 with base64("user=" mailbox "\x01auth=Bearer " token "\x01\x01").
    pub(crate) async fn auth_xoauth2(
        &mut self,
        mailbox: &str,
        token: &Secret,
    ) -> Result<UpReply, UpstreamError> {
        let payload = Secret::new(format!(
            "user={mailbox}\x01auth=Bearer {}\x01\x01",
            token.expose()
        ));
        let cmd = Secret::new(format!(
            "AUTH XOAUTH2 {}",
            base64::engine::general_purpose::STANDARD.encode(payload.expose())
        ));
        match self.exchange("AUTH", cmd.expose().as_bytes()).await {
            // 334 + base64 JSON error: the server wants an empty line, then sends the 535.
            Ok(r) if r.code == 334 => match self.exchange("AUTH", b"").await {
                // Anything but a final verdict here is not a success.
                Ok(r) if r.code != 235 => {
                    self.broken = true;
                    Err(UpstreamError::Lost(format!("AUTH: unexpected {r}")))
                }
                r => r,
            },
            r => r,
        }
    }

    /// Sends one command line (without CRLF); a positive reply is `Ok`.
    pub async fn command(&mut self, line: &str) -> Result<UpReply, UpstreamError> {
        let name = line.split(' ').next().unwrap_or("command").to_string();
        self.exchange(&name, line.as_bytes()).await
    }

    /// DATA, the content (unstuffed, as the client sent it), and the final reply.
    #[cfg(test)]
    pub(crate) async fn data(&mut self, content: &[u8]) -> Result<UpReply, UpstreamError> {
        self.command("DATA").await?;
        self.body(content).await
    }

    /// After the upstream's 354: the whole content and the final reply.
    #[cfg(test)]
    pub(crate) async fn body(&mut self, content: &[u8]) -> Result<UpReply, UpstreamError> {
        self.body_chunk(content).await?;
        self.body_end().await
    }

    /// After the upstream's 354 (or [`UpstreamSession::start_content`]): one piece of the
    /// content (unstuffed, as the client sent it, split anywhere). For DATA it is
    /// dot-stuffed and written now; for BDAT it is gathered, and each full chunk is written
    /// without waiting for its reply (replies already here are checked first: a refused
    /// chunk fails the transaction). Each write is bounded by `upstream.timeout_secs`. A
    /// failure breaks the session: it is mid-content.
    pub(crate) async fn body_chunk(&mut self, piece: &[u8]) -> Result<(), UpstreamError> {
        if self.broken {
            return Err(UpstreamError::Lost("session already broken".into()));
        }
        let timeout = self.timeout;
        let pipelining = self.caps.pipelining;
        let body = self.content.get_or_insert_with(Content::default);
        body.add_bytes(piece.len());
        let conn = &mut self.conn;
        let failed = match body {
            Content::Data { stuffer, .. } => {
                match within(timeout, conn.send_content_chunk(stuffer, piece)).await {
                    Some(Ok(())) => return Ok(()),
                    None => {
                        Failed::Lost(format!("content not taken within {}s", timeout.as_secs()))
                    }
                    Some(Err(e)) => Failed::Lost(format!("DATA: {e}")),
                }
            }
            Content::Bdat { chunk, .. } => {
                chunk.push(piece);
                if chunk.len() < BDAT_CHUNK {
                    return Ok(());
                }
                match send_chunk(conn, chunk, timeout, pipelining).await {
                    Ok(()) => return Ok(()),
                    Err(f) => f,
                }
            }
        };
        self.broken = true;
        self.content = None;
        Err(match failed {
            Failed::Lost(e) => UpstreamError::Lost(e),
            Failed::Refused(r) => UpstreamError::Reply(r),
        })
    }

    /// Ends the content and reads the final reply, within a limit that grows with the
    /// message (the upstream may scan it): at least MIN_UPLOAD_RATE bytes a second. DATA:
    /// CRLF.CRLF and its reply. BDAT: the rest as `BDAT n LAST`, then every reply still
    /// owed, in order: a refused earlier chunk is the verdict, else the last chunk's reply.
    pub(crate) async fn body_end(&mut self) -> Result<UpReply, UpstreamError> {
        let body = self.content.take().unwrap_or_default();
        if self.broken {
            return Err(UpstreamError::Lost("session already broken".into()));
        }
        let conn = &mut self.conn;
        let r = match body {
            Content::Data { stuffer, bytes } => {
                let limit = self.timeout + Duration::from_secs(bytes / MIN_UPLOAD_RATE);
                bounded("DATA", limit, async {
                    conn.end_content(&stuffer).await?;
                    conn.read_reply().await
                })
                .await
            }
            Content::Bdat { mut chunk, bytes } => {
                let limit = self.timeout + Duration::from_secs(bytes / MIN_UPLOAD_RATE);
                bounded("BDAT", limit, async {
                    conn.send_bdat(chunk.framed(true), true).await?;
                    let mut refused = None;
                    loop {
                        let r = conn.read_reply().await?;
                        if conn.owed() == 0 {
                            return Ok(refused.unwrap_or(r));
                        }
                        if !(200..300).contains(&r.code) && refused.is_none() {
                            refused = Some(r);
                        }
                    }
                })
                .await
            }
        };
        self.note(r)
    }

    /// Closes politely (QUIT), bounded.
    pub async fn close(mut self) {
        if !self.broken {
            let _ = within(QUIT_TIMEOUT, self.exchange("QUIT", b"QUIT")).await;
        }
        let _ = within(QUIT_TIMEOUT, self.conn.shutdown()).await;
    }
}

/// Why a BDAT chunk did not go through.
enum Failed {
    Lost(String),
    Refused(UpReply),
}

/// Writes the gathered chunk as `BDAT n` (not the last), after checking the replies to
/// earlier chunks that are already here; without PIPELINING, waits for its reply.
async fn send_chunk(
    conn: &mut Connection,
    chunk: &mut ChunkBuf,
    timeout: Duration,
    pipelining: bool,
) -> Result<(), Failed> {
    let refused = |r: Reply| Failed::Refused(r.to_up());
    loop {
        match conn.try_read_reply() {
            Ok(None) => break,
            Ok(Some(r)) if (200..300).contains(&r.code) => {}
            Ok(Some(r)) => return Err(refused(r)),
            Err(e) => return Err(Failed::Lost(format!("BDAT: {e}"))),
        }
    }
    let sent = within(timeout, async {
        conn.send_bdat(chunk.framed(false), false).await?;
        if pipelining {
            return Ok(None);
        }
        conn.read_reply().await.map(Some)
    })
    .await;
    chunk.clear();
    match sent {
        None => Err(Failed::Lost(format!(
            "content not taken within {}s",
            timeout.as_secs()
        ))),
        Some(Err(e)) => Err(Failed::Lost(format!("BDAT: {e}"))),
        Some(Ok(Some(r))) if !(200..300).contains(&r.code) => Err(refused(r)),
        Some(Ok(_)) => Ok(()),
    }
}

/// EHLO with our name; its capabilities.
async fn ehlo(conn: &mut Connection, hello: &str) -> Result<Capabilities, String> {
    let line = format!("EHLO {hello}");
    conn.send_line(line.as_bytes())
        .await
        .map_err(|e| format!("EHLO: {e}"))?;
    let r = conn.read_reply().await.map_err(|e| format!("EHLO: {e}"))?;
    if r.code != 250 {
        return Err(format!("said {} to EHLO", r.to_up()));
    }
    Ok(Capabilities::from_ehlo(&r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    /// One scripted upstream connection: sends `greeting`, then for each line it reads,
    /// the next answer in `answers` (raw bytes); records the lines.
    async fn scripted(
        greeting: &'static [u8],
        answers: Vec<&'static [u8]>,
    ) -> (UpstreamTarget, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let (r, mut w) = tcp.into_split();
            let mut r = BufReader::new(r);
            let mut seen = Vec::new();
            w.write_all(greeting).await.expect("greeting");
            for answer in answers {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    break;
                }
                seen.push(line.trim_end().to_string());
                let _ = w.write_all(answer).await;
            }
            // Whatever else comes, until the client closes.
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                seen.push(line.trim_end().to_string());
                line.clear();
            }
            seen
        });
        let cfg = Upstream {
            host: "127.0.0.1".into(),
            port,
            security: UpstreamSecurity::StartTls,
            ca_file: None,
            timeout: Duration::from_secs(5),
            max_sessions_per_mailbox: 1,
            idle: Duration::from_secs(60),
            warm_sessions: 0,
            messages_per_minute: 0,
            transport: crate::config::TransportKind::Smtp,
            graph_url: String::new(),
            save_to_sent_items: false,
        };
        (UpstreamTarget::new(&cfg).expect("target"), server)
    }

    const EHLO: &[u8] = b"250-mx Hello\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 SIZE 1000\r\n";

    async fn connect_err(t: &UpstreamTarget) -> String {
        match UpstreamSession::connect(t).await {
            Err(UpstreamError::Connect(m)) => m,
            other => panic!("expected a connect error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn bytes_after_the_starttls_reply_abort_the_session() {
        let (t, server) = scripted(
            b"220 mx ready\r\n",
            vec![
                EHLO,
                b"220 2.0.0 Ready to start TLS\r\n250 2.0.0 Queued\r\n",
            ],
        )
        .await;
        let m = connect_err(&t).await;
        assert!(m.contains("sent data after its STARTTLS reply"), "{m}");
        assert!(m.contains("250 2.0.0 Queued"), "{m}");
        let seen = server.await.expect("server");
        assert_eq!(seen[1], "STARTTLS");
        assert_eq!(seen.len(), 2, "nothing sent after STARTTLS: {seen:?}");
    }

    #[tokio::test]
    async fn no_starttls_offered_means_no_session() {
        let (t, server) = scripted(b"220 mx ready\r\n", vec![b"250-mx\r\n250 SIZE 1\r\n"]).await;
        let m = connect_err(&t).await;
        assert!(m.contains("does not offer STARTTLS"), "{m}");
        let seen = server.await.expect("server");
        assert_eq!(seen.len(), 1, "only EHLO: {seen:?}");
        assert!(seen[0].starts_with("EHLO "), "{seen:?}");
    }

    #[tokio::test]
    async fn a_reply_nobody_asked_for_is_not_taken_as_the_next_one() {
        // A second reply right behind the greeting would otherwise answer our EHLO.
        let (t, server) = scripted(b"220 mx ready\r\n250-mx\r\n250 STARTTLS\r\n", vec![]).await;
        let m = connect_err(&t).await;
        assert!(m.contains("did not ask for"), "{m}");
        assert!(server.await.expect("server").is_empty(), "no EHLO sent");
        // And behind the EHLO reply, before STARTTLS.
        let (t, server) = scripted(
            b"220 mx ready\r\n",
            vec![b"250-mx\r\n250 STARTTLS\r\n220 2.0.0 Ready to start TLS\r\n"],
        )
        .await;
        let m = connect_err(&t).await;
        assert!(m.contains("did not ask for"), "{m}");
        assert_eq!(server.await.expect("server").len(), 1, "no STARTTLS sent");
    }

    #[tokio::test]
    async fn a_greeting_that_never_ends_is_refused() {
        let mut long = b"220-".to_vec();
        long.resize(super::super::reply::MAX_LINE * 2, b'x');
        let long: &'static [u8] = long.leak();
        let (t, _server) = scripted(long, vec![]).await;
        let m = connect_err(&t).await;
        assert!(m.contains("reply line longer than"), "{m}");
        let (t, _server) = scripted(b"421 4.3.2 not now\r\n", vec![]).await;
        let m = connect_err(&t).await;
        assert!(m.contains("421 4.3.2 not now"), "{m}");
    }

    /// A whole session over real TLS against a scripted server with a self-signed
    /// certificate (trusted through `ca_file`): STARTTLS, the EHLO after TLS (whose
    /// capabilities count), XOAUTH2 refused via 334 + empty line, a message, QUIT.
    #[tokio::test]
    async fn starttls_ehlo_again_auth_and_a_message() {
        let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, key.cert.pem()).expect("write ca");
        let certs = vec![key.cert.der().clone()];
        let pkey = rustls::pki_types::PrivateKeyDer::try_from(key.signing_key.serialize_der())
            .expect("key");
        let server_cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, pkey)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut plain = BufReader::new(tcp);
            let mut line = String::new();
            plain.get_mut().write_all(b"220 mx\r\n").await.expect("w");
            for answer in [
                &b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n"[..],
                b"220 go\r\n",
            ] {
                line.clear();
                plain.read_line(&mut line).await.expect("r");
                seen.push(line.trim_end().to_string());
                plain.get_mut().write_all(answer).await.expect("w");
            }
            let mut tls = BufReader::new(acceptor.accept(plain.into_inner()).await.expect("tls"));
            let answers: [&[u8]; 6] = [
                b"250-mx\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n",
                b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n",
                b"535 5.7.3 Authentication unsuccessful\r\n",
                b"250 2.1.0 Sender OK\r\n",
                b"354 go ahead\r\n",
                b"221 bye\r\n",
            ];
            for answer in answers {
                line.clear();
                tls.read_line(&mut line).await.expect("r");
                seen.push(line.trim_end().to_string());
                if line == "DATA\r\n" {
                    tls.get_mut().write_all(answer).await.expect("w");
                    let mut content = Vec::new();
                    while !content.ends_with(b"\r\n.\r\n") {
                        tls.read_until(b'\n', &mut content).await.expect("r");
                    }
                    seen.push(String::from_utf8_lossy(&content).into_owned());
                    tls.get_mut()
                        .write_all(b"250 2.0.0 queued\r\n")
                        .await
                        .expect("w");
                    continue;
                }
                tls.get_mut().write_all(answer).await.expect("w");
            }
            seen
        });
        let cfg = Upstream {
            host: "127.0.0.1".into(),
            port,
            security: UpstreamSecurity::StartTls,
            ca_file: Some(ca_file),
            timeout: Duration::from_secs(5),
            max_sessions_per_mailbox: 1,
            idle: Duration::from_secs(60),
            warm_sessions: 0,
            messages_per_minute: 0,
            transport: crate::config::TransportKind::Smtp,
            graph_url: String::new(),
            save_to_sent_items: false,
        };
        let t = UpstreamTarget::new(&cfg).expect("target");
        let mut s = UpstreamSession::connect(&t).await.expect("connect");
        // The capabilities are those announced after TLS.
        assert_eq!(
            *s.capabilities(),
            Capabilities {
                pipelining: false,
                chunking: true,
                size: Some(1000),
                eightbitmime: true,
                smtputf8: true,
                starttls: false,
            }
        );
        let r = s.auth_xoauth2("m@example.com", &Secret::new("tok")).await;
        assert_eq!(
            r,
            Err(UpstreamError::Reply(UpReply {
                code: 535,
                text: "5.7.3 Authentication unsuccessful".into()
            }))
        );
        assert!(!s.is_broken());
        assert_eq!(
            s.command("MAIL FROM:<m@example.com>")
                .await
                .expect("mail")
                .code,
            250
        );
        let r = s.data(b"Subject: x\r\n\r\n.dot").await.expect("data");
        assert_eq!(r.text, "2.0.0 queued");
        s.close().await;
        let seen = server.await.expect("server");
        let auth = base64::engine::general_purpose::STANDARD
            .encode("user=m@example.com\x01auth=Bearer tok\x01\x01");
        assert_eq!(
            seen[1..],
            [
                "STARTTLS".to_string(),
                seen[0].clone(),
                format!("AUTH XOAUTH2 {auth}"),
                String::new(),
                "MAIL FROM:<m@example.com>".into(),
                "DATA".into(),
                "Subject: x\r\n\r\n..dot\r\n.\r\n".into(),
                "QUIT".into(),
            ]
        );
        assert!(seen[0].starts_with("EHLO "), "{seen:?}");
    }
}
