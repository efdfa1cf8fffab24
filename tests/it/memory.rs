//! Memory: a 30 MiB message relays with the bridge's peak RSS under twice its size, six
//! concurrent 30 MiB messages (sync and spool mode) under 160 MiB (the content streams:
//! memory per message is a buffer, not the message), and 1000 idle authenticated sessions
//! fit in 64 MiB. Measured on the real binary (the fake upstream runs in the test process,
//! so it does not count).

use crate::harness::*;
use std::time::Duration;

fn rss(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_mib_message_peak_rss_under_twice_its_size() {
    let env = remote_ends(&Opts::default()).await;
    env.upstream.set_keep_data(false);
    let bridge = BridgeProcess::start(&env.config_path, "info");
    let size = 30 * 1024 * 1024;
    let mut msg = b"Subject: big\r\n\r\n".to_vec();
    let line =
        b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdef\r\n";
    while msg.len() + line.len() <= size {
        msg.extend_from_slice(line);
    }
    let mut c = TcpSmtp::connect(bridge.addr).await;
    c.login().await;
    c.expect(&format!("MAIL FROM:<{MAILBOX}> SIZE={}", msg.len()), 250)
        .await;
    c.expect("RCPT TO:<a@fabrikam.com>", 250).await;
    c.expect("DATA", 354).await;
    c.send(&msg).await; // no line starts with '.'
    c.send(b".\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    assert_eq!(
        env.upstream
            .wait_received(1, Duration::from_secs(10))
            .await
            .len(),
        1
    );
    let peak = rss(bridge.child.id(), "VmHWM:");
    println!(
        "30 MiB message: bridge peak RSS {:.1} MiB",
        peak as f64 / 1048576.0
    );
    assert!(
        peak < 2 * msg.len() as u64,
        "peak RSS {peak} for a {} byte message",
        msg.len()
    );
    assert!(bridge.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_authenticated_sessions_fit_in_64_mib() {
    let env = remote_ends(&Opts::default()).await;
    let bridge = BridgeProcess::start(&env.config_path, "warn,smtp_oauth_bridge::bridge=info");
    let mut clients = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut c = TcpSmtp::connect(bridge.addr).await;
        c.login().await;
        clients.push(c);
    }
    // Every session is alive: one more round trip on each.
    for c in clients.iter_mut().step_by(97) {
        c.expect("NOOP", 250).await;
    }
    let now = rss(bridge.child.id(), "VmRSS:");
    println!(
        "1000 idle sessions: bridge RSS {:.1} MiB",
        now as f64 / 1048576.0
    );
    assert!(now < 64 * 1024 * 1024, "RSS {now} with 1000 sessions");
    drop(clients);
    assert!(bridge.stop().0.success());
}

/// A 30 MiB message unique to `i`: CRLF lines, some starting with a dot (stuffed on the
/// wire both ways), none longer than RFC 5321 allows.
fn big_message(i: usize) -> Vec<u8> {
    let size = 30 * 1024 * 1024;
    let mut msg = format!("Subject: big {i}\r\nMessage-ID: <big{i}@test>\r\n\r\n").into_bytes();
    let mut n = 0u64;
    while msg.len() < size - 200 {
        n += 1;
        if n.is_multiple_of(997) {
            msg.extend_from_slice(
                format!(".line {n} of message {i}, starting with a dot\r\n").as_bytes(),
            );
        } else {
            msg.extend_from_slice(
                format!("{n:010} 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ {i}\r\n")
                    .as_bytes(),
            );
        }
    }
    msg
}

/// Six clients send a 30 MiB message each at the same time; every reply is 250. Returns
/// the messages sent.
async fn six_concurrent_big_messages(addr: std::net::SocketAddr) -> Vec<Vec<u8>> {
    let mut tasks = Vec::new();
    for i in 0..6 {
        tasks.push(tokio::spawn(async move {
            let msg = big_message(i);
            let mut c = TcpSmtp::connect(addr).await;
            c.login().await;
            c.expect(&format!("MAIL FROM:<{MAILBOX}> SIZE={}", msg.len()), 250)
                .await;
            c.expect("RCPT TO:<a@fabrikam.com>", 250).await;
            c.expect("DATA", 354).await;
            c.send(&dot_stuff(&msg)).await;
            c.send(b".\r\n").await;
            let (code, text) = c.reply().await;
            assert_eq!(code, 250, "message {i}: {text}");
            msg
        }));
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.push(t.await.expect("client task"));
    }
    sent
}

/// Every message arrived upstream once, byte for byte.
async fn all_received_byte_identical(env: &Env, sent: &[Vec<u8>]) {
    let got = env
        .upstream
        .wait_received(sent.len(), Duration::from_secs(120))
        .await;
    assert_eq!(got.len(), sent.len());
    for (i, msg) in sent.iter().enumerate() {
        let want = format!("<big{i}@test>");
        let ids = env.upstream.message_ids();
        let at: Vec<usize> = (0..ids.len()).filter(|k| ids[*k] == want).collect();
        assert_eq!(at.len(), 1, "message {i} received once: {ids:?}");
        let data = &got[at[0]].data;
        assert_eq!(data.len(), msg.len(), "message {i} length");
        assert!(data == msg, "message {i} is not byte-identical upstream");
    }
}

fn six_big_opts(extra: &str) -> Opts {
    Opts {
        // 30 s, not the harness's 5 s: six 30 MiB streams in a debug build on a loaded
        // 2-core machine can keep the fake upstream from answering AUTH within 5 s.
        upstream: "max_sessions_per_mailbox = 6\nmessages_per_minute = 0\ntimeout_secs = 30"
            .into(),
        extra: extra.into(),
        ..Opts::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_concurrent_thirty_mib_messages_sync_peak_rss_under_160_mib() {
    let env = remote_ends(&six_big_opts("")).await;
    let bridge = BridgeProcess::start(&env.config_path, "info");
    let sent = six_concurrent_big_messages(bridge.addr).await;
    all_received_byte_identical(&env, &sent).await;
    let peak = bridge.peak_rss();
    println!(
        "6 x 30 MiB, sync: bridge peak RSS {:.1} MiB",
        peak as f64 / 1048576.0
    );
    assert!(peak < 160 * 1024 * 1024, "peak RSS {peak}");
    assert!(bridge.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_concurrent_thirty_mib_messages_spool_peak_rss_under_160_mib() {
    let env = remote_ends(&six_big_opts("[queue]\nmode = \"spool\"\n")).await;
    let bridge = BridgeProcess::start(&env.config_path, "info");
    let sent = six_concurrent_big_messages(bridge.addr).await;
    all_received_byte_identical(&env, &sent).await;
    let spool = env.dir.path().join("state/spool");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.path().is_file())
    {
        assert!(std::time::Instant::now() < deadline, "spool not emptied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak = bridge.peak_rss();
    println!(
        "6 x 30 MiB, spool: bridge peak RSS {:.1} MiB",
        peak as f64 / 1048576.0
    );
    assert!(peak < 160 * 1024 * 1024, "peak RSS {peak}");
    assert!(bridge.stop().0.success());
}
