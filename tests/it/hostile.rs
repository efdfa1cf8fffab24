//! Broken and hostile clients: every case gets a well-defined reply (or a closed
//! connection), nothing reaches the upstream that should not, and afterwards a normal
//! message still relays.

use crate::harness::*;
use std::time::{Duration, Instant};

const MSG: &[u8] = b"Subject: after\r\n\r\nstill works\r\n";

/// A fresh client can still send a message through the same bridge.
async fn still_relays(env: &Env) {
    let before = env.upstream.received().len();
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let (code, t) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "{t}");
    assert_eq!(
        env.upstream
            .wait_received(before + 1, Duration::from_secs(5))
            .await
            .len(),
        before + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_line_without_crlf_gets_500_552_and_the_session_goes_on() {
    let env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.send(&vec![b'A'; 1024 * 1024]).await;
    c.send(b"\r\n").await;
    let (code, t) = c.reply().await;
    assert_eq!((code, t.as_str()), (500, "5.5.2 Line too long"));
    c.expect("NOOP", 250).await;
    // Also inside AUTH.
    c.expect("EHLO x", 250).await;
    let long = "A".repeat(5000);
    let (code, t) = c.cmd(&format!("AUTH PLAIN {long}")).await;
    assert_eq!((code, &t[..5]), (500, "5.5.2"), "{t}");
    still_relays(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_bare_lf_and_bare_cr_in_commands() {
    let env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    // Bare LF ends a command line (as Postfix accepts); NUL and bare CR make bad commands.
    c.send(b"EHLO x\nNOOP\n").await;
    assert_eq!(c.reply().await.0, 250);
    assert_eq!(c.reply().await.0, 250);
    let (code, _) = c.cmd("NO\rOP").await;
    assert!((500..=502).contains(&code), "{code}");
    c.send(b"NO\0OP\r\n").await;
    let (code, _) = c.reply().await;
    assert!((500..=502).contains(&code), "{code}");
    c.expect("NOOP", 250).await;
    still_relays(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_never_become_a_second_message() {
    let env = start(Opts::default()).await;
    for (i, smuggle) in [
        &b"\n.\r\n"[..],
        &b"\r.\r\n"[..],
        &b"\n.\n"[..],
        &b"\r\n.\n"[..],
    ]
    .iter()
    .enumerate()
    {
        let mut c = TcpSmtp::connect(env.addr).await;
        c.login().await;
        c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
        c.expect("RCPT TO:<a@fabrikam.com>", 250).await;
        c.expect("DATA", 354).await;
        let mut data = b"Subject: smuggle\r\n\r\nhello".to_vec();
        data.extend_from_slice(smuggle);
        data.extend_from_slice(b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@fabrikam.com>\r\nDATA\r\nsmuggled\r\n.\r\n");
        c.send(&data).await;
        let (code, t) = c.reply().await;
        assert_eq!(code, 250, "{t}");
        let got = env
            .upstream
            .wait_received(i + 1, Duration::from_secs(5))
            .await;
        assert_eq!(got.len(), i + 1, "exactly one message per transaction");
        let m = &got[i];
        assert_eq!(m.rcpts, vec!["a@fabrikam.com"]);
        // The smuggled commands are message text, with every line ending normalised.
        let text = String::from_utf8_lossy(&m.data);
        assert!(
            text.contains("\r\nMAIL FROM:<evil@attacker.example>\r\n"),
            "{text:?}"
        );
        assert!(
            !m.data.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
            "bare LF reached the upstream: {text:?}"
        );
        c.expect("QUIT", 221).await;
    }
    // One more message through the same pool: a smuggled one would have arrived before it.
    still_relays(&env).await;
    assert_eq!(env.upstream.received().len(), 5);
    assert!(env
        .upstream
        .received()
        .iter()
        .all(|m| !m.rcpts.contains(&"victim@fabrikam.com".to_string())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_in_data_are_relayed_as_they_are() {
    let env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let body = b"Subject: nul\r\n\r\na\0b\0\0c\r\n";
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], body).await.0,
        250
    );
    assert_eq!(
        env.upstream.wait_received(1, Duration::from_secs(5)).await[0].data,
        body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_out_of_order_and_bad_auth() {
    let env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", base64_plain(USER, PASSWORD)))
            .await
            .0,
        503
    );
    assert_eq!(c.cmd(&format!("MAIL FROM:<{MAILBOX}>")).await.0, 530);
    assert_eq!(c.cmd("RCPT TO:<a@fabrikam.com>").await.0, 503);
    assert_eq!(c.cmd("DATA").await.0, 503);
    c.expect("EHLO x", 250).await;
    let t = c.expect("AUTH PLAIN !!!not-base64!!!", 501).await;
    assert!(t.starts_with("5.5.2"), "{t}");
    c.expect("AUTH LOGIN", 334).await;
    c.expect("%%%", 501).await;
    c.expect("AUTH LOGIN", 334).await;
    c.expect("*", 501).await; // cancelled
    c.expect("AUTH CRAM-MD5", 504).await;
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", base64_plain(USER, PASSWORD)))
            .await
            .0,
        235
    );
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", base64_plain(USER, PASSWORD)))
            .await
            .0,
        503
    );
    assert_eq!(
        env.upstream.connections(),
        0,
        "nothing reached the upstream"
    );
    still_relays(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_recipients_get_500_accepted_and_452_for_the_rest() {
    let env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    let mut batch = String::new();
    for i in 0..10_000 {
        batch.push_str(&format!("RCPT TO:<r{i}@fabrikam.com>\r\n"));
    }
    c.send(batch.as_bytes()).await;
    let (mut ok, mut full) = (0, 0);
    for _ in 0..10_000 {
        match c.reply().await {
            (250, _) => ok += 1,
            (452, t) if t.starts_with("4.5.3") => full += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, full), (500, 9_500));
    c.expect("DATA", 354).await;
    c.send(b"Subject: many\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    let got = env.upstream.wait_received(1, Duration::from_secs(5)).await;
    assert_eq!(got[0].rcpts.len(), 500);
    still_relays(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pipelined_after_data_are_message_content_then_commands() {
    let env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    c.send(format!("MAIL FROM:<{MAILBOX}>\r\nRCPT TO:<a@fabrikam.com>\r\nDATA\r\nSubject: p\r\n\r\nRSET\r\nQUIT\r\n.\r\nNOOP\r\nQUIT\r\n").as_bytes())
        .await;
    let codes: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(c.reply().await.0);
        }
        v
    };
    assert_eq!(codes, [250, 250, 354, 250, 250, 221]);
    let got = env.upstream.wait_received(1, Duration::from_secs(5)).await;
    assert_eq!(got[0].data, b"Subject: p\r\n\r\nRSET\r\nQUIT\r\n");
    still_relays(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_a_second_client_is_cut_off_and_long_sessions_end() {
    let env = start(Opts {
        listen: "command_timeout_secs = 2\nsession_timeout_secs = 3".into(),
        ..Opts::default()
    })
    .await;
    // Our clock starts before the connection, so never after the bridge's.
    let started = Instant::now();
    let mut c = TcpSmtp::connect(env.addr).await;
    // One byte every 300 ms never completes a line within the 2 s command timeout.
    let mut got = None;
    for b in b"EHLO slow.client.example\r\n" {
        if !c.try_send(&[*b]).await {
            break;
        }
        tokio::select! {
            r = c.try_reply() => { got = r; break; }
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
    assert_eq!(got, Some(421), "cut off with 421");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(c.try_reply().await, None, "connection closed");

    // A session busy with NOOPs is ended at the session time limit.
    let started = Instant::now();
    let mut c = TcpSmtp::connect(env.addr).await;
    let code = loop {
        let (code, _) = c.cmd("NOOP").await;
        if code != 250 {
            break code;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(code, 421);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    still_relays(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_passwords_slow_down_then_421_others_unaffected() {
    let env = start(Opts::default()).await;
    let addr = env.addr;
    let (first_refusal, refused) = tokio::sync::oneshot::channel();
    let attacker = tokio::spawn(async move {
        let mut c = TcpSmtp::connect(addr).await;
        c.expect("EHLO attacker", 250).await;
        let started = Instant::now();
        let mut codes = Vec::new();
        let mut first_refusal = Some(first_refusal);
        for i in 0..6 {
            match c
                .try_send(
                    format!(
                        "AUTH PLAIN {}\r\n",
                        base64_plain(USER, &format!("guess{i}"))
                    )
                    .as_bytes(),
                )
                .await
            {
                true => codes.push(c.try_reply().await),
                false => codes.push(None),
            }
            if let Some(tx) = first_refusal.take() {
                let _ = tx.send(());
            }
        }
        (codes, started.elapsed())
    });
    // Once the attacker is being slowed down, a legitimate client (same address)
    // authenticates and sends.
    refused.await.expect("the attacker's first reply");
    still_relays(&env).await;
    let (codes, took) = attacker.await.unwrap();
    assert_eq!(
        codes[..4],
        [Some(535), Some(535), Some(535), Some(535)],
        "{codes:?}"
    );
    assert_eq!(codes[4], Some(421), "{codes:?}");
    assert_eq!(codes[5], None, "closed after 421");
    // 250 + 500 + 1000 + 2000 + 4000 ms of delays at least.
    assert!(took >= Duration::from_millis(7750), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_hello_on_the_plaintext_port() {
    let env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    // The first bytes of a TLS 1.2/1.3 ClientHello record, with a LF inside as real ones can
    // have (byte 21), NUL bytes before it, and a bare CR and bytes over 127 after it.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xf1, 0x01, 0x00, 0x00, 0xed, 0x03, 0x03,
    ];
    hello.extend((0u8..=255).cycle().take(237));
    c.send(&hello).await;
    // Up to the LF it is a command line with NUL bytes: refused as exactly that, with a
    // well-formed reply (no echo of the bytes, no other reply, the connection stays).
    let bad_line = (500, "5.5.2 NUL or bare CR in command line".to_string());
    assert_eq!(c.reply().await, bad_line);
    // The rest of the record ends at our CRLF: refused the same way. The session is still in
    // step: the next command gets its own reply, and the same session relays a message.
    c.send(b"\r\n").await;
    assert_eq!(c.reply().await, bad_line);
    c.expect("NOOP", 250).await;
    c.login().await;
    let (code, t) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "{t}");
    c.expect("QUIT", 221).await;
    assert_eq!(
        env.upstream
            .wait_received(1, Duration::from_secs(5))
            .await
            .len(),
        1
    );
    // A real TLS client reads the plaintext greeting where it expects a TLS record and gives
    // up; the listener keeps serving.
    let tcp = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .expect("the handshake ends within 5 s")
        .expect_err("a TLS handshake with an SMTP greeting");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains("InvalidContentType"), "{err}");
    still_relays(&env).await;
}

/// What a hostile upstream (or anyone on the path) appends to its `220` to STARTTLS, in
/// plaintext: a reply a careless client would read inside TLS as the answer to a later
/// command.
const STARTTLS_INJECTION: &[u8] = b"250 2.0.0 Queued mail for delivery\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_starttls_response_injection_is_refused_in_sync_mode() {
    let env = start(Opts::default()).await;
    env.upstream
        .set_starttls_inject(Some(STARTTLS_INJECTION.to_vec()));
    // Were the injected reply taken, every later reply would be off by one and this 554
    // would never be seen.
    env.upstream
        .set_data_reply(Some(testkit::Reply::new(554, "5.6.0 refused")));
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    let (code, t) = c.cmd("RCPT TO:<a@fabrikam.com>").await;
    assert_eq!(code, 451, "{t}");
    assert!(
        t.starts_with("4.4.1") && t.contains("after its STARTTLS reply"),
        "{t}"
    );
    let (code, t) = c.cmd("DATA").await;
    assert_eq!(code, 451, "{t}");
    assert!(env.upstream.data_faults() >= 1, "the injection was made");
    assert_eq!(env.upstream.auth_attempts(), 0, "no token to that session");
    assert!(
        !env.upstream
            .log()
            .iter()
            .any(|l| l.contains("MAIL FROM") || l.contains("AUTH")),
        "{:?}",
        env.upstream.log()
    );
    assert!(env.upstream.received().is_empty());
    c.expect("QUIT", 221).await;
    env.upstream.set_starttls_inject(None);
    env.upstream.set_data_reply(None);
    still_relays(&env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_starttls_response_injection_is_deferred_in_spool_mode() {
    let env = remote_ends(&Opts {
        extra: "[queue]\nmode = \"spool\"\nretry_min_secs = 1\nretry_max_secs = 1\n".into(),
        upstream: "messages_per_minute = 0".into(),
        ..Opts::default()
    })
    .await;
    env.upstream
        .set_starttls_inject(Some(STARTTLS_INJECTION.to_vec()));
    let bridge = BridgeProcess::start(&env.config_path, "info");
    let mut c = TcpSmtp::connect(bridge.addr).await;
    c.login().await;
    let (code, t) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "spooled: {t}");
    let id = t.split_whitespace().nth(1).unwrap_or_default().to_string();
    let relay_outcomes = |log: &str| -> Vec<String> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "relay" && v["id"] == id.as_str())
            .map(|v| v["outcome"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !relay_outcomes(&bridge.log())
        .iter()
        .any(|o| o == "deferred")
    {
        assert!(
            Instant::now() < deadline,
            "no deferred line:\n{}",
            bridge.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(env.upstream.received().is_empty());
    assert_eq!(env.upstream.auth_attempts(), 0, "no token to that session");
    // A clean upstream gets the message, once.
    env.upstream.set_starttls_inject(None);
    let got = env.upstream.wait_received(1, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, MSG);
    let (_, log) = bridge.stop();
    let outcomes = relay_outcomes(&log);
    assert_eq!(
        outcomes.first().map(String::as_str),
        Some("spooled"),
        "{log}"
    );
    assert_eq!(
        outcomes.last().map(String::as_str),
        Some("delivered"),
        "{log}"
    );
    assert!(
        outcomes[1..outcomes.len() - 1]
            .iter()
            .all(|o| o == "deferred"),
        "{log}"
    );
    assert_eq!(env.upstream.received().len(), 1);
}
