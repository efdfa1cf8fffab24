//! `upstream.warm_sessions` end to end, in real time, against the in-process bridge: a
//! warm session opens at start without traffic (none by default), is replaced after the
//! upstream closes it so that the next message pays no handshake, the per-mailbox cap
//! holds under load with the upstream enforcing Microsoft 365's limit, an account that
//! needs login gets none, and a reload turns them on. (Re-authentication before the token
//! expires runs under a paused clock in `relay::pool`'s unit tests.)

use crate::harness::*;
use smtp_oauth_bridge::config::Config;
use std::time::{Duration, Instant};

const MSG: &[u8] =
    b"From: Scanner <scanner@contoso.com>\r\nTo: a@fabrikam.com\r\nSubject: warm\r\n\r\nhello\r\n";

/// Waits (at most 10 s) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn send_one(env: &Env) {
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let (code, text) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "{text}");
    c.expect("QUIT", 221).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_warm_session_opens_at_start_without_traffic_and_none_by_default() {
    let warm = start(Opts {
        upstream: "idle_secs = 1\nwarm_sessions = 1".into(),
        ..Opts::default()
    })
    .await;
    let cold = start(Opts {
        upstream: "idle_secs = 1".into(),
        ..Opts::default()
    })
    .await;
    until("the warm session", || warm.upstream.auth_attempts() == 1).await;
    // Several keeper rounds (every second) later: still exactly one, kept open by NOOPs.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(warm.upstream.connections(), 1);
    assert_eq!(warm.upstream.auth_attempts(), 1);
    assert_eq!(warm.upstream.open_sessions(), 1);
    assert!(
        warm.upstream.log().iter().any(|l| l == "S1 NOOP"),
        "{:?}",
        warm.upstream.log()
    );
    assert_eq!(warm.upstream.received_count(), 0);
    // (The bridge still fetches a token at start: that is the token manager's business.)
    assert_eq!(cold.upstream.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_session_closed_by_the_upstream_is_replaced_before_the_next_message() {
    let env = start(Opts {
        upstream: "idle_secs = 2\nwarm_sessions = 1".into(),
        ..Opts::default()
    })
    .await;
    until("the warm session", || env.upstream.auth_attempts() == 1).await;
    // The upstream drops it (as its idle timeout would). A session busy with a NOOP at
    // that moment is not affected: drop it again until a new connection comes.
    until("a new connection", || {
        if env.upstream.connections() == 1 {
            env.upstream.close_idle_sessions();
        }
        env.upstream.connections() == 2
    })
    .await;
    until("the new session authenticated", || {
        env.upstream.auth_attempts() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (connections, auths) = (env.upstream.connections(), env.upstream.auth_attempts());
    assert_eq!(env.upstream.open_sessions(), 1);

    send_one(&env).await;
    assert_eq!(env.upstream.connections(), connections, "no new connection");
    assert_eq!(env.upstream.auth_attempts(), auths, "no new AUTH");
    let got = env.upstream.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].session, 2, "sent on the replacement");
    assert_eq!(got[0].data, MSG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_sessions_never_exceed_the_cap_under_load() {
    let env = start(Opts {
        // 30 s to wait for a free session (the harness's 5 s): ten clients share three
        // sessions, and on a loaded 2-core machine a debug build can queue them past 5 s.
        upstream:
            "idle_secs = 1\nwarm_sessions = 3\nmax_sessions_per_mailbox = 3\ntimeout_secs = 30"
                .into(),
        ..Opts::default()
    })
    .await;
    // Microsoft 365's limit: a 4th authenticated session would get 432 4.3.2.
    env.upstream.set_max_sessions(Some(3));
    until("three warm sessions", || env.upstream.open_sessions() == 3).await;
    let addr = env.addr;
    for round in 0..3 {
        let clients: Vec<_> = (0..10)
            .map(|_| {
                tokio::spawn(async move {
                    let mut c = TcpSmtp::connect(addr).await;
                    c.login().await;
                    for _ in 0..2 {
                        let (code, text) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
                        assert_eq!(code, 250, "{text}");
                    }
                    c.expect("QUIT", 221).await;
                })
            })
            .collect();
        if round == 1 {
            // Idle ones dropped mid-load: the keeper and the clients compete for the slots.
            env.upstream.close_idle_sessions();
        }
        for c in clients {
            c.await.expect("client");
        }
        tokio::time::sleep(Duration::from_millis(1_200)).await;
    }
    assert_eq!(env.upstream.received_count(), 60);
    assert!(
        env.upstream.peak_sessions() <= 3,
        "peak {}",
        env.upstream.peak_sessions()
    );
    assert_eq!(env.upstream.data_faults(), 0, "no 432 from the upstream");
    until("warm again", || env.upstream.open_sessions() == 3).await;
    assert!(env.upstream.peak_sessions() <= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_that_needs_login_gets_no_warm_session() {
    let env = start(Opts {
        flow: "authorization_code",
        upstream: "idle_secs = 1\nwarm_sessions = 1".into(),
        ..Opts::default()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert_eq!(env.upstream.connections(), 0);
    assert_eq!(env.tokens.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_warm_sessions_on_and_off() {
    let env = start(Opts {
        upstream: "idle_secs = 1".into(),
        ..Opts::default()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(env.upstream.connections(), 0);
    let reload = |text: String| {
        let config = Config::from_toml(&text, "bridge.toml", env.dir.path(), &test_env);
        env.bridge.as_ref().expect("bridge").reload(config)
    };
    let on = env
        .config_text
        .replace("idle_secs = 1", "idle_secs = 1\nwarm_sessions = 2");
    reload(on.clone()).expect("reload");
    until("two warm sessions", || {
        env.upstream.auth_attempts() == 2 && env.upstream.open_sessions() == 2
    })
    .await;
    // Too many for the cap: refused, nothing changes.
    let e = reload(on.replace("warm_sessions = 2", "warm_sessions = 4")).unwrap_err();
    assert!(e.to_string().contains("upstream.warm_sessions"), "{e}");
    // Off: they expire after idle_secs with a QUIT each.
    reload(env.config_text.clone()).expect("reload");
    until("closed", || env.upstream.open_sessions() == 0).await;
    assert_eq!(
        env.upstream
            .log()
            .iter()
            .filter(|l| l.ends_with(" QUIT"))
            .count(),
        2
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(env.upstream.connections(), 2);
}
