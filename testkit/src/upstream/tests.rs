//! End-to-end tests of the fake upstream (with the fake token endpoint and test CA) over
//! real loopback sockets, driven by a raw SMTP client written here.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{FakeUpstream, FakeUpstreamOptions, Reply};
use crate::{FakeTokenEndpoint, TestCa, TokenOptions};

pub(super) const STEP: Duration = Duration::from_secs(2);

/// Reads one complete (possibly multi-line) reply: `(code, lines joined by '\n')`, each
/// line without its `NNN-`/`NNN ` prefix.
pub(super) async fn read_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> (u16, String) {
    let mut lines = Vec::new();
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..i]).to_string();
            buf.drain(..i + 2);
            assert!(line.len() >= 4, "short reply line {line:?}");
            let code: u16 = line[..3].parse().expect("reply code");
            lines.push(line[4..].to_string());
            if line.as_bytes()[3] == b' ' {
                return (code, lines.join("\n"));
            }
            continue;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(STEP, s.read(&mut chunk))
            .await
            .expect("reply in time")
            .expect("read");
        assert!(n > 0, "connection closed while waiting for a reply");
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub(super) async fn cmd<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    line: &str,
) -> (u16, String) {
    s.write_all(format!("{line}\r\n").as_bytes())
        .await
        .expect("write");
    read_reply(s, buf).await
}

/// True once the server has closed the connection (EOF or reset) with nothing more to say.
pub(super) async fn closed<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut b = [0u8; 64];
    match tokio::time::timeout(STEP, s.read(&mut b)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

pub(super) fn connector(ca: &TestCa) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.ca_cert_pem.as_bytes()) {
        roots.add(cert.expect("ca pem")).expect("add root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

pub(super) async fn tls(ca: &TestCa, name: &str, tcp: TcpStream) -> TlsStream<TcpStream> {
    let name = ServerName::try_from(name.to_string()).expect("server name");
    connector(ca)
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}

pub(super) fn xoauth2(user: &str, token: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

pub(super) async fn start(opts: FakeUpstreamOptions) -> FakeUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    FakeUpstream::start(listener, opts).await
}

/// A client_credentials token from the fake endpoint, over a raw HTTP/1.1 request.
async fn fetch_token(ep: &FakeTokenEndpoint) -> String {
    let url = ep.base_url();
    let hostport = url.strip_prefix("http://").expect("http url");
    let mut s = TcpStream::connect(hostport).await.expect("connect");
    let body = "grant_type=client_credentials&client_id=test-client&client_secret=test-secret\
                &scope=https%3A%2F%2Foutlook.office365.com%2F.default";
    let path = ep.token_url().replace(&url, "");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.expect("read");
    let text = String::from_utf8(resp).expect("utf8");
    let (head, json) = text.split_once("\r\n\r\n").expect("head");
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let v: serde_json::Value = serde_json::from_str(json).expect("json");
    v["access_token"].as_str().expect("token").to_string()
}

#[tokio::test]
async fn starttls_xoauth2_pipelined_message_with_leading_dots() {
    let ca = TestCa::new();
    let (cert, key) = ca.issue_server_cert();
    let token_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ep = FakeTokenEndpoint::start(token_listener, TokenOptions::default()).await;
    let save = tempfile::tempdir().expect("tempdir");
    let mut opts = FakeUpstreamOptions::new(cert, key);
    opts.tokens = Some(ep.clone());
    opts.mailbox_ok = Some(vec!["Sender@Contoso.com".to_string()]);
    opts.save_dir = Some(save.path().to_path_buf());
    let up = start(opts).await;
    up.set_rcpt_reply(
        "bad@x.example",
        Some(Reply::new(
            550,
            "5.1.10 RESOLVER.ADR.RecipientNotFound; not found",
        )),
    );
    let token = fetch_token(&ep).await;

    let mut buf = Vec::new();
    let mut tcp = TcpStream::connect(up.addr()).await.expect("connect");
    let (code, text) = read_reply(&mut tcp, &mut buf).await;
    assert_eq!(code, 220);
    assert_eq!(
        text,
        "FAKE.outlook.office365.com Microsoft ESMTP MAIL Service ready"
    );

    let (code, ehlo) = cmd(&mut tcp, &mut buf, "EHLO client.example").await;
    assert_eq!(code, 250);
    let exts: Vec<&str> = ehlo.lines().skip(1).collect();
    assert_eq!(
        exts,
        [
            "SIZE 157286400",
            "PIPELINING",
            "DSN",
            "ENHANCEDSTATUSCODES",
            "STARTTLS",
            "8BITMIME",
            "BINARYMIME",
            "CHUNKING",
            "SMTPUTF8"
        ]
    );
    let auth_line = format!("AUTH XOAUTH2 {}", xoauth2("sender@contoso.com", &token));
    assert_eq!(
        cmd(&mut tcp, &mut buf, &auth_line).await,
        (504, "5.7.4 Unrecognized authentication type".to_string())
    );
    assert_eq!(
        cmd(&mut tcp, &mut buf, "MAIL FROM:<sender@contoso.com>").await,
        (
            530,
            "5.7.57 Client not authenticated to send mail".to_string()
        )
    );
    assert_eq!(cmd(&mut tcp, &mut buf, "STARTTLS").await.0, 220);
    assert!(buf.is_empty());

    let mut s = tls(&ca, "localhost", tcp).await;
    // EHLO is required again after STARTTLS.
    assert_eq!(
        cmd(&mut s, &mut buf, "MAIL FROM:<sender@contoso.com>")
            .await
            .0,
        503
    );
    let (code, ehlo) = cmd(&mut s, &mut buf, "EHLO client.example").await;
    assert_eq!(code, 250);
    assert!(ehlo.lines().any(|l| l == "AUTH LOGIN XOAUTH2"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");

    let wrong_token = format!(
        "AUTH XOAUTH2 {}",
        xoauth2("sender@contoso.com", "eyJ0forged")
    );
    assert_eq!(
        cmd(&mut s, &mut buf, &wrong_token).await,
        (535, "5.7.3 Authentication unsuccessful [FAKE]".to_string())
    );
    let wrong_user = format!("AUTH XOAUTH2 {}", xoauth2("other@contoso.com", &token));
    assert_eq!(cmd(&mut s, &mut buf, &wrong_user).await.0, 535);
    assert_eq!(
        cmd(&mut s, &mut buf, &auth_line).await,
        (235, "2.7.0 Authentication successful".to_string())
    );

    // Pipelined envelope in one write.
    s.write_all(
        b"MAIL FROM:<sender@contoso.com> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<a@x.example>\r\n\
          RCPT TO:<bad@x.example>\r\nRCPT TO:<B@x.example> NOTIFY=NEVER\r\nDATA\r\n",
    )
    .await
    .expect("write");
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(read_reply(&mut s, &mut buf).await);
    }
    assert_eq!(codes[0], (250, "2.1.0 Sender OK".to_string()));
    assert_eq!(codes[1], (250, "2.1.5 Recipient OK".to_string()));
    assert_eq!(codes[2].0, 550);
    assert_eq!(codes[3].0, 250);
    assert_eq!(
        codes[4],
        (354, "Start mail input; end with <CRLF>.<CRLF>".to_string())
    );

    // The message, dot-stuffed, written in awkward pieces (splitting CRLF and the dots).
    let message: &[u8] = b".starts with a dot\r\nSubject: t\r\n\r\n..two dots\r\nbare\n.\nlf\r\n";
    let wire = super::dot::stuff(message);
    assert!(wire.starts_with(b"..starts") && wire.ends_with(b"lf\r\n.\r\n"));
    for piece in wire.chunks(7) {
        s.write_all(piece).await.expect("write");
        s.flush().await.expect("flush");
    }
    let (code, text) = read_reply(&mut s, &mut buf).await;
    assert_eq!(code, 250, "{text}");
    assert!(text.starts_with("2.6.0 <"), "{text}");
    assert!(text.ends_with("Queued mail for delivery"), "{text}");
    assert_eq!(
        cmd(&mut s, &mut buf, "QUIT").await,
        (
            221,
            "2.0.0 Service closing transmission channel".to_string()
        )
    );

    let got = up.wait_received(1, STEP).await;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.mail_from, "sender@contoso.com");
    assert_eq!(m.mail_params, "SIZE=100 BODY=8BITMIME");
    assert_eq!(m.rcpts, ["a@x.example", "B@x.example"]);
    assert_eq!(m.data, message);
    assert_eq!(m.auth_user, "sender@contoso.com");
    assert_eq!(m.auth_token, token);
    assert!(m.tls);
    assert_eq!(m.session, 1);
    let path = m.path.as_ref().expect("saved");
    assert_eq!(path, &save.path().join("1.eml"));
    assert_eq!(std::fs::read(path).expect("read saved"), m.data);

    assert_eq!(up.connections(), 1);
    assert_eq!(up.auth_attempts(), 4);
    let log = up.log();
    assert_eq!(log[0], "S1 EHLO client.example");
    assert_eq!(log[1], format!("S1 {auth_line}"));
    assert!(log.contains(&"S1 STARTTLS".to_string()));
    assert!(log.contains(&"S1 RCPT TO:<bad@x.example>".to_string()));
    assert_eq!(log.last().map(String::as_str), Some("S1 QUIT"));
    assert!(
        !log.iter().any(|l| l.contains("two dots")),
        "DATA content is not logged"
    );
}

#[tokio::test]
async fn implicit_tls_continuation_auth_bdat_and_scripted_data_reply() {
    let ca = TestCa::new();
    let (cert, key) = ca.issue_server_cert();
    let mut opts = FakeUpstreamOptions::new(cert, key);
    opts.implicit_tls = true;
    let up = start(opts).await;

    let tcp = TcpStream::connect(up.addr()).await.expect("connect");
    // The certificate is valid for the IP address too.
    let mut s = tls(&ca, "127.0.0.1", tcp).await;
    let mut buf = Vec::new();
    assert_eq!(read_reply(&mut s, &mut buf).await.0, 220);
    let (_, ehlo) = cmd(&mut s, &mut buf, "EHLO c").await;
    assert!(ehlo.contains("AUTH LOGIN XOAUTH2") && !ehlo.contains("STARTTLS"));
    assert_eq!(cmd(&mut s, &mut buf, "STARTTLS").await.0, 503);

    // Basic auth is disabled, as in Microsoft 365.
    assert_eq!(
        cmd(&mut s, &mut buf, "AUTH LOGIN").await,
        (334, "VXNlcm5hbWU6".into())
    );
    assert_eq!(
        cmd(&mut s, &mut buf, "dXNlcg==").await,
        (334, "UGFzc3dvcmQ6".into())
    );
    assert_eq!(cmd(&mut s, &mut buf, "cGFzcw==").await.0, 535);
    assert_eq!(cmd(&mut s, &mut buf, "AUTH PLAIN AHUAcA==").await.0, 504);

    // XOAUTH2 without initial response; any non-empty token is fine without an endpoint.
    assert_eq!(
        cmd(&mut s, &mut buf, "AUTH XOAUTH2").await,
        (334, String::new())
    );
    let resp = xoauth2("m@x", "anything");
    assert_eq!(cmd(&mut s, &mut buf, &resp).await.0, 235);

    // A 4xx final reply stores nothing.
    up.set_data_reply(Some(Reply::new(451, "4.7.500 Server busy")));
    assert_eq!(cmd(&mut s, &mut buf, "MAIL FROM:<>").await.0, 250);
    assert_eq!(cmd(&mut s, &mut buf, "DATA").await.0, 503);
    assert_eq!(cmd(&mut s, &mut buf, "RCPT TO:<r@x>").await.0, 250);
    assert_eq!(cmd(&mut s, &mut buf, "DATA").await.0, 354);
    assert_eq!(
        cmd(&mut s, &mut buf, "x\r\n.").await,
        (451, "4.7.500 Server busy".into())
    );
    assert!(up.received().is_empty());

    // BDAT chunks, the terminator-looking bytes are content.
    up.set_data_reply(None);
    assert_eq!(cmd(&mut s, &mut buf, "MAIL FROM:<>").await.0, 250);
    assert_eq!(cmd(&mut s, &mut buf, "RCPT TO:<r@x>").await.0, 250);
    s.write_all(b"BDAT 7\r\nab\r\n.\r\nBDAT 3 LAST\r\n..x")
        .await
        .expect("write");
    assert_eq!(read_reply(&mut s, &mut buf).await.0, 250);
    assert_eq!(read_reply(&mut s, &mut buf).await.0, 250);
    assert_eq!(cmd(&mut s, &mut buf, "NOOP").await.0, 250);
    let got = up.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].data, b"ab\r\n.\r\n..x");
    assert_eq!(
        (got[0].auth_user.as_str(), got[0].auth_token.as_str()),
        ("m@x", "anything")
    );
    assert!(got[0].tls && got[0].path.is_none());

    // Empty message: "." straight after DATA.
    assert_eq!(cmd(&mut s, &mut buf, "MAIL FROM:<a@b>").await.0, 250);
    assert_eq!(cmd(&mut s, &mut buf, "RCPT TO:<r@x>").await.0, 250);
    assert_eq!(cmd(&mut s, &mut buf, "DATA").await.0, 354);
    assert_eq!(cmd(&mut s, &mut buf, ".").await.0, 250);
    assert_eq!(up.wait_received(2, STEP).await[1].data, b"");

    // Without keeping data, messages are still counted and their envelope recorded.
    up.set_keep_data(false);
    assert_eq!(cmd(&mut s, &mut buf, "MAIL FROM:<a@b>").await.0, 250);
    assert_eq!(cmd(&mut s, &mut buf, "RCPT TO:<r@x>").await.0, 250);
    assert_eq!(cmd(&mut s, &mut buf, "DATA").await.0, 354);
    assert_eq!(cmd(&mut s, &mut buf, "big\r\n.").await.0, 250);
    assert_eq!(up.received_count(), 3);
    assert!(up.received()[2].data.is_empty());
}

#[test]
fn public_handles_are_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<FakeUpstream>();
    check::<FakeTokenEndpoint>();
    check::<TestCa>();
    check::<super::Received>();
}

#[tokio::test]
async fn greeting_pause_resume_and_idle_close() {
    let ca = TestCa::new();
    let (cert, key) = ca.issue_server_cert();
    let up = start(FakeUpstreamOptions::new(cert, key)).await;
    let mut buf = Vec::new();

    up.set_greeting(Some(Reply::new(421, "4.3.2 Service not available")));
    let mut c = TcpStream::connect(up.addr()).await.expect("connect");
    assert_eq!(read_reply(&mut c, &mut buf).await.0, 421);
    assert!(closed(&mut c).await);
    up.set_greeting(None);

    // An open session is dropped by pause; new connections are closed at once.
    let mut a = TcpStream::connect(up.addr()).await.expect("connect");
    assert_eq!(read_reply(&mut a, &mut buf).await.0, 220);
    assert_eq!(cmd(&mut a, &mut buf, "EHLO a").await.0, 250);
    up.pause();
    assert!(closed(&mut a).await);
    let mut b = TcpStream::connect(up.addr()).await.expect("connect");
    assert!(closed(&mut b).await);
    up.resume();
    let mut c = TcpStream::connect(up.addr()).await.expect("connect");
    assert_eq!(read_reply(&mut c, &mut buf).await.0, 220);
    assert_eq!(up.connections(), 4);

    // Idle sessions are dropped; sessions opened afterwards are not.
    up.close_idle_sessions();
    assert!(closed(&mut c).await);
    let mut d = TcpStream::connect(up.addr()).await.expect("connect");
    assert_eq!(read_reply(&mut d, &mut buf).await.0, 220);
    assert_eq!(cmd(&mut d, &mut buf, "NOOP").await.0, 250);
    let mut f = TcpStream::connect(up.addr()).await.expect("connect");
    assert_eq!(read_reply(&mut f, &mut buf).await.0, 220);
    assert!(up.open_sessions() >= 2 && up.peak_sessions() >= 2);

    // Delay applies before every reply.
    up.set_delay(Duration::from_millis(150));
    let t = tokio::time::Instant::now();
    assert_eq!(cmd(&mut d, &mut buf, "NOOP").await.0, 250);
    assert!(t.elapsed() >= Duration::from_millis(150));
    up.set_delay(Duration::ZERO);

    // No message: wait_received gives up at its timeout with what there is.
    assert!(up
        .wait_received(1, Duration::from_millis(50))
        .await
        .is_empty());

    // Without STARTTLS on offer, AUTH is never possible.
    let (cert, key) = ca.issue_server_cert();
    let mut opts = FakeUpstreamOptions::new(cert, key);
    opts.offer_starttls = false;
    let plain = start(opts).await;
    let mut e = TcpStream::connect(plain.addr()).await.expect("connect");
    assert_eq!(read_reply(&mut e, &mut buf).await.0, 220);
    let (_, ehlo) = cmd(&mut e, &mut buf, "EHLO e").await;
    assert!(!ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"));
    assert_eq!(cmd(&mut e, &mut buf, "STARTTLS").await.0, 454);
    assert_eq!(cmd(&mut e, &mut buf, "AUTH XOAUTH2 eA==").await.0, 504);
    assert_eq!(plain.auth_attempts(), 1);
}
