//! What each Graph operation of the fake does, once `http.rs` let the request through:
//! `sendMail`, drafts (create, read, PATCH recipients, delete, send), attachments (`POST
//! .../attachments`, upload sessions and their ranged PUTs), the user object and its
//! mailbox settings. Permissions, Graph's error codes, and the bounds on what is kept
//! (drafts, upload sessions) are decided here; MIME work is `mime.rs`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::header;
use base64::Engine as _;
use serde_json::{json, Value};

use super::http::{invalid_user, iso8601, Call, Reply, Target};
use super::mime::{self, Part, Recipient};
use super::{
    GraphAttachment, GraphSendPath, GraphSent, Inner, State, MAX_DRAFTS, MAX_UPLOAD_SESSIONS,
    UPLOAD_SESSION_MAX_BYTES, UPLOAD_SESSION_MIN_BYTES,
};

/// How long an upload session's URL is said to stay valid (`expirationDateTime`; not
/// enforced: tests do not wait that long).
const UPLOAD_SESSION_LIFETIME: Duration = Duration::from_secs(15 * 60);

const MAIL_SEND: &[&str] = &["Mail.Send"];
const MAIL_READ_WRITE: &[&str] = &["Mail.ReadWrite"];
const MAIL_READ: &[&str] = &["Mail.Read", "Mail.ReadBasic", "Mail.ReadWrite"];
const SETTINGS_READ: &[&str] = &["MailboxSettings.Read", "MailboxSettings.ReadWrite"];
const USER_READ: &[&str] = &[
    "User.Read.All",
    "User.ReadBasic.All",
    "User.ReadWrite.All",
    "Directory.Read.All",
];

/// A draft message: created, not yet sent or deleted.
pub(super) struct Draft {
    /// Its mailbox, lowercased (drafts are only found through the mailbox that made them).
    key: String,
    /// Its mailbox as [`GraphSent::mailbox`] names it.
    mailbox: String,
    /// The MIME as submitted (or rendered from JSON).
    mime: Vec<u8>,
    subject: String,
    to: Vec<Recipient>,
    cc: Vec<Recipient>,
    bcc: Vec<Recipient>,
    mime_has_attachments: bool,
    attachments: Vec<Added>,
}

/// An attachment added through the API.
pub(super) struct Added {
    id: String,
    att: GraphAttachment,
    is_inline: bool,
    content_id: Option<String>,
}

/// An upload session: where its bytes go and what arrived so far.
pub(super) struct Upload {
    key: String,
    draft_id: String,
    name: String,
    content_type: String,
    size: usize,
    is_inline: bool,
    content_id: Option<String>,
    data: Vec<u8>,
}

impl Upload {
    /// The mailbox (lowercased) its PUTs count against.
    pub(super) fn mailbox_key(&self) -> String {
        self.key.clone()
    }

    pub(super) fn bytes(&self) -> usize {
        self.data.len()
    }
}

impl Draft {
    pub(super) fn bytes(&self) -> usize {
        self.mime.len()
            + self
                .attachments
                .iter()
                .map(|a| a.att.bytes.len())
                .sum::<usize>()
    }
}

/// A message as submitted to `sendMail` or draft creation.
struct Submitted {
    mime: Vec<u8>,
    subject: String,
    to: Vec<Recipient>,
    cc: Vec<Recipient>,
    bcc: Vec<Recipient>,
    mime_has_attachments: bool,
    attachments: Vec<Added>,
    save_to_sent_items: bool,
}

pub(super) fn handle(inner: &Arc<Inner>, call: Call) -> Reply {
    match &call.target {
        Target::Upload(id) => upload(inner, &call, id),
        Target::Unknown(path) => {
            let segment = path
                .split('/')
                .find(|s| !s.is_empty() && *s != "v1.0")
                .unwrap_or_default();
            Reply::error(
                400,
                "BadRequest",
                &format!("Resource not found for the segment '{segment}'."),
            )
        }
        Target::User { mailbox, rest } => match inner.mailbox(mailbox) {
            None => invalid_user(mailbox),
            Some(mb) => user_operation(inner, &call, &mb, rest),
        },
    }
}

fn user_operation(inner: &Arc<Inner>, call: &Call, mb: &str, rest: &[String]) -> Reply {
    // Segment names are case-insensitive in Graph; ids (the second segment) are not.
    let lower: Vec<String> = rest
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if i == 1 {
                s.clone()
            } else {
                s.to_ascii_lowercase()
            }
        })
        .collect();
    let segs: Vec<&str> = lower.iter().map(String::as_str).collect();
    let m = call.method.as_str();
    let denied = |any_of: &[&str]| (!inner.has_permission(any_of)).then(access_denied);
    match (m, segs.as_slice()) {
        ("GET", []) => {
            if inner.has_permission(USER_READ) {
                user_json(mb)
            } else {
                Reply::error(
                    403,
                    "Authorization_RequestDenied",
                    "Insufficient privileges to complete the operation.",
                )
            }
        }
        ("GET", ["mailboxsettings"]) => {
            denied(SETTINGS_READ).unwrap_or_else(|| mailbox_settings_json(inner, mb))
        }
        ("POST", ["sendmail"]) => denied(MAIL_SEND).unwrap_or_else(|| send_mail(inner, call, mb)),
        ("POST", ["messages"]) => {
            denied(MAIL_READ_WRITE).unwrap_or_else(|| create_draft(inner, call, mb))
        }
        ("GET", ["messages", id]) => denied(MAIL_READ).unwrap_or_else(|| {
            let st = inner.state();
            match draft(&st, mb, id) {
                Ok(d) => Reply::json(200, message_json(inner, id, d)),
                Err(r) => r,
            }
        }),
        ("PATCH", ["messages", id]) => {
            denied(MAIL_READ_WRITE).unwrap_or_else(|| patch_draft(inner, call, mb, id))
        }
        ("DELETE", ["messages", id]) => denied(MAIL_READ_WRITE).unwrap_or_else(|| {
            let mut st = inner.state();
            if let Err(r) = draft(&st, mb, id) {
                return r;
            }
            st.drafts.remove(*id);
            st.uploads.retain(|_, u| u.draft_id != *id);
            Reply::empty(204)
        }),
        ("POST", ["messages", id, "send"]) => {
            denied(MAIL_SEND).unwrap_or_else(|| send_draft(inner, mb, id))
        }
        ("POST", ["messages", id, "attachments"]) => {
            denied(MAIL_READ_WRITE).unwrap_or_else(|| add_attachment(inner, call, mb, id))
        }
        ("POST", ["messages", id, "attachments", "createuploadsession"]) => {
            denied(MAIL_READ_WRITE).unwrap_or_else(|| create_upload_session(inner, call, mb, id))
        }
        (_, shape) if known_shape(shape) => Reply::error(
            405,
            "ErrorInvalidRequest",
            &format!("The OData request is not supported ({m})."),
        ),
        (_, shape) => {
            let segment = shape.last().copied().unwrap_or_default();
            Reply::error(
                400,
                "BadRequest",
                &format!("Resource not found for the segment '{segment}'."),
            )
        }
    }
}

fn known_shape(segs: &[&str]) -> bool {
    matches!(
        segs,
        [] | ["mailboxsettings"]
            | ["sendmail"]
            | ["messages"]
            | ["messages", _]
            | ["messages", _, "send"]
            | ["messages", _, "attachments"]
            | ["messages", _, "attachments", "createuploadsession"]
    )
}

fn access_denied() -> Reply {
    Reply::error(
        403,
        "ErrorAccessDenied",
        "Access is denied. Check credentials and try again.",
    )
}

fn item_not_found() -> Reply {
    Reply::error(
        404,
        "ErrorItemNotFound",
        "The specified object was not found in the store.",
    )
}

fn no_recipients() -> Reply {
    Reply::error(
        400,
        "ErrorInvalidRecipients",
        "At least one recipient isn't valid., A message can't be sent because it contains no recipients.",
    )
}

fn invalid_recipient() -> Reply {
    Reply::error(
        400,
        "ErrorInvalidRecipients",
        "At least one recipient isn't valid.",
    )
}

fn quota_exceeded() -> Reply {
    Reply::error(
        507,
        "ErrorQuotaExceeded",
        "The fake Graph endpoint keeps no more drafts or upload sessions.",
    )
}

fn bad_json() -> Reply {
    Reply::error(
        400,
        "RequestBodyRead",
        "The request body is not valid JSON.",
    )
}

fn json_only() -> Reply {
    Reply::error(
        415,
        "UnsupportedMediaType",
        "This operation takes Content-Type: application/json.",
    )
}

fn draft<'a>(st: &'a State, mb: &str, id: &str) -> Result<&'a Draft, Reply> {
    st.drafts
        .get(id)
        .filter(|d| d.key.eq_ignore_ascii_case(mb))
        .ok_or_else(item_not_found)
}

fn draft_mut<'a>(st: &'a mut State, mb: &str, id: &str) -> Result<&'a mut Draft, Reply> {
    st.drafts
        .get_mut(id)
        .filter(|d| d.key.eq_ignore_ascii_case(mb))
        .ok_or_else(item_not_found)
}

fn json_body(call: &Call) -> Result<Value, Reply> {
    if call.content_type != "application/json" {
        return Err(json_only());
    }
    serde_json::from_slice(&call.body).map_err(|_| bad_json())
}

/// The message of a `sendMail` (`wrapped`: `{"message": .., "saveToSentItems": ..}`) or a
/// draft creation, MIME base64 (`text/plain`) or JSON.
fn submitted(call: &Call, wrapped: bool) -> Result<Submitted, Reply> {
    match call.content_type.as_str() {
        "text/plain" => {
            let Some(raw) = mime::decode_base64(&call.body) else {
                return Err(Reply::error(
                    400,
                    "ErrorMimeContentInvalidBase64String",
                    "Invalid base64 string for MIME content.",
                ));
            };
            let Some(h) = mime::read_headers(&raw) else {
                return Err(Reply::error(
                    400,
                    "ErrorMimeContentInvalid",
                    "Invalid MIME content.",
                ));
            };
            Ok(Submitted {
                mime: raw,
                subject: h.subject,
                to: h.to,
                cc: h.cc,
                bcc: h.bcc,
                mime_has_attachments: h.has_attachments,
                attachments: Vec::new(),
                save_to_sent_items: true,
            })
        }
        "application/json" => {
            let v: Value = serde_json::from_slice(&call.body).map_err(|_| bad_json())?;
            if !wrapped {
                return from_json(&v, true);
            }
            let Some(msg) = v.get("message").filter(|m| m.is_object()) else {
                return Err(Reply::error(
                    400,
                    "ErrorInvalidParameter",
                    "The value of the parameter 'Message' is empty.",
                ));
            };
            let save = match v.get("saveToSentItems") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => true,
                Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => false,
                Some(_) => {
                    return Err(Reply::error(
                        400,
                        "ErrorInvalidParameter",
                        "The value of the parameter 'SaveToSentItems' is invalid.",
                    ))
                }
            };
            from_json(msg, save)
        }
        _ => Err(Reply::error(
            415,
            "UnsupportedMediaType",
            "Send MIME as Content-Type: text/plain (base64) or JSON as application/json.",
        )),
    }
}

fn from_json(msg: &Value, save_to_sent_items: bool) -> Result<Submitted, Reply> {
    let subject = msg
        .get("subject")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let to = recipients(msg, "toRecipients")?.unwrap_or_default();
    let cc = recipients(msg, "ccRecipients")?.unwrap_or_default();
    let bcc = recipients(msg, "bccRecipients")?.unwrap_or_default();
    let body = msg.get("body");
    let html = body
        .and_then(|b| b.get("contentType"))
        .and_then(Value::as_str)
        .is_some_and(|t| t.eq_ignore_ascii_case("html"));
    let content = body
        .and_then(|b| b.get("content"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let attachments = match msg.get("attachments") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(file_attachment)
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(bad_json()),
    };
    Ok(Submitted {
        mime: mime::render(&subject, html, content, &to, &cc),
        subject,
        to,
        cc,
        bcc,
        mime_has_attachments: false,
        attachments,
        save_to_sent_items,
    })
}

/// A recipient list property (`[{"emailAddress":{"address","name"}}]`); `None` if absent.
fn recipients(v: &Value, field: &str) -> Result<Option<Vec<Recipient>>, Reply> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                let ea = item.get("emailAddress");
                let address = ea
                    .and_then(|e| e.get("address"))
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|a| valid_address(a))
                    .ok_or_else(invalid_recipient)?;
                let name = ea
                    .and_then(|e| e.get("name"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                Ok(Recipient {
                    address: address.to_string(),
                    name,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(bad_json()),
    }
}

fn valid_address(a: &str) -> bool {
    a.rsplit_once('@')
        .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
        && !a.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// A `#microsoft.graph.fileAttachment` from JSON.
fn file_attachment(item: &Value) -> Result<Added, Reply> {
    let kind = item
        .get("@odata.type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !kind.eq_ignore_ascii_case("#microsoft.graph.fileAttachment") {
        return Err(Reply::error(
            400,
            "ErrorInvalidParameter",
            "Only #microsoft.graph.fileAttachment is supported.",
        ));
    }
    let Some(name) = item.get("name").and_then(Value::as_str) else {
        return Err(Reply::error(
            400,
            "ErrorRequiredPropertyMissing",
            "Required property is missing: name.",
        ));
    };
    let bytes = item
        .get("contentBytes")
        .and_then(Value::as_str)
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
    let Some(bytes) = bytes else {
        return Err(Reply::error(
            400,
            "ErrorInvalidParameter",
            "The value of the property 'contentBytes' is not valid base64.",
        ));
    };
    Ok(Added {
        id: random_id("AAMkAGAtt", 24),
        att: GraphAttachment {
            name: name.to_string(),
            content_type: item
                .get("contentType")
                .and_then(Value::as_str)
                .unwrap_or("application/octet-stream")
                .to_string(),
            bytes,
            via_upload_session: false,
        },
        is_inline: item
            .get("isInline")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        content_id: item
            .get("contentId")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

fn addresses(list: &[Recipient]) -> Vec<String> {
    list.iter().map(|r| r.address.clone()).collect()
}

/// The MIME delivered: as submitted, or re-assembled with the attachments added by API.
fn delivered_mime(mime: &[u8], added: &[Added]) -> Vec<u8> {
    if added.is_empty() {
        return mime.to_vec();
    }
    let parts: Vec<Part<'_>> = added
        .iter()
        .map(|a| Part {
            attachment: &a.att,
            inline: a.is_inline,
            content_id: a.content_id.as_deref(),
        })
        .collect();
    mime::reassemble(mime, &parts)
}

fn deliver(inner: &Inner, sent: GraphSent) {
    inner.state().sent.push(sent);
    inner.sent_changed.notify_waiters();
}

fn send_mail(inner: &Inner, call: &Call, mb: &str) -> Reply {
    let s = match submitted(call, true) {
        Ok(s) => s,
        Err(r) => return r,
    };
    if s.to.is_empty() && s.cc.is_empty() && s.bcc.is_empty() {
        return no_recipients();
    }
    let sent = GraphSent {
        mailbox: mb.to_string(),
        mime: delivered_mime(&s.mime, &s.attachments),
        submitted_mime: s.mime,
        to: addresses(&s.to),
        cc: addresses(&s.cc),
        bcc: addresses(&s.bcc),
        attachments: s.attachments.into_iter().map(|a| a.att).collect(),
        via: GraphSendPath::SendMail,
        save_to_sent_items: s.save_to_sent_items,
    };
    deliver(inner, sent);
    Reply::empty(202)
}

fn create_draft(inner: &Inner, call: &Call, mb: &str) -> Reply {
    let s = match submitted(call, false) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut st = inner.state();
    let size = s.mime.len()
        + s.attachments
            .iter()
            .map(|a| a.att.bytes.len())
            .sum::<usize>();
    if st.drafts.len() >= MAX_DRAFTS || !st.has_room_for(size) {
        return quota_exceeded();
    }
    let id = random_id("AAMkAD", 33);
    let d = Draft {
        key: mb.to_ascii_lowercase(),
        mailbox: mb.to_string(),
        mime: s.mime,
        subject: s.subject,
        to: s.to,
        cc: s.cc,
        bcc: s.bcc,
        mime_has_attachments: s.mime_has_attachments,
        attachments: s.attachments,
    };
    let body = message_json(inner, &id, &d);
    st.drafts.insert(id, d);
    Reply::json(201, body)
}

fn patch_draft(inner: &Inner, call: &Call, mb: &str, id: &str) -> Reply {
    let v = match json_body(call) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let lists = (
        recipients(&v, "toRecipients"),
        recipients(&v, "ccRecipients"),
        recipients(&v, "bccRecipients"),
    );
    let (to, cc, bcc) = match lists {
        (Ok(to), Ok(cc), Ok(bcc)) => (to, cc, bcc),
        (Err(r), _, _) | (_, Err(r), _) | (_, _, Err(r)) => return r,
    };
    let mut st = inner.state();
    let d = match draft_mut(&mut st, mb, id) {
        Ok(d) => d,
        Err(r) => return r,
    };
    if let Some(to) = to {
        d.to = to;
    }
    if let Some(cc) = cc {
        d.cc = cc;
    }
    if let Some(bcc) = bcc {
        d.bcc = bcc;
    }
    if let Some(subject) = v.get("subject").and_then(Value::as_str) {
        d.subject = subject.to_string();
    }
    Reply::json(200, message_json(inner, id, d))
}

fn send_draft(inner: &Inner, mb: &str, id: &str) -> Reply {
    let mut st = inner.state();
    match draft(&st, mb, id) {
        Err(r) => return r,
        Ok(d) if d.to.is_empty() && d.cc.is_empty() && d.bcc.is_empty() => return no_recipients(),
        Ok(_) => {}
    }
    let Some(d) = st.drafts.remove(id) else {
        return item_not_found();
    };
    // Sessions still open for it can never complete now.
    st.uploads.retain(|_, u| u.draft_id != id);
    drop(st);
    let sent = GraphSent {
        mailbox: d.mailbox,
        mime: delivered_mime(&d.mime, &d.attachments),
        submitted_mime: d.mime,
        to: addresses(&d.to),
        cc: addresses(&d.cc),
        bcc: addresses(&d.bcc),
        attachments: d.attachments.into_iter().map(|a| a.att).collect(),
        via: GraphSendPath::Draft,
        save_to_sent_items: true,
    };
    deliver(inner, sent);
    Reply::empty(202)
}

fn add_attachment(inner: &Inner, call: &Call, mb: &str, id: &str) -> Reply {
    let added = match json_body(call).and_then(|v| file_attachment(&v)) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let mut st = inner.state();
    if !st.has_room_for(added.att.bytes.len()) {
        return quota_exceeded();
    }
    let d = match draft_mut(&mut st, mb, id) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let body = json!({
        "@odata.type": "#microsoft.graph.fileAttachment",
        "id": added.id,
        "name": added.att.name,
        "contentType": added.att.content_type,
        "size": added.att.bytes.len(),
        "isInline": added.is_inline,
        "contentId": added.content_id,
    });
    d.attachments.push(added);
    Reply::json(201, body)
}

fn create_upload_session(inner: &Inner, call: &Call, mb: &str, id: &str) -> Reply {
    let v = match json_body(call) {
        Ok(v) => v,
        Err(r) => return r,
    };
    // The parameter is documented as `AttachmentItem`; Graph matches names case-insensitively.
    let item = v.as_object().and_then(|o| {
        o.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("attachmentItem"))
            .map(|(_, v)| v)
    });
    let Some(item) = item.filter(|i| i.is_object()) else {
        return Reply::error(
            400,
            "ErrorInvalidParameter",
            "The value of the parameter 'AttachmentItem' is empty.",
        );
    };
    let kind = item.get("attachmentType").and_then(Value::as_str);
    if kind.is_some_and(|k| !k.eq_ignore_ascii_case("file")) {
        return Reply::error(
            400,
            "ErrorInvalidParameter",
            "Only attachmentType 'file' is supported.",
        );
    }
    let name = item.get("name").and_then(Value::as_str);
    let size = item
        .get("size")
        .and_then(Value::as_u64)
        .and_then(|s| usize::try_from(s).ok());
    let (Some(name), Some(size)) = (name, size) else {
        return Reply::error(
            400,
            "ErrorRequiredPropertyMissing",
            "Required properties are missing: name, size.",
        );
    };
    if size < UPLOAD_SESSION_MIN_BYTES {
        return Reply::error(
            400,
            "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
            "The attachment size is less than the minimum for an upload session (3 MB); \
             POST it to the attachments of the message instead.",
        );
    }
    if size > UPLOAD_SESSION_MAX_BYTES {
        return Reply::error(
            400,
            "ErrorAttachmentSizeShouldNotExceedMaximumSize",
            "The attachment size exceeds the maximum for an upload session (150 MB).",
        );
    }
    let mut st = inner.state();
    if let Err(r) = draft(&st, mb, id) {
        return r;
    }
    if st.uploads.len() >= MAX_UPLOAD_SESSIONS {
        return quota_exceeded();
    }
    let session = random_id("", 32);
    st.uploads.insert(
        session.clone(),
        Upload {
            key: mb.to_ascii_lowercase(),
            draft_id: id.to_string(),
            name: name.to_string(),
            content_type: item
                .get("contentType")
                .and_then(Value::as_str)
                .unwrap_or("application/octet-stream")
                .to_string(),
            size,
            is_inline: item
                .get("isInline")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            content_id: item
                .get("contentId")
                .and_then(Value::as_str)
                .map(str::to_string),
            data: Vec::new(),
        },
    );
    Reply::json(
        201,
        json!({
            "@odata.context": format!("{}/v1.0/$metadata#microsoft.graph.uploadSession", inner.base_url()),
            "uploadUrl": format!("{}/upload/{session}", inner.base_url()),
            "expirationDateTime": expiry(),
            "nextExpectedRanges": ["0-"],
        }),
    )
}

fn expiry() -> String {
    iso8601(SystemTime::now() + UPLOAD_SESSION_LIFETIME)
}

/// A ranged PUT (or DELETE, cancelling the session) on an upload URL.
fn upload(inner: &Inner, call: &Call, session: &str) -> Reply {
    let mut st = inner.state();
    let room = st.has_room_for(call.body.len());
    let Some(u) = st.uploads.get_mut(session) else {
        return item_not_found();
    };
    match call.method.as_str() {
        "PUT" => {}
        "DELETE" => {
            st.uploads.remove(session);
            return Reply::empty(204);
        }
        m => {
            return Reply::error(
                405,
                "ErrorInvalidRequest",
                &format!("The upload URL takes PUT or DELETE, not {m}."),
            )
        }
    }
    let received = u.data.len();
    let range = call
        .header(header::CONTENT_RANGE)
        .and_then(parse_content_range);
    let fits = |(first, last, total): (usize, usize, usize)| {
        total == u.size
            && first == received
            && last >= first
            && last < total
            && call.body.len() == last - first + 1
    };
    if !range.is_some_and(fits) {
        return Reply::error(
            400,
            "InvalidRange",
            &format!(
                "Expected Content-Range: bytes {received}-N/{} with exactly N-{received}+1 \
                 body bytes.",
                u.size
            ),
        );
    }
    if !room {
        return quota_exceeded();
    }
    u.data.extend_from_slice(&call.body);
    if u.data.len() < u.size {
        return Reply::json(
            200,
            json!({
                "expirationDateTime": expiry(),
                "nextExpectedRanges": [u.data.len().to_string()],
            }),
        );
    }
    let Some(u) = st.uploads.remove(session) else {
        return item_not_found();
    };
    let Some(d) = st.drafts.get_mut(&u.draft_id) else {
        return item_not_found();
    };
    let att_id = random_id("AAMkAGAtt", 24);
    let location = format!(
        "{}/v1.0/users/{}/messages/{}/attachments/{att_id}",
        inner.base_url(),
        encode_segment(&d.mailbox),
        encode_segment(&u.draft_id),
    );
    d.attachments.push(Added {
        id: att_id,
        att: GraphAttachment {
            name: u.name,
            content_type: u.content_type,
            bytes: u.data,
            via_upload_session: true,
        },
        is_inline: u.is_inline,
        content_id: u.content_id,
    });
    Reply::empty(201).location(location)
}

/// `bytes FIRST-LAST/TOTAL` -> (first, last, total).
fn parse_content_range(v: &str) -> Option<(usize, usize, usize)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    Some((
        first.trim().parse().ok()?,
        last.trim().parse().ok()?,
        total.trim().parse().ok()?,
    ))
}

fn recipients_json(list: &[Recipient]) -> Value {
    Value::Array(
        list.iter()
            .map(|r| {
                json!({"emailAddress": {
                    "name": r.name.clone().unwrap_or_else(|| r.address.clone()),
                    "address": r.address,
                }})
            })
            .collect(),
    )
}

fn message_json(inner: &Inner, id: &str, d: &Draft) -> Value {
    json!({
        "@odata.context": format!("{}/v1.0/$metadata#users('{}')/messages/$entity", inner.base_url(), d.mailbox),
        "id": id,
        "subject": d.subject,
        "isDraft": true,
        "hasAttachments": d.mime_has_attachments || !d.attachments.is_empty(),
        "toRecipients": recipients_json(&d.to),
        "ccRecipients": recipients_json(&d.cc),
        "bccRecipients": recipients_json(&d.bcc),
    })
}

fn user_json(mb: &str) -> Reply {
    let display = mb.split('@').next().unwrap_or(mb);
    Reply::json(
        200,
        json!({
            "id": format!("fake-{}", mb.to_ascii_lowercase()),
            "userPrincipalName": mb,
            "mail": mb,
            "displayName": display,
        }),
    )
}

fn mailbox_settings_json(inner: &Inner, mb: &str) -> Reply {
    Reply::json(
        200,
        json!({
            "@odata.context": format!("{}/v1.0/$metadata#users('{mb}')/mailboxSettings", inner.base_url()),
            "timeZone": "UTC",
            "language": {"locale": "en-US", "displayName": "English (United States)"},
            "dateFormat": "yyyy-MM-dd",
            "timeFormat": "HH:mm",
            "userPurpose": "user",
        }),
    )
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `@`.
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `prefix` + `n` random bytes, base64url (opaque ids and upload session secrets).
pub(super) fn random_id(prefix: &str, n: usize) -> String {
    let mut buf = vec![0u8; n];
    if getrandom::getrandom(&mut buf).is_err() {
        // No OS randomness: fall back to a counter (ids stay unique; test double only).
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let c = NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = c[i % c.len()];
        }
    }
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(
            parse_content_range("bytes 0-2097151/5242880"),
            Some((0, 2_097_151, 5_242_880))
        );
        assert_eq!(parse_content_range("bytes 5-4/9"), Some((5, 4, 9)));
        assert_eq!(parse_content_range("bytes */9"), None);
        assert_eq!(parse_content_range("0-1/2"), None);
    }

    #[test]
    fn addresses_and_ids() {
        assert!(valid_address("a@b"));
        assert!(!valid_address("a@"));
        assert!(!valid_address("ab"));
        assert!(!valid_address("a b@c"));
        assert_eq!(encode_segment("A+b@x/y"), "A%2Bb@x%2Fy");
        let id = random_id("AAMkAD", 33);
        assert!(id.starts_with("AAMkAD") && id.len() == 6 + 44, "{id}");
        assert_ne!(random_id("", 16), random_id("", 16));
    }
}
