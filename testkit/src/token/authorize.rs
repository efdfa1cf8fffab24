//! The authorization code grant with PKCE, as Microsoft identity platform v2.0 runs it for a
//! native app with a loopback redirect: the `/authorize` endpoint (where a fake user
//! approves at once and the browser is redirected back with a code) and the
//! `grant_type=authorization_code` redemption at the token endpoint.
//!
//! Stricter than Microsoft where that catches client bugs: PKCE with `S256` is mandatory,
//! the redirect URI must be a loopback `http://localhost:PORT/...` or
//! `http://127.0.0.1:PORT/...`, a code works once (any redemption attempt that names it
//! uses it up) and expires after ten minutes (`tokio::time`).

use std::time::Duration;

use base64::Engine as _;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::grant::{
    authenticate, error, missing, random_urlsafe, unknown_client, user_tokens, wants_refresh,
    Client, Form, SecretRule, State,
};
use super::http::{form_encode, parse_form, Request, Response};

/// How long an authorization code can be redeemed (Microsoft: "about ten minutes").
const CODE_LIFETIME: Duration = Duration::from_secs(600);
/// Random bytes in an authorization code.
const CODE_RANDOM_BYTES: usize = 48;
/// Length of a base64url (no padding) SHA-256 digest: every S256 `code_challenge`.
const S256_CHALLENGE_LEN: usize = 43;

/// An issued, not yet redeemed authorization code and what it was issued for.
#[derive(Debug)]
pub(super) struct AuthCode {
    redirect_uri: String,
    challenge: String,
    scope: String,
    expires: Instant,
}

/// `GET .../authorize?...`: validates the request and redirects the browser back to the
/// client with a code (or with an error). Requests whose client or redirect URI cannot be
/// trusted get a 400 JSON body instead of a redirect (RFC 6749 section 4.1.2.1).
pub(super) fn authorize(
    state: &mut State,
    client: &Client,
    req: &Request,
    now: Instant,
) -> Response {
    if req.method != "GET" {
        return error(
            405,
            "invalid_request",
            900561,
            "The authorize endpoint only accepts GET requests (response_mode=query).",
        );
    }
    let pairs = parse_form(req.query.as_bytes());
    let form = Form { req, pairs: &pairs };
    let Some(client_id) = form.get("client_id") else {
        return missing("client_id");
    };
    if client_id != client.id {
        return unknown_client(client_id);
    }
    let Some(redirect_uri) = form.get("redirect_uri") else {
        return missing("redirect_uri");
    };
    if !is_loopback_redirect(redirect_uri) {
        return error(
            400,
            "invalid_request",
            50011,
            &format!(
                "The redirect URI '{redirect_uri}' specified in the request does not match \
                 the redirect URIs configured for the application '{client_id}'. This fake \
                 accepts http://localhost:PORT/... and http://127.0.0.1:PORT/... only."
            ),
        );
    }
    let back = |params: &[(&str, &str)]| {
        Response::redirect(redirect_to(redirect_uri, params, form.get("state")))
    };
    if let Err(description) = check_request(&form) {
        return back(&[
            ("error", "invalid_request"),
            ("error_description", &description),
        ]);
    }
    if let Some((err, description)) = &state.authorize_error {
        return back(&[("error", err), ("error_description", description)]);
    }
    let (Some(challenge), Some(scope)) = (form.get("code_challenge"), form.get("scope")) else {
        // check_request made sure both are present.
        return missing("code_challenge");
    };
    let code = format!("1.AQ{}", random_urlsafe(CODE_RANDOM_BYTES));
    state.codes.insert(
        code.clone(),
        AuthCode {
            redirect_uri: redirect_uri.to_string(),
            challenge: challenge.to_string(),
            scope: scope.to_string(),
            expires: now + CODE_LIFETIME,
        },
    );
    back(&[("code", &code)])
}

/// The checks after which an error can safely be redirected to the client; the
/// `error_description` (with its AADSTS code) on failure.
fn check_request(form: &Form<'_>) -> Result<(), String> {
    let need = |param: &str| {
        form.get(param).ok_or_else(|| {
            format!(
                "AADSTS900144: The request body must contain the following parameter: '{param}'."
            )
        })
    };
    let response_type = need("response_type")?;
    if response_type != "code" {
        return Err(format!(
            "AADSTS700054: response_type '{response_type}' is not enabled for the application."
        ));
    }
    if let Some(mode) = form.get("response_mode").filter(|m| *m != "query") {
        return Err(format!(
            "AADSTS90023: response_mode '{mode}' is not supported here; use 'query'."
        ));
    }
    need("scope")?;
    let challenge = need("code_challenge")?;
    let method = need("code_challenge_method")?;
    if method != "S256" {
        return Err(format!(
            "AADSTS90023: code_challenge_method '{method}' is not supported here; use 'S256'."
        ));
    }
    if challenge.len() != S256_CHALLENGE_LEN || !challenge.bytes().all(is_base64url) {
        return Err("AADSTS501491: Invalid size of Code_Challenge parameter.".to_string());
    }
    Ok(())
}

/// `grant_type=authorization_code` at the token endpoint.
pub(super) fn redeem_code(
    state: &mut State,
    client: &Client,
    form: &Form<'_>,
    now: Instant,
) -> Response {
    if let Err(resp) = authenticate(client, form, SecretRule::IfSent) {
        return resp;
    }
    let Some(code) = form.get("code") else {
        return missing("code");
    };
    let Some(issued) = state.codes.remove(code) else {
        if state.redeemed_codes.contains(code) {
            return error(
                400,
                "invalid_grant",
                54005,
                "OAuth2 Authorization code was already redeemed, please retry with a new valid \
                 code or use an existing refresh token.",
            );
        }
        return expired_code();
    };
    state.redeemed_codes.insert(code.to_string());
    if now >= issued.expires {
        return expired_code();
    }
    let Some(redirect_uri) = form.get("redirect_uri") else {
        return missing("redirect_uri");
    };
    if redirect_uri != issued.redirect_uri {
        return error(
            400,
            "invalid_grant",
            500112,
            &format!(
                "The reply address '{redirect_uri}' does not match the reply address '{}' \
                 provided when requesting Authorization code.",
                issued.redirect_uri
            ),
        );
    }
    let Some(verifier) = form.get("code_verifier") else {
        return missing("code_verifier");
    };
    if !is_valid_verifier(verifier) || s256_challenge(verifier) != issued.challenge {
        return error(
            400,
            "invalid_grant",
            501481,
            "The Code_Verifier does not match the code_challenge supplied in the authorization \
             request.",
        );
    }
    user_tokens(state, &issued.scope, wants_refresh(&issued.scope), now)
}

fn expired_code() -> Response {
    error(
        400,
        "invalid_grant",
        70008,
        "The provided authorization code or refresh token has expired due to inactivity. Send \
         a new interactive authorization request for this user and resource.",
    )
}

/// `BASE64URL-NOPAD(SHA256(verifier))`, the PKCE `S256` transformation (RFC 7636 4.2).
pub(super) fn s256_challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// RFC 7636 4.1: 43 to 128 characters of `[A-Z a-z 0-9 - . _ ~]`.
fn is_valid_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

fn is_base64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// `http://localhost:PORT` or `http://127.0.0.1:PORT`, then nothing, a path or a query; no
/// fragment, spaces or control characters (it goes into a `Location` header verbatim).
fn is_loopback_redirect(uri: &str) -> bool {
    let Some(rest) = uri
        .strip_prefix("http://localhost:")
        .or_else(|| uri.strip_prefix("http://127.0.0.1:"))
    else {
        return false;
    };
    let port_len = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let (port, tail) = rest.split_at(port_len);
    port.parse::<u16>().is_ok_and(|p| p != 0)
        && (tail.is_empty() || tail.starts_with('/') || tail.starts_with('?'))
        && uri.bytes().all(|b| b.is_ascii_graphic())
        && !uri.contains('#')
}

/// `redirect_uri` with `params` and then `state` (if any) appended to its query.
fn redirect_to(redirect_uri: &str, params: &[(&str, &str)], state: Option<&str>) -> String {
    let mut out = redirect_uri.to_string();
    let mut sep = match redirect_uri.find('?') {
        None => "?",
        Some(_) if redirect_uri.ends_with(['?', '&']) => "",
        Some(_) => "&",
    };
    for (name, value) in params.iter().copied().chain(state.map(|s| ("state", s))) {
        out.push_str(sep);
        out.push_str(name);
        out.push('=');
        out.push_str(&form_encode(value));
        sep = "&";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::grant::token_request;

    #[test]
    fn codes_expire_after_ten_minutes() {
        let mut st = State::new(Duration::from_secs(60));
        let client = Client {
            id: "app".into(),
            secret: None,
            ..Client::default()
        };
        let now = Instant::now();
        let target = "/t/oauth2/v2.0/authorize?client_id=app&response_type=code\
                      &redirect_uri=http%3A%2F%2Flocalhost%3A1%2F&scope=x&code_challenge_method=S256\
                      &code_challenge=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        let redeem = |code: &str| {
            let body = format!(
                "grant_type=authorization_code&client_id=app&code={code}\
                 &redirect_uri=http%3A%2F%2Flocalhost%3A1%2F\
                 &code_verifier=dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
            );
            Request::form("POST", "/t/token", &body)
        };
        let code_of = |r: &Response| {
            let location = r.location.as_deref().expect("redirect");
            let code = location
                .strip_prefix("http://localhost:1/?code=")
                .expect("code first");
            code.to_string()
        };
        let r = authorize(&mut st, &client, &Request::form("GET", target, ""), now);
        assert_eq!(r.status, 302);
        let late = token_request(&mut st, &client, &redeem(&code_of(&r)), now + CODE_LIFETIME);
        assert!(late.body.contains("AADSTS70008"), "{}", late.body);

        // In time, and no refresh token without offline_access.
        let r = authorize(&mut st, &client, &Request::form("GET", target, ""), now);
        let ok = token_request(&mut st, &client, &redeem(&code_of(&r)), now);
        assert_eq!(ok.status, 200, "{}", ok.body);
        assert!(!ok.body.contains("refresh_token"), "{}", ok.body);
        assert_eq!(st.grants.get("authorization_code"), Some(&2));
    }

    #[test]
    fn s256_matches_rfc7636_appendix_b() {
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        assert!(is_valid_verifier(verifier));
        assert_eq!(
            s256_challenge(verifier),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert!(!is_valid_verifier("short"));
        assert!(!is_valid_verifier(&"a".repeat(129)));
        assert!(!is_valid_verifier(&format!("{}+", "a".repeat(43))));
    }

    #[test]
    fn loopback_redirects_only() {
        for ok in [
            "http://localhost:8400/",
            "http://localhost:8400",
            "http://127.0.0.1:65535/cb?x=1",
            "http://localhost:1?x",
        ] {
            assert!(is_loopback_redirect(ok), "{ok}");
        }
        for bad in [
            "https://localhost:8400/",
            "http://localhost/",
            "http://localhost:/",
            "http://localhost:0/",
            "http://localhost:70000/",
            "http://localhost:8400.evil.example/",
            "http://localhost:8400@evil.example/",
            "http://example.com:8400/",
            "http://[::1]:8400/",
            "http://localhost:8400/#frag",
            "http://localhost:8400/\r\nSet-Cookie: x",
            "http://localhost:8400/a b",
        ] {
            assert!(!is_loopback_redirect(bad), "{bad}");
        }
    }

    #[test]
    fn redirect_query_building() {
        let params = [("code", "a b&c")];
        assert_eq!(
            redirect_to("http://localhost:1/", &params, Some("s/t")),
            "http://localhost:1/?code=a%20b%26c&state=s%2Ft"
        );
        assert_eq!(
            redirect_to("http://localhost:1/cb?x=1", &params, None),
            "http://localhost:1/cb?x=1&code=a%20b%26c"
        );
        assert_eq!(
            redirect_to("http://localhost:1/?", &params, None),
            "http://localhost:1/?code=a%20b%26c"
        );
    }
}
