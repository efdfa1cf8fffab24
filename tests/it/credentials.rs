//! Credentials without a client secret (SPEC "Credentials without a client secret"), against
//! testkit's token endpoint, which verifies every assertion (signature against the
//! registered certificate or key, aud, exp, iss/sub, x5t#S256, one-time jti):
//! certificate client credentials, a tampered key, federated assertion files, a Google
//! service account, a delegated confidential client with a certificate, and TRACE logs.

use crate::harness::*;
use smtp_oauth_bridge::bridge::Bridge;
use smtp_oauth_bridge::config::Config;
use smtp_oauth_bridge::oauth::manager::{AccountStatus, TokenManager};
use std::process::Command;
use std::time::Duration;
use testkit::credential::{
    federated_assertion, rsa_certificate, service_account_json, RSA_KEY_A, RSA_KEY_B, RSA_KEY_C,
};
use testkit::{FakeTokenEndpoint, FakeUpstream, FakeUpstreamOptions, TestCa, TokenOptions};

const MSG: &[u8] = b"Subject: credentials\r\n\r\nhello\r\n";
const SA_EMAIL: &str = "relay@test-project.iam.gserviceaccount.com";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const YEAR: i64 = 365 * 86_400;

/// Remote ends whose token endpoint knows `tokens`, and a config whose `[account.oauth]`
/// holds `oauth` (flow, credential keys) plus the fake's URLs.
async fn creds_env(tokens_opts: TokenOptions, oauth: &str) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new();
    ca.write_ca_pem(&dir.path().join("upstream-ca.pem"))
        .expect("write CA");
    let tokens = FakeTokenEndpoint::start(bind().await, tokens_opts).await;
    let (cert, key) = ca.issue_server_cert();
    let mut uo = FakeUpstreamOptions::new(cert, key);
    uo.tokens = Some(tokens.clone());
    uo.mailbox_ok = Some(vec![MAILBOX.to_string()]);
    let upstream = FakeUpstream::start(bind().await, uo).await;
    let config_text = format!(
        r#"
[listen]
smtp = "127.0.0.1:0"
[upstream]
host = "localhost"
port = {port}
ca_file = "upstream-ca.pem"
timeout_secs = 5
[state]
dir = "state"

[[account]]
username = "{USER}"
password_env = "{PW_ENV}"
mailbox = "{MAILBOX}"

[account.oauth]
{oauth}
token_url = "{token_url}"
authorize_url = "{authorize_url}"
"#,
        port = upstream.addr().port(),
        token_url = tokens.token_url(),
        authorize_url = tokens.authorize_url(),
    );
    Env::written(dir, tokens, upstream, config_text)
}

fn config(env: &Env) -> Config {
    Config::from_toml(&env.config_text, "bridge.toml", env.dir.path(), &test_env)
        .expect("valid test config")
}

async fn start_bridge(env: &mut Env) {
    let bridge = Bridge::start_with_admin(&config(env), bind().await, Some(bind().await))
        .await
        .expect("bridge starts");
    env.addr = bridge.local_addr;
    env.bridge = Some(bridge);
}

async fn relay(env: &Env) -> (u16, String) {
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let r = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    c.expect("QUIT", 221).await;
    r
}

/// A certificate app (client_credentials) whose registered certificate is for RSA_KEY_A;
/// the file holds that certificate and `key`.
async fn certificate_env(key: &str) -> Env {
    let cert = rsa_certificate(RSA_KEY_A, "bridge-app", YEAR);
    let env = creds_env(
        TokenOptions {
            client_secret: None,
            client_certificates: vec![cert.clone()],
            ..TokenOptions::default()
        },
        "flow = \"client_credentials\"\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"test-client\"\nclient_certificate_file = \"app.pem\"",
    )
    .await;
    std::fs::write(env.dir.path().join("app.pem"), format!("{cert}{key}")).unwrap();
    env
}

fn check(env: &Env) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))
        .env(PW_ENV, PASSWORD)
        .env_remove("RUST_LOG")
        .args(["--config", env.config_path.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_client_credentials_relay_and_a_tampered_key_is_refused() {
    let mut env = certificate_env(RSA_KEY_A).await;
    start_bridge(&mut env).await;
    assert_eq!(relay(&env).await.0, 250);
    env.upstream.wait_received(1, Duration::from_secs(5)).await;
    let seen = env.tokens.assertions_seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let a = &seen[0];
    assert!(a.accepted);
    assert_eq!(a.grant_type, "client_credentials");
    assert_eq!(a.header["alg"], "RS256");
    assert_eq!(a.header["x5t#S256"].as_str().unwrap().len(), 43);
    assert_eq!(a.claims["aud"], env.tokens.token_url());
    assert_eq!(a.claims["iss"], "test-client");
    assert_eq!(a.claims["sub"], "test-client");
    let (iat, exp) = (
        a.claims["iat"].as_u64().unwrap(),
        a.claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 600);
    assert_eq!(a.claims["nbf"].as_u64(), Some(iat));
    assert!(a.claims["jti"].as_str().unwrap().len() >= 16);
    // A second token: a fresh assertion (another jti) is accepted too.
    env.bridge
        .as_ref()
        .unwrap()
        .tokens
        .force_refresh(USER)
        .await
        .unwrap();
    let seen = env.tokens.assertions_seen();
    assert_eq!(seen.len(), 2);
    assert!(seen[1].accepted);
    assert_ne!(seen[0].claims["jti"], seen[1].claims["jti"]);
    // `check` names the credential with its thumbprint and expiry.
    let (code, out) = check(&env);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("scanner: ok"), "{out}");
    assert!(
        out.contains("credential: certificate (SHA-256 thumbprint ") && out.contains(", expires 2"),
        "{out}"
    );

    // Same certificate, a different key: the signature does not verify.
    let env = certificate_env(RSA_KEY_B).await;
    let manager = TokenManager::new(&config(&env)).unwrap();
    let err = manager.force_refresh(USER).await.unwrap_err().to_string();
    assert!(
        err.contains("invalid_client: AADSTS700027: Client assertion failed signature validation."),
        "{err}"
    );
    let seen = env.tokens.assertions_seen();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].accepted);
    let (code, out) = check(&env);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("scanner: FAILED token:") && out.contains("AADSTS700027"),
        "{out}"
    );
    assert!(
        out.contains("hint: the client assertion was refused: the certificate"),
        "{out}"
    );
    assert!(out.contains("credential: certificate"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_assertion_is_refused() {
    // The endpoint's jti check, with an assertion the bridge made: presenting it again fails.
    let env = certificate_env(RSA_KEY_A).await;
    let manager = TokenManager::new(&config(&env)).unwrap();
    manager.force_refresh(USER).await.unwrap();
    let raw = env.tokens.assertions_seen()[0].raw.clone();
    let r = reqwest::Client::new()
        .post(env.tokens.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "test-client"),
            ("scope", "https://outlook.office365.com/.default"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", raw.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["error"], "invalid_client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_assertion_file_is_read_for_every_request_and_recovers() {
    let issuer_cert = rsa_certificate(RSA_KEY_B, "oidc-issuer", YEAR);
    let mut env = creds_env(
        TokenOptions {
            client_secret: None,
            federated_issuers: vec![issuer_cert],
            ..TokenOptions::default()
        },
        "flow = \"client_credentials\"\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"test-client\"\nclient_assertion_file = \"azure-identity-token\"",
    )
    .await;
    let file = env.dir.path().join("azure-identity-token");
    // Not written yet (the kubelet is late): the bridge starts; relaying fails clearly.
    std::fs::write(&file, "\n").unwrap();
    start_bridge(&mut env).await;
    let (code, text) = relay(&env).await;
    assert!((400..500).contains(&code), "{code} {text}");
    let tokens = env.bridge.as_ref().unwrap().tokens.clone();
    match tokens.status(USER) {
        Some(AccountStatus::Failing(reason)) => {
            assert!(reason.contains("azure-identity-token is empty"), "{reason}")
        }
        other => panic!("status {other:?}"),
    }
    let admin = env
        .bridge
        .as_ref()
        .unwrap()
        .admin_addr
        .expect("admin listener");
    let r = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("token refresh failing: client assertion file") && body.contains("is empty"),
        "{body}"
    );
    assert!(
        env.tokens.assertions_seen().is_empty(),
        "no request without an assertion"
    );

    // Written: recovery without a restart, through the normal path (after the backoff).
    let first = federated_assertion(
        RSA_KEY_B,
        "https://oidc.example/",
        "system:serviceaccount:mail:bridge",
    );
    std::fs::write(&file, format!("{first}\n")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, text) = relay(&env).await;
        if code == 250 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no recovery: {code} {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(matches!(tokens.status(USER), Some(AccountStatus::Ready)));
    let r = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // The kubelet rotates the file: the next request carries the new content (trimmed).
    let second = federated_assertion(
        RSA_KEY_B,
        "https://oidc.example/",
        "system:serviceaccount:mail:bridge2",
    );
    assert_ne!(first, second);
    std::fs::write(&file, &second).unwrap();
    tokens.force_refresh(USER).await.unwrap();
    let seen = env.tokens.assertions_seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].raw, first);
    assert_eq!(seen[1].raw, second);
    assert!(seen.iter().all(|s| s.accepted));
    assert_eq!(seen[1].claims["sub"], "system:serviceaccount:mail:bridge2");

    // A missing file: a clear failure too, and nothing is sent.
    std::fs::remove_file(&file).unwrap();
    let err = tokens.force_refresh(USER).await.unwrap_err().to_string();
    assert!(
        err.contains("azure-identity-token: cannot read it"),
        "{err}"
    );
    assert_eq!(env.tokens.assertions_seen().len(), 2);
    let (code, out) = check(&env);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("hint: the federated token file cannot be read"),
        "{out}"
    );
    assert!(
        out.contains("credential: federated assertion file "),
        "{out}"
    );
    std::fs::write(&file, "").unwrap();
    let (_, out) = check(&env);
    assert!(
        out.contains("hint: the federated token file is empty"),
        "{out}"
    );
}

async fn service_account_env() -> Env {
    let cert = rsa_certificate(RSA_KEY_C, SA_EMAIL, YEAR);
    let env = creds_env(
        TokenOptions {
            client_secret: None,
            service_accounts: vec![(SA_EMAIL.to_string(), cert)],
            ..TokenOptions::default()
        },
        "provider = \"google\"\nflow = \"service_account\"\nservice_account_key_file = \"sa.json\"",
    )
    .await;
    std::fs::write(
        env.dir.path().join("sa.json"),
        service_account_json(SA_EMAIL, RSA_KEY_C, "https://oauth2.googleapis.com/token"),
    )
    .unwrap();
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_service_account_acts_as_the_mailbox() {
    let mut env = service_account_env().await;
    start_bridge(&mut env).await;
    assert_eq!(relay(&env).await.0, 250);
    env.upstream.wait_received(1, Duration::from_secs(5)).await;
    let seen = env.tokens.assertions_seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let a = &seen[0];
    assert!(a.accepted);
    assert_eq!(a.grant_type, "urn:ietf:params:oauth:grant-type:jwt-bearer");
    assert_eq!(a.claims["iss"], SA_EMAIL);
    assert_eq!(a.claims["sub"], MAILBOX);
    assert_eq!(a.claims["scope"], "https://mail.google.com/");
    assert_eq!(a.claims["aud"], env.tokens.token_url());
    let (iat, exp) = (
        a.claims["iat"].as_u64().unwrap(),
        a.claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 3600);
    // The relay used the token the grant issued (the fake upstream checks it).
    assert_eq!(env.tokens.issued().len(), 1);
    assert_eq!(
        env.tokens
            .requests_by_grant("urn:ietf:params:oauth:grant-type:jwt-bearer"),
        1
    );
    // No refresh token: the next token is a new assertion.
    env.bridge
        .as_ref()
        .unwrap()
        .tokens
        .force_refresh(USER)
        .await
        .unwrap();
    assert_eq!(
        env.tokens
            .requests_by_grant("urn:ietf:params:oauth:grant-type:jwt-bearer"),
        2
    );
    let (code, out) = check(&env);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("credential: service account {SA_EMAIL}")),
        "{out}"
    );

    // A key that is not the service account's: Google's invalid_grant.
    std::fs::write(
        env.dir.path().join("sa.json"),
        service_account_json(SA_EMAIL, RSA_KEY_A, "https://oauth2.googleapis.com/token"),
    )
    .unwrap();
    let manager = TokenManager::new(&config(&env)).unwrap();
    let err = manager.force_refresh(USER).await.unwrap_err().to_string();
    assert!(
        err.contains("invalid_grant: Invalid JWT Signature."),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegated_confidential_client_with_a_certificate_logs_in_and_refreshes() {
    let cert = rsa_certificate(RSA_KEY_A, "web-app", YEAR);
    let env = creds_env(
        TokenOptions {
            client_secret: None,
            client_certificates: vec![cert.clone()],
            ..TokenOptions::default()
        },
        "flow = \"authorization_code\"\nclient_id = \"test-client\"\nclient_certificate_file = \"app.pem\"",
    )
    .await;
    std::fs::write(env.dir.path().join("app.pem"), format!("{cert}{RSA_KEY_A}")).unwrap();
    crate::login::login_with_browser(&env).await;
    assert_eq!(env.tokens.requests_by_grant("authorization_code"), 1);
    let manager = TokenManager::new(&config(&env)).unwrap();
    manager
        .force_refresh(USER)
        .await
        .expect("refresh with an assertion");
    assert_eq!(env.tokens.requests_by_grant("refresh_token"), 1);
    let seen = env.tokens.assertions_seen();
    let grants: Vec<&str> = seen.iter().map(|s| s.grant_type.as_str()).collect();
    assert_eq!(grants, ["authorization_code", "refresh_token"]);
    assert!(seen.iter().all(|s| s.accepted), "{seen:?}");
    // Without the assertion the endpoint would refuse the refresh (a confidential client).
    let rt = env.tokens.issue_refresh_token();
    let r = reqwest::Client::new()
        .post(env.tokens.token_url())
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", "test-client"),
            ("refresh_token", rt.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

/// A PEM key's base64 lines (any of them in a log would be key material).
fn key_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 40)
        .map(str::to_string)
        .collect()
}

async fn trace_run(env: &Env, key_pem: &str) {
    let bridge = BridgeProcess::start(&env.config_path, "trace");
    let mut c = TcpSmtp::connect(bridge.addr).await;
    c.login().await;
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await.0,
        250
    );
    env.tokens.revoke_all();
    env.upstream.close_idle_sessions();
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await.0,
        250
    );
    c.expect("QUIT", 221).await;
    let (status, log) = bridge.stop();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace level was on"
    );
    let seen = env.tokens.assertions_seen();
    assert_eq!(seen.len(), 2, "two token requests");
    let mut forbidden = key_lines(key_pem);
    for s in &seen {
        forbidden.push(s.raw.clone());
        // The signature alone, too.
        forbidden.push(s.raw.rsplit('.').next().unwrap().to_string());
    }
    forbidden.extend(env.tokens.issued());
    for f in &forbidden {
        assert!(!log.contains(f.as_str()), "secret {f:?} appears in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_contain_no_key_assertion_or_token() {
    let env = certificate_env(RSA_KEY_A).await;
    trace_run(&env, RSA_KEY_A).await;
    let env = service_account_env().await;
    trace_run(&env, RSA_KEY_C).await;
    let issuer_cert = rsa_certificate(RSA_KEY_B, "oidc-issuer", YEAR);
    let env = creds_env(
        TokenOptions {
            client_secret: None,
            federated_issuers: vec![issuer_cert],
            ..TokenOptions::default()
        },
        "flow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"test-client\"\nclient_assertion_file = \"token\"",
    )
    .await;
    std::fs::write(
        env.dir.path().join("token"),
        federated_assertion(
            RSA_KEY_B,
            "https://oidc.example/",
            "system:serviceaccount:a:b",
        ),
    )
    .unwrap();
    trace_run(&env, RSA_KEY_B).await;
}
