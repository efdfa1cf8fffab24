//! Memory: a 30 MiB message relays with the bridge's peak RSS under twice its size, and
//! 1000 idle authenticated sessions fit in 64 MiB. Measured on the real binary.

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
