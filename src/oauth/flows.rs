//! Token requests to the provider's token endpoint, through the `oauth2` crate over reqwest.
//!
//! Owns the grant requests (client credentials, refresh token, and the JWT bearer grant of a
//! Google service account, which `oauth2` has no builder for and we post ourselves) and
//! presents the client's credential (`credential.rs`: a secret, or a client assertion made
//! for this very request) with each. Turns the provider's
//! answers into [`TokenResponse`] or a [`FlowError`] that keeps Microsoft's `error` and
//! `error_description` (with the AADSTS code) but never a token or a secret. Caching and
//! single-flight are the manager's business.

use super::credential::{
    self, Credential, CredentialError, CLIENT_ASSERTION_TYPE, JWT_BEARER_GRANT,
};
use crate::config::{OAuth, ServiceAccountKey};
use crate::secret::Secret;
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet, RefreshToken, RequestTokenError,
    Scope, TokenResponse as _, TokenUrl,
};
use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

/// Used when the provider does not say how long a token lives (Microsoft always does).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// The longest lifetime we believe (Microsoft's tokens live 60-90 minutes): a larger
/// `expires_in` from the token endpoint, or a larger `expires_at` in the token store, is
/// taken as this, so no expiry arithmetic can overflow and a token is re-checked daily.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A token request that takes longer than this has failed.
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What we send to the token endpoint.
#[derive(Debug)]
pub(crate) enum TokenGrant {
    /// The application's own grant: `client_credentials`, or for a Google service account
    /// the JWT bearer grant (both: no refresh token, a new request whenever one is needed).
    ClientCredentials,
    RefreshToken(Secret),
}

impl TokenGrant {
    pub(crate) fn is_refresh(&self) -> bool {
        matches!(self, TokenGrant::RefreshToken(_))
    }
}

/// A successful token response.
#[derive(Debug)]
pub struct TokenResponse {
    pub access_token: Secret,
    pub refresh_token: Option<Secret>,
    pub expires_in: Duration,
}

/// An OAuth error answer (`error`, and the first line of `error_description` with
/// Microsoft's AADSTS code), from the token endpoint or the login redirect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderError {
    pub error: String,
    pub description: Option<String>,
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.error)?;
        if let Some(d) = &self.description {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProviderError {}

/// The transport error of an HTTP request made through `oauth2` over reqwest.
type HttpError = oauth2::HttpClientError<reqwest::Error>;

/// Why a token request or a login failed. Never carries a token, a secret or a response body.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// The provider refused the grant (revoked or expired refresh token).
    #[error("{0}")]
    InvalidGrant(ProviderError),
    /// Any other error answer from the provider (invalid_client, invalid_scope, ...), or a
    /// login the user declined.
    #[error("{0}")]
    Provider(ProviderError),
    /// Network failure or timeout.
    #[error("{what} unreachable: {source}")]
    Unreachable {
        what: &'static str,
        #[source]
        source: Box<HttpError>,
    },
    /// An answer that is not what OAuth says it should be (the JSON path that failed).
    #[error("unexpected answer from the {what} (at {path})")]
    UnexpectedAnswer { what: &'static str, path: String },
    /// Any other failure `oauth2` reports (e.g. a device code that expired while polling).
    #[error("{0}")]
    Other(String),
    /// `login` waited for the browser's redirect in vain.
    #[error("no redirect within {} s", .0.as_secs())]
    LoginTimedOut(Duration),
    /// A configured URL that `oauth2` does not accept.
    #[error("{key}: {source}")]
    BadUrl {
        key: &'static str,
        #[source]
        source: url::ParseError,
    },
    /// The loopback listener for the login redirect.
    #[error("cannot listen on 127.0.0.1:{port} for the login redirect: {source}")]
    RedirectListener {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    HttpClient(#[from] HttpClientError),
    /// The client credential could not be presented (e.g. an empty assertion file).
    #[error(transparent)]
    Credential(#[from] CredentialError),
}

/// The HTTP client for token requests could not be built (e.g. the TLS backend or the
/// system's root certificates failed to load).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client for token requests: {0}")]
pub struct HttpClientError(#[source] reqwest::Error);

/// The HTTP client for token requests: no redirects (a token endpoint never redirects) and a
/// timeout. Fails rather than fall back to a default client (which follows redirects and
/// never times out).
pub fn http_client() -> Result<reqwest::Client, HttpClientError> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(TOKEN_REQUEST_TIMEOUT)
        .build()
        .map_err(HttpClientError)
}

/// A client that can ask the token endpoint.
type TokenClient =
    BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// The one place the `oauth2` client for the token endpoint is set up: client id, token URL,
/// credentials in the request body (as Microsoft expects), and the client secret if any.
fn token_client(oauth: &OAuth) -> Result<TokenClient, FlowError> {
    let token_url = TokenUrl::new(oauth.token_url.clone()).map_err(|source| FlowError::BadUrl {
        key: "token_url",
        source,
    })?;
    let client = BasicClient::new(ClientId::new(oauth.client_id.clone()))
        .set_token_uri(token_url)
        .set_auth_type(AuthType::RequestBody);
    Ok(match &oauth.client_secret {
        Some(s) => client.set_client_secret(ClientSecret::new(s.expose().to_string())),
        None => client,
    })
}

fn scopes(oauth: &OAuth) -> impl Iterator<Item = Scope> + '_ {
    oauth.scopes.iter().map(|s| Scope::new(s.clone()))
}

/// Adds `client_assertion` + `client_assertion_type` to an `oauth2` token request when the
/// credential is an assertion (made or read for this request).
macro_rules! with_assertion {
    ($request:expr, $assertion:expr) => {
        match $assertion {
            Some(a) => $request
                .add_extra_param("client_assertion_type", CLIENT_ASSERTION_TYPE)
                .add_extra_param("client_assertion", a.expose().to_string()),
            None => $request,
        }
    };
}

pub(crate) async fn request_token(
    http: &reqwest::Client,
    oauth: &OAuth,
    grant: &TokenGrant,
) -> Result<TokenResponse, FlowError> {
    if let (Credential::ServiceAccount(sa), TokenGrant::ClientCredentials) =
        (Credential::of(oauth), grant)
    {
        return jwt_bearer(http, oauth, sa).await;
    }
    let client = token_client(oauth)?;
    let assertion = credential::client_assertion(oauth)?;
    let result = match grant {
        TokenGrant::ClientCredentials => {
            let request = client
                .exchange_client_credentials()
                .add_scopes(scopes(oauth));
            with_assertion!(request, &assertion)
                .request_async(http)
                .await
        }
        TokenGrant::RefreshToken(rt) => {
            let rt = RefreshToken::new(rt.expose().to_string());
            let request = client.exchange_refresh_token(&rt).add_scopes(scopes(oauth));
            with_assertion!(request, &assertion)
                .request_async(http)
                .await
        }
    };
    match result {
        Ok(r) => Ok(token_response(&r)),
        Err(RequestTokenError::ServerResponse(e))
            if *e.error() == BasicErrorResponseType::InvalidGrant =>
        {
            Err(FlowError::InvalidGrant(server_error(&e)))
        }
        Err(e) => Err(flow_error(e, "token endpoint")),
    }
}

/// The JWT bearer grant (RFC 7523 §2.1) of a Google service account acting as the mailbox.
/// Answers are read as `oauth2` reads them: the same [`TokenResponse`], the same
/// [`FlowError`]s (never a body).
async fn jwt_bearer(
    http: &reqwest::Client,
    oauth: &OAuth,
    sa: &ServiceAccountKey,
) -> Result<TokenResponse, FlowError> {
    const WHAT: &str = "token endpoint";
    let assertion = credential::service_account_assertion(sa, &oauth.scopes, &oauth.token_url)?;
    let unreachable = |e: reqwest::Error| FlowError::Unreachable {
        what: WHAT,
        source: Box::new(oauth2::HttpClientError::Reqwest(Box::new(e))),
    };
    let response = http
        .post(&oauth.token_url)
        .header(reqwest::header::ACCEPT, "application/json")
        .form(&[
            ("grant_type", JWT_BEARER_GRANT),
            ("assertion", assertion.expose()),
        ])
        .send()
        .await
        .map_err(unreachable)?;
    let status = response.status();
    let body = response.bytes().await.map_err(unreachable)?;
    let unexpected = |path: String| FlowError::UnexpectedAnswer { what: WHAT, path };
    if status.is_success() {
        let r: oauth2::basic::BasicTokenResponse =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&body))
                .map_err(|e| unexpected(e.path().to_string()))?;
        Ok(token_response(&r))
    } else {
        let e: oauth2::basic::BasicErrorResponse =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&body))
                .map_err(|e| unexpected(e.path().to_string()))?;
        Err(FlowError::Provider(server_error(&e)))
    }
}

// ---- interactive flows for `login` ---------------------------------------------------

/// How long `login` waits for the browser to come back to the loopback redirect.
pub(crate) const LOGIN_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest HTTP request head accepted on the loopback redirect listener.
const MAX_REDIRECT_REQUEST: usize = 16 * 1024;
/// Connections to the redirect listener served at once, each in its own task, so a local
/// process that connects and says nothing cannot hold up the browser. A new connection
/// beyond this displaces the oldest one still open (a browser sends its request at once;
/// only a silent or trickling client is ever the oldest for long).
const MAX_REDIRECT_CONNECTIONS: usize = 16;
/// A redirect connection must deliver its whole request head within this.
const REDIRECT_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed accept (e.g. out of file descriptors), wait this long before the next.
const REDIRECT_ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Maps an oauth2 request error; never includes a response body (it may carry tokens).
fn flow_error<T>(
    e: RequestTokenError<HttpError, oauth2::StandardErrorResponse<T>>,
    what: &'static str,
) -> FlowError
where
    T: oauth2::ErrorResponseType + std::fmt::Display + 'static,
{
    match e {
        RequestTokenError::ServerResponse(e) => FlowError::Provider(server_error(&e)),
        RequestTokenError::Request(e) => FlowError::Unreachable {
            what,
            source: Box::new(e),
        },
        RequestTokenError::Parse(e, _body) => FlowError::UnexpectedAnswer {
            what,
            path: e.path().to_string(),
        },
        RequestTokenError::Other(m) => FlowError::Other(m),
    }
}

fn token_response(r: &oauth2::basic::BasicTokenResponse) -> TokenResponse {
    TokenResponse {
        access_token: Secret::new(r.access_token().secret().clone()),
        refresh_token: r.refresh_token().map(|t| Secret::new(t.secret().clone())),
        expires_in: r
            .expires_in()
            .unwrap_or(DEFAULT_TOKEN_LIFETIME)
            .min(MAX_TOKEN_LIFETIME),
    }
}

fn server_error<T: oauth2::ErrorResponseType + std::fmt::Display>(
    e: &oauth2::StandardErrorResponse<T>,
) -> ProviderError {
    ProviderError {
        error: e.error().to_string(),
        description: e
            .error_description()
            .map(|d| d.lines().next().unwrap_or(d).trim().to_string()),
    }
}

/// An authorization-code login in progress: the URL to open and the loopback listener
/// that receives the redirect.
#[derive(Debug)]
pub struct AuthCodeLogin {
    pub url: String,
    pub redirect_uri: String,
    v4: tokio::net::TcpListener,
    /// Browsers may resolve localhost to ::1 first; we listen there too when we can.
    v6: Option<tokio::net::TcpListener>,
    verifier: Secret,
    state: Secret,
}

/// Binds the loopback redirect listener (`redirect_port`, 0 = any free port) and builds the
/// authorize URL with PKCE (S256) and a random state.
pub async fn start_auth_code(oauth: &OAuth) -> Result<AuthCodeLogin, FlowError> {
    let listen_error = |source| FlowError::RedirectListener {
        port: oauth.redirect_port,
        source,
    };
    let v4 = tokio::net::TcpListener::bind(("127.0.0.1", oauth.redirect_port))
        .await
        .map_err(listen_error)?;
    let port = v4.local_addr().map_err(listen_error)?.port();
    let v6 = tokio::net::TcpListener::bind(("::1", port)).await.ok();
    let redirect_uri = format!("http://localhost:{port}/");
    let client = BasicClient::new(ClientId::new(oauth.client_id.clone()))
        .set_auth_uri(
            oauth2::AuthUrl::new(oauth.authorize_url.clone()).map_err(|source| {
                FlowError::BadUrl {
                    key: "authorize_url",
                    source,
                }
            })?,
        )
        .set_redirect_uri(redirect_url(&redirect_uri)?);
    let (challenge, verifier) = oauth2::PkceCodeChallenge::new_random_sha256();
    let (url, state) = client
        .authorize_url(oauth2::CsrfToken::new_random)
        .add_scopes(scopes(oauth))
        .set_pkce_challenge(challenge)
        .url();
    Ok(AuthCodeLogin {
        url: url.to_string(),
        redirect_uri,
        v4,
        v6,
        verifier: Secret::new(verifier.secret().clone()),
        state: Secret::new(state.secret().clone()),
    })
}

impl AuthCodeLogin {
    /// Waits for the browser's redirect (checking `state`), answers it with a page, and
    /// exchanges the code (with the PKCE verifier) for tokens.
    pub async fn finish(
        self,
        http: &reqwest::Client,
        oauth: &OAuth,
    ) -> Result<TokenResponse, FlowError> {
        let code = tokio::time::timeout(LOGIN_TIMEOUT, self.wait_for_code())
            .await
            .map_err(|_| FlowError::LoginTimedOut(LOGIN_TIMEOUT))??;
        let assertion = credential::client_assertion(oauth)?;
        let client = token_client(oauth)?.set_redirect_uri(redirect_url(&self.redirect_uri)?);
        let request = client
            .exchange_code(oauth2::AuthorizationCode::new(code.expose().to_string()))
            .set_pkce_verifier(oauth2::PkceCodeVerifier::new(
                self.verifier.expose().to_string(),
            ));
        let r = with_assertion!(request, &assertion)
            .request_async(http)
            .await;
        r.map(|t| token_response(&t))
            .map_err(|e| flow_error(e, "token endpoint"))
    }

    /// Serves each connection in its own task (at most `MAX_REDIRECT_CONNECTIONS` at once,
    /// the oldest displaced by a new one); the first request with the right state and a code
    /// (or an error) wins, and the connections still open are dropped with the task set.
    async fn wait_for_code(&self) -> Result<Secret, FlowError> {
        let mut conns = tokio::task::JoinSet::new();
        let mut oldest_first = std::collections::VecDeque::new();
        loop {
            tokio::select! {
                accepted = self.accept() => match accepted {
                    Ok(stream) => {
                        oldest_first.retain(|h: &tokio::task::AbortHandle| !h.is_finished());
                        if oldest_first.len() >= MAX_REDIRECT_CONNECTIONS {
                            if let Some(oldest) = oldest_first.pop_front() {
                                oldest.abort();
                            }
                        }
                        let state = self.state.clone();
                        oldest_first.push_back(
                            conns.spawn(async move { handle_redirect(stream, state.expose()).await }),
                        );
                    }
                    Err(_) => tokio::time::sleep(REDIRECT_ACCEPT_BACKOFF).await,
                },
                Some(done) = conns.join_next() => match done {
                    Ok(Redirect::Code(c)) => return Ok(c),
                    Ok(Redirect::Error(e)) => return Err(FlowError::Provider(e)),
                    Ok(Redirect::Ignored) | Err(_) => {}
                },
            }
        }
    }

    async fn accept(&self) -> std::io::Result<tokio::net::TcpStream> {
        let accepted = match &self.v6 {
            None => self.v4.accept().await,
            Some(v6) => tokio::select! { r = self.v4.accept() => r, r = v6.accept() => r },
        };
        accepted.map(|(stream, _)| stream)
    }
}

fn redirect_url(uri: &str) -> Result<oauth2::RedirectUrl, FlowError> {
    oauth2::RedirectUrl::new(uri.to_string()).map_err(|source| FlowError::BadUrl {
        key: "redirect",
        source,
    })
}

enum Redirect {
    Code(Secret),
    Error(ProviderError),
    Ignored,
}

const PAGE_OK: &str = "<!doctype html><title>smtp-oauth-bridge</title><h1>Signed in</h1><p>smtp-oauth-bridge received the authorization. You can close this window.</p>";

async fn handle_redirect(mut stream: tokio::net::TcpStream, expected_state: &str) -> Redirect {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::with_capacity(2048);
    let read_head = async {
        let mut chunk = [0u8; 2048];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REDIRECT_REQUEST {
            match stream.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return false,
            }
        }
        true
    };
    // The whole head within the deadline, not each read: a trickle cannot hold a slot.
    if !matches!(
        tokio::time::timeout(REDIRECT_READ_TIMEOUT, read_head).await,
        Ok(true)
    ) {
        return Redirect::Ignored;
    }
    let head = String::from_utf8_lossy(&buf);
    let target = head
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("GET "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or("");
    let parsed = url::Url::parse(&format!("http://localhost{target}")).ok();
    let query: HashMap<String, String> = parsed
        .as_ref()
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default();
    let (status, page, outcome) = if parsed.as_ref().is_none_or(|u| u.path() != "/")
        || (!query.contains_key("code") && !query.contains_key("error"))
    {
        ("404 Not Found", "not found".to_string(), Redirect::Ignored)
    } else if query.get("state").map(String::as_str) != Some(expected_state) {
        // Not our request (or forged): refuse, keep waiting for the real one.
        (
            "400 Bad Request",
            "<h1>State mismatch</h1><p>This response does not belong to the running login.</p>"
                .to_string(),
            Redirect::Ignored,
        )
    } else if let Some(err) = query.get("error") {
        let desc = query
            .get("error_description")
            .map(String::as_str)
            .unwrap_or("");
        let e = ProviderError {
            error: err.clone(),
            description: Some(desc.lines().next().unwrap_or("").to_string()),
        };
        (
            "200 OK",
            format!(
                "<h1>Sign-in failed</h1><p>{}</p>",
                html_escape(&e.to_string())
            ),
            Redirect::Error(e),
        )
    } else {
        let code = query.get("code").cloned().unwrap_or_default();
        (
            "200 OK",
            PAGE_OK.to_string(),
            Redirect::Code(Secret::new(code)),
        )
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n{page}",
        page.len()
    );
    let _ = tokio::time::timeout(REDIRECT_READ_TIMEOUT, async {
        let _ = stream.write_all(resp.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
    outcome
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// What the user must do for a device-code login.
#[derive(Debug, Clone)]
pub struct DevicePrompt {
    pub verification_uri: String,
    pub user_code: String,
    pub expires_in: Duration,
}

/// Device authorization grant: asks for a code, shows it through `prompt`, then polls the
/// token endpoint at the provider's interval (authorization_pending, slow_down handled).
pub async fn device_code(
    http: &reqwest::Client,
    oauth: &OAuth,
    prompt: impl FnOnce(&DevicePrompt),
) -> Result<TokenResponse, FlowError> {
    let client = token_client(oauth)?.set_device_authorization_url(
        oauth2::DeviceAuthorizationUrl::new(oauth.device_authorization_url.clone()).map_err(
            |source| FlowError::BadUrl {
                key: "device_authorization_url",
                source,
            },
        )?,
    );
    let details: oauth2::StandardDeviceAuthorizationResponse = match client
        .exchange_device_code()
        .add_scopes(scopes(oauth))
        .request_async(http)
        .await
    {
        Ok(d) => d,
        Err(e) => return Err(flow_error(e, "device authorization endpoint")),
    };
    prompt(&DevicePrompt {
        verification_uri: details.verification_uri().to_string(),
        user_code: details.user_code().secret().clone(),
        expires_in: details.expires_in(),
    });
    match client
        .exchange_device_access_token(&details)
        .request_async(http, tokio::time::sleep, None)
        .await
    {
        Ok(t) => Ok(token_response(&t)),
        Err(e) => Err(flow_error(e, "token endpoint")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn auth_code_login() -> AuthCodeLogin {
        let toml = "[upstream]\nhost = \"127.0.0.1\"\n[state]\ndir = \"state\"\n\
             [[account]]\nusername = \"u\"\npassword_env = \"PW\"\nmailbox = \"u@example.com\"\n\
             [account.oauth]\nflow = \"authorization_code\"\ntenant = \"t\"\nclient_id = \"c\"\n";
        let config =
            crate::config::Config::from_toml(toml, "t.toml", std::path::Path::new("/"), &|_| {
                Some("pw".to_string())
            })
            .expect("test config");
        start_auth_code(&config.accounts[0].oauth)
            .await
            .expect("redirect listener")
    }

    async fn get(port: u16, target: &str) -> String {
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_and_slow_local_clients_do_not_hold_up_the_redirect() {
        let login = auth_code_login().await;
        let port = login.v4.local_addr().unwrap().port();
        let state = login.state.expose().to_string();
        let waiting =
            tokio::spawn(
                async move { login.wait_for_code().await.map(|c| c.expose().to_string()) },
            );
        // More silent connections than are served at once, and one trickling a partial head.
        let mut idle = Vec::new();
        for _ in 0..MAX_REDIRECT_CONNECTIONS + 4 {
            idle.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        }
        let mut partial = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        partial.write_all(b"GET /?code=slow&state=").await.unwrap();
        let started = std::time::Instant::now();
        // A forged callback is answered 400 and does not end the login.
        let forged = get(port, "/?code=forged&state=wrong").await;
        assert!(forged.starts_with("HTTP/1.1 400 "), "{forged}");
        let page = get(port, &format!("/?code=the-code&state={state}")).await;
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        assert!(page.contains("Signed in"), "{page}");
        let code = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("the code within 2 s")
            .unwrap()
            .unwrap();
        assert_eq!(code, "the-code");
        // Not even one read timeout: the silent ones were displaced or left waiting.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        drop((idle, partial));
    }

    fn parsed(expires_in: &str) -> Result<TokenResponse, serde_json::Error> {
        let body =
            format!(r#"{{"access_token":"at","token_type":"Bearer","expires_in":{expires_in}}}"#);
        serde_json::from_str::<oauth2::basic::BasicTokenResponse>(&body).map(|r| token_response(&r))
    }

    #[test]
    fn expires_in_is_capped_at_a_day_and_nonsense_is_an_error() {
        for (given, want) in [
            ("3599", 3599),
            ("86400", 86_400),
            ("86401", 86_400),
            ("9223372036854775808", 86_400),
            ("18446744073709551615", 86_400),
        ] {
            assert_eq!(
                parsed(given).unwrap().expires_in,
                Duration::from_secs(want),
                "{given}"
            );
        }
        for bad in ["-1", "18446744073709551616", "-9223372036854775809", "1e30"] {
            assert!(parsed(bad).is_err(), "{bad}");
        }
    }
}
