//! Replacing an office relay (issue 11, SPEC "Listeners and who may relay"): implicit TLS on
//! `listen.smtps`, `listen.allow_networks` refusing other addresses at connect, devices on a
//! `[[relay_network]]` sending without AUTH as its account, and `allowed_rcpt`. The
//! in-process bridge on loopback addresses (127.0.0.2-4 are loopback too, so a client's
//! source address can be chosen by binding it before connect).

use crate::harness::*;
use smtp_oauth_bridge::bridge::{Bridge, Listeners};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const MSG: &[u8] = b"From: Scanner <scanner@contoso.com>\r\nTo: a@fabrikam.com\r\nSubject: scan\r\n\r\n.leading dot\r\n..two dots\r\n\xc3\x9cml\xc3\xa4ut 8-bit\r\nlast\r\n";

/// The remote ends and the bridge with one plain listener and `smtps` implicit-TLS ones;
/// `edit` changes the configuration text first.
async fn start_office(opts: Opts, smtps: usize, edit: impl Fn(String) -> String) -> Env {
    let mut env = remote_ends(&opts).await;
    env.config_text = edit(env.config_text.clone());
    std::fs::write(&env.config_path, &env.config_text).unwrap();
    let config = load_config(&env);
    let mut listeners = Listeners {
        smtp: vec![bind().await],
        ..Listeners::default()
    };
    for _ in 0..smtps {
        listeners.smtps.push(bind().await);
    }
    let bridge = Bridge::start_listeners(&config, listeners)
        .await
        .expect("bridge starts");
    env.addr = bridge.local_addr;
    env.bridge = Some(bridge);
    env
}

fn bridge(env: &Env) -> &Bridge {
    env.bridge.as_ref().unwrap()
}

/// The metrics exposition of the running bridge.
fn metrics(env: &Env) -> String {
    let b = bridge(env);
    b.admin.metrics.render(&b.admin.snapshot()).unwrap()
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
    sock.connect(to).await.expect("connect")
}

/// A TLS client trusting the certificate the bridge generated for its listeners.
fn tls_connector(env: &Env) -> tokio_rustls::TlsConnector {
    let pem = std::fs::read(env.dir.path().join("certs/bridge.crt")).expect("generated cert");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// An SMTP session through implicit TLS (the greeting already read).
async fn tls_smtp(env: &Env, addr: SocketAddr) -> Smtp<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tls_connector(env).connect(name, tcp),
    )
    .await
    .expect("handshake within 5 s")
    .expect("TLS handshake with the smtps listener");
    let mut c = Smtp::over(tls);
    let (code, text) = c.reply().await;
    assert_eq!(code, 220, "greeting over TLS: {text}");
    c
}

/// Everything the peer sends until it closes (bounded).
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("closed within 10 s")
        .ok();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls_listener_relays_byte_identical_and_survives_a_plaintext_client() {
    let env = start_office(
        Opts {
            listen: "smtps = [\"127.0.0.1:0\"]".into(),
            ..Opts::default()
        },
        1,
        |t| t,
    )
    .await;
    let smtps = bridge(&env).smtps_addrs[0];
    assert_ne!(smtps, env.addr);

    // A plaintext client on the implicit-TLS port: its EHLO is no ClientHello, the handshake
    // fails, it never sees a greeting, and the connection is closed.
    let mut plain = TcpStream::connect(smtps).await.unwrap();
    plain.write_all(b"EHLO plain.client\r\n").await.unwrap();
    let got = read_until_closed(&mut plain).await;
    assert!(
        !got.starts_with(b"220"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        got.is_empty() || got[0] == 0x15,
        "nothing or a TLS alert: {got:?}"
    );

    // The listener keeps serving: a TLS client relays, byte-identical.
    let mut c = tls_smtp(&env, smtps).await;
    let (code, ehlo) = c.cmd("EHLO tls.client").await;
    assert_eq!(code, 250, "{ehlo}");
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "TLS is already on: {ehlo}");
    let (code, text) = c
        .cmd(&format!("AUTH PLAIN {}", base64_plain(USER, PASSWORD)))
        .await;
    assert_eq!(code, 235, "{text}");
    let (code, text) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "{text}");
    c.expect("QUIT", 221).await;
    let got = env.upstream.wait_received(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, MSG, "bytes differ");
    assert_eq!(got[0].auth_user, MAILBOX);
    assert_eq!(got[0].rcpts, vec!["a@fabrikam.com"]);

    // A second TLS client, and the plain listener next to it, still work.
    let mut c = tls_smtp(&env, smtps).await;
    c.expect("EHLO again", 250).await;
    c.expect("QUIT", 221).await;
    let mut p = TcpSmtp::connect(env.addr).await;
    let ehlo = p.expect("EHLO plain", 250).await;
    assert!(!ehlo.contains("STARTTLS"), "listen.tls is off: {ehlo}");
    p.expect("QUIT", 221).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_allow_networks_get_554_at_connect() {
    let env = start_office(
        Opts {
            listen: "allow_networks = [\"127.0.0.1/32\"]\nsmtps = [\"127.0.0.1:0\"]".into(),
            ..Opts::default()
        },
        1,
        |t| t,
    )
    .await;
    let smtps = bridge(&env).smtps_addrs[0];

    // Refused before anything is read: one 554 line, then the connection is closed.
    let mut s = connect_from("127.0.0.2", env.addr).await;
    assert_eq!(
        read_until_closed(&mut s).await,
        b"554 5.7.1 Access denied: your address may not use this service\r\n"
    );
    // On the implicit-TLS port (where a plaintext reply could not be read): closed.
    let mut s = connect_from("127.0.0.2", smtps).await;
    assert_eq!(read_until_closed(&mut s).await, b"");
    let text = metrics(&env);
    assert!(
        text.contains("\nsmtp_oauth_bridge_connections_refused_total{reason=\"network\"} 2\n"),
        "{text}"
    );

    // 127.0.0.1 is allowed, and relays.
    let s = connect_from("127.0.0.1", env.addr).await;
    let mut c = Smtp::over(s);
    assert_eq!(c.reply().await.0, 220);
    c.login().await;
    let (code, text) = c.send_message(MAILBOX, &["a@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "{text}");
    c.expect("QUIT", 221).await;
    assert_eq!(
        env.upstream
            .wait_received(1, Duration::from_secs(5))
            .await
            .len(),
        1
    );
    let mut c = tls_smtp(&env, smtps).await;
    c.expect("EHLO tls", 250).await;
    c.expect("QUIT", 221).await;
    assert!(
        metrics(&env).contains("connections_refused_total{reason=\"network\"} 2\n"),
        "allowed clients are not counted"
    );
}

/// `MAIL FROM` commands the upstream has seen so far.
fn upstream_mails(env: &Env) -> usize {
    env.upstream
        .log()
        .iter()
        .filter(|l| l.to_ascii_uppercase().contains("MAIL FROM"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_network_sends_without_auth_as_its_account_within_allowed_rcpt() {
    let env = start_office(
        Opts {
            extra: "[[relay_network]]\ncidr = [\"127.0.0.3/32\"]\naccount = \"scanner\"\n".into(),
            ..Opts::default()
        },
        0,
        |t| {
            let from =
                format!("allowed_from = [\"{MAILBOX}\", \"rené@contoso.com\", \"*@fabrikam.com\"]");
            assert!(t.contains(&from));
            t.replace(
                &from,
                &format!("{from}\nallowed_rcpt = [\"*@fabrikam.com\", \"Alerts@Contoso.com\"]"),
            )
        },
    )
    .await;

    // From the relay network: no AUTH, sent as the account (its mailbox in XOAUTH2).
    let mut c = Smtp::over(connect_from("127.0.0.3", env.addr).await);
    assert_eq!(c.reply().await.0, 220);
    let ehlo = c.expect("EHLO scanner.lan", 250).await;
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN"),
        "AUTH is still offered: {ehlo}"
    );
    let (code, text) = c
        .send_message(MAILBOX, &["a@fabrikam.com", "alerts@contoso.com"], MSG)
        .await;
    assert_eq!(code, 250, "{text}");
    let got = env.upstream.wait_received(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].auth_user, MAILBOX);
    assert_eq!(got[0].mail_from, MAILBOX);
    assert_eq!(got[0].rcpts, vec!["a@fabrikam.com", "alerts@contoso.com"]);
    assert_eq!(got[0].data, MSG);
    // allowed_from still applies to the network's account.
    let (code, text) = c.cmd("MAIL FROM:<ceo@contoso.com>").await;
    assert_eq!(
        (code, text.as_str()),
        (550, "5.7.1 Sender address not allowed for this account")
    );

    // A recipient outside allowed_rcpt: 550 at RCPT, and the upstream never hears of it; as
    // the first recipient in sync mode, not even the upstream transaction is opened.
    let mails = upstream_mails(&env);
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    let (code, text) = c.cmd("RCPT TO:<outsider@example.org>").await;
    assert_eq!(
        (code, text.as_str()),
        (550, "5.7.1 Recipient address not allowed for this account")
    );
    assert_eq!(
        upstream_mails(&env),
        mails,
        "no upstream transaction was opened"
    );
    let (code, _) = c.cmd("DATA").await;
    assert_eq!(code, 554, "no valid recipients");
    // Mixed: the refused one is left out, the allowed one is delivered.
    let (code, text) = c
        .send_message(
            MAILBOX,
            &[
                "outsider@example.org",
                "b@fabrikam.com",
                "x@sub.fabrikam.com",
            ],
            MSG,
        )
        .await;
    assert_eq!(code, 250, "{text}");
    c.expect("QUIT", 221).await;
    let got = env.upstream.wait_received(2, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].rcpts, vec!["b@fabrikam.com"]);
    let log = env.upstream.log();
    assert!(
        !log.iter()
            .any(|l| l.contains("outsider") || l.contains("sub.fabrikam")),
        "{log:?}"
    );

    // AUTH from the relay network still works and wins (the log and metrics say "auth").
    let mut c = Smtp::over(connect_from("127.0.0.3", env.addr).await);
    assert_eq!(c.reply().await.0, 220);
    c.login().await;
    let (code, text) = c.send_message(MAILBOX, &["c@fabrikam.com"], MSG).await;
    assert_eq!(code, 250, "{text}");
    // allowed_rcpt is the account's, whichever way the client got it.
    c.expect(&format!("MAIL FROM:<{MAILBOX}>"), 250).await;
    c.expect("RCPT TO:<outsider@example.org>", 550).await;
    c.expect("QUIT", 221).await;

    // From outside the network, without AUTH: 530 as ever.
    let mut c = Smtp::over(connect_from("127.0.0.4", env.addr).await);
    assert_eq!(c.reply().await.0, 220);
    c.expect("EHLO elsewhere", 250).await;
    let (code, text) = c.cmd(&format!("MAIL FROM:<{MAILBOX}>")).await;
    assert_eq!(
        (code, text.as_str()),
        (530, "5.7.0 Authentication required")
    );
    c.expect("QUIT", 221).await;

    let text = metrics(&env);
    for line in [
        "smtp_oauth_bridge_messages_via_total{account=\"scanner\",via=\"network\"} 2",
        "smtp_oauth_bridge_messages_via_total{account=\"scanner\",via=\"auth\"} 1",
        "smtp_oauth_bridge_messages_total{account=\"scanner\",outcome=\"delivered\"} 3",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}\n{text}");
    }
    assert_eq!(env.upstream.received().len(), 3);
}

/// A TLS 1.2 ClientHello whose SNI extension holds `127.0.0.1`, as msmtp, mutt, nullmailer,
/// Net::SMTP, git send-email and PHPMailer send it when told to connect to an IP address.
fn client_hello_with_ip_sni() -> Vec<u8> {
    let name = b"127.0.0.1";
    let mut sni = vec![0x00, 0x00]; // extension type: server_name
    let list_len = 3 + name.len();
    sni.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
    sni.extend_from_slice(&(list_len as u16).to_be_bytes());
    sni.push(0x00); // host_name
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    let mut body = vec![0x03, 0x03]; // TLS 1.2
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0x00, 0x02, 0xc0, 0x2f]); // ECDHE-RSA-AES128-GCM-SHA256
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    body.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    body.extend_from_slice(&sni);
    let mut hs = vec![0x01]; // ClientHello
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}

/// An IP address as SNI is normal client behaviour: rustls's WARN about it is not logged
/// (its target is capped at ERROR), while the failed handshake itself still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_address_sni_is_not_a_warning() {
    let env = remote_ends(&Opts {
        listen: "tls = \"starttls\"".into(),
        ..Opts::default()
    })
    .await;
    let bridge = BridgeProcess::start(&env.config_path, "info");
    let mut s = TcpStream::connect(bridge.addr).await.unwrap();
    let mut c = Smtp::over(&mut s);
    assert_eq!(c.reply().await.0, 220);
    c.expect("EHLO php.mailer", 250).await;
    c.expect("STARTTLS", 220).await;
    drop(c);
    s.write_all(&client_hello_with_ip_sni()).await.unwrap();
    let answer = read_until_closed(&mut s).await;
    assert_eq!(answer.first(), Some(&0x15), "a TLS alert: {answer:?}");
    let (status, log) = bridge.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert!(!log.contains("Illegal SNI"), "{log}");
}
