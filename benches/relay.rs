//! Side-by-side benchmark: an OAuth-capable application talking to the upstream directly
//! (a new connection, STARTTLS and AUTH XOAUTH2 per message) versus a legacy application
//! talking to the bridge (a new local connection with AUTH PLAIN per message), in one run,
//! against testkit's upstream and token endpoint on loopback. The bridge is the real release
//! binary in its own process, so its peak RSS is its own.
//!
//! cargo bench --bench relay -- --concurrency 50 --messages 2000 --size 10240
//!
//! Options: --concurrency N (1), --messages N (2000), --size BYTES (10240), --rcpts N (1),
//! --upstream-delay-ms N (0, per upstream reply), --upstream-rtt-ms N (0: a delay proxy in front
//! of the upstream adds N/2 ms each way for both paths), --sessions N (bridge's
//! max_sessions_per_mailbox, 3).

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParametersBuilder};
use lettre::transport::smtp::extension::ClientId;
use smtp_oauth_bridge::secret::Secret;
use smtp_oauth_bridge::smtp::auth::hash_password;
use std::io::BufRead;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::{FakeTokenEndpoint, FakeUpstream, FakeUpstreamOptions, TestCa, TokenOptions};

const MAILBOX: &str = "bench@contoso.com";
const PASSWORD: &str = "bench-password";

struct Args {
    concurrency: usize,
    messages: usize,
    size: usize,
    rcpts: usize,
    delay_ms: u64,
    /// Round-trip time added between every client of the upstream and the upstream.
    rtt_ms: u64,
    sessions: usize,
}

fn args() -> Args {
    let mut a = Args {
        concurrency: 1,
        messages: 2000,
        size: 10 * 1024,
        rcpts: 1,
        delay_ms: 0,
        rtt_ms: 0,
        sessions: 3,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let next = || v.get(i + 1).and_then(|s| s.parse::<u64>().ok());
        match v[i].as_str() {
            "--concurrency" => a.concurrency = next().unwrap_or(1) as usize,
            "--messages" => a.messages = next().unwrap_or(2000) as usize,
            "--size" => a.size = next().unwrap_or(10240) as usize,
            "--rcpts" => a.rcpts = next().unwrap_or(1) as usize,
            "--upstream-delay-ms" => a.delay_ms = next().unwrap_or(0),
            "--upstream-rtt-ms" => a.rtt_ms = next().unwrap_or(0),
            "--sessions" => a.sessions = next().unwrap_or(3) as usize,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn message(size: usize, n: usize) -> Vec<u8> {
    let mut m = format!(
        "From: {MAILBOX}\r\nTo: someone@fabrikam.com\r\nMessage-ID: <bench-{n}@contoso.com>\r\nSubject: bench {n}\r\n\r\n"
    )
    .into_bytes();
    let line =
        b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstuvwxyz\r\n";
    while m.len() + line.len() <= size {
        m.extend_from_slice(line);
    }
    while m.len() < size.saturating_sub(2) {
        m.push(b'x');
    }
    m.extend_from_slice(b"\r\n");
    m
}

struct Stats {
    wall: Duration,
    latencies: Vec<Duration>,
    failures: usize,
}

impl Stats {
    fn pct(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        if l.is_empty() {
            return Duration::ZERO;
        }
        l[((l.len() as f64 - 1.0) * p).round() as usize]
    }
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }
}

async fn run<F, Fut>(a: &Args, one: F) -> Stats
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let one = Arc::new(one);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let next = next.clone();
        let one = one.clone();
        let total = a.messages;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut failures = 0;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return (lat, failures);
                }
                let t = Instant::now();
                match one(n).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        if failures == 0 {
                            eprintln!("bench: message {n} failed: {e}");
                        }
                        failures += 1;
                    }
                }
            }
        }));
    }
    let mut latencies = Vec::new();
    let mut failures = 0;
    for t in tasks {
        let (l, f) = t.await.expect("bench task");
        latencies.extend(l);
        failures += f;
    }
    Stats {
        wall: start.elapsed(),
        latencies,
        failures,
    }
}

fn envelope(rcpts: usize) -> Envelope {
    let to = (0..rcpts)
        .map(|i| format!("rcpt{i}@fabrikam.com").parse().expect("address"))
        .collect();
    Envelope::new(Some(MAILBOX.parse().expect("address")), to).expect("envelope")
}

fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// The remote ends (token endpoint and upstream) in this process, until stdin closes.
async fn remote_ends(dir: &std::path::Path) {
    let ca = TestCa::new();
    ca.write_ca_pem(&dir.join("ca.pem")).expect("ca");
    let tokens = FakeTokenEndpoint::start(
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        TokenOptions::default(),
    )
    .await;
    let (cert, key) = ca.issue_server_cert();
    let mut uo = FakeUpstreamOptions::new(cert, key);
    uo.tokens = Some(tokens.clone());
    uo.delay = Duration::from_millis(
        std::env::var("BENCH_UPSTREAM_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let upstream = FakeUpstream::start(
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        uo,
    )
    .await;
    upstream.set_keep_data(false);
    // Distance: both paths (direct and bridge) reach the upstream through the same delay
    // proxy, N/2 ms each way.
    let rtt_ms: u64 = std::env::var("BENCH_UPSTREAM_RTT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let upstream_addr = if rtt_ms > 0 {
        let proxy = testkit::DelayProxy::start(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
            upstream.addr(),
            Duration::from_micros(rtt_ms * 500),
        )
        .await;
        proxy.addr()
    } else {
        upstream.addr()
    };
    println!(
        "{}",
        serde_json::json!({"upstream": upstream_addr.to_string(), "token_url": tokens.token_url()})
    );
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut sink);
    })
    .await;
}

/// Ends the bridge process we started (SIGTERM by its id), also when the bench panics.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[tokio::main]
async fn main() {
    if let Some(dir) = std::env::args().skip_while(|a| a != "--remote-ends").nth(1) {
        return remote_ends(std::path::Path::new(&dir)).await;
    }
    let a = args();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_path = dir.path().join("ca.pem");
    // Microsoft's side runs in its own process, as it would on its own hosts: neither path
    // shares a scheduler with the upstream.
    let mut remote = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["--remote-ends", dir.path().to_str().expect("path")])
        .env("BENCH_UPSTREAM_DELAY_MS", a.delay_ms.to_string())
        .env("BENCH_UPSTREAM_RTT_MS", a.rtt_ms.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the remote ends");
    let remote_guard = KillOnDrop(remote.id());
    let mut line = String::new();
    std::io::BufReader::new(remote.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("remote ends ready");
    let ends: serde_json::Value = serde_json::from_str(&line).expect("remote ends json");
    let up_addr: SocketAddr = ends["upstream"]
        .as_str()
        .expect("upstream")
        .parse()
        .expect("addr");
    let token_url = ends["token_url"].as_str().expect("token_url").to_string();
    let ca_pem = std::fs::read(&ca_path).expect("ca pem");

    // The bridge, as a user would run it: the release binary with a config file.
    let hash = hash_password(&Secret::new(PASSWORD)).expect("hash");
    let config = format!(
        "[listen]\nsmtp = \"127.0.0.1:0\"\nmax_connections = 5000\n[upstream]\nhost = \"localhost\"\nport = {}\nca_file = \"ca.pem\"\nmax_sessions_per_mailbox = {}\nmessages_per_minute = 0\n[state]\ndir = \"state\"\n[[account]]\nusername = \"bench\"\npassword_hash = \"{hash}\"\nmailbox = \"{MAILBOX}\"\n[account.oauth]\nflow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"{}\"\nclient_secret_env = \"BENCH_SECRET\"\ntoken_url = \"{}\"\n",
        up_addr.port(),
        a.sessions,
        TokenOptions::default().client_id,
        token_url
    );
    std::fs::write(dir.path().join("bridge.toml"), config).expect("config");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))
        .args(["--config", "bridge.toml", "--log-format", "json", "serve"])
        .current_dir(dir.path())
        .env(
            "BENCH_SECRET",
            TokenOptions::default().client_secret.unwrap_or_default(),
        )
        // BENCH_BRIDGE_LOG=warn measures without the relay log line (the listener line stays).
        .env(
            "RUST_LOG",
            std::env::var("BENCH_BRIDGE_LOG")
                .map(|l| format!("{l},smtp_oauth_bridge::bridge=info"))
                .unwrap_or_else(|_| "info".into()),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the bridge binary");
    let stdout = child.stdout.take().expect("stdout");
    let guard = KillOnDrop(child.id());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if let Some(l) = v.get("listen").and_then(|l| l.as_str()) {
                    let _ = tx.send(l.to_string());
                }
            }
        }
    });
    let bridge: SocketAddr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("bridge listening")
        .parse()
        .expect("addr");

    // The direct client's token, fetched once as an OAuth-capable application would cache it.
    let http = reqwest::Client::new();
    let token_body = http
        .post(&token_url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", TokenOptions::default().client_id.as_str()),
            (
                "client_secret",
                TokenOptions::default()
                    .client_secret
                    .unwrap_or_default()
                    .as_str(),
            ),
            ("scope", "https://outlook.office365.com/.default"),
        ])
        .send()
        .await
        .expect("token")
        .text()
        .await
        .expect("token body");
    let token: serde_json::Value = serde_json::from_str(&token_body).expect("token json");
    let token = token["access_token"]
        .as_str()
        .expect("access_token")
        .to_string();
    let tls = TlsParametersBuilder::new("localhost".into())
        .add_root_certificate(Certificate::from_pem(&ca_pem).expect("ca"))
        .build_rustls()
        .expect("tls");
    let size = a.size;
    let rcpts = a.rcpts;
    let hello = ClientId::Domain("bench.client".into());

    // Warm-up of both paths (first token, first sessions), not measured.
    let warm = message(size, 0);
    {
        let mut c = AsyncSmtpConnection::connect_tokio1(bridge, None, &hello, None, None)
            .await
            .expect("warm");
        c.auth(
            &[Mechanism::Plain],
            &Credentials::new("bench".into(), PASSWORD.into()),
        )
        .await
        .expect("warm auth");
        c.send(&envelope(rcpts), &warm[..warm.len() - 2])
            .await
            .expect("warm send");
        let _ = c.quit().await;
    }

    let direct = {
        let (tls, token, hello) = (tls.clone(), token.clone(), hello.clone());
        run(&a, move |n| {
            let (tls, token, hello) = (tls.clone(), token.clone(), hello.clone());
            async move {
                let m = message(size, n);
                let mut c = AsyncSmtpConnection::connect_tokio1(
                    up_addr,
                    Some(Duration::from_secs(30)),
                    &hello,
                    None,
                    None,
                )
                .await
                .map_err(|e| e.to_string())?;
                c.starttls(tls, &hello).await.map_err(|e| e.to_string())?;
                c.auth(
                    &[Mechanism::Xoauth2],
                    &Credentials::new(MAILBOX.into(), token),
                )
                .await
                .map_err(|e| e.to_string())?;
                c.send(&envelope(rcpts), &m[..m.len() - 2])
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = c.quit().await;
                Ok(())
            }
        })
        .await
    };
    let via_bridge = {
        let hello = hello.clone();
        run(&a, move |n| {
            let hello = hello.clone();
            async move {
                let m = message(size, n);
                let mut c = AsyncSmtpConnection::connect_tokio1(
                    bridge,
                    Some(Duration::from_secs(30)),
                    &hello,
                    None,
                    None,
                )
                .await
                .map_err(|e| e.to_string())?;
                c.auth(
                    &[Mechanism::Plain],
                    &Credentials::new("bench".into(), PASSWORD.into()),
                )
                .await
                .map_err(|e| e.to_string())?;
                c.send(&envelope(rcpts), &m[..m.len() - 2])
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = c.quit().await;
                Ok(())
            }
        })
        .await
    };
    let rss = peak_rss(child.id());
    drop(guard);
    let _ = child.wait();
    drop(remote_guard);
    let _ = remote.wait();

    let mb = |s: &Stats| s.latencies.len() as f64 * size as f64 / s.wall.as_secs_f64() / 1e6;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "relay benchmark: concurrency {} messages {} size {} B rcpts {} upstream delay {} ms, upstream RTT {} ms, bridge sessions/mailbox {}",
        a.concurrency, a.messages, a.size, a.rcpts, a.delay_ms, a.rtt_ms, a.sessions
    );
    println!(
        "{:<8} {:>10} {:>8} {:>9} {:>9} {:>9} {:>8}",
        "path", "msgs/s", "MB/s", "p50 ms", "p99 ms", "max ms", "failed"
    );
    for (name, s) in [("direct", &direct), ("bridge", &via_bridge)] {
        println!(
            "{:<8} {:>10.1} {:>8.2} {:>9.2} {:>9.2} {:>9.2} {:>8}",
            name,
            s.rate(),
            mb(s),
            ms(s.pct(0.5)),
            ms(s.pct(0.99)),
            ms(s.pct(1.0)),
            s.failures
        );
    }
    let rate_ratio = via_bridge.rate() / direct.rate();
    let p50_ratio = ms(via_bridge.pct(0.5)) / ms(direct.pct(0.5));
    println!(
        "bridge/direct: msgs/s x{rate_ratio:.2}, p50 x{p50_ratio:.2}; bridge peak RSS {:.1} MiB",
        rss as f64 / 1048576.0
    );
    println!(
        "{}",
        serde_json::json!({
            "concurrency": a.concurrency, "messages": a.messages, "size": a.size, "rcpts": a.rcpts,
            "upstream_delay_ms": a.delay_ms, "upstream_rtt_ms": a.rtt_ms, "sessions_per_mailbox": a.sessions,
            "direct": {"msgs_per_s": direct.rate(), "mb_per_s": mb(&direct), "p50_ms": ms(direct.pct(0.5)), "p99_ms": ms(direct.pct(0.99)), "max_ms": ms(direct.pct(1.0)), "failed": direct.failures},
            "bridge": {"msgs_per_s": via_bridge.rate(), "mb_per_s": mb(&via_bridge), "p50_ms": ms(via_bridge.pct(0.5)), "p99_ms": ms(via_bridge.pct(0.99)), "max_ms": ms(via_bridge.pct(1.0)), "failed": via_bridge.failures},
            "ratio_msgs_per_s": rate_ratio, "ratio_p50": p50_ratio, "bridge_peak_rss_bytes": rss,
        })
    );
    if direct.failures + via_bridge.failures > 0 {
        std::process::exit(1);
    }
}
