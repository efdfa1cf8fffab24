//! Size limits: a 30 MiB message relays intact; 36 MiB gets 552 5.3.4 (at MAIL when SIZE=
//! is declared, after DATA otherwise) and the bridge discards instead of buffering it.

use crate::harness::*;
use std::time::Duration;

fn big_message(size: usize) -> Vec<u8> {
    let mut m = b"From: scanner@contoso.com\r\nTo: a@fabrikam.com\r\nSubject: big\r\n\r\n".to_vec();
    let line =
        b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-+/=0123456789abcd\r\n";
    while m.len() + line.len() <= size {
        m.extend_from_slice(line);
    }
    while m.len() < size - 2 {
        m.push(b'x');
    }
    m.extend_from_slice(b"\r\n");
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_mib_relays_intact() {
    let env = start(Opts::default()).await;
    let msg = big_message(30 * 1024 * 1024);
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    c.expect(&format!("MAIL FROM:<{MAILBOX}> SIZE={}", msg.len()), 250)
        .await;
    c.expect("RCPT TO:<a@fabrikam.com>", 250).await;
    c.expect("DATA", 354).await;
    c.send(&dot_stuff(&msg)).await;
    c.send(b".\r\n").await;
    let (code, t) = c.reply().await;
    assert_eq!(code, 250, "{t}");
    let got = env.upstream.wait_received(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].data.len(), msg.len());
    assert!(got[0].data == msg, "30 MiB message bytes differ");
    assert!(got[0].mail_params.contains(&format!("SIZE={}", msg.len())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_size_over_the_limit_is_refused_at_mail() {
    let env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    let (_, ehlo) = c.cmd("EHLO x").await;
    assert!(ehlo.lines().any(|l| l == "SIZE 36700160"), "{ehlo}");
    let (code, t) = c
        .cmd(&format!("AUTH PLAIN {}", base64_plain(USER, PASSWORD)))
        .await;
    assert_eq!(code, 235, "{t}");
    let t = c
        .expect(
            &format!("MAIL FROM:<{MAILBOX}> SIZE={}", 36 * 1024 * 1024),
            552,
        )
        .await;
    assert!(t.starts_with("5.3.4"), "{t}");
    assert_eq!(env.upstream.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_oversize_gets_552_after_data_and_session_goes_on() {
    let env = start(Opts::default()).await;
    let msg = big_message(36 * 1024 * 1024);
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    c.expect("RCPT TO:<a@fabrikam.com>", 250).await;
    c.expect("DATA", 354).await;
    c.send(&dot_stuff(&msg)).await;
    c.send(b".\r\n").await;
    let (code, t) = c.reply().await;
    assert_eq!(code, 552, "{t}");
    assert!(t.starts_with("5.3.4"), "{t}");
    // Nothing reached the upstream, and the same session still relays.
    assert!(env.upstream.received().is_empty());
    let (code, t) = c
        .send_message(
            MAILBOX,
            &["a@fabrikam.com"],
            b"Subject: small\r\n\r\nok\r\n",
        )
        .await;
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
async fn oversize_data_is_discarded_not_buffered() {
    // The real binary, so its memory can be read: 64 MiB sent without SIZE= must not grow
    // the bridge by more than the 35 MiB limit plus slack.
    let env = remote_ends(&Opts::default()).await;
    let bridge = BridgeProcess::start(&env.config_path, "info");
    let before = bridge.peak_rss();
    let msg = big_message(64 * 1024 * 1024);
    let mut c = TcpSmtp::connect(bridge.addr).await;
    c.login().await;
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    c.expect("RCPT TO:<a@fabrikam.com>", 250).await;
    c.expect("DATA", 354).await;
    c.send(&dot_stuff(&msg)).await;
    c.send(b".\r\n").await;
    assert_eq!(c.reply().await.0, 552);
    let grown = bridge.peak_rss().saturating_sub(before);
    assert!(
        grown < 40 * 1024 * 1024,
        "bridge grew by {grown} bytes for a 64 MiB message"
    );
    assert!(env.upstream.received().is_empty());
    assert!(bridge.stop().0.success());
}
