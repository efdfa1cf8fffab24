//! The binary's commands: demo, configuration errors and exit codes, hash-password.

use crate::harness::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))
}

#[test]
fn demo_exits_0_in_an_empty_directory() {
    demo_delivers(&[], 250);
}

/// `demo --transport graph`: the same pipeline through the embedded Graph endpoint; the relay
/// log's upstream_code is Graph's HTTP status.
#[test]
fn demo_transport_graph_delivers_through_the_embedded_graph_endpoint() {
    demo_delivers(&["--transport", "graph"], 202);
}

/// Runs `demo` with `args` in an empty directory: exit 0, one delivered relay line with
/// `upstream_code`, and the delivered copy holds the demo message unchanged.
fn demo_delivers(args: &[&str], upstream_code: u16) {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .arg("demo")
        .args(args)
        .current_dir(dir.path())
        .env("TMPDIR", dir.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a terminal: JSON lines. One is the relay line, one the demo summary.
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let relay = lines
        .iter()
        .find(|v| v["target"] == "relay")
        .expect("relay log line");
    for field in [
        "id",
        "account",
        "from",
        "rcpts",
        "bytes",
        "outcome",
        "upstream_code",
        "upstream_reply",
        "ms",
    ] {
        assert!(
            relay.get(field).is_some(),
            "relay line lacks {field}: {relay}"
        );
    }
    assert_eq!(relay["outcome"], "delivered");
    assert_eq!(relay["upstream_code"], upstream_code);
    let summary = lines
        .iter()
        .find(|v| v.get("demo").is_some())
        .expect("demo summary");
    let copy = summary["delivered_copy"]
        .as_str()
        .expect("delivered copy path");
    let bytes = std::fs::read(copy).expect("delivered copy exists");
    assert!(bytes.starts_with(b"From: Scanner <scanner@contoso.example>\r\n"));
    assert!(String::from_utf8_lossy(&bytes).contains("\r\n.leading dot line survives\r\n"));
}

#[test]
fn invalid_config_exits_2_naming_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bridge.toml");
    std::fs::write(&path, "[[account]]\nusername = \"a\"\npassword_env = \"X_UNSET_VAR\"\nmailbox = \"a@b.c\"\n[account.oauth]\nclient_id = \"c\"\n").unwrap();
    let out = bin()
        .args(["--config", path.to_str().unwrap(), "serve"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}: account[0].password_env: environment variable X_UNSET_VAR is not set",
            path.display()
        )),
        "{err}"
    );

    std::fs::write(&path, "[listen]\nsmtp = \"127.0.0.1:2525\"\nbogus = 1\n").unwrap();
    let out = bin()
        .args(["--config", path.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3", path.display())) && err.contains("unknown field `bogus`"),
        "{err}"
    );

    let out = bin()
        .args(["--config", "/nonexistent/bridge.toml", "serve"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/bridge.toml"));
}

#[test]
fn hash_password_reads_stdin_and_the_hash_authenticates() {
    let mut child = bin()
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let phc = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
    assert!(!phc.contains(PASSWORD));
    let secret = smtp_oauth_bridge::secret::Secret::new(PASSWORD);
    assert!(smtp_oauth_bridge::smtp::auth::verify_hash(&phc, &secret));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_hash_accounts_authenticate_over_the_wire() {
    let mut env = remote_ends(&Opts::default()).await;
    // A UTF-8 password, as AUTH PLAIN carries it.
    const UTF8_PASSWORD: &str = "Pässwörd-ÆØÅ-密码";
    let hash = smtp_oauth_bridge::smtp::auth::hash_password(
        &smtp_oauth_bridge::secret::Secret::new(UTF8_PASSWORD),
    )
    .unwrap();
    env.config_text = env.config_text.replace(
        &format!("password_env = \"{PW_ENV}\""),
        &format!("password_hash = \"{hash}\""),
    );
    let config = load_config(&env);
    let bridge = smtp_oauth_bridge::bridge::Bridge::start(&config, bind().await)
        .await
        .unwrap();
    let mut c = TcpSmtp::connect(bridge.local_addr).await;
    assert_eq!(c.ehlo_auth_plain(USER, "nope").await.0, 535);
    assert_eq!(c.ehlo_auth_plain(USER, PASSWORD).await.0, 535);
    assert_eq!(c.ehlo_auth_plain(USER, UTF8_PASSWORD).await.0, 235);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exits_0_on_sigterm() {
    let env = remote_ends(&Opts::default()).await;
    let bridge = BridgeProcess::start(&env.config_path, "info");
    let mut c = TcpSmtp::connect(bridge.addr).await;
    c.login().await;
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], b"Subject: x\r\n\r\nx\r\n")
            .await
            .0,
        250
    );
    let (status, log) = bridge.stop();
    assert!(status.success(), "{status:?}\n{log}");
    // The idle client was told the service is going away.
    assert_eq!(c.reply().await.0, 421);
    assert!(log.contains("shutting down"), "{log}");
}

/// `demo --serve`: the printed address, user and password work for a real client (swaks),
/// each delivered copy is announced with its path, and SIGINT stops it with exit 0.
#[test]
fn demo_serve_relays_a_swaks_message_with_the_printed_credentials_then_stops_on_sigint() {
    use std::io::BufRead;
    let Some(swaks) = tool("swaks") else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut child = bin()
        .args(["demo", "--serve"])
        .current_dir(dir.path())
        .env("TMPDIR", dir.path())
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run demo --serve");
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v.get("demo").is_some() && tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    let wait = std::time::Duration::from_secs(60);
    let serving = rx.recv_timeout(wait).expect("the serving line");
    assert_eq!(serving["demo"], "serving", "{serving}");
    let addr: std::net::SocketAddr = serving["address"].as_str().unwrap().parse().unwrap();
    let (user, password, from) = (
        serving["user"].as_str().unwrap(),
        serving["password"].as_str().unwrap(),
        serving["from"].as_str().unwrap(),
    );
    let out = Command::new(&swaks)
        .args([
            "--server",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
        ])
        .args([
            "--auth",
            "PLAIN",
            "--auth-user",
            user,
            "--auth-password",
            password,
        ])
        .args(["--from", from, "--to", "someone@fabrikam.example"])
        .args(["--header", "Subject: from swaks via demo --serve"])
        .output()
        .expect("run swaks");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "swaks failed:\n{transcript}");
    assert!(transcript.contains("<-  250 2.0.0"), "{transcript}");
    let delivered = rx.recv_timeout(wait).expect("the delivered line");
    assert_eq!(delivered["demo"], "delivered", "{delivered}");
    let path = delivered["delivered_copy"].as_str().expect("a path");
    let copy = std::fs::read_to_string(path).expect("the delivered copy");
    assert!(
        copy.contains("Subject: from swaks via demo --serve"),
        "{copy}"
    );
    assert_eq!(delivered["auth_user"], from);
    // SIGINT, as Ctrl-C would send.
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = std::time::Instant::now() + wait;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "demo --serve did not stop on SIGINT"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    reader.join().unwrap();
}
