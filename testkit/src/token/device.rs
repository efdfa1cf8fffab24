//! The device authorization grant (RFC 8628) as Microsoft identity platform v2.0 runs it:
//! the `/devicecode` endpoint that hands out a device code and a user code, and the polls
//! with `grant_type=urn:ietf:params:oauth:grant-type:device_code` at the token endpoint.
//!
//! There is no user: each device code answers `authorization_pending` for the configured
//! number of polls, then the configured [`DeviceOutcome`]. Settings are read at poll time
//! (so a test may change them mid-flow), except the interval, which is fixed when the code
//! is issued. Poll timing is not enforced (`slow_down` comes only from
//! [`DeviceOutcome::SlowDownOnce`]); a code expires 900 s after issue (`tokio::time`).

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::grant::{
    authenticate, error, form_pairs, missing, random_urlsafe, require_post, user_tokens,
    wants_refresh, Client, Form, SecretRule, State,
};
use super::http::{Request, Response};

/// Where the user would go to enter the code.
const VERIFICATION_URI: &str = "https://microsoft.com/devicelogin";
/// Lifetime of a device code (Microsoft: 15 minutes).
const DEVICE_CODE_LIFETIME: Duration = Duration::from_secs(900);
/// Random bytes in a device code.
const DEVICE_CODE_RANDOM_BYTES: usize = 96;
/// Letters of a user code: consonants only, so no word (or 0/O, 1/I confusion) comes out.
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
/// Letters in a user code, shown as two groups of four (`ABCD-EFGH`).
const USER_CODE_LEN: usize = 8;

/// What the fake user does with a device code once the pending polls are used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceOutcome {
    /// Signs in: the poll gets access and refresh tokens.
    #[default]
    Approve,
    /// As `Approve`, but the first poll of each device code gets `slow_down` (before the
    /// pending polls), as when the client polls too fast.
    SlowDownOnce,
    /// Never signs in: `expired_token`, on that poll and every later one.
    Expired,
    /// Cancels the sign-in: `authorization_declined`, on that poll and every later one.
    Declined,
}

/// How device codes are answered; see [`super::FakeTokenEndpoint::set_device_flow`].
#[derive(Debug, Clone, Copy)]
pub(super) struct DeviceSettings {
    pub pending_polls: usize,
    pub interval_secs: u64,
    pub outcome: DeviceOutcome,
}

impl Default for DeviceSettings {
    fn default() -> Self {
        DeviceSettings {
            pending_polls: 2,
            interval_secs: 1,
            outcome: DeviceOutcome::Approve,
        }
    }
}

/// An issued device code.
#[derive(Debug)]
pub(super) struct Device {
    scope: String,
    expires: Instant,
    pending_answered: usize,
    slowed_down: bool,
    finished: Option<Finished>,
}

/// A device code's final state: later polls get the same kind of answer.
#[derive(Debug, Clone, Copy)]
enum Finished {
    Redeemed,
    Expired,
    Declined,
}

/// `POST .../devicecode` with `client_id` and `scope`.
pub(super) fn device_authorization(
    state: &mut State,
    client: &Client,
    req: &Request,
    now: Instant,
) -> Response {
    if let Some(resp) = require_post(req) {
        return resp;
    }
    let pairs = form_pairs(req);
    let form = Form { req, pairs: &pairs };
    if let Err(resp) = authenticate(client, &form, SecretRule::IfSent) {
        return resp;
    }
    let Some(scope) = form.get("scope") else {
        return missing("scope");
    };
    let device_code = format!("DAQABAAEAAAD{}", random_urlsafe(DEVICE_CODE_RANDOM_BYTES));
    let user_code = user_code();
    let interval = state.device.interval_secs;
    state.devices.insert(
        device_code.clone(),
        Device {
            scope: scope.to_string(),
            expires: now + DEVICE_CODE_LIFETIME,
            pending_answered: 0,
            slowed_down: false,
            finished: None,
        },
    );
    let body = json!({
        "user_code": user_code,
        "device_code": device_code,
        "verification_uri": VERIFICATION_URI,
        "expires_in": DEVICE_CODE_LIFETIME.as_secs(),
        "interval": interval,
        "message": format!(
            "To sign in, use a web browser to open the page {VERIFICATION_URI} and enter the \
             code {user_code} to authenticate."
        ),
    });
    Response::json(200, body.to_string())
}

/// `grant_type=urn:ietf:params:oauth:grant-type:device_code` at the token endpoint.
pub(super) fn poll(state: &mut State, client: &Client, form: &Form<'_>, now: Instant) -> Response {
    if let Err(resp) = authenticate(client, form, SecretRule::IfSent) {
        return resp;
    }
    let Some(code) = form.get("device_code") else {
        return missing("device_code");
    };
    let settings = state.device;
    let Some(device) = state.devices.get_mut(code) else {
        return error(
            400,
            "bad_verification_code",
            70000,
            "The device_code sent to the token endpoint was not recognized.",
        );
    };
    if device.finished.is_none() && now >= device.expires {
        device.finished = Some(Finished::Expired);
    }
    match device.finished {
        Some(Finished::Redeemed) => {
            return error(
                400,
                "invalid_grant",
                70000,
                "Provided grant is invalid or malformed. The device code was already redeemed.",
            )
        }
        Some(Finished::Expired) => return expired(),
        Some(Finished::Declined) => return declined(),
        None => {}
    }
    if settings.outcome == DeviceOutcome::SlowDownOnce && !device.slowed_down {
        device.slowed_down = true;
        return error(
            400,
            "slow_down",
            70016,
            "OAuth 2.0 device flow error. Authorization is pending. Polling too fast: add 5 \
             seconds to the interval.",
        );
    }
    if device.pending_answered < settings.pending_polls {
        device.pending_answered += 1;
        return error(
            400,
            "authorization_pending",
            70016,
            "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
        );
    }
    match settings.outcome {
        DeviceOutcome::Approve | DeviceOutcome::SlowDownOnce => {
            device.finished = Some(Finished::Redeemed);
            let scope = device.scope.clone();
            user_tokens(state, &scope, wants_refresh(&scope), now)
        }
        DeviceOutcome::Expired => {
            device.finished = Some(Finished::Expired);
            expired()
        }
        DeviceOutcome::Declined => {
            device.finished = Some(Finished::Declined);
            declined()
        }
    }
}

fn expired() -> Response {
    error(
        400,
        "expired_token",
        70020,
        "The provided value for the input parameter 'device_code' is not valid. This device \
         code has expired.",
    )
}

fn declined() -> Response {
    error(
        400,
        "authorization_declined",
        65004,
        "User declined to consent to access the app.",
    )
}

/// A fresh user code, e.g. `BCDF-GHJK`.
fn user_code() -> String {
    let random = random_urlsafe(USER_CODE_LEN);
    let mut out = String::with_capacity(USER_CODE_LEN + 1);
    for (i, b) in random.bytes().take(USER_CODE_LEN).enumerate() {
        if i == USER_CODE_LEN / 2 {
            out.push('-');
        }
        let letter = USER_CODE_ALPHABET[usize::from(b) % USER_CODE_ALPHABET.len()];
        out.push(char::from(letter));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::grant::{token_request, DEVICE_CODE_GRANT};

    #[test]
    fn device_codes_expire_after_fifteen_minutes() {
        let mut st = State::new(Duration::from_secs(60));
        let client = Client {
            id: "app".into(),
            secret: Some("s".into()),
            ..Client::default()
        };
        let now = Instant::now();
        let req = Request::form(
            "POST",
            "/t/devicecode",
            "client_id=app&scope=x+offline_access",
        );
        let r = device_authorization(&mut st, &client, &req, now);
        assert_eq!(r.status, 200, "{}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        let dc = v["device_code"].as_str().expect("device code");
        let body = format!("grant_type={DEVICE_CODE_GRANT}&client_id=app&device_code={dc}");
        let poll = Request::form("POST", "/t/token", &body);
        let r = token_request(&mut st, &client, &poll, now + Duration::from_secs(899));
        assert!(r.body.contains("authorization_pending"), "{}", r.body);
        for _ in 0..2 {
            let r = token_request(&mut st, &client, &poll, now + DEVICE_CODE_LIFETIME);
            assert_eq!(r.status, 400);
            assert!(r.body.contains("\"expired_token\""), "{}", r.body);
        }
        assert!(st.issued.is_empty());

        // GET is refused; a wrong secret, when sent, is checked.
        let get = Request::form("GET", "/t/devicecode", "");
        assert_eq!(
            device_authorization(&mut st, &client, &get, now).status,
            405
        );
        let bad = Request::form(
            "POST",
            "/t/devicecode",
            "client_id=app&client_secret=x&scope=x",
        );
        assert_eq!(
            device_authorization(&mut st, &client, &bad, now).status,
            401
        );
    }

    #[test]
    fn user_codes_look_like_microsofts() {
        for _ in 0..50 {
            let c = user_code();
            assert_eq!(c.len(), 9, "{c}");
            assert_eq!(&c[4..5], "-", "{c}");
            assert!(c
                .bytes()
                .filter(|&b| b != b'-')
                .all(|b| USER_CODE_ALPHABET.contains(&b)));
        }
    }
}
