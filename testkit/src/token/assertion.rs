//! Assertions the fake token endpoint verifies for real: client assertions signed with a
//! registered certificate (RFC 7523 client authentication, Microsoft's `x5t#S256` header),
//! federated assertions signed by a registered issuer (workload identity), and Google
//! service-account JWT bearer grants (RFC 7523 authorization grant).
//!
//! Signatures are checked with rustls-webpki against the registered certificate's public key
//! (RS256 only); then the claims: `aud` = the token URL, `exp` in the future and within 10
//! minutes (an hour for service accounts), `iss`/`sub`, and a one-time `jti`. Refusals carry
//! Microsoft's (`invalid_client`, AADSTS700027...) or Google's (`invalid_grant`) error bodies.
//! Every assertion presented is recorded ([`SeenAssertion`]) for tests to inspect.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Value};

use super::grant::error;
use super::http::Response;
use crate::credential::{pem_der, FEDERATED_AUDIENCE};

/// `client_assertion_type` of a JWT client assertion (RFC 7523).
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// `grant_type` of the JWT bearer authorization grant (RFC 7523), Google's service accounts.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// The longest a client assertion may live (`exp` - now), as Microsoft demands.
const CLIENT_ASSERTION_MAX_SECS: u64 = 600;
/// The longest a service-account assertion may live, as Google demands.
const SERVICE_ACCOUNT_MAX_SECS: u64 = 3600;
/// Clock skew tolerated on `nbf`/`iat`.
const SKEW_SECS: u64 = 60;

/// An assertion the endpoint was shown, whether or not it was accepted.
#[derive(Debug, Clone)]
pub struct SeenAssertion {
    /// The request's `grant_type`.
    pub grant_type: String,
    /// The assertion as sent (`client_assertion` or `assertion`).
    pub raw: String,
    /// Its decoded header and claims (`Value::Null` when it was not a JWT).
    pub header: Value,
    pub claims: Value,
    pub accepted: bool,
}

/// A registered certificate: its DER and the base64url SHA-256 thumbprint (`x5t#S256`).
#[derive(Debug, Clone)]
struct Registered {
    der: Vec<u8>,
    x5t_s256: String,
}

impl Registered {
    fn from_pem(pem: &str) -> Registered {
        let der = pem_der(pem);
        let digest = ring::digest::digest(&ring::digest::SHA256, &der);
        Registered {
            x5t_s256: crate::credential::b64url(digest.as_ref()),
            der,
        }
    }

    fn verifies(&self, jwt: &Jwt) -> bool {
        let der = rustls::pki_types::CertificateDer::from(self.der.as_slice());
        let Ok(cert) = webpki::EndEntityCert::try_from(&der) else {
            return false;
        };
        cert.verify_signature(
            webpki::ring::RSA_PKCS1_2048_8192_SHA256,
            jwt.signed.as_bytes(),
            &jwt.signature,
        )
        .is_ok()
    }
}

/// What the endpoint knows about assertions, and what it has seen.
#[derive(Debug, Default)]
pub(super) struct Assertions {
    /// `aud` every client or service-account assertion must name.
    pub token_url: String,
    certificates: Vec<Registered>,
    federated: Vec<Registered>,
    service_accounts: Vec<(String, Registered)>,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    jtis: HashSet<String>,
    log: Vec<SeenAssertion>,
}

struct Jwt {
    header: Value,
    claims: Value,
    signed: String,
    signature: Vec<u8>,
}

fn decode(part: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .ok()
}

fn parse(raw: &str) -> Option<Jwt> {
    let mut parts = raw.split('.');
    let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some(Jwt {
        header: serde_json::from_slice(&decode(h)?).ok()?,
        claims: serde_json::from_slice(&decode(c)?).ok()?,
        signed: format!("{h}.{c}"),
        signature: decode(s)?,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn aud_has(claims: &Value, want: &str) -> bool {
    match &claims["aud"] {
        Value::String(s) => s == want,
        Value::Array(a) => a.iter().any(|v| v.as_str() == Some(want)),
        _ => false,
    }
}

/// `exp` in the future and at most `max` seconds away; `nbf`/`iat` not in the future.
fn in_time(claims: &Value, max: u64, now: u64) -> bool {
    let Some(exp) = claims["exp"].as_u64() else {
        return false;
    };
    let not_future = |k: &str| claims[k].as_u64().is_none_or(|t| t <= now + SKEW_SECS);
    exp > now && exp <= now + max + SKEW_SECS && not_future("nbf") && not_future("iat")
}

fn microsoft(code: u32, description: &str) -> Response {
    error(401, "invalid_client", code, description)
}

const BAD_SIGNATURE: &str = "Client assertion failed signature validation.";

fn google_invalid_grant(description: &str) -> Response {
    Response::json(
        400,
        json!({"error": "invalid_grant", "error_description": description}).to_string(),
    )
}

impl Assertions {
    pub fn new(
        token_url: String,
        certificates: &[String],
        federated: &[String],
        service_accounts: &[(String, String)],
    ) -> Assertions {
        Assertions {
            token_url,
            certificates: certificates
                .iter()
                .map(|p| Registered::from_pem(p))
                .collect(),
            federated: federated.iter().map(|p| Registered::from_pem(p)).collect(),
            service_accounts: service_accounts
                .iter()
                .map(|(email, pem)| (email.clone(), Registered::from_pem(pem)))
                .collect(),
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Whether the application has a credential that is not a secret.
    pub fn registered(&self) -> bool {
        !self.certificates.is_empty() || !self.federated.is_empty()
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn log(&self) -> Vec<SeenAssertion> {
        self.seen().log.clone()
    }

    fn record(&self, grant_type: &str, raw: &str, jwt: Option<&Jwt>, accepted: bool) {
        self.seen().log.push(SeenAssertion {
            grant_type: grant_type.to_string(),
            raw: raw.to_string(),
            header: jwt.map(|j| j.header.clone()).unwrap_or(Value::Null),
            claims: jwt.map(|j| j.claims.clone()).unwrap_or(Value::Null),
            accepted,
        });
    }

    /// Client authentication by `client_assertion` for `client_id`.
    pub fn verify_client(
        &self,
        raw: &str,
        client_id: &str,
        grant_type: &str,
    ) -> Result<(), Response> {
        let jwt = parse(raw);
        let verdict = self.judge_client(jwt.as_ref(), client_id);
        self.record(grant_type, raw, jwt.as_ref(), verdict.is_ok());
        verdict
    }

    fn judge_client(&self, jwt: Option<&Jwt>, client_id: &str) -> Result<(), Response> {
        let Some(jwt) = jwt else {
            return Err(microsoft(50027, "JWT token is invalid or malformed."));
        };
        let now = unix_now();
        if jwt.header["alg"] != "RS256" {
            return Err(microsoft(700027, BAD_SIGNATURE));
        }
        if aud_has(&jwt.claims, FEDERATED_AUDIENCE) {
            // A federated credential: signed by a trusted issuer, for any subject it names.
            if !self.federated.iter().any(|r| r.verifies(jwt)) {
                return Err(microsoft(700027, BAD_SIGNATURE));
            }
            if jwt.claims["sub"].as_str().is_none_or(str::is_empty)
                || !in_time(&jwt.claims, u64::MAX / 4, now)
            {
                return Err(microsoft(
                    700024,
                    "Client assertion is not within its valid time range.",
                ));
            }
            return Ok(());
        }
        let x5t = jwt.header["x5t#S256"].as_str().unwrap_or("");
        let Some(cert) = self.certificates.iter().find(|r| r.x5t_s256 == x5t) else {
            return Err(microsoft(
                700027,
                "Client assertion failed signature validation. The certificate with identifier \
                 used to sign the client assertion is not registered on application.",
            ));
        };
        if !cert.verifies(jwt) {
            return Err(microsoft(700027, BAD_SIGNATURE));
        }
        let c = &jwt.claims;
        if !aud_has(c, &self.token_url) {
            return Err(microsoft(
                700212,
                "The audience of the client assertion is not the token endpoint.",
            ));
        }
        if c["iss"] != client_id || c["sub"] != client_id {
            return Err(microsoft(
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter.",
            ));
        }
        if !in_time(c, CLIENT_ASSERTION_MAX_SECS, now) {
            return Err(microsoft(
                700024,
                "Client assertion is not within its valid time range.",
            ));
        }
        let Some(jti) = c["jti"].as_str().filter(|j| !j.is_empty()) else {
            return Err(microsoft(700027, "Client assertion has no 'jti' claim."));
        };
        if !self.seen().jtis.insert(jti.to_string()) {
            return Err(microsoft(
                700023,
                "Client assertion replay: this 'jti' was used before.",
            ));
        }
        Ok(())
    }

    /// The JWT bearer grant of a Google service account: the scope granted on success.
    pub fn verify_service_account(&self, raw: &str) -> Result<String, Response> {
        let jwt = parse(raw);
        let verdict = self.judge_service_account(jwt.as_ref());
        self.record(JWT_BEARER_GRANT, raw, jwt.as_ref(), verdict.is_ok());
        verdict
    }

    fn judge_service_account(&self, jwt: Option<&Jwt>) -> Result<String, Response> {
        let Some(jwt) = jwt else {
            return Err(google_invalid_grant("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."));
        };
        let c = &jwt.claims;
        let iss = c["iss"].as_str().unwrap_or("");
        let Some((_, key)) = self.service_accounts.iter().find(|(e, _)| e == iss) else {
            return Err(google_invalid_grant("Invalid JWT Signature."));
        };
        if jwt.header["alg"] != "RS256" || !key.verifies(jwt) {
            return Err(google_invalid_grant("Invalid JWT Signature."));
        }
        if !aud_has(c, &self.token_url) {
            return Err(google_invalid_grant("Invalid JWT: Invalid audience."));
        }
        if !in_time(c, SERVICE_ACCOUNT_MAX_SECS, unix_now()) {
            return Err(google_invalid_grant("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe."));
        }
        if c["sub"].as_str().is_none_or(str::is_empty) {
            return Err(google_invalid_grant(
                "Invalid JWT: no subject (domain-wide delegation needs sub).",
            ));
        }
        match c["scope"].as_str().filter(|s| !s.is_empty()) {
            Some(scope) => Ok(scope.to_string()),
            None => Err(Response::json(
                400,
                json!({"error": "invalid_scope", "error_description": "Empty or missing scope not allowed."}).to_string(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::{rsa_certificate, sign_jwt, RSA_KEY_A, RSA_KEY_B};

    const URL: &str = "http://127.0.0.1:1/tenant/oauth2/v2.0/token";

    fn body(r: Response) -> (u16, Value) {
        (r.status, serde_json::from_str(&r.body).unwrap())
    }

    #[test]
    fn client_assertions_are_checked_claim_by_claim() {
        let cert = rsa_certificate(RSA_KEY_A, "app", 86_400);
        let reg = Registered::from_pem(&cert);
        let a = Assertions::new(URL.into(), &[cert], &[], &[]);
        let now = unix_now();
        let good = json!({"aud": URL, "iss": "app", "sub": "app", "jti": "j1", "nbf": now, "iat": now, "exp": now + 600});
        let header = json!({"alg": "RS256", "typ": "JWT", "x5t#S256": reg.x5t_s256});
        let jwt = |key: &str, claims: &Value| sign_jwt(key, &header, claims);
        assert!(a
            .verify_client(&jwt(RSA_KEY_A, &good), "app", "client_credentials")
            .is_ok());
        // Replayed jti.
        let (s, b) = body(
            a.verify_client(&jwt(RSA_KEY_A, &good), "app", "client_credentials")
                .unwrap_err(),
        );
        assert_eq!((s, b["error"].as_str()), (401, Some("invalid_client")));
        let with = |k: &str, v: Value, jti: &str| {
            let mut c = good.clone();
            c[k] = v;
            c["jti"] = json!(jti);
            c
        };
        for (claims, key, code) in [
            (with("jti", json!("j2"), "j2"), RSA_KEY_B, "AADSTS700027"),
            (
                with("aud", json!("http://elsewhere/token"), "j3"),
                RSA_KEY_A,
                "AADSTS700212",
            ),
            (with("iss", json!("other"), "j4"), RSA_KEY_A, "AADSTS700021"),
            (
                with("exp", json!(now + 3600), "j5"),
                RSA_KEY_A,
                "AADSTS700024",
            ),
            (
                with("exp", json!(now - 10), "j6"),
                RSA_KEY_A,
                "AADSTS700024",
            ),
        ] {
            let (s, b) = body(
                a.verify_client(&jwt(key, &claims), "app", "client_credentials")
                    .unwrap_err(),
            );
            assert_eq!(s, 401);
            assert!(
                b["error_description"].as_str().unwrap().starts_with(code),
                "{code}: {b}"
            );
        }
        // An unregistered certificate's thumbprint.
        let other = json!({"alg": "RS256", "x5t#S256": "AAAA"});
        let (_, b) = body(
            a.verify_client(
                &sign_jwt(RSA_KEY_A, &other, &with("jti", json!("j7"), "j7")),
                "app",
                "x",
            )
            .unwrap_err(),
        );
        assert!(
            b["error_description"]
                .as_str()
                .unwrap()
                .contains("not registered"),
            "{b}"
        );
        assert_eq!(a.log().iter().filter(|s| s.accepted).count(), 1);
        assert_eq!(a.log().len(), 8);
    }

    #[test]
    fn service_account_grants_are_checked() {
        let cert = rsa_certificate(RSA_KEY_A, "sa", 86_400);
        let a = Assertions::new(URL.into(), &[], &[], &[("sa@x".into(), cert)]);
        let now = unix_now();
        let claims = json!({"iss": "sa@x", "sub": "u@x", "scope": "https://mail.google.com/", "aud": URL, "iat": now, "exp": now + 3600});
        let header = json!({"alg": "RS256", "typ": "JWT"});
        assert_eq!(
            a.verify_service_account(&sign_jwt(RSA_KEY_A, &header, &claims))
                .unwrap(),
            "https://mail.google.com/"
        );
        let (s, b) = body(
            a.verify_service_account(&sign_jwt(RSA_KEY_B, &header, &claims))
                .unwrap_err(),
        );
        assert_eq!(s, 400);
        assert_eq!(
            b,
            json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
        );
        let mut long = claims.clone();
        long["exp"] = json!(now + 7200);
        let (_, b) = body(
            a.verify_service_account(&sign_jwt(RSA_KEY_A, &header, &long))
                .unwrap_err(),
        );
        assert_eq!(b["error"], "invalid_grant");
    }
}
