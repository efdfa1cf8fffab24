//! The hardening of issue 10, proven against the real bridge and testkit's fakes: the argon2
//! bound under a flood of wrong AUTHs (real binary, peak RSS), per-address throttling,
//! address validation and rendering (injection strings in sync and spool mode, asserted on
//! the exact command lines the fake upstream received), and a small `max_message_bytes`.
//! Upstream failures are `failures.rs`'s.

use crate::harness::*;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SPOOL: &str = "[queue]\nmode = \"spool\"\nretry_min_secs = 1\nretry_max_secs = 2\n";
const FLOOD_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));

fn message(id: &str) -> Vec<u8> {
    format!("From: scanner@contoso.com\r\nTo: a@fabrikam.com\r\nMessage-ID: <{id}@test>\r\nSubject: {id}\r\n\r\nbody of {id}\r\n").into_bytes()
}

fn wrong_auth(i: usize) -> String {
    format!("AUTH PLAIN {}", base64_plain(USER, &format!("wrong-{i}")))
}

/// Logs in, retrying a `454` (too many checks in progress) until `deadline`, as a client
/// would; returns how many 454s it got.
async fn login_retrying(c: &mut TcpSmtp, deadline: Instant) -> usize {
    c.expect("EHLO good.client", 250).await;
    let mut busy = 0;
    loop {
        let (code, t) = c
            .cmd(&format!("AUTH PLAIN {}", base64_plain(USER, PASSWORD)))
            .await;
        match code {
            235 => return busy,
            454 if Instant::now() < deadline => {
                busy += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => panic!("correct AUTH during the flood: {code} {t} (after {busy} x 454)"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_150_wrong_auths_stays_under_256_mib_and_a_correct_client_delivers() {
    // A hashed password (as recommended): the correct client's AUTH competes with the flood
    // for the same argon2 verifiers.
    let mut env = remote_ends(&Opts::default()).await;
    let hash = smtp_oauth_bridge::smtp::auth::hash_password(
        &smtp_oauth_bridge::secret::Secret::new(PASSWORD),
    )
    .unwrap();
    env.config_text = env.config_text.replace(
        &format!("password_env = \"{PW_ENV}\""),
        &format!("password_hash = \"{hash}\""),
    );
    std::fs::write(&env.config_path, &env.config_text).unwrap();
    let bridge = BridgeProcess::start(&env.config_path, "info");
    let addr = bridge.addr;
    let before = bridge.peak_rss();

    const FLOOD: usize = 150;
    // Every flood connection is open and past EHLO before any AUTH is sent.
    let go = Arc::new(tokio::sync::Barrier::new(FLOOD + 1));
    let mut flood = Vec::new();
    for i in 0..FLOOD {
        let go = go.clone();
        flood.push(tokio::spawn(async move {
            let mut c = TcpSmtp::connect_from(FLOOD_SOURCE, addr).await;
            c.expect("EHLO flood", 250).await;
            go.wait().await;
            // Wrong passwords until the bridge closes the connection (at most 6).
            let mut codes = Vec::new();
            for _ in 0..6 {
                if !c
                    .try_send(format!("{}\r\n", wrong_auth(i)).as_bytes())
                    .await
                {
                    break;
                }
                match c.reply_within(Duration::from_secs(60)).await {
                    Ok((code, _)) => codes.push(code),
                    Err(_) => break,
                }
                match codes.last() {
                    Some(421) => break,
                    // Refused unchecked: a client would wait before trying again.
                    Some(454) => tokio::time::sleep(Duration::from_millis(50)).await,
                    _ => {}
                }
            }
            codes
        }));
    }
    go.wait().await;
    let flood_started = Instant::now();
    // The correct client, from another address, during the flood.
    let mut good = TcpSmtp::connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), addr).await;
    let busy = login_retrying(&mut good, flood_started + Duration::from_secs(30)).await;
    let (code, t) = good
        .send_message(MAILBOX, &["a@fabrikam.com"], &message("during-flood"))
        .await;
    let delivered_after = flood_started.elapsed();
    assert_eq!(code, 250, "{t}");
    assert!(
        delivered_after < Duration::from_secs(30),
        "the correct client delivered only after {delivered_after:?}"
    );
    assert_eq!(
        env.upstream.wait_received(1, Duration::from_secs(5)).await[0]
            .data
            .len(),
        message("during-flood").len()
    );
    let flood_still_running = flood.iter().any(|t| !t.is_finished());

    let mut codes = Vec::new();
    for t in flood {
        codes.extend(t.await.unwrap());
    }
    let count = |c: u16| codes.iter().filter(|x| **x == c).count();
    let peak = bridge.peak_rss();
    println!(
        "flood: {} replies: {} x 535, {} x 454, {} x 421; correct client: {busy} x 454, delivered after {delivered_after:?} (flood still running then: {flood_still_running}); peak RSS {} MiB (before {} MiB)",
        codes.len(),
        count(535),
        count(454),
        count(421),
        peak >> 20,
        before >> 20
    );
    assert!(
        codes.iter().all(|c| [535, 454, 421].contains(c)),
        "{codes:?}"
    );
    // The flood was real: every connection got an answer to its first AUTH, and argon2
    // checks did run.
    assert!(codes.len() >= FLOOD, "{} replies", codes.len());
    assert!(count(535) > 0, "no wrong password was ever checked");
    assert!(
        peak < 256 * 1024 * 1024,
        "peak RSS {} MiB under the flood (limit 256 MiB)",
        peak >> 20
    );
    assert!(bridge.stop().0.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_connections_with_three_wrong_passwords_each_get_at_most_100_checks() {
    let env = start(Opts::default()).await;
    let addr = env.addr;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..60 {
        tasks.push(tokio::spawn(async move {
            let mut c = TcpSmtp::connect_from(FLOOD_SOURCE, addr).await;
            c.expect("EHLO guesser", 250).await;
            let mut replies = Vec::new();
            for _ in 0..3 {
                replies.push(c.cmd(&wrong_auth(i)).await);
            }
            replies
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    assert_eq!(replies.len(), 180);
    // Every 535 is one evaluated argon2 check; a throttled address gets 454 without one (and
    // so does a check refused because too many wait).
    let evaluated = replies.iter().filter(|(c, _)| *c == 535).count();
    let throttled = replies
        .iter()
        .filter(|(c, t)| *c == 454 && t.contains("Too many failed logins from your address"))
        .count();
    let busy = replies
        .iter()
        .filter(|(c, t)| *c == 454 && t.contains("too many logins in progress"))
        .count();
    println!("{evaluated} x 535, {throttled} x 454 throttled, {busy} x 454 busy in {elapsed:?}");
    assert_eq!(
        evaluated + throttled + busy,
        180,
        "unexpected replies: {replies:?}"
    );
    assert!(evaluated >= 1, "nothing was checked at all");
    assert!(
        evaluated <= 100,
        "{evaluated} wrong passwords from one address were checked (limit 100)"
    );
    assert!(throttled > 0, "the address was never throttled");

    // A different address, with the correct password, still gets in and delivers.
    let mut c = TcpSmtp::connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)), addr).await;
    c.login().await;
    let (code, t) = c
        .send_message(MAILBOX, &["a@fabrikam.com"], &message("after-guessing"))
        .await;
    assert_eq!(code, 250, "{t}");
    assert_eq!(
        env.upstream.wait_received(1, Duration::from_secs(5)).await[0].data,
        message("after-guessing")
    );
}

// ---- Address validation and rendering --------------------------------------------------

/// A client logged in as `user` on a fresh connection.
async fn session_as(env: &Env, user: &str) -> TcpSmtp {
    let mut c = TcpSmtp::connect(env.addr).await;
    let (code, t) = c.ehlo_auth_plain(user, PASSWORD).await;
    assert_eq!(code, 235, "AUTH as {user}: {t}");
    c
}

/// The MAIL/RCPT lines we expect at the upstream: exactly `path_line`, followed by nothing
/// but parameters the bridge itself decides (`SIZE=n`, `BODY=8BITMIME`, `SMTPUTF8`).
fn is_rendered_as(line: &str, path_line: &str) -> bool {
    let Some(rest) = line.strip_prefix(path_line) else {
        return false;
    };
    rest.is_empty()
        || (rest.starts_with(' ')
            && rest.split(' ').skip(1).all(|p| {
                p == "BODY=8BITMIME"
                    || p == "SMTPUTF8"
                    || p.strip_prefix("SIZE=")
                        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
            && !path_line.starts_with("RCPT"))
}

struct Injections {
    env: Env,
    spool: bool,
    /// MAIL/RCPT lines the upstream may have received (see [`is_rendered_as`]).
    allowed: Vec<String>,
    /// Message-IDs sent and answered 250.
    accepted: Vec<String>,
}

impl Injections {
    /// MAIL as `user`; the reply to it.
    async fn mail(&self, user: &str, mail: &str) -> (TcpSmtp, u16, String) {
        let mut c = session_as(&self.env, user).await;
        let (code, t) = c.cmd(mail).await;
        (c, code, t)
    }

    /// After an accepted MAIL and RCPTs: DATA with a message `id`; it must be accepted.
    async fn finish(&mut self, c: &mut TcpSmtp, id: &str) {
        c.expect("DATA", 354).await;
        c.send(&dot_stuff(&message(id))).await;
        c.send(b".\r\n").await;
        let (code, t) = c.reply().await;
        assert_eq!(code, 250, "{id}: {t}");
        self.accepted.push(format!("<{id}@test>"));
    }

    /// `mail` as `user` is refused with `code` and `enhanced`.
    async fn mail_refused(&self, user: &str, mail: &str, code: u16, enhanced: &str) {
        let (_, c, t) = self.mail(user, mail).await;
        assert_eq!(
            (c, &t[..enhanced.len().min(t.len())]),
            (code, enhanced),
            "{user}: {mail:?} -> {c} {t}"
        );
    }

    /// `mail` as `user` is refused with 5xx, or accepted and relayed upstream exactly as
    /// `upstream_mail` (plus our own parameters).
    async fn mail_refused_or_exact(&mut self, id: &str, user: &str, mail: &str, upstream: &str) {
        let (mut c, code, t) = self.mail(user, mail).await;
        if (500..600).contains(&code) {
            return;
        }
        assert_eq!(code, 250, "{user}: {mail:?} -> {code} {t}");
        c.expect("RCPT TO:<a@fabrikam.com>", 250).await;
        self.allowed.push(upstream.to_string());
        self.allowed.push("RCPT TO:<a@fabrikam.com>".to_string());
        self.finish(&mut c, id).await;
    }

    /// `rcpt` (after an accepted MAIL as the main account) is refused with 5xx, or
    /// accepted and relayed upstream exactly as `upstream`.
    async fn rcpt_refused_or_exact(&mut self, id: &str, mail: &str, rcpt: &str, upstream: &str) {
        let (mut c, code, t) = self.mail(USER, mail).await;
        assert_eq!(code, 250, "{mail:?} -> {code} {t}");
        let (code, t) = c.cmd(rcpt).await;
        if (500..600).contains(&code) {
            return;
        }
        assert_eq!(code, 250, "{rcpt:?} -> {code} {t}");
        self.allowed.push(mail_line_for(mail));
        self.allowed.push(upstream.to_string());
        self.finish(&mut c, id).await;
    }

    /// `rcpt` is refused with exactly `code` and `enhanced`.
    async fn rcpt_refused(&self, mail: &str, rcpt: &str, code: u16, enhanced: &str) {
        let (mut c, mcode, t) = self.mail(USER, mail).await;
        assert_eq!(mcode, 250, "{mail:?} -> {mcode} {t}");
        let (rc, t) = c.cmd(rcpt).await;
        assert_eq!(
            (rc, &t[..enhanced.len().min(t.len())]),
            (code, enhanced),
            "{rcpt:?} -> {rc} {t}"
        );
        // Nothing to send: DATA is refused too.
        let (dc, t) = c.cmd("DATA").await;
        assert!(
            (500..600).contains(&dc),
            "DATA after a refused RCPT: {dc} {t}"
        );
    }
}

/// The upstream MAIL line for a client's plain `MAIL FROM:<a@b>[ SMTPUTF8]`.
fn mail_line_for(mail: &str) -> String {
    let path_end = mail.find('>').map_or(mail.len(), |i| i + 1);
    mail[..path_end].to_string()
}

async fn injection_strings(spool: bool) {
    let opts = Opts {
        extra: if spool { SPOOL.into() } else { String::new() },
        upstream: "messages_per_minute = 0".into(),
        ..Opts::default()
    };
    let env = start_with_accounts(
        opts,
        &[
            ("wild", &["*@contoso.com"]),
            ("exact", &["scanner@contoso.com"]),
            ("kelvin", &["kelvin@contoso.com"]),
        ],
    )
    .await;
    let mut t = Injections {
        env,
        spool,
        allowed: Vec::new(),
        accepted: Vec::new(),
    };

    // The finding: a quoted local part that looks like a parameter.
    t.mail_refused_or_exact(
        "envid",
        "wild",
        r#"MAIL FROM:<"ceo@fabrikam.com> ENVID=<"@contoso.com>"#,
        r#"MAIL FROM:<"ceo@fabrikam.com> ENVID=<"@contoso.com>"#,
    )
    .await;
    t.mail_refused(
        "exact",
        r#"MAIL FROM:<"scanner@contoso.com> X=<"@fabrikam.com>"#,
        550,
        "5.7.1",
    )
    .await;
    // A quoted dot-string is the same address, rendered without the quotes.
    t.mail_refused_or_exact(
        "quoted-plain",
        "exact",
        r#"MAIL FROM:<"scanner"@contoso.com>"#,
        "MAIL FROM:<scanner@contoso.com>",
    )
    .await;
    // DSN parameters are not offered, so never forwarded; quoted they are address text.
    t.rcpt_refused(
        &format!("MAIL FROM:<{MAILBOX}>"),
        "RCPT TO:<a@fabrikam.com> NOTIFY=SUCCESS ORCPT=rfc822;x@y",
        555,
        "5.5.4",
    )
    .await;
    t.rcpt_refused_or_exact(
        "notify-quoted",
        &format!("MAIL FROM:<{MAILBOX}>"),
        r#"RCPT TO:<"x> NOTIFY=NEVER"@fabrikam.com>"#,
        r#"RCPT TO:<"x> NOTIFY=NEVER"@fabrikam.com>"#,
    )
    .await;
    assert!(
        t.allowed
            .iter()
            .any(|l| l == r#"RCPT TO:<"x> NOTIFY=NEVER"@fabrikam.com>"#),
        "the quoted recipient must be relayed (it is a valid address): {:?}",
        t.allowed
    );
    // Backslashes: an escaped quote stays inside the local part, re-escaped on the way out.
    t.rcpt_refused_or_exact(
        "backslash-quote",
        &format!("MAIL FROM:<{MAILBOX}>"),
        r#"RCPT TO:<"a\"> NOTIFY=NEVER"@fabrikam.com>"#,
        r#"RCPT TO:<"a\"> NOTIFY=NEVER"@fabrikam.com>"#,
    )
    .await;
    t.rcpt_refused_or_exact(
        "backslash",
        &format!("MAIL FROM:<{MAILBOX}>"),
        r#"RCPT TO:<"a\\"@fabrikam.com>"#,
        r#"RCPT TO:<"a\\"@fabrikam.com>"#,
    )
    .await;
    // An escaped backslash ends the quoted string early: what follows is no address.
    let (mut c, code, _) = t.mail(USER, &format!("MAIL FROM:<{MAILBOX}>")).await;
    assert_eq!(code, 250);
    let (code, text) = c
        .cmd(r#"RCPT TO:<"a\\"> NOTIFY=NEVER "@fabrikam.com>"#)
        .await;
    assert!((500..600).contains(&code), "{code} {text}");
    // Unicode case tricks: the Kelvin sign is not `k`, a long s is not `s`.
    t.mail_refused(
        "kelvin",
        "MAIL FROM:<\u{212A}elvin@contoso.com>",
        553,
        "5.6.7",
    )
    .await;
    t.mail_refused(
        "kelvin",
        "MAIL FROM:<\u{212A}elvin@contoso.com> SMTPUTF8",
        550,
        "5.7.1",
    )
    .await;
    t.mail_refused(
        "wild",
        "MAIL FROM:<x@conto\u{17F}o.com> SMTPUTF8",
        550,
        "5.7.1",
    )
    .await;
    // ASCII case folding does apply (so the refusals above are about Unicode only).
    t.mail_refused_or_exact(
        "kelvin-ascii",
        "kelvin",
        "MAIL FROM:<KELVIN@Contoso.COM>",
        "MAIL FROM:<KELVIN@Contoso.COM>",
    )
    .await;
    assert!(
        t.accepted.iter().any(|id| id == "<kelvin-ascii@test>"),
        "ASCII case folding must accept KELVIN@Contoso.COM"
    );
    // A non-ASCII recipient needs SMTPUTF8, and then goes upstream with it.
    t.rcpt_refused(
        &format!("MAIL FROM:<{MAILBOX}>"),
        "RCPT TO:<ren\u{e9}@fabrikam.com>",
        553,
        "5.6.7",
    )
    .await;
    let (mut c, code, text) = t
        .mail(USER, &format!("MAIL FROM:<{MAILBOX}> SMTPUTF8"))
        .await;
    assert_eq!(code, 250, "{text}");
    c.expect("RCPT TO:<ren\u{e9}@fabrikam.com>", 250).await;
    t.allowed.push(format!("MAIL FROM:<{MAILBOX}>"));
    t.allowed.push("RCPT TO:<ren\u{e9}@fabrikam.com>".into());
    t.finish(&mut c, "utf8-rcpt").await;
    // Tabs are no parameter separators, and no address characters outside quotes.
    t.mail_refused(USER, &format!("MAIL FROM:<{MAILBOX}>\tSIZE=1"), 501, "5.")
        .await;
    let (mut c, _, _) = t.mail(USER, &format!("MAIL FROM:<{MAILBOX}>")).await;
    let (code, text) = c.cmd("RCPT TO:<a@fabrikam.com>\tNOTIFY=NEVER").await;
    assert!((500..600).contains(&code), "{code} {text}");
    t.rcpt_refused_or_exact(
        "quoted-tab",
        &format!("MAIL FROM:<{MAILBOX}>"),
        "RCPT TO:<\"a\tb\"@fabrikam.com>",
        "RCPT TO:<\"a\tb\"@fabrikam.com>",
    )
    .await;
    // A repeated SIZE: refused, or one SIZE of our own upstream.
    t.mail_refused_or_exact(
        "size-twice",
        USER,
        &format!("MAIL FROM:<{MAILBOX}> SIZE=1 SIZE=2"),
        &format!("MAIL FROM:<{MAILBOX}>"),
    )
    .await;
    // Parameters we do not offer.
    for p in ["ENVID=x", "RET=FULL", "X-EVIL=1"] {
        let (_, code, text) = t.mail(USER, &format!("MAIL FROM:<{MAILBOX}> {p}")).await;
        assert!((500..600).contains(&code), "{p}: {code} {text}");
    }
    // AUTH= (RFC 4954) may be accepted, but it is never forwarded.
    t.mail_refused_or_exact(
        "auth-param",
        USER,
        &format!("MAIL FROM:<{MAILBOX}> AUTH=<>x"),
        &format!("MAIL FROM:<{MAILBOX}>"),
    )
    .await;
    // RCPT <postmaster> without a domain (RFC 5321 4.1.1.3) goes upstream as written, never
    // turned into <> (or anything else).
    for (i, rcpt) in ["RCPT TO:<postmaster>", "RCPT TO:<Postmaster>"]
        .iter()
        .enumerate()
    {
        t.rcpt_refused_or_exact(
            &format!("postmaster-{i}"),
            &format!("MAIL FROM:<{MAILBOX}>"),
            rcpt,
            rcpt,
        )
        .await;
    }
    let (_, code, text) = t.mail(USER, "MAIL FROM:<postmaster>").await;
    assert!((500..600).contains(&code), "{code} {text}");
    // A source route is dropped; the mailbox goes upstream on its own.
    t.rcpt_refused_or_exact(
        "source-route",
        &format!("MAIL FROM:<{MAILBOX}>"),
        "RCPT TO:<@evil.example:route@fabrikam.com>",
        "RCPT TO:<route@fabrikam.com>",
    )
    .await;

    // What the upstream received: every accepted message once, and no other MAIL/RCPT line.
    let up = &t.env.upstream;
    let got = up
        .wait_received(t.accepted.len(), Duration::from_secs(20))
        .await;
    assert_eq!(got.len(), t.accepted.len(), "{:?}", up.message_ids());
    let mut ids = up.message_ids();
    ids.sort();
    let mut want = t.accepted.clone();
    want.sort();
    assert_eq!(ids, want);
    let lines = upstream_lines(up);
    for l in lines
        .iter()
        .filter(|l| l.starts_with("MAIL") || l.starts_with("RCPT"))
    {
        assert!(
            t.allowed.iter().any(|a| is_rendered_as(l, a)),
            "the upstream received {l:?}, which is none of {:#?}",
            t.allowed
        );
        assert!(!l.contains("ORCPT") && !l.contains("NOTIFY=SUCCESS") && !l.contains("ENVID=x"));
        assert_ne!(l, "MAIL FROM:<>");
        assert!(
            l.is_ascii() || l.contains(" SMTPUTF8") || l.starts_with("RCPT"),
            "{l:?}"
        );
    }
    // Every allowed line did arrive (nothing was silently rewritten).
    for a in &t.allowed {
        assert!(
            lines.iter().any(|l| is_rendered_as(l, a)),
            "{a:?} never reached the upstream; it got {lines:#?}"
        );
    }
    // The non-ASCII recipient's transaction declared SMTPUTF8 upstream.
    let utf8 = got
        .iter()
        .find(|m| m.rcpts == ["ren\u{e9}@fabrikam.com"])
        .expect("the UTF-8 message");
    assert!(
        utf8.mail_params.split(' ').any(|p| p == "SMTPUTF8"),
        "MAIL params {:?}",
        utf8.mail_params
    );
    // The ENVID string, if relayed, kept its quotes.
    if let Some(m) = got.iter().find(|m| m.mail_from.contains("ENVID")) {
        assert_eq!(m.mail_from, r#""ceo@fabrikam.com> ENVID=<"@contoso.com"#);
        assert!(!m.mail_params.contains("ENVID"), "{}", m.mail_params);
    }
    if t.spool {
        // Nothing is left to deliver twice.
        let spool = t.env.dir.path().join("state/spool");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_dir(&spool).map_or(0, |d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "msg"))
                .count()
        }) > 0
        {
            assert!(Instant::now() < deadline, "spool not drained");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(up.received_count(), t.accepted.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_strings_are_refused_or_relayed_with_their_quoting_intact_sync() {
    injection_strings(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injection_strings_are_refused_or_relayed_with_their_quoting_intact_spool() {
    injection_strings(true).await;
}

// ---- A small max_message_bytes ----------------------------------------------------------

fn sized(id: &str, size: usize) -> Vec<u8> {
    let mut m =
        format!("From: scanner@contoso.com\r\nMessage-ID: <{id}@test>\r\nSubject: {id}\r\n\r\n")
            .into_bytes();
    while m.len() + 72 <= size {
        m.extend_from_slice(&[b'x'; 70]);
        m.extend_from_slice(b"\r\n");
    }
    while m.len() < size - 2 {
        m.push(b'y');
    }
    m.extend_from_slice(b"\r\n");
    m
}

/// DATA, then `content` and the final dot in one write or in `chunk`-byte writes; the
/// final reply.
async fn data_in_pieces(c: &mut TcpSmtp, content: &[u8], chunk: Option<usize>) -> (u16, String) {
    c.expect("DATA", 354).await;
    let mut all = dot_stuff(content);
    all.extend_from_slice(b".\r\n");
    match chunk {
        None => c.send(&all).await,
        Some(n) => {
            for piece in all.chunks(n) {
                c.send(piece).await;
            }
        }
    }
    c.reply().await
}

async fn small_max_message_bytes(spool: bool) {
    let env = start(Opts {
        listen: "max_message_bytes = 4000".into(),
        extra: if spool { SPOOL.into() } else { String::new() },
        upstream: "messages_per_minute = 0".into(),
        ..Opts::default()
    })
    .await;
    let mut c = TcpSmtp::connect(env.addr).await;
    let (_, ehlo) = c.cmd("EHLO x").await;
    assert!(ehlo.lines().any(|l| l == "SIZE 4000"), "{ehlo}");
    let (code, t) = c
        .cmd(&format!("AUTH PLAIN {}", base64_plain(USER, PASSWORD)))
        .await;
    assert_eq!(code, 235, "{t}");
    let mut delivered = Vec::new();
    for chunk in [None, Some(7), Some(1)] {
        let tag = chunk.map_or("whole".to_string(), |n| format!("by{n}"));
        // Small: delivered.
        let small = sized(&format!("small-{tag}"), 1500);
        c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
        c.expect("RCPT TO:<a@fabrikam.com>", 250).await;
        let (code, t) = data_in_pieces(&mut c, &small, chunk).await;
        assert_eq!(code, 250, "{tag}: {t}");
        delivered.push(small);
        // 5000 bytes: 552 5.3.4, nothing delivered, the session goes on.
        c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
        c.expect("RCPT TO:<a@fabrikam.com>", 250).await;
        let (code, t) = data_in_pieces(&mut c, &sized(&format!("big-{tag}"), 5000), chunk).await;
        assert_eq!((code, &t[..5]), (552, "5.3.4"), "{tag}: {t}");
        c.expect("NOOP", 250).await;
    }
    // Declared too big: refused at MAIL.
    let t = c
        .expect(&format!("MAIL FROM:<{MAILBOX}> SIZE=5000"), 552)
        .await;
    assert!(t.starts_with("5.3.4"), "{t}");
    // And still alive: a new connection delivers too.
    let mut c2 = TcpSmtp::connect(env.addr).await;
    c2.login().await;
    let last = sized("last", 3000);
    assert_eq!(
        c2.send_message(MAILBOX, &["a@fabrikam.com"], &last).await.0,
        250
    );
    delivered.push(last);
    let got = env.upstream.wait_received(4, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 4, "{:?}", env.upstream.message_ids());
    let mut got: Vec<Vec<u8>> = got.into_iter().map(|m| m.data).collect();
    got.sort();
    delivered.sort();
    assert!(got == delivered, "delivered bytes differ");
    // Nothing more arrives (the big ones were not spooled either).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.upstream.received_count(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_message_bytes_4000_delivers_small_refuses_larger_with_552_and_lives_sync() {
    small_max_message_bytes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_message_bytes_4000_delivers_small_refuses_larger_with_552_and_lives_spool() {
    small_max_message_bytes(true).await;
}

/// A client that opens a transaction (so it holds one of the mailbox's upstream sessions)
/// and then only NOOPs used to keep that session for ever: with one session per mailbox, a
/// second client could never send. Now a transaction holds its upstream session at most
/// `upstream.timeout_secs` before DATA; then it is given back and the holder gets 451.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noop_ing_client_cannot_hold_the_mailboxs_upstream_session() {
    let env = start(Opts {
        upstream: "timeout_secs = 2\nmax_sessions_per_mailbox = 1".into(),
        ..Opts::default()
    })
    .await;
    let mut holder = TcpSmtp::connect(env.addr).await;
    holder.login().await;
    holder.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    holder.expect("RCPT TO:<a@fabrikam.com>", 250).await;
    let noops = tokio::spawn(async move {
        // Far longer than the hold limit; every NOOP is answered.
        for _ in 0..40 {
            holder.expect("NOOP", 250).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        holder
    });
    // The other client keeps trying for up to 12 s (451 4.3.2 while the session is held).
    let started = std::time::Instant::now();
    let mut delivered = false;
    let mut attempts = 0;
    while !delivered && started.elapsed() < Duration::from_secs(12) {
        attempts += 1;
        let mut c = TcpSmtp::connect(env.addr).await;
        c.login().await;
        c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
        let (code, _) = c.cmd("RCPT TO:<b@fabrikam.com>").await;
        if code == 250 {
            c.expect("DATA", 354).await;
            c.send(b"Subject: second\r\n\r\nsecond client\r\n.\r\n")
                .await;
            let (code, t) = c.reply().await;
            assert_eq!(code, 250, "{t}");
            delivered = true;
        } else {
            assert_eq!(code, 451, "while the session is held");
        }
    }
    assert!(
        delivered,
        "the second client never got the session ({attempts} attempts)"
    );
    let mut holder = noops.await.unwrap();
    // The holder's transaction lost its session: DATA is refused with 451, never 354.
    let (code, t) = holder.cmd("DATA").await;
    assert_eq!(code, 451, "{t}");
    assert!(t.starts_with("4.4.2"), "{t}");
    let got = env.upstream.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts, vec!["b@fabrikam.com".to_string()]);
}

/// An upstream that refuses the DATA command keeps its transaction open (as Postfix does):
/// the pooled session must be RSET before it serves the next message, or every later MAIL on
/// it gets `503 5.5.2 Sender already specified`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_data_was_refused_is_reset_before_it_is_reused() {
    let env = start(Opts::default()).await;
    env.upstream
        .set_data_command_reply(Some(testkit::Reply::new(
            452,
            "4.3.1 Insufficient system storage",
        )));
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    c.expect("RCPT TO:<a@fabrikam.com>", 250).await;
    // Sync mode answers 354 while DATA goes upstream; the refusal is the final reply.
    c.expect("DATA", 354).await;
    c.send(b"Subject: refused\r\n\r\nbody\r\n.\r\n").await;
    let (code, t) = c.reply().await;
    assert!(
        (400..500).contains(&code),
        "DATA refused upstream: {code} {t}"
    );
    env.upstream.set_data_command_reply(None);
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    c.expect("RCPT TO:<b@fabrikam.com>", 250).await;
    c.expect("DATA", 354).await;
    c.send(b"Subject: after a refused DATA\r\n\r\nbody\r\n.\r\n")
        .await;
    let (code, t) = c.reply().await;
    assert_eq!(code, 250, "{t}");
    let got = env.upstream.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts, vec!["b@fabrikam.com".to_string()]);
    // The same upstream session served both, with RSET between them.
    assert_eq!(env.upstream.connections(), 1);
    let log = env.upstream.log().join("\n");
    let rset = log.find("RSET").expect("an RSET upstream");
    let second_mail = log.rfind("MAIL FROM").unwrap();
    assert!(rset < second_mail, "{log}");
}

/// Refused recipients count too: a client cannot probe addresses upstream without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rcpt_attempts_are_bounded_whatever_the_verdict() {
    let env = start(Opts {
        listen: "max_recipients = 2".into(),
        ..Opts::default()
    })
    .await;
    env.upstream.set_rcpt_reply(
        "probe@fabrikam.com",
        Some(testkit::Reply::new(550, "5.1.10 Recipient not found")),
    );
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    for _ in 0..4 {
        c.expect("RCPT TO:<probe@fabrikam.com>", 550).await;
    }
    let t = c.expect("RCPT TO:<probe@fabrikam.com>", 452).await;
    assert!(t.starts_with("4.5.3"), "{t}");
    let rcpts = upstream_lines(&env.upstream)
        .iter()
        .filter(|l| l.starts_with("RCPT TO"))
        .count();
    assert_eq!(rcpts, 4, "only the allowed attempts reached the upstream");
}
