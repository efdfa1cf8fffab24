//! The Microsoft Graph transport (issue 13) against testkit's fake Graph endpoint: sendMail
//! in one request, the envelope fix-up on a draft, 30 MiB through upload sessions, the error
//! mapping (429 with Retry-After in sync and spool mode, 401, 403, 404), `check`, one bridge
//! with an SMTP and a Graph account, Graph's 4 requests per mailbox, and no token in a TRACE
//! log of all of it.

use crate::harness::*;
use base64::Engine as _;
use smtp_oauth_bridge::bridge::Bridge;
use std::time::{Duration, Instant};
use testkit::{FakeGraph, FakeGraphOptions, GraphFault, GraphSendPath};

const SPOOL: &str = "[queue]\nmode = \"spool\"\nretry_min_secs = 1\nretry_max_secs = 2\n";
/// Graph's request limit as the fake enforces it.
const FOUR_MB: usize = 4 * 1024 * 1024;

/// The remote ends (token endpoint, SMTP upstream, fake Graph) and a config whose
/// `upstream.transport` is graph; the bridge is not started.
async fn graph_ends(opts: Opts, tune: impl FnOnce(&mut FakeGraphOptions)) -> (Env, FakeGraph) {
    let mut env = remote_ends(&opts).await;
    let mut go = FakeGraphOptions::new(Some(env.tokens.clone()));
    go.mailboxes = Some(vec![MAILBOX.to_string()]);
    tune(&mut go);
    let graph = FakeGraph::start(bind().await, go).await;
    env.config_text = env.config_text.replacen(
        "[upstream]\n",
        &format!(
            "[upstream]\ntransport = \"graph\"\ngraph_url = \"{}\"\n",
            graph.url()
        ),
        1,
    );
    std::fs::write(&env.config_path, &env.config_text).unwrap();
    (env, graph)
}

async fn start_bridge(env: &mut Env) {
    let config = load_config(env);
    let bridge = Bridge::start(&config, bind().await)
        .await
        .expect("bridge starts");
    env.addr = bridge.local_addr;
    env.bridge = Some(bridge);
}

async fn graph_start(opts: Opts, tune: impl FnOnce(&mut FakeGraphOptions)) -> (Env, FakeGraph) {
    let (mut env, graph) = graph_ends(opts, tune).await;
    start_bridge(&mut env).await;
    (env, graph)
}

/// A text message of about `size` bytes (CRLF lines).
fn text_message(headers: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: {MAILBOX}\r\n{headers}Subject: graph\r\nMessage-ID: <g@contoso.com>\r\n\r\n"
    )
    .into_bytes();
    let mut i = 0;
    while m.len() < size {
        m.extend_from_slice(
            format!("line {i:06} of the body, long enough to count\r\n").as_bytes(),
        );
        i += 1;
    }
    m
}

/// A multipart message with the given attachments (base64, 76-character lines).
fn with_attachments(to: &str, atts: &[(&str, &[u8])]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut m = format!("From: {MAILBOX}\r\nTo: {to}\r\nSubject: big\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XyZ\"\r\n\r\n--XyZ\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nTwo attachments.\r\n").into_bytes();
    for (name, data) in atts {
        m.extend_from_slice(format!("--XyZ\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n").as_bytes());
        for line in b64.encode(data).as_bytes().chunks(76) {
            m.extend_from_slice(line);
            m.extend_from_slice(b"\r\n");
        }
    }
    m.extend_from_slice(b"--XyZ--\r\n");
    m
}

fn pseudo_random(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

const SMTPLIB: &str = r#"
import smtplib, sys
port, user, pw = int(sys.argv[1]), sys.argv[2], sys.argv[3]
msg = open(sys.argv[4], 'rb').read()
s = smtplib.SMTP('127.0.0.1', port, timeout=30)
s.login(user, pw)
s.sendmail(sys.argv[5], ['a@fabrikam.com'], msg)
s.quit()
print('sent')
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_10k_message_is_one_sendmail_with_the_same_mime() {
    let Some(python) = tool("python3") else {
        return;
    };
    let (env, graph) = graph_start(Opts::default(), |_| {}).await;
    let msg = text_message("To: a@fabrikam.com\r\n", 10 * 1024);
    let p = env.dir.path().join("m.eml");
    std::fs::write(&p, &msg).unwrap();
    let out = tokio::process::Command::new(python)
        .args(["-c", SMTPLIB, &env.addr.port().to_string(), USER, PASSWORD])
        .arg(&p)
        .arg(MAILBOX)
        .output()
        .await
        .expect("run python3");
    assert!(
        out.status.success(),
        "smtplib failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = graph.wait_sent(1, Duration::from_secs(5)).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].via, GraphSendPath::SendMail);
    assert_eq!(
        sent[0].submitted_mime, msg,
        "the MIME arrives byte for byte"
    );
    assert_eq!(sent[0].mime, msg);
    assert_eq!(sent[0].recipients(), ["a@fabrikam.com"]);
    let reqs = graph.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].method, "POST");
    assert!(reqs[0].path.ends_with("/sendMail"), "{reqs:?}");
    assert_eq!(reqs[0].status, 202);
    assert_eq!(graph.open_drafts(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_follows_the_envelope_not_the_headers() {
    let (env, graph) = graph_start(Opts::default(), |_| {}).await;
    let msg = text_message("To: A <a@fabrikam.com>\r\nCc: b@fabrikam.com\r\n", 2000);
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let (code, text) = c
        .send_message(MAILBOX, &["a@fabrikam.com", "c@fabrikam.com"], &msg)
        .await;
    assert_eq!(code, 250, "{text}");
    assert!(text.contains("2.0.0"), "{text}");
    let sent = graph.wait_sent(1, Duration::from_secs(5)).await;
    assert_eq!(sent.len(), 1);
    let s = &sent[0];
    assert_eq!(s.via, GraphSendPath::Draft);
    assert_eq!(s.recipients(), ["a@fabrikam.com", "c@fabrikam.com"]);
    assert_eq!(s.to, ["a@fabrikam.com"]);
    assert!(s.cc.is_empty(), "{:?}", s.cc);
    assert_eq!(s.bcc, ["c@fabrikam.com"]);
    assert_eq!(s.submitted_mime, msg);
    assert_eq!(graph.open_drafts(), 0);
    let sends = graph
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/send"))
        .count();
    assert_eq!(sends, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_mib_with_two_12_mib_attachments_through_upload_sessions() {
    let (env, graph) = graph_start(Opts::default(), |_| {}).await;
    let a = pseudo_random(12 * 1024 * 1024, 1);
    let b = pseudo_random(12 * 1024 * 1024, 2);
    // Base64 makes the two 12 MiB attachments a message of about 33 MiB (under 35 MiB).
    let msg = with_attachments("x@fabrikam.com", &[("a.bin", &a), ("b.bin", &b)]);
    assert!(msg.len() >= 30 * 1024 * 1024, "{}", msg.len());
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let (code, text) = c.send_message(MAILBOX, &["x@fabrikam.com"], &msg).await;
    assert_eq!(code, 250, "{text}");
    let sent = graph.wait_sent(1, Duration::from_secs(30)).await;
    assert_eq!(sent.len(), 1);
    let s = &sent[0];
    assert_eq!(s.via, GraphSendPath::Draft);
    assert_eq!(s.recipients(), ["x@fabrikam.com"]);
    let att = |n: &str| {
        s.attachments
            .iter()
            .find(|x| x.name == n)
            .unwrap_or_else(|| {
                panic!(
                    "{n} missing: {:?}",
                    s.attachments.iter().map(|x| &x.name).collect::<Vec<_>>()
                )
            })
    };
    assert!(att("a.bin").bytes == a, "a.bin differs");
    assert!(att("b.bin").bytes == b, "b.bin differs");
    assert!(att("a.bin").via_upload_session && att("b.bin").via_upload_session);
    assert_eq!(att("a.bin").content_type, "application/octet-stream");
    let reqs = graph.requests();
    let biggest = reqs.iter().map(|r| r.body_bytes).max().unwrap_or(0);
    assert!(biggest <= FOUR_MB, "a request of {biggest} bytes");
    assert!(reqs.iter().all(|r| r.status < 300), "{reqs:?}");
    assert_eq!(reqs.iter().filter(|r| r.path.ends_with("/send")).count(), 1);
    assert_eq!(graph.open_drafts(), 0);
    assert_eq!(graph.open_upload_sessions(), 0);
    assert_eq!(s.attachments.len(), 2);
    println!(
        "{} byte message: {} requests, largest body {biggest} bytes",
        msg.len(),
        reqs.len()
    );
}

/// Graph takes attachments under 3,000,000 bytes only inline (`POST .../attachments`) and
/// from 3,000,000 bytes only through upload sessions: both sides of the line arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_at_the_upload_session_threshold() {
    let (env, graph) = graph_start(Opts::default(), |_| {}).await;
    for (i, (size, session)) in [(2_999_999usize, false), (3_000_000, true)]
        .into_iter()
        .enumerate()
    {
        let data = pseudo_random(size, 7 + i as u32);
        let msg = with_attachments("x@fabrikam.com", &[("edge.bin", &data)]);
        let mut c = TcpSmtp::connect(env.addr).await;
        c.login().await;
        let (code, text) = c.send_message(MAILBOX, &["x@fabrikam.com"], &msg).await;
        assert_eq!(code, 250, "{size}: {text}");
        let sent = graph.wait_sent(i + 1, Duration::from_secs(30)).await;
        assert_eq!(sent.len(), i + 1);
        let s = &sent[i];
        assert_eq!(s.via, GraphSendPath::Draft);
        assert_eq!(s.attachments.len(), 1, "{size}");
        assert!(s.attachments[0].bytes == data, "{size}: bytes differ");
        assert_eq!(s.attachments[0].via_upload_session, session, "{size}");
    }
    let reqs = graph.requests();
    assert!(reqs.iter().all(|r| r.status < 300), "{reqs:?}");
    assert!(reqs.iter().all(|r| r.body_bytes <= FOUR_MB), "{reqs:?}");
    assert_eq!(graph.open_drafts(), 0);
}

/// The real binary's peak RSS for the 33 MiB message with two 12 MiB attachments (the
/// figure README's "Limits" states): the buffered message (reserved from SIZE=), the parse
/// while the attachments are cut out, then one decoded attachment at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_rss_of_the_33_mib_two_attachment_message() {
    let (env, graph) = graph_ends(Opts::default(), |_| {}).await;
    let bridge = BridgeProcess::start(&env.config_path, "info");
    let a = pseudo_random(12 * 1024 * 1024, 3);
    let b = pseudo_random(12 * 1024 * 1024, 4);
    let msg = with_attachments("x@fabrikam.com", &[("a.bin", &a), ("b.bin", &b)]);
    let mut c = TcpSmtp::connect(bridge.addr).await;
    c.login().await;
    c.expect(&format!("MAIL FROM:<{MAILBOX}> SIZE={}", msg.len()), 250)
        .await;
    c.expect("RCPT TO:<x@fabrikam.com>", 250).await;
    c.expect("DATA", 354).await;
    c.send(&msg).await; // base64 lines never start with '.'
    c.send(b".\r\n").await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 250, "{text}");
    let sent = graph.wait_sent(1, Duration::from_secs(30)).await;
    assert_eq!(sent.len(), 1);
    assert!(sent[0].attachments.iter().any(|x| x.bytes == a));
    let peak = bridge.peak_rss();
    println!(
        "{:.1} MiB message, two 12 MiB attachments, Graph: bridge peak RSS {:.1} MiB",
        msg.len() as f64 / 1048576.0,
        peak as f64 / 1048576.0
    );
    assert!(
        peak < 3 * msg.len() as u64,
        "peak RSS {peak} for a {} byte message",
        msg.len()
    );
    assert!(bridge.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_sync_gets_451_and_spool_waits_for_retry_after() {
    // Sync: the client gets 451 4.4.x, nothing is delivered.
    let (env, graph) = graph_start(Opts::default(), |_| {}).await;
    graph.fail_next(
        1,
        GraphFault::TooManyRequests {
            retry_after_secs: 2,
        },
    );
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let msg = text_message("To: a@fabrikam.com\r\n", 500);
    let (code, text) = c.send_message(MAILBOX, &["a@fabrikam.com"], &msg).await;
    assert_eq!(code, 451, "{text}");
    assert!(text.starts_with("4.4."), "{text}");
    assert!(graph.sent().is_empty());
    // Spool: accepted, then delivered once, no sooner than Retry-After.
    let (env, graph) = graph_start(
        Opts {
            extra: SPOOL.into(),
            ..Opts::default()
        },
        |_| {},
    )
    .await;
    graph.fail_next(
        1,
        GraphFault::TooManyRequests {
            retry_after_secs: 2,
        },
    );
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let (code, text) = c.send_message(MAILBOX, &["a@fabrikam.com"], &msg).await;
    assert_eq!(code, 250, "{text}");
    let queued = Instant::now();
    let sent = graph.wait_sent(1, Duration::from_secs(15)).await;
    let waited = queued.elapsed();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].submitted_mime, msg);
    assert!(
        waited >= Duration::from_secs(2),
        "delivered after {waited:?}"
    );
    // Once: a second attempt would be a second sendMail.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reqs = graph.requests();
    assert_eq!(graph.sent().len(), 1);
    assert_eq!(
        reqs.iter().filter(|r| r.status == 429).count(),
        1,
        "{reqs:?}"
    );
    assert_eq!(
        reqs.iter().filter(|r| r.status == 202).count(),
        1,
        "{reqs:?}"
    );
    let at = |status: u16| {
        reqs.iter()
            .find(|r| r.status == status)
            .map(|r| r.at)
            .unwrap()
    };
    let gap = at(202).duration_since(at(429));
    assert!(
        gap >= Duration::from_secs(2),
        "retried {gap:?} after the 429"
    );
    println!("spool: retried {gap:?} after 429 Retry-After 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_and_not_found_map_and_a_401_is_refreshed_once() {
    let (env, graph) = graph_start(Opts::default(), |_| {}).await;
    let msg = text_message("To: a@fabrikam.com\r\n", 500);
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    graph.fail_next(1, GraphFault::Forbidden);
    let (code, text) = c.send_message(MAILBOX, &["a@fabrikam.com"], &msg).await;
    assert_eq!(code, 550, "{text}");
    assert!(text.starts_with("5.7.1 "), "{text}");
    assert!(
        text.contains("Mail.Send") && text.contains("application access policy"),
        "{text}"
    );
    assert!(text.contains("ErrorAccessDenied"), "{text}");
    graph.fail_next(1, GraphFault::NotFound);
    let (code, text) = c.send_message(MAILBOX, &["a@fabrikam.com"], &msg).await;
    assert_eq!(code, 550, "{text}");
    assert!(text.starts_with("5.1.1 "), "{text}");
    graph.fail_next(
        1,
        GraphFault::BadRequest {
            code: "ErrorMimeContentInvalid".into(),
        },
    );
    let (code, text) = c.send_message(MAILBOX, &["a@fabrikam.com"], &msg).await;
    assert_eq!(code, 554, "{text}");
    assert!(
        text.starts_with("5.6.0 ") && text.contains("ErrorMimeContentInvalid"),
        "{text}"
    );
    assert!(graph.sent().is_empty());
    // 401: one forced refresh, one retry, delivered.
    let before = env.tokens.issued().len();
    graph.fail_next(1, GraphFault::Unauthorized);
    let (code, text) = c.send_message(MAILBOX, &["a@fabrikam.com"], &msg).await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(graph.sent().len(), 1);
    assert_eq!(env.tokens.issued().len(), before + 1, "one new token");
    let statuses: Vec<u16> = graph.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [403, 404, 400, 401, 202]);
}

fn check(env: &Env) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))
        .env(PW_ENV, PASSWORD)
        .env(SECRET_ENV, CLIENT_SECRET)
        .env_remove("RUST_LOG")
        .args(["--config", env.config_path.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_proves_mailbox_and_permission_without_sending_and_hints_on_failure() {
    let (env, graph) = graph_ends(Opts::default(), |_| {}).await;
    let (code, out) = check(&env);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("scanner: ok") && out.contains("Mail.Send"),
        "{out}"
    );
    assert!(out.contains("drafts allowed"), "{out}");
    assert!(graph.sent().is_empty(), "check sends nothing");
    assert_eq!(graph.open_drafts(), 0, "check leaves no draft");
    // A valid MIME without recipients: sendMail 400 (ErrorInvalidRecipients), a draft made
    // and deleted.
    let probe: Vec<(String, u16)> = graph
        .requests()
        .iter()
        .filter(|r| !r.path.contains("/token"))
        .map(|r| (r.method.clone(), r.status))
        .collect();
    assert_eq!(
        probe,
        [
            ("POST".to_string(), 400),
            ("POST".to_string(), 201),
            ("DELETE".to_string(), 204)
        ],
        "{:?}",
        graph.requests()
    );
    // Another 400 than the missing recipients: inconclusive, and said so.
    graph.fail_path(
        1,
        "sendMail",
        GraphFault::BadRequest {
            code: "ErrorMimeContentInvalid".into(),
        },
    );
    let (code, out) = check(&env);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("scanner: inconclusive") && out.contains("ErrorMimeContentInvalid"),
        "{out}"
    );
    // Only Mail.Send: ok, with a warning about drafts.
    let (env, _g) = graph_ends(Opts::default(), |o| {
        o.permissions = vec!["Mail.Send".into()]
    })
    .await;
    let (code, out) = check(&env);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning: Mail.ReadWrite is not granted"),
        "{out}"
    );
    // No Mail.Send: 403 with the hint.
    let (env, _g) = graph_ends(Opts::default(), |o| o.permissions = vec![]).await;
    let (code, out) = check(&env);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("scanner: FAILED") && out.contains("403"),
        "{out}"
    );
    assert!(out.contains("hint: Mail.Send is not granted"), "{out}");
    assert!(out.contains("RBAC for Applications"), "{out}");
    // A mailbox Graph does not know: 404 with its hint.
    let (env, _g) = graph_ends(Opts::default(), |o| {
        o.mailboxes = Some(vec!["other@contoso.com".into()])
    })
    .await;
    let (code, out) = check(&env);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("404") && out.contains("hint: the mailbox was not found"),
        "{out}"
    );
    // 401 even after a fresh token.
    let (env, g) = graph_ends(Opts::default(), |_| {}).await;
    g.fail_next(2, GraphFault::Unauthorized);
    let (code, out) = check(&env);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("401") && out.contains("hint: Graph refused the access token"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bridge_serves_an_smtp_and_a_graph_account() {
    let mut env =
        remote_ends_with_accounts(&Opts::default(), &[("graphuser", &["graph@contoso.com"])]).await;
    let mut go = FakeGraphOptions::new(Some(env.tokens.clone()));
    go.mailboxes = Some(vec![MAILBOX.into()]);
    let graph = FakeGraph::start(bind().await, go).await;
    // The first account stays on SMTP (the default); the second (same mailbox, its own
    // login and sender) overrides to graph.
    env.config_text = env
        .config_text
        .replacen(
            "[upstream]\n",
            &format!("[upstream]\ngraph_url = \"{}\"\n", graph.url()),
            1,
        )
        .replacen(
            "username = \"graphuser\"\n",
            "username = \"graphuser\"\ntransport = \"graph\"\n",
            1,
        );
    assert!(
        env.config_text.contains("transport = \"graph\""),
        "{}",
        env.config_text
    );
    std::fs::write(&env.config_path, &env.config_text).unwrap();
    start_bridge(&mut env).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let msg = text_message("To: a@fabrikam.com\r\n", 300);
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], &msg).await.0,
        250
    );
    let mut g = TcpSmtp::connect(env.addr).await;
    let (code, t) = g.ehlo_auth_plain("graphuser", PASSWORD).await;
    assert_eq!(code, 235, "{t}");
    let gmsg = b"From: graph@contoso.com\r\nTo: b@fabrikam.com\r\nSubject: g\r\n\r\nvia graph\r\n"
        .to_vec();
    let (code, t) = g
        .send_message("graph@contoso.com", &["b@fabrikam.com"], &gmsg)
        .await;
    assert_eq!(code, 250, "{t}");
    let up = env.upstream.wait_received(1, Duration::from_secs(5)).await;
    let sent = graph.wait_sent(1, Duration::from_secs(5)).await;
    assert_eq!(up.len(), 1);
    assert_eq!(up[0].data, msg);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].mailbox, MAILBOX);
    assert_eq!(sent[0].submitted_mime, gmsg);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        env.upstream.received().len(),
        1,
        "nothing else went by SMTP"
    );
    assert_eq!(graph.sent().len(), 1, "nothing else went by Graph");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_four_requests_per_mailbox_with_eight_clients() {
    let (env, graph) = graph_start(Opts::default(), |o| {
        o.response_delay = Duration::from_millis(300);
    })
    .await;
    let addr = env.addr;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn(async move {
                let mut c = TcpSmtp::connect(addr).await;
                c.login().await;
                let msg = text_message("To: a@fabrikam.com\r\n", 200 + i);
                c.send_message(MAILBOX, &["a@fabrikam.com"], &msg).await
            })
        })
        .collect();
    for t in tasks {
        let (code, text) = t.await.unwrap();
        assert_eq!(code, 250, "{text}");
    }
    assert_eq!(graph.sent().len(), 8);
    let peak = graph.peak_concurrency(MAILBOX);
    assert!(peak <= 4, "peak concurrency {peak}");
    assert!(peak >= 2, "the clients ran in parallel (peak {peak})");
    assert!(graph.requests().iter().all(|r| r.status == 202));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_log_of_graph_deliveries_holds_no_token() {
    let (env, graph) = graph_ends(Opts::default(), |_| {}).await;
    let bridge = BridgeProcess::start(&env.config_path, "trace");
    let mut c = TcpSmtp::connect(bridge.addr).await;
    c.login().await;
    let small = text_message("To: a@fabrikam.com\r\n", 10 * 1024);
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], &small).await.0,
        250
    );
    let fixup = text_message("To: a@fabrikam.com\r\nCc: b@fabrikam.com\r\n", 1000);
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com", "c@fabrikam.com"], &fixup)
            .await
            .0,
        250
    );
    let big = with_attachments(
        "a@fabrikam.com",
        &[("x.bin", &pseudo_random(5 * 1024 * 1024, 3))],
    );
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], &big).await.0,
        250
    );
    graph.fail_next(
        1,
        GraphFault::TooManyRequests {
            retry_after_secs: 2,
        },
    );
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], &small).await.0,
        451
    );
    graph.fail_next(1, GraphFault::Forbidden);
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], &small).await.0,
        550
    );
    graph.fail_next(1, GraphFault::NotFound);
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], &small).await.0,
        550
    );
    graph.fail_next(1, GraphFault::Unauthorized);
    assert_eq!(
        c.send_message(MAILBOX, &["a@fabrikam.com"], &small).await.0,
        250
    );
    c.expect("QUIT", 221).await;
    assert_eq!(graph.sent().len(), 4);
    let (status, log) = bridge.stop();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        log.contains("graph request"),
        "trace lines of Graph requests:\n{log}"
    );
    assert!(log.contains("\"upstream_code\":202"), "{log}");
    // A refusal logs Graph's HTTP status as upstream_code (SPEC), not the mapped SMTP code.
    for code in [403, 404] {
        let line = log
            .lines()
            .find(|l| {
                l.contains("\"outcome\":\"rejected\"")
                    && l.contains(&format!("\"upstream_code\":{code}"))
            })
            .unwrap_or_else(|| {
                panic!("no rejected relay log line with upstream_code {code}:\n{log}")
            });
        assert!(!line.contains("\"upstream_code\":550"), "{line}");
    }
    assert!(log.contains("Graph HTTP 403 ErrorAccessDenied"), "{log}");
    let issued = env.tokens.issued();
    assert_eq!(issued.len(), 2, "the first token and the one after the 401");
    for t in &issued {
        assert!(!log.contains(t.as_str()), "a token is in the log");
    }
    assert!(
        !log.contains(CLIENT_SECRET),
        "the client secret is in the log"
    );
    assert!(!log.contains(PASSWORD), "the password is in the log");
    assert!(
        !log.to_ascii_lowercase().contains("bearer "),
        "an Authorization header is in the log"
    );
}
