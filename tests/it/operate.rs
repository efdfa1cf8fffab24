//! Operating it: the admin endpoint (/healthz, /readyz, /metrics), configuration from the
//! environment alone, and `serve --print-config`.

use crate::harness::*;
use smtp_oauth_bridge::bridge::Bridge;
use std::time::{Duration, Instant};
use testkit::Reply;

const MSG: &[u8] = b"Subject: metrics\r\n\r\nhello\r\n";

async fn get(url: String) -> (u16, String, String) {
    let r = reqwest::get(&url).await.unwrap();
    let status = r.status().as_u16();
    let ctype = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ctype, r.text().await.unwrap())
}

async fn start_with_admin(env: &mut Env) -> Bridge {
    let config = load_config(env);
    let bridge = Bridge::start_with_admin(&config, bind().await, Some(bind().await))
        .await
        .unwrap();
    env.addr = bridge.local_addr;
    bridge
}

fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

async fn wait_ready(admin: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = get(format!("{admin}/readyz")).await;
        if status == 200 {
            assert_eq!(body, r#"{"ready":true}"#);
            return;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_readyz_follow_the_token_and_metrics_count_exactly() {
    let mut env = remote_ends(&Opts::default()).await;
    // The first token requests fail: not ready yet.
    env.tokens.fail_next(
        2,
        503,
        r#"{"error":"temporarily_unavailable","error_description":"AADSTS90033"}"#,
    );
    let bridge = start_with_admin(&mut env).await;
    let admin = format!("http://{}", bridge.admin_addr.unwrap());
    let (status, _, body) = get(format!("{admin}/healthz")).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, ctype, body) = get(format!("{admin}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["accounts"]["scanner"].is_string(), "{body}");

    // After the backoff the token arrives: ready.
    wait_ready(&admin).await;

    let before = get(format!("{admin}/metrics")).await.2;
    let mut c = TcpSmtp::connect(env.addr).await;
    assert_eq!(c.ehlo_auth_plain(USER, "wrong").await.0, 535);
    assert_eq!(c.ehlo_auth_plain(USER, PASSWORD).await.0, 235);
    for _ in 0..3 {
        assert_eq!(
            c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await.0,
            250
        );
    }
    env.upstream
        .set_data_reply(Some(Reply::new(554, "5.6.0 Message rejected")));
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await.0,
        554
    );
    let (status, ctype, after) = get(format!("{admin}/metrics")).await;
    assert_eq!(status, 200);
    assert_eq!(ctype, "text/plain; version=0.0.4");
    let delivered = [("account", "scanner"), ("outcome", "delivered")];
    let rejected = [("account", "scanner"), ("outcome", "rejected")];
    let acc = [("account", "scanner")];
    assert_eq!(
        metric(&before, "smtp_oauth_bridge_messages_total", &delivered),
        None
    );
    assert_eq!(
        metric(&after, "smtp_oauth_bridge_messages_total", &delivered),
        Some(3.0)
    );
    assert_eq!(
        metric(&after, "smtp_oauth_bridge_messages_total", &rejected),
        Some(1.0)
    );
    assert_eq!(
        metric(&after, "smtp_oauth_bridge_message_bytes_total", &acc),
        Some(3.0 * MSG.len() as f64)
    );
    assert_eq!(
        metric(
            &after,
            "smtp_oauth_bridge_upstream_replies_total",
            &[("class", "5xx")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&after, "smtp_oauth_bridge_auth_failures_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        metric(&after, "smtp_oauth_bridge_local_sessions", &[]),
        Some(1.0)
    );
    assert_eq!(
        metric(&after, "smtp_oauth_bridge_token_refreshes_total", &acc),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &after,
            "smtp_oauth_bridge_token_refresh_failures_total",
            &acc
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(&after, "smtp_oauth_bridge_account_needs_login", &acc),
        Some(0.0)
    );
    let expiry = metric(&after, "smtp_oauth_bridge_token_expiry_seconds", &acc).unwrap();
    assert!(expiry > 3500.0 && expiry <= 3600.0, "{expiry}");
    assert!(
        after.contains("smtp_oauth_bridge_relay_duration_seconds_count 4\n"),
        "{after}"
    );
    assert_eq!(
        metric(
            &after,
            "smtp_oauth_bridge_upstream_sessions",
            &[("account", "scanner"), ("state", "idle")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_needs_login_until_a_token_is_stored() {
    let mut env = remote_ends(&Opts {
        flow: "authorization_code",
        extra: "[queue]\nmode = \"spool\"\n".into(),
        ..Opts::default()
    })
    .await;
    let bridge = start_with_admin(&mut env).await;
    let admin = format!("http://{}", bridge.admin_addr.unwrap());
    let (status, _, body) = get(format!("{admin}/readyz")).await;
    assert_eq!(status, 503);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let why = v["accounts"]["scanner"].as_str().unwrap();
    assert!(
        why.starts_with("needs login") && why.contains("run: smtp-oauth-bridge login scanner"),
        "{body}"
    );
    let m = get(format!("{admin}/metrics")).await.2;
    assert_eq!(
        metric(
            &m,
            "smtp_oauth_bridge_account_needs_login",
            &[("account", "scanner")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "smtp_oauth_bridge_spool_messages", &[]),
        Some(0.0)
    );

    // As `login` would: tokens appear in the store; the running bridge becomes ready.
    let rt = env.tokens.issue_refresh_token();
    smtp_oauth_bridge::oauth::store::TokenStore::new(&env.dir.path().join("state"), None)
        .save(
            USER,
            &smtp_oauth_bridge::oauth::store::StoredTokens {
                access_token: None,
                expires_at: 0,
                refresh_token: Some(smtp_oauth_bridge::secret::Secret::new(rt)),
            },
        )
        .unwrap();
    wait_ready(&admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_alone_configures_a_working_bridge() {
    let env = remote_ends(&Opts::default()).await;
    let empty = tempfile::tempdir().unwrap();
    let p = |k: &str| format!("SMTP_OAUTH_BRIDGE_{k}");
    let vars: Vec<(String, String)> = vec![
        (p("LISTEN__SMTP"), "127.0.0.1:0".into()),
        (p("LISTEN__ADMIN"), "127.0.0.1:0".into()),
        (p("UPSTREAM__HOST"), "localhost".into()),
        (p("UPSTREAM__PORT"), env.upstream.addr().port().to_string()),
        (
            p("UPSTREAM__CA_FILE"),
            env.dir.path().join("upstream-ca.pem").display().to_string(),
        ),
        (p("UPSTREAM__TIMEOUT_SECS"), "5".into()),
        (
            p("STATE__DIR"),
            empty.path().join("state").display().to_string(),
        ),
        (p("ACCOUNT__0__USERNAME"), USER.into()),
        (p("ACCOUNT__0__PASSWORD_ENV"), PW_ENV.into()),
        (p("ACCOUNT__0__MAILBOX"), MAILBOX.into()),
        (
            p("ACCOUNT__0__ALLOWED_FROM"),
            format!("{MAILBOX}, *@fabrikam.com"),
        ),
        (p("ACCOUNT__0__OAUTH__FLOW"), "client_credentials".into()),
        (
            p("ACCOUNT__0__OAUTH__TENANT"),
            "contoso.onmicrosoft.com".into(),
        ),
        (p("ACCOUNT__0__OAUTH__CLIENT_ID"), "test-client".into()),
        (p("ACCOUNT__0__OAUTH__CLIENT_SECRET_ENV"), SECRET_ENV.into()),
        (p("ACCOUNT__0__OAUTH__TOKEN_URL"), env.tokens.token_url()),
        ("RUST_LOG".into(), "info".into()),
    ];
    // No bridge.toml in the working directory, no --config: the environment is the config.
    let bridge = BridgeProcess::spawn(
        &["--log-format", "json", "serve"],
        &vars,
        Some(empty.path()),
    );
    let mut c = TcpSmtp::connect(bridge.addr).await;
    c.login().await;
    assert_eq!(
        c.send_message("x@fabrikam.com", &["a@fabrikam.com"], MSG)
            .await
            .0,
        250
    );
    assert_eq!(
        env.upstream
            .wait_received(1, Duration::from_secs(5))
            .await
            .len(),
        1
    );
    let (status, log) = bridge.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("admin endpoint ready"), "{log}");

    // A wrong value is a configuration error naming the variable.
    let mut bad = vars.clone();
    bad.push((p("UPSTREAM__PORT"), "five".into()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))
        .arg("serve")
        .envs(bad)
        .current_dir(empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SMTP_OAUTH_BRIDGE_UPSTREAM__PORT") && err.contains("not a whole number"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_config_shows_the_effective_config_without_secrets() {
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let env = remote_ends(&Opts {
        state: "key_env = \"BRIDGE_IT_STATE_KEY\"".into(),
        ..Opts::default()
    })
    .await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))
        .args([
            "--config",
            env.config_path.to_str().unwrap(),
            "serve",
            "--print-config",
        ])
        .env(PW_ENV, PASSWORD)
        .env(SECRET_ENV, CLIENT_SECRET)
        .env("BRIDGE_IT_STATE_KEY", key)
        .env("SMTP_OAUTH_BRIDGE_UPSTREAM__IDLE_SECS", "17")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in [PASSWORD, CLIENT_SECRET, key] {
        assert!(!text.contains(secret), "secret printed:\n{text}");
    }
    assert!(
        text.contains("idle_secs = 17"),
        "environment override shown:\n{text}"
    );
    // Secrets are shown as where they come from, in the keys the loader reads.
    for line in [
        format!("client_secret_env = \"{SECRET_ENV}\""),
        format!("password_env = \"{PW_ENV}\""),
        "key_env = \"BRIDGE_IT_STATE_KEY\"".to_string(),
        format!("mailbox = \"{MAILBOX}\""),
    ] {
        assert_eq!(
            text.lines().filter(|l| *l == line).count(),
            1,
            "{line}:\n{text}"
        );
    }
    let parsed: toml::Table = toml::from_str(&text).expect("print-config output parses as TOML");
    assert!(parsed.contains_key("upstream"));
}

/// `serve --print-config` of `config` (as the real binary) with the test's secrets in the
/// environment, plus `extra` variables: stdout, or a panic with stderr.
fn print_config(config: &std::path::Path, extra: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))
        .arg("--config")
        .arg(config)
        .args(["serve", "--print-config"])
        .env(PW_ENV, PASSWORD)
        .env(SECRET_ENV, CLIENT_SECRET)
        .envs(extra.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).expect("UTF-8 output");
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn print_config_output_loads_back_and_prints_the_same() {
    // Secrets from *_env keys (password, client secret) and a *_file key (state key), plus an
    // environment override: the printed configuration, fed back as --config, is the same.
    let key = "HwECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let env = remote_ends(&Opts {
        state: "key_file = \"state.key\"".into(),
        ..Opts::default()
    })
    .await;
    std::fs::write(env.dir.path().join("state.key"), format!("{key}\n")).unwrap();
    let first = print_config(
        &env.config_path,
        &[("SMTP_OAUTH_BRIDGE_UPSTREAM__IDLE_SECS", "17")],
    );
    for secret in [PASSWORD, CLIENT_SECRET, key] {
        assert!(!first.contains(secret), "secret printed:\n{first}");
    }
    let key_file = env.dir.path().join("state.key");
    assert!(
        first.contains(&format!(
            "key_file = {:?}\n",
            key_file.display().to_string()
        )),
        "{first}"
    );
    assert!(first.contains("idle_secs = 17\n"), "{first}");

    // Saved elsewhere (paths are printed absolute) and loaded without the override.
    let other = tempfile::tempdir().unwrap();
    let printed = other.path().join("printed.toml");
    std::fs::write(&printed, &first).unwrap();
    let second = print_config(&printed, &[]);
    let (head, body) = second.split_once('\n').unwrap();
    assert_eq!(
        head,
        format!("# effective configuration from {}", printed.display())
    );
    assert_eq!(Some(body), first.split_once('\n').map(|(_, b)| b));
    std::fs::write(&printed, &second).unwrap();
    assert_eq!(print_config(&printed, &[]), second);
}
