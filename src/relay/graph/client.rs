//! Microsoft Graph over HTTPS (reqwest, rustls): the requests the Graph transport makes
//! (`sendMail` with MIME, drafts, recipient updates, attachments, upload sessions, send,
//! delete) and the one mapping from a Graph failure to the reply the SMTP side sees.
//!
//! Every request carries the account's bearer token; a 401 gets one forced token refresh
//! (`TokenManager::refresh_rejected`) and one retry, as 535 5.7.3 does on SMTP. Upload
//! session PUTs go to the pre-authenticated upload URL Graph returns, without the token.
//! Nothing here logs or formats a header, a token or an upload URL (which carries its own
//! credential): reqwest errors are stripped of their URL before they are kept.

use crate::oauth::manager::{TokenError, TokenManager};
use crate::relay::upstream::UpReply;
use crate::reply::one_line;
use reqwest::{Method, StatusCode};
use std::time::Duration;

/// Longest Graph error message we quote back (after removing control characters).
const MAX_QUOTED: usize = 200;
/// Longest Retry-After we honour; a larger one is capped (the spool's retry_max and
/// max_age still apply).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Which kind of request failed: Graph grants them by different permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Step {
    /// `sendMail` or a draft's `/send`: Mail.Send.
    #[default]
    Send,
    /// Creating, changing, attaching to or deleting a draft: Mail.ReadWrite.
    Draft,
}

/// Why a Graph operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum GraphError {
    /// Graph answered with an error status.
    #[error("Graph answered HTTP {status} {code}: {message}")]
    Status {
        status: u16,
        /// Graph's error code (`ErrorAccessDenied`, `MailboxNotEnabledForRESTAPI`...).
        code: String,
        message: String,
        retry_after: Option<Duration>,
        step: Step,
    },
    /// Graph told this mailbox to wait (an earlier 429/503 with Retry-After) for longer
    /// than `upstream.timeout`: not asked again before then.
    #[error("Microsoft Graph asked to wait {}s before the next request for this mailbox", retry_after.as_secs())]
    Throttled { retry_after: Duration },
    /// All of the mailbox's concurrent Graph requests stayed busy for `upstream.timeout`.
    #[error("every concurrent Graph request of the mailbox stayed busy")]
    Busy,
    /// No answer: connection refused, reset, timed out.
    #[error("cannot reach Microsoft Graph: {0}")]
    Network(String),
    #[error("{0}")]
    Token(TokenError),
    /// An answer we cannot use (no draft id, no upload URL...).
    #[error("unexpected answer from Microsoft Graph: {0}")]
    Protocol(String),
    /// The message cannot be sent through Graph as it is.
    #[error("{0}")]
    Message(#[from] super::mime::SplitError),
}

impl GraphError {
    /// How long Graph asked us to wait (429/503 Retry-After).
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match self {
            GraphError::Status { retry_after, .. } => *retry_after,
            GraphError::Throttled { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// The HTTP status, if Graph answered.
    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            GraphError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The same error, for a request of this kind.
    pub(crate) fn in_step(self, kind: Step) -> GraphError {
        match self {
            GraphError::Status {
                status,
                code,
                message,
                retry_after,
                ..
            } => GraphError::Status {
                status,
                code,
                message,
                retry_after,
                step: kind,
            },
            e => e,
        }
    }

    /// Whether the request may have taken effect although it failed: no answer, or a
    /// gateway error (5xx) after which Graph may still have acted.
    pub(crate) fn is_ambiguous(&self) -> bool {
        match self {
            GraphError::Network(_) => true,
            GraphError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// The hint a 403 gets: the two reasons Graph refuses Mail.Send for a mailbox.
pub(crate) const FORBIDDEN_HINT: &str = "Mail.Send is not granted to the app (admin consent), or an application access policy / RBAC for Applications scope excludes this mailbox";
/// The hint a 403 on a draft step gets.
pub(crate) const DRAFT_FORBIDDEN_HINT: &str = "messages too large for one request, or whose To/Cc name recipients outside the envelope, are sent as drafts, which needs the Mail.ReadWrite application permission (admin consent), scoped to this mailbox by the application access policy / RBAC for Applications";

/// Control characters out (a reply line must stay one line), length capped.
fn quote(s: &str) -> String {
    let clean = one_line(s);
    let clean = clean.trim();
    match clean.char_indices().nth(MAX_QUOTED) {
        Some((i, _)) => format!("{}...", &clean[..i]),
        None => clean.to_string(),
    }
}

/// THE mapping of a Graph failure to the reply the SMTP side gets (as an upstream reply, so
/// `relay::outcome` and the spool treat it like any other: 4xx deferred, 5xx refused).
/// SPEC "Microsoft Graph transport": 429/503/504/network -> 451 4.4.x; 400 -> 554 5.6.0
/// with Graph's code; 403 -> 550 5.7.1 with the hint; 404 -> 550 5.1.1; our own failures
/// (token, unexpected answers) are 4xx.
pub(crate) fn failure_reply(e: &GraphError, mailbox: &str) -> UpReply {
    let (code, text) = match e {
        GraphError::Status {
            status,
            code,
            message,
            step,
            ..
        } => {
            let graph = format!("(Graph HTTP {status} {}: {})", quote(code), quote(message));
            match *status {
                400 => (554, format!("5.6.0 Graph refused the message {graph}")),
                401 => (
                    454,
                    format!("4.7.0 Graph refused the access token after a refresh {graph}; run: smtp-oauth-bridge check"),
                ),
                403 if code.eq_ignore_ascii_case("ErrorSendAsDenied") => (550, format!("5.7.1 Graph refused the From: address: it is not one the mailbox {mailbox} may send as (its own addresses, or one it has Send As rights for) {graph}")),
                403 if *step == Step::Draft => (550, format!("5.7.1 Graph refused a draft step for {mailbox}: {DRAFT_FORBIDDEN_HINT} {graph}")),
                403 => (550, format!("5.7.1 Graph refused to send as {mailbox}: {FORBIDDEN_HINT} {graph}")),
                404 => (550, format!("5.1.1 Mailbox {mailbox} not found in Microsoft Graph {graph}")),
                413 => (552, format!("5.3.4 Message too big for Microsoft Graph {graph}")),
                429 | 503 => (451, format!("4.4.5 Microsoft Graph is throttling, try again later {graph}")),
                504 => (451, format!("4.4.2 Microsoft Graph timed out {graph}")),
                _ => (451, format!("4.4.0 Microsoft Graph failed {graph}")),
            }
        }
        GraphError::Throttled { retry_after } => (
            451,
            format!(
                "4.4.5 Microsoft Graph is throttling mailbox {mailbox}, try again in {}s",
                retry_after.as_secs().max(1)
            ),
        ),
        GraphError::Busy => (
            451,
            format!("4.4.5 All concurrent Microsoft Graph requests of mailbox {mailbox} are busy, try again later"),
        ),
        GraphError::Network(m) => (
            451,
            format!("4.4.1 Cannot reach Microsoft Graph: {}", quote(m)),
        ),
        GraphError::Token(TokenError::NeedsLogin { account, .. }) => (
            454,
            format!("4.7.0 Account {account} needs login; run: smtp-oauth-bridge login {account}"),
        ),
        GraphError::Token(t) => (
            451,
            format!(
                "4.7.0 Cannot obtain an access token: {}",
                quote(&t.to_string())
            ),
        ),
        GraphError::Protocol(m) => (
            451,
            format!("4.4.2 Unexpected answer from Microsoft Graph: {}", quote(m)),
        ),
        GraphError::Message(m @ super::mime::SplitError::TooLarge { .. }) => {
            (552, format!("5.3.4 {}", quote(&m.to_string())))
        }
        GraphError::Message(m) => (554, format!("5.6.0 {}", quote(&m.to_string()))),
    };
    UpReply { code, text }
}

/// A successful answer's body.
#[derive(Debug)]
pub(crate) struct Answer {
    /// The HTTP status (2xx).
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
}

/// The body of a Graph request.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    None,
    /// base64 MIME (`Content-Type: text/plain`).
    Mime(String),
    Json(serde_json::Value),
}

/// The HTTP client of the Graph transport (one per bridge; cheap to clone).
#[derive(Clone)]
pub(crate) struct GraphClient {
    http: reqwest::Client,
    /// `upstream.graph_url`, without a trailing slash.
    base: url::Url,
    tokens: TokenManager,
}

impl std::fmt::Debug for GraphClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphClient")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

/// Why the Graph client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GraphSetupError {
    #[error("upstream.graph_url {0:?} is not a URL")]
    Url(String),
    #[error("upstream.ca_file {}: {source}", path.display())]
    Ca {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client for Microsoft Graph: {0}")]
    Client(#[source] reqwest::Error),
}

/// An URL Graph gave us (upload URL) that we may follow: https, or http on loopback only
/// when the configured Graph URL is itself plain http (tests).
fn acceptable_url(u: &url::Url, base: &url::Url) -> bool {
    match u.scheme() {
        "https" => u.username().is_empty() && u.password().is_none(),
        "http" => {
            base.scheme() == "http"
                && match u.host() {
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    Some(url::Host::Domain(d)) => d == "localhost",
                    None => false,
                }
        }
        _ => false,
    }
}

fn network(e: reqwest::Error) -> GraphError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    // Without the URL: an upload URL carries a credential of its own.
    let e = e.without_url();
    let detail = std::error::Error::source(&e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default();
    GraphError::Network(format!("{what}{detail}"))
}

impl GraphClient {
    pub(crate) fn new(
        graph_url: &str,
        timeout: Duration,
        ca_file: Option<&std::path::Path>,
        tokens: TokenManager,
    ) -> Result<GraphClient, GraphSetupError> {
        let base = url::Url::parse(graph_url)
            .ok()
            .filter(|u| !u.cannot_be_a_base())
            .ok_or_else(|| GraphSetupError::Url(graph_url.to_string()))?;
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout)
            .timeout(timeout);
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|source| GraphSetupError::Ca {
                path: path.to_path_buf(),
                source,
            })?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(GraphSetupError::Client)?;
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        Ok(GraphClient {
            http: b.build().map_err(GraphSetupError::Client)?,
            base,
            tokens,
        })
    }

    /// `upstream.graph_url` (for messages).
    pub(crate) fn base_url(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_string()
    }

    pub(crate) fn tokens(&self) -> &TokenManager {
        &self.tokens
    }

    /// `{graph_url}/v1.0/users/{mailbox}/{rest...}`, each segment escaped.
    pub(crate) fn user_url(&self, mailbox: &str, rest: &[&str]) -> url::Url {
        let mut u = self.base.clone();
        if let Ok(mut segs) = u.path_segments_mut() {
            segs.pop_if_empty()
                .extend(["v1.0", "users", mailbox])
                .extend(rest);
        }
        u
    }

    /// One Graph API request for `account` with its bearer token; a 401 is answered with one
    /// forced refresh and one retry. Non-2xx answers are [`GraphError::Status`].
    pub(crate) async fn call(
        &self,
        account: &str,
        method: Method,
        url: &url::Url,
        body: &Body,
    ) -> Result<Answer, GraphError> {
        let mut token = self
            .tokens
            .token(account)
            .await
            .map_err(GraphError::Token)?;
        let mut retried = false;
        loop {
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .bearer_auth(token.secret.expose());
            req = match body {
                Body::None => req,
                Body::Mime(b64) => req
                    .header(reqwest::header::CONTENT_TYPE, "text/plain")
                    .body(b64.clone()),
                Body::Json(v) => req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(v.to_string()),
            };
            let started = std::time::Instant::now();
            let resp = req.send().await.map_err(network)?;
            let status = resp.status();
            tracing::trace!(%method, path = %url.path(), status = status.as_u16(), ms = started.elapsed().as_millis() as u64, "graph request");
            if status == StatusCode::UNAUTHORIZED && !retried {
                tracing::info!(
                    account,
                    "Microsoft Graph rejected the access token; refreshing once"
                );
                retried = true;
                token = self
                    .tokens
                    .refresh_rejected(account, token.generation)
                    .await
                    .map_err(GraphError::Token)?;
                continue;
            }
            return answer(resp).await;
        }
    }

    /// One ranged PUT of an upload session (no token: the upload URL is pre-authenticated).
    pub(crate) async fn put_range(
        &self,
        upload_url: &url::Url,
        chunk: Vec<u8>,
        start: usize,
        total: usize,
    ) -> Result<Answer, GraphError> {
        if !acceptable_url(upload_url, &self.base) {
            return Err(GraphError::Protocol(
                "the upload URL is not https".to_string(),
            ));
        }
        let end = start + chunk.len();
        let resp = self
            .http
            .put(upload_url.clone())
            .header(
                reqwest::header::CONTENT_RANGE,
                format!("bytes {start}-{}/{total}", end.saturating_sub(1)),
            )
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(chunk)
            .send()
            .await
            .map_err(network)?;
        tracing::trace!(
            status = resp.status().as_u16(),
            start,
            end,
            total,
            "graph upload range"
        );
        answer(resp).await
    }
}

/// A 2xx answer's body, or the Graph error it carries.
async fn answer(resp: reqwest::Response) -> Result<Answer, GraphError> {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER));
    let body = resp.bytes().await.map_err(network)?.to_vec();
    if status.is_success() {
        return Ok(Answer {
            status: status.as_u16(),
            body,
        });
    }
    #[derive(serde::Deserialize)]
    struct Wrapper {
        error: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let (code, message) = match serde_json::from_slice::<Wrapper>(&body) {
        Ok(w) => (w.error.code, w.error.message),
        Err(_) => (
            status.canonical_reason().unwrap_or("error").to_string(),
            String::new(),
        ),
    };
    Err(GraphError::Status {
        status: status.as_u16(),
        code,
        message,
        retry_after,
        step: Step::Send,
    })
}

/// A string field of a JSON answer (`id`, `uploadUrl`).
pub(crate) fn json_field(body: &[u8], field: &str) -> Result<String, GraphError> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get(field).and_then(|f| f.as_str()).map(str::to_string))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| GraphError::Protocol(format!("no {field} in the answer")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, code: &str) -> GraphError {
        GraphError::Status {
            status,
            code: code.into(),
            message: "msg\r\nRCPT TO:<evil@x>".into(),
            retry_after: None,
            step: Step::Send,
        }
    }

    #[test]
    fn failures_map_per_spec() {
        let mb = "m@contoso.com";
        let cases = [
            (status(400, "ErrorInvalidMimeContent"), 554, "5.6.0"),
            (status(403, "ErrorAccessDenied"), 550, "5.7.1"),
            (status(404, "ErrorInvalidUser"), 550, "5.1.1"),
            (status(429, "ApplicationThrottled"), 451, "4.4.5"),
            (status(503, "ServiceUnavailable"), 451, "4.4.5"),
            (status(504, "GatewayTimeout"), 451, "4.4.2"),
            (status(401, "InvalidAuthenticationToken"), 454, "4.7.0"),
            (
                GraphError::Network("connection refused".into()),
                451,
                "4.4.1",
            ),
            (GraphError::Protocol("no id".into()), 451, "4.4.2"),
            (
                GraphError::Token(TokenError::NeedsLogin {
                    account: "a".into(),
                    reason: "r".into(),
                }),
                454,
                "4.7.0",
            ),
        ];
        for (e, code, enhanced) in cases {
            let r = failure_reply(&e, mb);
            assert_eq!(r.code, code, "{r}");
            assert!(r.text.starts_with(&format!("{enhanced} ")), "{r}");
            assert!(!r.text.contains(['\r', '\n']), "{r:?}");
        }
        let r = failure_reply(&status(400, "ErrorMimeContentInvalidBase64String"), mb);
        assert!(
            r.text.contains("ErrorMimeContentInvalidBase64String"),
            "{r}"
        );
        let r = failure_reply(&status(403, "ErrorAccessDenied"), mb);
        assert!(r.text.contains("Mail.Send"), "{r}");
        assert!(r.text.contains("application access policy"), "{r}");
        assert!(r.text.contains("RBAC for Applications"), "{r}");
        assert!(r.text.contains("HTTP 403 ErrorAccessDenied"), "{r}");
        // A draft step names Mail.ReadWrite; Graph's code picks the From: hint.
        let r = failure_reply(&status(403, "ErrorAccessDenied").in_step(Step::Draft), mb);
        assert!(r.text.contains("Mail.ReadWrite"), "{r}");
        assert!(r.text.contains("application access policy"), "{r}");
        assert!(!r.text.contains("Mail.Send "), "{r}");
        let r = failure_reply(&status(403, "ErrorSendAsDenied"), mb);
        assert!(
            r.text.starts_with("5.7.1 Graph refused the From: address"),
            "{r}"
        );
        let r = failure_reply(
            &GraphError::Throttled {
                retry_after: Duration::from_secs(20),
            },
            mb,
        );
        assert_eq!(r.code, 451);
        assert!(r.text.starts_with("4.4.5 "), "{r}");
        let r = failure_reply(&status(404, "ErrorInvalidUser"), mb);
        assert!(r.text.contains(mb), "{r}");
    }

    #[test]
    fn long_messages_are_cut() {
        let long = "x".repeat(5000);
        assert_eq!(quote(&long).len(), MAX_QUOTED + 3);
        assert_eq!(quote("a\u{7}b"), "a b");
    }

    #[test]
    fn upload_urls_must_be_https_unless_graph_itself_is_loopback_http() {
        let https = url::Url::parse("https://graph.microsoft.com").unwrap();
        let local = url::Url::parse("http://127.0.0.1:1234").unwrap();
        let up = |s: &str| url::Url::parse(s).unwrap();
        assert!(acceptable_url(
            &up("https://outlook.office.com/api/x?authtoken=1"),
            &https
        ));
        assert!(!acceptable_url(&up("http://127.0.0.1:9/u"), &https));
        assert!(acceptable_url(&up("http://127.0.0.1:9/u"), &local));
        assert!(!acceptable_url(&up("http://example.com/u"), &local));
        assert!(!acceptable_url(&up("https://u:p@example.com/u"), &https));
    }
}
