//! The binary's commands: demo, configuration errors and exit codes, hash-password.

use crate::harness::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))
}

#[test]
fn demo_exits_0_in_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .arg("demo")
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
    assert_eq!(relay["upstream_code"], 250);
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
