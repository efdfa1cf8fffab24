//! Fake Microsoft Graph v1.0 mail endpoint (graph.microsoft.com lookalike) over real HTTP/1.1
//! (axum on hyper) on a listener the caller bound: the requests a Graph mail transport makes,
//! checked as Graph checks them, and a record of what Graph "delivered".
//!
//! Owns the public handle [`FakeGraph`], its options, the public record types
//! ([`GraphSent`], [`GraphRequest`], ...), the fault queue (by path, by method, or after
//! the request's effect: a `/send` that sends and then answers 504) and the per-mailbox
//! concurrency accounting. `http.rs` turns axum requests into checked [`http::Call`]s (body limit, bearer
//! token, faults, throttling) and answers into axum responses; `api.rs` is what each Graph
//! operation does; `mime.rs` reads recipients out of MIME and re-assembles drafts.
//!
//! What it implements (paths under `/v1.0/users/{mailbox}`, `{mailbox}` a UPN or id,
//! URL-encoded, ASCII case-insensitive):
//! - `POST /sendMail`: MIME base64 (`Content-Type: text/plain`), or the JSON form
//!   `{"message": {...}, "saveToSentItems": ..}`; 202 with an empty body.
//! - `POST /messages` (MIME base64 or JSON): a draft, 201 with the message JSON;
//!   `GET`/`PATCH`/`DELETE /messages/{id}`; `POST /messages/{id}/send` (202).
//! - `POST /messages/{id}/attachments` (a `fileAttachment`, 201) and
//!   `POST /messages/{id}/attachments/createUploadSession` (201 with an `uploadUrl` under
//!   `/upload/`, for attachments of [`UPLOAD_SESSION_MIN_BYTES`]..=[`UPLOAD_SESSION_MAX_BYTES`]);
//!   `PUT {uploadUrl}` with `Content-Range` (pre-authenticated: no `Authorization` header),
//!   200 while incomplete, 201 with `Location` when the attachment is complete.
//! - `GET /mailboxSettings` and `GET` the user: minimal JSON (for a `check`).
//!
//! Permissions are modelled as Graph grants them (see [`FakeGraphOptions::permissions`]):
//! `sendMail` and `/send` need `Mail.Send`; creating, reading, changing and deleting drafts
//! and adding attachments or upload sessions need `Mail.ReadWrite`; mailbox settings need
//! `MailboxSettings.Read`; the user object needs `User.Read.All`.

mod api;
mod http;
mod mime;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use super::token::FakeTokenEndpoint;

/// Graph's limit on one request's body: "The maximum request length supported is 4MB."
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Outlook's limit on concurrent requests per mailbox and application ("Application is over
/// its MailboxConcurrency limit."); one more in flight is answered 429.
pub const MAILBOX_CONCURRENCY: usize = 4;
/// Smallest attachment Graph takes through an upload session (its documentation: "between
/// 3 MB and 150 MB"; smaller ones go through `POST .../attachments`). Decimal MB, the lenient
/// reading.
pub const UPLOAD_SESSION_MIN_BYTES: usize = 3_000_000;
/// Largest attachment an upload session takes (150 MB, read as MiB, the lenient reading).
pub const UPLOAD_SESSION_MAX_BYTES: usize = 150 * 1024 * 1024;
/// `Retry-After` of the 429 answering a request beyond [`MAILBOX_CONCURRENCY`].
pub const THROTTLE_RETRY_AFTER_SECS: u64 = 1;
/// `Retry-After` of [`GraphFault::Unavailable`] and [`GraphFault::GatewayTimeout`] answers.
pub const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 1;
/// Drafts kept at once (created and neither sent nor deleted); one more is refused with
/// 507 `ErrorQuotaExceeded`, so a client that leaks drafts cannot grow us without bound.
const MAX_DRAFTS: usize = 1000;
/// Upload sessions open at once; one more is refused like a draft over [`MAX_DRAFTS`].
const MAX_UPLOAD_SESSIONS: usize = 100;
/// Bytes kept at once in open drafts (their MIME and attachments) and upload sessions; what
/// would pass it is refused like a draft over [`MAX_DRAFTS`] (sent messages are not counted:
/// tests read them).
const MAX_STORED_BYTES: usize = 2 * 1024 * 1024 * 1024;
/// Requests remembered by [`FakeGraph::requests`]; later ones are counted but not kept.
const MAX_REQUEST_LOG: usize = 100_000;

/// The permissions an application granted everything needs (the default).
const ALL_PERMISSIONS: [&str; 4] = [
    "Mail.Send",
    "Mail.ReadWrite",
    "MailboxSettings.Read",
    "User.Read.All",
];

/// How the fake Graph endpoint is set up. Build it with [`FakeGraphOptions::new`] and change
/// the fields you need.
#[derive(Clone, Debug)]
pub struct FakeGraphOptions {
    /// When set, every bearer token must have been issued by this endpoint, be valid now
    /// ([`FakeTokenEndpoint::is_valid`]) and have been issued for a Graph scope (audience
    /// check: `https://graph.microsoft.com/...`, the national clouds' Graph hosts, or a
    /// bare permission name such as `Mail.Send`); otherwise 401. When `None`, any non-empty
    /// bearer token is accepted.
    pub tokens: Option<FakeTokenEndpoint>,
    /// When set, the only mailboxes that exist (ASCII case-insensitive); others are 404
    /// `ErrorInvalidUser`. `None`: every mailbox exists.
    pub mailboxes: Option<Vec<String>>,
    /// Largest request body accepted, default [`MAX_REQUEST_BYTES`]; larger is 413
    /// `RequestEntityTooLarge` (refused while reading, never buffered).
    pub max_request_bytes: usize,
    /// Requests in flight at once per mailbox before a 429 `ApplicationThrottled`, default
    /// [`MAILBOX_CONCURRENCY`].
    pub mailbox_concurrency: usize,
    /// Application permissions granted (default: `Mail.Send`, `Mail.ReadWrite`,
    /// `MailboxSettings.Read`, `User.Read.All`). An operation whose permission is missing
    /// answers 403 (`ErrorAccessDenied`, or `Authorization_RequestDenied` for the user
    /// object). `vec!["Mail.Send".into()]` is an app with only Mail.Send: `sendMail` and
    /// `/send` work, drafts and upload sessions do not.
    pub permissions: Vec<String>,
    /// Every accepted request waits this long before it is answered, holding its mailbox's
    /// concurrency slot (default zero): makes concurrency observable without [`FakeGraph::pause`].
    pub response_delay: Duration,
}

impl FakeGraphOptions {
    /// Defaults: the given token endpoint, every mailbox exists, 4 MiB requests, 4 concurrent
    /// requests per mailbox, every permission, no delay.
    pub fn new(tokens: Option<FakeTokenEndpoint>) -> Self {
        FakeGraphOptions {
            tokens,
            mailboxes: None,
            max_request_bytes: MAX_REQUEST_BYTES,
            mailbox_concurrency: MAILBOX_CONCURRENCY,
            permissions: ALL_PERMISSIONS.iter().map(|p| p.to_string()).collect(),
            response_delay: Duration::ZERO,
        }
    }
}

/// A canned answer for [`FakeGraph::fail_next`] / [`FakeGraph::fail_path`], with Graph's
/// status, error code and message. A faulted request has no other effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GraphFault {
    /// 429 `TooManyRequests` with `Retry-After: retry_after_secs`.
    TooManyRequests { retry_after_secs: u64 },
    /// 401 `InvalidAuthenticationToken` (as for an expired token).
    Unauthorized,
    /// 403 `ErrorAccessDenied` "Access is denied. Check credentials and try again."
    Forbidden,
    /// 404 `ErrorInvalidUser`.
    NotFound,
    /// 503 `ServiceUnavailable` with `Retry-After: 1` ([`UNAVAILABLE_RETRY_AFTER_SECS`]).
    Unavailable,
    /// 504 `GatewayTimeout` with `Retry-After: 1`.
    GatewayTimeout,
    /// 400 with this error code, e.g. `ErrorMimeContentInvalid`.
    BadRequest { code: String },
}

/// A message Graph accepted for delivery.
#[derive(Clone, Debug)]
pub struct GraphSent {
    /// The mailbox it was sent from: the configured spelling when
    /// [`FakeGraphOptions::mailboxes`] is set, else as the request path named it (decoded).
    pub mailbox: String,
    /// The message as delivered. `sendMail` with MIME: the decoded bytes exactly as
    /// submitted. Draft path: the draft's MIME exactly as submitted when no attachment was
    /// added through the API; otherwise a `multipart/mixed` re-assembly of it (the original
    /// headers, the original body as the first part, then each added attachment, base64),
    /// so a MIME parser finds every attachment. JSON `sendMail`: a MIME rendering of the JSON.
    pub mime: Vec<u8>,
    /// The MIME exactly as the client submitted it (sendMail body or draft creation), before
    /// any re-assembly; equal to `mime` for MIME `sendMail`.
    pub submitted_mime: Vec<u8>,
    /// Recipient addresses as Graph delivers to them: for `sendMail` the MIME's To/Cc/Bcc
    /// headers, for a draft its lists at the time of `/send` (after any PATCH).
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
    /// Attachments added through the API (`POST .../attachments`, upload sessions, or the
    /// JSON `sendMail`'s `attachments`), in the order they were completed. Parts already in
    /// the MIME are not listed here.
    pub attachments: Vec<GraphAttachment>,
    pub via: GraphSendPath,
    /// Whether a copy goes to Sent Items: JSON `sendMail` honours `saveToSentItems`
    /// (default true); MIME `sendMail` and draft `/send` always save one, as Graph does.
    pub save_to_sent_items: bool,
}

impl GraphSent {
    /// Every recipient (to, cc, bcc), lowercased and sorted (duplicates kept).
    pub fn recipients(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .map(|a| a.to_ascii_lowercase())
            .collect();
        all.sort();
        all
    }
}

/// An attachment added to a message through the Graph API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphAttachment {
    pub name: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
    /// True if it arrived through an upload session, false for `POST .../attachments`.
    pub via_upload_session: bool,
}

/// How a message reached Graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphSendPath {
    /// `POST /users/{mailbox}/sendMail`, one request.
    SendMail,
    /// A draft (`POST /users/{mailbox}/messages`, ...) sent with `POST .../send`.
    Draft,
}

/// One request the endpoint answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphRequest {
    pub method: String,
    /// The path as sent (still percent-encoded), without the query.
    pub path: String,
    /// Body bytes received; for a body refused as too large, its declared `Content-Length`
    /// (or `max_request_bytes + 1` when it was chunked).
    pub body_bytes: usize,
    pub status: u16,
    /// When it was answered (tokio's clock, so `tokio::time::pause` applies): e.g. to show a
    /// retry came at least `Retry-After` after the 429.
    pub at: tokio::time::Instant,
}

/// Handle to a running fake Graph endpoint. Clones share the server and its state; the
/// server runs until the tokio runtime it was started on shuts down (dropping the last clone
/// does not stop it).
#[derive(Clone)]
pub struct FakeGraph {
    inner: Arc<Inner>,
}

impl fmt::Debug for FakeGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeGraph")
            .field("addr", &self.inner.addr)
            .field("sent", &self.inner.state().sent.len())
            .finish_non_exhaustive()
    }
}

/// Shared by the handle and the request handlers.
pub(crate) struct Inner {
    addr: SocketAddr,
    opts: FakeGraphOptions,
    state: Mutex<State>,
    /// Woken when a message is recorded as sent.
    sent_changed: Notify,
    /// Woken when a mailbox's in-flight count changes.
    flight_changed: Notify,
    /// True while requests are held (see [`FakeGraph::pause`]).
    paused: watch::Sender<bool>,
}

/// Everything the endpoint remembers between requests.
#[derive(Default)]
struct State {
    drafts: HashMap<String, api::Draft>,
    uploads: HashMap<String, api::Upload>,
    sent: Vec<GraphSent>,
    requests: Vec<GraphRequest>,
    /// Canned faults, front first.
    faults: VecDeque<Fault>,
    /// Per mailbox (lowercased): requests in flight now, and the most at once.
    flight: HashMap<String, Flight>,
}

/// A queued fault: which requests it answers, and whether the request takes effect first.
struct Fault {
    /// Matches a path (as sent, or percent-decoded) containing this.
    path: Option<String>,
    /// Matches this method only (upper case).
    method: Option<String>,
    /// The request is carried out, then answered with the fault (a gateway that timed
    /// out after the mailbox acted).
    after_effect: bool,
    fault: GraphFault,
}

#[derive(Default, Clone, Copy)]
struct Flight {
    now: usize,
    peak: usize,
}

impl State {
    /// Bytes held by open drafts and upload sessions (see [`MAX_STORED_BYTES`]).
    fn stored_bytes(&self) -> usize {
        let drafts: usize = self.drafts.values().map(api::Draft::bytes).sum();
        let uploads: usize = self.uploads.values().map(api::Upload::bytes).sum();
        drafts + uploads
    }

    /// Whether `more` bytes may be stored.
    fn has_room_for(&self, more: usize) -> bool {
        self.stored_bytes().saturating_add(more) <= MAX_STORED_BYTES
    }
}

impl FakeGraph {
    /// Starts serving on `listener` (already bound, e.g. to `127.0.0.1:0`) in a spawned task.
    pub async fn start(listener: TcpListener, opts: FakeGraphOptions) -> FakeGraph {
        let addr = listener
            .local_addr()
            .expect("a bound TcpListener has a local address");
        let addr = crate::token::reachable(addr);
        let (paused, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            addr,
            opts,
            state: Mutex::new(State::default()),
            sent_changed: Notify::new(),
            flight_changed: Notify::new(),
            paused,
        });
        let app = http::router(inner.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "fake Graph endpoint: server stopped");
            }
        });
        FakeGraph { inner }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash); the API is under `/v1.0`.
    pub fn url(&self) -> String {
        self.inner.base_url()
    }

    /// Messages Graph accepted for delivery, oldest first.
    pub fn sent(&self) -> Vec<GraphSent> {
        self.inner.state().sent.clone()
    }

    /// Waits until at least `n` messages were sent or `timeout` passed; returns [`sent`](Self::sent).
    pub async fn wait_sent(&self, n: usize, timeout: Duration) -> Vec<GraphSent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.sent_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.state().sent.len() >= n {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        self.sent()
    }

    /// Every request answered so far (up to 100,000), oldest first, faulted and refused ones
    /// included.
    pub fn requests(&self) -> Vec<GraphRequest> {
        self.inner.state().requests.clone()
    }

    /// Drafts created and neither sent nor deleted.
    pub fn open_drafts(&self) -> usize {
        self.inner.state().drafts.len()
    }

    /// Upload sessions created and neither completed nor cancelled.
    pub fn open_upload_sessions(&self) -> usize {
        self.inner.state().uploads.len()
    }

    /// The most requests that were in flight at once for `mailbox` (ASCII case-insensitive),
    /// counting from the moment a request's head arrived until it was answered, throttled
    /// ones included (so a client that ever had 5 in flight shows 5).
    pub fn peak_concurrency(&self, mailbox: &str) -> usize {
        let key = mailbox.to_ascii_lowercase();
        self.inner.state().flight.get(&key).map_or(0, |f| f.peak)
    }

    /// Requests in flight for `mailbox` right now.
    pub fn in_flight(&self, mailbox: &str) -> usize {
        let key = mailbox.to_ascii_lowercase();
        self.inner.state().flight.get(&key).map_or(0, |f| f.now)
    }

    /// Waits until `n` requests are in flight for `mailbox` (true) or `timeout` passed (false).
    pub async fn wait_in_flight(&self, mailbox: &str, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.flight_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight(mailbox) >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Holds every request that passed the checks (token, faults, concurrency) before it is
    /// answered, in flight, until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.inner.paused.send_replace(true);
    }

    /// Lets held requests (and new ones) through.
    pub fn resume(&self) {
        self.inner.paused.send_replace(false);
    }

    /// The next `n` requests, whatever their path, are answered with `fault`. Calls queue up
    /// in order with [`fail_path`](Self::fail_path).
    pub fn fail_next(&self, n: usize, fault: GraphFault) {
        self.queue_fault(n, None, None, false, fault);
    }

    /// The next `n` requests whose path (as sent, or percent-decoded) contains `contains`
    /// are answered with `fault`; other requests pass.
    pub fn fail_path(&self, n: usize, contains: &str, fault: GraphFault) {
        self.queue_fault(n, Some(contains), None, false, fault);
    }

    /// The next `n` requests with this method (`"DELETE"`, ...) whose path contains
    /// `contains` are answered with `fault`; other requests pass.
    pub fn fail_method(&self, n: usize, method: &str, contains: &str, fault: GraphFault) {
        self.queue_fault(n, Some(contains), Some(method), false, fault);
    }

    /// The next `n` requests whose path contains `contains` are carried out as usual (a
    /// `/send` sends, a `sendMail` delivers), and then answered with `fault` instead of
    /// their own answer: Graph's gateway timing out (504) after the mailbox acted.
    pub fn fail_after_effect(&self, n: usize, contains: &str, fault: GraphFault) {
        self.queue_fault(n, Some(contains), None, true, fault);
    }

    fn queue_fault(
        &self,
        n: usize,
        path: Option<&str>,
        method: Option<&str>,
        after_effect: bool,
        fault: GraphFault,
    ) {
        let mut st = self.inner.state();
        for _ in 0..n {
            st.faults.push_back(Fault {
                path: path.map(str::to_string),
                method: method.map(str::to_ascii_uppercase),
                after_effect,
                fault: fault.clone(),
            });
        }
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way that
        // matters to a test double, so recover from poisoning instead of cascading panics.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Counts a request in flight for mailbox `key` until the guard drops.
    fn enter(self: &Arc<Self>, key: String) -> FlightGuard {
        {
            let mut st = self.state();
            let f = st.flight.entry(key.clone()).or_default();
            f.now += 1;
            f.peak = f.peak.max(f.now);
        }
        self.flight_changed.notify_waiters();
        FlightGuard {
            inner: self.clone(),
            key,
        }
    }

    fn in_flight(&self, key: &str) -> usize {
        self.state().flight.get(key).map_or(0, |f| f.now)
    }

    fn record(&self, req: GraphRequest) {
        let mut st = self.state();
        if st.requests.len() < MAX_REQUEST_LOG {
            st.requests.push(req);
        }
    }

    /// The first queued fault whose filters match `method` and the `raw` or `decoded`
    /// path, removed; with whether it applies after the request's effect.
    fn take_fault(&self, method: &str, raw: &str, decoded: &str) -> Option<(GraphFault, bool)> {
        let mut st = self.state();
        let i = st.faults.iter().position(|f| {
            f.method.as_deref().is_none_or(|m| m == method)
                && match &f.path {
                    None => true,
                    Some(p) => raw.contains(p.as_str()) || decoded.contains(p.as_str()),
                }
        })?;
        st.faults.remove(i).map(|f| (f.fault, f.after_effect))
    }

    fn has_permission(&self, any_of: &[&str]) -> bool {
        self.opts
            .permissions
            .iter()
            .any(|p| any_of.iter().any(|want| p.eq_ignore_ascii_case(want)))
    }

    /// The mailbox's canonical name if it exists.
    fn mailbox(&self, decoded: &str) -> Option<String> {
        match &self.opts.mailboxes {
            None => Some(decoded.to_string()),
            Some(list) => list
                .iter()
                .find(|m| m.eq_ignore_ascii_case(decoded))
                .cloned(),
        }
    }
}

/// Decrements a mailbox's in-flight count when the request is answered (or abandoned).
struct FlightGuard {
    inner: Arc<Inner>,
    key: String,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        {
            let mut st = self.inner.state();
            if let Some(f) = st.flight.get_mut(&self.key) {
                f.now = f.now.saturating_sub(1);
            }
        }
        self.inner.flight_changed.notify_waiters();
    }
}
