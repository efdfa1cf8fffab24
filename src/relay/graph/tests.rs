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
