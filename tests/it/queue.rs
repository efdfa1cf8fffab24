//! Queue control and bounces: `queue list|show|retry|delete` (the real binary) on the spool
//! of a running `serve` (the real binary), and `[queue] bounce` reports at the fake upstream.

use crate::harness::*;
use std::path::Path;
use std::time::{Duration, Instant};
use testkit::Reply;

/// No automatic retry within a test: only `queue retry` makes a deferred message due.
const SPOOL: &str = "[queue]\nmode = \"spool\"\nretry_min_secs = 3600\nretry_max_secs = 3600\n";

fn opts(extra: &str) -> Opts {
    Opts {
        extra: format!("{SPOOL}{extra}"),
        upstream: "messages_per_minute = 0".into(),
        ..Opts::default()
    }
}

fn message(id: &str) -> Vec<u8> {
    format!("From: scanner@contoso.com\r\nTo: a@fabrikam.com\r\nMessage-ID: <{id}@test>\r\nSubject: {id}\r\n\r\nbody of {id}\r\n").into_bytes()
}

/// Runs `smtp-oauth-bridge --config <env> queue <args>`: (exit code, stdout, stderr).
fn queue(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "--log-format",
            "json",
            "queue",
        ])
        .args(args)
        .env(PW_ENV, PASSWORD)
        .env(SECRET_ENV, CLIENT_SECRET)
        .env_remove("RUST_LOG")
        .output()
        .expect("run the binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `queue list --json [--dead]`, parsed.
fn list(config: &Path, dead: bool) -> Vec<serde_json::Value> {
    let mut args = vec!["list", "--json"];
    if dead {
        args.push("--dead");
    }
    let (code, out, err) = queue(config, &args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Polls `queue list` until `f` holds for it, for up to 20 s.
fn list_until(
    config: &Path,
    dead: bool,
    what: &str,
    f: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = list(config, dead);
        if f(&l) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {l:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends one message through the bridge; its spool id from the 250 reply.
async fn send(addr: std::net::SocketAddr, from: &str, rcpts: &[&str], tag: &str) -> String {
    let mut c = TcpSmtp::connect(addr).await;
    c.login().await;
    let (code, text) = c.send_message(from, rcpts, &message(tag)).await;
    assert_eq!(code, 250, "{text}");
    let id = text
        .split_whitespace()
        .find(|w| w.len() == 16 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no queue id in {text:?}"))
        .to_string();
    let _ = c.cmd("QUIT").await;
    id
}

/// The relay log lines (target `relay`) in `log`.
fn relay_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "relay")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_message_is_listed_with_its_reply_and_retried_once_while_serve_runs() {
    let env = remote_ends(&opts("")).await;
    env.upstream
        .set_data_reply(Some(Reply::new(451, "4.3.0 Try again later")));
    let bridge = BridgeProcess::start(&env.config_path, "info");
    let id = send(bridge.addr, MAILBOX, &["a@fabrikam.com"], "deferred").await;
    let l = list_until(&env.config_path, false, "the first attempt", |l| {
        l.len() == 1 && l[0]["attempts"] == 1
    });
    let m = &l[0];
    assert_eq!(m["id"], id.as_str());
    assert_eq!(m["account"], USER);
    assert_eq!(m["from"], MAILBOX);
    assert_eq!(m["pending"], serde_json::json!(["a@fabrikam.com"]));
    assert_eq!(m["last_reply"], "451 4.3.0 Try again later");
    assert_eq!(m["bytes"], message("deferred").len());
    let next = m["next_attempt"].as_u64().expect("a next attempt");
    let now = smtp_oauth_bridge::clock::unix_now();
    assert!(next >= now + 3000, "retry_min is an hour: {next} vs {now}");
    // The plain listing and `show` say the same for people.
    let (code, text, _) = queue(&env.config_path, &["list"]);
    assert_eq!(code, 0);
    assert!(
        text.contains(&id) && text.contains("451 4.3.0 Try again later"),
        "{text}"
    );
    assert!(
        text.contains("1/0/0") && text.ends_with("1 message\n"),
        "{text}"
    );
    let (code, text, _) = queue(&env.config_path, &["show", &id]);
    assert_eq!(code, 0);
    assert!(text.contains("  451 4.3.0 Try again later\n"), "{text}");
    assert!(
        text.contains("headers:\n  From: scanner@contoso.com\n"),
        "{text}"
    );
    assert!(
        text.contains("  Subject: deferred\n") && !text.contains("body of"),
        "{text}"
    );
    assert_eq!(env.upstream.received_count(), 0);

    // Retried on request while serve runs: delivered once, then gone.
    env.upstream.set_data_reply(None);
    let (code, out, err) = queue(&env.config_path, &["retry", &id]);
    assert_eq!(
        (code, out.as_str()),
        (0, format!("{id}: due now\n").as_str()),
        "{err}"
    );
    env.upstream.wait_received(1, Duration::from_secs(10)).await;
    list_until(&env.config_path, false, "an empty spool", |l| l.is_empty());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.upstream.message_ids(),
        ["<deferred@test>"],
        "delivered exactly once"
    );

    // An unknown id: exit 1 naming it, nothing done. Bad usage: exit 2.
    for args in [
        &["retry", "0123456789ABCDEF"][..],
        &["show", "0123456789ABCDEF"],
        &["delete", "0123456789ABCDEF"],
        &["retry", "--dead", "0123456789ABCDEF"],
        &["retry", &id],
    ] {
        let (code, _, err) = queue(&env.config_path, args);
        let named = args.last().unwrap();
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(
            err.contains(&format!("unknown message id {named}")),
            "{args:?}: {err}"
        );
    }
    for args in [
        &["retry"][..],
        &["delete", "--all"],
        &["retry", "--all", &id],
        &["list", "--nope"],
    ] {
        assert_eq!(queue(&env.config_path, args).0, 2, "{args:?}");
    }
    let (status, _) = bridge.stop();
    assert!(status.success());
    assert_eq!(env.upstream.received_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_message_is_never_delivered_and_logged_deleted() {
    let env = remote_ends(&opts("")).await;
    env.upstream
        .set_data_reply(Some(Reply::new(451, "4.3.0 Try again later")));
    let bridge = BridgeProcess::start(&env.config_path, "info");
    let keep = send(bridge.addr, MAILBOX, &["a@fabrikam.com"], "keep").await;
    let gone = send(bridge.addr, MAILBOX, &["a@fabrikam.com"], "gone").await;
    list_until(&env.config_path, false, "both attempted", |l| {
        l.len() == 2 && l.iter().all(|m| m["attempts"] == 1)
    });
    let (code, out, err) = queue(&env.config_path, &["delete", &gone]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("{gone}: deleted\n"));
    let lines = relay_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert_eq!(lines[0]["outcome"], "deleted");
    assert_eq!(lines[0]["id"], gone.as_str());
    assert_eq!(lines[0]["from"], MAILBOX);
    assert_eq!(lines[0]["rcpts"], "a@fabrikam.com");
    let spool = env.dir.path().join("state/spool");
    for ext in ["msg", "state"] {
        assert!(!spool.join(format!("{gone}.{ext}")).exists());
    }
    let l = list(&env.config_path, false);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0]["id"], keep.as_str());
    // Both made due: only the one kept is delivered.
    env.upstream.set_data_reply(None);
    let (code, _, err) = queue(&env.config_path, &["retry", "--all"]);
    assert_eq!(code, 0, "{err}");
    env.upstream.wait_received(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.upstream.message_ids(), ["<keep@test>"]);
    let (status, log) = bridge.stop();
    assert!(status.success());
    assert!(
        !relay_lines(&log).iter().any(|v| v["id"] == gone.as_str()
            && v["outcome"] != "spooled"
            && v["outcome"] != "deferred"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_message_requeued_with_dead_is_delivered() {
    let env = remote_ends(&opts("")).await;
    env.upstream.set_rcpt_reply(
        "a@fabrikam.com",
        Some(Reply::new(550, "5.1.10 RESOLVER.ADR.RecipientNotFound")),
    );
    let bridge = BridgeProcess::start(&env.config_path, "info");
    let id = send(bridge.addr, MAILBOX, &["a@fabrikam.com"], "lazarus").await;
    let dead = list_until(&env.config_path, true, "a dead letter", |l| l.len() == 1);
    assert_eq!(dead[0]["id"], id.as_str());
    assert!(
        dead[0]["dead_reason"]
            .as_str()
            .unwrap()
            .contains("a@fabrikam.com: 550 5.1.10"),
        "{dead:?}"
    );
    assert_eq!(dead[0]["failed"][0]["recipient"], "a@fabrikam.com");
    assert!(list(&env.config_path, false).is_empty());
    // Without --dead it is not found in the spool.
    let (code, _, err) = queue(&env.config_path, &["retry", &id]);
    assert_eq!(code, 1);
    assert!(err.contains("use --dead"), "{err}");
    env.upstream.set_rcpt_reply("a@fabrikam.com", None);
    let (code, out, err) = queue(&env.config_path, &["retry", "--dead", &id]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("{id}: moved back into the spool, due now\n"));
    let got = env.upstream.wait_received(1, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts, ["a@fabrikam.com"]);
    assert_eq!(got[0].data, message("lazarus"));
    list_until(&env.config_path, false, "an empty spool", |l| l.is_empty());
    assert!(list(&env.config_path, true).is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.upstream.received_count(), 1);
    // `delete --all --dead` clears dead letters.
    env.upstream.set_rcpt_reply(
        "b@fabrikam.com",
        Some(Reply::new(550, "5.1.10 RESOLVER.ADR.RecipientNotFound")),
    );
    let id2 = send(bridge.addr, MAILBOX, &["b@fabrikam.com"], "buried").await;
    list_until(&env.config_path, true, "another dead letter", |l| {
        l.len() == 1
    });
    let (code, out, err) = queue(&env.config_path, &["delete", "--all", "--dead"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("{id2}: deleted\n"));
    assert!(list(&env.config_path, true).is_empty());
    let (status, _) = bridge.stop();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_bounce_a_refused_message_gets_one_report_to_its_sender_and_null_sender_none() {
    let env = remote_ends(&opts("bounce = true\n")).await;
    env.upstream.set_rcpt_reply(
        "gone@fabrikam.com",
        Some(Reply::new(
            550,
            "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found",
        )),
    );
    let bridge = BridgeProcess::start(&env.config_path, "info");
    let id = send(bridge.addr, MAILBOX, &["gone@fabrikam.com"], "refused").await;
    let got = env.upstream.wait_received(1, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 1);
    let dsn = &got[0];
    assert_eq!(dsn.mail_from, "", "from the null sender");
    assert_eq!(dsn.rcpts, [MAILBOX]);
    assert_eq!(dsn.auth_user, MAILBOX, "through the same account");
    let text = String::from_utf8_lossy(&dsn.data);
    assert!(
        text.contains("Content-Type: multipart/report; report-type=delivery-status"),
        "{text}"
    );
    assert!(text.contains("\r\nFinal-Recipient: rfc822; gone@fabrikam.com\r\nAction: failed\r\nStatus: 5.1.10\r\n"), "{text}");
    assert!(
        text.contains("Diagnostic-Code: smtp; 550 5.1.10 RESOLVER.ADR.RecipientNotFound"),
        "{text}"
    );
    assert!(
        text.contains("\r\nMessage-ID: <refused@test>\r\n"),
        "the original headers: {text}"
    );
    assert!(!text.contains("body of refused"), "{text}");
    assert!(
        text.contains(&format!("X-Smtp-Oauth-Bridge-Id: {id}")),
        "{text}"
    );

    // A message from <> that goes dead gets no report.
    let null = send(bridge.addr, "", &["gone@fabrikam.com"], "null").await;
    list_until(&env.config_path, true, "both dead", |l| l.len() == 2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.upstream.received_count(), 1, "one report, none for <>");
    let (status, log) = bridge.stop();
    assert!(status.success());
    let lines = relay_lines(&log);
    let of = |id: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|v| v["id"] == id)
            .map(|v| v["outcome"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(of(&id), ["spooled", "dead"], "{log}");
    assert_eq!(of(&null), ["spooled", "dead"], "{log}");
    // The report's own lines, under a new id, from <> to the sender.
    let report: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["from"] == "" && v["rcpts"] == MAILBOX)
        .collect();
    let outcomes: Vec<&str> = report
        .iter()
        .map(|v| v["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["spooled", "delivered"], "{log}");
    assert_ne!(report[0]["id"], id.as_str());
    assert_eq!(report[0]["id"], report[1]["id"]);
}
