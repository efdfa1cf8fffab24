//! An upstream that fails anywhere (issue 10): for each point where the upstream or the
//! network can break — connection refused, greeting (421, close, stall), EHLO, STARTTLS, the
//! TLS handshake, AUTH, MAIL, each RCPT, DATA, mid-content, after the final dot, with the
//! final reply lost, QUIT — in sync and spool mode, driven through testkit's fake upstream.
//!
//! What must hold everywhere: the local client gets a final reply within the configured
//! timeouts (never a hang, never 354 and then silence); sync mode never answers 250 for a
//! message the upstream did not take, and never makes a copy; spool mode delivers every
//! accepted message exactly once after the fault is gone. The one exception is a final reply
//! lost after the upstream took the message: the bridge cannot know, so it must treat it as
//! not delivered — sync mode answers 4xx (the client will resend: a duplicate), spool mode
//! delivers it again (at most twice). The README's Security section names this case.

use crate::harness::*;
use std::time::{Duration, Instant};
use testkit::upstream::{FaultAction, FaultPoint};
use testkit::{FakeUpstream, Reply};

/// `upstream.timeout_secs` for every case: small, so stalls end quickly.
const TIMEOUT_SECS: u64 = 2;
/// The longest any single reply may take (several upstream timeouts, with a retry).
const REPLY_LIMIT: Duration = Duration::from_secs(20);
/// What "within the configured timeouts" means for one reply: a stalled upstream costs one
/// `timeout_secs`; twice that, plus scheduling slack on a busy machine, is the bound.
const REPLY_BOUND: Duration = Duration::from_secs(4 * TIMEOUT_SECS);
/// How long a spooled message may take to be delivered once the fault is gone.
const DELIVERY_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    /// Nothing listens on the upstream port.
    Refused,
    /// `421 4.3.2 Service not available` as the greeting, then close.
    Greeting421,
    /// STARTTLS answered, then garbage instead of a ServerHello.
    TlsHandshake,
    /// The connection drops after the first line of content.
    MidContent,
    /// `fail_at`: close or stall at a protocol step.
    At(FaultPoint, FaultAction),
}

impl Point {
    fn name(&self) -> String {
        match self {
            Point::At(p, a) => format!("{p:?}/{a:?}"),
            other => format!("{other:?}"),
        }
    }

    /// Whether the upstream took the message although the bridge saw no reply.
    fn reply_lost(&self) -> bool {
        matches!(self, Point::At(FaultPoint::DataReply, _))
    }
}

fn all_points() -> Vec<Point> {
    let mut v = vec![
        Point::Refused,
        Point::Greeting421,
        Point::TlsHandshake,
        Point::MidContent,
    ];
    for action in [FaultAction::Close, FaultAction::Stall] {
        for p in [
            FaultPoint::Greeting,
            FaultPoint::Ehlo,
            FaultPoint::StartTls,
            FaultPoint::Auth,
            FaultPoint::Mail,
            FaultPoint::Rcpt(1),
            FaultPoint::Rcpt(2),
            FaultPoint::Data,
            FaultPoint::DataEnd,
            FaultPoint::DataReply,
            FaultPoint::Quit,
        ] {
            v.push(Point::At(p, action));
        }
    }
    v
}

const SPOOL: &str = "[queue]\nmode = \"spool\"\nretry_min_secs = 1\nretry_max_secs = 2\n";

fn opts(spool: bool) -> Opts {
    Opts {
        // idle_secs = 1: pooled sessions are QUIT soon, so the QUIT point is reached.
        upstream: format!("timeout_secs = {TIMEOUT_SECS}\nidle_secs = 1\nmessages_per_minute = 0"),
        extra: if spool { SPOOL.into() } else { String::new() },
        ..Opts::default()
    }
}

fn message(id: &str) -> Vec<u8> {
    format!("From: scanner@contoso.com\r\nTo: a@fabrikam.com, b@fabrikam.com\r\nMessage-ID: <{id}@test>\r\nSubject: {id}\r\n\r\nbody of {id}\r\n.leading dot\r\n").into_bytes()
}

fn copies(up: &FakeUpstream, id: &str) -> usize {
    let id = format!("<{id}@test>");
    up.message_ids().iter().filter(|m| **m == id).count()
}

fn spooled(env: &Env) -> usize {
    std::fs::read_dir(env.dir.path().join("state/spool")).map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "msg"))
            .count()
    })
}

/// Polls `f` every 20 ms for up to `limit`.
async fn until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn arm(up: &FakeUpstream, p: Point) {
    match p {
        Point::Refused => up.refuse_connections(true).await,
        Point::Greeting421 => up.set_greeting(Some(Reply::new(
            421,
            "4.3.2 Service not available, closing transmission channel",
        ))),
        Point::TlsHandshake => up.set_tls_failure(true),
        Point::MidContent => up.close_mid_data(1),
        Point::At(point, action) => up.fail_at(point, action, 1),
    }
}

/// Ends a fault that does not run out by itself.
async fn disarm(up: &FakeUpstream, p: Point) {
    match p {
        Point::Refused => up.refuse_connections(false).await,
        Point::Greeting421 => up.set_greeting(None),
        Point::TlsHandshake => up.set_tls_failure(false),
        Point::MidContent | Point::At(..) => {}
    }
}

/// Whether the fault has happened at least once (as far as the upstream can tell).
fn fired(up: &FakeUpstream, p: Point) -> bool {
    match p {
        // The bridge's attempts are refused by the kernel; nothing to count.
        Point::Refused => true,
        Point::Greeting421 => up.connections() > 0,
        Point::TlsHandshake | Point::MidContent => up.data_faults() > 0,
        Point::At(..) => up.faults_pending() == 0 && up.data_faults() > 0,
    }
}

/// One reply within [`REPLY_LIMIT`], or why not; the slowest wait is kept in `slowest`.
async fn reply(
    c: &mut TcpSmtp,
    what: &str,
    slowest: &mut Duration,
) -> Result<(u16, String), String> {
    let t = Instant::now();
    let r = c
        .reply_within(REPLY_LIMIT)
        .await
        .map_err(|e| format!("{what}: {e}"));
    *slowest = (*slowest).max(t.elapsed());
    if t.elapsed() > REPLY_BOUND {
        return Err(format!(
            "{what}: the reply took {:.1?} (upstream.timeout_secs = {TIMEOUT_SECS})",
            t.elapsed()
        ));
    }
    r
}

/// MAIL, two RCPTs, DATA and the content, as a client does (stopping at a refused MAIL or
/// DATA); the final reply. `Err` when a reply did not come.
async fn transaction(
    c: &mut TcpSmtp,
    id: &str,
    slowest: &mut Duration,
) -> Result<(u16, String), String> {
    c.send(format!("MAIL FROM:<{MAILBOX}>\r\n").as_bytes())
        .await;
    let mail = reply(c, "MAIL", slowest).await?;
    if mail.0 != 250 {
        return Ok(mail);
    }
    let mut rcpt_codes = Vec::new();
    for r in ["a@fabrikam.com", "b@fabrikam.com"] {
        c.send(format!("RCPT TO:<{r}>\r\n").as_bytes()).await;
        rcpt_codes.push(reply(c, "RCPT", slowest).await?.0);
    }
    c.send(b"DATA\r\n").await;
    let data = reply(c, "DATA", slowest).await?;
    if data.0 != 354 {
        return Ok(data);
    }
    if !rcpt_codes.contains(&250) {
        return Err(format!("DATA answered 354 after RCPTs {rcpt_codes:?}"));
    }
    let mut content = dot_stuff(&message(id));
    content.extend_from_slice(b".\r\n");
    c.send(&content).await;
    reply(c, "end of DATA (after 354)", slowest).await
}

/// A logged-in client.
async fn client(env: &Env) -> TcpSmtp {
    let mut c = TcpSmtp::connect(env.addr).await;
    c.login().await;
    c
}

/// Sync mode: the first message meets the fault; a second one, after it, is delivered.
async fn sync_case(p: Point) -> Result<String, String> {
    let env = start(opts(false)).await;
    let up = env.upstream.clone();
    arm(&up, p).await;
    let mut c = client(&env).await;
    let mut slowest = Duration::ZERO;
    let first = transaction(&mut c, "m1", &mut slowest).await?;
    if !fired(&up, p) && !matches!(p, Point::At(FaultPoint::Quit, _)) {
        return Err(format!("the fault never fired; first reply {first:?}"));
    }
    disarm(&up, p).await;
    if matches!(p, Point::At(FaultPoint::Quit, _))
        && !until(Duration::from_secs(10), || fired(&up, p)).await
    {
        return Err("the idle upstream session was never QUIT".into());
    }
    // Whatever the bridge did upstream is over by now (a reply was given); wait a moment
    // for anything late, then count.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n1 = copies(&up, "m1");
    match first.0 {
        250 if n1 == 1 => {}
        250 => {
            return Err(format!(
                "250 for m1, but the upstream holds {n1} copies: {first:?}"
            ))
        }
        400..=499 if n1 == 0 || (n1 == 1 && p.reply_lost()) => {}
        400..=499 => return Err(format!("{first:?}, but the upstream holds {n1} copies")),
        _ => return Err(format!("final reply {first:?}: not 250, not 4xx")),
    }
    // The local session lives on (unless the bridge ended it with 421, which it announced).
    if first.0 != 421 {
        c.send(b"RSET\r\n").await;
        let r = reply(&mut c, "RSET", &mut slowest).await?;
        if r.0 != 250 {
            return Err(format!("RSET after the failure: {r:?}"));
        }
    }
    // The next message, on a new connection, goes through exactly once.
    let mut c2 = client(&env).await;
    let second = transaction(&mut c2, "m2", &mut slowest).await?;
    if second.0 != 250 {
        return Err(format!("the next message after the fault: {second:?}"));
    }
    if !until(Duration::from_secs(5), || copies(&up, "m2") == 1).await || copies(&up, "m1") != n1 {
        return Err(format!("after m2: upstream holds {:?}", up.message_ids()));
    }
    Ok(format!(
        "m1 {} {} ({n1} upstream), slowest reply {slowest:.1?}",
        first.0,
        first.1.split(' ').next().unwrap_or("")
    ))
}

/// Spool mode: the first message is accepted at once and delivered once the fault is gone,
/// exactly once; a second one after it too.
async fn spool_case(p: Point) -> Result<String, String> {
    let env = start(opts(true)).await;
    let up = env.upstream.clone();
    arm(&up, p).await;
    let mut c = client(&env).await;
    let mut slowest = Duration::ZERO;
    let first = transaction(&mut c, "m1", &mut slowest).await?;
    if first.0 != 250 {
        return Err(format!("spool mode did not accept m1: {first:?}"));
    }
    match p {
        // Give delivery a chance to meet the fault first (the first attempt is at once).
        Point::Refused => tokio::time::sleep(Duration::from_millis(1500)).await,
        Point::At(FaultPoint::Quit, _) => {}
        _ => {
            if !until(DELIVERY_LIMIT, || fired(&up, p)).await {
                return Err("the fault never fired".into());
            }
        }
    }
    if p == Point::Refused && up.connections() > 0 {
        return Err("a connection got through while the port was closed".into());
    }
    disarm(&up, p).await;
    if !until(DELIVERY_LIMIT, || copies(&up, "m1") >= 1).await {
        return Err(format!(
            "m1 not delivered within {DELIVERY_LIMIT:?} after the fault"
        ));
    }
    if !until(Duration::from_secs(15), || spooled(&env) == 0).await {
        return Err(format!(
            "the spool still holds {} message(s)",
            spooled(&env)
        ));
    }
    if matches!(p, Point::At(FaultPoint::Quit, _))
        && !until(Duration::from_secs(10), || fired(&up, p)).await
    {
        return Err("the idle upstream session was never QUIT".into());
    }
    let second = transaction(&mut c, "m2", &mut slowest).await?;
    if second.0 != 250 {
        return Err(format!("spool mode did not accept m2: {second:?}"));
    }
    if !until(DELIVERY_LIMIT, || copies(&up, "m2") >= 1).await
        || !until(Duration::from_secs(15), || spooled(&env) == 0).await
    {
        return Err("m2 not delivered".into());
    }
    // Anything more would have to come from the spool, which is empty.
    let (n1, n2) = (copies(&up, "m1"), copies(&up, "m2"));
    let ok = n2 == 1 && (n1 == 1 || (p.reply_lost() && n1 == 2));
    if !ok {
        return Err(format!(
            "delivered m1 x {n1}, m2 x {n2}: {:?}",
            up.message_ids()
        ));
    }
    Ok(format!("m1 x {n1}, m2 x {n2}, slowest reply {slowest:.1?}"))
}

/// Runs every point's case at once; panics listing each failure.
async fn matrix(spool: bool, points: Vec<Point>) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in points {
        tasks.push((
            p,
            tokio::spawn(async move {
                if spool {
                    spool_case(p).await
                } else {
                    sync_case(p).await
                }
            }),
        ));
    }
    let mut failures = Vec::new();
    for (p, t) in tasks {
        match t.await {
            Ok(Ok(summary)) => println!("{:<20} ok: {summary}", p.name()),
            Ok(Err(e)) => failures.push(format!("{}: {e}", p.name())),
            Err(e) => failures.push(format!("{}: panicked: {e}", p.name())),
        }
    }
    println!("matrix done in {:.1?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failing_at_every_point_sync() {
    matrix(false, all_points()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failing_at_every_point_spool() {
    matrix(true, all_points()).await;
}

/// Issue 10 finding 7: RCPT 1 accepted, the upstream connection breaks at RCPT 2. RCPT 2
/// gets 4xx and DATA a final 4xx at once (never 354 and then silence); nothing is delivered,
/// and the client's retry is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_lost_at_the_second_rcpt_gets_a_final_4xx_sync() {
    for action in [FaultAction::Close, FaultAction::Stall] {
        let env = start(opts(false)).await;
        env.upstream.fail_at(FaultPoint::Rcpt(2), action, 1);
        let mut c = client(&env).await;
        let started = Instant::now();
        c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
        c.expect("RCPT TO:<a@fabrikam.com>", 250).await;
        let (code, t) = c.cmd("RCPT TO:<b@fabrikam.com>").await;
        assert!(
            (400..500).contains(&code),
            "{action:?}: RCPT 2 -> {code} {t}"
        );
        c.send(b"DATA\r\n").await;
        let (code, t) = c
            .reply_within(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{action:?}: DATA: {e}"));
        assert!(
            (400..500).contains(&code),
            "{action:?}: DATA -> {code} {t} (must be a final 4xx, not 354)"
        );
        assert!(started.elapsed() < Duration::from_secs(20));
        assert_eq!(env.upstream.data_faults(), 1);
        // The session goes on; the retry is delivered, once.
        let (code, t) = c
            .send_message(
                MAILBOX,
                &["a@fabrikam.com", "b@fabrikam.com"],
                &message("retry"),
            )
            .await;
        assert_eq!(code, 250, "{action:?}: {t}");
        let got = env.upstream.wait_received(1, Duration::from_secs(5)).await;
        assert_eq!(env.upstream.message_ids(), ["<retry@test>"]);
        assert_eq!(got[0].rcpts, ["a@fabrikam.com", "b@fabrikam.com"]);
    }
}
