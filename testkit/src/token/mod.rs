//! Fake OAuth 2.0 endpoints (Microsoft identity platform v2.0 shaped), served over real
//! HTTP/1.1 (axum on hyper) on a listener the caller bound: token, authorize (authorization code + PKCE)
//! and device authorization.
//!
//! Owns the public handle [`FakeTokenEndpoint`]: start, URLs, counters, the issued tokens and
//! the knobs tests turn (lifetime, canned failures, revocation, the fake user's answers).
//! Grant logic is in `grant.rs`, `authorize.rs` and `device.rs`; `http.rs` adapts them to axum.
//! Routing is by the end of the request path: `/token`, `/authorize`, `/devicecode`;
//! everything else is 404. Time is `tokio::time::Instant`, so `tokio::time::pause` applies.

mod assertion;
mod authorize;
mod device;
#[cfg(test)]
mod flow_tests;
mod grant;
mod http;

pub use assertion::{SeenAssertion, CLIENT_ASSERTION_TYPE, JWT_BEARER_GRANT};
pub use device::DeviceOutcome;
pub use grant::DEVICE_CODE_GRANT;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;

use assertion::Assertions;
use grant::{Client, State};
use http::{Request, Response};

/// The token path under [`FakeTokenEndpoint::base_url`]; client assertions name
/// `base_url + TOKEN_PATH` as their audience.
const TOKEN_PATH: &str = "/tenant/oauth2/v2.0/token";
/// Default access token lifetime, as Microsoft issues them (about an hour).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// How the fake endpoint is set up.
#[derive(Clone)]
pub struct TokenOptions {
    /// Lifetime of issued access tokens (`expires_in`), default 3600 s.
    pub lifetime: Duration,
    /// The one application the endpoint knows, default `"test-client"`.
    pub client_id: String,
    /// Its secret, default `Some("test-secret")`; `None` makes it a public client (which
    /// cannot use `client_credentials` and must not present a secret).
    pub client_secret: Option<String>,
    /// Certificates (PEM) registered on the application: a `client_assertion` signed with
    /// one of their keys (header `x5t#S256`) authenticates the client. Default none.
    pub client_certificates: Vec<String>,
    /// Certificates (PEM) of trusted federated issuers (workload identity): a
    /// `client_assertion` with `aud` = `api://AzureADTokenExchange` signed by one of them
    /// authenticates the client. Default none.
    pub federated_issuers: Vec<String>,
    /// Google service accounts `(client_email, certificate PEM)` whose JWT bearer grants are
    /// accepted. Default none.
    pub service_accounts: Vec<(String, String)>,
}

impl Default for TokenOptions {
    fn default() -> Self {
        TokenOptions {
            lifetime: DEFAULT_LIFETIME,
            client_id: "test-client".to_string(),
            client_secret: Some("test-secret".to_string()),
            client_certificates: Vec::new(),
            federated_issuers: Vec::new(),
            service_accounts: Vec::new(),
        }
    }
}

impl fmt::Debug for TokenOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenOptions")
            .field("lifetime", &self.lifetime)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("client_certificates", &self.client_certificates.len())
            .field("federated_issuers", &self.federated_issuers.len())
            .field("service_accounts", &self.service_accounts.len())
            .finish()
    }
}

/// Handle to a running fake token endpoint. Clones share the same server and state.
/// The server runs until the tokio runtime it was started on shuts down.
#[derive(Clone)]
pub struct FakeTokenEndpoint {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    client: Client,
    state: Mutex<State>,
    requests: AtomicUsize,
}

impl fmt::Debug for FakeTokenEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeTokenEndpoint")
            .field("addr", &self.inner.addr)
            .field("requests", &self.requests())
            .finish_non_exhaustive()
    }
}

impl FakeTokenEndpoint {
    /// Starts serving on `listener` (already bound, e.g. to `127.0.0.1:0`) in a spawned task.
    pub async fn start(listener: TcpListener, opts: TokenOptions) -> FakeTokenEndpoint {
        let addr = listener
            .local_addr()
            .expect("a bound TcpListener has a local address");
        let addr = reachable(addr);
        let token_url = format!("http://{addr}{TOKEN_PATH}");
        let inner = Arc::new(Inner {
            addr,
            client: Client {
                id: opts.client_id,
                secret: opts.client_secret,
                assertions: Assertions::new(
                    token_url,
                    &opts.client_certificates,
                    &opts.federated_issuers,
                    &opts.service_accounts,
                ),
            },
            state: Mutex::new(State::new(opts.lifetime)),
            requests: AtomicUsize::new(0),
        });
        let app = http::router(inner.clone(), Inner::handle);
        tokio::spawn(async move {
            // axum's accept loop retries failed accepts itself; it only returns on a
            // listener that cannot serve at all.
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "fake token endpoint: server stopped");
            }
        });
        FakeTokenEndpoint { inner }
    }

    /// The token URL, `http://127.0.0.1:PORT/tenant/oauth2/v2.0/token`.
    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.base_url())
    }

    /// Every assertion presented so far (client assertions and JWT bearer grants), oldest
    /// first, accepted or not.
    pub fn assertions_seen(&self) -> Vec<SeenAssertion> {
        self.inner.client.assertions.log()
    }

    /// The authorize URL, `http://127.0.0.1:PORT/tenant/oauth2/v2.0/authorize`. A GET with a
    /// valid PKCE request is answered `302 Found` to the (loopback) `redirect_uri` with
    /// `code` and `state`, as if the user had signed in and consented at once.
    pub fn authorize_url(&self) -> String {
        format!("{}/tenant/oauth2/v2.0/authorize", self.base_url())
    }

    /// The device authorization URL, `http://127.0.0.1:PORT/tenant/oauth2/v2.0/devicecode`.
    pub fn device_authorization_url(&self) -> String {
        format!("{}/tenant/oauth2/v2.0/devicecode", self.base_url())
    }

    /// `http://127.0.0.1:PORT` (or `http://[::1]:PORT` on an IPv6 listener).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Requests to the token path answered so far, whatever the outcome (requests to the
    /// authorize and devicecode paths are not counted).
    pub fn requests(&self) -> usize {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// Token requests (POST) with this `grant_type` so far, whatever the outcome, canned
    /// [`fail_next`](Self::fail_next) answers included: `"refresh_token"`,
    /// `"client_credentials"`, `"authorization_code"`, [`DEVICE_CODE_GRANT`].
    pub fn requests_by_grant(&self, grant_type: &str) -> usize {
        self.inner
            .state()
            .grants
            .get(grant_type)
            .copied()
            .unwrap_or(0)
    }

    /// The `refresh_token` presented on the most recent `refresh_token` grant request,
    /// whether or not it was accepted.
    pub fn last_refresh_token_used(&self) -> Option<String> {
        self.inner.state().last_refresh_used.clone()
    }

    /// Refresh tokens that would be accepted now, oldest first: issued, not yet used (each
    /// works once) and not revoked.
    pub fn valid_refresh_tokens(&self) -> Vec<String> {
        self.inner.state().refresh.clone()
    }

    /// While `Some((error, error_description))`, every valid authorize request is redirected
    /// back with that error instead of a code, e.g.
    /// `("access_denied", "AADSTS65004: User declined to consent to access the app.")`.
    /// `None` (the default) makes the fake user approve again.
    pub fn set_authorize_error(&self, error: Option<(String, String)>) {
        self.inner.state().authorize_error = error;
    }

    /// Device codes answer `authorization_pending` to their first `pending_polls` polls
    /// (default 2), then the [`DeviceOutcome`]. `interval_secs` (default 1) is the
    /// `interval` of device codes issued from now on.
    pub fn set_device_flow(&self, pending_polls: usize, interval_secs: u64) {
        let mut st = self.inner.state();
        st.device.pending_polls = pending_polls;
        st.device.interval_secs = interval_secs;
    }

    /// What the fake user does with device codes once their pending polls are used up
    /// (default [`DeviceOutcome::Approve`]). Read at each poll.
    pub fn set_device_outcome(&self, outcome: DeviceOutcome) {
        self.inner.state().device.outcome = outcome;
    }

    /// Device code polls so far: token requests with `grant_type` [`DEVICE_CODE_GRANT`],
    /// whatever the answer.
    pub fn device_polls(&self) -> usize {
        self.requests_by_grant(DEVICE_CODE_GRANT)
    }

    /// Lifetime of access tokens issued from now on.
    pub fn set_lifetime(&self, d: Duration) {
        self.inner.state().lifetime = d;
    }

    /// True if this endpoint issued `token`, it has not expired and was not revoked.
    pub fn is_valid(&self, token: &str) -> bool {
        self.inner.state().is_valid(token, Instant::now())
    }

    /// The `scope` access token `token` was issued for (as the grant request named it, or the
    /// default a refresh without `scope` answers), whether or not it is still valid; `None`
    /// for a token this endpoint never issued. Resource servers check their audience with it.
    pub fn scope_of(&self, token: &str) -> Option<String> {
        self.inner.state().scopes.get(token).cloned()
    }

    /// Every access token issued so far, oldest first (revoked and expired ones included).
    pub fn issued(&self) -> Vec<String> {
        self.inner.state().issued.clone()
    }

    /// The next `n` token requests are answered with `status` and the JSON `body` instead
    /// of being processed. Calls queue up: `fail_next(1, 503, ..)` then
    /// `fail_next(1, 400, ..)` fails the next request with 503 and the one after with 400.
    pub fn fail_next(&self, n: usize, status: u16, body: &str) {
        let mut st = self.inner.state();
        for _ in 0..n {
            st.failures.push_back(Response::json(status, body));
        }
    }

    /// Every access token issued so far becomes invalid (tokens issued later are valid).
    /// Refresh tokens stay valid: see [`FakeTokenEndpoint::revoke_refresh_tokens`].
    pub fn revoke_all(&self) {
        self.inner.state().access.clear();
    }

    /// Every refresh token issued so far is refused from now on (`invalid_grant`), as after
    /// a password reset or an admin revoking sessions.
    pub fn revoke_refresh_tokens(&self) {
        self.inner.state().refresh.clear();
    }

    /// Mints a refresh token as a completed interactive login would have, for seeding a
    /// token store in tests of the `refresh_token` grant. Like every refresh token it works
    /// once: a successful refresh returns its successor and invalidates it.
    pub fn issue_refresh_token(&self) -> String {
        self.inner.state().new_refresh_token()
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way that
        // matters to a test double, so recover from poisoning instead of cascading panics.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self, req: &Request) -> Response {
        let now = Instant::now();
        if req.path.ends_with("/token") {
            self.requests.fetch_add(1, Ordering::SeqCst);
            grant::token_request(&mut self.state(), &self.client, req, now)
        } else if req.path.ends_with("/authorize") {
            authorize::authorize(&mut self.state(), &self.client, req, now)
        } else if req.path.ends_with("/devicecode") {
            device::device_authorization(&mut self.state(), &self.client, req, now)
        } else {
            let body = serde_json::json!({"error": "not_found", "path": req.path});
            Response::json(404, body.to_string())
        }
    }
}

/// A listener bound to the unspecified address is reached over loopback.
pub(crate) fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn endpoint(opts: TokenOptions) -> FakeTokenEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        FakeTokenEndpoint::start(listener, opts).await
    }

    /// The value of header `name` in a response head (names are case-insensitive).
    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// Reads one response (head + Content-Length body) from `s`; returns (status, body).
    async fn read_response(s: &mut TcpStream) -> (u16, serde_json::Value) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let len: usize = header(&head, "content-length")
                    .expect("content-length")
                    .parse()
                    .expect("number");
                if buf.len() >= end + 4 + len {
                    let status = head[9..12].parse().expect("status");
                    let body = serde_json::from_slice(&buf[end + 4..end + 4 + len]).expect("json");
                    return (status, body);
                }
            }
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "connection closed mid-response");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn form_post(path: &str, body: &str) -> String {
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    const CC: &str = "grant_type=client_credentials&client_id=test-client&client_secret=test-secret&scope=https%3A%2F%2Foutlook.office365.com%2F.default";

    #[tokio::test]
    async fn keep_alive_fail_next_and_invalid_client() {
        let ep = endpoint(TokenOptions::default()).await;
        assert!(ep.token_url().starts_with("http://127.0.0.1:"));
        assert!(ep.token_url().ends_with("/tenant/oauth2/v2.0/token"));
        let mut s = TcpStream::connect(ep.inner.addr).await.expect("connect");

        // Success, then a canned 503 and a canned invalid_grant, then success: all on one
        // keep-alive connection, with the request split awkwardly across writes.
        let req = form_post("/tenant/oauth2/v2.0/token", CC);
        let (a, b) = req.split_at(17);
        s.write_all(a.as_bytes()).await.expect("write");
        s.flush().await.expect("flush");
        s.write_all(b.as_bytes()).await.expect("write");
        let (status, v) = read_response(&mut s).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["expires_in"], 3600);
        let first = v["access_token"].as_str().expect("token").to_string();
        assert!(ep.is_valid(&first));

        ep.fail_next(1, 503, r#"{"error":"temporarily_unavailable"}"#);
        ep.fail_next(1, 400, r#"{"error":"invalid_grant"}"#);
        s.write_all(req.as_bytes()).await.expect("write");
        assert_eq!(read_response(&mut s).await.0, 503);
        s.write_all(req.as_bytes()).await.expect("write");
        let (status, v) = read_response(&mut s).await;
        assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));
        s.write_all(req.as_bytes()).await.expect("write");
        assert_eq!(read_response(&mut s).await.0, 200);

        // Wrong secret.
        let bad = CC.replace("test-secret", "wrong");
        s.write_all(form_post("/x/token", &bad).as_bytes())
            .await
            .expect("write");
        let (status, v) = read_response(&mut s).await;
        assert_eq!(status, 401);
        assert_eq!(v["error"], "invalid_client");
        assert!(v["error_description"]
            .as_str()
            .expect("description")
            .starts_with("AADSTS7000215: Invalid client secret provided."));

        assert_eq!(ep.requests(), 5);
        assert_eq!(ep.issued().len(), 2);
        assert_eq!(ep.issued()[0], first);

        // Not the token path: 404 and not counted.
        s.write_all(
            b"GET /tenant/v2.0/.well-known/openid-configuration HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .expect("write");
        assert_eq!(read_response(&mut s).await.0, 404);
        assert_eq!(ep.requests(), 5);

        ep.revoke_all();
        assert!(!ep.is_valid(&first));
        assert!(!ep.is_valid("eyJ0notissued"));
    }

    #[tokio::test]
    async fn lifetime_expiry_and_refresh() {
        let ep = endpoint(TokenOptions {
            client_secret: None,
            ..TokenOptions::default()
        })
        .await;
        ep.set_lifetime(Duration::from_millis(150));
        let rt = ep.issue_refresh_token();
        let mut s = TcpStream::connect(ep.inner.addr).await.expect("connect");
        let body = format!("grant_type=refresh_token&client_id=test-client&refresh_token={rt}");
        s.write_all(form_post("/t/oauth2/v2.0/token", &body).as_bytes())
            .await
            .expect("write");
        let (status, v) = read_response(&mut s).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["expires_in"], 0);
        let at = v["access_token"].as_str().expect("token").to_string();
        let rt2 = v["refresh_token"].as_str().expect("refresh").to_string();
        assert!(ep.is_valid(&at));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!ep.is_valid(&at), "expired after its lifetime");

        // The rotated refresh token works once; its successor is the only valid one until
        // revocation, after which it is refused too.
        assert_eq!(ep.valid_refresh_tokens(), vec![rt2.clone()]);
        let body2 = format!("grant_type=refresh_token&client_id=test-client&refresh_token={rt2}");
        s.write_all(form_post("/t/oauth2/v2.0/token", &body2).as_bytes())
            .await
            .expect("write");
        let (status, v) = read_response(&mut s).await;
        assert_eq!(status, 200, "{v}");
        let rt3 = v["refresh_token"].as_str().expect("refresh").to_string();
        assert_eq!(ep.valid_refresh_tokens(), vec![rt3.clone()]);
        ep.revoke_refresh_tokens();
        assert!(ep.valid_refresh_tokens().is_empty());
        let body3 = format!("grant_type=refresh_token&client_id=test-client&refresh_token={rt3}");
        s.write_all(form_post("/t/oauth2/v2.0/token", &body3).as_bytes())
            .await
            .expect("write");
        let (status, v) = read_response(&mut s).await;
        assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));
        assert_eq!(ep.last_refresh_token_used(), Some(rt3));
        assert_eq!(ep.requests_by_grant("refresh_token"), 3);

        // A public client cannot use client_credentials.
        s.write_all(form_post("/t/oauth2/v2.0/token", CC).as_bytes())
            .await
            .expect("write");
        assert_eq!(read_response(&mut s).await.0, 401);
    }

    #[tokio::test]
    async fn connection_close_and_expect_continue() {
        let ep = endpoint(TokenOptions::default()).await;
        let mut s = TcpStream::connect(ep.inner.addr).await.expect("connect");
        let head = format!(
            "POST /t/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
            CC.len()
        );
        s.write_all(head.as_bytes()).await.expect("write");
        let mut cont = [0u8; 25];
        s.read_exact(&mut cont).await.expect("100 continue");
        assert_eq!(&cont, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(CC.as_bytes()).await.expect("write");
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.expect("server closes");
        let text = String::from_utf8_lossy(&all);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        let (head, body) = text.split_once("\r\n\r\n").expect("head");
        assert_eq!(header(head, "connection"), Some("close"), "{text}");
        assert_eq!(header(head, "cache-control"), Some("no-store, no-cache"));
        assert_eq!(header(head, "pragma"), Some("no-cache"));
        assert_eq!(
            header(head, "content-type"),
            Some("application/json; charset=utf-8")
        );
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["token_type"], "Bearer", "{v}");
        assert_eq!(ep.requests(), 1);
    }

    /// Sends `raw` on a fresh connection and returns what the server sent before closing.
    /// The server may answer and close before reading everything (a refused oversized
    /// request): write errors are ignored and reading stops at end of stream or reset.
    async fn exchange(ep: &FakeTokenEndpoint, raw: &[u8]) -> String {
        let s = TcpStream::connect(ep.inner.addr).await.expect("connect");
        let (mut r, mut w) = s.into_split();
        let raw = raw.to_vec();
        let writer = tokio::spawn(async move {
            let _ = w.write_all(&raw).await;
            w // keep the write half open until reading is done
        });
        let mut all = Vec::new();
        let mut chunk = [0u8; 4096];
        let read = async {
            while let Ok(n @ 1..) = r.read(&mut chunk).await {
                all.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("server answers and closes within 10 s");
        drop(writer);
        String::from_utf8_lossy(&all).into_owned()
    }

    #[tokio::test]
    async fn chunked_bodies_and_http10() {
        let ep = endpoint(TokenOptions::default()).await;
        let (a, b) = CC.split_at(20);
        let chunked = format!(
            "POST /t/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        let text = exchange(&ep, chunked.as_bytes()).await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("\"access_token\":\"eyJ0"), "{text}");

        // HTTP/1.0 without keep-alive: answered, then closed.
        let text = exchange(
            &ep,
            form_post("/t/token", CC)
                .replace("HTTP/1.1", "HTTP/1.0")
                .as_bytes(),
        )
        .await;
        assert!(text.contains(" 200 OK\r\n"), "{text}");
        assert_eq!(ep.requests(), 2);
        assert_eq!(ep.issued().len(), 2);
    }

    #[tokio::test]
    async fn malformed_and_oversized_requests_are_refused() {
        let ep = endpoint(TokenOptions::default()).await;
        let text = exchange(&ep, b"GARBAGE\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 400 "), "{text}");

        // A body over the limit is refused before the handler sees it.
        let head = format!(
            "POST /t/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
            2 * 1024 * 1024
        );
        let text = exchange(&ep, head.as_bytes()).await;
        assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
        assert!(
            text.ends_with(r#"{"error":"invalid_request","error_description":"body too large"}"#),
            "{text}"
        );
        // Chunked, so only counting finds it too large.
        let chunk = "a".repeat(64 * 1024);
        let mut chunked = String::from("POST /t/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n");
        for _ in 0..17 {
            chunked.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
        }
        chunked.push_str("0\r\n\r\n");
        let text = exchange(&ep, chunked.as_bytes()).await;
        assert!(text.starts_with("HTTP/1.1 413 "), "{text}");

        // A head larger than any token request.
        let huge = format!(
            "GET /t/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
            "a".repeat(1024 * 1024)
        );
        let text = exchange(&ep, huge.as_bytes()).await;
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        assert_eq!(ep.requests(), 0, "nothing reached the token handler");
    }
}
