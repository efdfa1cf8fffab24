//! `demo`: the real pipeline end to end on loopback, with no config and no network.
//!
//! Starts testkit's token endpoint and STARTTLS + XOAUTH2 upstream (with a throwaway CA),
//! builds a config for them through the normal config loader, starts the bridge on
//! 127.0.0.1:2525 (or a free port if that is taken), sends one sample message with AUTH
//! PLAIN, and prints the relay log line and where the delivered copy is. With `--serve` it
//! keeps running instead, prints the address, user and password to try, and the path of each
//! delivered copy as it arrives, until SIGINT or SIGTERM. `--transport graph` runs the same
//! through testkit's Microsoft Graph endpoint (`upstream.transport = "graph"`); the copies
//! Graph "delivered" are written to the demo directory.

use super::CliError;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
use smtp_oauth_bridge::bridge::Bridge;
use smtp_oauth_bridge::config::Config;
use smtp_oauth_bridge::secret::Secret;
use smtp_oauth_bridge::smtp::auth::hash_password;
use smtp_oauth_bridge::telemetry::LogFormat;
use std::time::Duration;
use testkit::{
    FakeGraph, FakeGraphOptions, FakeTokenEndpoint, FakeUpstream, FakeUpstreamOptions, TestCa,
    TokenOptions,
};
use tokio::net::TcpListener;

const DEMO_USER: &str = "scanner";
const DEMO_MAILBOX: &str = "scanner@contoso.example";
/// The demo's local password: printed on purpose by `demo --serve` (it opens only the demo's
/// embedded, fake upstream).
const DEMO_PASSWORD: &str = "demo-password";

fn rt(what: &str) -> impl Fn(std::io::Error) -> CliError + '_ {
    move |e| CliError::Runtime(format!("{what}: {e}"))
}

/// `demo --transport`: which embedded remote end delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoTransport {
    Smtp,
    Graph,
}

/// One delivered copy: how it went, the mailbox it went as, its bytes, where it was written.
type Delivered = (String, String, Vec<u8>, Option<String>);

/// Where the demo delivered: the SMTP upstream, or Graph (copies written to `dir`).
enum Remote {
    Smtp(FakeUpstream),
    Graph(FakeGraph, std::path::PathBuf),
}

impl Remote {
    /// Waits for `n` deliveries; each as (how it went, the mailbox it went as, the bytes, the
    /// copy's path).
    async fn wait(&self, n: usize, timeout: Duration) -> Vec<Delivered> {
        match self {
            Remote::Smtp(up) => up
                .wait_received(n, timeout)
                .await
                .into_iter()
                .map(|m| {
                    let who = if m.tls {
                        format!("TLS + XOAUTH2 as {}", m.auth_user)
                    } else {
                        "no TLS".into()
                    };
                    (
                        who,
                        m.auth_user,
                        m.data,
                        m.path.map(|p| p.display().to_string()),
                    )
                })
                .collect(),
            Remote::Graph(g, dir) => g
                .wait_sent(n, timeout)
                .await
                .into_iter()
                .enumerate()
                .map(|(i, m)| {
                    let path = dir.join(format!("graph-{}.eml", i + 1));
                    let path = std::fs::write(&path, &m.mime)
                        .ok()
                        .map(|()| path.display().to_string());
                    let who = format!("Microsoft Graph {:?} as {}", m.via, m.mailbox);
                    (who, m.mailbox, m.mime, path)
                })
                .collect(),
        }
    }
}

pub async fn run(format: LogFormat, serve: bool, transport: DemoTransport) -> Result<(), CliError> {
    let dir = std::env::temp_dir().join(format!("smtp-oauth-bridge-demo-{}", std::process::id()));
    let delivered = dir.join("delivered");
    std::fs::create_dir_all(&delivered).map_err(rt("cannot create the demo directory"))?;

    // The remote ends: a token endpoint and a Microsoft-365-like upstream, both on loopback.
    let ca = TestCa::new();
    let ca_path = dir.join("upstream-ca.pem");
    ca.write_ca_pem(&ca_path)
        .map_err(rt("cannot write the demo CA"))?;
    let token_listener = TcpListener::bind("127.0.0.1:0").await.map_err(rt("bind"))?;
    let tokens = FakeTokenEndpoint::start(token_listener, TokenOptions::default()).await;
    let (cert, key) = ca.issue_server_cert();
    let mut opts = FakeUpstreamOptions::new(cert, key);
    opts.tokens = Some(tokens.clone());
    opts.mailbox_ok = Some(vec![DEMO_MAILBOX.to_string()]);
    opts.save_dir = Some(delivered.clone());
    let up_listener = TcpListener::bind("127.0.0.1:0").await.map_err(rt("bind"))?;
    let upstream = FakeUpstream::start(up_listener, opts).await;
    let graph_listener = TcpListener::bind("127.0.0.1:0").await.map_err(rt("bind"))?;
    let remote = match transport {
        DemoTransport::Smtp => Remote::Smtp(upstream.clone()),
        DemoTransport::Graph => {
            let mut opts = FakeGraphOptions::new(Some(tokens.clone()));
            opts.mailboxes = Some(vec![DEMO_MAILBOX.to_string()]);
            let graph = FakeGraph::start(graph_listener, opts).await;
            Remote::Graph(graph, delivered.clone())
        }
    };
    let graph_lines = match &remote {
        Remote::Graph(g, _) => format!("transport = \"graph\"\ngraph_url = \"{}\"\n", g.url()),
        Remote::Smtp(_) => String::new(),
    };

    // A real config, through the real loader.
    let secret_path = dir.join("client-secret");
    write_private(
        &secret_path,
        TokenOptions::default()
            .client_secret
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let password = Secret::new(DEMO_PASSWORD);
    let hash = hash_password(&password).map_err(|e| CliError::Runtime(e.to_string()))?;
    let toml = format!(
        r#"
[listen]
smtp = "127.0.0.1:2525"
[upstream]
host = "localhost"
port = {port}
ca_file = "upstream-ca.pem"
timeout_secs = 10
{graph_lines}[state]
dir = "state"
[[account]]
username = "{DEMO_USER}"
password_hash = "{hash}"
mailbox = "{DEMO_MAILBOX}"
[account.oauth]
flow = "client_credentials"
tenant = "contoso.example"
client_id = "{client_id}"
client_secret_file = "client-secret"
token_url = "{token_url}"
"#,
        port = upstream.addr().port(),
        client_id = TokenOptions::default().client_id,
        token_url = tokens.token_url(),
    );
    let config_path = dir.join("bridge.toml");
    std::fs::write(&config_path, &toml).map_err(rt("cannot write the demo config"))?;
    let config = Config::load_file(&config_path)?;

    let first = config.listen.smtp.first().copied();
    let listener = match TcpListener::bind(first.unwrap_or(([127, 0, 0, 1], 2525).into())).await {
        Ok(l) => l,
        Err(e) => {
            println!("127.0.0.1:2525 is busy ({e}); the demo uses a free port instead");
            TcpListener::bind("127.0.0.1:0").await.map_err(rt("bind"))?
        }
    };
    let bridge = Bridge::start(&config, listener)
        .await
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    let addr = bridge.local_addr;
    if serve {
        return serve_until_signal(bridge, &remote, addr, &config_path, format).await;
    }

    // The legacy application: plain SMTP with AUTH PLAIN to the bridge.
    let message = format!(
        "From: Scanner <{DEMO_MAILBOX}>\r\nTo: Someone <someone@fabrikam.example>\r\nSubject: Scan from the 3rd floor\r\nMessage-ID: <demo-{pid}@contoso.example>\r\n\r\nYour scan is attached (not really: this is the smtp-oauth-bridge demo).\r\n.leading dot line survives\r\n",
        pid = std::process::id()
    );
    // lettre's client appends CRLF.CRLF to what it is given, so it gets the message
    // without its final CRLF (the bridge itself keeps every byte: see relay::upstream).
    let wire = message.strip_suffix("\r\n").unwrap_or(&message);
    let result = send(addr, &password, wire.as_bytes()).await;
    let received = remote.wait(1, Duration::from_secs(10)).await;
    bridge.shutdown();
    bridge.wait().await;
    let reply = result?;

    let Some((who, _, data, path)) = received.first() else {
        return Err(CliError::Runtime("the upstream received nothing".into()));
    };
    if let Remote::Smtp(up) = &remote {
        let ok = up
            .received()
            .first()
            .is_some_and(|m| m.tls && m.auth_user == DEMO_MAILBOX);
        if !ok {
            return Err(CliError::Runtime(
                "the upstream did not receive the message over TLS with XOAUTH2".into(),
            ));
        }
    }
    if data != message.as_bytes() {
        return Err(CliError::Runtime(
            "the delivered copy differs from what was sent".into(),
        ));
    }
    if format == LogFormat::Pretty {
        println!();
        println!("demo: the application got: {reply}");
        println!(
            "demo: delivered through {who} with a token from {}",
            tokens.token_url()
        );
        match path {
            Some(p) => println!("demo: delivered copy (byte-identical): {p}"),
            None => println!("demo: delivered copy kept in memory"),
        }
        println!("demo: config used: {}", config_path.display());
    } else {
        println!(
            "{}",
            serde_json::json!({"demo": "ok", "reply": reply, "delivered_copy": path, "via": who, "config": config_path.display().to_string()})
        );
    }
    Ok(())
}

/// `demo --serve`: the pipeline stays up; each delivered copy is announced as it arrives.
async fn serve_until_signal(
    bridge: Bridge,
    remote: &Remote,
    addr: std::net::SocketAddr,
    config_path: &std::path::Path,
    format: LogFormat,
) -> Result<(), CliError> {
    let password = DEMO_PASSWORD;
    if format == LogFormat::Pretty {
        println!("demo: the bridge is listening on {addr} (plain SMTP, AUTH PLAIN or LOGIN)");
        println!("demo:   user {DEMO_USER}, password {password}, sender {DEMO_MAILBOX}");
        println!(
            "demo:   try: swaks --server {} --port {} --auth PLAIN --auth-user {DEMO_USER} --auth-password {password} --from {DEMO_MAILBOX} --to someone@fabrikam.example",
            addr.ip(),
            addr.port()
        );
        println!("demo: config used: {}", config_path.display());
        println!("demo: press Ctrl-C to stop");
    } else {
        println!(
            "{}",
            serde_json::json!({"demo": "serving", "address": addr.to_string(), "user": DEMO_USER, "password": password, "from": DEMO_MAILBOX, "config": config_path.display().to_string()})
        );
    }
    let mut seen = 0;
    let signal = super::serve::wait_for_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => break,
            received = remote.wait(seen + 1, Duration::from_secs(3600)) => {
                for (who, user, _, path) in received.iter().skip(seen) {
                    if format == LogFormat::Pretty {
                        println!(
                            "demo: delivered ({who}): {}",
                            path.as_deref().unwrap_or("kept in memory")
                        );
                    } else {
                        println!("{}", serde_json::json!({"demo": "delivered", "via": who, "auth_user": user, "delivered_copy": path}));
                    }
                }
                seen = seen.max(received.len());
            }
        }
    }
    bridge.shutdown();
    bridge.wait().await;
    if format == LogFormat::Pretty {
        println!("demo: stopped");
    }
    Ok(())
}

async fn send(
    addr: std::net::SocketAddr,
    password: &Secret,
    message: &[u8],
) -> Result<String, CliError> {
    let fail = |e: lettre::transport::smtp::Error| {
        CliError::Runtime(format!("sending the sample message failed: {e}"))
    };
    let mut c = AsyncSmtpConnection::connect_tokio1(
        addr,
        Some(Duration::from_secs(10)),
        &ClientId::Domain("demo-app".into()),
        None,
        None,
    )
    .await
    .map_err(fail)?;
    let creds = Credentials::new(DEMO_USER.to_string(), password.expose().to_string());
    c.auth(&[Mechanism::Plain], &creds).await.map_err(fail)?;
    let envelope = lettre::address::Envelope::new(
        Some(
            DEMO_MAILBOX
                .parse()
                .map_err(|e| CliError::Runtime(format!("{e}")))?,
        ),
        vec!["someone@fabrikam.example"
            .parse()
            .map_err(|e| CliError::Runtime(format!("{e}")))?],
    )
    .map_err(|e| CliError::Runtime(format!("{e}")))?;
    let r = c.send(&envelope, message).await.map_err(fail)?;
    let _ = c.quit().await;
    Ok(format!(
        "{} {}",
        r.code(),
        r.message().collect::<Vec<_>>().join(" ")
    ))
}

fn write_private(path: &std::path::Path, body: &[u8]) -> Result<(), CliError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(path)
        .and_then(|mut f| f.write_all(body))
        .map_err(rt("cannot write the demo client secret"))
}
