//! What the fake token endpoint answers: client authentication, the token path's routing
//! by `grant_type`, the `client_credentials` and `refresh_token` grants (with strict
//! refresh-token rotation), token minting and expiry, and Microsoft-shaped error bodies
//! (`error`, `error_description` with the AADSTS code).
//!
//! Pure logic over [`State`]; sockets and HTTP framing live in `http.rs`, the public handle
//! in `mod.rs`, the interactive grants (`authorization_code` with PKCE, device code) and
//! their endpoints in `authorize.rs` and `device.rs`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use base64::Engine as _;
use serde_json::json;
use tokio::time::Instant;

use super::assertion::{Assertions, CLIENT_ASSERTION_TYPE, JWT_BEARER_GRANT};
use super::authorize::{self, AuthCode};
use super::device::{self, Device, DeviceSettings};
use super::http::{basic_credentials, parse_form, Request, Response};

/// The device code grant's registered name (RFC 8628).
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// Random bytes in an access token (-> 60 url-safe characters after the `eyJ0` prefix),
/// long enough that a test can grep logs for it without false hits.
const ACCESS_TOKEN_RANDOM_BYTES: usize = 45;
/// Random bytes in a refresh token.
const REFRESH_TOKEN_RANDOM_BYTES: usize = 60;
/// The scope that makes Microsoft issue a refresh token on an interactive grant.
const OFFLINE_ACCESS: &str = "offline_access";
/// What a refresh answers as `scope` when the request names none.
const DEFAULT_DELEGATED_SCOPE: &str = "https://outlook.office.com/SMTP.Send offline_access";

/// The registered application the endpoint knows.
#[derive(Debug, Default)]
pub(super) struct Client {
    pub id: String,
    /// `None` = a public client (no secret may be presented), unless it has a certificate
    /// or a federated credential in `assertions`.
    pub secret: Option<String>,
    /// Registered certificates, federated issuers and service accounts, and what was seen.
    pub assertions: Assertions,
}

/// Everything the endpoint remembers between requests.
#[derive(Debug)]
pub(super) struct State {
    pub lifetime: Duration,
    /// Access tokens that are still honoured (not revoked), with their expiry.
    pub access: HashMap<String, Instant>,
    /// Every access token ever issued, in order.
    pub issued: Vec<String>,
    /// The `scope` each access token was issued for (every one ever issued), so a resource
    /// server (the fake Graph endpoint) can check the token's audience.
    pub scopes: HashMap<String, String>,
    /// Refresh tokens that are honoured, oldest first. Each is removed when it is used
    /// (rotation) or revoked.
    pub refresh: Vec<String>,
    /// The `refresh_token` parameter of the most recent `refresh_token` grant request.
    pub last_refresh_used: Option<String>,
    /// Token requests per `grant_type` as sent (canned failures included).
    pub grants: HashMap<String, usize>,
    /// Canned answers for the next requests, consumed front first.
    pub failures: VecDeque<Response>,
    /// Authorization codes issued and not yet redeemed.
    pub codes: HashMap<String, AuthCode>,
    /// Authorization codes already presented once (successfully or not).
    pub redeemed_codes: HashSet<String>,
    /// When set, `/authorize` redirects with this `(error, error_description)`.
    pub authorize_error: Option<(String, String)>,
    /// Device codes issued, by `device_code`.
    pub devices: HashMap<String, Device>,
    /// How device code polls are answered.
    pub device: DeviceSettings,
}

impl State {
    pub fn new(lifetime: Duration) -> State {
        State {
            lifetime,
            access: HashMap::new(),
            issued: Vec::new(),
            scopes: HashMap::new(),
            refresh: Vec::new(),
            last_refresh_used: None,
            grants: HashMap::new(),
            failures: VecDeque::new(),
            codes: HashMap::new(),
            redeemed_codes: HashSet::new(),
            authorize_error: None,
            devices: HashMap::new(),
            device: DeviceSettings::default(),
        }
    }

    pub fn is_valid(&self, token: &str, now: Instant) -> bool {
        self.access.get(token).is_some_and(|exp| now < *exp)
    }

    pub fn new_refresh_token(&mut self) -> String {
        let token = format!("0.AAAA{}", random_urlsafe(REFRESH_TOKEN_RANDOM_BYTES));
        self.refresh.push(token.clone());
        token
    }

    /// Removes `token` from the valid refresh tokens; false if it was not valid.
    fn use_refresh_token(&mut self, token: &str) -> bool {
        let before = self.refresh.len();
        self.refresh.retain(|t| t != token);
        self.refresh.len() != before
    }

    fn new_access_token(&mut self, now: Instant, scope: &str) -> String {
        let token = format!("eyJ0{}", random_urlsafe(ACCESS_TOKEN_RANDOM_BYTES));
        self.access.insert(token.clone(), now + self.lifetime);
        self.scopes.insert(token.clone(), scope.to_string());
        self.issued.push(token.clone());
        token
    }
}

/// The success body of a delegated grant (authorization code, device code, refresh): a new
/// access token, and a new refresh token when `with_refresh`.
pub(super) fn user_tokens(
    state: &mut State,
    scope: &str,
    with_refresh: bool,
    now: Instant,
) -> Response {
    let access = state.new_access_token(now, scope);
    let secs = state.lifetime.as_secs();
    let mut body = json!({
        "token_type": "Bearer",
        "scope": scope,
        "expires_in": secs,
        "ext_expires_in": secs,
        "access_token": access,
    });
    if with_refresh {
        body["refresh_token"] = json!(state.new_refresh_token());
    }
    Response::json(200, body.to_string())
}

/// Whether an interactive grant for `scope` gets a refresh token (Microsoft issues one only
/// when `offline_access` was requested).
pub(super) fn wants_refresh(scope: &str) -> bool {
    scope.split(' ').any(|s| s == OFFLINE_ACCESS)
}

pub(super) fn random_urlsafe(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::getrandom(&mut bytes).expect("the OS random number generator is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A Microsoft-style OAuth error response.
pub(super) fn error(status: u16, code: &str, aadsts: u32, description: &str) -> Response {
    let body = json!({
        "error": code,
        "error_description": format!(
            "AADSTS{aadsts}: {description} Trace ID: 00000000-0000-0000-0000-000000000000 \
             Correlation ID: 00000000-0000-0000-0000-000000000000 Timestamp: fake"
        ),
        "error_codes": [aadsts],
        "trace_id": "00000000-0000-0000-0000-000000000000",
        "correlation_id": "00000000-0000-0000-0000-000000000000",
    });
    Response::json(status, body.to_string())
}

pub(super) fn missing(param: &str) -> Response {
    error(
        400,
        "invalid_request",
        900144,
        &format!("The request body must contain the following parameter: '{param}'."),
    )
}

/// Answers one request to the token path.
pub(super) fn token_request(
    state: &mut State,
    client: &Client,
    req: &Request,
    now: Instant,
) -> Response {
    let pairs = form_pairs(req);
    let form = Form { req, pairs: &pairs };
    if req.method == "POST" {
        if let Some(grant_type) = form.get("grant_type") {
            *state.grants.entry(grant_type.to_string()).or_default() += 1;
        }
    }
    if let Some(canned) = state.failures.pop_front() {
        return canned;
    }
    if let Some(resp) = require_post(req) {
        return resp;
    }
    let Some(grant_type) = form.get("grant_type") else {
        return missing("grant_type");
    };
    match grant_type {
        "client_credentials" => client_credentials(state, client, &form, now),
        "refresh_token" => refresh_token(state, client, &form, now),
        "authorization_code" => authorize::redeem_code(state, client, &form, now),
        DEVICE_CODE_GRANT => device::poll(state, client, &form, now),
        JWT_BEARER_GRANT => jwt_bearer(state, client, &form, now),
        other => unsupported(other),
    }
}

/// RFC 7523 JWT bearer grant (a Google service account acting for `sub`): no refresh token.
fn jwt_bearer(state: &mut State, client: &Client, form: &Form<'_>, now: Instant) -> Response {
    let Some(assertion) = form.get("assertion") else {
        return missing("assertion");
    };
    match client.assertions.verify_service_account(assertion) {
        Ok(scope) => user_tokens(state, &scope, false, now),
        Err(resp) => resp,
    }
}

/// The 405 answer to anything but POST, as Microsoft's token and devicecode endpoints give.
pub(super) fn require_post(req: &Request) -> Option<Response> {
    (req.method != "POST").then(|| {
        error(
            405,
            "invalid_request",
            900561,
            "The endpoint only accepts POST requests.",
        )
    })
}

/// The form parameters of a POST body (none unless it is declared form-encoded).
pub(super) fn form_pairs(req: &Request) -> Vec<(String, String)> {
    let form_type = req
        .header("content-type")
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if form_type {
        parse_form(&req.body)
    } else {
        Vec::new()
    }
}

/// One request and its form parameters.
pub(super) struct Form<'a> {
    pub req: &'a Request,
    pub pairs: &'a [(String, String)],
}

impl<'a> Form<'a> {
    /// The first non-empty value of a parameter.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

fn unsupported(grant_type: &str) -> Response {
    error(
        400,
        "unsupported_grant_type",
        70003,
        &format!("The app requested an unsupported grant type '{grant_type}'."),
    )
}

/// When a client secret must be presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SecretRule {
    /// Always: the grant is for confidential clients only (`client_credentials`).
    Required,
    /// Whenever the client has one (`refresh_token`).
    IfConfidential,
    /// Checked only if sent: interactive grants, which public clients redeem with PKCE.
    IfSent,
}

/// Client authentication: HTTP Basic, or `client_id` (+ `client_secret`) in the body.
/// A confidential client presents its secret as `rule` demands; a public one must not
/// present any.
pub(super) fn authenticate(
    client: &Client,
    form: &Form<'_>,
    rule: SecretRule,
) -> Result<(), Response> {
    let (id, secret) = match form.req.header("authorization").and_then(basic_credentials) {
        Some((id, secret)) => (Some(id), Some(secret).filter(|s| !s.is_empty())),
        None => (
            form.get("client_id").map(str::to_string),
            form.get("client_secret").map(str::to_string),
        ),
    };
    let Some(id) = id.filter(|i| !i.is_empty()) else {
        return Err(missing("client_id"));
    };
    if id != client.id {
        return Err(unknown_client(&id));
    }
    if let Some(assertion) = form.get("client_assertion") {
        if form.get("client_assertion_type") != Some(CLIENT_ASSERTION_TYPE) {
            return Err(error(
                400,
                "invalid_request",
                50027,
                "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer.",
            ));
        }
        if secret.is_some() {
            return Err(error(
                400,
                "invalid_request",
                7000219,
                "Only one of 'client_assertion' or 'client_secret' may be presented.",
            ));
        }
        let grant_type = form.get("grant_type").unwrap_or("");
        return client.assertions.verify_client(assertion, &id, grant_type);
    }
    let confidential_by_assertion = client.secret.is_none() && client.assertions.registered();
    if confidential_by_assertion && (secret.is_some() || rule != SecretRule::IfSent) {
        return Err(error(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or \
             'client_secret'.",
        ));
    }
    match (&client.secret, secret) {
        (Some(expected), Some(got)) if *expected == got => Ok(()),
        (Some(_), Some(_)) => Err(error(
            401,
            "invalid_client",
            7000215,
            &format!(
                "Invalid client secret provided. Ensure the secret being sent in the request \
                 is the client secret value, not the client secret ID, for a secret added to \
                 app '{id}'."
            ),
        )),
        (Some(_), None) if rule == SecretRule::IfSent => Ok(()),
        (Some(_), None) => Err(error(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or \
             'client_secret'.",
        )),
        (None, Some(_)) => Err(error(
            401,
            "invalid_client",
            700025,
            "Client is public so neither 'client_assertion' nor 'client_secret' should be \
             presented.",
        )),
        (None, None) if rule == SecretRule::Required => Err(error(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or \
             'client_secret'.",
        )),
        (None, None) => Ok(()),
    }
}

/// The answer to a `client_id` the endpoint does not know.
pub(super) fn unknown_client(id: &str) -> Response {
    error(
        400,
        "unauthorized_client",
        700016,
        &format!("Application with identifier '{id}' was not found in the directory 'FAKE'."),
    )
}

fn client_credentials(
    state: &mut State,
    client: &Client,
    form: &Form<'_>,
    now: Instant,
) -> Response {
    if let Err(resp) = authenticate(client, form, SecretRule::Required) {
        return resp;
    }
    let Some(scope) = form.get("scope") else {
        return error(
            400,
            "invalid_request",
            90014,
            "The required field 'scope' is missing from the credential. Ensure that you have \
             all the necessary parameters for the login request.",
        );
    };
    if !scope.split(' ').all(|s| s.ends_with("/.default")) {
        return error(
            400,
            "invalid_scope",
            1002012,
            &format!(
                "The provided value for scope {scope} is not valid. Client credential flows \
                 must have a scope value with /.default suffixed to the resource identifier \
                 (application ID URI)."
            ),
        );
    }
    let access = state.new_access_token(now, scope);
    let secs = state.lifetime.as_secs();
    let body = json!({
        "token_type": "Bearer",
        "expires_in": secs,
        "ext_expires_in": secs,
        "access_token": access,
    });
    Response::json(200, body.to_string())
}

fn refresh_token(state: &mut State, client: &Client, form: &Form<'_>, now: Instant) -> Response {
    if let Err(resp) = authenticate(client, form, SecretRule::IfConfidential) {
        return resp;
    }
    let Some(presented) = form.get("refresh_token") else {
        return missing("refresh_token");
    };
    state.last_refresh_used = Some(presented.to_string());
    // Strict rotation: a refresh token works once (Microsoft keeps the old one valid for a
    // while, but a client that keeps using it is buggy, and tests should see that).
    if !state.use_refresh_token(presented) {
        return error(
            400,
            "invalid_grant",
            70008,
            "The provided authorization code or refresh token has expired due to inactivity. \
             Send a new interactive authorization request for this user and resource.",
        );
    }
    let scope = form.get("scope").unwrap_or(DEFAULT_DELEGATED_SCOPE);
    user_tokens(state, scope, true, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(body: &str, auth: Option<&str>) -> Request {
        let mut headers = vec![(
            "Content-Type".to_string(),
            "application/x-www-form-urlencoded".to_string(),
        )];
        if let Some(a) = auth {
            headers.push(("Authorization".to_string(), a.to_string()));
        }
        Request {
            method: "POST".into(),
            path: "/t/oauth2/v2.0/token".into(),
            query: String::new(),
            headers,
            body: body.as_bytes().to_vec(),
        }
    }

    fn client() -> Client {
        Client {
            id: "app".into(),
            secret: Some("s3cret".into()),
            ..Client::default()
        }
    }

    fn json_of(r: &Response) -> serde_json::Value {
        serde_json::from_str(&r.body).expect("json body")
    }

    const CC: &str = "grant_type=client_credentials&client_id=app&scope=https%3A%2F%2Foutlook.office365.com%2F.default";

    #[test]
    fn client_credentials_in_body_and_basic() {
        let mut st = State::new(Duration::from_secs(60));
        let now = Instant::now();
        let r = token_request(
            &mut st,
            &client(),
            &post(&format!("{CC}&client_secret=s3cret"), None),
            now,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v = json_of(&r);
        assert_eq!(v["token_type"], "Bearer");
        assert_eq!(v["expires_in"], 60);
        assert!(v.get("refresh_token").is_none());
        let tok = v["access_token"].as_str().expect("token").to_string();
        assert!(tok.starts_with("eyJ0") && tok.len() == 64, "{tok}");
        assert!(st.is_valid(&tok, now));
        assert!(!st.is_valid(&tok, now + Duration::from_secs(60)));

        let basic = base64::engine::general_purpose::STANDARD.encode("app:s3cret");
        let r = token_request(
            &mut st,
            &client(),
            &post(CC, Some(&format!("Basic {basic}"))),
            now,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(st.issued.len(), 2);
    }

    #[test]
    fn client_errors_are_microsoft_shaped() {
        let mut st = State::new(Duration::from_secs(60));
        let now = Instant::now();
        let cases = [
            (
                format!("{CC}&client_secret=nope"),
                401,
                "invalid_client",
                "AADSTS7000215",
            ),
            (CC.to_string(), 401, "invalid_client", "AADSTS7000218"),
            (
                "grant_type=client_credentials&client_id=app&client_secret=s3cret".into(),
                400,
                "invalid_request",
                "AADSTS90014",
            ),
            (
                "grant_type=client_credentials&client_id=app&client_secret=s3cret&scope=SMTP.Send"
                    .into(),
                400,
                "invalid_scope",
                "AADSTS1002012",
            ),
            (
                format!("{CC}&client_id=other"),
                401,
                "invalid_client",
                "AADSTS7000218",
            ),
            (
                "client_id=app".into(),
                400,
                "invalid_request",
                "AADSTS900144",
            ),
            (
                "grant_type=password".into(),
                400,
                "unsupported_grant_type",
                "AADSTS70003",
            ),
            (
                "grant_type=authorization_code".into(),
                400,
                "invalid_request",
                "AADSTS900144",
            ),
            (
                "grant_type=client_credentials&client_id=zzz&client_secret=s3cret".into(),
                400,
                "unauthorized_client",
                "AADSTS700016",
            ),
        ];
        for (body, status, code, aadsts) in cases {
            let r = token_request(&mut st, &client(), &post(&body, None), now);
            assert_eq!(r.status, status, "{body}: {}", r.body);
            let v = json_of(&r);
            assert_eq!(v["error"], code, "{body}");
            let desc = v["error_description"].as_str().expect("description");
            assert!(desc.starts_with(aadsts), "{body}: {desc}");
        }
        assert!(st.issued.is_empty());
    }

    #[test]
    fn refresh_rotates_and_rejects_unknown() {
        let mut st = State::new(Duration::from_secs(3600));
        let now = Instant::now();
        let rt = st.new_refresh_token();
        let public = Client {
            id: "app".into(),
            secret: None,
            ..Client::default()
        };
        let body = format!("grant_type=refresh_token&client_id=app&refresh_token={rt}&scope=x");
        let r = token_request(&mut st, &public, &post(&body, None), now);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = json_of(&r);
        let new_rt = v["refresh_token"].as_str().expect("refresh token");
        assert_ne!(new_rt, rt);
        assert_eq!(
            st.refresh,
            vec![new_rt.to_string()],
            "the old one is used up"
        );
        assert_eq!(v["scope"], "x");
        assert_eq!(st.last_refresh_used.as_deref(), Some(rt.as_str()));

        // Presenting the used one again fails and does not touch the new one.
        let r = token_request(&mut st, &public, &post(&body, None), now);
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(json_of(&r)["error"], "invalid_grant");
        assert_eq!(st.refresh, vec![new_rt.to_string()]);
        assert_eq!(st.grants.get("refresh_token"), Some(&2));

        let r = token_request(
            &mut st,
            &public,
            &post(
                "grant_type=refresh_token&client_id=app&refresh_token=bogus",
                None,
            ),
            now,
        );
        assert_eq!(r.status, 400);
        assert_eq!(json_of(&r)["error"], "invalid_grant");
        let desc = json_of(&r)["error_description"].to_string();
        assert!(desc.contains("AADSTS70008"), "{desc}");

        // A public client must not send a secret.
        let r = token_request(
            &mut st,
            &public,
            &post(&format!("{body}&client_secret=x"), None),
            now,
        );
        assert_eq!(r.status, 401);
    }

    #[test]
    fn canned_failures_come_first() {
        let mut st = State::new(Duration::from_secs(60));
        st.failures.push_back(Response::json(503, "{}"));
        let r = token_request(&mut st, &client(), &post("", None), Instant::now());
        assert_eq!(r.status, 503);
        let r = token_request(&mut st, &client(), &post("", None), Instant::now());
        assert_eq!(r.status, 400);
    }
}
