//! Test harness: testkit's fake token endpoint and upstream on 127.0.0.1:0, a config for
//! them through the real loader, the real bridge (in-process or as the real binary), and a
//! small raw SMTP client that asserts on reply codes.

use smtp_oauth_bridge::bridge::Bridge;
use smtp_oauth_bridge::config::Config;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use testkit::{FakeTokenEndpoint, FakeUpstream, FakeUpstreamOptions, TestCa, TokenOptions};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use tokio::net::{TcpListener, TcpStream};

pub const USER: &str = "scanner";
/// ASCII: Python's smtplib cannot send non-ASCII passwords (UTF-8 ones are tested elsewhere).
pub const PASSWORD: &str = "Loc4l-Passw0rd-7731!x";
pub const MAILBOX: &str = "scanner@contoso.com";
pub const CLIENT_SECRET: &str = "test-secret";
pub const PW_ENV: &str = "BRIDGE_IT_PASSWORD";
pub const SECRET_ENV: &str = "BRIDGE_IT_CLIENT_SECRET";

pub struct Opts {
    pub lifetime: Duration,
    pub listen: String,
    pub upstream: String,
    /// `client_credentials` (default, confidential) or a delegated flow (public client).
    pub flow: &'static str,
    pub state: String,
    /// Appended at the end of the file (e.g. a `[queue]` table).
    pub extra: String,
    /// A delegated account with a client secret (a confidential "web" app registration).
    pub confidential: bool,
    /// The upstream speaks TLS from the first byte (port 465 style); the config says so.
    pub implicit_tls: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            lifetime: Duration::from_secs(3600),
            listen: String::new(),
            upstream: String::new(),
            flow: "client_credentials",
            state: String::new(),
            extra: String::new(),
            confidential: false,
            implicit_tls: false,
        }
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub tokens: FakeTokenEndpoint,
    pub upstream: FakeUpstream,
    pub config_text: String,
    pub config_path: std::path::PathBuf,
    pub bridge: Option<Bridge>,
    pub addr: SocketAddr,
}

pub async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}

/// The remote ends and a config for them; the bridge itself is not started.
impl Env {
    /// An environment whose `bridge.toml` (in `dir`) is `config_text`; no bridge yet.
    pub fn written(
        dir: tempfile::TempDir,
        tokens: FakeTokenEndpoint,
        upstream: FakeUpstream,
        config_text: String,
    ) -> Env {
        let config_path = dir.path().join("bridge.toml");
        std::fs::write(&config_path, &config_text).expect("write config");
        Env {
            dir,
            tokens,
            upstream,
            config_text,
            config_path,
            bridge: None,
            addr: "127.0.0.1:9".parse().expect("addr"),
        }
    }
}

pub async fn remote_ends(opts: &Opts) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new();
    ca.write_ca_pem(&dir.path().join("upstream-ca.pem"))
        .expect("write CA");
    let tokens = FakeTokenEndpoint::start(
        bind().await,
        TokenOptions {
            lifetime: opts.lifetime,
            // Delegated accounts are public clients (no secret), as in a typical app registration.
            client_secret: if opts.flow == "client_credentials" || opts.confidential {
                TokenOptions::default().client_secret
            } else {
                None
            },
            ..TokenOptions::default()
        },
    )
    .await;
    let (cert, key) = ca.issue_server_cert();
    let mut uo = FakeUpstreamOptions::new(cert, key);
    uo.tokens = Some(tokens.clone());
    uo.mailbox_ok = Some(vec![MAILBOX.to_string()]);
    uo.implicit_tls = opts.implicit_tls;
    let upstream = FakeUpstream::start(bind().await, uo).await;
    let config_text = format!(
        r#"
[listen]
smtp = "127.0.0.1:0"
{listen}
[upstream]
host = "localhost"
port = {port}
ca_file = "upstream-ca.pem"
{timeout}
{security}
{upstream_extra}
[state]
dir = "state"
{state_extra}

[[account]]
username = "{USER}"
password_env = "{PW_ENV}"
mailbox = "{MAILBOX}"
allowed_from = ["{MAILBOX}", "rené@contoso.com", "*@fabrikam.com"]

[account.oauth]
flow = "{flow}"
tenant = "contoso.onmicrosoft.com"
client_id = "test-client"
{secret}
token_url = "{token_url}"
authorize_url = "{authorize_url}"
device_authorization_url = "{device_url}"
{extra}
"#,
        listen = opts.listen,
        port = upstream.addr().port(),
        upstream_extra = opts.upstream,
        security = if opts.implicit_tls {
            "security = \"tls\""
        } else {
            ""
        },
        timeout = if opts.upstream.contains("timeout_secs") {
            ""
        } else {
            "timeout_secs = 5"
        },
        token_url = tokens.token_url(),
        authorize_url = tokens.authorize_url(),
        device_url = tokens.device_authorization_url(),
        flow = opts.flow,
        secret = if opts.flow == "client_credentials" || opts.confidential {
            format!("client_secret_env = \"{SECRET_ENV}\"")
        } else {
            String::new()
        },
        state_extra = opts.state,
        extra = opts.extra,
    );
    Env::written(dir, tokens, upstream, config_text)
}

pub fn test_env(name: &str) -> Option<String> {
    match name {
        PW_ENV => Some(PASSWORD.to_string()),
        SECRET_ENV => Some(CLIENT_SECRET.to_string()),
        _ => None,
    }
}

pub fn load_config(env: &Env) -> Config {
    Config::from_toml(&env.config_text, "bridge.toml", env.dir.path(), &test_env)
        .expect("valid test config")
}

/// Remote ends plus the real bridge, in-process, on 127.0.0.1:0.
pub async fn start(opts: Opts) -> Env {
    let mut env = remote_ends(&opts).await;
    let config = load_config(&env);
    let bridge = Bridge::start(&config, bind().await)
        .await
        .expect("bridge starts");
    env.addr = bridge.local_addr;
    env.bridge = Some(bridge);
    env
}

/// A minimal SMTP client for tests: every call asserts on or returns reply codes.
pub struct Smtp<S> {
    r: BufReader<ReadHalf<S>>,
    w: WriteHalf<S>,
}

pub type TcpSmtp = Smtp<TcpStream>;

impl Smtp<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> TcpSmtp {
        let s = TcpStream::connect(addr).await.expect("connect to bridge");
        let mut c = Smtp::over(s);
        let (code, text) = c.reply().await;
        assert_eq!(code, 220, "greeting: {text}");
        c
    }
}

impl<S: AsyncRead + AsyncWrite> Smtp<S> {
    pub fn over(s: S) -> Smtp<S> {
        let (r, w) = tokio::io::split(s);
        Smtp {
            r: BufReader::new(r),
            w,
        }
    }

    /// Reads one (possibly multi-line) reply: code and all text lines joined with '\n'.
    pub async fn reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.r.read_line(&mut line))
                .await
                .expect("reply within 30 s")
                .expect("read reply");
            assert!(
                n > 0,
                "connection closed while waiting for a reply (so far: {text:?})"
            );
            assert!(
                line.ends_with("\r\n"),
                "reply line not CRLF-terminated: {line:?}"
            );
            let code: u16 = line[..3].parse().expect("reply code");
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(line[4..].trim_end());
            if line.as_bytes()[3] == b' ' {
                return (code, text);
            }
        }
    }

    /// Like `reply`, but `None` on EOF, error or malformed input instead of a panic.
    pub async fn try_reply(&mut self) -> Option<u16> {
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.r.read_line(&mut line))
                .await
                .ok()?
                .ok()?;
            if n < 4 {
                return None;
            }
            let code: u16 = line.get(..3)?.parse().ok()?;
            if line.as_bytes()[3] == b' ' {
                return Some(code);
            }
        }
    }

    /// Writes, ignoring errors (the peer may be gone).
    pub async fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.w.write_all(bytes).await.is_ok() && self.w.flush().await.is_ok()
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.expect("write");
        self.w.flush().await.expect("flush");
    }

    pub async fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    pub async fn expect(&mut self, line: &str, code: u16) -> String {
        let (c, t) = self.cmd(line).await;
        assert_eq!(c, code, "{line:?} -> {c} {t}");
        t
    }

    pub async fn ehlo_auth_plain(&mut self, user: &str, password: &str) -> (u16, String) {
        self.expect("EHLO test.client", 250).await;
        let b = base64_plain(user, password);
        self.cmd(&format!("AUTH PLAIN {b}")).await
    }

    pub async fn login(&mut self) {
        let (c, t) = self.ehlo_auth_plain(USER, PASSWORD).await;
        assert_eq!(c, 235, "AUTH: {t}");
    }

    /// MAIL, RCPTs, DATA with dot-stuffing; returns the final reply to DATA, or the first
    /// failing MAIL reply.
    pub async fn send_message(
        &mut self,
        from: &str,
        rcpts: &[&str],
        content: &[u8],
    ) -> (u16, String) {
        let (c, t) = self.cmd(&format!("MAIL FROM:<{from}>")).await;
        if c != 250 {
            return (c, t);
        }
        for r in rcpts {
            let (c, t) = self.cmd(&format!("RCPT TO:<{r}>")).await;
            assert!(c == 250 || c >= 400, "{c} {t}");
        }
        let (c, t) = self.cmd("DATA").await;
        if c != 354 {
            return (c, t);
        }
        self.send(&dot_stuff(content)).await;
        self.send(b".\r\n").await;
        self.reply().await
    }
}

pub fn base64_plain(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

/// Dot-stuffs `content` (which must end with CRLF) for the DATA phase.
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 64);
    let mut at_line_start = true;
    for &b in content {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// A tool's absolute path, or None (and a printed reason) when it is not installed. Under CI
/// (`CI` set), where .ci/run installs every tool the tests use, a missing tool is a failure,
/// not a skip.
pub fn tool(name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is not installed, and .ci/run should have installed it"
        );
        println!("SKIPPED: {name} is not installed (CI installs it; see .ci/run)");
    }
    found
}

/// The bridge binary, started on a config file; reads its JSON log to find the port.
pub struct BridgeProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl BridgeProcess {
    pub fn start(config: &Path, rust_log: &str) -> BridgeProcess {
        let args = [
            "--config",
            config.to_str().expect("utf-8 path"),
            "--log-format",
            "json",
            "serve",
        ];
        Self::spawn(&args, &[("RUST_LOG".into(), rust_log.into())], None)
    }

    /// Runs the binary with `args` and extra environment `envs` (in `cwd` if given).
    pub fn spawn(args: &[&str], envs: &[(String, String)], cwd: Option<&Path>) -> BridgeProcess {
        let bin = Path::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"));
        Self::spawn_bin(bin, args, envs, cwd)
    }

    /// Like [`BridgeProcess::spawn`], for another build of the binary at `bin`.
    pub fn spawn_bin(
        bin: &Path,
        args: &[&str],
        envs: &[(String, String)],
        cwd: Option<&Path>,
    ) -> BridgeProcess {
        use std::io::{BufRead, Read};
        use std::process::{Command, Stdio};
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env(PW_ENV, PASSWORD)
            .env(SECRET_ENV, CLIENT_SECRET);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bridge binary");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let l = log.clone();
        let out_reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if let Some(a) = v.get("listen").and_then(|a| a.as_str()) {
                        let _ = tx.send(a.to_string());
                    }
                }
                let mut g = l.lock().unwrap_or_else(|e| e.into_inner());
                g.push_str(&line);
                g.push('\n');
            }
        });
        let mut stderr = child.stderr.take().expect("stderr");
        let l = log.clone();
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            l.lock().unwrap_or_else(|e| e.into_inner()).push_str(&s);
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "bridge did not report its address; log:\n{}",
                    log.lock().unwrap_or_else(|e| e.into_inner())
                );
            }
        };
        BridgeProcess {
            child,
            addr,
            log,
            readers: vec![out_reader, err_reader],
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Peak resident memory (VmHWM) in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM")
            * 1024
    }

    /// SIGTERM, then wait for the exit status; returns it with everything the process logged.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return (s, self.log());
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("bridge did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Another `[[account]]` for the same mailbox (append it to [`Opts::extra`], before any
/// other table): `username`, the test password, and exactly these `allowed_from` patterns.
pub fn extra_account(username: &str, allowed_from: &[&str], token_url: &str) -> String {
    let allowed: Vec<String> = allowed_from.iter().map(|a| format!("{a:?}")).collect();
    format!(
        "\n[[account]]\nusername = \"{username}\"\npassword_env = \"{PW_ENV}\"\nmailbox = \"{MAILBOX}\"\nallowed_from = [{}]\n\n[account.oauth]\nflow = \"client_credentials\"\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"test-client\"\nclient_secret_env = \"{SECRET_ENV}\"\ntoken_url = \"{token_url}\"\n",
        allowed.join(", ")
    )
}

/// Connects to `addr` from the loopback address `source` (e.g. 127.0.0.2: every 127/8
/// address is local on Linux), so per-address limits see a different client.
pub async fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind the client's source address");
    socket.connect(addr).await.expect("connect to bridge")
}

impl Smtp<TcpStream> {
    /// Like [`Smtp::connect`], from the loopback address `source`.
    pub async fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> TcpSmtp {
        let mut c = Smtp::over(connect_from(source, addr).await);
        let (code, text) = c.reply().await;
        assert_eq!(code, 220, "greeting: {text}");
        c
    }
}

impl<S: AsyncRead + AsyncWrite> Smtp<S> {
    /// One reply within `limit`, or why there was none (timeout, EOF, garbage): never
    /// panics, so a caller can report what a hung or closed connection did.
    pub async fn reply_within(&mut self, limit: Duration) -> Result<(u16, String), String> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout_at(deadline, self.r.read_line(&mut line))
                .await
                .map_err(|_| format!("no reply within {limit:?} (so far: {text:?})"))?
                .map_err(|e| format!("read error: {e}"))?;
            if n == 0 {
                return Err(format!(
                    "connection closed without a reply (so far: {text:?})"
                ));
            }
            let code = line
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|_| line.ends_with("\r\n") && line.len() >= 6)
                .ok_or_else(|| format!("malformed reply line {line:?}"))?;
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(line[4..].trim_end());
            if line.as_bytes()[3] == b' ' {
                return Ok((code, text));
            }
        }
    }
}

/// The command lines the fake upstream received (without their `S<n> ` session prefix).
pub fn upstream_lines(up: &FakeUpstream) -> Vec<String> {
    up.log()
        .into_iter()
        .map(|l| {
            l.split_once(' ')
                .map_or(l.clone(), |(_, rest)| rest.to_string())
        })
        .collect()
}

/// [`remote_ends`], plus one [`extra_account`] per `(username, allowed_from)` in the config
/// (file and text).
pub async fn remote_ends_with_accounts(opts: &Opts, accounts: &[(&str, &[&str])]) -> Env {
    let mut env = remote_ends(opts).await;
    for (user, allowed) in accounts {
        env.config_text
            .push_str(&extra_account(user, allowed, &env.tokens.token_url()));
    }
    std::fs::write(&env.config_path, &env.config_text).expect("write config");
    env
}

/// [`start`] with extra accounts (see [`remote_ends_with_accounts`]).
pub async fn start_with_accounts(opts: Opts, accounts: &[(&str, &[&str])]) -> Env {
    let mut env = remote_ends_with_accounts(&opts, accounts).await;
    let config = load_config(&env);
    let bridge = Bridge::start(&config, bind().await)
        .await
        .expect("bridge starts");
    env.addr = bridge.local_addr;
    env.bridge = Some(bridge);
    env
}
