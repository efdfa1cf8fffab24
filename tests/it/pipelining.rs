//! Fewer upstream round trips (issue 14): where the upstream offers PIPELINING, MAIL and the
//! first RCPT (sync mode) or MAIL and every RCPT (spool mode) go in one flight, each reply
//! still mapped to its own command; where it offers CHUNKING, the content goes as BDAT (no
//! DATA/354 round trip), byte for byte what the client sent; without them, one command per
//! round trip and DATA, as before. No RSET after a completed transaction. Observed through
//! the fake upstream's command log, grouped into flights (the commands that arrived in one
//! read), and its pipelining-violation count (a strict server's view).

use crate::harness::*;
use std::time::{Duration, Instant};
use testkit::{FakeUpstream, Reply};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const SPOOL: &str = "[queue]\nmode = \"spool\"\nretry_min_secs = 1\nretry_max_secs = 2\n";

fn spool_opts() -> Opts {
    Opts {
        extra: SPOOL.into(),
        ..Opts::default()
    }
}

fn refused() -> Reply {
    Reply::new(
        550,
        "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found",
    )
}

/// The fake's flights, each line without its `S<n> ` session prefix.
fn flights(up: &FakeUpstream) -> Vec<Vec<String>> {
    up.flights()
        .into_iter()
        .map(|f| {
            f.into_iter()
                .map(|l| l.split_once(' ').map_or(l.clone(), |(_, r)| r.to_string()))
                .collect()
        })
        .collect()
}

/// The flights from the first MAIL on (connection setup and AUTH left out).
fn transaction_flights(up: &FakeUpstream) -> Vec<Vec<String>> {
    let all = flights(up);
    let first = all
        .iter()
        .position(|f| f[0].starts_with("MAIL FROM:"))
        .unwrap_or(all.len());
    all[first..].to_vec()
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// MAIL, the RCPTs (their codes), DATA and `content`; the final reply.
async fn submit(c: &mut TcpSmtp, rcpts: &[&str], content: &[u8]) -> (Vec<u16>, (u16, String)) {
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    let mut codes = Vec::new();
    for r in rcpts {
        codes.push(c.cmd(&format!("RCPT TO:<{r}>")).await.0);
    }
    c.expect("DATA", 354).await;
    c.send(&dot_stuff(content)).await;
    c.send(b".\r\n").await;
    (codes, c.reply().await)
}

const MSG: &[u8] =
    b"From: scanner@contoso.com\r\nTo: a@fabrikam.com\r\nSubject: pipelined\r\n\r\nbody\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mail_and_first_rcpt_in_one_flight_each_reply_mapped_to_its_rcpt() {
    let env = start(Opts::default()).await;
    let up = &env.upstream;
    up.set_rcpt_reply("nobody@fabrikam.com", Some(refused()));
    up.set_rcpt_reply("gone@fabrikam.com", Some(refused()));
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    // The refused recipient is the one that travels with MAIL.
    let rcpts = [
        "nobody@fabrikam.com",
        "a@fabrikam.com",
        "gone@fabrikam.com",
        "b@fabrikam.com",
    ];
    let (codes, (code, t)) = submit(&mut c, &rcpts, MSG).await;
    assert_eq!(codes, [550, 250, 550, 250]);
    assert_eq!(code, 250, "{t}");
    let got = up.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts, ["a@fabrikam.com", "b@fabrikam.com"]);
    assert_eq!(got[0].data, MSG);
    let f = transaction_flights(up);
    assert!(
        f[0][0].starts_with(&format!("MAIL FROM:<{MAILBOX}>")),
        "{f:?}"
    );
    assert_eq!(f[0][1..], ["RCPT TO:<nobody@fabrikam.com>"], "{f:?}");
    assert_eq!(f[1], ["RCPT TO:<a@fabrikam.com>"], "{f:?}");
    assert_eq!(f[2], ["RCPT TO:<gone@fabrikam.com>"], "{f:?}");
    assert_eq!(f[3], ["RCPT TO:<b@fabrikam.com>"], "{f:?}");
    assert_eq!(f[4], [format!("BDAT {} LAST", MSG.len())], "{f:?}");
    assert_eq!(f.len(), 5, "{f:?}");
    assert_eq!(up.pipelining_violations(), 0);
}

/// A refused MAIL is the verdict of the RCPT it travelled with, and of every later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_refused_mail_is_every_rcpts_reply() {
    let env = start(Opts::default()).await;
    env.upstream.set_mail_reply(Some(Reply::new(
        550,
        "5.7.60 SMTP; Client does not have permissions to send as this sender",
    )));
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    let (c1, t1) = c.cmd("RCPT TO:<a@fabrikam.com>").await;
    let (c2, t2) = c.cmd("RCPT TO:<b@fabrikam.com>").await;
    assert_eq!((c1, c2), (550, 550), "{t1} / {t2}");
    assert_eq!(t1, t2);
    assert!(t1.contains("5.7.60"), "{t1}");
    c.expect("DATA", 550).await;
    // The session stays usable: the next message goes through on the same connection.
    env.upstream.set_mail_reply(None);
    let (codes, (code, t)) = submit(&mut c, &["a@fabrikam.com"], MSG).await;
    assert_eq!((codes, code), (vec![250], 250), "{t}");
    assert_eq!(env.upstream.connections(), 1);
    // The pipelined RCPT after the refused MAIL got the server's 503, read and dropped.
    let f = transaction_flights(&env.upstream);
    assert_eq!(f[0].len(), 2, "{f:?}");
    assert_eq!(f[0][1], "RCPT TO:<a@fabrikam.com>", "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_mail_and_every_rcpt_in_one_flight_each_verdict_kept() {
    let env = start(spool_opts()).await;
    let up = &env.upstream;
    up.set_rcpt_reply("gone@fabrikam.com", Some(refused()));
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let (codes, (code, t)) = submit(
        &mut c,
        &["a@fabrikam.com", "gone@fabrikam.com", "b@fabrikam.com"],
        MSG,
    )
    .await;
    // Spool mode answers locally; the upstream judges at delivery.
    assert_eq!(codes, [250, 250, 250]);
    assert_eq!(code, 250, "{t}");
    let got = up.wait_received(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts, ["a@fabrikam.com", "b@fabrikam.com"]);
    assert_eq!(got[0].data, MSG);
    let f = transaction_flights(up);
    assert_eq!(f[0].len(), 4, "{f:?}");
    assert!(
        f[0][0].starts_with(&format!("MAIL FROM:<{MAILBOX}>")),
        "{f:?}"
    );
    assert_eq!(
        f[0][1..],
        [
            "RCPT TO:<a@fabrikam.com>",
            "RCPT TO:<gone@fabrikam.com>",
            "RCPT TO:<b@fabrikam.com>"
        ],
        "{f:?}"
    );
    assert_eq!(f[1], [format!("BDAT {} LAST", MSG.len())], "{f:?}");
    assert_eq!(f.len(), 2, "{f:?}");
    // The refused recipient is not retried: the message is done (dead for `gone`).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mails = upstream_lines(up)
        .iter()
        .filter(|l| l.starts_with("MAIL FROM"))
        .count();
    assert_eq!(mails, 1);
}

/// The fake, as a strict server, refuses a command sent before the previous reply when it
/// does not offer PIPELINING (so the fallback test below can fail).
#[tokio::test]
async fn the_fake_refuses_pipelined_commands_when_pipelining_is_off() {
    let env = remote_ends(&Opts::default()).await;
    env.upstream.set_offer_pipelining(false);
    let tcp = tokio::net::TcpStream::connect(env.upstream.addr())
        .await
        .unwrap();
    let (r, mut w) = tcp.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("220 "), "{line}");
    w.write_all(b"EHLO x\r\nNOOP\r\n").await.unwrap();
    let mut lines = Vec::new();
    while !lines.last().is_some_and(|l: &String| l.starts_with("554")) {
        line.clear();
        assert!(r.read_line(&mut line).await.unwrap() > 0, "{lines:?}");
        lines.push(line.clone());
    }
    assert!(!lines.iter().any(|l| l.contains("PIPELINING")), "{lines:?}");
    assert_eq!(env.upstream.pipelining_violations(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pipelining_one_command_per_round_trip_and_it_works() {
    for spool in [false, true] {
        let env = start(if spool { spool_opts() } else { Opts::default() }).await;
        let up = &env.upstream;
        up.set_offer_pipelining(false);
        up.set_rcpt_reply("gone@fabrikam.com", Some(refused()));
        let mut c = TcpSmtp::connect(env.addr).await;
        c.login().await;
        let rcpts = ["a@fabrikam.com", "gone@fabrikam.com", "b@fabrikam.com"];
        let (codes, (code, t)) = submit(&mut c, &rcpts, MSG).await;
        let want: &[u16] = if spool {
            &[250, 250, 250]
        } else {
            &[250, 550, 250]
        };
        assert_eq!(codes, want, "spool {spool}");
        assert_eq!(code, 250, "spool {spool}: {t}");
        let got = up.wait_received(1, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1, "spool {spool}");
        assert_eq!(got[0].rcpts, ["a@fabrikam.com", "b@fabrikam.com"]);
        assert_eq!(got[0].data, MSG);
        // CHUNKING is still offered: BDAT, each chunk waiting for the previous one's reply.
        let large = contents().pop().unwrap();
        let (_, (code, t)) = submit(&mut c, &["a@fabrikam.com"], &large).await;
        assert_eq!(code, 250, "spool {spool}: {t}");
        let got = up.wait_received(2, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 2, "spool {spool}");
        assert!(got[1].data == large);
        assert_eq!(up.pipelining_violations(), 0, "spool {spool}");
        let f = flights(up);
        assert!(f.iter().all(|f| f.len() == 1), "spool {spool}: {f:?}");
        let lines = upstream_lines(up);
        assert!(
            lines.contains(&format!("BDAT {} LAST", MSG.len())),
            "{lines:?}"
        );
        let chunks = lines.iter().filter(|l| l.starts_with("BDAT")).count();
        assert!(chunks >= 3, "{lines:?}");
    }
}

/// Messages whose bytes must arrive exactly: dots at line starts, a lone dot line, an empty
/// message (its content is "\r\n" on the wire, whatever the transfer), 8-bit bytes, and one
/// large enough for several BDAT chunks.
fn contents() -> Vec<Vec<u8>> {
    let mut large = Vec::new();
    let mut i = 0u32;
    while large.len() < 300 * 1024 {
        large.extend_from_slice(format!(".line {i} \u{e9}\u{e8}\r\n").as_bytes());
        i += 1;
    }
    vec![
        b"Subject: dots\r\n\r\n.leading\r\n..double\r\n.\r\nend\r\n".to_vec(),
        Vec::new(),
        "Subject: 8bit\r\n\r\nCaf\u{e9} \u{1f600}\r\n"
            .as_bytes()
            .to_vec(),
        large,
    ]
}

/// The bytes the upstream received for each of [`contents`], sent through the bridge in
/// sync or spool mode with CHUNKING offered or not; the upstream's command lines.
async fn relay_contents(spool: bool, chunking: bool) -> (Vec<Vec<u8>>, Vec<String>) {
    let env = start(if spool { spool_opts() } else { Opts::default() }).await;
    env.upstream.set_offer_chunking(chunking);
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let all = contents();
    for content in &all {
        let (codes, (code, t)) = submit(&mut c, &["a@fabrikam.com"], content).await;
        assert_eq!((codes, code), (vec![250], 250), "{t}");
    }
    let got = env
        .upstream
        .wait_received(all.len(), Duration::from_secs(20))
        .await;
    assert_eq!(got.len(), all.len());
    let mut data: Vec<(String, Vec<u8>)> = got
        .into_iter()
        .map(|m| (m.rcpts.join(","), m.data))
        .collect();
    if spool {
        // Spool workers may deliver in any order.
        data.sort_by_key(|(_, d)| d.len());
    }
    (
        data.into_iter().map(|(_, d)| d).collect(),
        upstream_lines(&env.upstream),
    )
}

fn expected(mut all: Vec<Vec<u8>>, spool: bool) -> Vec<Vec<u8>> {
    for c in &mut all {
        if c.is_empty() {
            c.extend_from_slice(b"\r\n");
        }
    }
    if spool {
        all.sort_by_key(Vec::len);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_chunking_content_goes_as_bdat_byte_for_byte() {
    for spool in [false, true] {
        let (data, lines) = relay_contents(spool, true).await;
        assert!(
            data == expected(contents(), spool),
            "spool {spool}: bytes differ"
        );
        assert!(!lines.iter().any(|l| l == "DATA"), "{lines:?}");
        let bdat: Vec<&String> = lines.iter().filter(|l| l.starts_with("BDAT ")).collect();
        // One `BDAT n LAST` for each small message; the large one in several chunks.
        let last = bdat.iter().filter(|l| l.ends_with(" LAST")).count();
        assert_eq!(last, 4, "{bdat:?}");
        assert!(bdat.len() > last, "a chunk before the last: {bdat:?}");
        assert!(bdat.contains(&&"BDAT 2 LAST".to_string()), "{bdat:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_chunking_content_goes_as_data_byte_for_byte() {
    for spool in [false, true] {
        let (data, lines) = relay_contents(spool, false).await;
        assert!(
            data == expected(contents(), spool),
            "spool {spool}: bytes differ"
        );
        assert_eq!(
            lines.iter().filter(|l| *l == "DATA").count(),
            4,
            "{lines:?}"
        );
        assert!(!lines.iter().any(|l| l.starts_with("BDAT")), "{lines:?}");
    }
}

/// The round trips of a message on a warm session, for a client that does not pipeline:
/// MAIL+RCPT, then the content; no DATA, no RSET, no NOOP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_session_costs_two_flights_per_message_and_no_rset() {
    let env = start(Opts::default()).await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    for _ in 0..3 {
        let (codes, (code, t)) = submit(&mut c, &["a@fabrikam.com"], MSG).await;
        assert_eq!((codes, code), (vec![250], 250), "{t}");
    }
    c.expect("QUIT", 221).await;
    // A new local connection per message (as the benchmark does) reuses the session too.
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let (_, (code, _)) = submit(&mut c, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250);
    c.expect("QUIT", 221).await;
    let f = transaction_flights(&env.upstream);
    assert_eq!(f.len(), 8, "{f:?}");
    for pair in f.chunks(2) {
        assert_eq!(pair[0].len(), 2, "{f:?}");
        assert_eq!(pair[0][1], "RCPT TO:<a@fabrikam.com>", "{f:?}");
        assert_eq!(pair[1], [format!("BDAT {} LAST", MSG.len())], "{f:?}");
    }
    assert_eq!(env.upstream.connections(), 1);
    let lines = upstream_lines(&env.upstream);
    assert!(
        !lines.iter().any(|l| l == "RSET" || l == "NOOP"),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_sends_no_rset_after_completed_transactions() {
    let env = start(Opts {
        upstream: "max_sessions_per_mailbox = 1".into(),
        ..spool_opts()
    })
    .await;
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    for _ in 0..3 {
        let (_, (code, t)) = submit(&mut c, &["a@fabrikam.com"], MSG).await;
        assert_eq!(code, 250, "{t}");
    }
    let got = env.upstream.wait_received(3, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|m| m.session == 1));
    let lines = upstream_lines(&env.upstream);
    assert!(!lines.iter().any(|l| l == "RSET"), "{lines:?}");
}

/// A BDAT chunk refused mid-content (here the first of several, while later ones are already
/// on their way): the transaction fails with that reply, nothing is delivered, and the
/// session is reset (or replaced) so the next message goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_bdat_chunk_fails_the_message_and_nothing_partial_is_delivered() {
    let env = start(Opts::default()).await;
    let up = &env.upstream;
    let large = contents().pop().unwrap();
    up.set_data_command_reply(Some(Reply::new(452, "4.3.1 Insufficient system storage")));
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let (_, (code, t)) = submit(&mut c, &["a@fabrikam.com"], &large).await;
    assert!((400..500).contains(&code), "{code} {t}");
    assert!(up.received().is_empty());
    let lines = upstream_lines(up);
    let first = lines.iter().find(|l| l.starts_with("BDAT")).unwrap();
    assert!(!first.ends_with("LAST"), "not the last chunk: {lines:?}");
    up.set_data_command_reply(None);
    let (_, (code, t)) = submit(&mut c, &["b@fabrikam.com"], &large).await;
    assert_eq!(code, 250, "{t}");
    let got = up.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpts, ["b@fabrikam.com"]);
    assert!(got[0].data == large);

    // Spool mode: deferred, then delivered once, whole.
    let env = start(spool_opts()).await;
    let up = &env.upstream;
    up.set_data_command_reply(Some(Reply::new(452, "4.3.1 Insufficient system storage")));
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let (_, (code, t)) = submit(&mut c, &["a@fabrikam.com"], &large).await;
    assert_eq!(code, 250, "{t}");
    wait_for(
        "a refused delivery attempt",
        Duration::from_secs(10),
        || upstream_lines(up).iter().any(|l| l.starts_with("BDAT")),
    )
    .await;
    assert!(up.received().is_empty());
    up.set_data_command_reply(None);
    let got = up.wait_received(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].data == large);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(up.received().len(), 1);
}

/// The upstream drops the connection in the middle of a BDAT chunk: 4xx, nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_mid_bdat_is_451_and_nothing_is_delivered() {
    let env = start(Opts::default()).await;
    env.upstream.close_mid_data(1);
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    let large = contents().pop().unwrap();
    let (_, (code, t)) = submit(&mut c, &["a@fabrikam.com"], &large).await;
    assert!((400..500).contains(&code), "{code} {t}");
    assert_eq!(env.upstream.data_faults(), 1);
    assert!(env.upstream.received().is_empty());
    let (_, (code, t)) = submit(&mut c, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "{t}");
}
