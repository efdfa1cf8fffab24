//! The fakes against the real client libraries the bridge uses (reqwest for the token
//! endpoint, lettre for SMTP), so a mismatch in framing or protocol shows up here first.

use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use tokio::net::TcpListener;

use super::{FakeTokenEndpoint, FakeUpstream, FakeUpstreamOptions, TestCa, TokenOptions};

const FORM: &str = "grant_type=client_credentials&client_id=test-client&client_secret=test-secret\
                    &scope=https%3A%2F%2Foutlook.office365.com%2F.default";

#[tokio::test]
async fn reqwest_token_then_lettre_starttls_xoauth2() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let ep = FakeTokenEndpoint::start(listener, TokenOptions::default()).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let resp = http
            .post(ep.token_url())
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Accept", "application/json")
            .body(FORM)
            .send()
            .await
            .expect("token request");
        assert_eq!(resp.status(), 200);
        let bytes = resp.bytes().await.expect("body");
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        tokens.push(v["access_token"].as_str().expect("token").to_string());
    }
    assert_eq!(ep.requests(), 2);
    assert_eq!(ep.issued(), tokens);

    let ca = TestCa::new();
    let (cert, key) = ca.issue_server_cert();
    let mut opts = FakeUpstreamOptions::new(cert, key);
    opts.tokens = Some(ep.clone());
    opts.mailbox_ok = Some(vec!["scanner@contoso.com".to_string()]);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = FakeUpstream::start(listener, opts).await;

    let tls = TlsParameters::builder("localhost".to_string())
        .add_root_certificate(Certificate::from_pem(ca.ca_cert_pem.as_bytes()).expect("ca"))
        .build_rustls()
        .expect("tls parameters");
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(up.addr().port())
        .tls(Tls::Required(tls))
        .credentials(Credentials::new(
            "scanner@contoso.com".to_string(),
            tokens[1].clone(),
        ))
        .authentication(vec![Mechanism::Xoauth2])
        .timeout(Some(Duration::from_secs(2)))
        .build();
    let envelope = Envelope::new(
        Some("scanner@contoso.com".parse().expect("from")),
        vec!["a@x.example".parse().expect("to")],
    )
    .expect("envelope");
    let body = b"Subject: hi\r\n\r\n.dot line\r\nend\r\n";
    // lettre's send_raw always appends "\r\n.\r\n", so a body that already ends in CRLF
    // must be handed over without it, or the upstream receives one CRLF too many.
    let without_final_crlf = &body[..body.len() - 2];
    let resp = transport
        .send_raw(&envelope, without_final_crlf)
        .await
        .expect("delivered");
    assert_eq!(resp.code().to_string(), "250");

    let got = up.wait_received(1, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, body);
    assert_eq!(got[0].auth_token, tokens[1]);
    assert!(got[0].tls);

    // A revoked token is refused with Microsoft's 535 5.7.3.
    ep.revoke_all();
    let err = transport
        .send_raw(&envelope, without_final_crlf)
        .await
        .expect_err("revoked token");
    assert!(err.to_string().contains("5.7.3"), "{err}");
    assert_eq!(up.received().len(), 1);
}
