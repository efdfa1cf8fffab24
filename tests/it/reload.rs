//! SIGHUP reload, with the real binary (so the signal is real) against testkit's fakes:
//! an account added to the file relays without a restart; a changed password fails at
//! once although the old one was cached; a broken file changes nothing, says why and is
//! counted in `smtp_oauth_bridge_config_reloads_total`; in spool mode, a removed account's
//! spooled message waits (neither delivered nor dead) and is delivered when it comes back.

use crate::harness::*;
use smtp_oauth_bridge::secret::Secret;
use smtp_oauth_bridge::smtp::auth::hash_password;
use std::time::Duration;
use testkit::{FakeTokenEndpoint, FakeUpstream, FakeUpstreamOptions, TestCa, TokenOptions};

const NEW_USER: &str = "printer";
const NEW_MAILBOX: &str = "printer@contoso.com";
const MSG: &[u8] = b"Subject: reload\r\n\r\nhello\r\n";

/// The fakes (the upstream accepts both mailboxes) and a config file for them.
struct Setup {
    dir: tempfile::TempDir,
    tokens: FakeTokenEndpoint,
    upstream: FakeUpstream,
    /// Tables after `[state]` (e.g. `[queue]`).
    extra: String,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new();
        ca.write_ca_pem(&dir.path().join("upstream-ca.pem"))
            .expect("write CA");
        let tokens = FakeTokenEndpoint::start(bind().await, TokenOptions::default()).await;
        let (cert, key) = ca.issue_server_cert();
        let mut uo = FakeUpstreamOptions::new(cert, key);
        uo.tokens = Some(tokens.clone());
        uo.mailbox_ok = Some(vec![MAILBOX.to_string(), NEW_MAILBOX.to_string()]);
        let upstream = FakeUpstream::start(bind().await, uo).await;
        Setup {
            dir,
            tokens,
            upstream,
            extra: String::new(),
        }
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("bridge.toml")
    }

    /// Writes the config with `accounts` as (username, mailbox, password).
    fn write(&self, accounts: &[(&str, &str, &str)]) {
        let mut text = format!(
            "[listen]\nsmtp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [upstream]\nhost = \"localhost\"\nport = {}\nca_file = \"upstream-ca.pem\"\ntimeout_secs = 5\n\
             [state]\ndir = \"state\"\n{}\n",
            self.upstream.addr().port(),
            self.extra
        );
        for (user, mailbox, password) in accounts {
            let hash = hash_password(&Secret::new(*password)).expect("hash");
            text.push_str(&format!(
                "\n[[account]]\nusername = \"{user}\"\npassword_hash = \"{hash}\"\nmailbox = \"{mailbox}\"\n\
                 allowed_from = [\"{mailbox}\"]\n[account.oauth]\nflow = \"client_credentials\"\n\
                 tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"test-client\"\n\
                 client_secret_env = \"{SECRET_ENV}\"\ntoken_url = \"{}\"\n",
                self.tokens.token_url()
            ));
        }
        std::fs::write(self.path(), text).expect("write config");
    }
}

/// Sends SIGHUP and waits until the log has `n` lines containing `what`.
fn hup_and_wait(bridge: &BridgeProcess, what: &str, n: usize) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &bridge.child.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while bridge.log().matches(what).count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "no {what:?} (x{n}) after SIGHUP; log:\n{}",
            bridge.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The admin endpoint's address, from the JSON log.
fn admin_addr(bridge: &BridgeProcess) -> String {
    bridge
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("admin").and_then(|a| a.as_str()).map(String::from))
        .expect("admin endpoint address in the log")
}

/// The `smtp_oauth_bridge_config_reloads_total` series, as `(result, value)` lines.
async fn reload_counts(admin: &str) -> Vec<String> {
    let body = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    body.lines()
        .filter(|l| l.starts_with("smtp_oauth_bridge_config_reloads_total{"))
        .map(String::from)
        .collect()
}

/// AUTH as `user` and send one message from `mailbox`; the final reply code.
async fn send(addr: std::net::SocketAddr, user: &str, password: &str, mailbox: &str) -> u16 {
    let mut c = Smtp::connect(addr).await;
    let (code, text) = c.ehlo_auth_plain(user, password).await;
    if code != 235 {
        return code;
    }
    let (code, text2) = c.send_message(mailbox, &["to@example.net"], MSG).await;
    assert!(code == 250, "{code} {text2} (after AUTH {text})");
    let _ = c.cmd("QUIT").await;
    code
}

async fn auth(addr: std::net::SocketAddr, user: &str, password: &str) -> (u16, String) {
    let mut c = Smtp::connect(addr).await;
    c.ehlo_auth_plain(user, password).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_an_account_and_a_changed_password_fails_at_once() {
    let s = Setup::new().await;
    s.write(&[(USER, MAILBOX, "old-pw")]);
    let bridge = BridgeProcess::start(&s.path(), "info");
    let admin = admin_addr(&bridge);
    // The old password works and is now cached (the second AUTH comes from the cache).
    assert_eq!(send(bridge.addr, USER, "old-pw", MAILBOX).await, 250);
    assert_eq!(auth(bridge.addr, USER, "old-pw").await.0, 235);
    // Not configured yet.
    assert_eq!(auth(bridge.addr, NEW_USER, "new-user-pw").await.0, 535);
    // A session open across the reload finishes under the old settings.
    let mut open = Smtp::connect(bridge.addr).await;

    s.write(&[
        (USER, MAILBOX, "changed-pw"),
        (NEW_USER, NEW_MAILBOX, "new-user-pw"),
    ]);
    hup_and_wait(&bridge, "configuration reloaded", 1);
    assert_eq!(
        reload_counts(&admin).await,
        vec![r#"smtp_oauth_bridge_config_reloads_total{result="ok"} 1"#]
    );

    // The new account relays, without a restart, as its own mailbox.
    assert_eq!(
        send(bridge.addr, NEW_USER, "new-user-pw", NEW_MAILBOX).await,
        250
    );
    let got = s.upstream.wait_received(2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].auth_user, MAILBOX);
    assert_eq!(got[1].auth_user, NEW_MAILBOX);
    assert_eq!(got[1].mail_from, NEW_MAILBOX);
    assert!(got[1].data.ends_with(b"hello\r\n"));

    // The old password fails at once although it was cached; the new one works.
    let (code, text) = auth(bridge.addr, USER, "old-pw").await;
    assert_eq!(code, 535, "{text}");
    assert_eq!(send(bridge.addr, USER, "changed-pw", MAILBOX).await, 250);
    // The session opened before the reload still has the old settings.
    let (code, text) = open.ehlo_auth_plain(USER, "old-pw").await;
    assert_eq!(code, 235, "{text}");

    let (status, log) = bridge.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains("changed-pw") && !log.contains("old-pw"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_on_sighup_changes_nothing_says_why_and_is_counted() {
    let s = Setup::new().await;
    s.write(&[(USER, MAILBOX, "pw-1")]);
    let good = std::fs::read_to_string(s.path()).unwrap();
    let bridge = BridgeProcess::start(&s.path(), "info");
    let admin = admin_addr(&bridge);
    assert_eq!(send(bridge.addr, USER, "pw-1", MAILBOX).await, 250);

    // Not TOML at all: the file and line, and why.
    std::fs::write(s.path(), format!("{good}\n[[account]\nusername = ")).unwrap();
    hup_and_wait(&bridge, "configuration reload failed", 1);
    let path = s.path().display().to_string();
    let line = bridge
        .log()
        .lines()
        .find(|l| l.contains("configuration reload failed"))
        .unwrap()
        .to_string();
    assert!(line.contains(&path), "{line}");
    assert!(line.contains("the running configuration stays"), "{line}");
    assert_eq!(
        reload_counts(&admin).await,
        vec![r#"smtp_oauth_bridge_config_reloads_total{result="failed"} 1"#]
    );
    assert_eq!(send(bridge.addr, USER, "pw-1", MAILBOX).await, 250);

    // Valid TOML, invalid value: the key is named; the old password still works.
    std::fs::write(
        s.path(),
        format!("{good}\n[[relay_network]]\ncidr = [\"10.0.5.0/24\"]\naccount = \"nobody\"\n"),
    )
    .unwrap();
    hup_and_wait(&bridge, "configuration reload failed", 2);
    let line = bridge
        .log()
        .lines()
        .filter(|l| l.contains("configuration reload failed"))
        .nth(1)
        .unwrap()
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["key"], "relay_network[0].account", "{line}");
    assert!(v["reason"].as_str().unwrap().contains("nobody"), "{line}");
    assert_eq!(v["file"], path.as_str(), "{line}");
    assert_eq!(
        reload_counts(&admin).await,
        vec![r#"smtp_oauth_bridge_config_reloads_total{result="failed"} 2"#]
    );
    assert_eq!(send(bridge.addr, USER, "pw-1", MAILBOX).await, 250);
    let got = s.upstream.wait_received(3, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 3);

    // Fixed again: the next SIGHUP is ok.
    std::fs::write(s.path(), &good).unwrap();
    hup_and_wait(&bridge, "configuration reloaded", 1);
    let mut counts = reload_counts(&admin).await;
    counts.sort();
    assert_eq!(
        counts,
        vec![
            r#"smtp_oauth_bridge_config_reloads_total{result="failed"} 2"#,
            r#"smtp_oauth_bridge_config_reloads_total{result="ok"} 1"#,
        ]
    );
    let (status, log) = bridge.stop();
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_accounts_spooled_message_waits_and_is_delivered_when_it_comes_back() {
    let mut s = Setup::new().await;
    s.extra = "[queue]\nmode = \"spool\"\nretry_min_secs = 1\nretry_max_secs = 1\n".into();
    let both = [(USER, MAILBOX, "pw-1"), (NEW_USER, NEW_MAILBOX, "pw-2")];
    s.write(&both);
    let bridge = BridgeProcess::start(&s.path(), "info");
    // The upstream defers MAIL: the message stays spooled.
    s.upstream
        .set_mail_reply(Some(testkit::Reply::new(451, "4.3.2 try later")));
    assert_eq!(send(bridge.addr, NEW_USER, "pw-2", NEW_MAILBOX).await, 250);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !bridge.log().contains("delivery deferred") {
        assert!(std::time::Instant::now() < deadline, "{}", bridge.log());
        std::thread::sleep(Duration::from_millis(20));
    }

    // Removed; the upstream would now accept, but nothing is delivered or buried.
    s.write(&both[..1]);
    hup_and_wait(&bridge, "configuration reloaded", 1);
    s.upstream.set_mail_reply(None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s.upstream.received_count(), 0);
    let dead = s.dir.path().join("state/dead");
    let buried = std::fs::read_dir(&dead).map_or(0, |d| d.count());
    assert_eq!(buried, 0, "moved to dead: {}", bridge.log());
    assert_eq!(auth(bridge.addr, NEW_USER, "pw-2").await.0, 535);

    // Back: delivered once, as its mailbox.
    s.write(&both);
    hup_and_wait(&bridge, "configuration reloaded", 2);
    let got = s.upstream.wait_received(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "{}", bridge.log());
    assert_eq!(got[0].auth_user, NEW_MAILBOX);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.upstream.received_count(), 1);
    let (status, log) = bridge.stop();
    assert!(status.success(), "{log}");
}
