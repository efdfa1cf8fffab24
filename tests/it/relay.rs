//! The relay path end to end against the in-process bridge: bytes, envelope, upstream
//! protocol order, per-recipient replies, failures and recovery.

use crate::harness::*;
use std::time::Duration;
use testkit::Reply;

const MSG: &[u8] = b"From: Scanner <scanner@contoso.com>\r\nTo: a@fabrikam.com\r\nSubject: t\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nlast\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_arrives_byte_identical_over_starttls_and_xoauth2() {
    let env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let (code, text) = c
        .send_message(MAILBOX, &["a@fabrikam.com", "bcc-only@fabrikam.com"], MSG)
        .await;
    assert_eq!(code, 250, "{text}");
    assert!(text.starts_with("2.0.0 "), "{text}");
    assert!(
        text.contains("Queued mail for delivery"),
        "upstream text handed back: {text}"
    );
    c.expect("QUIT", 221).await;

    let got = env.upstream.wait_received(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.data, MSG, "bytes differ");
    assert_eq!(m.mail_from, MAILBOX);
    assert_eq!(m.rcpts, vec!["a@fabrikam.com", "bcc-only@fabrikam.com"]);
    assert!(m.tls, "message went over TLS");
    assert_eq!(m.auth_user, MAILBOX);
    assert!(
        env.tokens.issued().contains(&m.auth_token),
        "token issued by the endpoint"
    );
    assert!(env.tokens.is_valid(&m.auth_token));

    // The upstream saw STARTTLS before AUTH, and only XOAUTH2.
    let log = env.upstream.log();
    let pos = |p: &str| {
        log.iter()
            .position(|l| l.split_once(' ').is_some_and(|(_, c)| c.starts_with(p)))
    };
    let starttls = pos("STARTTLS").expect("STARTTLS sent");
    let auth = pos("AUTH").expect("AUTH sent");
    assert!(starttls < auth, "{log:?}");
    assert!(log[auth].contains("AUTH XOAUTH2 "), "{log:?}");
    assert_eq!(env.tokens.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_sender_smtputf8_and_8bit_body_relay_unchanged() {
    let env = start(Opts::default()).await;
    let body = "From: René <rené@contoso.com>\r\nTo: jörg@bücher.example\r\nSubject: Grüße\r\n\r\nÄrger mit Umlauten: äöü ß €\r\n.ünicode after dot\r\n".as_bytes();
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    c.expect("MAIL FROM:<rené@contoso.com> SMTPUTF8 BODY=8BITMIME", 250)
        .await;
    c.expect("RCPT TO:<jörg@bücher.example>", 250).await;
    c.expect("DATA", 354).await;
    c.send(&dot_stuff(body)).await;
    c.send(b".\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    // Null sender (bounce-style), same session.
    let (code, t) = c.send_message("", &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "{t}");
    c.expect("QUIT", 221).await;

    let got = env.upstream.wait_received(2, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].mail_from, "rené@contoso.com");
    assert!(
        got[0].mail_params.contains("SMTPUTF8"),
        "{}",
        got[0].mail_params
    );
    assert!(
        got[0].mail_params.contains("BODY=8BITMIME"),
        "{}",
        got[0].mail_params
    );
    assert_eq!(got[0].rcpts, vec!["jörg@bücher.example"]);
    assert_eq!(got[0].data, body);
    assert_eq!(got[1].mail_from, "");
    assert_eq!(got[1].data, MSG);
    // Both messages went over one upstream session (reused, RSET-free happy path).
    assert_eq!(got[0].session, got[1].session);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_transaction_gets_replies_in_order() {
    let env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    c.send(format!("MAIL FROM:<{MAILBOX}>\r\nRCPT TO:<a@fabrikam.com>\r\nRCPT TO:<b@fabrikam.com>\r\nDATA\r\n").as_bytes())
        .await;
    for want in [250, 250, 250, 354] {
        let (code, t) = c.reply().await;
        assert_eq!(code, want, "{t}");
    }
    c.send(&dot_stuff(MSG)).await;
    c.send(b".\r\nQUIT\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    assert_eq!(c.reply().await.0, 221);
    let got = env.upstream.wait_received(1, Duration::from_secs(5)).await;
    assert_eq!(got[0].rcpts.len(), 2);
    assert_eq!(got[0].data, MSG);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_gets_535_and_nothing_goes_upstream() {
    let env = start(Opts::default()).await;
    // The app-only token is fetched at start; wait for it, then snapshot the store.
    let tokens = env.bridge.as_ref().unwrap().tokens.clone();
    tokens.token(USER).await.expect("token at start");
    let store_file = env.dir.path().join("state/tokens/scanner.json");
    let stored = std::fs::read(&store_file).expect("token stored");
    let requests = env.tokens.requests();

    let mut c = TcpSmtp::connect(env.addr).await;
    let (code, text) = c.ehlo_auth_plain(USER, "wrong-password").await;
    assert_eq!(code, 535, "{text}");
    assert!(text.starts_with("5.7.8"), "{text}");
    let (code, text) = c.ehlo_auth_plain("nobody", PASSWORD).await;
    assert_eq!(code, 535, "{text}");
    let (code, text) = c.cmd(&format!("MAIL FROM:<{MAILBOX}>")).await;
    assert_eq!((code, &text[..5]), (530, "5.7.0"), "{text}");
    c.expect("QUIT", 221).await;
    assert_eq!(env.upstream.connections(), 0);
    assert_eq!(
        env.tokens.requests(),
        requests,
        "a wrong password never touches tokens"
    );
    assert_eq!(
        std::fs::read(&store_file).unwrap(),
        stored,
        "the token store is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_outside_allowed_from_gets_550_571() {
    let env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let t = c.expect("MAIL FROM:<ceo@contoso.com>", 550).await;
    assert!(t.starts_with("5.7.1"), "{t}");
    c.expect("MAIL FROM:<anyone@fabrikam.com>", 250).await;
    assert!(env.upstream.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rejected_recipient_does_not_sink_the_others() {
    let env = start(Opts::default()).await;
    env.upstream.set_rcpt_reply(
        "gone@fabrikam.com",
        Some(Reply::new(
            550,
            "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
        )),
    );
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    c.expect("RCPT TO:<a@fabrikam.com>", 250).await;
    let t = c.expect("RCPT TO:<gone@fabrikam.com>", 550).await;
    assert_eq!(
        t,
        "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
    );
    c.expect("RCPT TO:<b@fabrikam.com>", 250).await;
    c.expect("DATA", 354).await;
    c.send(&dot_stuff(MSG)).await;
    c.send(b".\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    let got = env.upstream.wait_received(1, Duration::from_secs(5)).await;
    assert_eq!(got[0].rcpts, vec!["a@fabrikam.com", "b@fabrikam.com"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_data_rejection_is_handed_back_as_5xx() {
    let env = start(Opts::default()).await;
    env.upstream.set_data_reply(Some(Reply::new(
        554,
        "5.2.252 SendAsDenied; scanner@contoso.com not allowed to send as x",
    )));
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let (code, t) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 554, "{t}");
    assert!(t.starts_with("5.2.252 SendAsDenied"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_gives_451_and_the_bridge_recovers() {
    let env = start(Opts::default()).await;
    env.upstream.pause();
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let (code, t) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 451, "{t}");
    assert!(t.starts_with("4.4.1"), "{t}");
    // The bridge keeps serving on the same session.
    c.expect("NOOP", 250).await;
    env.upstream.resume();
    let (code, t) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "{t}");
    assert_eq!(
        env.upstream
            .wait_received(1, Duration::from_secs(5))
            .await
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_token_is_refreshed_once_and_the_client_sees_250() {
    let env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await.0,
        250
    );
    assert_eq!(env.tokens.requests(), 1);
    // The provider revokes the token and the pooled session goes away: the next session's
    // AUTH gets 535 5.7.3, the bridge refreshes once and retries.
    env.tokens.revoke_all();
    env.upstream.close_idle_sessions();
    let (code, t) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "{t}");
    assert_eq!(env.tokens.requests(), 2, "exactly one refresh");
    let got = env.upstream.wait_received(2, Duration::from_secs(5)).await;
    assert_ne!(got[0].auth_token, got[1].auth_token);
    assert!(env.tokens.is_valid(&got[1].auth_token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_closed_by_upstream_is_replaced_transparently() {
    let env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await.0,
        250
    );
    env.upstream.close_idle_sessions();
    // The upstream has closed the pooled session before the next message.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while env.upstream.open_sessions() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle session still open"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await.0,
        250
    );
    let got = env.upstream.wait_received(2, Duration::from_secs(5)).await;
    assert_ne!(got[0].session, got[1].session);
    assert_eq!(env.upstream.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_per_mailbox_are_capped_and_reused() {
    let env = start(Opts {
        upstream: "max_sessions_per_mailbox = 2".into(),
        ..Opts::default()
    })
    .await;
    env.upstream.set_delay(Duration::from_millis(20));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let addr = env.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = TcpSmtp::connect(addr).await;
            c.login().await;
            for _ in 0..3 {
                let (code, t) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
                assert_eq!(code, 250, "{t}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(
        env.upstream
            .wait_received(18, Duration::from_secs(10))
            .await
            .len(),
        18
    );
    assert!(
        env.upstream.peak_sessions() <= 2,
        "peak {}",
        env.upstream.peak_sessions()
    );
    assert!(
        env.upstream.connections() <= 2,
        "sessions reused: {}",
        env.upstream.connections()
    );
    assert_eq!(env.tokens.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_get_421() {
    let env = start(Opts {
        listen: "max_connections = 2".into(),
        ..Opts::default()
    })
    .await;
    let c1 = TcpSmtp::connect(env.addr).await;
    let _c2 = TcpSmtp::connect(env.addr).await;
    let s = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let mut third = Smtp::over(s);
    let (code, t) = third.reply().await;
    assert_eq!(
        (code, t.as_str()),
        (421, "4.3.2 Too many connections, try again later")
    );
    // A slot frees up when a client leaves.
    drop(c1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = Smtp::over(tokio::net::TcpStream::connect(env.addr).await.unwrap());
        if c.reply().await.0 == 220 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no slot freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_the_transaction_in_flight_finish() {
    let mut env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    c.expect("RCPT TO:<a@fabrikam.com>", 250).await;
    let bridge = env.bridge.take().unwrap();
    bridge.shutdown();
    // The transaction completes, then the idle session is told the service is going away.
    c.expect("DATA", 354).await;
    c.send(&dot_stuff(MSG)).await;
    c.send(b".\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    assert_eq!(c.reply().await.0, 421);
    tokio::time::timeout(Duration::from_secs(10), bridge.wait())
        .await
        .expect("bridge stops");
    assert_eq!(
        env.upstream
            .wait_received(1, Duration::from_secs(5))
            .await
            .len(),
        1
    );
    assert!(
        tokio::net::TcpStream::connect(env.addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_sessions_are_closed_after_idle_secs() {
    let env = start(Opts {
        upstream: "idle_secs = 1".into(),
        ..Opts::default()
    })
    .await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await.0,
        250
    );
    assert_eq!(env.upstream.open_sessions(), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while env.upstream.open_sessions() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle session still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The upstream saw a polite QUIT, and the next message opens a new session.
    assert!(
        env.upstream.log().iter().any(|l| l.ends_with(" QUIT")),
        "{:?}",
        env.upstream.log()
    );
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await.0,
        250
    );
    assert_eq!(env.upstream.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_verdict_on_mail_comes_with_the_first_rcpt() {
    let env = start(Opts::default()).await;
    env.upstream.set_mail_reply(Some(Reply::new(
        550,
        "5.7.60 SMTP; Client does not have permissions to send as this sender",
    )));
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    // MAIL passes the local checks; the session (and the upstream MAIL) is taken at RCPT.
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    assert_eq!(env.upstream.connections(), 0);
    let t = c.expect("RCPT TO:<a@fabrikam.com>", 550).await;
    assert!(t.starts_with("5.7.60"), "{t}");
    let t = c.expect("RCPT TO:<b@fabrikam.com>", 550).await;
    assert!(t.starts_with("5.7.60"), "{t}");
    let t = c.expect("DATA", 550).await;
    assert!(t.starts_with("5.7.60"), "{t}");
    // The transaction is over: a new one can start.
    env.upstream.set_mail_reply(None);
    let (code, t) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "{t}");
    // A temporary refusal of every recipient makes DATA temporary too (the client retries).
    env.upstream.set_rcpt_reply(
        "full@fabrikam.com",
        Some(Reply::new(452, "4.2.2 Mailbox full")),
    );
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    c.expect("RCPT TO:<full@fabrikam.com>", 452).await;
    let t = c.expect("DATA", 452).await;
    assert!(t.starts_with("4.2.2"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls_upstream_relays_byte_identical() {
    let env = start(Opts {
        implicit_tls: true,
        ..Opts::default()
    })
    .await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    for _ in 0..3 {
        let (code, t) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
        assert_eq!(code, 250, "{t}");
    }
    let got = env.upstream.wait_received(3, Duration::from_secs(5)).await;
    assert!(got
        .iter()
        .all(|m| m.tls && m.data == MSG && m.auth_user == MAILBOX));
    // No STARTTLS on an implicit-TLS session; one session carried all three.
    assert!(!env.upstream.log().iter().any(|l| l.ends_with(" STARTTLS")));
    assert_eq!(env.upstream.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_certificate_we_do_not_trust_is_refused() {
    for implicit_tls in [false, true] {
        let mut env = remote_ends(&Opts {
            implicit_tls,
            ..Opts::default()
        })
        .await;
        // Without upstream.ca_file the test CA is not trusted (only the system roots are).
        env.config_text = env.config_text.replace("ca_file = \"upstream-ca.pem\"", "");
        let bridge = smtp_oauth_bridge::bridge::Bridge::start(&load_config(&env), bind().await)
            .await
            .unwrap();
        let mut c = TcpSmtp::connect(bridge.local_addr).await;
        c.login().await;
        let (code, t) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
        assert_eq!(code, 451, "implicit={implicit_tls}: {t}");
        assert!(t.starts_with("4.4.1"), "{t}");
        assert!(
            t.to_lowercase().contains("certificate") || t.contains("UnknownIssuer"),
            "{t}"
        );
        assert_eq!(
            env.upstream.auth_attempts(),
            0,
            "no credentials sent to an unverified server"
        );
    }
}
