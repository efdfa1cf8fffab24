//! The interactive flows of the fake endpoint over real loopback sockets: authorization code
//! with PKCE (redirect, redemption, reuse, the consent-declined switch), the device code
//! flow (pending, slow_down, expiry, decline), strict refresh-token rotation, and both flows
//! driven by the `oauth2` crate the bridge uses.

use std::collections::HashMap;

use oauth2::basic::BasicClient;
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, CsrfToken, DeviceAuthorizationUrl, PkceCodeChallenge,
    RedirectUrl, Scope, StandardDeviceAuthorizationResponse, TokenResponse, TokenUrl,
};
use reqwest::Url;
use serde_json::Value;
use tokio::net::TcpListener;

use super::{DeviceOutcome, FakeTokenEndpoint, TokenOptions, DEVICE_CODE_GRANT};

/// RFC 7636 Appendix B: a verifier and its S256 challenge, computed independently of the fake.
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
const REDIRECT: &str = "http://localhost:8400/";
const SCOPE: &str = "https://outlook.office.com/SMTP.Send offline_access";

async fn endpoint(opts: TokenOptions) -> FakeTokenEndpoint {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    FakeTokenEndpoint::start(listener, opts).await
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

fn enc(s: &str) -> String {
    super::http::form_encode(s)
}

/// An authorize URL with the parameters in an unusual order, percent-encoded.
fn authorize_request(ep: &FakeTokenEndpoint, redirect: &str, extra: &str) -> String {
    format!(
        "{}?scope={}&state=st%2F1%20x&code_challenge_method=S256&redirect_uri={}\
         &client_id=test-client&response_type=code&code_challenge={CHALLENGE}{extra}",
        ep.authorize_url(),
        enc(SCOPE),
        enc(redirect),
    )
}

/// GETs `url` and returns the `Location` of the expected 302 and its query parameters.
async fn follow(url: &str) -> (String, HashMap<String, String>) {
    let resp = http().get(url).send().await.expect("authorize request");
    assert_eq!(resp.status(), 302, "{url}");
    let location = resp
        .headers()
        .get("location")
        .expect("Location header")
        .to_str()
        .expect("ascii")
        .to_string();
    let query = Url::parse(&location)
        .expect("absolute URL")
        .query_pairs()
        .into_owned()
        .collect();
    (location, query)
}

async fn post(url: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let body: Vec<String> = form
        .iter()
        .map(|(k, v)| format!("{k}={}", enc(v)))
        .collect();
    let resp = http()
        .post(url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(body.join("&"))
        .send()
        .await
        .expect("post");
    let status = resp.status().as_u16();
    let v = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
    (status, v)
}

async fn redeem(ep: &FakeTokenEndpoint, code: &str, verifier: &str) -> (u16, Value) {
    let form = [
        ("grant_type", "authorization_code"),
        ("client_id", "test-client"),
        ("code", code),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier),
    ];
    post(&ep.token_url(), &form).await
}

fn assert_error(got: &(u16, Value), status: u16, error: &str, aadsts: &str) {
    let (s, v) = got;
    assert_eq!((*s, v["error"].as_str()), (status, Some(error)), "{v}");
    let desc = v["error_description"].as_str().expect("description");
    assert!(desc.starts_with(aadsts), "{desc}");
}

#[tokio::test]
async fn authorize_redirects_with_code_and_pkce_redemption_works_once() {
    let ep = endpoint(TokenOptions::default()).await;
    assert!(ep
        .authorize_url()
        .ends_with("/tenant/oauth2/v2.0/authorize"));
    let (location, q) = follow(&authorize_request(&ep, REDIRECT, "")).await;
    assert!(
        location.starts_with("http://localhost:8400/?code="),
        "{location}"
    );
    assert_eq!(q["state"], "st/1 x");
    assert!(!q.contains_key("error"));
    let code = q["code"].clone();

    // A confidential client redeeming without its secret is fine (PKCE, public-style).
    let first = redeem(&ep, &code, VERIFIER).await;
    let (status, v) = &first;
    assert_eq!(*status, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3600);
    assert_eq!(v["scope"], SCOPE);
    let access = v["access_token"].as_str().expect("access token");
    let refresh = v["refresh_token"].as_str().expect("refresh token");
    assert!(ep.is_valid(access));
    assert_eq!(ep.valid_refresh_tokens(), vec![refresh.to_string()]);

    // The same code again: refused, and no new tokens.
    let again = redeem(&ep, &code, VERIFIER).await;
    assert_error(&again, 400, "invalid_grant", "AADSTS54005");
    assert_eq!(ep.issued().len(), 1);
    assert_eq!(ep.requests_by_grant("authorization_code"), 2);
    assert_eq!(ep.requests(), 2);

    // A code nobody issued.
    assert_error(
        &redeem(&ep, "1.AQnope", VERIFIER).await,
        400,
        "invalid_grant",
        "AADSTS70008",
    );

    // Without offline_access there is no refresh token (as at Microsoft); a redirect URI
    // with a query gets the code appended with '&'.
    let url = authorize_request(&ep, "http://127.0.0.1:9/cb?x=1", "")
        .replace(&enc(SCOPE), "https%3A%2F%2Foutlook.office.com%2FSMTP.Send");
    let (location, q) = follow(&url).await;
    assert!(
        location.starts_with("http://127.0.0.1:9/cb?x=1&code="),
        "{location}"
    );
    let form = [
        ("grant_type", "authorization_code"),
        ("client_id", "test-client"),
        ("client_secret", "test-secret"),
        ("code", q["code"].as_str()),
        ("redirect_uri", "http://127.0.0.1:9/cb?x=1"),
        ("code_verifier", VERIFIER),
    ];
    let (status, v) = post(&ep.token_url(), &form).await;
    assert_eq!(status, 200, "{v}");
    assert!(v.get("refresh_token").is_none(), "{v}");
}

#[tokio::test]
async fn wrong_verifier_or_redirect_uri_is_invalid_grant_and_uses_the_code_up() {
    let ep = endpoint(TokenOptions::default()).await;
    let (_, q) = follow(&authorize_request(&ep, REDIRECT, "")).await;
    let wrong = "x".repeat(43);
    let got = redeem(&ep, &q["code"], &wrong).await;
    assert_error(&got, 400, "invalid_grant", "AADSTS501481");
    assert!(got.1["error_description"]
        .as_str()
        .expect("description")
        .starts_with(
            "AADSTS501481: The Code_Verifier does not match the code_challenge supplied in \
             the authorization request."
        ));
    // Used up by the failed attempt.
    assert_error(
        &redeem(&ep, &q["code"], VERIFIER).await,
        400,
        "invalid_grant",
        "AADSTS54005",
    );

    let (_, q) = follow(&authorize_request(&ep, REDIRECT, "")).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("client_id", "test-client"),
        ("code", q["code"].as_str()),
        ("redirect_uri", "http://localhost:8401/"),
        ("code_verifier", VERIFIER),
    ];
    assert_error(
        &post(&ep.token_url(), &form).await,
        400,
        "invalid_grant",
        "AADSTS500112",
    );
    assert!(ep.issued().is_empty());
}

#[tokio::test]
async fn authorize_validation_errors() {
    let ep = endpoint(TokenOptions::default()).await;
    // Untrustworthy client or redirect URI: 400 JSON, no redirect.
    for (url, code) in [
        (
            authorize_request(&ep, REDIRECT, "").replace("client_id=test-client", "client_id=x"),
            "unauthorized_client",
        ),
        (
            authorize_request(&ep, "https://evil.example/", ""),
            "invalid_request",
        ),
        (
            authorize_request(&ep, REDIRECT, "").replace("redirect_uri=", "redirect=x&r="),
            "invalid_request",
        ),
    ] {
        let resp = http().get(&url).send().await.expect("get");
        assert_eq!(resp.status(), 400, "{url}");
        let v: Value = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
        assert_eq!(v["error"], code, "{url}");
    }
    // Anything else: redirected back with error=invalid_request and the state.
    for (url, aadsts) in [
        (
            authorize_request(&ep, REDIRECT, "").replace("code_challenge=", "other="),
            "AADSTS900144",
        ),
        (
            authorize_request(&ep, REDIRECT, "").replace("method=S256", "method=plain"),
            "AADSTS90023",
        ),
        (
            authorize_request(&ep, REDIRECT, "")
                .replace("response_type=code", "response_type=token"),
            "AADSTS700054",
        ),
        (
            authorize_request(&ep, REDIRECT, "").replace(CHALLENGE, "tooShort"),
            "AADSTS501491",
        ),
    ] {
        let (location, q) = follow(&url).await;
        assert!(location.starts_with(REDIRECT), "{location}");
        assert_eq!(q["error"], "invalid_request", "{url}");
        assert!(q["error_description"].starts_with(aadsts), "{url}: {q:?}");
        assert_eq!(q["state"], "st/1 x");
        assert!(!q.contains_key("code"));
    }
    // POST to the authorize endpoint is not supported.
    let resp = http().post(ep.authorize_url()).send().await.expect("post");
    assert_eq!(resp.status(), 405);
}

#[tokio::test]
async fn authorize_error_switch() {
    let ep = endpoint(TokenOptions::default()).await;
    let description = "AADSTS65004: User declined to consent to access the app.";
    ep.set_authorize_error(Some(("access_denied".into(), description.into())));
    for _ in 0..2 {
        let (location, q) = follow(&authorize_request(&ep, REDIRECT, "")).await;
        assert!(location.starts_with("http://localhost:8400/?error=access_denied&"));
        assert_eq!(q["error"], "access_denied");
        assert_eq!(q["error_description"], description);
        assert_eq!(q["state"], "st/1 x");
        assert!(!q.contains_key("code"));
    }
    ep.set_authorize_error(None);
    let (_, q) = follow(&authorize_request(&ep, REDIRECT, "")).await;
    assert!(q.contains_key("code"));
}

async fn device_code(ep: &FakeTokenEndpoint) -> Value {
    let form = [("client_id", "test-client"), ("scope", SCOPE)];
    let (status, v) = post(&ep.device_authorization_url(), &form).await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn device_poll(ep: &FakeTokenEndpoint, device_code: &str) -> (u16, Value) {
    let form = [
        ("grant_type", DEVICE_CODE_GRANT),
        ("client_id", "test-client"),
        ("device_code", device_code),
    ];
    post(&ep.token_url(), &form).await
}

#[tokio::test]
async fn device_code_pending_then_tokens() {
    let ep = endpoint(TokenOptions::default()).await;
    assert!(ep
        .device_authorization_url()
        .ends_with("/tenant/oauth2/v2.0/devicecode"));
    let v = device_code(&ep).await;
    let user_code = v["user_code"].as_str().expect("user code");
    assert_eq!(user_code.len(), 9);
    assert_eq!(&user_code[4..5], "-");
    assert_eq!(v["verification_uri"], "https://microsoft.com/devicelogin");
    assert_eq!(v["expires_in"], 900);
    assert_eq!(v["interval"], 1);
    assert_eq!(
        v["message"],
        format!(
            "To sign in, use a web browser to open the page https://microsoft.com/devicelogin \
             and enter the code {user_code} to authenticate."
        )
    );
    let dc = v["device_code"].as_str().expect("device code");

    for n in 1..=2 {
        let got = device_poll(&ep, dc).await;
        assert_error(&got, 400, "authorization_pending", "AADSTS70016");
        assert_eq!(ep.device_polls(), n);
    }
    let (status, v) = device_poll(&ep, dc).await;
    assert_eq!(status, 200, "{v}");
    assert!(ep.is_valid(v["access_token"].as_str().expect("access token")));
    let refresh = v["refresh_token"].as_str().expect("refresh token");
    assert_eq!(ep.valid_refresh_tokens(), vec![refresh.to_string()]);
    assert_eq!(ep.device_polls(), 3);

    // Redeemed: no second set of tokens.
    assert_error(
        &device_poll(&ep, dc).await,
        400,
        "invalid_grant",
        "AADSTS70000",
    );
    assert_error(
        &device_poll(&ep, "DAQnope").await,
        400,
        "bad_verification_code",
        "AADSTS70000",
    );
    assert_eq!(ep.device_polls(), 5);
    assert_eq!(ep.requests_by_grant(DEVICE_CODE_GRANT), 5);
    assert_eq!(ep.issued().len(), 1);

    // The devicecode endpoint checks its client and wants a scope.
    let (status, v) = post(
        &ep.device_authorization_url(),
        &[("client_id", "x"), ("scope", SCOPE)],
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("unauthorized_client"))
    );
    let (status, v) = post(
        &ep.device_authorization_url(),
        &[("client_id", "test-client")],
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_request"))
    );
}

#[tokio::test]
async fn device_code_slow_down_once() {
    let ep = endpoint(TokenOptions::default()).await;
    ep.set_device_flow(1, 3);
    ep.set_device_outcome(DeviceOutcome::SlowDownOnce);
    let v = device_code(&ep).await;
    assert_eq!(v["interval"], 3);
    let dc = v["device_code"].as_str().expect("device code");
    assert_eq!(device_poll(&ep, dc).await.1["error"], "slow_down");
    assert_eq!(
        device_poll(&ep, dc).await.1["error"],
        "authorization_pending"
    );
    let (status, v) = device_poll(&ep, dc).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(ep.device_polls(), 3);
}

#[tokio::test]
async fn device_code_expired_and_declined() {
    let ep = endpoint(TokenOptions::default()).await;
    ep.set_device_flow(0, 1);
    ep.set_device_outcome(DeviceOutcome::Expired);
    let dc = device_code(&ep).await["device_code"]
        .as_str()
        .expect("device code")
        .to_string();
    assert_error(
        &device_poll(&ep, &dc).await,
        400,
        "expired_token",
        "AADSTS70020",
    );
    // Expiry is final, even if the user would now approve.
    ep.set_device_outcome(DeviceOutcome::Approve);
    assert_error(
        &device_poll(&ep, &dc).await,
        400,
        "expired_token",
        "AADSTS70020",
    );

    ep.set_device_flow(1, 1);
    ep.set_device_outcome(DeviceOutcome::Declined);
    let dc = device_code(&ep).await["device_code"]
        .as_str()
        .expect("device code")
        .to_string();
    assert_eq!(
        device_poll(&ep, &dc).await.1["error"],
        "authorization_pending"
    );
    assert_error(
        &device_poll(&ep, &dc).await,
        400,
        "authorization_declined",
        "AADSTS65004",
    );
    assert!(ep.issued().is_empty());
    assert!(ep.valid_refresh_tokens().is_empty());
    assert_eq!(ep.device_polls(), 4);
}

#[tokio::test]
async fn refresh_tokens_rotate_strictly() {
    let ep = endpoint(TokenOptions::default()).await;
    let old = ep.issue_refresh_token();
    assert_eq!(ep.valid_refresh_tokens(), vec![old.clone()]);
    assert_eq!(ep.last_refresh_token_used(), None);
    let refresh = |rt: String| {
        let url = ep.token_url();
        async move {
            let form = [
                ("grant_type", "refresh_token"),
                ("client_id", "test-client"),
                ("client_secret", "test-secret"),
                ("refresh_token", rt.as_str()),
            ];
            post(&url, &form).await
        }
    };
    let (status, v) = refresh(old.clone()).await;
    assert_eq!(status, 200, "{v}");
    let new = v["refresh_token"]
        .as_str()
        .expect("refresh token")
        .to_string();
    assert_ne!(new, old);
    assert_eq!(ep.valid_refresh_tokens(), vec![new.clone()]);
    assert_eq!(ep.last_refresh_token_used(), Some(old.clone()));

    // The old one is refused after its use, and that does not hurt the new one.
    assert_error(
        &refresh(old.clone()).await,
        400,
        "invalid_grant",
        "AADSTS70008",
    );
    assert_eq!(ep.last_refresh_token_used(), Some(old));
    assert_eq!(ep.valid_refresh_tokens(), vec![new.clone()]);
    let (status, v) = refresh(new.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(ep.last_refresh_token_used(), Some(new));
    assert_eq!(ep.requests_by_grant("refresh_token"), 3);
    assert_eq!(ep.requests_by_grant("client_credentials"), 0);
}

/// Both interactive flows driven by the `oauth2` crate, as a public client.
#[tokio::test]
async fn oauth2_crate_interop() {
    let ep = endpoint(TokenOptions {
        client_secret: None,
        ..TokenOptions::default()
    })
    .await;
    let http = http();
    let client = BasicClient::new(ClientId::new("test-client".into()))
        .set_auth_uri(AuthUrl::new(ep.authorize_url()).expect("auth url"))
        .set_token_uri(TokenUrl::new(ep.token_url()).expect("token url"))
        .set_device_authorization_url(
            DeviceAuthorizationUrl::new(ep.device_authorization_url()).expect("device url"),
        )
        .set_redirect_uri(RedirectUrl::new("http://localhost:53682/".into()).expect("redirect"));
    let scopes = SCOPE.split(' ').map(|s| Scope::new(s.to_string()));

    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, csrf) = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(scopes.clone())
        .set_pkce_challenge(challenge)
        .url();
    let (_, q) = follow(url.as_str()).await;
    assert_eq!(&q["state"], csrf.secret());
    let token = client
        .exchange_code(AuthorizationCode::new(q["code"].clone()))
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .expect("code exchange");
    assert!(ep.is_valid(token.access_token().secret()));
    let rt = token.refresh_token().expect("refresh token");
    assert_eq!(ep.valid_refresh_tokens(), vec![rt.secret().clone()]);

    let details: StandardDeviceAuthorizationResponse = client
        .exchange_device_code()
        .add_scopes(scopes)
        .request_async(&http)
        .await
        .expect("device authorization");
    assert_eq!(
        details.verification_uri().as_str(),
        "https://microsoft.com/devicelogin"
    );
    let token = client
        .exchange_device_access_token(&details)
        .request_async(&http, |_| async {}, None)
        .await
        .expect("device token");
    assert!(ep.is_valid(token.access_token().secret()));
    assert_eq!(ep.device_polls(), 3);
    assert_eq!(ep.valid_refresh_tokens().len(), 2);
}
