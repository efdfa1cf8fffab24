//! Token lifecycle for delegated accounts: `login` (authorization code + PKCE through the
//! loopback redirect, device code), the token store, refresh-token rotation, needs-login and
//! recovery without restart, transient provider failures, and `check`'s hints.

use crate::harness::*;
use smtp_oauth_bridge::bridge::Bridge;
use smtp_oauth_bridge::oauth::manager::{AccountStatus, TokenManager};
use smtp_oauth_bridge::oauth::store::{StoredTokens, TokenStore};
use smtp_oauth_bridge::secret::Secret;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use testkit::Reply;

const MSG: &[u8] = b"Subject: login test\r\n\r\nhello\r\n";

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"));
    c.env(PW_ENV, PASSWORD)
        .env(SECRET_ENV, CLIENT_SECRET)
        .env_remove("RUST_LOG");
    c
}

fn stored(env: &Env) -> StoredTokens {
    TokenStore::new(&env.dir.path().join("state"), None)
        .load(USER)
        .expect("store readable")
        .expect("tokens stored")
}

/// Runs `login --no-browser`, follows the authorize URL it prints like a browser would
/// (the fake provider approves at once and redirects to the loopback listener), and
/// returns login's stdout once it exited 0.
pub(crate) async fn login_with_browser(env: &Env) -> String {
    login_with_browser_after_silent_clients(env, 0).await.0
}

/// Like [`login_with_browser`], with `silent` local clients connected to the redirect
/// listener (saying nothing) before the browser comes back; also returns how long the
/// browser's two requests (the forged and the real callback) took.
async fn login_with_browser_after_silent_clients(env: &Env, silent: usize) -> (String, Duration) {
    let mut child = bin()
        .args([
            "--config",
            env.config_path.to_str().unwrap(),
            "login",
            USER,
            "--no-browser",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("http://") || line.starts_with("https://") {
                let _ = tx.send(line.clone());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let url = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("login printed the authorize URL");
    assert!(url.starts_with(&env.tokens.authorize_url()), "{url}");
    assert!(url.contains("code_challenge_method=S256"), "{url}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 302);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with("http://localhost:"), "{location}");
    let port: u16 = location["http://localhost:".len()..]
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut silent_clients = Vec::new();
    for _ in 0..silent {
        silent_clients.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    let started = Instant::now();
    // A forged callback with the wrong state is refused and does not end the login.
    let forged = format!(
        "{}?code=forged&state=wrong",
        location.split('?').next().unwrap()
    );
    let r = http
        .get(forged.replace("localhost", "127.0.0.1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let page = http
        .get(location.replace("localhost", "127.0.0.1"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap().contains("Signed in"));
    let took = started.elapsed();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let out = reader.join().unwrap();
    assert!(status.success(), "login failed: {out}");
    drop(silent_clients);
    (out, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_authorization_code_then_serve_uses_the_refresh_token() {
    let env = remote_ends(&Opts {
        flow: "authorization_code",
        ..Opts::default()
    })
    .await;
    let out = login_with_browser(&env).await;
    assert!(out.contains("scanner: logged in"), "{out}");
    assert_eq!(env.tokens.requests_by_grant("authorization_code"), 1);
    let st = stored(&env);
    let rt = st.refresh_token.clone().expect("refresh token stored");
    assert!(env
        .tokens
        .valid_refresh_tokens()
        .contains(&rt.expose().to_string()));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode(&env.dir.path().join("state/tokens/scanner.json")),
            0o600
        );
        assert_eq!(mode(&env.dir.path().join("state/tokens")), 0o700);
    }

    // serve uses what login stored: first the access token, then the refresh token.
    let bridge = Bridge::start(&load_config(&env), bind().await)
        .await
        .unwrap();
    let mut c = TcpSmtp::connect(bridge.local_addr).await;
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
    assert_eq!(env.tokens.requests_by_grant("refresh_token"), 1);
    assert_eq!(
        env.tokens.last_refresh_token_used().as_deref(),
        Some(rt.expose())
    );
    // The rotated refresh token is what the store holds now.
    let rotated = stored(&env).refresh_token.unwrap();
    assert_ne!(rotated, rt);
    assert_eq!(
        env.tokens.valid_refresh_tokens(),
        vec![rotated.expose().to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_local_clients_do_not_hold_up_the_login_redirect() {
    let env = remote_ends(&Opts {
        flow: "authorization_code",
        ..Opts::default()
    })
    .await;
    // The first edition served one connection at a time, each given 10 s to speak: three
    // silent clients held the browser up for 30 s.
    let (out, took) = login_with_browser_after_silent_clients(&env, 3).await;
    assert!(out.contains("scanner: logged in"), "{out}");
    assert!(took < Duration::from_secs(3), "the redirect took {took:?}");
    assert_eq!(env.tokens.requests_by_grant("authorization_code"), 1);
    assert!(stored(&env).refresh_token.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_with_device_code_polls_until_approved() {
    let env = remote_ends(&Opts {
        flow: "device_code",
        ..Opts::default()
    })
    .await;
    env.tokens.set_device_flow(2, 1);
    let out = tokio::task::spawn_blocking({
        let config = env.config_path.clone();
        move || {
            bin()
                .args(["--config", config.to_str().unwrap(), "login", USER])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("open https://microsoft.com/devicelogin and enter the code"),
        "{stdout}"
    );
    assert_eq!(
        env.tokens.device_polls(),
        3,
        "two pending answers, then success"
    );
    let rt = stored(&env).refresh_token.unwrap();
    assert!(env
        .tokens
        .valid_refresh_tokens()
        .contains(&rt.expose().to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_accounts_need_no_login() {
    let env = remote_ends(&Opts::default()).await;
    let out = bin()
        .args(["--config", env.config_path.to_str().unwrap(), "login", USER])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs no login"));
}

/// Puts a refresh token (and optionally an expired access token) into the store, as a
/// finished login would have.
fn seed_store(env: &Env) -> String {
    let rt = env.tokens.issue_refresh_token();
    TokenStore::new(&env.dir.path().join("state"), None)
        .save(
            USER,
            &StoredTokens {
                access_token: Some(Secret::new("expired-access-token")),
                expires_at: 1,
                refresh_token: Some(Secret::new(rt.clone())),
            },
        )
        .unwrap();
    rt
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sessions_with_an_expired_token_cause_one_refresh_and_the_rotation_is_stored() {
    let env = remote_ends(&Opts {
        flow: "authorization_code",
        ..Opts::default()
    })
    .await;
    let rt = seed_store(&env);
    let manager = TokenManager::new(&load_config(&env)).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let m = manager.clone();
        tasks.push(tokio::spawn(async move {
            m.token(USER).await.map(|t| t.generation)
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("token");
    }
    assert_eq!(env.tokens.requests_by_grant("refresh_token"), 1);
    assert_eq!(
        env.tokens.last_refresh_token_used().as_deref(),
        Some(rt.as_str())
    );
    let now_stored = stored(&env).refresh_token.unwrap();
    assert_ne!(now_stored.expose(), rt);
    assert_eq!(
        env.tokens.valid_refresh_tokens(),
        vec![now_stored.expose().to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_right_after_a_refresh_keeps_a_working_refresh_token() {
    let env = remote_ends(&Opts {
        flow: "authorization_code",
        ..Opts::default()
    })
    .await;
    let original = seed_store(&env);
    let mut first = BridgeProcess::start(&env.config_path, "info");
    // The expired access token makes the bridge refresh at start; the rotation is stored.
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.tokens.requests_by_grant("refresh_token") == 0
        || stored(&env).refresh_token.as_ref().map(Secret::expose) == Some(original.as_str())
    {
        assert!(Instant::now() < deadline, "no refresh happened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.child.kill().unwrap(); // SIGKILL: no chance to clean up
    first.child.wait().unwrap();
    // Make the stored access token useless so the restarted bridge must use the refresh token.
    env.tokens.revoke_all();
    let second = BridgeProcess::start(&env.config_path, "info");
    let mut c = TcpSmtp::connect(second.addr).await;
    c.login().await;
    let (code, t) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "{t}");
    assert_eq!(env.tokens.requests_by_grant("refresh_token"), 2);
    assert!(second.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_503s_do_not_fail_messages_while_the_token_is_valid() {
    // 12 s tokens are refreshed from 9 s on; three 503s back off 0.25 + 0.5 + 1 s.
    let env = start(Opts {
        lifetime: Duration::from_secs(12),
        ..Opts::default()
    })
    .await;
    let tokens = env.bridge.as_ref().unwrap().tokens.clone();
    tokens.token(USER).await.unwrap();
    env.tokens.fail_next(3, 503, r#"{"error":"temporarily_unavailable","error_description":"AADSTS90033: A transient error has occurred."}"#);
    let started = Instant::now();
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(13) {
        let (code, t) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
        assert_eq!(code, 250, "message {sent} at {:?}: {t}", started.elapsed());
        sent += 1;
        // New upstream sessions (and so token use) every time.
        env.upstream.close_idle_sessions();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        env.tokens.requests_by_grant("client_credentials"),
        5,
        "1 + 3 failures + 1 success"
    );
    assert_eq!(tokens.status(USER), Some(AccountStatus::Ready));
    assert!(sent > 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_needs_login_then_login_restores_delivery_without_restart() {
    let env = remote_ends(&Opts {
        flow: "authorization_code",
        ..Opts::default()
    })
    .await;
    seed_store(&env);
    let bridge = Bridge::start(&load_config(&env), bind().await)
        .await
        .unwrap();
    let mut c = TcpSmtp::connect(bridge.local_addr).await;
    c.login().await;
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await.0,
        250
    );

    // The tenant revokes the grant: the next refresh gets invalid_grant.
    env.tokens.revoke_refresh_tokens();
    env.tokens.revoke_all();
    env.upstream.close_idle_sessions();
    let (code, t) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 454, "{t}");
    assert!(
        t.starts_with("4.7.0") && t.contains("run: smtp-oauth-bridge login scanner"),
        "{t}"
    );
    let mut c2 = TcpSmtp::connect(bridge.local_addr).await;
    let (code, t) = c2.ehlo_auth_plain(USER, PASSWORD).await;
    assert_eq!(code, 454, "{t}");
    assert!(t.contains("run: smtp-oauth-bridge login scanner"), "{t}");
    assert!(matches!(
        bridge.tokens.status(USER),
        Some(AccountStatus::NeedsLogin(_))
    ));

    // `check` says so, with the hint, and exits 1.
    let out = bin()
        .args(["--config", env.config_path.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("scanner: FAILED") && stdout.contains("needs login"),
        "{stdout}"
    );
    assert!(
        stdout.contains("hint: run: smtp-oauth-bridge login scanner"),
        "{stdout}"
    );

    // While it needs login the provider is not asked again.
    let refreshes = env.tokens.requests_by_grant("refresh_token");
    let mut c3 = TcpSmtp::connect(bridge.local_addr).await;
    assert_eq!(c3.ehlo_auth_plain(USER, PASSWORD).await.0, 454);
    assert_eq!(env.tokens.requests_by_grant("refresh_token"), refreshes);

    // A person logs in while serve keeps running: delivery resumes, no restart.
    login_with_browser(&env).await;
    let mut c4 = TcpSmtp::connect(bridge.local_addr).await;
    c4.login().await;
    let (code, t) = c4.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "{t}");
    assert_eq!(bridge.tokens.status(USER), Some(AccountStatus::Ready));
}

fn check(env: &Env) -> (i32, String) {
    let out = bin()
        .args(["--config", env.config_path.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_explains_each_failure() {
    let env = remote_ends(&Opts::default()).await;
    let (code, out) = check(&env);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("scanner: ok"), "{out}");

    let cases: &[(Reply, &str)] = &[
        (Reply::new(535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."), "SmtpClientAuthenticationDisabled"),
        (Reply::new(535, "5.7.3 Authentication unsuccessful"), "mailbox matches"),
        (Reply::new(430, "4.2.0 STOREDRV; mailbox logon failure"), "New-ServicePrincipal"),
        (Reply::new(530, "5.7.57 Client not authenticated to send mail"), "Add-MailboxPermission"),
    ];
    for (reply, hint) in cases {
        env.upstream.set_auth_reply(Some(reply.clone()));
        let (code, out) = check(&env);
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains(&format!("{} {}", reply.code, reply.text)),
            "{out}"
        );
        assert!(out.contains(hint), "{reply}: {out}");
    }
    env.upstream.set_auth_reply(None);

    env.upstream.set_mail_reply(Some(Reply::new(
        554,
        "5.2.252 SendAsDenied; scanner@contoso.com not allowed to send as scanner@contoso.com",
    )));
    let (code, out) = check(&env);
    assert_eq!(code, 1, "{out}\n{:?}", env.upstream.log());
    assert!(out.contains("Send As"), "{out}");
    env.upstream.set_mail_reply(None);

    env.tokens.fail_next(1, 401, r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#);
    let (code, out) = check(&env);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("AADSTS7000215") && out.contains("client secret is wrong or expired"),
        "{out}"
    );

    let delegated = remote_ends(&Opts {
        flow: "authorization_code",
        ..Opts::default()
    })
    .await;
    seed_store(&delegated);
    for aadsts in [
        "AADSTS70008: The provided authorization code or refresh token has expired",
        "AADSTS700082: The refresh token has expired due to inactivity.",
        "AADSTS50173: The provided grant has expired due to it being revoked",
    ] {
        delegated.tokens.fail_next(
            1,
            400,
            &format!(r#"{{"error":"invalid_grant","error_description":"{aadsts}"}}"#),
        );
        let (code, out) = check(&delegated);
        assert_eq!(code, 1, "{out}");
        assert!(out.contains(aadsts.split(':').next().unwrap()), "{out}");
        assert!(
            out.contains("hint: run: smtp-oauth-bridge login scanner"),
            "{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_store_with_wrong_key_is_a_clear_error() {
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let env = remote_ends(&Opts {
        state: "key_file = \"state.key\"".to_string(),
        ..Opts::default()
    })
    .await;
    std::fs::write(env.dir.path().join("state.key"), key).unwrap();
    assert_eq!(check(&env).0, 0);
    let raw = std::fs::read_to_string(env.dir.path().join("state/tokens/scanner.json")).unwrap();
    assert!(raw.contains("chacha20poly1305"), "{raw}");
    for t in env.tokens.issued() {
        assert!(!raw.contains(&t), "access token in the clear");
    }
    std::fs::write(
        env.dir.path().join("state.key"),
        "HwECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    )
    .unwrap();
    let out = bin()
        .args(["--config", env.config_path.to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot be decrypted: wrong state key"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_code_expired_or_declined_fails_clearly_and_stores_nothing() {
    use testkit::token::DeviceOutcome;
    let env = remote_ends(&Opts {
        flow: "device_code",
        ..Opts::default()
    })
    .await;
    for (outcome, text) in [
        (DeviceOutcome::Expired, "expired_token"),
        (DeviceOutcome::Declined, "authorization_declined"),
    ] {
        env.tokens.set_device_flow(0, 1);
        env.tokens.set_device_outcome(outcome);
        let config = env.config_path.clone();
        let out = tokio::task::spawn_blocking(move || {
            bin()
                .args(["--config", config.to_str().unwrap(), "login", USER])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("login for scanner failed") && err.contains(text),
            "{err}"
        );
        assert!(!env.dir.path().join("state/tokens/scanner.json").exists());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confidential_clients_log_in_and_refresh_with_their_secret() {
    let env = remote_ends(&Opts {
        flow: "authorization_code",
        confidential: true,
        ..Opts::default()
    })
    .await;
    login_with_browser(&env).await;
    assert_eq!(env.tokens.requests_by_grant("authorization_code"), 1);
    // The stored refresh token works (the endpoint checks the secret on every grant).
    let manager = TokenManager::new(&load_config(&env)).unwrap();
    manager
        .force_refresh(USER)
        .await
        .expect("refresh with the client secret");
    assert_eq!(env.tokens.requests_by_grant("refresh_token"), 1);
}
