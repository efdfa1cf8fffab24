//! Tests of the fake Graph endpoint over real sockets with reqwest: sendMail round trips,
//! drafts with recipient updates, upload sessions, the request limit, bearer checks,
//! permissions, every fault and the per-mailbox concurrency limit.

use std::time::Duration;

use base64::Engine as _;
use mail_parser::{MessageParser, MimeHeaders};
use reqwest::{header, Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::token::TokenOptions;

const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
const MB: &str = "app@contoso.com";
const WAIT: Duration = Duration::from_secs(10);

struct Env {
    graph: FakeGraph,
    tokens: FakeTokenEndpoint,
    token: String,
    http: reqwest::Client,
}

/// What came back: status, headers, body as JSON (`Null` when empty).
struct Answer {
    status: u16,
    headers: header::HeaderMap,
    raw: Vec<u8>,
    json: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or_default()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

async fn env_with(configure: impl FnOnce(&mut FakeGraphOptions)) -> Env {
    let tokens = FakeTokenEndpoint::start(bind().await, TokenOptions::default()).await;
    let mut opts = FakeGraphOptions::new(Some(tokens.clone()));
    configure(&mut opts);
    let graph = FakeGraph::start(bind().await, opts).await;
    let http = reqwest::Client::new();
    let token = token_for(&http, &tokens, GRAPH_SCOPE).await;
    Env {
        graph,
        tokens,
        token,
        http,
    }
}

async fn env() -> Env {
    env_with(|_| {}).await
}

/// A client_credentials token from the fake token endpoint for `scope`.
async fn token_for(http: &reqwest::Client, tokens: &FakeTokenEndpoint, scope: &str) -> String {
    let form = format!(
        "grant_type=client_credentials&client_id=test-client&client_secret=test-secret&scope={}",
        form_encode(scope)
    );
    let resp = http
        .post(tokens.token_url())
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .expect("token request");
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
    v["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Env {
    fn user_url(&self, mailbox: &str, rest: &str) -> String {
        let mailbox = mailbox.replace('@', "%40");
        format!("{}/v1.0/users/{mailbox}{rest}", self.graph.url())
    }

    /// A request with the environment's token unless `auth` says otherwise (`Some("")`:
    /// no Authorization header).
    async fn call(
        &self,
        method: Method,
        url: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
        auth: Option<&str>,
    ) -> Answer {
        let mut req = self.http.request(method, url).body(body);
        match auth {
            None => req = req.bearer_auth(&self.token),
            Some("") => {}
            Some(a) => req = req.header(header::AUTHORIZATION, a),
        }
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let raw = resp.bytes().await.expect("body").to_vec();
        let json = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&raw).expect("JSON body")
        };
        Answer {
            status,
            headers,
            raw,
            json,
        }
    }

    async fn post_mime(&self, mailbox: &str, rest: &str, mime: &[u8]) -> Answer {
        let b64 = base64::engine::general_purpose::STANDARD.encode(mime);
        let url = self.user_url(mailbox, rest);
        self.call(
            Method::POST,
            &url,
            Some("text/plain"),
            b64.into_bytes(),
            None,
        )
        .await
    }

    async fn json(&self, method: Method, url: &str, v: Value) -> Answer {
        let body = v.to_string().into_bytes();
        self.call(method, url, Some("application/json"), body, None)
            .await
    }

    async fn send_mail(&self, mime: &[u8]) -> Answer {
        self.post_mime(MB, "/sendMail", mime).await
    }
}

fn message(extra_body: usize) -> Vec<u8> {
    let mut m = b"From: App <app@contoso.com>\r\nTo: A <a@x.test>\r\nCc: b@x.test\r\nBcc: c@x.test\r\nSubject: test\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n".to_vec();
    for i in 0..extra_body {
        m.push(b'a' + (i % 26) as u8);
        if i % 70 == 69 {
            m.extend_from_slice(b"\r\n");
        }
    }
    m
}

/// Deterministic bytes that are not a repeating pattern of a short period.
fn noise(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn recipients(list: &[&str]) -> Value {
    Value::Array(
        list.iter()
            .map(|a| json!({"emailAddress": {"address": a, "name": a}}))
            .collect(),
    )
}

fn addresses(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("recipient array")
        .iter()
        .map(|r| {
            r["emailAddress"]["address"]
                .as_str()
                .expect("address")
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn send_mail_delivers_the_submitted_bytes() {
    let e = env().await;
    let mime = message(10 * 1024);
    let a = e.send_mail(&mime).await;
    assert_eq!(a.status, 202);
    assert!(a.raw.is_empty(), "202 has an empty body");

    let sent = e.graph.wait_sent(1, WAIT).await;
    assert_eq!(sent.len(), 1);
    let s = &sent[0];
    assert_eq!(s.mime, mime, "same bytes");
    assert_eq!(s.submitted_mime, mime);
    assert_eq!(s.mailbox, MB);
    assert_eq!(s.to, ["a@x.test"]);
    assert_eq!(s.cc, ["b@x.test"]);
    assert_eq!(s.bcc, ["c@x.test"]);
    assert_eq!(s.recipients(), ["a@x.test", "b@x.test", "c@x.test"]);
    assert_eq!(s.via, GraphSendPath::SendMail);
    assert!(s.save_to_sent_items);
    assert!(s.attachments.is_empty());

    let reqs = e.graph.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/v1.0/users/app%40contoso.com/sendMail");
    assert_eq!(reqs[0].status, 202);
    let b64_len = mime.len().div_ceil(3) * 4;
    assert_eq!(reqs[0].body_bytes, b64_len);
    assert_eq!(e.graph.peak_concurrency("APP@contoso.com"), 1);
    assert_eq!(e.graph.in_flight(MB), 0);
}

#[tokio::test]
async fn send_mail_refuses_what_graph_refuses() {
    let e = env().await;
    let url = e.user_url(MB, "/sendMail");
    let a = e
        .call(
            Method::POST,
            &url,
            Some("text/plain"),
            b"not*base64".to_vec(),
            None,
        )
        .await;
    assert_eq!(
        (a.status, a.code()),
        (400, "ErrorMimeContentInvalidBase64String")
    );

    let no_rcpt = b"From: app@contoso.com\r\nSubject: x\r\n\r\nbody\r\n";
    let a = e.send_mail(no_rcpt).await;
    assert_eq!((a.status, a.code()), (400, "ErrorInvalidRecipients"));

    let a = e
        .call(
            Method::POST,
            &url,
            Some("application/xml"),
            b"<x/>".to_vec(),
            None,
        )
        .await;
    assert_eq!(a.status, 415);

    let a = e
        .json(Method::POST, &url, json!({"saveToSentItems": true}))
        .await;
    assert_eq!((a.status, a.code()), (400, "ErrorInvalidParameter"));

    let a = e.json(Method::GET, &url, json!({})).await;
    assert_eq!(a.status, 405);
    let a = e
        .json(Method::POST, &e.user_url(MB, "/nonsense"), json!({}))
        .await;
    assert_eq!((a.status, a.code()), (400, "BadRequest"));
    assert!(e.graph.sent().is_empty(), "nothing refused was delivered");
}

#[tokio::test]
async fn send_mail_json_form() {
    let e = env().await;
    let content = noise(1000);
    let body = json!({
        "message": {
            "subject": "json",
            "body": {"contentType": "Text", "content": "hi there"},
            "toRecipients": recipients(&["a@x.test"]),
            "bccRecipients": recipients(&["z@x.test"]),
            "attachments": [{
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": "n.bin",
                "contentType": "application/octet-stream",
                "contentBytes": base64::engine::general_purpose::STANDARD.encode(&content),
            }],
        },
        "saveToSentItems": false,
    });
    let a = e
        .json(Method::POST, &e.user_url(MB, "/sendMail"), body)
        .await;
    assert_eq!(a.status, 202);
    let s = &e.graph.wait_sent(1, WAIT).await[0];
    assert_eq!(s.recipients(), ["a@x.test", "z@x.test"]);
    assert!(!s.save_to_sent_items);
    assert_eq!(s.attachments.len(), 1);
    assert_eq!(s.attachments[0].bytes, content);
    assert!(!s.attachments[0].via_upload_session);
    let parsed = MessageParser::default().parse(&s.mime).expect("MIME");
    assert_eq!(parsed.subject(), Some("json"));
    assert_eq!(
        parsed.attachment(0).expect("attachment").contents(),
        &content[..]
    );
    assert!(parsed.bcc().is_none(), "no Bcc header in the rendering");
}

#[tokio::test]
async fn draft_recipients_patch_and_send() {
    let e = env().await;
    let mime = b"From: app@contoso.com\r\nTo: a@x.test\r\nCc: Bee <b@x.test>\r\nSubject: d\r\n\r\nbody\r\n";
    let a = e.post_mime(MB, "/messages", mime).await;
    assert_eq!(a.status, 201);
    let id = a.json["id"].as_str().expect("id").to_string();
    assert_eq!(addresses(&a.json["toRecipients"]), ["a@x.test"]);
    assert_eq!(addresses(&a.json["ccRecipients"]), ["b@x.test"]);
    assert_eq!(a.json["ccRecipients"][0]["emailAddress"]["name"], "Bee");
    assert_eq!(addresses(&a.json["bccRecipients"]), Vec::<String>::new());
    assert_eq!(a.json["isDraft"], true);
    assert_eq!(a.json["hasAttachments"], false);
    assert_eq!(e.graph.open_drafts(), 1);

    let msg_url = e.user_url(MB, &format!("/messages/{id}"));
    let patch = json!({
        "toRecipients": recipients(&["a@x.test"]),
        "ccRecipients": [],
        "bccRecipients": recipients(&["c@x.test"]),
    });
    let a = e.json(Method::PATCH, &msg_url, patch).await;
    assert_eq!(a.status, 200);
    assert_eq!(addresses(&a.json["ccRecipients"]), Vec::<String>::new());
    assert_eq!(addresses(&a.json["bccRecipients"]), ["c@x.test"]);

    let a = e.call(Method::GET, &msg_url, None, Vec::new(), None).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json["id"], id.as_str());
    assert_eq!(a.json["isDraft"], true);
    assert_eq!(addresses(&a.json["bccRecipients"]), ["c@x.test"]);

    // Drafts belong to their mailbox.
    let other = e.user_url("other@contoso.com", &format!("/messages/{id}/send"));
    let a = e.call(Method::POST, &other, None, Vec::new(), None).await;
    assert_eq!((a.status, a.code()), (404, "ErrorItemNotFound"));

    let send_url = format!("{msg_url}/send");
    let a = e
        .call(Method::POST, &send_url, None, Vec::new(), None)
        .await;
    assert_eq!(a.status, 202);
    assert!(a.raw.is_empty());
    let s = &e.graph.wait_sent(1, WAIT).await[0];
    assert_eq!(s.via, GraphSendPath::Draft);
    assert_eq!(s.to, ["a@x.test"]);
    assert!(s.cc.is_empty());
    assert_eq!(s.bcc, ["c@x.test"]);
    assert_eq!(s.mime, mime, "no attachment added: the MIME as submitted");
    assert_eq!(e.graph.open_drafts(), 0);

    let a = e
        .call(Method::POST, &send_url, None, Vec::new(), None)
        .await;
    assert_eq!((a.status, a.code()), (404, "ErrorItemNotFound"));
    let a = e.call(Method::GET, &msg_url, None, Vec::new(), None).await;
    assert_eq!(a.status, 404);
    assert_eq!(e.graph.sent().len(), 1, "sent once");

    // A draft deleted is gone; one without recipients cannot be sent.
    let a = e
        .post_mime(
            MB,
            "/messages",
            b"From: app@contoso.com\r\nSubject: x\r\n\r\nb\r\n",
        )
        .await;
    assert_eq!(a.status, 201);
    let url = e.user_url(
        MB,
        &format!("/messages/{}", a.json["id"].as_str().expect("id")),
    );
    let a = e
        .call(Method::POST, &format!("{url}/send"), None, Vec::new(), None)
        .await;
    assert_eq!((a.status, a.code()), (400, "ErrorInvalidRecipients"));
    assert_eq!(e.graph.open_drafts(), 1);
    let a = e.call(Method::DELETE, &url, None, Vec::new(), None).await;
    assert_eq!(a.status, 204);
    assert_eq!(e.graph.open_drafts(), 0);
    assert_eq!(e.graph.sent().len(), 1);
}

#[tokio::test]
async fn upload_session_reassembles_the_attachment() {
    const MIB: usize = 1024 * 1024;
    let e = env().await;
    let data = noise(5 * MIB);
    let small = noise(1000);
    let mime = b"From: app@contoso.com\r\nTo: a@x.test\r\nSubject: big\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n";
    let a = e.post_mime(MB, "/messages", mime).await;
    assert_eq!(a.status, 201);
    let id = a.json["id"].as_str().expect("id").to_string();
    let msg_url = e.user_url(MB, &format!("/messages/{id}"));

    let session_url = format!("{msg_url}/attachments/createUploadSession");
    let item = |size: usize| {
        json!({"AttachmentItem": {
            "attachmentType": "file", "name": "big.bin", "size": size,
            "contentType": "application/x-big",
        }})
    };
    let a = e.json(Method::POST, &session_url, item(MIB)).await;
    assert_eq!(
        (a.status, a.code()),
        (400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize")
    );
    let a = e.json(Method::POST, &session_url, item(data.len())).await;
    assert_eq!(a.status, 201);
    let upload = a.json["uploadUrl"].as_str().expect("uploadUrl").to_string();
    assert!(
        upload.starts_with(&format!("{}/upload/", e.graph.url())),
        "{upload}"
    );
    assert_eq!(a.json["nextExpectedRanges"], json!(["0-"]));
    assert!(a.json["expirationDateTime"]
        .as_str()
        .is_some_and(|d| d.ends_with('Z')));
    assert_eq!(e.graph.open_upload_sessions(), 1);

    let put = |first: usize, last: usize, auth: Option<&'static str>| {
        let e = &e;
        let upload = upload.clone();
        let body = data[first..=last.min(data.len() - 1)].to_vec();
        let total = data.len();
        async move {
            let mut req = e
                .http
                .put(&upload)
                .header(
                    header::CONTENT_RANGE,
                    format!("bytes {first}-{last}/{total}"),
                )
                .body(body);
            if let Some(a) = auth {
                req = req.header(header::AUTHORIZATION, a);
            }
            let resp = req.send().await.expect("PUT");
            let status = resp.status().as_u16();
            let location = resp
                .headers()
                .get(header::LOCATION)
                .map(|v| v.to_str().expect("ascii").to_string());
            let raw = resp.bytes().await.expect("body");
            let json = serde_json::from_slice(&raw).unwrap_or(Value::Null);
            (status, json, location)
        }
    };
    // Pre-authenticated: a bearer token is refused; ranges must be contiguous.
    let bearer = format!("Bearer {}", e.token);
    let bearer: &'static str = Box::leak(bearer.into_boxed_str());
    assert_eq!(put(0, 2 * MIB - 1, Some(bearer)).await.0, 400);
    assert_eq!(put(1, 2 * MIB, None).await.0, 400);
    // Over the 4 MiB request limit.
    assert_eq!(put(0, 4 * MIB, None).await.0, 413);

    let (status, json, _) = put(0, 2 * MIB - 1, None).await;
    assert_eq!(status, 200);
    assert_eq!(json["nextExpectedRanges"], json!([(2 * MIB).to_string()]));
    assert_eq!(put(2 * MIB, 4 * MIB - 1, None).await.0, 200);

    // A small one through POST .../attachments meanwhile.
    let small_json = json!({
        "@odata.type": "#microsoft.graph.fileAttachment",
        "name": "small.txt", "contentType": "text/plain",
        "contentBytes": base64::engine::general_purpose::STANDARD.encode(&small),
    });
    let a = e
        .json(Method::POST, &format!("{msg_url}/attachments"), small_json)
        .await;
    assert_eq!(a.status, 201);
    assert_eq!(a.json["size"], 1000);

    let (status, _, location) = put(4 * MIB, 5 * MIB - 1, None).await;
    assert_eq!(status, 201);
    let location = location.expect("Location");
    assert!(
        location.contains(&format!("/messages/{id}/attachments/")),
        "{location}"
    );
    assert_eq!(e.graph.open_upload_sessions(), 0);
    assert_eq!(put(0, 1, None).await.0, 404, "the session is finished");

    let a = e.call(Method::GET, &msg_url, None, Vec::new(), None).await;
    assert_eq!(a.json["hasAttachments"], true);
    let a = e
        .call(
            Method::POST,
            &format!("{msg_url}/send"),
            None,
            Vec::new(),
            None,
        )
        .await;
    assert_eq!(a.status, 202);

    let s = &e.graph.wait_sent(1, WAIT).await[0];
    assert_eq!(s.via, GraphSendPath::Draft);
    assert_eq!(s.submitted_mime, mime);
    let names: Vec<&str> = s.attachments.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["small.txt", "big.bin"]);
    assert_eq!(s.attachments[1].bytes, data, "byte-identical");
    assert_eq!(s.attachments[1].content_type, "application/x-big");
    assert!(s.attachments[1].via_upload_session);
    assert!(!s.attachments[0].via_upload_session);

    let parsed = MessageParser::default().parse(&s.mime).expect("MIME");
    assert_eq!(parsed.subject(), Some("big"));
    assert_eq!(parsed.body_text(0).as_deref(), Some("see attached\r\n"));
    assert_eq!(parsed.attachment_count(), 2);
    let big = parsed.attachment(1).expect("big");
    assert_eq!(big.attachment_name(), Some("big.bin"));
    assert_eq!(big.contents(), &data[..]);

    let puts: Vec<GraphRequest> = e
        .graph
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .collect();
    assert_eq!(puts.len(), 7);
    assert_eq!(
        puts.iter().map(|r| r.status).collect::<Vec<_>>(),
        [400, 400, 413, 200, 200, 201, 404]
    );
    assert_eq!(puts[2].body_bytes, 4 * MIB + 1);
    assert!(puts
        .iter()
        .filter(|r| r.status != 413)
        .all(|r| r.body_bytes <= MAX_REQUEST_BYTES));
    // Upload PUTs count against the mailbox too.
    assert!(e.graph.peak_concurrency(MB) >= 1);
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let e = env_with(|o| o.max_request_bytes = 64 * 1024).await;
    let a = e.send_mail(&message(100 * 1024)).await;
    assert_eq!((a.status, a.code()), (413, "RequestEntityTooLarge"));
    let last = e.graph.requests().pop().expect("logged");
    assert_eq!(last.status, 413);
    assert!(last.body_bytes > 64 * 1024);

    // Chunked, so only counting while reading finds it too large.
    let addr = e.graph.url().trim_start_matches("http://").to_string();
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    let mut req = format!(
        "POST /v1.0/users/{MB}/sendMail HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n",
        e.token
    );
    let chunk = "QUFB".repeat(4096);
    for _ in 0..5 {
        req.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    req.push_str("0\r\n\r\n");
    // The server may answer and close before reading it all: ignore write errors.
    let _ = s.write_all(req.as_bytes()).await;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.expect("status line");
    assert_eq!(&head, b"HTTP/1.1 413");
    let last = e.graph.requests().pop().expect("logged");
    assert_eq!((last.status, last.body_bytes), (413, 64 * 1024 + 1));
    assert!(e.graph.sent().is_empty());
}

#[tokio::test]
async fn bearer_tokens_are_checked() {
    let e = env().await;
    let url = e.user_url(MB, "/sendMail");
    let mime = base64::engine::general_purpose::STANDARD.encode(message(0));
    let send = |auth: &'static str| {
        e.call(
            Method::POST,
            &url,
            Some("text/plain"),
            mime.clone().into_bytes(),
            Some(auth),
        )
    };
    let a = send("").await;
    assert_eq!((a.status, a.code()), (401, "InvalidAuthenticationToken"));
    assert!(a
        .header("www-authenticate")
        .is_some_and(|v| v.starts_with("Bearer ")));
    let a = send("Bearer eyJ0madeup").await;
    assert_eq!((a.status, a.code()), (401, "InvalidAuthenticationToken"));
    assert!(!String::from_utf8_lossy(&a.raw).contains("eyJ0madeup"));
    let a = send("Basic YTpi").await;
    assert_eq!(a.status, 401);

    assert_eq!(e.tokens.scope_of(&e.token).as_deref(), Some(GRAPH_SCOPE));
    assert_eq!(e.tokens.scope_of("eyJ0madeup"), None);
    // A token for Exchange Online (SMTP) is not a token for Graph.
    let outlook = token_for(&e.http, &e.tokens, "https://outlook.office365.com/.default").await;
    let auth: &'static str = Box::leak(format!("Bearer {outlook}").into_boxed_str());
    let a = send(auth).await;
    assert_eq!(a.status, 401);
    assert!(a.json["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("audience")));
    assert!(!String::from_utf8_lossy(&a.raw).contains(&outlook));

    // Revoked.
    let good: &'static str = Box::leak(format!("Bearer {}", e.token).into_boxed_str());
    assert_eq!(send(good).await.status, 202);
    e.tokens.revoke_all();
    let a = send(good).await;
    assert_eq!((a.status, a.code()), (401, "InvalidAuthenticationToken"));
    assert!(!String::from_utf8_lossy(&a.raw).contains(&e.token));
    assert_eq!(e.graph.sent().len(), 1);

    // Without a token endpoint any bearer token goes, but one is needed.
    let open = env_with(|o| o.tokens = None).await;
    let url = open.user_url(MB, "/sendMail");
    let a = open
        .call(
            Method::POST,
            &url,
            Some("text/plain"),
            mime.clone().into_bytes(),
            Some("Bearer x"),
        )
        .await;
    assert_eq!(a.status, 202);
    let a = open
        .call(
            Method::POST,
            &url,
            Some("text/plain"),
            mime.into_bytes(),
            Some(""),
        )
        .await;
    assert_eq!(a.status, 401);
}

#[tokio::test]
async fn each_fault_answers_as_graph_does_and_changes_nothing() {
    let e = env().await;
    let mime = message(0);
    let cases = [
        (
            GraphFault::TooManyRequests {
                retry_after_secs: 2,
            },
            429,
            "TooManyRequests",
            Some("2"),
        ),
        (
            GraphFault::Unauthorized,
            401,
            "InvalidAuthenticationToken",
            None,
        ),
        (GraphFault::Forbidden, 403, "ErrorAccessDenied", None),
        (GraphFault::NotFound, 404, "ErrorInvalidUser", None),
        (
            GraphFault::Unavailable,
            503,
            "ServiceUnavailable",
            Some("1"),
        ),
        (GraphFault::GatewayTimeout, 504, "GatewayTimeout", Some("1")),
        (
            GraphFault::BadRequest {
                code: "ErrorMessageSizeExceeded".into(),
            },
            400,
            "ErrorMessageSizeExceeded",
            None,
        ),
    ];
    for (fault, status, code, retry_after) in cases {
        e.graph.fail_next(1, fault.clone());
        let a = e.send_mail(&mime).await;
        assert_eq!((a.status, a.code()), (status, code), "{fault:?}");
        assert_eq!(a.header("retry-after"), retry_after, "{fault:?}");
        assert!(e.graph.sent().is_empty(), "{fault:?} delivered nothing");
    }
    let a = e.graph.requests();
    assert_eq!(a.len(), 7);
    assert_eq!(e.graph.requests()[2].status, 403);
    assert_eq!(
        e.graph.requests()[1].status,
        401,
        "faults are logged with their status"
    );

    // fail_next counts requests; fail_path only those whose path matches.
    e.graph.fail_next(2, GraphFault::Forbidden);
    assert_eq!(e.send_mail(&mime).await.status, 403);
    assert_eq!(e.send_mail(&mime).await.status, 403);
    assert_eq!(e.send_mail(&mime).await.status, 202);

    e.graph.fail_path(1, "/messages", GraphFault::NotFound);
    assert_eq!(e.send_mail(&mime).await.status, 202, "not a /messages path");
    let a = e.post_mime(MB, "/messages", &mime).await;
    assert_eq!((a.status, a.code()), (404, "ErrorInvalidUser"));
    assert_eq!(
        e.graph.open_drafts(),
        0,
        "a faulted draft creation made none"
    );
    assert_eq!(e.post_mime(MB, "/messages", &mime).await.status, 201);
    // Matching the decoded path too.
    e.graph
        .fail_path(1, "app@contoso.com/sendMail", GraphFault::Unavailable);
    assert_eq!(e.send_mail(&mime).await.status, 503);
    assert_eq!(e.graph.sent().len(), 2);
}

#[tokio::test]
async fn a_fifth_concurrent_request_per_mailbox_is_throttled() {
    let e = env().await;
    let mime = message(0);
    e.graph.pause();
    let mut held = Vec::new();
    for _ in 0..4 {
        let http = e.http.clone();
        let url = e.user_url(MB, "/sendMail");
        let token = e.token.clone();
        let body = base64::engine::general_purpose::STANDARD.encode(&mime);
        held.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(token)
                .header(header::CONTENT_TYPE, "text/plain")
                .body(body)
                .send()
                .await
                .expect("request");
            resp.status().as_u16()
        }));
    }
    assert!(e.graph.wait_in_flight(MB, 4, WAIT).await, "4 in flight");
    let a = e.send_mail(&mime).await;
    assert_eq!((a.status, a.code()), (429, "ApplicationThrottled"));
    assert_eq!(a.header("retry-after"), Some("1"));
    assert_eq!(e.graph.peak_concurrency("App@Contoso.com"), 5);
    assert!(e.graph.sent().is_empty());

    e.graph.resume();
    for h in held {
        assert_eq!(h.await.expect("task"), 202);
    }
    assert_eq!(e.graph.wait_sent(4, WAIT).await.len(), 4);
    assert_eq!(e.graph.in_flight(MB), 0);
    assert_eq!(e.graph.peak_concurrency("someone@else"), 0);
}

#[tokio::test]
async fn mailboxes_and_permissions() {
    let e = env_with(|o| o.mailboxes = Some(vec!["App@Contoso.com".into()])).await;
    let a = e.send_mail(&message(0)).await;
    assert_eq!(a.status, 202);
    assert_eq!(
        e.graph.sent()[0].mailbox,
        "App@Contoso.com",
        "the configured spelling"
    );
    let a = e
        .post_mime("nobody@contoso.com", "/sendMail", &message(0))
        .await;
    assert_eq!((a.status, a.code()), (404, "ErrorInvalidUser"));

    let a = e
        .call(Method::GET, &e.user_url(MB, ""), None, Vec::new(), None)
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json["userPrincipalName"], "App@Contoso.com");
    let a = e
        .call(
            Method::GET,
            &e.user_url(MB, "/mailboxSettings"),
            None,
            Vec::new(),
            None,
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json["timeZone"], "UTC");

    // An application with Mail.Send only: sendMail works, drafts and reads do not.
    let e = env_with(|o| o.permissions = vec!["Mail.Send".into()]).await;
    assert_eq!(e.send_mail(&message(0)).await.status, 202);
    let a = e.post_mime(MB, "/messages", &message(0)).await;
    assert_eq!((a.status, a.code()), (403, "ErrorAccessDenied"));
    let a = e
        .json(
            Method::POST,
            &e.user_url(MB, "/messages/x/attachments/createUploadSession"),
            json!({}),
        )
        .await;
    assert_eq!((a.status, a.code()), (403, "ErrorAccessDenied"));
    let a = e
        .call(
            Method::GET,
            &e.user_url(MB, "/mailboxSettings"),
            None,
            Vec::new(),
            None,
        )
        .await;
    assert_eq!((a.status, a.code()), (403, "ErrorAccessDenied"));
    let a = e
        .call(Method::GET, &e.user_url(MB, ""), None, Vec::new(), None)
        .await;
    assert_eq!((a.status, a.code()), (403, "Authorization_RequestDenied"));
    assert_eq!(e.graph.open_drafts(), 0);
}

#[tokio::test]
async fn response_delay_holds_the_slot() {
    let e = env_with(|o| o.response_delay = Duration::from_millis(1000)).await;
    let mime = message(0);
    let (a, b) = tokio::join!(e.send_mail(&mime), e.send_mail(&mime));
    assert_eq!((a.status, b.status), (202, 202));
    assert_eq!(
        e.graph.peak_concurrency(MB),
        2,
        "both were in flight at once"
    );
}

#[tokio::test]
async fn drafts_kept_are_bounded() {
    let e = env().await;
    let mime = b"From: app@contoso.com\r\nTo: a@x.test\r\nSubject: n\r\n\r\nb\r\n";
    let mut last = String::new();
    for _ in 0..MAX_DRAFTS {
        let a = e.post_mime(MB, "/messages", mime).await;
        assert_eq!(a.status, 201);
        last = a.json["id"].as_str().expect("id").to_string();
    }
    let a = e.post_mime(MB, "/messages", mime).await;
    assert_eq!((a.status, a.code()), (507, "ErrorQuotaExceeded"));
    assert_eq!(e.graph.open_drafts(), MAX_DRAFTS);
    let url = e.user_url(MB, &format!("/messages/{last}"));
    assert_eq!(
        e.call(Method::DELETE, &url, None, Vec::new(), None)
            .await
            .status,
        204
    );
    assert_eq!(e.post_mime(MB, "/messages", mime).await.status, 201);
}
