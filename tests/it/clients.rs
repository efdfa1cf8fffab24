//! Real third-party clients: Python's smtplib (AUTH LOGIN) and swaks (AUTH PLAIN, local
//! STARTTLS). Each skips with a printed reason only when the tool is not installed.

use crate::harness::*;
use std::time::Duration;

const SMTPLIB: &str = r#"
import smtplib, sys
port, user, pw = int(sys.argv[1]), sys.argv[2], sys.argv[3]
msg1 = open(sys.argv[4], 'rb').read()
msg2 = open(sys.argv[5], 'rb').read()
s = smtplib.SMTP('127.0.0.1', port, timeout=30)
s.ehlo('python.test')
s.user, s.password = user, pw
code, _ = s.auth('LOGIN', s.auth_login, initial_response_ok=False)
assert code == 235, code
# Bcc-only recipient: in the envelope, not in the headers.
s.sendmail('scanner@contoso.com', ['a@fabrikam.com', 'hidden-bcc@fabrikam.com'], msg1)
# Null sender, SMTPUTF8 recipient, 8-bit body.
s.sendmail('', ['jörg@bücher.example'], msg2, mail_options=['SMTPUTF8', 'BODY=8BITMIME'])
s.quit()
print('sent')
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_smtplib_auth_login() {
    let Some(python) = tool("python3") else {
        return;
    };
    let env = start(Opts::default()).await;
    let msg1 = b"From: scanner@contoso.com\r\nTo: a@fabrikam.com\r\nSubject: smtplib\r\n\r\n.dot first\r\n..\r\nbody\r\n".to_vec();
    let msg2 = "From: René <rené@contoso.com>\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nGrüße, 8-bit body ✓\r\n.\r\n".as_bytes().to_vec();
    let (p1, p2) = (env.dir.path().join("m1.eml"), env.dir.path().join("m2.eml"));
    std::fs::write(&p1, &msg1).unwrap();
    std::fs::write(&p2, &msg2).unwrap();
    let out = tokio::process::Command::new(python)
        .args(["-c", SMTPLIB, &env.addr.port().to_string(), USER, PASSWORD])
        .arg(&p1)
        .arg(&p2)
        .output()
        .await
        .expect("run python3");
    assert!(
        out.status.success(),
        "smtplib failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let got = env.upstream.wait_received(2, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].data, msg1);
    assert_eq!(
        got[0].rcpts,
        vec!["a@fabrikam.com", "hidden-bcc@fabrikam.com"]
    );
    assert_eq!(got[1].mail_from, "");
    assert_eq!(got[1].rcpts, vec!["jörg@bücher.example"]);
    assert!(got[1].mail_params.contains("SMTPUTF8"));
    assert_eq!(got[1].data, msg2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_auth_plain_with_local_starttls() {
    let Some(swaks) = tool("swaks") else { return };
    let env = start(Opts {
        listen: "tls = \"starttls\"\nrequire_tls_for_auth = true".into(),
        ..Opts::default()
    })
    .await;
    // A self-signed localhost certificate was generated for the listener.
    assert!(env.dir.path().join("certs/bridge.crt").exists());
    let msg = "From: scanner@contoso.com\r\nTo: x@fabrikam.com\r\nSubject: swaks\r\n\r\n.leading dot\r\nÜmläut 8-bit\r\n".as_bytes();
    // swaks always sends CRLF.CRLF after the data it is given, so the file holds the
    // message without its final CRLF; what the bridge receives is then exactly `msg`.
    let p = env.dir.path().join("swaks.eml");
    std::fs::write(&p, msg.strip_suffix(b"\r\n").unwrap()).unwrap();
    let out = tokio::process::Command::new(&swaks)
        .args([
            "--server",
            &env.addr.to_string(),
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            USER,
            "--auth-password",
            PASSWORD,
        ])
        .args([
            "--from",
            MAILBOX,
            "--to",
            "x@fabrikam.com,bcc@fabrikam.com",
            "--data",
        ])
        .arg(&p)
        .output()
        .await
        .expect("run swaks");
    let transcript = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "swaks failed:\n{transcript}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(transcript.contains("STARTTLS"), "{transcript}");
    let got = env.upstream.wait_received(1, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, msg, "swaks message bytes");
    assert_eq!(got[0].rcpts, vec!["x@fabrikam.com", "bcc@fabrikam.com"]);

    // Without STARTTLS, AUTH is refused (require_tls_for_auth) and nothing is sent.
    let out = tokio::process::Command::new(&swaks)
        .args([
            "--server",
            &env.addr.to_string(),
            "--auth",
            "PLAIN",
            "--auth-user",
            USER,
            "--auth-password",
            PASSWORD,
        ])
        .args(["--from", MAILBOX, "--to", "x@fabrikam.com", "--data"])
        .arg(&p)
        .output()
        .await
        .expect("run swaks");
    assert!(!out.status.success());
    assert_eq!(env.upstream.received().len(), 1);
}
