//! Side-by-side benchmark: an OAuth-capable application talking to the upstream directly
//! (STARTTLS and AUTH XOAUTH2) versus a legacy application talking to the bridge (AUTH PLAIN),
//! in one run, against testkit's upstream and token endpoint on loopback. The bridge is the
//! real release binary in its own process, so its peak RSS and CPU time are its own; the
//! remote ends run in a process of their own too, as Microsoft's would.
//!
//! cargo bench --bench relay -- --concurrency 50 --messages 2000 --size 10240
//! cargo bench --bench relay -- --suite --idle-secs 2
//!
//! Options: --concurrency N (1), --messages N (2000), --size BYTES (10240), --rcpts N (1),
//! --upstream-delay-ms N (0, per upstream reply), --upstream-rtt-ms N (0: a delay proxy in front
//! of the upstream adds N/2 ms each way for both paths), --sessions N (bridge's
//! max_sessions_per_mailbox, 3), --reuse (each client keeps one connection for all its
//! messages: direct keeps its authenticated upstream connection, the legacy client its local
//! one; connecting is not timed), --idle-secs N (instead: "first message after idle" — the
//! bridge runs with upstream.warm_sessions = W and idle_secs = N, and --messages (default 5)
//! messages go N + 1 s apart, each on a new connection as a cron job would send them),
//! --warm-sessions W (1; 0 leaves the key out: the bridge without warm sessions).
//!
//! --suite runs issue 14's table at RTT 0 and 20 ms (each case with a fresh bridge, message
//! counts kept small so it takes a few minutes) and prints one markdown table per RTT: fresh
//! connection C=1 p50, one reused connection C=1 msgs/s, 10 clients fresh (bridge limited to 3
//! sessions) msgs/s, first message after idle (only with --idle-secs N), and 20 MiB MB/s with
//! the bridge's peak RSS. Every case also reports CPU time per message: the bridge process's
//! utime + stime (/proc/<pid>/stat, before and after, 10 ms ticks) and the direct client's
//! (this process while only the direct clients run).
//!
//! Every client sets TCP_NODELAY (lettre leaves Nagle on): otherwise the final `.` (a write of
//! its own after the content) waits for the server's delayed ACK (40 ms on Linux) on both paths
//! alike, and that wait would be all either path measured. testkit's upstream sets it too, as a
//! production MTA's reply path behaves.

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, Certificate, TlsParameters, TlsParametersBuilder,
};
use lettre::transport::smtp::extension::ClientId;
use smtp_oauth_bridge::secret::Secret;
use smtp_oauth_bridge::smtp::auth::hash_password;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::{FakeTokenEndpoint, FakeUpstream, FakeUpstreamOptions, TestCa, TokenOptions};

const MAILBOX: &str = "bench@contoso.com";
const PASSWORD: &str = "bench-password";
/// Clock ticks per second of /proc/<pid>/stat's utime and stime (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;
/// How long a client waits for its TCP connection.
const CONNECT: Duration = Duration::from_secs(60);
/// How long a bridge may take to say where it listens.
const BRIDGE_START: Duration = Duration::from_secs(30);

struct Args {
    concurrency: usize,
    messages: Option<usize>,
    size: usize,
    rcpts: usize,
    delay_ms: u64,
    /// Round-trip time added between every client of the upstream and the upstream.
    rtt_ms: u64,
    sessions: usize,
    reuse: bool,
    idle_secs: Option<u64>,
    /// `upstream.warm_sessions` of the bridge in the idle case (0: key left out).
    warm: u64,
    suite: bool,
}

fn args() -> Args {
    let mut a = Args {
        concurrency: 1,
        messages: None,
        size: 10 * 1024,
        rcpts: 1,
        delay_ms: 0,
        rtt_ms: 0,
        sessions: 3,
        reuse: false,
        idle_secs: None,
        warm: 1,
        suite: false,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let next = || v.get(i + 1).and_then(|s| s.parse::<u64>().ok());
        match v[i].as_str() {
            "--concurrency" => a.concurrency = next().unwrap_or(1) as usize,
            "--messages" => a.messages = next().map(|n| n as usize),
            "--size" => a.size = next().unwrap_or(10240) as usize,
            "--rcpts" => a.rcpts = next().unwrap_or(1) as usize,
            "--upstream-delay-ms" => a.delay_ms = next().unwrap_or(0),
            "--upstream-rtt-ms" => a.rtt_ms = next().unwrap_or(0),
            "--sessions" => a.sessions = next().unwrap_or(3) as usize,
            "--idle-secs" => a.idle_secs = next(),
            "--warm-sessions" => a.warm = next().unwrap_or(1),
            flag => {
                match flag {
                    "--reuse" => a.reuse = true,
                    "--suite" => a.suite = true,
                    _ => {}
                }
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

/// One path's run: wall time, per-message latencies, failures, and CPU time spent.
struct Stats {
    wall: Duration,
    latencies: Vec<Duration>,
    failures: usize,
    /// CPU time of the process that does this path's work (bridge process, or for direct
    /// this process's own clients).
    cpu: Duration,
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
    fn mb(&self, size: usize) -> f64 {
        self.rate() * size as f64 / 1e6
    }
    fn cpu_ms_per_msg(&self) -> f64 {
        ms(self.cpu) / self.latencies.len().max(1) as f64
    }
    fn json(&self, size: usize) -> serde_json::Value {
        serde_json::json!({
            "msgs_per_s": self.rate(), "mb_per_s": self.mb(size), "p50_ms": ms(self.pct(0.5)),
            "p99_ms": ms(self.pct(0.99)), "max_ms": ms(self.pct(1.0)), "failed": self.failures,
            "cpu_ms_per_msg": self.cpu_ms_per_msg(),
            "latencies_ms": if self.latencies.len() <= 10 {
                serde_json::json!(self.latencies.iter().map(|d| ms(*d)).collect::<Vec<_>>())
            } else {
                serde_json::Value::Null
            },
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
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

/// utime + stime of a process so far (all its threads, live and ended).
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / TICKS_PER_SEC)
}

/// The remote ends (token endpoint and upstream) in this process, until stdin closes.
async fn remote_ends(dir: &Path) {
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

/// Ends a process we started (SIGTERM by its id), also when the bench panics.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The remote ends' process and where to reach them.
struct Remote {
    child: std::process::Child,
    guard: Option<KillOnDrop>,
    upstream: SocketAddr,
    token_url: String,
    ca_pem: Vec<u8>,
}

impl Remote {
    fn start(dir: &Path, delay_ms: u64, rtt_ms: u64) -> Remote {
        let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args(["--remote-ends", dir.to_str().expect("path")])
            .env("BENCH_UPSTREAM_DELAY_MS", delay_ms.to_string())
            .env("BENCH_UPSTREAM_RTT_MS", rtt_ms.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the remote ends");
        let guard = Some(KillOnDrop(child.id()));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("remote ends ready");
        let ends: serde_json::Value = serde_json::from_str(&line).expect("remote ends json");
        Remote {
            upstream: ends["upstream"]
                .as_str()
                .expect("upstream")
                .parse()
                .expect("addr"),
            token_url: ends["token_url"].as_str().expect("token_url").to_string(),
            ca_pem: std::fs::read(dir.join("ca.pem")).expect("ca pem"),
            child,
            guard,
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.guard.take();
        let _ = self.child.wait();
    }
}

/// A bridge process (the release binary with its own config file and state directory).
struct Bridge {
    child: std::process::Child,
    guard: Option<KillOnDrop>,
    addr: SocketAddr,
}

impl Bridge {
    /// Starts a bridge in `dir/name` with `upstream` TOML lines added to its `[upstream]`;
    /// Err with its error output if it does not start listening.
    fn start(
        dir: &Path,
        name: &str,
        remote: &Remote,
        sessions: usize,
        upstream: &str,
    ) -> Result<Bridge, String> {
        let home: PathBuf = dir.join(name);
        std::fs::create_dir_all(&home).expect("bridge dir");
        std::fs::write(home.join("ca.pem"), &remote.ca_pem).expect("ca");
        let hash = hash_password(&Secret::new(PASSWORD)).expect("hash");
        let config = format!(
            "[listen]\nsmtp = \"127.0.0.1:0\"\nmax_connections = 5000\n[upstream]\nhost = \"localhost\"\nport = {}\nca_file = \"ca.pem\"\nmax_sessions_per_mailbox = {}\nmessages_per_minute = 0\n{upstream}[state]\ndir = \"state\"\n[[account]]\nusername = \"bench\"\npassword_hash = \"{hash}\"\nmailbox = \"{MAILBOX}\"\n[account.oauth]\nflow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"{}\"\nclient_secret_env = \"BENCH_SECRET\"\ntoken_url = \"{}\"\n",
            remote.upstream.port(),
            sessions,
            TokenOptions::default().client_id,
            remote.token_url
        );
        std::fs::write(home.join("bridge.toml"), config).expect("config");
        let stderr_path = home.join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))
            .args(["--config", "bridge.toml", "--log-format", "json", "serve"])
            .current_dir(&home)
            .env(
                "BENCH_SECRET",
                TokenOptions::default().client_secret.unwrap_or_default(),
            )
            // BENCH_BRIDGE_LOG=warn measures without the relay log line (the listener line
            // stays).
            .env(
                "RUST_LOG",
                std::env::var("BENCH_BRIDGE_LOG")
                    .map(|l| format!("{l},smtp_oauth_bridge::bridge=info"))
                    .unwrap_or_else(|_| "info".into()),
            )
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start the bridge binary");
        let stdout = child.stdout.take().expect("stdout");
        let guard = Some(KillOnDrop(child.id()));
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
        let mut bridge = Bridge {
            child,
            guard,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        // Disconnected: stdout closed, the bridge exited (e.g. a config key it refuses).
        match rx.recv_timeout(BRIDGE_START) {
            Ok(l) => {
                bridge.addr = l.parse().expect("addr");
                Ok(bridge)
            }
            Err(_) => {
                drop(bridge);
                let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                let why = err
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("no output");
                Err(format!("the bridge did not start: {why}"))
            }
        }
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn peak_rss(&self) -> u64 {
        peak_rss(self.child.id())
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.guard.take();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Route {
    Direct,
    Bridge,
}

/// What both kinds of client need: where to connect and how to authenticate.
struct Clients {
    upstream: SocketAddr,
    bridge: SocketAddr,
    tls: TlsParameters,
    token: String,
    hello: ClientId,
    size: usize,
    rcpts: usize,
}

impl Clients {
    /// A new authenticated connection: to the upstream with STARTTLS + XOAUTH2, or to the
    /// bridge with AUTH PLAIN.
    async fn connect(&self, path: Route) -> Result<AsyncSmtpConnection, String> {
        let e = |e: lettre::transport::smtp::Error| e.to_string();
        let addr = match path {
            Route::Direct => self.upstream,
            Route::Bridge => self.bridge,
        };
        let tcp = tokio::time::timeout(CONNECT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connecting to {addr} timed out"))?
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut c = AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello)
            .await
            .map_err(e)?;
        match path {
            Route::Direct => {
                c.starttls(self.tls.clone(), &self.hello).await.map_err(e)?;
                c.auth(
                    &[Mechanism::Xoauth2],
                    &Credentials::new(MAILBOX.into(), self.token.clone()),
                )
                .await
                .map_err(e)?;
            }
            Route::Bridge => {
                c.auth(
                    &[Mechanism::Plain],
                    &Credentials::new("bench".into(), PASSWORD.into()),
                )
                .await
                .map_err(e)?;
            }
        }
        Ok(c)
    }

    async fn send(&self, c: &mut AsyncSmtpConnection, n: usize) -> Result<(), String> {
        let m = message(self.size, n);
        c.send(&envelope(self.rcpts), &m[..m.len() - 2])
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// One message on a new connection, QUIT after.
    async fn send_fresh(&self, path: Route, n: usize) -> Result<(), String> {
        let mut c = self.connect(path).await?;
        self.send(&mut c, n).await?;
        let _ = c.quit().await;
        Ok(())
    }
}

/// `messages` messages by `concurrency` clients on one path; with `reuse`, each client
/// connects once (not timed) and sends all its messages on that connection. `cpu_of`: the
/// process whose CPU time is this path's.
async fn run(
    c: &Arc<Clients>,
    path: Route,
    concurrency: usize,
    messages: usize,
    reuse: bool,
    cpu_of: &str,
) -> Stats {
    let next = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(tokio::sync::Barrier::new(concurrency + 1));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, ready, c) = (next.clone(), ready.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = None;
            if reuse {
                match c.connect(path).await {
                    Ok(k) => conn = Some(k),
                    Err(e) => eprintln!("bench: connecting failed: {e}"),
                }
            }
            ready.wait().await;
            let (mut lat, mut failures) = (Vec::new(), 0);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= messages {
                    break;
                }
                let t = Instant::now();
                let r = if reuse {
                    let k = match conn.take() {
                        Some(k) => Ok(k),
                        None => c.connect(path).await,
                    };
                    match k {
                        Ok(mut k) => {
                            let r = c.send(&mut k, n).await;
                            if r.is_ok() {
                                conn = Some(k);
                            }
                            r
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    c.send_fresh(path, n).await
                };
                match r {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        if failures == 0 {
                            eprintln!("bench: message {n} failed: {e}");
                        }
                        failures += 1;
                    }
                }
            }
            if let Some(mut k) = conn {
                let _ = k.quit().await;
            }
            (lat, failures)
        }));
    }
    ready.wait().await;
    let (start, cpu0) = (Instant::now(), cpu_time(cpu_of));
    let mut latencies = Vec::new();
    let mut failures = 0;
    for t in tasks {
        let (l, f) = t.await.expect("bench task");
        latencies.extend(l);
        failures += f;
    }
    Stats {
        wall: start.elapsed(),
        cpu: cpu_time(cpu_of).saturating_sub(cpu0),
        latencies,
        failures,
    }
}

/// "First message after idle": `messages` messages, `gap` apart, each on a new connection;
/// direct and bridge take turns after each pause.
async fn run_idle(
    c: &Arc<Clients>,
    bridge_pid: &str,
    messages: usize,
    gap: Duration,
) -> (Stats, Stats) {
    let mut direct = Stats {
        wall: Duration::ZERO,
        latencies: Vec::new(),
        failures: 0,
        cpu: Duration::ZERO,
    };
    let mut bridge = Stats {
        wall: Duration::ZERO,
        latencies: Vec::new(),
        failures: 0,
        cpu: Duration::ZERO,
    };
    for n in 0..messages {
        tokio::time::sleep(gap).await;
        for (path, s, pid) in [
            (Route::Direct, &mut direct, "self".to_string()),
            (Route::Bridge, &mut bridge, bridge_pid.to_string()),
        ] {
            let (t, cpu0) = (Instant::now(), cpu_time(&pid));
            match c.send_fresh(path, n).await {
                Ok(()) => s.latencies.push(t.elapsed()),
                Err(e) => {
                    eprintln!("bench: message {n} failed: {e}");
                    s.failures += 1;
                }
            }
            s.wall += t.elapsed();
            s.cpu += cpu_time(&pid).saturating_sub(cpu0);
        }
    }
    (direct, bridge)
}

/// The direct client's token, fetched once as an OAuth-capable application would cache it.
async fn token(token_url: &str) -> String {
    let http = reqwest::Client::new();
    let body = http
        .post(token_url)
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
    let token: serde_json::Value = serde_json::from_str(&body).expect("token json");
    token["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

async fn clients(remote: &Remote, size: usize, rcpts: usize) -> Clients {
    Clients {
        upstream: remote.upstream,
        bridge: SocketAddr::from(([127, 0, 0, 1], 0)),
        tls: TlsParametersBuilder::new("localhost".into())
            .add_root_certificate(Certificate::from_pem(&remote.ca_pem).expect("ca"))
            .build_rustls()
            .expect("tls"),
        token: token(&remote.token_url).await,
        hello: ClientId::Domain("bench.client".into()),
        size,
        rcpts,
    }
}

/// One case of the table: what it measures and how much.
#[derive(Clone, Copy)]
enum Kind {
    /// A new connection per message: p50 latency.
    Fresh,
    /// One connection per client, reused: msgs/s.
    Reused,
    /// New connections, several clients: msgs/s.
    Clients,
    /// First message after an idle period: p50 latency.
    Idle,
    /// Large messages: MB/s.
    Large,
}

struct Case {
    kind: Kind,
    label: String,
    concurrency: usize,
    messages: usize,
    size: usize,
    reuse: bool,
}

/// A case's outcome for the table.
struct Row {
    label: String,
    kind: Kind,
    size: usize,
    result: Result<(Stats, Stats, u64), String>,
}

impl Row {
    fn markdown(&self) -> String {
        let (direct, bridge, rss) = match &self.result {
            Ok(r) => r,
            Err(e) => return format!("| {} | | | | | {e} |", self.label),
        };
        let failed = |s: &Stats| {
            if s.failures > 0 {
                format!(" ({} failed)", s.failures)
            } else {
                String::new()
            }
        };
        let (d, b, ratio) = match self.kind {
            Kind::Fresh | Kind::Idle => (
                format!("{:.1} ms", ms(direct.pct(0.5))),
                format!("{:.1} ms", ms(bridge.pct(0.5))),
                ms(bridge.pct(0.5)) / ms(direct.pct(0.5)),
            ),
            Kind::Reused | Kind::Clients => (
                format!("{:.1} msg/s", direct.rate()),
                format!("{:.1} msg/s", bridge.rate()),
                bridge.rate() / direct.rate(),
            ),
            Kind::Large => (
                format!("{:.1} MB/s", direct.mb(self.size)),
                format!("{:.1} MB/s", bridge.mb(self.size)),
                bridge.mb(self.size) / direct.mb(self.size),
            ),
        };
        format!(
            "| {} | {d}{} | {b}{} | {ratio:.2}x | {:.2} / {:.2} | {:.1} MiB |",
            self.label,
            failed(direct),
            failed(bridge),
            direct.cpu_ms_per_msg(),
            bridge.cpu_ms_per_msg(),
            *rss as f64 / 1048576.0
        )
    }

    fn json(&self) -> serde_json::Value {
        match &self.result {
            Ok((d, b, rss)) => serde_json::json!({
                "case": self.label, "direct": d.json(self.size), "bridge": b.json(self.size),
                "bridge_peak_rss_bytes": rss,
            }),
            Err(e) => serde_json::json!({"case": self.label, "error": e}),
        }
    }
}

/// Runs one case against a fresh bridge (its warm-up message not measured): direct first,
/// then the bridge.
async fn run_case(
    dir: &Path,
    remote: &Remote,
    base: &Clients,
    case: &Case,
    sessions: usize,
    idle: Option<(u64, u64)>,
) -> Row {
    let name = format!("bridge-{}", dir.read_dir().map_or(0, |d| d.count()));
    // The idle case: (idle_secs, warm_sessions).
    let upstream = match idle {
        Some((s, 0)) => format!("idle_secs = {s}\n"),
        Some((s, w)) => format!("warm_sessions = {w}\nidle_secs = {s}\n"),
        None => String::new(),
    };
    let result = match Bridge::start(dir, &name, remote, sessions, &upstream) {
        Err(e) => Err(e),
        Ok(bridge) => {
            let c = Arc::new(Clients {
                upstream: base.upstream,
                bridge: bridge.addr,
                tls: base.tls.clone(),
                token: base.token.clone(),
                hello: base.hello.clone(),
                size: case.size,
                rcpts: base.rcpts,
            });
            // Warm-up of both paths (first token, first sessions), not measured.
            let warm = async {
                c.send_fresh(Route::Bridge, 0).await?;
                c.send_fresh(Route::Direct, 0).await
            };
            match warm.await {
                Err(e) => Err(format!("warm-up failed: {e}")),
                Ok(()) => {
                    let (direct, via_bridge) = match case.kind {
                        Kind::Idle => {
                            let gap = Duration::from_secs(idle.map_or(0, |(s, _)| s) + 1);
                            run_idle(&c, &bridge.pid(), case.messages, gap).await
                        }
                        _ => {
                            let d = run(
                                &c,
                                Route::Direct,
                                case.concurrency,
                                case.messages,
                                case.reuse,
                                "self",
                            )
                            .await;
                            let b = run(
                                &c,
                                Route::Bridge,
                                case.concurrency,
                                case.messages,
                                case.reuse,
                                &bridge.pid(),
                            )
                            .await;
                            (d, b)
                        }
                    };
                    let rss = bridge.peak_rss();
                    Ok((direct, via_bridge, rss))
                }
            }
        }
    };
    Row {
        label: case.label.clone(),
        kind: case.kind,
        size: case.size,
        result,
    }
}

/// Issue 14's table for one RTT; message counts scaled to the distance so that the whole
/// suite takes a few minutes.
fn suite_cases(rtt_ms: u64, idle_secs: Option<u64>, warm: u64) -> Vec<Case> {
    let far = rtt_ms > 0;
    let k10 = 10 * 1024;
    let mib20 = 20 * 1024 * 1024;
    let pick = |near: usize, distant: usize| if far { distant } else { near };
    let mut cases = vec![
        Case {
            kind: Kind::Fresh,
            label: format!(
                "new connection per message, 1 client, p50 ({} msgs)",
                pick(300, 30)
            ),
            concurrency: 1,
            messages: pick(300, 30),
            size: k10,
            reuse: false,
        },
        Case {
            kind: Kind::Reused,
            label: format!("one connection reused, 1 client ({} msgs)", pick(1000, 60)),
            concurrency: 1,
            messages: pick(1000, 60),
            size: k10,
            reuse: true,
        },
        Case {
            kind: Kind::Clients,
            label: format!(
                "10 clients, fresh (bridge capped at 3 sessions) ({} msgs)",
                pick(2000, 200)
            ),
            concurrency: 10,
            messages: pick(2000, 200),
            size: k10,
            reuse: false,
        },
    ];
    if let Some(s) = idle_secs {
        cases.push(Case {
            kind: Kind::Idle,
            label: format!(
                "first message after {} s idle (idle_secs {s}, warm_sessions {warm}), p50 of 5",
                s + 1
            ),
            concurrency: 1,
            messages: 5,
            size: k10,
            reuse: false,
        });
    }
    cases.push(Case {
        kind: Kind::Large,
        label: "one 20 MiB message, 1 client (3 msgs)".into(),
        concurrency: 1,
        messages: 3,
        size: mib20,
        reuse: false,
    });
    cases
}

async fn suite(a: &Args) {
    let mut all = Vec::new();
    for rtt_ms in [0, 20] {
        let dir = tempfile::tempdir().expect("tempdir");
        let remote = Remote::start(dir.path(), a.delay_ms, rtt_ms);
        let base = clients(&remote, 0, a.rcpts).await;
        let mut rows = Vec::new();
        for case in suite_cases(rtt_ms, a.idle_secs, a.warm) {
            let idle = matches!(case.kind, Kind::Idle)
                .then_some(a.idle_secs.map(|s| (s, a.warm)))
                .flatten();
            eprintln!("bench: RTT {rtt_ms} ms: {}", case.label);
            rows.push(run_case(dir.path(), &remote, &base, &case, a.sessions, idle).await);
        }
        if a.idle_secs.is_none() {
            eprintln!("bench: first message after idle skipped (--idle-secs N runs it; the bridge needs upstream.warm_sessions)");
        }
        all.push((rtt_ms, rows));
    }
    let date = std::process::Command::new("date")
        .arg("+%F")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    for (rtt_ms, rows) in &all {
        println!();
        println!(
            "RTT {rtt_ms} ms{} ({date}; 10 KiB messages unless noted, {} recipient(s); bridge: max_sessions_per_mailbox {}; CPU: direct client / bridge process, ms per message)",
            if *rtt_ms == 0 { " (loopback)" } else { "" },
            a.rcpts,
            a.sessions
        );
        println!();
        println!("| case | direct | bridge | ratio | CPU ms/msg | bridge peak RSS |");
        println!("|---|---:|---:|---:|---:|---:|");
        for r in rows {
            println!("{}", r.markdown());
        }
    }
    println!();
    let json: Vec<serde_json::Value> = all
        .iter()
        .map(|(rtt, rows)| {
            serde_json::json!({"upstream_rtt_ms": rtt, "cases": rows.iter().map(Row::json).collect::<Vec<_>>()})
        })
        .collect();
    println!("{}", serde_json::Value::Array(json));
    let failed = all.iter().flat_map(|(_, r)| r).any(|r| match &r.result {
        Ok((d, b, _)) => d.failures + b.failures > 0,
        Err(_) => a.idle_secs.is_some(),
    });
    if failed {
        std::process::exit(1);
    }
}

/// One run with the given options, printed as before (a table, the ratios, a JSON line).
async fn single(a: &Args) {
    let dir = tempfile::tempdir().expect("tempdir");
    let remote = Remote::start(dir.path(), a.delay_ms, a.rtt_ms);
    let base = clients(&remote, a.size, a.rcpts).await;
    let (kind, messages) = match a.idle_secs {
        Some(_) => (Kind::Idle, a.messages.unwrap_or(5)),
        None if a.reuse => (Kind::Reused, a.messages.unwrap_or(2000)),
        None => (Kind::Fresh, a.messages.unwrap_or(2000)),
    };
    let case = Case {
        kind,
        label: String::new(),
        concurrency: a.concurrency,
        messages,
        size: a.size,
        reuse: a.reuse,
    };
    let idle = a.idle_secs.map(|s| (s, a.warm));
    let row = run_case(dir.path(), &remote, &base, &case, a.sessions, idle).await;
    let (direct, via_bridge, rss) = match &row.result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "relay benchmark: concurrency {} messages {} size {} B rcpts {} upstream delay {} ms, upstream RTT {} ms, bridge sessions/mailbox {}{}{}",
        a.concurrency, messages, a.size, a.rcpts, a.delay_ms, a.rtt_ms, a.sessions,
        if a.reuse { ", one connection per client reused" } else { ", new connection per message" },
        a.idle_secs.map_or(String::new(), |s| format!(", first message after {} s idle (bridge: warm_sessions {}, idle_secs {s})", s + 1, a.warm)),
    );
    println!(
        "{:<8} {:>10} {:>8} {:>9} {:>9} {:>9} {:>8} {:>10}",
        "path", "msgs/s", "MB/s", "p50 ms", "p99 ms", "max ms", "failed", "CPU ms/msg"
    );
    for (name, s) in [("direct", direct), ("bridge", via_bridge)] {
        println!(
            "{:<8} {:>10.1} {:>8.2} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>10.2}",
            name,
            s.rate(),
            s.mb(a.size),
            ms(s.pct(0.5)),
            ms(s.pct(0.99)),
            ms(s.pct(1.0)),
            s.failures,
            s.cpu_ms_per_msg()
        );
    }
    let rate_ratio = via_bridge.rate() / direct.rate();
    let p50_ratio = ms(via_bridge.pct(0.5)) / ms(direct.pct(0.5));
    println!(
        "bridge/direct: msgs/s x{rate_ratio:.2}, p50 x{p50_ratio:.2}; bridge peak RSS {:.1} MiB; CPU per message: direct client {:.2} ms, bridge {:.2} ms",
        *rss as f64 / 1048576.0,
        direct.cpu_ms_per_msg(),
        via_bridge.cpu_ms_per_msg()
    );
    println!(
        "{}",
        serde_json::json!({
            "concurrency": a.concurrency, "messages": messages, "size": a.size, "rcpts": a.rcpts,
            "upstream_delay_ms": a.delay_ms, "upstream_rtt_ms": a.rtt_ms, "sessions_per_mailbox": a.sessions,
            "reuse": a.reuse, "idle_secs": a.idle_secs, "warm_sessions": a.idle_secs.map(|_| a.warm),
            "direct": direct.json(a.size), "bridge": via_bridge.json(a.size),
            "ratio_msgs_per_s": rate_ratio, "ratio_p50": p50_ratio, "bridge_peak_rss_bytes": rss,
        })
    );
    if direct.failures + via_bridge.failures > 0 {
        std::process::exit(1);
    }
}

#[tokio::main]
async fn main() {
    if let Some(dir) = std::env::args().skip_while(|a| a != "--remote-ends").nth(1) {
        return remote_ends(Path::new(&dir)).await;
    }
    let a = args();
    if a.suite {
        suite(&a).await;
    } else {
        single(&a).await;
    }
}
