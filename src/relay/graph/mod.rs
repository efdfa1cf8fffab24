//! The Microsoft Graph transport: delivery for mailboxes whose tenant has SMTP AUTH turned
//! off (SPEC "Microsoft Graph transport").
//!
//! A [`GraphTransaction`] answers the envelope locally (Graph judges recipients as a whole,
//! so MAIL and RCPT are 250 and DATA 354 here), buffers the content (bounded by
//! `listen.max_message_bytes`) and delivers it in [`GraphTransaction::finish_content`]:
//! - small, and the header recipients (To/Cc/Bcc) are exactly the envelope: one
//!   `POST /users/{mailbox}/sendMail` with the MIME in base64;
//! - otherwise a draft from the MIME (`POST /users/{mailbox}/messages`; attachments too
//!   large for one request are cut out first and added back through upload sessions),
//!   its recipients set to exactly the envelope (envelope-only recipients as Bcc,
//!   header-only ones removed), then `POST .../send`. A draft whose sending fails is
//!   deleted (best effort).
//!
//! Graph allows 4 concurrent requests per mailbox: a transaction holds one of the mailbox's
//! [`GRAPH_CONCURRENCY_PER_MAILBOX`] permits from `begin` to its end (like the SMTP pool's
//! `max_sessions_per_mailbox`), which also bounds the buffered messages per mailbox.
//! HTTP and the failure mapping are `client.rs`'s; MIME handling is `mime.rs`'s.

mod client;
pub(crate) mod mime;
#[cfg(test)]
mod tests;

pub use client::GraphSetupError;
pub(crate) use client::{failure_reply, GraphClient, GraphError, FORBIDDEN_HINT};

use crate::config::{Config, TransportKind};
use crate::oauth::manager::{TokenError, TokenManager};
use crate::relay::envelope::{Address, MailParams, ReversePath};
use crate::relay::pool::BeginError;
use crate::relay::upstream::{UpReply, UpstreamError};
use base64::Engine;
use client::{json_field, Body};
use reqwest::Method;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Graph's limit of concurrent requests per mailbox (throttling beyond it).
pub const GRAPH_CONCURRENCY_PER_MAILBOX: usize = 4;
/// The most request body we send at once: Graph refuses requests over 4 MB; the rest is
/// margin for what a proxy may add.
pub(crate) const MAX_REQUEST_BODY: usize = 3_900_000;
/// Upload session pieces: a multiple of 320 KiB (Graph's rule), under [`MAX_REQUEST_BODY`].
pub(crate) const UPLOAD_CHUNK: usize = 10 * 320 * 1024;
/// Graph's own limit on a request body (4 MiB: the base64 of a 3 MB attachment, 4,000,000
/// bytes, must fit in one `POST .../attachments`, as Graph's documentation has it).
pub(crate) const GRAPH_REQUEST_LIMIT: usize = 4 * 1024 * 1024;
/// Graph takes attachments of 3 MB (decimal) and more through upload sessions only, and
/// smaller ones through `POST .../attachments` only: one threshold decides.
pub(crate) const UPLOAD_SESSION_MIN: usize = 3_000_000;
/// Room for the JSON around an attachment's base64 in `POST .../attachments` (the name, content
/// type and content id are capped by `mime.rs` at [`mime::MAX_NAME`] characters each).
const JSON_OVERHEAD: usize = 8192;
// base64(2,999,999 bytes) = 4,000,000; with the JSON around it 4,008,192 <= 4,194,304.
const _: () = assert!(
    (UPLOAD_SESSION_MIN - 1).div_ceil(3) * 4 + JSON_OVERHEAD <= GRAPH_REQUEST_LIMIT
        && 6 * mime::MAX_NAME * 3 + 512 <= JSON_OVERHEAD
);
/// The MIME a draft may be created from (its base64 fits one request).
const DRAFT_MIME_LIMIT: usize = MAX_REQUEST_BODY / 4 * 3;

/// One mailbox's share of Graph's concurrency.
#[derive(Debug)]
struct Mailbox {
    address: String,
    permits: Arc<Semaphore>,
}

/// The Graph transport of the accounts configured with `transport = "graph"`.
#[derive(Debug, Clone)]
pub struct GraphTransport {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: GraphClient,
    /// How long `begin` waits for a free permit of the mailbox.
    wait: Duration,
    state: Mutex<State>,
}

/// What a reload replaces.
#[derive(Debug, Default)]
struct State {
    /// Graph accounts -> their mailbox entry (shared by accounts of the same mailbox).
    accounts: HashMap<String, Arc<Mailbox>>,
    save_to_sent_items: bool,
    max_message_bytes: usize,
}

impl State {
    fn of(config: &Config, old: Option<&State>) -> State {
        let mut by_mailbox: HashMap<String, Arc<Mailbox>> = HashMap::new();
        if let Some(old) = old {
            for m in old.accounts.values() {
                by_mailbox.insert(m.address.clone(), m.clone());
            }
        }
        let accounts = config
            .accounts
            .iter()
            .filter(|a| a.transport == TransportKind::Graph)
            .map(|a| {
                let key = a.mailbox.to_lowercase();
                let mb = by_mailbox
                    .entry(key.clone())
                    .or_insert_with(|| {
                        Arc::new(Mailbox {
                            address: key,
                            permits: Arc::new(Semaphore::new(GRAPH_CONCURRENCY_PER_MAILBOX)),
                        })
                    })
                    .clone();
                (a.username.clone(), mb)
            })
            .collect();
        State {
            accounts,
            save_to_sent_items: config.upstream.save_to_sent_items,
            max_message_bytes: config.listen.max_message_bytes,
        }
    }
}

impl GraphTransport {
    pub fn new(config: &Config, tokens: TokenManager) -> Result<GraphTransport, GraphSetupError> {
        let client = GraphClient::new(
            &config.upstream.graph_url,
            config.upstream.timeout,
            config.upstream.ca_file.as_deref(),
            tokens,
        )?;
        Ok(GraphTransport {
            inner: Arc::new(Inner {
                client,
                wait: config.upstream.timeout,
                state: Mutex::new(State::of(config, None)),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.inner.state)
    }

    /// Whether `account` delivers through Graph.
    pub(crate) fn serves(&self, account: &str) -> bool {
        self.state().accounts.contains_key(account)
    }

    /// Follows a reloaded configuration (accounts, their mailboxes, save_to_sent_items,
    /// max_message_bytes); a mailbox kept keeps its permits, so transactions in flight
    /// still count. `graph_url` and the timeout need a restart.
    pub(crate) fn reconfigure(&self, config: &Config) {
        let mut st = self.state();
        let next = State::of(config, Some(&st));
        *st = next;
    }

    /// The client (`check` uses it).
    pub(crate) fn client(&self) -> &GraphClient {
        &self.inner.client
    }

    /// Opens a transaction for `account`: a permit of its mailbox (waiting up to the
    /// upstream timeout), and a token (so a login problem shows at MAIL, as with SMTP).
    pub(crate) async fn begin(
        &self,
        account: &str,
        _from: &ReversePath,
        _params: &MailParams,
        _size: Option<usize>,
    ) -> Result<(GraphTransaction, UpReply), BeginError> {
        let (mailbox, save, max) = {
            let st = self.state();
            let mb = st
                .accounts
                .get(account)
                .cloned()
                .ok_or_else(|| BeginError::Token(TokenError::UnknownAccount(account.into())))?;
            (mb, st.save_to_sent_items, st.max_message_bytes)
        };
        let permit = tokio::time::timeout(self.inner.wait, mailbox.permits.clone().acquire_owned())
            .await
            .map_err(|_| BeginError::Busy)?
            .map_err(|_| BeginError::Busy)?;
        self.inner
            .client
            .tokens()
            .token(account)
            .await
            .map_err(BeginError::Token)?;
        Ok((
            GraphTransaction {
                inner: self.inner.clone(),
                account: account.to_string(),
                mailbox: mailbox.address.clone(),
                save_to_sent_items: save,
                max_message_bytes: max,
                rcpts: Vec::new(),
                content: Vec::new(),
                broken: false,
                retry_after: None,
                http_status: None,
                _permit: permit,
            },
            UpReply {
                code: 250,
                text: "2.1.0 Sender OK (Microsoft Graph)".into(),
            },
        ))
    }
}

/// One message on its way through Graph.
pub(crate) struct GraphTransaction {
    inner: Arc<Inner>,
    account: String,
    mailbox: String,
    save_to_sent_items: bool,
    max_message_bytes: usize,
    rcpts: Vec<String>,
    content: Vec<u8>,
    broken: bool,
    retry_after: Option<Duration>,
    /// The HTTP status of the request that decided the outcome.
    http_status: Option<u16>,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for GraphTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphTransaction")
            .field("account", &self.account)
            .field("rcpts", &self.rcpts.len())
            .field("bytes", &self.content.len())
            .finish_non_exhaustive()
    }
}

impl GraphTransaction {
    /// Recipients are collected; Graph judges them with the message.
    pub(crate) async fn rcpt(&mut self, to: &Address) -> Result<UpReply, UpstreamError> {
        self.rcpts.push(to.to_string());
        Ok(UpReply {
            code: 250,
            text: "2.1.5 Recipient OK".into(),
        })
    }

    pub(crate) fn is_broken(&mut self) -> bool {
        self.broken
    }

    pub(crate) async fn start_data(&mut self) -> Result<UpReply, UpstreamError> {
        Ok(UpReply {
            code: 354,
            text: "Start mail input".into(),
        })
    }

    /// Buffers a piece of content; more than `max_message_bytes` loses the transaction.
    pub(crate) async fn send_chunk(&mut self, chunk: &[u8]) -> Result<(), UpstreamError> {
        if self.broken {
            return Err(UpstreamError::Lost("transaction given up".into()));
        }
        if self.content.len() + chunk.len() > self.max_message_bytes {
            self.break_off();
            return Err(UpstreamError::Lost(format!(
                "message exceeds listen.max_message_bytes ({})",
                self.max_message_bytes
            )));
        }
        self.content.extend_from_slice(chunk);
        Ok(())
    }

    /// Delivers the buffered message; Graph's verdict as an upstream reply (202 -> Ok).
    pub(crate) async fn finish_content(&mut self) -> Result<UpReply, UpstreamError> {
        if self.broken {
            return Err(UpstreamError::Lost("transaction given up".into()));
        }
        let mime = std::mem::take(&mut self.content);
        let sender = Sender {
            client: &self.inner.client,
            account: &self.account,
            mailbox: &self.mailbox,
            save_to_sent_items: self.save_to_sent_items,
        };
        match sender.deliver(mime, &self.rcpts).await {
            Ok((how, status)) => {
                self.http_status = Some(status);
                Ok(UpReply {
                    code: 202,
                    text: format!("2.0.0 Accepted by Microsoft Graph ({how})"),
                })
            }
            Err(e) => {
                self.retry_after = e.retry_after();
                self.http_status = e.status();
                let reply = failure_reply(&e, &self.mailbox);
                tracing::debug!(account = %self.account, status = ?e.status(), reply = %reply, "Graph delivery failed");
                Err(UpstreamError::Reply(reply))
            }
        }
    }

    /// The HTTP status of the Graph request that decided the outcome (the relay log's
    /// `upstream_code`): 202 when sent, Graph's error status (429, 403...) when refused,
    /// `None` before delivery and for failures without an answer (network, token).
    // Wired into the relay log by session.rs/deliver.rs (another branch).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn http_status(&self) -> Option<u16> {
        self.http_status
    }

    /// How long Graph asked to wait before the next attempt (429/503 Retry-After).
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    pub(crate) fn break_off(&mut self) {
        self.broken = true;
        self.content = Vec::new();
    }

    /// Nothing was sent to Graph before the end of the content: dropping is enough.
    pub(crate) fn abandon(self) {}

    pub(crate) async fn finish(self) {}

    pub(crate) async fn abort(self) {}
}

/// The delivery of one message.
struct Sender<'a> {
    client: &'a GraphClient,
    account: &'a str,
    mailbox: &'a str,
    save_to_sent_items: bool,
}

impl Sender<'_> {
    async fn deliver(
        &self,
        mime: Vec<u8>,
        envelope: &[String],
    ) -> Result<(&'static str, u16), GraphError> {
        let headers = mime::header_recipients(&mime);
        let wanted: std::collections::BTreeSet<String> =
            envelope.iter().map(|e| e.to_lowercase()).collect();
        let b64 = base64::engine::general_purpose::STANDARD;
        if mime::base64_len(mime.len()) <= MAX_REQUEST_BODY && headers.set() == wanted {
            let url = self.client.user_url(self.mailbox, &["sendMail"]);
            let body = Body::Mime(b64.encode(&mime));
            drop(mime);
            let a = self
                .client
                .call(self.account, Method::POST, &url, &body)
                .await?;
            return Ok(("sendMail", a.status));
        }
        // The original stays: each cut attachment is decoded from it just before its upload.
        let split = mime::split(&mime, DRAFT_MIME_LIMIT)?;
        let url = self.client.user_url(self.mailbox, &["messages"]);
        let created = self
            .client
            .call(
                self.account,
                Method::POST,
                &url,
                &Body::Mime(b64.encode(&split.mime)),
            )
            .await?;
        let id = json_field(&created.body, "id")?;
        match self
            .complete_draft(&id, &headers, envelope, &mime, split.attachments)
            .await
        {
            Ok(status) => Ok(("draft", status)),
            Err(e) => {
                let url = self.client.user_url(self.mailbox, &["messages", &id]);
                if let Err(d) = self
                    .client
                    .call(self.account, Method::DELETE, &url, &Body::None)
                    .await
                {
                    tracing::warn!(account = %self.account, error = %d, "cannot delete the draft of a failed Graph delivery; it stays in the mailbox's Drafts");
                }
                Err(e)
            }
        }
    }

    /// Recipients, attachments, send.
    async fn complete_draft(
        &self,
        id: &str,
        headers: &mime::HeaderRecipients,
        envelope: &[String],
        original: &[u8],
        attachments: Vec<mime::Attachment>,
    ) -> Result<u16, GraphError> {
        let f = mime::final_recipients(headers, envelope);
        let list = |l: &[mime::HeaderAddr]| -> Vec<serde_json::Value> {
            l.iter()
                .map(|a| match &a.name {
                    Some(n) => json!({"emailAddress": {"address": a.address, "name": n}}),
                    None => json!({"emailAddress": {"address": a.address}}),
                })
                .collect()
        };
        let mut patch = json!({
            "toRecipients": list(&f.to),
            "ccRecipients": list(&f.cc),
            "bccRecipients": list(&f.bcc),
        });
        if !self.save_to_sent_items {
            // PR_DELETE_AFTER_SUBMIT: what sendMail's saveToSentItems=false sets, which the
            // MIME form of sendMail cannot take.
            patch["singleValueExtendedProperties"] =
                json!([{"id": "Boolean 0x0E01", "value": "true"}]);
        }
        let url = self.client.user_url(self.mailbox, &["messages", id]);
        self.client
            .call(self.account, Method::PATCH, &url, &Body::Json(patch))
            .await?;
        for a in attachments {
            self.attach(id, &a, original).await?;
        }
        let url = self
            .client
            .user_url(self.mailbox, &["messages", id, "send"]);
        let a = self
            .client
            .call(self.account, Method::POST, &url, &Body::None)
            .await?;
        Ok(a.status)
    }

    /// One attachment: under [`UPLOAD_SESSION_MIN`] bytes inline JSON (`POST .../attachments`,
    /// at most about 4.0 MB of body), else an upload session (Graph: 3 MB to 150 MB).
    async fn attach(
        &self,
        id: &str,
        a: &mime::Attachment,
        original: &[u8],
    ) -> Result<(), GraphError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let bytes = a.decode(original)?;
        if bytes.len() < UPLOAD_SESSION_MIN {
            let mut v = json!({
                "@odata.type": "#microsoft.graph.fileAttachment",
                "name": a.name,
                "contentType": a.content_type,
                "isInline": a.inline,
                "contentBytes": b64.encode(&bytes),
            });
            if let Some(cid) = &a.content_id {
                v["contentId"] = json!(cid);
            }
            let url = self
                .client
                .user_url(self.mailbox, &["messages", id, "attachments"]);
            self.client
                .call(self.account, Method::POST, &url, &Body::Json(v))
                .await?;
            return Ok(());
        }
        let total = bytes.len();
        let mut item = json!({
            "attachmentType": "file",
            "name": a.name,
            "size": total,
            "contentType": a.content_type,
            "isInline": a.inline,
        });
        if let Some(cid) = &a.content_id {
            item["contentId"] = json!(cid);
        }
        let url = self.client.user_url(
            self.mailbox,
            &["messages", id, "attachments", "createUploadSession"],
        );
        let session = self
            .client
            .call(
                self.account,
                Method::POST,
                &url,
                &Body::Json(json!({"AttachmentItem": item})),
            )
            .await?;
        let upload = json_field(&session.body, "uploadUrl")?;
        let upload = url::Url::parse(&upload)
            .map_err(|_| GraphError::Protocol("the upload URL is not a URL".into()))?;
        let mut start = 0;
        while start < total {
            let end = (start + UPLOAD_CHUNK).min(total);
            self.client
                .put_range(&upload, bytes[start..end].to_vec(), start, total)
                .await?;
            start = end;
        }
        Ok(())
    }
}

/// What `check` learned about a Graph account whose mailbox and Mail.Send are fine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Mail.ReadWrite (drafts) is granted too: large messages and messages whose header
    /// recipients differ from the envelope can be sent. `Err`: why not.
    pub drafts: Result<(), String>,
}

/// Why `check` failed for a Graph account: what happened and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}")]
pub struct ProbeFailure {
    pub what: String,
    pub hint: String,
}

/// The hint for a Graph status in `check`.
fn probe_hint(status: Option<u16>, graph_url: &str) -> String {
    match status {
        Some(401) => "Graph refused the access token: the token must be issued for Microsoft Graph (scopes https://graph.microsoft.com/.default for client_credentials, https://graph.microsoft.com/Mail.Send offline_access for a signed-in user); check scopes and tenant".into(),
        Some(403) => format!("{FORBIDDEN_HINT}: grant the Mail.Send application permission with admin consent, and if an application access policy (New-ApplicationAccessPolicy) or an RBAC for Applications assignment (New-ManagementRoleAssignment -App) limits the app, include this mailbox"),
        Some(404) => "the mailbox was not found: check mailbox (the user principal name or primary SMTP address of a mailbox in Exchange Online, in the app's tenant)".into(),
        Some(429) | Some(503) | Some(504) => "Microsoft Graph is busy or throttling; try again later".into(),
        Some(_) => "see Graph's error above".into(),
        None => format!("check upstream.graph_url ({graph_url}), DNS, proxy and firewall"),
    }
}

/// `check` for a Graph account: proves the token, the mailbox and the Mail.Send permission
/// without sending anything. Graph has no dry run and an app with only Mail.Send may read
/// nothing, so the probe is a `sendMail` whose body is not base64 MIME: Graph checks the
/// mailbox (404) and the permission (403) before the content, and answers 400
/// (`ErrorMimeContentInvalidBase64String`) once both are fine; nothing can be sent from it.
/// The same probe on `POST /messages` tells whether Mail.ReadWrite (drafts) is granted.
pub async fn probe(
    graph: &GraphTransport,
    account: &str,
    mailbox: &str,
) -> Result<Probe, ProbeFailure> {
    let client = graph.client();
    let graph_url = client.base_url();
    // Never base64: a body Graph cannot take as a message.
    let body = Body::Mime("!check: not a message!".into());
    let attempt = |rest: &'static str| {
        let url = client.user_url(mailbox, &[rest]);
        let body = body.clone();
        async move { client.call(account, Method::POST, &url, &body).await }
    };
    match attempt("sendMail").await {
        Err(GraphError::Status { status: 400, .. }) => {}
        Err(GraphError::Token(e)) => {
            return Err(ProbeFailure {
                what: format!("token: {e}"),
                hint: "see the token error above".into(),
            })
        }
        Err(e) => {
            return Err(ProbeFailure {
                what: format!("Graph sendMail probe: {e}"),
                hint: probe_hint(e.status(), &graph_url),
            })
        }
        Ok(_) => {
            return Err(ProbeFailure {
                what: "Graph accepted a sendMail that is not a message".into(),
                hint: format!(
                    "upstream.graph_url ({graph_url}) does not behave like Microsoft Graph"
                ),
            })
        }
    }
    let drafts = match attempt("messages").await {
        Err(GraphError::Status { status: 400, .. }) => Ok(()),
        Err(GraphError::Status { status: 403, .. }) => Err("Mail.ReadWrite is not granted (or not for this mailbox): messages over about 2.9 MB, and messages whose To/Cc/Bcc differ from the envelope, will be refused with 550 5.7.1".into()),
        Err(e) => Err(format!("drafts could not be checked: {e}")),
        Ok(_) => Err("Graph created a draft from a body that is not a message".into()),
    };
    Ok(Probe { drafts })
}
