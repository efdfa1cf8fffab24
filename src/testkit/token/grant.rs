//! What the fake token endpoint answers: client authentication, the OAuth 2.0 grants it
//! supports (`client_credentials`, `refresh_token`), token minting and expiry, and
//! Microsoft-shaped error bodies (`error`, `error_description` with the AADSTS code).
//!
//! Pure logic over [`State`]; sockets and HTTP framing live in `http.rs`, the public handle
//! in `mod.rs`. To add `authorization_code` or `device_code`, add a function beside
//! [`refresh_token`] and route it in [`token_request`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use base64::Engine as _;
use serde_json::json;
use tokio::time::Instant;

use super::http::{basic_credentials, parse_form, Request, Response};

/// The device code grant's registered name (RFC 8628).
pub(super) const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// Random bytes in an access token (-> 60 url-safe characters after the `eyJ0` prefix),
/// long enough that a test can grep logs for it without false hits.
const ACCESS_TOKEN_RANDOM_BYTES: usize = 45;
/// Random bytes in a refresh token.
const REFRESH_TOKEN_RANDOM_BYTES: usize = 60;

/// The registered application the endpoint knows.
#[derive(Debug)]
pub(super) struct Client {
    pub id: String,
    /// `None` = a public client (no secret may be presented).
    pub secret: Option<String>,
}

/// Everything the endpoint remembers between requests.
#[derive(Debug)]
pub(super) struct State {
    pub lifetime: Duration,
    /// Access tokens that are still honoured (not revoked), with their expiry.
    pub access: HashMap<String, Instant>,
    /// Every access token ever issued, in order.
    pub issued: Vec<String>,
    /// Refresh tokens that are honoured.
    pub refresh: HashSet<String>,
    /// Canned answers for the next requests, consumed front first.
    pub failures: VecDeque<Response>,
}

impl State {
    pub fn new(lifetime: Duration) -> State {
        State {
            lifetime,
            access: HashMap::new(),
            issued: Vec::new(),
            refresh: HashSet::new(),
            failures: VecDeque::new(),
        }
    }

    pub fn is_valid(&self, token: &str, now: Instant) -> bool {
        self.access.get(token).is_some_and(|exp| now < *exp)
    }

    pub fn new_refresh_token(&mut self) -> String {
        let token = format!("0.AAAA{}", random_urlsafe(REFRESH_TOKEN_RANDOM_BYTES));
        self.refresh.insert(token.clone());
        token
    }

    fn new_access_token(&mut self, now: Instant) -> String {
        let token = format!("eyJ0{}", random_urlsafe(ACCESS_TOKEN_RANDOM_BYTES));
        self.access.insert(token.clone(), now + self.lifetime);
        self.issued.push(token.clone());
        token
    }
}

fn random_urlsafe(n: usize) -> String {
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

fn missing(param: &str) -> Response {
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
    if let Some(canned) = state.failures.pop_front() {
        return canned;
    }
    if req.method != "POST" {
        return error(
            405,
            "invalid_request",
            900561,
            "The endpoint only accepts POST requests.",
        );
    }
    let form_type = req
        .header("content-type")
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let pairs = if form_type {
        parse_form(&req.body)
    } else {
        Vec::new()
    };
    let form = Form { req, pairs: &pairs };
    let Some(grant_type) = form.get("grant_type") else {
        return missing("grant_type");
    };
    match grant_type {
        "client_credentials" => client_credentials(state, client, &form, now),
        "refresh_token" => refresh_token(state, client, &form, now),
        // Not implemented yet: these need an /authorize or /devicecode endpoint first.
        "authorization_code" | DEVICE_CODE_GRANT => unsupported(grant_type),
        other => unsupported(other),
    }
}

/// One request and its form parameters.
struct Form<'a> {
    req: &'a Request,
    pairs: &'a [(String, String)],
}

impl<'a> Form<'a> {
    /// The first non-empty value of a parameter.
    fn get(&self, name: &str) -> Option<&'a str> {
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

/// Client authentication: HTTP Basic, or `client_id` (+ `client_secret`) in the body.
/// A confidential client must present its secret; a public one must not present any.
fn authenticate(client: &Client, form: &Form<'_>, confidential_only: bool) -> Result<(), Response> {
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
        return Err(error(
            400,
            "unauthorized_client",
            700016,
            &format!("Application with identifier '{id}' was not found in the directory 'FAKE'."),
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
        (None, None) if confidential_only => Err(error(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or \
             'client_secret'.",
        )),
        (None, None) => Ok(()),
    }
}

fn client_credentials(
    state: &mut State,
    client: &Client,
    form: &Form<'_>,
    now: Instant,
) -> Response {
    if let Err(resp) = authenticate(client, form, true) {
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
    let access = state.new_access_token(now);
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
    if let Err(resp) = authenticate(client, form, false) {
        return resp;
    }
    let Some(presented) = form.get("refresh_token") else {
        return missing("refresh_token");
    };
    if !state.refresh.contains(presented) {
        return error(
            400,
            "invalid_grant",
            70008,
            "The provided authorization code or refresh token has expired due to inactivity. \
             Send a new interactive authorization request for this user and resource.",
        );
    }
    let scope = form
        .get("scope")
        .unwrap_or("https://outlook.office.com/SMTP.Send offline_access")
        .to_string();
    let access = state.new_access_token(now);
    let refresh = state.new_refresh_token();
    let secs = state.lifetime.as_secs();
    let body = json!({
        "token_type": "Bearer",
        "scope": scope,
        "expires_in": secs,
        "ext_expires_in": secs,
        "access_token": access,
        "refresh_token": refresh,
    });
    Response::json(200, body.to_string())
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
            headers,
            body: body.as_bytes().to_vec(),
            http11: true,
        }
    }

    fn client() -> Client {
        Client {
            id: "app".into(),
            secret: Some("s3cret".into()),
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
                "unsupported_grant_type",
                "AADSTS70003",
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
        };
        let body = format!("grant_type=refresh_token&client_id=app&refresh_token={rt}&scope=x");
        let r = token_request(&mut st, &public, &post(&body, None), now);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = json_of(&r);
        let new_rt = v["refresh_token"].as_str().expect("refresh token");
        assert_ne!(new_rt, rt);
        assert!(st.refresh.contains(new_rt));
        assert_eq!(v["scope"], "x");

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
