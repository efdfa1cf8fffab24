//! The Microsoft Graph transport: delivery for mailboxes whose tenant has SMTP AUTH turned
//! off (SPEC "Microsoft Graph transport").
//!
//! A [`GraphTransaction`] answers the envelope locally (Graph judges recipients as a whole,
//! so MAIL and RCPT are 250 and DATA 354 here), buffers the content (bounded by
//! `listen.max_message_bytes`) and delivers it in [`GraphTransaction::finish_content`]:
//! - small, and the header recipients (To/Cc/Bcc) are exactly the envelope: one
//!   `POST /users/{mailbox}/sendMail` with the MIME in base64;
//! - small, and the header recipients a subset of the envelope (no `Bcc:` of their own):
//!   the same `sendMail` with a `Bcc:` header for the other envelope recipients;
//! - otherwise (header-only recipients, or too big for one request) a draft from the MIME
//!   (`POST /users/{mailbox}/messages`, which needs Mail.ReadWrite; attachments too large
//!   for one request are cut out first and added back inline or through upload sessions),
//!   its recipients set to exactly the envelope (envelope-only recipients as Bcc,
//!   header-only ones removed), then `POST .../send`.
//!
//! A failed, abandoned or dropped delivery leaves no draft ([`DraftGuard`]); a `/send`
//! without a clear answer is settled by deleting the draft (gone: it was sent).
//!
//! Per mailbox: [`GRAPH_BUFFERED_PER_MAILBOX`] transactions buffer a message at once (a
//! permit from `begin` to the end, bounding memory), [`GRAPH_CONCURRENCY_PER_MAILBOX`]
//! HTTP requests are in flight at once (Graph's limit; a permit per request, so slow
//! clients do not hold Graph's slots), and a 429/503 Retry-After holds back every
//! transaction of the mailbox until it has passed.
//!
//! HTTP and the failure mapping are `client.rs`'s; MIME handling is `mime.rs`'s.

mod client;
pub(crate) mod mime;
#[cfg(test)]
mod tests;

pub use client::GraphSetupError;
use client::Step;
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

/// Messages buffered at once per mailbox (transactions from `begin` to their end): bounds
/// the memory Graph deliveries of one mailbox hold to this many `listen.max_message_bytes`.
pub const GRAPH_BUFFERED_PER_MAILBOX: usize = 8;
/// Attempts at deleting a draft whose delivery failed or was abandoned.
const DRAFT_DELETE_TRIES: u32 = 3;
/// The longest the deletion of one draft may take, waits for Retry-After included.
const DRAFT_DELETE_BUDGET: Duration = Duration::from_secs(30);
/// The wait between deletion attempts when Graph gives no Retry-After.
const DRAFT_DELETE_PAUSE: Duration = Duration::from_secs(1);

/// One mailbox's share of Graph: its buffered transactions, its requests in flight, and
/// how long Graph asked it to wait.
#[derive(Debug)]
struct Mailbox {
    address: String,
    /// [`GRAPH_BUFFERED_PER_MAILBOX`] permits, one per transaction from `begin` to its end.
    buffers: Arc<Semaphore>,
    /// [`GRAPH_CONCURRENCY_PER_MAILBOX`] permits, one per HTTP request in flight.
    requests: Arc<Semaphore>,
    /// No request for this mailbox before then (Graph's last 429/503 Retry-After).
    throttled_until: Mutex<Option<tokio::time::Instant>>,
}

impl Mailbox {
    fn new(address: String) -> Mailbox {
        Mailbox {
            address,
            buffers: Arc::new(Semaphore::new(GRAPH_BUFFERED_PER_MAILBOX)),
            requests: Arc::new(Semaphore::new(GRAPH_CONCURRENCY_PER_MAILBOX)),
            throttled_until: Mutex::new(None),
        }
    }
}

/// The Graph transport of the accounts configured with `transport = "graph"`.
#[derive(Debug, Clone)]
pub struct GraphTransport {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: GraphClient,
    /// How long `begin` waits for a buffer permit, a request for a request permit, and the
    /// most a request waits out a mailbox's Retry-After (`upstream.timeout`).
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
                    .or_insert_with(|| Arc::new(Mailbox::new(key)))
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
    /// max_message_bytes); a mailbox kept keeps its permits and throttling, so
    /// transactions in flight still count. `graph_url` and the timeout need a restart.
    pub(crate) fn reconfigure(&self, config: &Config) {
        let mut st = self.state();
        let next = State::of(config, Some(&st));
        *st = next;
    }

    /// The client (`check` uses it).
    pub(crate) fn client(&self) -> &GraphClient {
        &self.inner.client
    }

    /// Opens a transaction for `account`: a buffer permit of its mailbox (waiting up to the
    /// upstream timeout, else [`BeginError::Busy`]), and a token (so a login problem shows
    /// at MAIL, as with SMTP). `size` (SIZE= or the spool's size) sizes the buffer.
    pub(crate) async fn begin(
        &self,
        account: &str,
        _from: &ReversePath,
        _params: &MailParams,
        size: Option<usize>,
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
        let permit = tokio::time::timeout(self.inner.wait, mailbox.buffers.clone().acquire_owned())
            .await
            .map_err(|_| BeginError::Busy)?
            .map_err(|_| BeginError::Busy)?;
        self.inner
            .client
            .tokens()
            .token(account)
            .await
            .map_err(BeginError::Token)?;
        // What the client announced, never more than a message may be; the Vec grows past
        // it only if the client understated.
        let content = Vec::with_capacity(size.unwrap_or(0).min(max));
        Ok((
            GraphTransaction {
                sender: Sender {
                    client: self.inner.client.clone(),
                    account: account.to_string(),
                    mailbox,
                    save_to_sent_items: save,
                    wait: self.inner.wait,
                },
                max_message_bytes: max,
                rcpts: Vec::new(),
                content,
                broken: false,
                retry_after: None,
                http_status: None,
                _buffer: permit,
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
    sender: Sender,
    max_message_bytes: usize,
    rcpts: Vec<String>,
    content: Vec<u8>,
    broken: bool,
    retry_after: Option<Duration>,
    /// The HTTP status of the request that decided the outcome.
    http_status: Option<u16>,
    _buffer: OwnedSemaphorePermit,
}

impl std::fmt::Debug for GraphTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphTransaction")
            .field("account", &self.sender.account)
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
    /// Dropping this future part-way leaves no draft behind (see [`DraftGuard`]).
    pub(crate) async fn finish_content(&mut self) -> Result<UpReply, UpstreamError> {
        if self.broken {
            return Err(UpstreamError::Lost("transaction given up".into()));
        }
        let mime = std::mem::take(&mut self.content);
        match self.sender.deliver(mime, &self.rcpts).await {
            Ok(done) => {
                self.http_status = done.status;
                Ok(UpReply {
                    code: 202,
                    text: format!("2.0.0 Accepted by Microsoft Graph ({})", done.how),
                })
            }
            Err(e) => {
                self.retry_after = e.retry_after();
                self.http_status = e.status();
                let reply = failure_reply(&e, &self.sender.mailbox.address);
                tracing::debug!(account = %self.sender.account, status = ?e.status(), reply = %reply, "Graph delivery failed");
                Err(UpstreamError::Reply(reply))
            }
        }
    }

    /// The HTTP status of the Graph request that decided the outcome (the relay log's
    /// `upstream_code`): 202 when sent, Graph's error status (429, 403...) when refused,
    /// `None` before delivery, for failures without an answer (network, token, a wait for
    /// the mailbox's Retry-After), and for a send inferred from a draft gone after an
    /// ambiguous `/send`.
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

/// How a delivery succeeded.
struct Delivered {
    how: &'static str,
    /// The status of the request that sent it (`None`: inferred, see `http_status`).
    status: Option<u16>,
}

/// The delivery of messages for one account and mailbox; every Graph request goes through
/// [`Sender::call`] (the mailbox's request permits and Retry-After). Cheap to clone.
#[derive(Clone)]
struct Sender {
    client: GraphClient,
    account: String,
    mailbox: Arc<Mailbox>,
    save_to_sent_items: bool,
    wait: Duration,
}

/// A draft that is deleted unless it was sent: when the delivery fails, and when its future
/// is dropped part-way (shutdown, the client gone). The deletion runs in a spawned task
/// ([`Sender::delete_draft`]: retried, bounded), so neither a reply nor a drop waits for it.
struct DraftGuard {
    sender: Sender,
    id: String,
    armed: bool,
}

impl DraftGuard {
    /// Sent (or deleted here): nothing left to clean up.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for DraftGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (sender, id) = (self.sender.clone(), std::mem::take(&mut self.id));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { sender.delete_draft(&id).await });
            }
            Err(_) => {
                tracing::warn!(account = %self.sender.account, "no runtime to delete the draft of an abandoned Graph delivery; it stays in the mailbox's Drafts");
            }
        }
    }
}

/// The request that creates a draft, in a task of its own. The draft's id comes only with
/// the answer, so a delivery dropped while the request is under way (shutdown, the client
/// gone) cannot name the draft to delete: the task runs on, and the draft it made is
/// deleted ([`Sender::delete_draft`]). After the answer, [`DraftGuard`] takes over.
struct Creating {
    sender: Sender,
    task: Option<tokio::task::JoinHandle<Result<client::Answer, GraphError>>>,
}

impl Creating {
    fn start(sender: &Sender, body: Body) -> Creating {
        let (s, url) = (sender.clone(), sender.url(&["messages"]));
        Creating {
            sender: sender.clone(),
            task: Some(tokio::spawn(async move {
                s.call(Step::Draft, Method::POST, &url, &body).await
            })),
        }
    }

    /// The answer to the create request (taken over by the caller from here on).
    async fn answer(mut self) -> Result<client::Answer, GraphError> {
        let Some(task) = self.task.as_mut() else {
            return Err(GraphError::Protocol(
                "draft request already answered".into(),
            ));
        };
        let answer = task.await;
        self.task = None;
        answer.unwrap_or_else(|e| {
            Err(GraphError::Protocol(format!(
                "the draft request did not finish: {e}"
            )))
        })
    }
}

impl Drop for Creating {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        let sender = self.sender.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Ok(Ok(created)) = task.await {
                    if let Ok(id) = json_field(&created.body, "id") {
                        sender.delete_draft(&id).await;
                    }
                }
            });
        }
    }
}

impl Sender {
    /// Waits out the mailbox's Retry-After (when shorter than `upstream.timeout`, else
    /// [`GraphError::Throttled`] at once) and takes one of its request permits.
    async fn admit(&self) -> Result<OwnedSemaphorePermit, GraphError> {
        let until = *crate::sync::lock(&self.mailbox.throttled_until);
        if let Some(until) = until {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left >= self.wait {
                return Err(GraphError::Throttled { retry_after: left });
            }
            if !left.is_zero() {
                tokio::time::sleep(left).await;
            }
        }
        match tokio::time::timeout(self.wait, self.mailbox.requests.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(GraphError::Busy),
        }
    }

    /// Remembers a 429/503 Retry-After for every transaction of the mailbox.
    fn note<T>(&self, r: &Result<T, GraphError>) {
        if let Err(GraphError::Status {
            status: 429 | 503,
            retry_after: Some(d),
            ..
        }) = r
        {
            let until = tokio::time::Instant::now() + *d;
            let mut t = crate::sync::lock(&self.mailbox.throttled_until);
            if t.is_none_or(|old| old < until) {
                *t = Some(until);
            }
        }
    }

    /// One Graph request of `kind` for the mailbox.
    async fn call(
        &self,
        kind: Step,
        method: Method,
        url: &url::Url,
        body: &Body,
    ) -> Result<client::Answer, GraphError> {
        let _permit = self.admit().await?;
        let r = self
            .client
            .call(&self.account, method, url, body)
            .await
            .map_err(|e| e.in_step(kind));
        self.note(&r);
        r
    }

    fn url(&self, rest: &[&str]) -> url::Url {
        self.client.user_url(&self.mailbox.address, rest)
    }

    /// Deletes a draft: up to [`DRAFT_DELETE_TRIES`] attempts within
    /// [`DRAFT_DELETE_BUDGET`], waiting out Retry-After (a throttled mailbox is likely still
    /// throttled right after the failure that left the draft). Gone already (404) is done.
    async fn delete_draft(&self, id: &str) {
        let deadline = tokio::time::Instant::now() + DRAFT_DELETE_BUDGET;
        let url = self.url(&["messages", id]);
        for attempt in 1..=DRAFT_DELETE_TRIES {
            let e = match self
                .call(Step::Draft, Method::DELETE, &url, &Body::None)
                .await
            {
                Ok(_) | Err(GraphError::Status { status: 404, .. }) => return,
                Err(e) => e,
            };
            let pause = e.retry_after().unwrap_or(DRAFT_DELETE_PAUSE);
            let now = tokio::time::Instant::now();
            if attempt == DRAFT_DELETE_TRIES || now + pause > deadline {
                tracing::warn!(account = %self.account, error = %e, attempts = attempt, "cannot delete the draft of a failed Graph delivery; it stays in the mailbox's Drafts");
                return;
            }
            tokio::time::sleep(pause).await;
        }
    }

    async fn deliver(&self, mime: Vec<u8>, envelope: &[String]) -> Result<Delivered, GraphError> {
        let headers = mime::header_recipients(&mime);
        let wanted: std::collections::BTreeSet<String> =
            envelope.iter().map(|e| e.to_lowercase()).collect();
        let have = headers.set();
        let b64 = base64::engine::general_purpose::STANDARD;
        // Envelope recipients the headers do not name, when the headers name no one else
        // and have no Bcc: of their own (the usual "Bcc" case): sendMail takes them from a
        // `Bcc:` header. Graph's MIME sendMail delivers to the MIME's Bcc: recipients, and
        // Exchange removes the Bcc: header from what it sends on ([MS-OXCMAIL] 2.1.3.1.1.2:
        // "MIME writers MUST NOT copy Bcc recipients to the MIME Bcc header" for outbound
        // SMTP); SMTP2Graph relies on it (its maintainer: Bcc-only messages through MIME
        // sendMail are delivered, SMTP2Graph/SMTP2Graph#30). One request, Mail.Send only.
        let extra: Vec<&String> = if have.is_subset(&wanted) && headers.bcc.is_empty() {
            let mut seen = have.clone();
            envelope
                .iter()
                .filter(|e| seen.insert(e.to_lowercase()))
                .collect()
        } else {
            Vec::new()
        };
        if have == wanted || !extra.is_empty() {
            let bcc = bcc_header(&extra);
            if mime::base64_len(mime.len() + bcc.len()) <= MAX_REQUEST_BODY {
                let url = self.url(&["sendMail"]);
                let mut encoded = String::with_capacity(mime::base64_len(mime.len() + bcc.len()));
                if bcc.is_empty() {
                    b64.encode_string(&mime, &mut encoded);
                } else {
                    let mut with = Vec::with_capacity(bcc.len() + mime.len());
                    with.extend_from_slice(bcc.as_bytes());
                    with.extend_from_slice(&mime);
                    drop(mime);
                    b64.encode_string(&with, &mut encoded);
                }
                let a = self
                    .call(Step::Send, Method::POST, &url, &Body::Mime(encoded))
                    .await?;
                return Ok(Delivered {
                    how: "sendMail",
                    status: Some(a.status),
                });
            }
        }
        // The original stays: each cut attachment is decoded from it just before its upload.
        let split = mime::split(&mime, DRAFT_MIME_LIMIT)?;
        let created = Creating::start(self, Body::Mime(b64.encode(&split.mime)))
            .answer()
            .await?;
        let id = json_field(&created.body, "id")?;
        let mut guard = DraftGuard {
            sender: self.clone(),
            id: id.clone(),
            armed: true,
        };
        self.complete_draft(&mut guard, &headers, envelope, &mime, split.attachments)
            .await
    }

    /// Recipients, attachments, send. A failure leaves the draft to `guard`.
    async fn complete_draft(
        &self,
        guard: &mut DraftGuard,
        headers: &mime::HeaderRecipients,
        envelope: &[String],
        original: &[u8],
        attachments: Vec<mime::Attachment>,
    ) -> Result<Delivered, GraphError> {
        let id = guard.id.clone();
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
        let url = self.url(&["messages", &id]);
        self.call(Step::Draft, Method::PATCH, &url, &Body::Json(patch))
            .await?;
        for a in attachments {
            self.attach(&id, &a, original).await?;
        }
        let url = self.url(&["messages", &id, "send"]);
        match self.call(Step::Send, Method::POST, &url, &Body::None).await {
            Ok(a) => {
                guard.disarm();
                Ok(Delivered {
                    how: "draft",
                    status: Some(a.status),
                })
            }
            Err(e) if e.is_ambiguous() => {
                // Graph may have sent it although the answer was lost or a 5xx: a sent
                // draft is gone from Drafts, so the DELETE tells. 404: it was sent.
                let del = self.url(&["messages", &id]);
                match self
                    .call(Step::Draft, Method::DELETE, &del, &Body::None)
                    .await
                {
                    Err(GraphError::Status { status: 404, .. }) => {
                        guard.disarm();
                        tracing::info!(account = %self.account, error = %e, "Graph's /send failed ambiguously but the draft is gone: delivered (inferred)");
                        Ok(Delivered {
                            how: "draft; sent, inferred after an ambiguous /send",
                            status: None,
                        })
                    }
                    Ok(_) => {
                        guard.disarm();
                        Err(e)
                    }
                    // Unknown either way: the guard keeps trying to delete it; the client
                    // retries (at-least-once).
                    Err(_) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// One attachment: under [`UPLOAD_SESSION_MIN`] bytes inline JSON (`POST .../attachments`,
    /// at most about 4.0 MB of body), else an upload session (Graph: 3 MB to 150 MB). It is
    /// decoded from the original MIME here, so one decoded attachment exists at a time.
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
            drop(bytes);
            if let Some(cid) = &a.content_id {
                v["contentId"] = json!(cid);
            }
            let url = self.url(&["messages", id, "attachments"]);
            self.call(Step::Draft, Method::POST, &url, &Body::Json(v))
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
        let url = self.url(&["messages", id, "attachments", "createUploadSession"]);
        let session = self
            .call(
                Step::Draft,
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
            let _permit = self.admit().await?;
            let r = self
                .client
                .put_range(&upload, bytes[start..end].to_vec(), start, total)
                .await
                .map_err(|e| e.in_step(Step::Draft));
            self.note(&r);
            r?;
            start = end;
        }
        Ok(())
    }
}

/// A `Bcc:` header naming `extra` (folded, one address a line), or nothing.
fn bcc_header(extra: &[&String]) -> String {
    if extra.is_empty() {
        return String::new();
    }
    let list: Vec<String> = extra.iter().map(|a| format!("<{a}>")).collect();
    format!("Bcc: {}\r\n", list.join(",\r\n "))
}

/// What `check` learned about a Graph account whose mailbox and Mail.Send are fine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Mail.ReadWrite (drafts) is granted too: large messages and messages whose header
    /// recipients differ from the envelope can be sent. `Err`: why not.
    pub drafts: Result<(), String>,
    /// Set when Graph refused the probe for another reason than the missing recipients:
    /// the mailbox and permission were then not proven (what Graph said).
    pub inconclusive: Option<String>,
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

/// The probe's message: valid MIME, base64, with no recipient at all, so Graph can never
/// send it (`sendMail` answers 400 `ErrorInvalidRecipients`) and a draft made from it goes
/// nowhere.
fn probe_mime(mailbox: &str) -> String {
    let mime = format!("From: <{mailbox}>\r\nSubject: smtp-oauth-bridge check (no recipients: never sent)\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nThis message has no recipients and cannot be sent.\r\n");
    base64::engine::general_purpose::STANDARD.encode(mime)
}

/// `check` for a Graph account: proves the token, the mailbox and the Mail.Send permission
/// without sending anything. Graph has no dry run and an app with only Mail.Send may read
/// nothing, so the probe is a `sendMail` of a valid MIME message with no recipients: Graph
/// answers 404 for an unknown mailbox, 403 without the permission, and once both are fine
/// 400 `ErrorInvalidRecipients` (a message without recipients cannot be sent). Another 400
/// code means Graph objected to something else first: inconclusive, and said so. Drafts
/// (Mail.ReadWrite) are proven by creating a draft of the same message and deleting it.
pub async fn probe(
    graph: &GraphTransport,
    account: &str,
    mailbox: &str,
) -> Result<Probe, ProbeFailure> {
    let client = graph.client();
    let graph_url = client.base_url();
    let body = Body::Mime(probe_mime(mailbox));
    let inconclusive = match client
        .call(account, Method::POST, &client.user_url(mailbox, &["sendMail"]), &body)
        .await
    {
        Err(GraphError::Status { status: 400, code, .. })
            if code.eq_ignore_ascii_case("ErrorInvalidRecipients") =>
        {
            None
        }
        Err(GraphError::Status { status: 400, code, message, .. }) => Some(format!(
            "Graph answered the probe 400 {code} ({message}), not ErrorInvalidRecipients: the mailbox and Mail.Send are not proven"
        )),
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
                what: "Graph accepted a sendMail without recipients".into(),
                hint: format!(
                    "upstream.graph_url ({graph_url}) does not behave like Microsoft Graph"
                ),
            })
        }
    };
    let created = client
        .call(
            account,
            Method::POST,
            &client.user_url(mailbox, &["messages"]),
            &body,
        )
        .await;
    let drafts = match created {
        Ok(a) => match json_field(&a.body, "id") {
            Ok(id) => {
                let url = client.user_url(mailbox, &["messages", &id]);
                match client.call(account, Method::DELETE, &url, &Body::None).await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(format!("a probe draft was made but not deleted ({e}); delete the draft \"smtp-oauth-bridge check\" from the mailbox's Drafts")),
                }
            }
            Err(e) => Err(format!("drafts could not be checked: {e}")),
        },
        Err(GraphError::Status { status: 403, .. }) => Err("Mail.ReadWrite is not granted (or not for this mailbox): messages over about 2.9 MB, and messages whose To/Cc name recipients outside the envelope, will be refused with 550 5.7.1".into()),
        Err(e) => Err(format!("drafts could not be checked: {e}")),
    };
    Ok(Probe {
        drafts,
        inconclusive,
    })
}
