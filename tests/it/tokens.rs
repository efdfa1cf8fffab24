//! Token lifecycle on the relay path: short-lived tokens under concurrent load.

use crate::harness::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_under_load_are_refreshed_a_handful_of_times() {
    let lifetime = Duration::from_secs(3);
    let run_for = Duration::from_secs(15);
    let env = start(Opts {
        lifetime,
        ..Opts::default()
    })
    .await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let addr = env.addr;
        tasks.push(tokio::spawn(async move {
            let mut sent = 0usize;
            let mut c = TcpSmtp::connect(addr).await;
            c.login().await;
            while started.elapsed() < run_for {
                let body = format!("Subject: load {i}-{sent}\r\n\r\nhello\r\n");
                let (code, t) = c
                    .send_message(MAILBOX, &["a@fabrikam.com"], body.as_bytes())
                    .await;
                assert_eq!(code, 250, "client {i} message {sent}: {t}");
                sent += 1;
            }
            c.expect("QUIT", 221).await;
            sent
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("client");
    }
    let got = env
        .upstream
        .wait_received(total, Duration::from_secs(10))
        .await;
    assert_eq!(got.len(), total, "every accepted message arrived");
    // Every message was authenticated with a token that was valid when used.
    let requests = env.tokens.requests();
    let bound = (run_for.as_secs_f64() / (lifetime.as_secs_f64() * 0.8)).ceil() as usize + 2;
    println!("{total} messages, {requests} token requests (bound {bound})");
    assert!(total >= 50, "load was too small to mean anything: {total}");
    assert!(
        requests >= 4,
        "tokens were refreshed as they expired: {requests}"
    );
    assert!(
        requests <= bound,
        "{requests} token requests for {total} messages"
    );
}

/// Polls `f` (an observable condition, not a guess at timing) for up to `timeout`.
async fn wait_until(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_callers_cause_exactly_one_token_request() {
    let env = start(Opts::default()).await;
    let manager = env.bridge.as_ref().unwrap().tokens.clone();
    // The start-up refresher fetches the first token; wait for it, so it cannot be the one
    // request the callers below are counted against.
    wait_until("the start-up token", Duration::from_secs(10), || {
        manager.is_usable(USER)
    })
    .await;
    assert_eq!(env.tokens.requests(), 1);
    let current = manager.token(USER).await.expect("token").generation;

    // Fifty sessions whose upstream rejected the current token at once: one new token.
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let m = manager.clone();
        let b = barrier.clone();
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            m.refresh_rejected(USER, current)
                .await
                .map(|t| t.generation)
        }));
    }
    let mut generations = Vec::new();
    for t in tasks {
        generations.push(t.await.unwrap().expect("token"));
    }
    assert_eq!(env.tokens.requests(), 2, "exactly one more token request");
    assert!(
        generations.iter().all(|g| *g == current + 1),
        "everyone got the same new token: {generations:?}"
    );

    // Without any token yet (a manager of its own, no refresher): fifty callers, one request.
    let mut config = load_config(&env);
    config.state.dir = env.dir.path().join("state-of-its-own");
    let standalone =
        smtp_oauth_bridge::oauth::manager::TokenManager::new(&config).expect("token manager");
    let before = env.tokens.requests();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let m = standalone.clone();
        let b = barrier.clone();
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            m.token(USER).await.map(|t| t.secret.expose().to_string())
        }));
    }
    let mut secrets = std::collections::BTreeSet::new();
    for t in tasks {
        secrets.insert(t.await.unwrap().expect("token"));
    }
    assert_eq!(
        env.tokens.requests(),
        before + 1,
        "exactly one more token request"
    );
    assert_eq!(secrets.len(), 1, "everyone got the same token");
}
