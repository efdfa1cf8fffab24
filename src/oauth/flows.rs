//! Token requests to the provider's token endpoint, through the `oauth2` crate over reqwest.
//!
//! Owns the grant requests (client credentials, refresh token) and turns the provider's
//! answers into [`TokenResponse`] or a [`FlowError`] that keeps Microsoft's `error` and
//! `error_description` (with the AADSTS code) but never a token or a secret. Caching and
//! single-flight are the manager's business.

use crate::config::OAuth;
use crate::secret::Secret;
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthType, ClientId, ClientSecret, RefreshToken, RequestTokenError, Scope, TokenResponse as _,
    TokenUrl,
};
use std::collections::HashMap;
use std::time::Duration;

/// Used when the provider does not say how long a token lives (Microsoft always does).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// A token request that takes longer than this has failed.
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What we send to the token endpoint.
#[derive(Debug)]
pub enum TokenGrant {
    ClientCredentials,
    RefreshToken(Secret),
}

impl TokenGrant {
    pub fn is_refresh(&self) -> bool {
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

#[derive(Debug, Clone, thiserror::Error)]
pub enum FlowError {
    /// The provider refused the grant (revoked or expired refresh token).
    #[error("{0}")]
    InvalidGrant(String),
    /// Any other error response from the provider (invalid_client, invalid_scope, ...).
    #[error("{0}")]
    Provider(String),
    /// Network failure, timeout or an unparseable answer.
    #[error("{0}")]
    Transport(String),
    #[error("{0}")]
    Config(String),
}

/// The HTTP client for token requests: no redirects (a token endpoint never redirects).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(TOKEN_REQUEST_TIMEOUT)
        .build()
        .unwrap_or_default()
}

pub async fn request_token(
    http: &reqwest::Client,
    oauth: &OAuth,
    grant: &TokenGrant,
) -> Result<TokenResponse, FlowError> {
    let token_url = TokenUrl::new(oauth.token_url.clone())
        .map_err(|e| FlowError::Config(format!("token_url: {e}")))?;
    let mut client = BasicClient::new(ClientId::new(oauth.client_id.clone()))
        .set_token_uri(token_url)
        .set_auth_type(AuthType::RequestBody);
    if let Some(s) = &oauth.client_secret {
        client = client.set_client_secret(ClientSecret::new(s.expose().to_string()));
    }
    let scopes = oauth.scopes.iter().map(|s| Scope::new(s.clone()));
    let result = match grant {
        TokenGrant::ClientCredentials => {
            client
                .exchange_client_credentials()
                .add_scopes(scopes)
                .request_async(http)
                .await
        }
        TokenGrant::RefreshToken(rt) => {
            let rt = RefreshToken::new(rt.expose().to_string());
            client
                .exchange_refresh_token(&rt)
                .add_scopes(scopes)
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

// ---- interactive flows for `login` ---------------------------------------------------

/// How long `login` waits for the browser to come back to the loopback redirect.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest HTTP request head accepted on the loopback redirect listener.
const MAX_REDIRECT_REQUEST: usize = 16 * 1024;

/// Maps an oauth2 request error; never includes a response body (it may carry tokens).
fn flow_error<RE, T>(
    e: RequestTokenError<RE, oauth2::StandardErrorResponse<T>>,
    what: &str,
) -> FlowError
where
    RE: std::error::Error + 'static,
    T: oauth2::ErrorResponseType + std::fmt::Display + 'static,
{
    match e {
        RequestTokenError::ServerResponse(e) => FlowError::Provider(server_error(&e)),
        RequestTokenError::Request(e) => FlowError::Transport(format!("{what} unreachable: {e}")),
        RequestTokenError::Parse(e, _body) => FlowError::Transport(format!(
            "unexpected answer from the {what} (at {})",
            e.path()
        )),
        RequestTokenError::Other(m) => FlowError::Transport(m),
    }
}

fn token_response(r: &oauth2::basic::BasicTokenResponse) -> TokenResponse {
    TokenResponse {
        access_token: Secret::new(r.access_token().secret().clone()),
        refresh_token: r.refresh_token().map(|t| Secret::new(t.secret().clone())),
        expires_in: r.expires_in().unwrap_or(DEFAULT_TOKEN_LIFETIME),
    }
}

fn server_error<T: oauth2::ErrorResponseType + std::fmt::Display>(
    e: &oauth2::StandardErrorResponse<T>,
) -> String {
    let mut text = e.error().to_string();
    if let Some(d) = e.error_description() {
        text.push_str(": ");
        text.push_str(d.lines().next().unwrap_or(d).trim());
    }
    text
}

/// An authorization-code login in progress: the URL to open and the loopback listener
/// that receives the redirect.
#[derive(Debug)]
pub struct AuthCodeLogin {
    pub url: String,
    pub redirect_uri: String,
    listeners: Vec<tokio::net::TcpListener>,
    verifier: Secret,
    state: Secret,
}

/// Binds the loopback redirect listener (`redirect_port`, 0 = any free port) and builds the
/// authorize URL with PKCE (S256) and a random state.
pub async fn start_auth_code(oauth: &OAuth) -> Result<AuthCodeLogin, FlowError> {
    let v4 = tokio::net::TcpListener::bind(("127.0.0.1", oauth.redirect_port))
        .await
        .map_err(|e| {
            FlowError::Config(format!(
                "cannot listen on 127.0.0.1:{} for the login redirect: {e}",
                oauth.redirect_port
            ))
        })?;
    let port = v4
        .local_addr()
        .map_err(|e| FlowError::Config(e.to_string()))?
        .port();
    let mut listeners = vec![v4];
    // Browsers may resolve localhost to ::1 first; listen there too when possible.
    if let Ok(v6) = tokio::net::TcpListener::bind(("::1", port)).await {
        listeners.push(v6);
    }
    let redirect_uri = format!("http://localhost:{port}/");
    let client = BasicClient::new(ClientId::new(oauth.client_id.clone()))
        .set_auth_uri(
            oauth2::AuthUrl::new(oauth.authorize_url.clone())
                .map_err(|e| FlowError::Config(format!("authorize_url: {e}")))?,
        )
        .set_redirect_uri(
            oauth2::RedirectUrl::new(redirect_uri.clone())
                .map_err(|e| FlowError::Config(format!("redirect: {e}")))?,
        );
    let (challenge, verifier) = oauth2::PkceCodeChallenge::new_random_sha256();
    let (url, state) = client
        .authorize_url(oauth2::CsrfToken::new_random)
        .add_scopes(oauth.scopes.iter().map(|s| Scope::new(s.clone())))
        .set_pkce_challenge(challenge)
        .url();
    Ok(AuthCodeLogin {
        url: url.to_string(),
        redirect_uri,
        listeners,
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
            .map_err(|_| {
                FlowError::Transport(format!("no redirect within {} s", LOGIN_TIMEOUT.as_secs()))
            })??;
        let mut client = BasicClient::new(ClientId::new(oauth.client_id.clone()))
            .set_token_uri(
                TokenUrl::new(oauth.token_url.clone())
                    .map_err(|e| FlowError::Config(format!("token_url: {e}")))?,
            )
            .set_redirect_uri(
                oauth2::RedirectUrl::new(self.redirect_uri.clone())
                    .map_err(|e| FlowError::Config(format!("redirect: {e}")))?,
            )
            .set_auth_type(AuthType::RequestBody);
        if let Some(s) = &oauth.client_secret {
            client = client.set_client_secret(ClientSecret::new(s.expose().to_string()));
        }
        let r = client
            .exchange_code(oauth2::AuthorizationCode::new(code.expose().to_string()))
            .set_pkce_verifier(oauth2::PkceCodeVerifier::new(
                self.verifier.expose().to_string(),
            ))
            .request_async(http)
            .await;
        r.map(|t| token_response(&t))
            .map_err(|e| flow_error(e, "token endpoint"))
    }

    async fn wait_for_code(&self) -> Result<Secret, FlowError> {
        loop {
            let accepted = match self.listeners.as_slice() {
                [a] => a.accept().await,
                [a, b, ..] => tokio::select! { r = a.accept() => r, r = b.accept() => r },
                [] => return Err(FlowError::Config("no redirect listener".into())),
            };
            let Ok((stream, _)) = accepted else { continue };
            match handle_redirect(stream, self.state.expose()).await {
                Redirect::Code(c) => return Ok(c),
                Redirect::Error(e) => return Err(FlowError::Provider(e)),
                Redirect::Ignored => continue,
            }
        }
    }
}

enum Redirect {
    Code(Secret),
    Error(String),
    Ignored,
}

const PAGE_OK: &str = "<!doctype html><title>smtp-oauth-bridge</title><h1>Signed in</h1><p>smtp-oauth-bridge received the authorization. You can close this window.</p>";

async fn handle_redirect(mut stream: tokio::net::TcpStream, expected_state: &str) -> Redirect {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REDIRECT_REQUEST {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return Redirect::Ignored,
        }
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
        let text = format!("{err}: {}", desc.lines().next().unwrap_or(""));
        (
            "200 OK",
            format!("<h1>Sign-in failed</h1><p>{}</p>", html_escape(&text)),
            Redirect::Error(text),
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
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
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
    pub message: Option<String>,
    pub expires_in: Duration,
}

/// Device authorization grant: asks for a code, shows it through `prompt`, then polls the
/// token endpoint at the provider's interval (authorization_pending, slow_down handled).
pub async fn device_code(
    http: &reqwest::Client,
    oauth: &OAuth,
    prompt: impl FnOnce(&DevicePrompt),
) -> Result<TokenResponse, FlowError> {
    let mut client = BasicClient::new(ClientId::new(oauth.client_id.clone()))
        .set_device_authorization_url(
            oauth2::DeviceAuthorizationUrl::new(oauth.device_authorization_url.clone())
                .map_err(|e| FlowError::Config(format!("device_authorization_url: {e}")))?,
        )
        .set_token_uri(
            TokenUrl::new(oauth.token_url.clone())
                .map_err(|e| FlowError::Config(format!("token_url: {e}")))?,
        )
        .set_auth_type(AuthType::RequestBody);
    if let Some(s) = &oauth.client_secret {
        client = client.set_client_secret(ClientSecret::new(s.expose().to_string()));
    }
    let details: oauth2::StandardDeviceAuthorizationResponse = match client
        .exchange_device_code()
        .add_scopes(oauth.scopes.iter().map(|s| Scope::new(s.clone())))
        .request_async(http)
        .await
    {
        Ok(d) => d,
        Err(e) => return Err(flow_error(e, "device authorization endpoint")),
    };
    prompt(&DevicePrompt {
        verification_uri: details.verification_uri().to_string(),
        user_code: details.user_code().secret().clone(),
        message: None,
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
