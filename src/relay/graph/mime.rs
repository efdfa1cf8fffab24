//! The message as Graph needs it, from its MIME bytes (pure: bytes in, values out): the
//! header recipients (To/Cc/Bcc) to compare with the envelope, the recipient lists that make
//! Graph deliver to exactly the envelope, and the split of a message too large for one
//! request into a smaller MIME (large attachments cut out) plus those attachments' raw bytes.
//!
//! Parsing is mail-parser's; the split cuts the attachment parts out of the original bytes by
//! mail-parser's part offsets, so everything that stays is byte for byte what the client sent
//! (re-serialising with a builder would re-encode headers and bodies). An attachment's bytes
//! are its body with the transfer encoding undone (base64, quoted-printable) and nothing else
//! (no charset conversion), so it arrives byte-identical. HTTP is `client.rs`'s business.

use mail_parser::decoders::base64::base64_decode;
use mail_parser::decoders::quoted_printable::quoted_printable_decode;
use mail_parser::{MessageParser, MimeHeaders};
use std::collections::BTreeSet;

/// One address of a To/Cc/Bcc header: as written, and its display name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeaderAddr {
    pub(crate) address: String,
    pub(crate) name: Option<String>,
}

/// The recipient headers of a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HeaderRecipients {
    pub(crate) to: Vec<HeaderAddr>,
    pub(crate) cc: Vec<HeaderAddr>,
    pub(crate) bcc: Vec<HeaderAddr>,
}

impl HeaderRecipients {
    /// Every header recipient, lowercased.
    pub(crate) fn set(&self) -> BTreeSet<String> {
        self.to
            .iter()
            .chain(&self.cc)
            .chain(&self.bcc)
            .map(|a| a.address.to_lowercase())
            .collect()
    }
}

/// The To/Cc/Bcc addresses of the message's top-level header (none if it does not parse).
pub(crate) fn header_recipients(mime: &[u8]) -> HeaderRecipients {
    let Some(msg) = MessageParser::default().parse_headers(mime) else {
        return HeaderRecipients::default();
    };
    fn list<'a, 'x: 'a>(it: impl Iterator<Item = &'a mail_parser::Address<'x>>) -> Vec<HeaderAddr> {
        it.flat_map(|a| a.iter())
            .filter_map(|a| {
                Some(HeaderAddr {
                    address: a.address()?.trim().to_string(),
                    name: a
                        .name()
                        .map(|n| n.trim().to_string())
                        .filter(|n| !n.is_empty()),
                })
            })
            .filter(|a| !a.address.is_empty())
            .collect()
    }
    HeaderRecipients {
        to: list(msg.all_to()),
        cc: list(msg.all_cc()),
        bcc: list(msg.all_bcc()),
    }
}

/// The draft's recipient lists that make Graph deliver to exactly `envelope`: header To/Cc
/// recipients that are in the envelope keep their place (and display name); envelope
/// recipients in neither go as Bcc; header recipients outside the envelope are dropped.
/// Compared case-insensitively; each address once.
pub(crate) fn final_recipients(
    headers: &HeaderRecipients,
    envelope: &[String],
) -> HeaderRecipients {
    let wanted: BTreeSet<String> = envelope.iter().map(|e| e.to_lowercase()).collect();
    let mut placed: BTreeSet<String> = BTreeSet::new();
    let mut keep = |list: &[HeaderAddr]| -> Vec<HeaderAddr> {
        list.iter()
            .filter(|a| {
                let l = a.address.to_lowercase();
                wanted.contains(&l) && placed.insert(l)
            })
            .cloned()
            .collect()
    };
    let to = keep(&headers.to);
    let cc = keep(&headers.cc);
    let bcc = envelope
        .iter()
        .filter(|e| placed.insert(e.to_lowercase()))
        .map(|e| HeaderAddr {
            address: e.clone(),
            name: None,
        })
        .collect();
    HeaderRecipients { to, cc, bcc }
}

/// Longest attachment name and content type kept (characters; longer ones are cut), so the
/// JSON around an attachment stays small.
pub(crate) const MAX_NAME: usize = 255;

/// `s` cut to [`MAX_NAME`] characters.
fn capped(s: String) -> String {
    match s.char_indices().nth(MAX_NAME) {
        Some((i, _)) => s[..i].to_string(),
        None => s,
    }
}

/// How an attachment's body is encoded in the MIME (its `Content-Transfer-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransferEncoding {
    Base64,
    QuotedPrintable,
    /// 7bit, 8bit, binary or none: the bytes as they are.
    Identity,
}

impl TransferEncoding {
    /// From the header as written (mail-parser's own `encoding` falls back to "none" when a
    /// body does not decode, which would deliver raw base64 as the attachment).
    fn of(header: Option<&str>) -> Option<TransferEncoding> {
        let Some(h) = header else {
            return Some(TransferEncoding::Identity);
        };
        match h.trim().to_ascii_lowercase().as_str() {
            "base64" => Some(TransferEncoding::Base64),
            "quoted-printable" => Some(TransferEncoding::QuotedPrintable),
            "7bit" | "8bit" | "binary" | "" => Some(TransferEncoding::Identity),
            _ => None,
        }
    }

    /// The decoded bytes, or `None` if the body is not valid in this encoding.
    fn decode(self, body: &[u8]) -> Option<Vec<u8>> {
        match self {
            TransferEncoding::Base64 => base64_decode(body),
            TransferEncoding::QuotedPrintable => quoted_printable_decode(body),
            TransferEncoding::Identity => Some(body.to_vec()),
        }
    }
}

/// An attachment cut out of the MIME, to be added to the draft separately. It holds where
/// its encoded body is in the original MIME, not the decoded bytes: each is decoded just
/// before its upload ([`Attachment::decode`]), so only one decoded copy exists at a time.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Attachment {
    pub(crate) name: String,
    pub(crate) content_type: String,
    /// `Content-ID` without angle brackets, for inline parts.
    pub(crate) content_id: Option<String>,
    pub(crate) inline: bool,
    /// The decoded size in bytes.
    pub(crate) size: usize,
    /// The encoded body in the original MIME.
    body: std::ops::Range<usize>,
    encoding: TransferEncoding,
}

impl Attachment {
    /// The content with the transfer encoding undone, from the original MIME given to
    /// [`split`].
    pub(crate) fn decode(&self, original: &[u8]) -> Result<Vec<u8>, SplitError> {
        original
            .get(self.body.clone())
            .and_then(|b| self.encoding.decode(b))
            .ok_or_else(|| SplitError::Undecodable(self.name.clone()))
    }
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("name", &self.name)
            .field("content_type", &self.content_type)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Why a message cannot be made to fit Graph's request limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SplitError {
    #[error("the message is not MIME that can be parsed")]
    Unparsable,
    #[error("the message is {bytes} bytes without the attachments that can be sent apart; Graph takes at most {limit} bytes of MIME in one request")]
    TooLarge { bytes: usize, limit: usize },
    #[error(
        "attachment part {0} cannot be decoded (invalid or unknown Content-Transfer-Encoding)"
    )]
    Undecodable(String),
    #[error("the message is signed or encrypted (multipart/signed, application/pkcs7-mime) and too large for one Graph request; cutting its attachments out would break the signature")]
    Signed,
    #[error("the MIME structure is inconsistent (part offsets out of range)")]
    Malformed,
}

/// The message as a smaller MIME plus the attachments cut out of it.
#[derive(Debug)]
pub(crate) struct Split {
    pub(crate) mime: Vec<u8>,
    pub(crate) attachments: Vec<Attachment>,
}

/// Whether a content type is a signature or encryption container.
fn is_secured(ct: &mail_parser::ContentType<'_>) -> bool {
    let (t, sub) = (
        ct.ctype().to_ascii_lowercase(),
        ct.subtype().unwrap_or_default().to_ascii_lowercase(),
    );
    (t == "multipart" && (sub == "signed" || sub == "encrypted"))
        || (t == "application" && (sub == "pkcs7-mime" || sub == "x-pkcs7-mime"))
}

/// Total length of sorted, possibly overlapping ranges.
fn union_len(ranges: &[(usize, usize)]) -> usize {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    let mut total = 0;
    let mut at = 0;
    for (s, e) in sorted {
        let s = s.max(at);
        if e > s {
            total += e - s;
            at = e;
        }
    }
    total
}

/// Cuts attachments (largest first) out of `mime` until what stays is at most `limit` bytes.
/// Never panics: every offset is checked, and an inconsistency is [`SplitError::Malformed`].
pub(crate) fn split(mime: &[u8], limit: usize) -> Result<Split, SplitError> {
    if mime.len() <= limit {
        return Ok(Split {
            mime: mime.to_vec(),
            attachments: Vec::new(),
        });
    }
    let msg = MessageParser::default()
        .parse(mime)
        .ok_or(SplitError::Unparsable)?;
    if msg
        .parts
        .iter()
        .any(|p| p.content_type().is_some_and(is_secured))
    {
        return Err(SplitError::Signed);
    }
    // Each part's parent multipart.
    let mut parent: Vec<Option<usize>> = vec![None; msg.parts.len()];
    for (pid, p) in msg.parts.iter().enumerate() {
        for &c in p.sub_parts().unwrap_or_default() {
            if let Some(slot) = parent.get_mut(c as usize) {
                *slot = Some(pid);
            }
        }
    }
    // Attachment parts of the top-level tree, by size, largest first.
    let mut candidates: Vec<usize> = msg
        .attachments
        .iter()
        .map(|&id| id as usize)
        .filter(|&id| id > 0)
        .filter(|&id| msg.parts.get(id).is_some_and(|p| !p.is_multipart()))
        .collect();
    candidates.sort_by_key(|&id| std::cmp::Reverse(msg.parts.get(id).map_or(0, |p| p.raw_len())));
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    let mut ids: Vec<usize> = Vec::new();
    let mut size = mime.len();
    for id in candidates {
        if size <= limit {
            break;
        }
        let Some(part) = msg.parts.get(id) else {
            continue;
        };
        let Some(body_start) = parent
            .get(id)
            .copied()
            .flatten()
            .and_then(|p| msg.parts.get(p))
            .map(|p| p.offset_body as usize)
        else {
            continue;
        };
        let Some(range) = cut_range(
            mime,
            body_start,
            part.offset_header as usize,
            part.offset_end as usize,
        ) else {
            continue;
        };
        cuts.push(range);
        ids.push(id);
        size = mime.len() - union_len(&cuts);
    }
    if size > limit {
        return Err(SplitError::TooLarge { bytes: size, limit });
    }
    let mut order: Vec<usize> = (0..cuts.len()).collect();
    order.sort_by_key(|&i| cuts[i]);
    let mut out = Vec::with_capacity(size);
    let mut at = 0;
    let mut attachments = Vec::with_capacity(cuts.len());
    for i in order {
        let (start, end) = cuts[i];
        let id = ids[i];
        // A cut that takes the CRLF after its part may meet the next one's CRLF before.
        let start = start.max(at);
        if end > start {
            out.extend_from_slice(mime.get(at..start).ok_or(SplitError::Malformed)?);
            at = end;
        }
        let part = msg.parts.get(id).ok_or(SplitError::Malformed)?;
        let name = part
            .attachment_name()
            .map(str::to_string)
            .unwrap_or_else(|| format!("attachment-{id}"));
        let body = part.offset_body as usize..part.offset_end as usize;
        let encoding = TransferEncoding::of(part.content_transfer_encoding())
            .ok_or_else(|| SplitError::Undecodable(name.clone()))?;
        if mime.get(body.clone()).is_none() {
            return Err(SplitError::Malformed);
        }
        let content_type = part
            .content_type()
            .map(|ct| match ct.subtype() {
                Some(sub) => format!("{}/{sub}", ct.ctype()),
                None => ct.ctype().to_string(),
            })
            .unwrap_or_else(|| "application/octet-stream".into());
        let inline = part.content_disposition().is_some_and(|d| d.is_inline());
        attachments.push(Attachment {
            name: capped(name),
            content_type: capped(content_type),
            content_id: part
                .content_id()
                .map(|c| capped(c.trim_matches(['<', '>', ' ']).to_string())),
            inline,
            size: 0,
            body,
            encoding,
        });
    }
    out.extend_from_slice(mime.get(at..).ok_or(SplitError::Malformed)?);
    // The parsed message holds every part decoded: gone before the attachments are decoded
    // (once here, one at a time, to know each decodes and its size; again at its upload).
    drop(msg);
    for a in &mut attachments {
        a.size = a.decode(mime)?.len();
    }
    // The attachments in message order (as a reader sees them).
    attachments.sort_by_key(|a| a.body.start);
    Ok(Split {
        mime: out,
        attachments,
    })
}

/// The bytes that hold the part at `header..end` with its delimiter line, so that what
/// stays is still a well-formed multipart. The CRLF before a delimiter belongs to it
/// (RFC 2046), so the cut is `CRLF--boundary CRLF headers body` up to the part's end, and
/// the CRLF before the next delimiter stays. The one exception is a first delimiter right
/// at the start of the multipart's body (`parent_body`, no preamble): the CRLF before it
/// ends the header block and must stay, so that cut runs from the delimiter line to the
/// start of the next delimiter line instead (taking the CRLF after the part).
fn cut_range(mime: &[u8], parent_body: usize, header: usize, end: usize) -> Option<(usize, usize)> {
    if header > end || end > mime.len() || header <= parent_body {
        return None;
    }
    // The delimiter line ends right before the part's headers.
    let before = mime.get(..header)?;
    let line_end = if before.ends_with(b"\r\n") {
        header - 2
    } else if before.ends_with(b"\n") {
        header - 1
    } else {
        return None;
    };
    let line_start = mime
        .get(..line_end)?
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    if line_start < parent_body || !mime.get(line_start..line_end)?.starts_with(b"--") {
        return None;
    }
    if line_start > parent_body {
        let prefix = mime.get(parent_body..line_start)?;
        let eol = if prefix.ends_with(b"\r\n") {
            2
        } else if prefix.ends_with(b"\n") {
            1
        } else {
            return None;
        };
        return Some((line_start - eol, end));
    }
    let tail = mime.get(end..)?;
    let skip = if tail.starts_with(b"\r\n") {
        2
    } else if tail.starts_with(b"\n") {
        1
    } else {
        0
    };
    Some((line_start, end + skip))
}

/// Base64 length of `n` bytes (what a MIME body becomes in a Graph request).
pub(crate) fn base64_len(n: usize) -> usize {
    n.div_ceil(3).saturating_mul(4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn b64_lines(data: &[u8]) -> String {
        let b = base64::engine::general_purpose::STANDARD.encode(data);
        b.as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    fn message(atts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut m = String::from("From: s@contoso.com\r\nTo: A <A@x.org>, b@x.org\r\nCc: c@x.org\r\nSubject: t\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"BB\"\r\n\r\n--BB\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\n");
        for (name, data) in atts {
            m.push_str(&format!("--BB\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n", b64_lines(data)));
        }
        m.push_str("--BB--\r\n");
        m.into_bytes()
    }

    #[test]
    fn header_recipients_and_the_envelope_fix_up() {
        let m = message(&[]);
        let h = header_recipients(&m);
        assert_eq!(
            h.set().into_iter().collect::<Vec<_>>(),
            ["a@x.org", "b@x.org", "c@x.org"]
        );
        assert_eq!(h.to[0].name.as_deref(), Some("A"));
        // To: a, Cc: b; envelope a, c -> To a, Bcc c; b dropped.
        let h = HeaderRecipients {
            to: vec![HeaderAddr {
                address: "A@x.org".into(),
                name: None,
            }],
            cc: vec![HeaderAddr {
                address: "b@x.org".into(),
                name: None,
            }],
            bcc: vec![],
        };
        let f = final_recipients(&h, &["a@X.org".into(), "c@x.org".into()]);
        assert_eq!(f.to.len(), 1);
        assert_eq!(f.to[0].address, "A@x.org");
        assert!(f.cc.is_empty());
        assert_eq!(f.bcc.len(), 1);
        assert_eq!(f.bcc[0].address, "c@x.org");
        // Duplicates in headers and envelope are delivered once.
        let h = HeaderRecipients {
            to: vec![
                HeaderAddr {
                    address: "a@x.org".into(),
                    name: None,
                },
                HeaderAddr {
                    address: "A@x.org".into(),
                    name: None,
                },
            ],
            cc: h.cc,
            bcc: vec![],
        };
        let f = final_recipients(&h, &["a@x.org".into(), "A@X.ORG".into(), "b@x.org".into()]);
        assert_eq!((f.to.len(), f.cc.len(), f.bcc.len()), (1, 1, 0));
    }

    #[test]
    fn small_messages_are_not_touched() {
        let m = message(&[("a.bin", &[1, 2, 3])]);
        let s = split(&m, m.len()).unwrap();
        assert_eq!(s.mime, m);
        assert!(s.attachments.is_empty());
    }

    #[test]
    fn large_attachments_are_cut_out_byte_identical_and_the_rest_stays() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mid: Vec<u8> = (0..90_000u32).map(|i| (i % 256) as u8).collect();
        let small = b"tiny".to_vec();
        let m = message(&[("big.bin", &big), ("small.bin", &small), ("mid.bin", &mid)]);
        let s = split(&m, 100_000).unwrap();
        assert!(s.mime.len() <= 100_000, "{}", s.mime.len());
        // The largest went first; the middle one had to follow; the small one stays.
        let names: Vec<&str> = s.attachments.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["big.bin", "mid.bin"]);
        assert_eq!(s.attachments[0].decode(&m).unwrap(), big);
        assert_eq!(s.attachments[1].decode(&m).unwrap(), mid);
        assert_eq!(s.attachments[0].content_type, "application/octet-stream");
        // What stays parses to the body and the small attachment, and is the original with
        // the two parts (and their delimiter lines) cut out.
        let rest = MessageParser::default().parse(&s.mime[..]).unwrap();
        assert_eq!(rest.attachment_count(), 1);
        assert_eq!(rest.attachment(0).unwrap().contents(), b"tiny");
        assert_eq!(rest.body_text(0).unwrap().trim(), "hello");
        let expected = String::from_utf8(message(&[("small.bin", &small)])).unwrap();
        assert_eq!(String::from_utf8(s.mime).unwrap(), expected);
    }

    #[test]
    fn a_message_that_cannot_be_made_small_enough_is_an_error() {
        let mut m = b"From: s@x.org\r\nTo: a@x.org\r\nSubject: t\r\n\r\n".to_vec();
        m.extend(std::iter::repeat_n(b'x', 5000));
        assert!(matches!(split(&m, 1000), Err(SplitError::TooLarge { .. })));
    }

    #[test]
    fn quoted_printable_and_8bit_parts_decode_to_their_bytes() {
        let m = "From: s@x.org\r\nTo: a@x.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nbody\r\n--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Disposition: attachment; filename=q.txt\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9 =\r\nna=EFve\r\n--b\r\nContent-Type: text/csv\r\nContent-Disposition: attachment; filename=r.csv\r\n\r\na,b\r\n1,2\r\n--b--\r\n";
        let s = split(m.as_bytes(), 150).unwrap();
        assert_eq!(
            s.attachments.len(),
            2,
            "{}",
            String::from_utf8_lossy(&s.mime)
        );
        let by_name = |n: &str| s.attachments.iter().find(|a| a.name == n).unwrap();
        assert_eq!(
            by_name("q.txt").decode(m.as_bytes()).unwrap(),
            b"caf\xe9 na\xefve"
        );
        assert_eq!(
            by_name("r.csv").decode(m.as_bytes()).unwrap(),
            b"a,b\r\n1,2"
        );
        assert_eq!(by_name("r.csv").content_type, "text/csv");
    }

    fn att_part(name: &str, data: &[u8]) -> String {
        format!("Content-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}", b64_lines(data))
    }

    /// Splits with a limit that forces every attachment out; checks the attachments and
    /// that what stays still parses with the rest.
    fn split_all(m: &str, want: &[(&str, &[u8])], rest_len: usize) -> String {
        let s = split(m.as_bytes(), rest_len).unwrap();
        assert_eq!(s.attachments.len(), want.len());
        for (name, data) in want {
            let a = s.attachments.iter().find(|a| a.name == *name).unwrap();
            assert_eq!(&a.decode(m.as_bytes()).unwrap(), data, "{name}");
            assert_eq!(a.size, data.len());
        }
        let rest = String::from_utf8(s.mime).unwrap();
        assert!(MessageParser::default().parse(rest.as_bytes()).is_some());
        rest
    }

    #[test]
    fn a_first_part_right_after_the_headers_keeps_the_blank_line() {
        let a: &[u8] = &[7u8; 300];
        let m = format!("To: x@y.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n{}\r\n--b\r\nContent-Type: text/plain\r\n\r\ntext\r\n--b--\r\n", att_part("a", a));
        let want = "To: x@y.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\ntext\r\n--b--\r\n";
        assert_eq!(split_all(&m, &[("a", a)], want.len()), want);
    }

    #[test]
    fn a_text_body_ending_in_a_blank_line_keeps_it() {
        let a: &[u8] = &[1u8; 300];
        let m = format!("To: x@y.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\ntext\r\n\r\n--b\r\n{}\r\n--b--\r\n", att_part("a", a));
        let want = "To: x@y.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\ntext\r\n\r\n--b--\r\n";
        assert_eq!(split_all(&m, &[("a", a)], want.len()), want);
    }

    #[test]
    fn two_adjacent_attachments_at_the_start_do_not_overlap() {
        let (a, b): (&[u8], &[u8]) = (&[2u8; 400], &[3u8; 500]);
        let m = format!("To: x@y.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n{}\r\n--b\r\n{}\r\n--b\r\nContent-Type: text/plain\r\n\r\nt\r\n--b--\r\n", att_part("a", a), att_part("b", b));
        // The CRLF between them is cut once (it leaves an empty preamble).
        let want = "To: x@y.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nt\r\n--b--\r\n";
        assert_eq!(split_all(&m, &[("a", a), ("b", b)], want.len()), want);
        // Both at the very start and the end, nothing else.
        let m = format!("To: x@y.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n{}\r\n--b\r\n{}\r\n--b--\r\n", att_part("a", a), att_part("b", b));
        let want = "To: x@y.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n\r\n--b--\r\n";
        assert_eq!(split_all(&m, &[("a", a), ("b", b)], want.len()), want);
    }

    #[test]
    fn undecodable_and_unknown_encodings_are_errors_not_raw_bytes() {
        let big = "QUJD".repeat(200);
        let m = format!("To: x@y.org\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nt\r\n--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=x.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n{big}!!!*\r\n--b--\r\n");
        assert_eq!(
            split(m.as_bytes(), 200).unwrap_err(),
            SplitError::Undecodable("x.pdf".into())
        );
        let m = m.replace("base64", "x-uuencode").replace("!!!*", "");
        assert_eq!(
            split(m.as_bytes(), 200).unwrap_err(),
            SplitError::Undecodable("x.pdf".into())
        );
    }

    #[test]
    fn signed_messages_are_not_cut() {
        let body = "QUJD".repeat(200);
        let m = format!("To: x@y.org\r\nContent-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; micalg=sha-256; boundary=s\r\n\r\n--s\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nt\r\n--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=x.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n{body}\r\n--b--\r\n--s\r\nContent-Type: application/pkcs7-signature\r\n\r\nAAAA\r\n--s--\r\n");
        assert_eq!(split(m.as_bytes(), 100).unwrap_err(), SplitError::Signed);
        // Small enough for one request: untouched.
        assert_eq!(split(m.as_bytes(), m.len()).unwrap().mime, m.as_bytes());
        let m = format!("To: x@y.org\r\nContent-Type: application/pkcs7-mime; smime-type=enveloped-data\r\nContent-Transfer-Encoding: base64\r\n\r\n{body}\r\n");
        assert_eq!(split(m.as_bytes(), 100).unwrap_err(), SplitError::Signed);
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
            xs[self.below(xs.len() as u64) as usize]
        }
    }

    /// A multipart body (without the headers naming its boundary) and the attachments in it.
    fn gen_multipart(
        r: &mut Rng,
        depth: u32,
        boundary: &str,
        atts: &mut Vec<(String, Vec<u8>)>,
    ) -> String {
        let preamble = r.pick(&["", "", "preamble", "\r\n", "pre\r\namble\r\n"]);
        let mut m = preamble.to_string();
        let n = 1 + r.below(4);
        for i in 0..n {
            if i == 0 && preamble.is_empty() {
                m.push_str(&format!("--{boundary}\r\n"));
            } else {
                m.push_str(&format!("\r\n--{boundary}\r\n"));
            }
            match r.below(4) {
                0 => {
                    let blank = r.pick(&["", "\r\n", "\r\n\r\n"]);
                    m.push_str(&format!("Content-Type: text/plain\r\n\r\ntext {i}{blank}"));
                }
                1 if depth < 2 => {
                    let inner = format!("{boundary}n{i}");
                    m.push_str(&format!(
                        "Content-Type: multipart/mixed; boundary=\"{inner}\"\r\n\r\n{}",
                        gen_multipart(r, depth + 1, &inner, atts)
                    ));
                }
                _ => {
                    let name = format!("f{}.bin", atts.len());
                    let len = r.below(2000) as usize;
                    let data: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
                    let blank = r.pick(&["", "", "\r\n"]);
                    m.push_str(&att_part(&name, &data));
                    m.push_str(blank);
                    atts.push((name, data));
                }
            }
        }
        let epilogue = r.pick(&["", "\r\n", "\r\nepilogue\r\n", "\r\n\r\n"]);
        m.push_str(&format!("\r\n--{boundary}--{epilogue}"));
        m
    }

    #[test]
    fn generated_shapes_never_panic_and_attachments_stay_byte_identical() {
        let mut r = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..400 {
            let mut atts = Vec::new();
            let body = gen_multipart(&mut r, 0, "top", &mut atts);
            let m = format!("From: s@x.org\r\nTo: a@x.org\r\nSubject: {round}\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"top\"\r\n\r\n{body}");
            let limit = r.below(m.len() as u64 + 1) as usize;
            match split(m.as_bytes(), limit) {
                Ok(s) => {
                    assert!(
                        s.mime.len() <= limit.max(m.len().min(limit)),
                        "round {round}"
                    );
                    for a in &s.attachments {
                        let want = &atts.iter().find(|(n, _)| *n == a.name).unwrap().1;
                        assert_eq!(&a.decode(m.as_bytes()).unwrap(), want, "round {round}");
                    }
                    let rest = String::from_utf8(s.mime.clone()).unwrap();
                    assert!(
                        MessageParser::default().parse(rest.as_bytes()).is_some(),
                        "round {round}: what stays parses"
                    );
                    // Each attachment was cut out whole, or stayed verbatim; every
                    // multipart still closes.
                    for (name, data) in &atts {
                        let part = att_part(name, data);
                        let cut = s.attachments.iter().any(|a| a.name == *name);
                        assert_eq!(rest.contains(&part), !cut, "round {round}: {name}\n{rest}");
                        assert_eq!(rest.contains(&format!("\"{name}\"")), !cut, "round {round}");
                    }
                    for close in m
                        .lines()
                        .filter(|l| l.starts_with("--") && l.ends_with("--"))
                    {
                        assert!(rest.contains(close), "round {round}: {close}\n{rest}");
                    }
                }
                Err(SplitError::TooLarge { .. }) => {}
                Err(e) => panic!("round {round}: {e}\n{m}"),
            }
        }
    }
}
