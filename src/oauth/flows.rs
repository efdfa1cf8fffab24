//! Token requests to the provider's token endpoint, through the `oauth2` crate over reqwest.
//!
//! Owns the grant requests (client credentials, refresh token) and turns the provider's
//! answers into [`TokenResponse`] or a [`FlowError`] that keeps Microsoft's `error` and
//! `error_description` (with the AADSTS code) but never a token or a secret. Caching and
//! single-flight are the manager's business.

use crate::config::OAuth;
use crate::oauth::secret::Secret;
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthType, ClientId, ClientSecret, RefreshToken, RequestTokenError, Scope, TokenResponse as _,
    TokenUrl,
};
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
        Ok(r) => Ok(TokenResponse {
            access_token: Secret::new(r.access_token().secret().clone()),
            refresh_token: r.refresh_token().map(|t| Secret::new(t.secret().clone())),
            expires_in: r.expires_in().unwrap_or(DEFAULT_TOKEN_LIFETIME),
        }),
        Err(RequestTokenError::ServerResponse(e)) => {
            let mut text = e.error().to_string();
            if let Some(d) = e.error_description() {
                // AADSTS descriptions carry trace ids and timestamps on later lines.
                text.push_str(": ");
                text.push_str(d.lines().next().unwrap_or(d).trim());
            }
            Err(match e.error() {
                BasicErrorResponseType::InvalidGrant => FlowError::InvalidGrant(text),
                _ => FlowError::Provider(text),
            })
        }
        Err(RequestTokenError::Request(e)) => {
            // reqwest's Display includes the URL but never the request body.
            Err(FlowError::Transport(format!(
                "token endpoint unreachable: {e}"
            )))
        }
        // Deliberately not the body: a half-parsed success response may contain tokens.
        Err(RequestTokenError::Parse(e, _body)) => Err(FlowError::Transport(format!(
            "unexpected answer from the token endpoint (at {})",
            e.path()
        ))),
        Err(RequestTokenError::Other(m)) => Err(FlowError::Transport(m)),
    }
}
