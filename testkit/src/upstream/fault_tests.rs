//! Tests of the fake upstream's fault-injection knobs (mid-DATA drops, stalls, broken
//! STARTTLS, throttling, the concurrent-session limit, `fail_at` at every point, refused
//! connections) and of `message_ids`, over real loopback sockets with the raw client helpers
//! of `tests.rs`.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::tests::{closed, cmd, read_reply, start, tls, xoauth2, STEP};
use super::{message_id, FakeUpstream, FakeUpstreamOptions, FaultAction, FaultPoint, Reply, Stall};
use crate::TestCa;

/// How long "no reply" is waited for.
const QUIET: Duration = Duration::from_millis(300);

type Session = (TlsStream<TcpStream>, Vec<u8>);

async fn upstream(ca: &TestCa) -> FakeUpstream {
    let (cert, key) = ca.issue_server_cert();
    start(FakeUpstreamOptions::new(cert, key)).await
}

/// Connects, STARTTLS, EHLO; returns the session ready for AUTH.
async fn connect_tls(up: &FakeUpstream, ca: &TestCa) -> Session {
    let mut buf = Vec::new();
    let mut tcp = TcpStream::connect(up.addr()).await.expect("connect");
    assert_eq!(read_reply(&mut tcp, &mut buf).await.0, 220);
    assert_eq!(cmd(&mut tcp, &mut buf, "EHLO c").await.0, 250);
    assert_eq!(cmd(&mut tcp, &mut buf, "STARTTLS").await.0, 220);
    let mut s = tls(ca, "localhost", tcp).await;
    assert_eq!(cmd(&mut s, &mut buf, "EHLO c").await.0, 250);
    (s, buf)
}

async fn auth(s: &mut Session, user: &str) -> (u16, String) {
    let line = format!("AUTH XOAUTH2 {}", xoauth2(user, "token"));
    cmd(&mut s.0, &mut s.1, &line).await
}

/// A session authenticated as `user`.
async fn login(up: &FakeUpstream, ca: &TestCa, user: &str) -> Session {
    let mut s = connect_tls(up, ca).await;
    assert_eq!(auth(&mut s, user).await.0, 235);
    s
}

/// MAIL, RCPT, DATA up to the 354.
async fn start_data(s: &mut Session) {
    let (s, buf) = (&mut s.0, &mut s.1);
    assert_eq!(cmd(s, buf, "MAIL FROM:<m@x>").await.0, 250);
    assert_eq!(cmd(s, buf, "RCPT TO:<r@x>").await.0, 250);
    assert_eq!(cmd(s, buf, "DATA").await.0, 354);
}

/// A whole message with this Message-ID; returns the final reply.
async fn send_message(s: &mut Session, id: &str) -> (u16, String) {
    start_data(s).await;
    let body = format!("Message-ID: {id}\r\nSubject: t\r\n\r\nbody\r\n");
    s.0.write_all(&super::dot::stuff(body.as_bytes()))
        .await
        .expect("write");
    read_reply(&mut s.0, &mut s.1).await
}

/// True if nothing arrives for [`QUIET`] and the connection stays open.
async fn silent<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut b = [0u8; 64];
    tokio::time::timeout(QUIET, s.read(&mut b)).await.is_err()
}

async fn write<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) {
    s.write_all(bytes).await.expect("write");
    s.flush().await.expect("flush");
}

#[tokio::test]
async fn close_mid_data_drops_the_next_transfers_and_stores_nothing() {
    let ca = TestCa::new();
    let up = upstream(&ca).await;
    up.close_mid_data(2);

    // Only the first line sent: the server drops after reading it.
    let mut a = login(&up, &ca, "m@x").await;
    start_data(&mut a).await;
    write(&mut a.0, b"Message-ID: <a@x>\r\n").await;
    assert!(closed(&mut a.0).await);

    // The whole message at once, terminator included: dropped all the same.
    let mut b = login(&up, &ca, "m@x").await;
    start_data(&mut b).await;
    let _ =
        b.0.write_all(&super::dot::stuff(b"Message-ID: <b@x>\r\n\r\nbody\r\n"))
            .await;
    assert!(closed(&mut b.0).await);
    assert_eq!(up.data_faults(), 2);

    // The count is used up: the next transfer goes through.
    let mut c = login(&up, &ca, "m@x").await;
    assert_eq!(send_message(&mut c, "<c@x>").await.0, 250);
    assert_eq!(up.wait_received(1, STEP).await.len(), 1);
    assert_eq!(up.message_ids(), ["<c@x>"]);
    assert_eq!(up.data_faults(), 2);

    // A BDAT transfer is cut off too; 0 cancels what is left.
    up.close_mid_data(1);
    assert_eq!(cmd(&mut c.0, &mut c.1, "MAIL FROM:<m@x>").await.0, 250);
    assert_eq!(cmd(&mut c.0, &mut c.1, "RCPT TO:<r@x>").await.0, 250);
    write(&mut c.0, b"BDAT 40 LAST\r\nMessage-ID: <d@x>\r\n").await;
    assert!(closed(&mut c.0).await);
    up.close_mid_data(5);
    up.close_mid_data(0);
    let mut d = login(&up, &ca, "m@x").await;
    assert_eq!(send_message(&mut d, "<e@x>").await.0, 250);
    assert_eq!(up.message_ids(), ["<c@x>", "<e@x>"]);
    assert_eq!(up.received_count(), 2);
    assert_eq!(up.data_faults(), 3);
}

#[tokio::test]
async fn stall_at_greeting_after_auth_and_at_data_end() {
    let ca = TestCa::new();
    let up = upstream(&ca).await;
    let mut buf = Vec::new();

    // Greeting: the socket stays open, input is ignored.
    up.set_stall(Some(Stall::Greeting));
    let mut g = TcpStream::connect(up.addr()).await.expect("connect");
    assert!(silent(&mut g).await);
    write(&mut g, b"EHLO c\r\n").await;
    assert!(silent(&mut g).await);
    assert_eq!(up.data_faults(), 1);
    up.set_stall(None);
    let mut ok = TcpStream::connect(up.addr()).await.expect("connect");
    assert_eq!(read_reply(&mut ok, &mut buf).await.0, 220);
    // The stalled session stays stalled.
    assert!(silent(&mut g).await);

    // After AUTH: the 235 is sent, the next command is not answered; a session that was
    // already authenticated stalls at its next command too.
    let mut before = login(&up, &ca, "m@x").await;
    up.set_stall(Some(Stall::AfterAuth));
    let mut a = connect_tls(&up, &ca).await;
    assert_eq!(cmd(&mut a.0, &mut a.1, "NOOP").await.0, 250);
    assert_eq!(auth(&mut a, "m@x").await.0, 235);
    write(&mut a.0, b"MAIL FROM:<m@x>\r\n").await;
    assert!(silent(&mut a.0).await);
    write(&mut before.0, b"NOOP\r\n").await;
    assert!(silent(&mut before.0).await);
    assert_eq!(up.data_faults(), 3);
    up.set_stall(None);
    let mut fine = login(&up, &ca, "m@x").await;
    assert_eq!(send_message(&mut fine, "<1@x>").await.0, 250);

    // At the end of DATA: content read, no final reply, nothing stored.
    up.set_stall(Some(Stall::AtDataEnd));
    let mut d = login(&up, &ca, "m@x").await;
    start_data(&mut d).await;
    write(
        &mut d.0,
        &super::dot::stuff(b"Message-ID: <2@x>\r\n\r\nx\r\n"),
    )
    .await;
    assert!(silent(&mut d.0).await);
    write(&mut d.0, b"QUIT\r\n").await;
    assert!(silent(&mut d.0).await);
    assert_eq!(up.data_faults(), 4);
    up.set_stall(None);
    assert_eq!(send_message(&mut fine, "<3@x>").await.0, 250);
    assert_eq!(up.received_count(), 2);
    assert_eq!(up.message_ids(), ["<1@x>", "<3@x>"]);

    // A stalled session ends when the client closes it.
    let open = up.open_sessions();
    drop(d);
    let deadline = tokio::time::Instant::now() + STEP;
    while up.open_sessions() >= open && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(up.open_sessions() < open);
}

#[tokio::test]
async fn tls_failure_breaks_the_starttls_handshake() {
    let ca = TestCa::new();
    let up = upstream(&ca).await;
    up.set_tls_failure(true);
    let mut buf = Vec::new();
    let mut tcp = TcpStream::connect(up.addr()).await.expect("connect");
    assert_eq!(read_reply(&mut tcp, &mut buf).await.0, 220);
    assert_eq!(cmd(&mut tcp, &mut buf, "EHLO c").await.0, 250);
    assert_eq!(
        cmd(&mut tcp, &mut buf, "STARTTLS").await,
        (220, "2.0.0 SMTP server ready".to_string())
    );
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let handshake = tokio::time::timeout(STEP, super::tests::connector(&ca).connect(name, tcp))
        .await
        .expect("handshake ends in time");
    assert!(handshake.is_err(), "the TLS handshake must fail");
    assert_eq!(up.data_faults(), 1);

    up.set_tls_failure(false);
    let mut s = login(&up, &ca, "m@x").await;
    assert_eq!(send_message(&mut s, "<ok@x>").await.0, 250);
    assert_eq!(up.data_faults(), 1);
}

#[tokio::test]
async fn throttle_overrides_mail_reply() {
    let ca = TestCa::new();
    let up = upstream(&ca).await;
    let mut s = login(&up, &ca, "m@x").await;
    let busy = Reply::new(
        451,
        "4.7.500 Server busy. Please try again later from [1.2.3.4]",
    );
    up.set_mail_reply(Some(Reply::new(250, "2.1.0 Scripted sender OK")));
    up.set_throttle(Some(busy.clone()));
    assert_eq!(
        cmd(&mut s.0, &mut s.1, "MAIL FROM:<m@x>").await,
        (busy.code, busy.text.clone())
    );
    // No transaction started.
    assert_eq!(cmd(&mut s.0, &mut s.1, "RCPT TO:<r@x>").await.0, 503);
    up.set_throttle(Some(Reply::session_limit()));
    assert_eq!(
        cmd(&mut s.0, &mut s.1, "MAIL FROM:<m@x>").await,
        (
            432,
            "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded".to_string()
        )
    );
    assert_eq!(up.data_faults(), 2);

    up.set_throttle(None);
    assert_eq!(
        cmd(&mut s.0, &mut s.1, "MAIL FROM:<m@x>").await,
        (250, "2.1.0 Scripted sender OK".to_string())
    );
    assert_eq!(cmd(&mut s.0, &mut s.1, "RSET").await.0, 250);
    up.set_mail_reply(None);
    assert_eq!(send_message(&mut s, "<t@x>").await.0, 250);
    assert_eq!(up.received_count(), 1);
    assert_eq!(up.data_faults(), 2);
}

#[tokio::test]
async fn max_sessions_refuses_auth_beyond_the_limit() {
    let ca = TestCa::new();
    let up = upstream(&ca).await;
    // Sessions authenticated before the limit is set count towards it.
    let mut a = login(&up, &ca, "m@x").await;
    up.set_max_sessions(Some(2));
    let _b = login(&up, &ca, "m@x").await;
    let mut c = connect_tls(&up, &ca).await;
    assert_eq!(
        auth(&mut c, "m@x").await,
        (
            432,
            "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded".to_string()
        )
    );
    assert_eq!(up.data_faults(), 1);
    // Still open, not authenticated.
    assert_eq!(cmd(&mut c.0, &mut c.1, "NOOP").await.0, 250);
    assert_eq!(cmd(&mut c.0, &mut c.1, "MAIL FROM:<m@x>").await.0, 530);
    // A failed AUTH takes no slot and is no session-limit fault.
    up.set_auth_reply(Some(Reply::new(535, "5.7.3 Authentication unsuccessful")));
    assert_eq!(auth(&mut c, "m@x").await.0, 535);
    up.set_auth_reply(None);
    assert_eq!(up.data_faults(), 1);

    // A session ending frees its slot.
    assert_eq!(cmd(&mut a.0, &mut a.1, "QUIT").await.0, 221);
    assert!(closed(&mut a.0).await);
    let deadline = tokio::time::Instant::now() + STEP;
    while up.open_sessions() > 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(up.open_sessions(), 2);
    assert_eq!(auth(&mut c, "m@x").await.0, 235);
    assert_eq!(send_message(&mut c, "<c@x>").await.0, 250);

    // The limit holds again, and lifting it lets everyone in.
    let mut d = connect_tls(&up, &ca).await;
    assert_eq!(auth(&mut d, "m@x").await.0, 432);
    up.set_max_sessions(None);
    assert_eq!(auth(&mut d, "m@x").await.0, 235);
    assert_eq!(up.data_faults(), 2);
}

#[tokio::test]
async fn message_ids_follow_received_even_without_kept_data() {
    let ca = TestCa::new();
    let up = upstream(&ca).await;
    let mut s = login(&up, &ca, "m@x").await;
    assert_eq!(send_message(&mut s, " <one@x> ").await.0, 250);
    up.set_data_reply(Some(Reply::new(451, "4.3.0 Try later")));
    assert_eq!(send_message(&mut s, "<refused@x>").await.0, 451);
    up.set_data_reply(None);
    up.set_keep_data(false);
    assert_eq!(send_message(&mut s, "<two@x>").await.0, 250);
    start_data(&mut s).await;
    assert_eq!(
        cmd(&mut s.0, &mut s.1, "Subject: none\r\n\r\nx\r\n.")
            .await
            .0,
        250
    );
    assert_eq!(up.message_ids(), ["<one@x>", "<two@x>", ""]);
    assert_eq!(up.received_count(), 3);
}

#[test]
fn message_id_parsing() {
    assert_eq!(message_id(b"Message-ID: <a@b>\r\n\r\nbody"), "<a@b>");
    assert_eq!(
        message_id(b"Subject: x\r\nmessage-id:<a@b>  \r\n\r\n"),
        "<a@b>"
    );
    assert_eq!(
        message_id(b"MESSAGE-ID:\r\n <folded@b>\r\nX: y\r\n\r\n"),
        "<folded@b>"
    );
    assert_eq!(
        message_id(b"Message-Id: <first@b>\r\nMessage-Id: <second@b>\r\n\r\n"),
        "<first@b>"
    );
    // Only the header block counts; bare LF line endings work too.
    assert_eq!(
        message_id(b"Subject: x\r\n\r\nMessage-ID: <body@b>\r\n"),
        ""
    );
    assert_eq!(message_id(b"Subject: x\nMessage-ID: <lf@b>\n\n"), "<lf@b>");
    assert_eq!(message_id(b"X-Message-ID: <no@b>\r\n\r\n"), "");
    assert_eq!(message_id(b""), "");
}

#[tokio::test]
async fn starttls_inject_follows_the_220_in_plaintext() {
    let ca = TestCa::new();
    let up = upstream(&ca).await;
    up.set_starttls_inject(Some(b"250 2.0.0 Queued\r\n".to_vec()));
    let mut buf = Vec::new();
    let mut tcp = TcpStream::connect(up.addr()).await.expect("connect");
    assert_eq!(read_reply(&mut tcp, &mut buf).await.0, 220);
    assert_eq!(cmd(&mut tcp, &mut buf, "EHLO c").await.0, 250);
    assert_eq!(
        cmd(&mut tcp, &mut buf, "STARTTLS").await,
        (220, "2.0.0 SMTP server ready".to_string())
    );
    // The injected bytes come in plaintext, before any TLS record.
    assert_eq!(
        read_reply(&mut tcp, &mut buf).await,
        (250, "2.0.0 Queued".to_string())
    );
    assert!(buf.is_empty());
    assert_eq!(up.data_faults(), 1);
    // The handshake then proceeds as usual.
    let mut s = tls(&ca, "localhost", tcp).await;
    assert_eq!(cmd(&mut s, &mut buf, "EHLO c").await.0, 250);

    up.set_starttls_inject(None);
    let mut s = login(&up, &ca, "m@x").await;
    assert_eq!(send_message(&mut s, "<ok@x>").await.0, 250);
    assert_eq!(up.data_faults(), 1);
}

/// Whether `action` happened: the connection was dropped without a reply (`Close`), or
/// nothing comes back while it stays open (`Stall`).
async fn broken<S: AsyncRead + Unpin>(s: &mut S, action: FaultAction) -> bool {
    match action {
        FaultAction::Close => closed(s).await,
        FaultAction::Stall => silent(s).await,
    }
}

#[tokio::test]
async fn fail_at_breaks_each_command_once_then_behaves() {
    let ca = TestCa::new();
    let up = upstream(&ca).await;
    let mut faults = 0;
    for action in [FaultAction::Close, FaultAction::Stall] {
        // Before TLS: the greeting, the first EHLO, STARTTLS.
        up.fail_at(FaultPoint::Greeting, action, 1);
        let mut g = TcpStream::connect(up.addr()).await.expect("connect");
        assert!(broken(&mut g, action).await, "greeting {action:?}");
        for (point, line) in [
            (FaultPoint::Ehlo, "EHLO c"),
            (FaultPoint::StartTls, "STARTTLS"),
        ] {
            let mut buf = Vec::new();
            let mut tcp = TcpStream::connect(up.addr()).await.expect("connect");
            assert_eq!(read_reply(&mut tcp, &mut buf).await.0, 220);
            if point == FaultPoint::StartTls {
                assert_eq!(cmd(&mut tcp, &mut buf, "EHLO c").await.0, 250);
            }
            up.fail_at(point, action, 1);
            write(&mut tcp, format!("{line}\r\n").as_bytes()).await;
            assert!(broken(&mut tcp, action).await, "{point:?} {action:?}");
            assert_eq!(up.faults_pending(), 0);
        }
        // After TLS and AUTH: every command of a transaction, and QUIT.
        let points = [
            (FaultPoint::Mail, "MAIL FROM:<m@x>"),
            (FaultPoint::Rcpt(1), "RCPT TO:<r1@x>"),
            (FaultPoint::Rcpt(2), "RCPT TO:<r2@x>"),
            (FaultPoint::Data, "DATA"),
            (FaultPoint::Quit, "QUIT"),
        ];
        for (i, (point, line)) in points.iter().enumerate() {
            let mut s = login(&up, &ca, "m@x").await;
            up.fail_at(*point, action, 1);
            // The commands before this one are answered as usual.
            for (_, before) in &points[..i] {
                if *before != "DATA" {
                    assert_eq!(cmd(&mut s.0, &mut s.1, before).await.0, 250, "{before}");
                }
            }
            write(&mut s.0, format!("{line}\r\n").as_bytes()).await;
            assert!(broken(&mut s.0, action).await, "{point:?} {action:?}");
        }
        // AUTH itself.
        let mut a = connect_tls(&up, &ca).await;
        up.fail_at(FaultPoint::Auth, action, 1);
        write(
            &mut a.0,
            format!("AUTH XOAUTH2 {}\r\n", xoauth2("m@x", "t")).as_bytes(),
        )
        .await;
        assert!(broken(&mut a.0, action).await, "AUTH {action:?}");
        faults += 9;
        assert_eq!(up.data_faults(), faults);
    }
    // Used up: a whole session goes through, with two recipients and QUIT.
    let mut s = login(&up, &ca, "m@x").await;
    assert_eq!(cmd(&mut s.0, &mut s.1, "MAIL FROM:<m@x>").await.0, 250);
    assert_eq!(cmd(&mut s.0, &mut s.1, "RCPT TO:<r1@x>").await.0, 250);
    assert_eq!(cmd(&mut s.0, &mut s.1, "RCPT TO:<r2@x>").await.0, 250);
    assert_eq!(cmd(&mut s.0, &mut s.1, "DATA").await.0, 354);
    write(
        &mut s.0,
        &super::dot::stuff(b"Message-ID: <ok@x>\r\n\r\nx\r\n"),
    )
    .await;
    assert_eq!(read_reply(&mut s.0, &mut s.1).await.0, 250);
    assert_eq!(cmd(&mut s.0, &mut s.1, "QUIT").await.0, 221);
    assert_eq!(up.message_ids(), ["<ok@x>"]);
    assert_eq!(up.received()[0].rcpts, ["r1@x", "r2@x"]);
    assert_eq!(up.data_faults(), faults);
}

#[tokio::test]
async fn fail_at_rcpt_counts_within_each_transaction_and_times() {
    let ca = TestCa::new();
    let up = upstream(&ca).await;
    up.fail_at(FaultPoint::Rcpt(2), FaultAction::Close, 2);
    assert_eq!(up.faults_pending(), 2);
    let mut s = login(&up, &ca, "m@x").await;
    // RCPT outside a transaction is no RCPT of one; a refused RCPT counts.
    assert_eq!(cmd(&mut s.0, &mut s.1, "RCPT TO:<r@x>").await.0, 503);
    up.set_rcpt_reply("no@x", Some(Reply::new(550, "5.1.10 not found")));
    assert_eq!(cmd(&mut s.0, &mut s.1, "MAIL FROM:<m@x>").await.0, 250);
    assert_eq!(cmd(&mut s.0, &mut s.1, "RCPT TO:<no@x>").await.0, 550);
    write(&mut s.0, b"RCPT TO:<r@x>\r\n").await;
    assert!(closed(&mut s.0).await);
    // A new transaction counts from 1 again.
    let mut s = login(&up, &ca, "m@x").await;
    assert_eq!(cmd(&mut s.0, &mut s.1, "MAIL FROM:<m@x>").await.0, 250);
    assert_eq!(cmd(&mut s.0, &mut s.1, "RCPT TO:<a@x>").await.0, 250);
    assert_eq!(cmd(&mut s.0, &mut s.1, "RSET").await.0, 250);
    assert_eq!(cmd(&mut s.0, &mut s.1, "MAIL FROM:<m@x>").await.0, 250);
    assert_eq!(cmd(&mut s.0, &mut s.1, "RCPT TO:<a@x>").await.0, 250);
    write(&mut s.0, b"RCPT TO:<b@x>\r\n").await;
    assert!(closed(&mut s.0).await);
    assert_eq!(up.faults_pending(), 0);
    assert_eq!(up.data_faults(), 2);
    // 0 cancels.
    up.fail_at(FaultPoint::Mail, FaultAction::Close, 3);
    up.fail_at(FaultPoint::Mail, FaultAction::Close, 0);
    assert_eq!(up.faults_pending(), 0);
    let mut s = login(&up, &ca, "m@x").await;
    assert_eq!(send_message(&mut s, "<after@x>").await.0, 250);
    assert_eq!(up.data_faults(), 2);
}

#[tokio::test]
async fn fail_at_data_end_stores_nothing_and_data_reply_stores_then_loses_the_reply() {
    let ca = TestCa::new();
    let up = upstream(&ca).await;
    let body = |id: &str| super::dot::stuff(format!("Message-ID: {id}\r\n\r\nx\r\n").as_bytes());
    for (i, action) in [FaultAction::Close, FaultAction::Stall]
        .into_iter()
        .enumerate()
    {
        // After the final dot, before storing: the upstream never took it.
        up.fail_at(FaultPoint::DataEnd, action, 1);
        let mut s = login(&up, &ca, "m@x").await;
        start_data(&mut s).await;
        write(&mut s.0, &body("<end@x>")).await;
        assert!(broken(&mut s.0, action).await, "DataEnd {action:?}");
        assert_eq!(up.received_count(), i);

        // Stored, and then the 250 is lost.
        up.fail_at(FaultPoint::DataReply, action, 1);
        let mut s = login(&up, &ca, "m@x").await;
        start_data(&mut s).await;
        write(&mut s.0, &body(&format!("<lost{i}@x>"))).await;
        assert!(broken(&mut s.0, action).await, "DataReply {action:?}");
        assert_eq!(up.received_count(), i + 1);
    }
    // A refused message is no DataReply: the fault waits for an accepted one.
    up.fail_at(FaultPoint::DataReply, FaultAction::Close, 1);
    up.set_data_reply(Some(Reply::new(554, "5.6.0 refused")));
    let mut s = login(&up, &ca, "m@x").await;
    assert_eq!(send_message(&mut s, "<refused@x>").await.0, 554);
    assert_eq!(up.faults_pending(), 1);
    up.set_data_reply(None);
    up.fail_at(FaultPoint::DataReply, FaultAction::Close, 0);
    assert_eq!(send_message(&mut s, "<ok@x>").await.0, 250);
    assert_eq!(up.message_ids(), ["<lost0@x>", "<lost1@x>", "<ok@x>"]);
    assert_eq!(up.data_faults(), 4);
}

#[tokio::test]
async fn refuse_connections_closes_the_listening_socket_and_reopens_it() {
    let ca = TestCa::new();
    let up = upstream(&ca).await;
    let mut open = login(&up, &ca, "m@x").await;
    up.refuse_connections(true).await;
    let err = TcpStream::connect(up.addr())
        .await
        .expect_err("nothing listens");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // A session already open goes on.
    assert_eq!(send_message(&mut open, "<during@x>").await.0, 250);
    up.refuse_connections(true).await;
    up.refuse_connections(false).await;
    up.refuse_connections(false).await;
    let mut s = login(&up, &ca, "m@x").await;
    assert_eq!(send_message(&mut s, "<after@x>").await.0, 250);
    assert_eq!(up.message_ids(), ["<during@x>", "<after@x>"]);
    // Refused again and back, on the same address.
    up.refuse_connections(true).await;
    assert!(TcpStream::connect(up.addr()).await.is_err());
    up.refuse_connections(false).await;
    let mut s = login(&up, &ca, "m@x").await;
    assert_eq!(send_message(&mut s, "<again@x>").await.0, 250);
}
