//! The HTTP side of the fake Graph endpoint, on axum (hyper does the HTTP/1.1 framing).
//! Every request passes the same gate, in this order, before `api.rs` sees it:
//! 1. it is counted in flight for its mailbox (the path's `{mailbox}`, or the mailbox of
//!    the upload session an upload URL names) until it is answered;
//! 2. its body is read up to `max_request_bytes` (413 at once when `Content-Length` says it
//!    is larger, or as soon as a chunked body passes it: never buffered beyond the limit);
//! 3. a queued fault ([`GraphFault`]) that matches its path answers it;
//! 4. the bearer token is checked (401), except on upload URLs, which are pre-authenticated
//!    and refuse an `Authorization` header (400);
//! 5. a request beyond the mailbox's concurrency limit is answered 429;
//! 6. it waits while the endpoint is paused, then `response_delay`.
//!
//! Also here: the [`Reply`] type (Graph's error JSON, `Retry-After`, `Location`) and
//! percent-decoding of path segments. Tokens never appear in an answer or a log line.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use serde_json::{json, Value};

use super::UNAVAILABLE_RETRY_AFTER_SECS;
use super::{GraphFault, GraphRequest, Inner, THROTTLE_RETRY_AFTER_SECS};

/// Graph's own application id, as its 401 answers name it in `WWW-Authenticate`.
const GRAPH_APP_ID: &str = "00000003-0000-0000-c000-000000000000";
/// Hosts whose scopes name Microsoft Graph (global, US government, China).
const GRAPH_HOSTS: [&str; 4] = [
    "graph.microsoft.com",
    "graph.microsoft.us",
    "dod-graph.microsoft.us",
    "microsoftgraph.chinacloudapi.cn",
];
/// Scope values that name no resource (OpenID Connect), so do not make a token Graph's.
const OIDC_SCOPES: [&str; 4] = ["openid", "profile", "email", "offline_access"];

pub(super) fn router(inner: Arc<Inner>) -> Router {
    Router::new().fallback(serve).with_state(inner)
}

/// Where a request goes, from its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    /// `/v1.0/users/{mailbox}/...`: the mailbox and the following segments, decoded.
    User { mailbox: String, rest: Vec<String> },
    /// `/upload/{session}`: an upload URL.
    Upload(String),
    /// Anything else.
    Unknown(String),
}

impl Target {
    pub(super) fn parse(raw_path: &str) -> Target {
        let segs: Vec<&str> = raw_path.split('/').skip(1).collect();
        match segs.as_slice() {
            ["v1.0", users, mailbox, rest @ ..]
                if users.eq_ignore_ascii_case("users") && !mailbox.is_empty() =>
            {
                Target::User {
                    mailbox: percent_decode(mailbox),
                    rest: rest
                        .iter()
                        .filter(|s| !s.is_empty())
                        .map(|s| percent_decode(s))
                        .collect(),
                }
            }
            ["upload", id] if !id.is_empty() => Target::Upload(percent_decode(id)),
            _ => Target::Unknown(percent_decode(raw_path)),
        }
    }
}

/// A request that passed the gate, for `api.rs`.
pub(super) struct Call {
    pub method: Method,
    pub target: Target,
    /// The media type of `Content-Type`, lowercased, without parameters ("" if none).
    pub content_type: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Call {
    pub fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn serve(
    State(inner): State<Arc<Inner>>,
    req: axum::extract::Request,
) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let raw_path = parts.uri.path().to_string();
    let target = Target::parse(&raw_path);
    let key = match &target {
        Target::User { mailbox, .. } => Some(mailbox.to_ascii_lowercase()),
        Target::Upload(id) => inner.state().uploads.get(id).map(|u| u.mailbox_key()),
        Target::Unknown(_) => None,
    };
    let flight = key.clone().map(|k| inner.enter(k));
    let limit = inner.opts.max_request_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let (reply, body_bytes) = match declared {
        Some(n) if n > limit as u64 => {
            (Reply::too_large(), usize::try_from(n).unwrap_or(usize::MAX))
        }
        _ => match axum::body::to_bytes(body, limit).await {
            Ok(body) => {
                let n = body.len();
                let call = Call {
                    content_type: media_type(&parts.headers),
                    method: parts.method.clone(),
                    target,
                    headers: parts.headers.clone(),
                    body,
                };
                (gate(&inner, call, &raw_path, key.as_deref()).await, n)
            }
            // A chunked body over the limit, or a peer gone mid-body (reads no answer).
            Err(_) => (Reply::too_large(), limit.saturating_add(1)),
        },
    };
    drop(flight);
    inner.record(GraphRequest {
        method: parts.method.as_str().to_string(),
        path: raw_path,
        body_bytes,
        status: reply.status,
        at: tokio::time::Instant::now(),
    });
    reply.into_response()
}

/// Steps 3 to 6 of the gate, then the operation.
async fn gate(inner: &Arc<Inner>, call: Call, raw_path: &str, key: Option<&str>) -> Reply {
    let mut after_effect = None;
    if let Some((fault, after)) =
        inner.take_fault(call.method.as_str(), raw_path, &percent_decode(raw_path))
    {
        let mailbox = match &call.target {
            Target::User { mailbox, .. } => mailbox.as_str(),
            _ => "",
        };
        if !after {
            return Reply::fault(&fault, mailbox);
        }
        after_effect = Some(Reply::fault(&fault, mailbox));
    }
    match call.target {
        Target::Upload(_) => {
            if call.headers.contains_key(header::AUTHORIZATION) {
                return Reply::error(
                    400,
                    "InvalidRequest",
                    "The upload URL is pre-authenticated: do not send an Authorization header.",
                );
            }
        }
        _ => {
            if let Err(reply) = check_bearer(inner, &call.headers) {
                return reply;
            }
        }
    }
    if let Some(key) = key {
        if inner.in_flight(key) > inner.opts.mailbox_concurrency {
            return Reply::error(
                429,
                "ApplicationThrottled",
                "Application is over its MailboxConcurrency limit.",
            )
            .retry_after(THROTTLE_RETRY_AFTER_SECS);
        }
    }
    let mut paused = inner.paused.subscribe();
    // The sender lives in `inner`, so waiting cannot fail; if it could, go on.
    let _ = paused.wait_for(|p| !*p).await;
    if !inner.opts.response_delay.is_zero() {
        tokio::time::sleep(inner.opts.response_delay).await;
    }
    let reply = super::api::handle(inner, call);
    after_effect.unwrap_or(reply)
}

/// 401 unless the request carries a bearer token Graph would accept.
fn check_bearer(inner: &Inner, headers: &HeaderMap) -> Result<(), Reply> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return Err(Reply::unauthorized("Access token is empty."));
    };
    let Some(endpoint) = &inner.opts.tokens else {
        return Ok(());
    };
    let Some(scope) = endpoint.scope_of(token) else {
        return Err(Reply::unauthorized("Access token validation failure."));
    };
    if !endpoint.is_valid(token) {
        return Err(Reply::unauthorized(
            "Lifetime validation failed, the token is expired.",
        ));
    }
    if !is_graph_audience(&scope) {
        return Err(Reply::unauthorized(
            "Access token validation failure. Invalid audience.",
        ));
    }
    Ok(())
}

/// Whether a token issued for `scope` is for Microsoft Graph: a scope on a Graph host, or a
/// bare permission name (which the identity platform resolves to Graph).
pub(super) fn is_graph_audience(scope: &str) -> bool {
    scope.split_whitespace().any(|s| {
        let lower = s.to_ascii_lowercase();
        if lower.contains("://") {
            let host = lower.split("://").nth(1).unwrap_or_default();
            let host = host.split('/').next().unwrap_or_default();
            GRAPH_HOSTS.contains(&host)
        } else {
            !lower.contains('/') && !OIDC_SCOPES.contains(&lower.as_str())
        }
    })
}

fn media_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Percent-decoding of a path segment (`+` stays `+`); malformed escapes are kept
/// literally, invalid UTF-8 is replaced.
pub(super) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// An answer: status, optional JSON body and the headers Graph sends with it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Reply {
    pub status: u16,
    pub body: Option<Value>,
    pub retry_after: Option<u64>,
    pub location: Option<String>,
    /// 401 answers carry Graph's `WWW-Authenticate: Bearer ...`.
    pub www_authenticate: bool,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            body: Some(body),
            retry_after: None,
            location: None,
            www_authenticate: false,
        }
    }

    pub fn empty(status: u16) -> Reply {
        Reply {
            status,
            body: None,
            retry_after: None,
            location: None,
            www_authenticate: false,
        }
    }

    /// Graph's error shape: `{"error":{"code","message","innerError":{"date","request-id",
    /// "client-request-id"}}}`.
    pub fn error(status: u16, code: &str, message: &str) -> Reply {
        let id = super::api::random_id("", 16);
        Reply::json(
            status,
            json!({"error": {
                "code": code,
                "message": message,
                "innerError": {
                    "date": iso8601(SystemTime::now()),
                    "request-id": id,
                    "client-request-id": id,
                },
            }}),
        )
    }

    pub fn retry_after(mut self, secs: u64) -> Reply {
        self.retry_after = Some(secs);
        self
    }

    pub fn location(mut self, url: String) -> Reply {
        self.location = Some(url);
        self
    }

    fn unauthorized(message: &str) -> Reply {
        let mut r = Reply::error(401, "InvalidAuthenticationToken", message);
        r.www_authenticate = true;
        r
    }

    pub fn too_large() -> Reply {
        Reply::error(
            413,
            "RequestEntityTooLarge",
            "The maximum request length supported is 4MB.",
        )
    }

    pub fn fault(fault: &GraphFault, mailbox: &str) -> Reply {
        match fault {
            GraphFault::TooManyRequests { retry_after_secs } => {
                Reply::error(429, "TooManyRequests", "Too many requests.")
                    .retry_after(*retry_after_secs)
            }
            GraphFault::Unauthorized => {
                Reply::unauthorized("Lifetime validation failed, the token is expired.")
            }
            GraphFault::Forbidden => Reply::error(
                403,
                "ErrorAccessDenied",
                "Access is denied. Check credentials and try again.",
            ),
            GraphFault::NotFound => invalid_user(mailbox),
            GraphFault::Unavailable => Reply::error(
                503,
                "ServiceUnavailable",
                "The service is temporarily unavailable. Try again later.",
            )
            .retry_after(UNAVAILABLE_RETRY_AFTER_SECS),
            GraphFault::GatewayTimeout => Reply::error(
                504,
                "GatewayTimeout",
                "The gateway did not receive a timely response from the upstream server.",
            )
            .retry_after(UNAVAILABLE_RETRY_AFTER_SECS),
            GraphFault::BadRequest { code } => Reply::error(400, code, "The request is invalid."),
        }
    }
}

/// 404 `ErrorInvalidUser`, as Graph answers for a mailbox it does not know.
pub(super) fn invalid_user(mailbox: &str) -> Reply {
    Reply::error(
        404,
        "ErrorInvalidUser",
        &format!("The requested user '{mailbox}' is invalid."),
    )
}

impl IntoResponse for Reply {
    fn into_response(self) -> axum::response::Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = match &self.body {
            Some(body) => (
                status,
                [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
                body.to_string(),
            )
                .into_response(),
            None => status.into_response(),
        };
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&super::api::random_id("", 16)) {
            h.insert("request-id", v);
        }
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(v) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            h.insert(header::LOCATION, v);
        }
        if self.www_authenticate {
            let v = format!(
                "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", client_id=\"{GRAPH_APP_ID}\""
            );
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(header::WWW_AUTHENTICATE, v);
            }
        }
        resp
    }
}

/// `2026-11-28T12:34:56Z` for `t` (UTC, whole seconds).
pub(super) fn iso8601(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        assert_eq!(
            Target::parse("/v1.0/users/Alice%40Contoso.com/messages/AAk%3D/send"),
            Target::User {
                mailbox: "Alice@Contoso.com".into(),
                rest: vec!["messages".into(), "AAk=".into(), "send".into()],
            }
        );
        assert_eq!(
            Target::parse("/v1.0/Users/a+b@x/sendMail/"),
            Target::User {
                mailbox: "a+b@x".into(),
                rest: vec!["sendMail".into()],
            }
        );
        assert_eq!(Target::parse("/upload/abc"), Target::Upload("abc".into()));
        assert_eq!(
            Target::parse("/v1.0/me/sendMail"),
            Target::Unknown("/v1.0/me/sendMail".into())
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%41%e2%82%ac"), "A€");
    }

    #[test]
    fn audience() {
        assert!(is_graph_audience("https://graph.microsoft.com/.default"));
        assert!(is_graph_audience(
            "https://graph.microsoft.com/Mail.Send offline_access"
        ));
        assert!(is_graph_audience(
            "https://microsoftgraph.chinacloudapi.cn/.default"
        ));
        assert!(is_graph_audience("Mail.Send offline_access"));
        assert!(!is_graph_audience("https://outlook.office365.com/.default"));
        assert!(!is_graph_audience(
            "https://outlook.office.com/SMTP.Send offline_access"
        ));
        assert!(!is_graph_audience(
            "https://graph.microsoft.com.evil.example/.default"
        ));
        assert!(!is_graph_audience("offline_access openid"));
    }

    #[test]
    fn formats_dates() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_709_210_096);
        assert_eq!(iso8601(t), "2024-02-29T12:34:56Z");
    }
}
