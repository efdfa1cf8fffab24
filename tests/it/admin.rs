//! The admin port under abuse: whatever it receives, the SMTP listener keeps working and
//! the admin endpoint itself answers again within seconds (issue 10, finding 4).

use crate::harness::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

const MSG: &[u8] = b"Subject: under siege\r\n\r\nstill here\r\n";
/// The bridge's descriptor limit in this test.
const FD_LIMIT: usize = 256;
/// What the bridge may hold with the admin port full: MAX_ADMIN_CONNECTIONS (64) plus its
/// listeners, runtime, log and upstream sockets. The first edition reached the limit.
const FD_BUDGET: usize = 64 + 40;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

fn admin_addr(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("admin")?.as_str()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_idle_admin_connections_under_ulimit_256_do_not_stop_smtp() {
    let env = remote_ends(&Opts {
        listen: "admin = \"127.0.0.1:0\"".into(),
        ..Opts::default()
    })
    .await;
    let bin = env!("CARGO_BIN_EXE_smtp-oauth-bridge");
    let script = format!("ulimit -n {FD_LIMIT} && exec \"$0\" \"$@\"");
    let bridge = BridgeProcess::spawn_bin(
        Path::new("/bin/sh"),
        &[
            "-c",
            &script,
            bin,
            "--config",
            env.config_path.to_str().unwrap(),
            "--log-format",
            "json",
            "serve",
        ],
        &[("RUST_LOG".into(), "info".into())],
        None,
    );
    let pid = bridge.child.id();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 256 ")),
        "the bridge does not run under ulimit -n 256:\n{limits}"
    );
    let admin = admin_addr(&bridge.log()).expect("admin address in the log");

    // 300 connections that never say anything, all kept open until the end.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    let mut peak_fds = open_fds(pid);
    tokio::time::sleep(Duration::from_millis(500)).await;
    peak_fds = peak_fds.max(open_fds(pid));

    // SMTP relays a message meanwhile.
    let mut c = TcpSmtp::connect(bridge.addr).await;
    c.login().await;
    let (code, text) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "{text}");
    let got = env.upstream.wait_received(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert!(
        got[0].data.ends_with(b"still here\r\n"),
        "{:?}",
        String::from_utf8_lossy(&got[0].data)
    );
    assert_eq!(c.cmd("QUIT").await.0, 221);
    peak_fds = peak_fds.max(open_fds(pid));

    // /healthz answers once the idle connections have been shed (5 s header timeout).
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        peak_fds = peak_fds.max(open_fds(pid));
        match http.get(format!("http://{admin}/healthz")).send().await {
            Ok(r) if r.status().as_u16() == 200 => break r.text().await.unwrap(),
            other => {
                assert!(
                    Instant::now() < deadline,
                    "/healthz not answered within 15 s: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(body, "ok\n");
    println!("peak descriptors of the bridge: {peak_fds}");
    assert!(
        peak_fds < FD_BUDGET,
        "the bridge held {peak_fds} descriptors (limit {FD_LIMIT})"
    );
    drop(idle);

    let (status, log) = bridge.stop();
    assert!(status.success(), "{log}");
    let accept_failures = log.matches("accept failed").count();
    assert!(
        accept_failures <= 2,
        "{accept_failures} accept failures logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_bounded_in_time_and_head_size() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut env = remote_ends(&Opts::default()).await;
    let config = load_config(&env);
    let bridge = smtp_oauth_bridge::bridge::Bridge::start_with_admin(
        &config,
        bind().await,
        Some(bind().await),
    )
    .await
    .unwrap();
    env.addr = bridge.local_addr;
    let admin = bridge.admin_addr.unwrap();
    let closed_within = |mut s: tokio::net::TcpStream, limit: Duration| async move {
        let started = Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout(limit, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => {}
                Err(_) => panic!("still open after {limit:?}"),
            }
        }
    };
    // Silent: closed after the 5 s header timeout.
    let silent = tokio::net::TcpStream::connect(admin).await.unwrap();
    // Trickling a head a byte a second: closed at the same deadline, not kept alive by it.
    let mut trickle = tokio::net::TcpStream::connect(admin).await.unwrap();
    let trickling = tokio::spawn(async move {
        let started = Instant::now();
        for b in b"GET /healthz HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
            if trickle.write_all(&[*b]).await.is_err() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        None
    });
    let took = closed_within(silent, Duration::from_secs(8)).await;
    assert!(took >= Duration::from_secs(4), "closed after {took:?}");
    // An idle keep-alive connection after one answer: closed too.
    let mut kept = tokio::net::TcpStream::connect(admin).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 17];
    kept.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 OK\r\n");
    closed_within(kept, Duration::from_secs(8)).await;
    let cut_off = tokio::time::timeout(Duration::from_secs(10), trickling)
        .await
        .expect("the trickling client is still connected")
        .unwrap();
    assert!(
        cut_off.is_some_and(|t| t < Duration::from_secs(10)),
        "{cut_off:?}"
    );
    // A head larger than the buffer: refused (431) and closed, not buffered.
    let mut big = tokio::net::TcpStream::connect(admin).await.unwrap();
    let mut req = b"GET /healthz HTTP/1.1\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 200 * 1024));
    let _ = big.write_all(&req).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), big.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431 "),
        "{:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(60)])
    );
}
