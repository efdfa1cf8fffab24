//! One upstream SMTP session: connect, STARTTLS (required, verified), AUTH XOAUTH2, and the
//! transaction commands, on lettre's `AsyncSmtpConnection`.
//!
//! Every operation is bounded by `upstream.timeout_secs`. A session whose command failed on
//! the network or timed out is marked broken and must not be reused. Pooling, token choice
//! and reply mapping live in `pool` and `outcome`.

use crate::config::{Upstream, UpstreamSecurity};
use crate::secret::Secret;
use base64::Engine as _;
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters, TlsParametersBuilder,
};
use lettre::transport::smtp::extension::{ClientId, Extension};
use lettre::transport::smtp::response::Response;
use rustls::pki_types::ServerName;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;

/// Chunk size when streaming message content to lettre (keeps its dot-stuffing copy small).
const DATA_CHUNK: usize = 64 * 1024;
/// Slowest upload we wait for when sending a large message (bytes per second).
const MIN_UPLOAD_RATE: u64 = 256 * 1024;
/// How long a polite QUIT may take when we close an idle session.
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and how to reach the upstream; built once (TLS roots are loaded here).
#[derive(Clone)]
pub struct UpstreamTarget {
    pub host: String,
    pub port: u16,
    pub security: UpstreamSecurity,
    pub timeout: Duration,
    tls: TlsParameters,
    /// Implicit TLS: our own connector (lettre's socket would keep Nagle's algorithm on).
    implicit: Option<(TlsConnector, ServerName<'static>)>,
    hello: ClientId,
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
    /// Builds the TLS parameters: system roots plus `ca_file`, certificate always verified.
    pub fn new(cfg: &Upstream) -> Result<UpstreamTarget, String> {
        let mut b = TlsParametersBuilder::new(cfg.host.clone());
        if let Some(p) = &cfg.ca_file {
            let pem =
                std::fs::read(p).map_err(|e| format!("upstream.ca_file {}: {e}", p.display()))?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|e| format!("upstream.ca_file {}: {e}", p.display()))?;
            b = b.add_root_certificate(cert);
        }
        let tls = b
            .build_rustls()
            .map_err(|e| format!("upstream TLS setup: {e}"))?;
        let implicit = match cfg.security {
            UpstreamSecurity::StartTls => None,
            UpstreamSecurity::Tls => Some(implicit_connector(cfg)?),
        };
        Ok(UpstreamTarget {
            implicit,
            host: cfg.host.clone(),
            port: cfg.port,
            security: cfg.security,
            timeout: cfg.timeout,
            tls,
            hello: ClientId::Domain(local_hostname()),
        })
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A verifying rustls connector for implicit TLS: system roots plus `ca_file`.
fn implicit_connector(cfg: &Upstream) -> Result<(TlsConnector, ServerName<'static>), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(p) = &cfg.ca_file {
        let pem = std::fs::read(p).map_err(|e| format!("upstream.ca_file {}: {e}", p.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("upstream.ca_file {}: {e}", p.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("upstream.ca_file {}: {e}", p.display()))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("upstream TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(cfg.host.clone())
        .map_err(|e| format!("upstream.host {:?}: {e}", cfg.host))?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

/// The implicit-TLS stream handed to lettre as its transport.
struct TlsTransport(tokio_rustls::client::TlsStream<tokio::net::TcpStream>);

impl fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsTransport")
    }
}

impl AsyncRead for TlsTransport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsTransport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for TlsTransport {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.get_ref().0.peer_addr()
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

/// A reply from the upstream, code and text (the enhanced status code is part of the text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpReply {
    pub code: u16,
    pub text: String,
}

impl UpReply {
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }
}

impl fmt::Display for UpReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// Why an upstream operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// No usable session could be set up (connect, greeting, TLS, STARTTLS missing).
    Connect(String),
    /// The session broke mid-way (network error, timeout, protocol garbage).
    Lost(String),
    /// The upstream answered with a negative reply.
    Reply(UpReply),
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Connect(m) => write!(f, "cannot connect to upstream: {m}"),
            UpstreamError::Lost(m) => write!(f, "lost connection to upstream: {m}"),
            UpstreamError::Reply(r) => write!(f, "upstream replied {r}"),
        }
    }
}

/// Converts a lettre error: negative replies keep code and text, the rest is `other`.
fn classify(
    e: lettre::transport::smtp::Error,
    other: fn(String) -> UpstreamError,
) -> UpstreamError {
    if let Some(code) = e.status() {
        let code: u16 = code.to_string().parse().unwrap_or(451);
        let text = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        return UpstreamError::Reply(UpReply { code, text });
    }
    other(e.to_string())
}

fn positive(r: &Response) -> UpReply {
    UpReply {
        code: r.code().to_string().parse().unwrap_or(250),
        text: r.message().collect::<Vec<_>>().join(" "),
    }
}

/// Runs one lettre operation with a time limit; a timeout is a lost session.
async fn bounded<T>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = Result<T, lettre::transport::smtp::Error>>,
) -> Result<T, UpstreamError> {
    match tokio::time::timeout(limit, fut).await {
        Err(_) => Err(UpstreamError::Lost(format!(
            "no answer to {what} within {}s",
            limit.as_secs()
        ))),
        Ok(r) => r.map_err(|e| classify(e, UpstreamError::Lost)),
    }
}

/// `Display` of a raw command line (lettre sends `to_string()` of what it is given).
struct Line<'a>(&'a str);

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)?;
        f.write_str("\r\n")
    }
}

/// An authenticated (or about to be) upstream session.
pub struct UpstreamSession {
    conn: AsyncSmtpConnection,
    timeout: Duration,
    broken: bool,
    /// The upstream accepts SMTPUTF8 / 8BITMIME (we only forward those parameters then).
    pub smtputf8: bool,
    pub eightbitmime: bool,
}

impl fmt::Debug for UpstreamSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamSession")
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl UpstreamSession {
    /// Connects, reads the greeting, EHLO, and secures the session (STARTTLS or implicit TLS).
    pub async fn connect(t: &UpstreamTarget) -> Result<UpstreamSession, UpstreamError> {
        let implicit = t.security == UpstreamSecurity::Tls;
        let addr = t.addr();
        let lettre_err =
            |e: lettre::transport::smtp::Error| match classify(e, UpstreamError::Connect) {
                UpstreamError::Reply(r) => UpstreamError::Connect(format!("{addr} said {r}")),
                UpstreamError::Connect(m) => UpstreamError::Connect(format!("{addr}: {m}")),
                other => other,
            };
        let connect = async {
            // Our own socket, so that Nagle's algorithm is off (see below).
            if let Some((connector, name)) = &t.implicit {
                let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
                    .await
                    .map_err(|e| UpstreamError::Connect(format!("{addr}: {e}")))?;
                let _ = tcp.set_nodelay(true);
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| UpstreamError::Connect(format!("{addr}: TLS: {e}")))?;
                return AsyncSmtpConnection::connect_with_transport(
                    Box::new(TlsTransport(tls)),
                    &t.hello,
                )
                .await
                .map_err(lettre_err);
            }
            // Our own socket, so that Nagle's algorithm is off: lettre writes the end of
            // DATA as a separate small segment, which would otherwise wait for a delayed ACK.
            let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
                .await
                .map_err(|e| UpstreamError::Connect(format!("{addr}: {e}")))?;
            let _ = tcp.set_nodelay(true);
            AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &t.hello)
                .await
                .map_err(lettre_err)
        };
        let mut conn = match tokio::time::timeout(t.timeout, connect).await {
            Err(_) => return Err(UpstreamError::Connect(format!("{} timed out", t.addr()))),
            Ok(r) => r?,
        };
        if !implicit {
            if !conn.server_info().supports_feature(Extension::StartTls) {
                conn.abort().await;
                return Err(UpstreamError::Connect(format!(
                    "{} does not offer STARTTLS; refusing to authenticate in plaintext",
                    t.addr()
                )));
            }
            match tokio::time::timeout(t.timeout, conn.starttls(t.tls.clone(), &t.hello)).await {
                Err(_) => {
                    return Err(UpstreamError::Connect(format!(
                        "{}: STARTTLS timed out",
                        t.addr()
                    )))
                }
                Ok(Err(e)) => {
                    return Err(UpstreamError::Connect(format!(
                        "{}: STARTTLS failed: {e}",
                        t.addr()
                    )))
                }
                Ok(Ok(())) => {}
            }
        }
        // (lettre sees the implicit-TLS transport as a plain stream; we know better.)
        if !implicit && !conn.is_encrypted() {
            return Err(UpstreamError::Connect(format!(
                "{}: session is not encrypted",
                t.addr()
            )));
        }
        let info = conn.server_info();
        Ok(UpstreamSession {
            smtputf8: info.supports_feature(Extension::SmtpUtfEight),
            eightbitmime: info.supports_feature(Extension::EightBitMime),
            conn,
            timeout: t.timeout,
            broken: false,
        })
    }

    pub fn is_broken(&self) -> bool {
        self.broken || self.conn.has_broken()
    }

    /// Marks the session broken after a network failure, a timeout or a 421.
    fn note<T>(&mut self, r: Result<T, UpstreamError>) -> Result<T, UpstreamError> {
        match &r {
            Err(UpstreamError::Lost(_)) => self.broken = true,
            Err(UpstreamError::Reply(rep)) if rep.code == 421 => self.broken = true,
            _ => {}
        }
        r
    }

    /// AUTH XOAUTH2 with base64("user=" mailbox "\x01auth=Bearer " token "\x01\x01").
    pub async fn auth_xoauth2(
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
        let r = match bounded("AUTH", self.timeout, self.conn.command(Line(cmd.expose()))).await {
            // 334 + base64 JSON error: the server wants an empty line, then sends the 535.
            Ok(resp) if resp.has_code(334) => {
                bounded("AUTH", self.timeout, self.conn.command(Line(""))).await
            }
            r => r,
        };
        self.note(r).map(|resp| positive(&resp))
    }

    /// Sends one command line (without CRLF); a positive reply is `Ok`.
    pub async fn command(&mut self, line: &str) -> Result<UpReply, UpstreamError> {
        let name = line.split(' ').next().unwrap_or("command").to_string();
        let r = bounded(&name, self.timeout, self.conn.command(Line(line))).await;
        self.note(r).map(|resp| positive(&resp))
    }

    /// DATA, the content (unstuffed, as the client sent it), and the final reply.
    pub async fn data(&mut self, content: &[u8]) -> Result<UpReply, UpstreamError> {
        self.command("DATA").await?;
        self.body(content).await
    }

    /// After the upstream's 354: the content (unstuffed, as the client sent it) and the
    /// final reply. (The local session sends DATA while it still receives the content.)
    pub async fn body(&mut self, content: &[u8]) -> Result<UpReply, UpstreamError> {
        // lettre dot-stuffs and appends CRLF.CRLF itself; the CRLF that ends the content
        // is the first half of that terminator, so it is not sent twice.
        let body = content.strip_suffix(b"\r\n").unwrap_or(content);
        // The timeout grows with the message: at least MIN_UPLOAD_RATE bytes per second.
        let limit = self.timeout + Duration::from_secs(body.len() as u64 / MIN_UPLOAD_RATE);
        let r = bounded(
            "DATA",
            limit,
            self.conn.message_iter(body.chunks(DATA_CHUNK)),
        )
        .await;
        self.note(r).map(|resp| positive(&resp))
    }

    /// Closes politely (QUIT), bounded.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(QUIT_TIMEOUT, self.conn.quit()).await;
    }
}
