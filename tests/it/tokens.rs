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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_callers_cause_exactly_one_token_request() {
    let env = start(Opts::default()).await;
    let manager = env.bridge.as_ref().unwrap().tokens.clone();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let m = manager.clone();
        tasks.push(tokio::spawn(async move {
            m.token(USER).await.map(|t| t.generation)
        }));
    }
    let mut generations = Vec::new();
    for t in tasks {
        generations.push(t.await.unwrap().expect("token"));
    }
    assert_eq!(env.tokens.requests(), 1);
    assert!(
        generations.windows(2).all(|w| w[0] == w[1]),
        "everyone got the same token"
    );
}
