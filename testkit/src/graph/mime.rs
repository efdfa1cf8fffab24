//! MIME for the fake Graph endpoint: the base64 body of a MIME request, the recipients and
//! subject Graph reads from the headers (with mail-parser), a MIME rendering of a JSON
//! message, and the re-assembly of a draft with the attachments added through the API
//! (`multipart/mixed`: the original body first, then each attachment in base64).
//! Pure functions of bytes; nothing here touches a socket.

use base64::Engine as _;
use mail_parser::{Address, MessageParser};

use super::GraphAttachment;

/// Base64 lines in re-assembled parts are this long (RFC 2045's limit is 76).
const BASE64_LINE: usize = 76;

/// A recipient as Graph keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Recipient {
    pub address: String,
    pub name: Option<String>,
}

/// What Graph reads out of submitted MIME.
#[derive(Debug, Default)]
pub(super) struct Headers {
    pub to: Vec<Recipient>,
    pub cc: Vec<Recipient>,
    pub bcc: Vec<Recipient>,
    pub subject: String,
    pub has_attachments: bool,
}

/// An attachment to add to a message in [`reassemble`].
pub(super) struct Part<'a> {
    pub attachment: &'a GraphAttachment,
    pub inline: bool,
    pub content_id: Option<&'a str>,
}

/// The MIME in a `text/plain` request body: base64 (line breaks allowed), padded.
pub(super) fn decode_base64(body: &[u8]) -> Option<Vec<u8>> {
    let compact: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !matches!(b, b'\r' | b'\n'))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .ok()
}

/// Recipients (To, Cc, Bcc), subject and whether there are attachments; `None` if the bytes
/// are not a message (no header at all).
pub(super) fn read_headers(mime: &[u8]) -> Option<Headers> {
    let msg = MessageParser::default().parse(mime)?;
    if msg.headers().is_empty() {
        return None;
    }
    Some(Headers {
        to: list(msg.to()),
        cc: list(msg.cc()),
        bcc: list(msg.bcc()),
        subject: msg.subject().unwrap_or_default().to_string(),
        has_attachments: msg.attachment_count() > 0,
    })
}

fn list(addr: Option<&Address<'_>>) -> Vec<Recipient> {
    addr.map(|a| {
        a.iter()
            .filter_map(|a| {
                let address = a.address()?.trim();
                (!address.is_empty()).then(|| Recipient {
                    address: address.to_string(),
                    name: a.name().map(str::to_string),
                })
            })
            .collect()
    })
    .unwrap_or_default()
}

/// A message built from Graph's JSON properties (no Bcc header, as Graph sends them).
pub(super) fn render(
    subject: &str,
    html: bool,
    content: &str,
    to: &[Recipient],
    cc: &[Recipient],
) -> Vec<u8> {
    let mut out = String::new();
    let join = |l: &[Recipient]| {
        l.iter()
            .map(|r| r.address.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !to.is_empty() {
        out.push_str(&format!("To: {}\r\n", join(to)));
    }
    if !cc.is_empty() {
        out.push_str(&format!("Cc: {}\r\n", join(cc)));
    }
    out.push_str(&format!("Subject: {}\r\n", encoded_word(subject)));
    out.push_str("MIME-Version: 1.0\r\n");
    let kind = if html { "html" } else { "plain" };
    out.push_str(&format!("Content-Type: text/{kind}; charset=utf-8\r\n"));
    out.push_str("Content-Transfer-Encoding: base64\r\n\r\n");
    out.push_str(&wrapped_base64(content.as_bytes()));
    out.into_bytes()
}

/// `mime` with `parts` added: its headers (less the MIME ones) over a new `multipart/mixed`
/// whose first part is the original body with its own Content-Type and
/// Content-Transfer-Encoding, then one base64 part per attachment.
pub(super) fn reassemble(mime: &[u8], parts: &[Part<'_>]) -> Vec<u8> {
    let (head, body) = split_head(mime);
    let mut top = Vec::new();
    let mut content = Vec::new();
    for field in fields(head) {
        let name = field
            .iter()
            .position(|&b| b == b':')
            .map(|i| {
                String::from_utf8_lossy(&field[..i])
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        match name.as_str() {
            "content-type" | "content-transfer-encoding" => content.extend_from_slice(&field),
            "mime-version" => {}
            _ => top.extend_from_slice(&field),
        }
    }
    if content.is_empty() {
        content.extend_from_slice(b"Content-Type: text/plain; charset=us-ascii\r\n");
    }
    let boundary = format!("=_fake_graph_{}", super::api::random_id("", 18));
    let mut out = top;
    out.extend_from_slice(b"MIME-Version: 1.0\r\n");
    out.extend_from_slice(
        format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n").as_bytes(),
    );
    out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
    out.extend_from_slice(&content);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    for p in parts {
        let a = p.attachment;
        let name = quoted(&a.name);
        out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
        out.extend_from_slice(
            format!(
                "Content-Type: {}; name={name}\r\n",
                header_safe(&a.content_type)
            )
            .as_bytes(),
        );
        let disposition = if p.inline { "inline" } else { "attachment" };
        out.extend_from_slice(
            format!("Content-Disposition: {disposition}; filename={name}\r\n").as_bytes(),
        );
        if let Some(cid) = p.content_id {
            out.extend_from_slice(format!("Content-ID: <{}>\r\n", header_safe(cid)).as_bytes());
        }
        out.extend_from_slice(b"Content-Transfer-Encoding: base64\r\n\r\n");
        out.extend_from_slice(wrapped_base64(&a.bytes).as_bytes());
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// (header block including its last line break, body) at the first empty line.
fn split_head(mime: &[u8]) -> (&[u8], &[u8]) {
    let mut i = 0;
    while i < mime.len() {
        let end = mime[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(mime.len(), |p| i + p + 1);
        let line = &mime[i..end];
        if line == b"\r\n" || line == b"\n" {
            return (&mime[..i], &mime[end..]);
        }
        i = end;
    }
    (mime, &[])
}

/// Header fields with their continuation lines, each ending in a line break.
fn fields(head: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for line in head.split_inclusive(|&b| b == b'\n') {
        let continuation = matches!(line.first(), Some(b' ' | b'\t'));
        let mut line = line.to_vec();
        if !line.ends_with(b"\n") {
            line.extend_from_slice(b"\r\n");
        }
        match out.last_mut() {
            Some(last) if continuation => last.extend_from_slice(&line),
            _ => out.push(line),
        }
    }
    out
}

fn wrapped_base64(bytes: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut out = String::with_capacity(b64.len() + b64.len() / BASE64_LINE * 2 + 2);
    for chunk in b64.as_bytes().chunks(BASE64_LINE) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push_str("\r\n");
    }
    out
}

/// A header value with control characters (CR, LF, ...) removed, so it stays one field.
fn header_safe(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

/// A quoted parameter value; non-ASCII as an RFC 2047 encoded word (what mail clients read).
fn quoted(s: &str) -> String {
    let s = header_safe(s);
    if s.is_ascii() {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        format!("\"{}\"", encoded_word(&s))
    }
}

fn encoded_word(s: &str) -> String {
    let s = header_safe(s);
    if s.is_ascii() {
        s
    } else {
        let b64 = base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
        format!("=?utf-8?B?{b64}?=")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MimeHeaders;

    const MSG: &[u8] = b"From: a@x\r\nTo: \"B\" <b@x>, c@x\r\nCc: d@x\r\nBcc: e@x\r\nSubject: hi\r\nMIME-Version: 1.0\r\nContent-Type: text/plain;\r\n charset=utf-8\r\n\r\nbody\r\n";

    #[test]
    fn reads_recipients() {
        let h = read_headers(MSG).expect("headers");
        let addrs = |l: &[Recipient]| l.iter().map(|r| r.address.clone()).collect::<Vec<_>>();
        assert_eq!(addrs(&h.to), ["b@x", "c@x"]);
        assert_eq!(h.to[0].name.as_deref(), Some("B"));
        assert_eq!(addrs(&h.cc), ["d@x"]);
        assert_eq!(addrs(&h.bcc), ["e@x"]);
        assert_eq!(h.subject, "hi");
        assert!(!h.has_attachments);
        assert!(read_headers(b"").is_none());
    }

    #[test]
    fn decodes_base64_with_line_breaks() {
        assert_eq!(
            decode_base64(b"aGVs\r\nbG8=").as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(decode_base64(b"aGVsbG8"), None, "unpadded");
        assert_eq!(decode_base64(b"a*b="), None);
    }

    #[test]
    fn reassembles_with_attachments() {
        let big = GraphAttachment {
            name: "r\u{e9}sum\u{e9} \"x\".bin".into(),
            content_type: "application/octet-stream\r\nX-Evil: 1".into(),
            bytes: (0..=255u8).cycle().take(10_000).collect(),
            via_upload_session: true,
        };
        let out = reassemble(
            MSG,
            &[Part {
                attachment: &big,
                inline: false,
                content_id: None,
            }],
        );
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("\nX-Evil"), "{text}");
        let msg = MessageParser::default().parse(&out).expect("parses");
        assert_eq!(msg.subject(), Some("hi"));
        assert_eq!(msg.body_text(0).as_deref(), Some("body\r\n"));
        assert_eq!(msg.attachment_count(), 1);
        let att = msg.attachment(0).expect("attachment");
        assert_eq!(att.contents(), &big.bytes[..]);
        assert_eq!(att.attachment_name(), Some("r\u{e9}sum\u{e9} \"x\".bin"));
        // Headers other than the MIME ones are kept, in order; Bcc included (Graph strips
        // it when delivering, the record keeps what was submitted).
        assert!(text.starts_with("From: a@x\r\nTo: \"B\" <b@x>, c@x\r\nCc: d@x\r\nBcc: e@x\r\nSubject: hi\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed;"), "{text}");
    }

    #[test]
    fn renders_json_messages() {
        let to = [Recipient {
            address: "b@x".into(),
            name: None,
        }];
        let out = render("Gr\u{fc}\u{df}e", true, "<p>hi</p>", &to, &[]);
        let msg = MessageParser::default().parse(&out).expect("parses");
        assert_eq!(msg.subject(), Some("Gr\u{fc}\u{df}e"));
        assert_eq!(msg.body_html(0).as_deref(), Some("<p>hi</p>"));
        assert_eq!(
            msg.to().and_then(|a| a.first()).and_then(|a| a.address()),
            Some("b@x")
        );
        assert!(msg.cc().is_none());
    }
}
