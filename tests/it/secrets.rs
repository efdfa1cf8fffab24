//! Secrets never reach the logs: a full run of the real binary at RUST_LOG=trace, with
//! AUTH PLAIN, AUTH LOGIN, a wrong password, a token refresh after rejection, and relays.

use crate::harness::*;
use base64::Engine as _;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_contain_no_password_secret_or_token() {
    let env = remote_ends(&Opts::default()).await;
    let bridge = BridgeProcess::start(&env.config_path, "trace");
    let b64 = base64::engine::general_purpose::STANDARD;

    let mut c = TcpSmtp::connect(bridge.addr).await;
    c.login().await; // AUTH PLAIN
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], b"Subject: 1\r\n\r\nx\r\n")
            .await
            .0,
        250
    );
    c.expect("QUIT", 221).await;

    let mut c = TcpSmtp::connect(bridge.addr).await;
    c.expect("EHLO x", 250).await;
    c.expect("AUTH LOGIN", 334).await;
    c.expect(&b64.encode(USER), 334).await;
    c.expect(&b64.encode("wrong-Pässword"), 535).await;
    c.expect("AUTH LOGIN", 334).await;
    c.expect(&b64.encode(USER), 334).await;
    c.expect(&b64.encode(PASSWORD), 235).await;
    // Force a refresh after rejection: revoke, drop the pooled session, send again.
    env.tokens.revoke_all();
    env.upstream.close_idle_sessions();
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], b"Subject: 2\r\n\r\ny\r\n")
            .await
            .0,
        250
    );
    c.expect("QUIT", 221).await;
    env.upstream.wait_received(2, Duration::from_secs(5)).await;
    let (status, log) = bridge.stop();
    assert!(status.success(), "exit status {status:?}");

    assert!(
        log.contains("\"target\":\"relay\""),
        "relay lines are logged:\n{log}"
    );
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace level was on"
    );
    let issued = env.tokens.issued();
    assert_eq!(issued.len(), 2);
    let mut forbidden: Vec<String> = vec![
        PASSWORD.into(),
        b64.encode(PASSWORD),
        base64_plain(USER, PASSWORD),
        "wrong-Pässword".into(),
        b64.encode("wrong-Pässword"),
        CLIENT_SECRET.into(),
    ];
    for t in &issued {
        forbidden.push(t.clone());
        forbidden.push(b64.encode(format!("user={MAILBOX}\x01auth=Bearer {t}\x01\x01")));
    }
    for f in &forbidden {
        assert!(!log.contains(f.as_str()), "secret {f:?} appears in the log");
    }
}
