//! The Graph transport's transactions against testkit's fake Graph endpoint, in the library
//! (no SMTP client in between): the HTTP status of the outcome, drafts never left behind,
//! the per-mailbox permits, shared throttling, permissions per request kind. The fakes
//! answer on loopback in real time.

use super::*;
use crate::relay::pool::tests::{remote, Remote, ACCOUNT, MAILBOX};
use testkit::{FakeGraph, FakeGraphOptions, GraphFault, GraphSendPath};

/// A fake Graph (any bearer token), the token endpoint and config of `remote`, and the
/// transport; `extra` goes into `[upstream]`.
pub(super) async fn setup(
    tune: impl FnOnce(&mut FakeGraphOptions),
    extra: &str,
) -> (Remote, FakeGraph, GraphTransport) {
    let mut go = FakeGraphOptions::new(None);
    go.mailboxes = Some(vec![MAILBOX.to_string()]);
    tune(&mut go);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let graph = FakeGraph::start(listener, go).await;
    let r = remote(
        Duration::from_secs(3600),
        &format!(
            "transport = \"graph\"\ngraph_url = \"{}\"\n{extra}",
            graph.url()
        ),
        "",
    )
    .await;
    let tokens = TokenManager::new(&r.config).expect("tokens");
    let t = GraphTransport::new(&r.config, tokens).expect("graph transport");
    (r, graph, t)
}

pub(super) fn from() -> ReversePath {
    ReversePath::Address(Address::parse(MAILBOX, false).expect("address"))
}

/// Opens a transaction with these envelope recipients and streams `mime` into it.
pub(super) async fn open(t: &GraphTransport, rcpts: &[&str], mime: &[u8]) -> GraphTransaction {
    let (mut tx, reply) = t
        .begin(ACCOUNT, &from(), &MailParams::default(), Some(mime.len()))
        .await
        .expect("begin");
    assert_eq!(reply.code, 250);
    for r in rcpts {
        tx.rcpt(&Address::parse(r, false).expect("rcpt"))
            .await
            .expect("rcpt");
    }
    tx.start_data().await.expect("data");
    for c in mime.chunks(64 * 1024) {
        tx.send_chunk(c).await.expect("chunk");
    }
    tx
}

/// A whole delivery: the reply code (202 sent, else the SMTP code) and the transaction.
pub(super) async fn deliver(
    t: &GraphTransport,
    rcpts: &[&str],
    mime: &[u8],
) -> (u16, String, GraphTransaction) {
    let mut tx = open(t, rcpts, mime).await;
    let (code, text) = match tx.finish_content().await {
        Ok(r) => (r.code, r.text),
        Err(UpstreamError::Reply(r)) => (r.code, r.text),
        Err(e) => panic!("unexpected {e}"),
    };
    (code, text, tx)
}

pub(super) fn small(to: &str) -> Vec<u8> {
    format!("From: {MAILBOX}\r\nTo: {to}\r\nSubject: s\r\n\r\nhello\r\n").into_bytes()
}

#[tokio::test]
async fn the_http_status_of_the_deciding_request_is_kept() {
    let (_r, graph, t) = setup(|_| {}, "").await;
    let tx = open(&t, &["a@x.org"], &small("a@x.org")).await;
    assert_eq!(tx.http_status(), None, "nothing asked yet");
    drop(tx);
    let (code, _, tx) = deliver(&t, &["a@x.org"], &small("a@x.org")).await;
    assert_eq!((code, tx.http_status()), (202, Some(202)));
    drop(tx);
    // The draft path: the status of /send.
    let (code, _, tx) = deliver(&t, &["b@x.org"], &small("a@x.org")).await;
    assert_eq!((code, tx.http_status()), (202, Some(202)));
    drop(tx);
    assert_eq!(graph.sent()[1].via, GraphSendPath::Draft);
    graph.fail_next(
        1,
        GraphFault::TooManyRequests {
            retry_after_secs: 0,
        },
    );
    let (code, _, tx) = deliver(&t, &["a@x.org"], &small("a@x.org")).await;
    assert_eq!((code, tx.http_status()), (451, Some(429)));
    drop(tx);
    graph.fail_next(1, GraphFault::Forbidden);
    let (code, _, tx) = deliver(&t, &["a@x.org"], &small("a@x.org")).await;
    assert_eq!((code, tx.http_status()), (550, Some(403)));
    let as_transaction = crate::relay::transport::Transaction::Graph(tx);
    assert_eq!(as_transaction.upstream_status(), Some(403));
}

/// Polls `f` until it holds or 10 s passed (a spawned cleanup runs on its own).
async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A message that takes the draft path: the envelope names someone the headers do not,
/// and the headers name someone the envelope does not.
const DRAFT_RCPTS: [&str; 2] = ["a@x.org", "c@x.org"];
fn draft_message() -> Vec<u8> {
    format!("From: {MAILBOX}\r\nTo: a@x.org\r\nCc: b@x.org\r\nSubject: d\r\n\r\nhello\r\n")
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_draft_is_left_behind_whatever_fails() {
    let (_r, graph, t) = setup(|_| {}, "").await;
    // Each failure kind on each draft step after the draft exists.
    let faults = [
        ("attachments", GraphFault::Forbidden),
        (
            "/send",
            GraphFault::BadRequest {
                code: "ErrorInvalidRecipients".into(),
            },
        ),
        ("/messages/", GraphFault::NotFound),
        ("/send", GraphFault::Forbidden),
    ];
    for (i, (path, fault)) in faults.into_iter().enumerate() {
        // PATCH is the first request whose path has "/messages/".
        graph.fail_path(1, path, fault.clone());
        let mime = if path == "attachments" {
            let big = vec![b'A'; 4_000_000];
            let mut m = format!("From: {MAILBOX}\r\nTo: a@x.org\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nt\r\n--b\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=a.txt\r\n\r\n").into_bytes();
            m.extend_from_slice(&big);
            m.extend_from_slice(b"\r\n--b--\r\n");
            m
        } else {
            draft_message()
        };
        let (code, text, tx) = deliver(&t, &DRAFT_RCPTS, &mime).await;
        drop(tx);
        assert!(code >= 500, "{i} {fault:?}: {code} {text}");
        eventually(&format!("{fault:?} on {path}: draft deleted"), || {
            graph.open_drafts() == 0
        })
        .await;
    }
    assert!(graph.sent().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_delete_is_retried_after_retry_after() {
    let (_r, graph, t) = setup(|_| {}, "").await;
    // /send throttled, and then the first DELETE too (503, Retry-After 1).
    graph.fail_path(
        1,
        "/send",
        GraphFault::TooManyRequests {
            retry_after_secs: 1,
        },
    );
    graph.fail_method(1, "DELETE", "/messages/", GraphFault::Unavailable);
    let (code, _, tx) = deliver(&t, &DRAFT_RCPTS, &draft_message()).await;
    drop(tx);
    assert_eq!(code, 451);
    eventually("the draft is deleted after the retries", || {
        graph.open_drafts() == 0
    })
    .await;
    let deletes: Vec<(u16, tokio::time::Instant)> = graph
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| (r.status, r.at))
        .collect();
    assert_eq!(
        deletes.iter().map(|d| d.0).collect::<Vec<_>>(),
        [503, 204],
        "{deletes:?}"
    );
    assert!(
        deletes[1].1 - deletes[0].1 >= Duration::from_secs(1),
        "the retry honoured Retry-After"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_delivery_deletes_its_draft() {
    // Every answer takes 1 s: the delivery is dropped while the PATCH is under way.
    let (_r, graph, t) = setup(|o| o.response_delay = Duration::from_secs(1), "").await;
    let mut tx = open(&t, &DRAFT_RCPTS, &draft_message()).await;
    {
        let fut = tx.finish_content();
        tokio::pin!(fut);
        tokio::select! {
            r = &mut fut => panic!("finished before the draft existed: {r:?}"),
            _ = eventually("a draft", || graph.open_drafts() == 1) => {}
        }
        // Dropped here: the client went away mid-delivery.
    }
    drop(tx);
    eventually("the dropped delivery's draft is deleted", || {
        graph.open_drafts() == 0
    })
    .await;
    assert!(graph.sent().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_dropped_while_its_draft_is_being_created_deletes_the_draft() {
    // Every answer takes 1 s: the delivery is dropped while the request that creates the
    // draft is under way, before its id is known.
    let (_r, graph, t) = setup(|o| o.response_delay = Duration::from_secs(1), "").await;
    let mut tx = open(&t, &DRAFT_RCPTS, &draft_message()).await;
    {
        let fut = tx.finish_content();
        tokio::pin!(fut);
        tokio::select! {
            r = &mut fut => panic!("finished before the draft request was answered: {r:?}"),
            _ = eventually("the draft request under way", || graph.in_flight(MAILBOX) == 1) => {}
        }
        // Dropped here: the client went away mid-delivery.
    }
    assert_eq!(
        graph.open_drafts(),
        0,
        "dropped before Graph made the draft"
    );
    drop(tx);
    eventually("the draft made after the drop is deleted", || {
        graph
            .requests()
            .iter()
            .any(|r| r.method == "DELETE" && r.status == 204)
    })
    .await;
    let requests = graph.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.method == "POST" && r.path.ends_with("/messages") && r.status == 201),
        "the draft request ran to its end: {requests:?}"
    );
    assert_eq!(graph.open_drafts(), 0);
    assert!(graph.sent().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_only_recipients_go_as_a_bcc_header_on_send_mail() {
    // Only Mail.Send: the usual Bcc case still works (one sendMail).
    let (_r, graph, t) = setup(|o| o.permissions = vec!["Mail.Send".into()], "").await;
    let msg = small("a@x.org");
    let (code, text, tx) = deliver(&t, &["a@x.org", "c@x.org", "d@x.org"], &msg).await;
    drop(tx);
    assert_eq!(code, 202, "{text}");
    let sent = graph.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].via, GraphSendPath::SendMail);
    assert_eq!(sent[0].to, ["a@x.org"]);
    assert_eq!(sent[0].bcc, ["c@x.org", "d@x.org"]);
    // The client's bytes follow the one header we put in front.
    let mut want = b"Bcc: <c@x.org>,\r\n <d@x.org>\r\n".to_vec();
    want.extend_from_slice(&msg);
    assert_eq!(sent[0].submitted_mime, want);
    assert_eq!(graph.requests().len(), 1);
    // A header-only recipient (To: a, Cc: b; envelope a, c) needs a draft, and with only
    // Mail.Send that is refused with the Mail.ReadWrite hint.
    let (code, text, tx) = deliver(&t, &DRAFT_RCPTS, &draft_message()).await;
    drop(tx);
    assert_eq!(code, 550, "{text}");
    assert!(text.starts_with("5.7.1 "), "{text}");
    assert!(text.contains("Mail.ReadWrite"), "{text}");
    assert!(text.contains("RBAC for Applications"), "{text}");
    assert_eq!(graph.sent().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_are_checked_per_request_kind() {
    // Only Mail.ReadWrite: the draft is made, its /send is refused with the Mail.Send hint.
    let (_r, graph, t) = setup(|o| o.permissions = vec!["Mail.ReadWrite".into()], "").await;
    let (code, text, tx) = deliver(&t, &DRAFT_RCPTS, &draft_message()).await;
    drop(tx);
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("Mail.Send is not granted"), "{text}");
    let (code, text, tx) = deliver(&t, &["a@x.org"], &small("a@x.org")).await;
    drop(tx);
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("Mail.Send is not granted"), "{text}");
    eventually("the refused draft is deleted", || graph.open_drafts() == 0).await;
    assert!(graph.sent().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_send_is_settled_by_the_draft() {
    let (_r, graph, t) = setup(|_| {}, "").await;
    // /send sends, then answers 504: the draft is gone, so it was delivered.
    graph.fail_after_effect(1, "/send", GraphFault::GatewayTimeout);
    let (code, text, tx) = deliver(&t, &DRAFT_RCPTS, &draft_message()).await;
    assert_eq!(code, 202, "{text}");
    assert!(text.contains("inferred"), "{text}");
    assert_eq!(tx.http_status(), None);
    drop(tx);
    assert_eq!(graph.sent().len(), 1);
    // /send answers 504 without sending: the DELETE finds the draft, so 451 and no draft.
    graph.fail_path(1, "/send", GraphFault::GatewayTimeout);
    let (code, text, tx) = deliver(&t, &DRAFT_RCPTS, &draft_message()).await;
    assert_eq!(code, 451, "{text}");
    assert_eq!(tx.http_status(), Some(504));
    drop(tx);
    assert_eq!(graph.sent().len(), 1);
    assert_eq!(graph.open_drafts(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_throttled_for_long_answers_at_once_and_a_short_wait_is_waited_out() {
    // upstream.timeout is 5 s (the test config).
    let (_r, graph, t) = setup(|_| {}, "").await;
    graph.fail_next(
        1,
        GraphFault::TooManyRequests {
            retry_after_secs: 30,
        },
    );
    let (code, _, tx) = deliver(&t, &["a@x.org"], &small("a@x.org")).await;
    drop(tx);
    assert_eq!(code, 451);
    // Another transaction of the mailbox: 451 4.4.5 without asking Graph.
    let (code, text, tx) = deliver(&t, &["a@x.org"], &small("a@x.org")).await;
    assert_eq!(code, 451, "{text}");
    assert!(text.starts_with("4.4.5 "), "{text}");
    let ra = tx.retry_after().expect("a Retry-After for the spool");
    assert!(
        ra > Duration::from_secs(25) && ra <= Duration::from_secs(30),
        "{ra:?}"
    );
    drop(tx);
    assert_eq!(graph.requests().len(), 1, "Graph was not asked again");

    // A Retry-After shorter than the timeout is waited out.
    let (_r, graph, t) = setup(|_| {}, "").await;
    graph.fail_next(
        1,
        GraphFault::TooManyRequests {
            retry_after_secs: 1,
        },
    );
    let (code, _, tx) = deliver(&t, &["a@x.org"], &small("a@x.org")).await;
    drop(tx);
    assert_eq!(code, 451);
    let (code, text, tx) = deliver(&t, &["a@x.org"], &small("a@x.org")).await;
    drop(tx);
    assert_eq!(code, 202, "{text}");
    let reqs = graph.requests();
    assert_eq!(reqs.len(), 2);
    assert!(
        reqs[1].at - reqs[0].at >= Duration::from_secs(1),
        "{reqs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_do_not_hold_graph_and_requests_stay_at_four() {
    let (_r, graph, t) = setup(|o| o.response_delay = Duration::from_millis(200), "").await;
    // Four transactions stalled mid-DATA (content started, never finished).
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut tx = open(&t, &["a@x.org"], b"From: x\r\nTo: a@x.org\r\n").await;
        tx.send_chunk(b"Subject: half").await.expect("chunk");
        stalled.push(tx);
    }
    // A fifth message is delivered all the same.
    let (code, text, tx) = deliver(&t, &["a@x.org"], &small("a@x.org")).await;
    drop(tx);
    assert_eq!(code, 202, "{text}");
    drop(stalled);
    // Eight at once: all delivered, never more than four requests in flight.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let (code, text, _tx) = deliver(&t, &["a@x.org"], &small("a@x.org")).await;
            (code, text)
        }));
    }
    for task in tasks {
        let (code, text) = task.await.expect("task");
        assert_eq!(code, 202, "{text}");
    }
    assert_eq!(graph.sent().len(), 9);
    assert!(
        graph.peak_concurrency(MAILBOX) <= 4,
        "{}",
        graph.peak_concurrency(MAILBOX)
    );
    assert!(graph.requests().iter().all(|r| r.status == 202));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ninth_buffered_transaction_waits_then_is_busy() {
    let (_r, _graph, t) = setup(|_| {}, "").await; // waits upstream.timeout, 5 s
    let mut held = Vec::new();
    for _ in 0..GRAPH_BUFFERED_PER_MAILBOX {
        held.push(open(&t, &["a@x.org"], b"x").await);
    }
    let r = t
        .begin(ACCOUNT, &from(), &MailParams::default(), None)
        .await;
    assert!(matches!(r, Err(BeginError::Busy)), "{r:?}");
    held.pop();
    assert!(t
        .begin(ACCOUNT, &from(), &MailParams::default(), None)
        .await
        .is_ok());
}

/// A message too big for one request with one attachment part as given.
fn big_with_part(part_headers: &str, body: &str, top: &str) -> Vec<u8> {
    let mut m = format!("From: {MAILBOX}\r\nTo: a@x.org\r\nMIME-Version: 1.0\r\n{top}\r\n--b\r\nContent-Type: text/plain\r\n\r\nt\r\n--b\r\n{part_headers}\r\n").into_bytes();
    m.extend_from_slice(body.as_bytes());
    m.extend_from_slice(b"\r\n--b--\r\n");
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_signed_big_messages_are_refused_not_mangled() {
    let (_r, graph, t) = setup(|_| {}, "").await;
    let lines = "QUJD".repeat(19) + "\r\n";
    let body = lines.repeat(4_000_000 / lines.len());
    let att = "Content-Type: application/pdf\r\nContent-Disposition: attachment; filename=x.pdf\r\nContent-Transfer-Encoding: base64\r\n";
    // One character base64 does not have: not delivered as raw base64.
    let bad = big_with_part(
        att,
        &format!("{body}#"),
        "Content-Type: multipart/mixed; boundary=b\r\n",
    );
    let (code, text, tx) = deliver(&t, &["a@x.org"], &bad).await;
    drop(tx);
    assert_eq!(code, 554, "{text}");
    assert!(
        text.starts_with("5.6.0 ") && text.contains("x.pdf"),
        "{text}"
    );
    // Signed: cutting would break the signature.
    let signed = big_with_part(
        att,
        &body,
        "Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; boundary=s\r\n\r\n--s\r\nContent-Type: multipart/mixed; boundary=b\r\n",
    );
    let (code, text, tx) = deliver(&t, &["a@x.org"], &signed).await;
    drop(tx);
    assert_eq!(code, 554, "{text}");
    assert!(
        text.starts_with("5.6.0 ") && text.contains("signature"),
        "{text}"
    );
    assert!(graph.requests().is_empty(), "nothing reached Graph");
    // A small signed message goes through sendMail untouched.
    let small_signed = format!("From: {MAILBOX}\r\nTo: a@x.org\r\nContent-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; boundary=s\r\n\r\n--s\r\nContent-Type: text/plain\r\n\r\nhi\r\n--s\r\nContent-Type: application/pkcs7-signature\r\n\r\nAAAA\r\n--s--\r\n");
    let (code, text, tx) = deliver(&t, &["a@x.org"], small_signed.as_bytes()).await;
    drop(tx);
    assert_eq!(code, 202, "{text}");
    assert_eq!(graph.sent()[0].submitted_mime, small_signed.as_bytes());
}
