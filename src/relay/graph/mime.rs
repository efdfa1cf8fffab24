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
use mail_parser::{Encoding, MessageParser, MimeHeaders};
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

/// An attachment cut out of the MIME, to be added to the draft separately.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Attachment {
    pub(crate) name: String,
    pub(crate) content_type: String,
    /// `Content-ID` without angle brackets, for inline parts.
    pub(crate) content_id: Option<String>,
    pub(crate) inline: bool,
    /// The decoded content (transfer encoding undone).
    pub(crate) bytes: Vec<u8>,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("name", &self.name)
            .field("content_type", &self.content_type)
            .field("bytes", &self.bytes.len())
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
    #[error("attachment part {0} cannot be decoded")]
    Undecodable(String),
}

/// The message as a smaller MIME plus the attachments cut out of it.
#[derive(Debug)]
pub(crate) struct Split {
    pub(crate) mime: Vec<u8>,
    pub(crate) attachments: Vec<Attachment>,
}

/// Cuts attachments (largest first) out of `mime` until what stays is at most `limit` bytes.
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
    // Attachment parts of the top-level tree, by size, largest first.
    let mut candidates: Vec<usize> = msg
        .attachments
        .iter()
        .map(|&id| id as usize)
        .filter(|&id| id > 0)
        .filter(|&id| msg.parts.get(id).is_some_and(|p| !p.is_multipart()))
        .collect();
    candidates.sort_by_key(|&id| std::cmp::Reverse(msg.parts[id].raw_len()));
    let mut cuts: Vec<(usize, usize, usize)> = Vec::new(); // (start, end, part id)
    let mut size = mime.len();
    for id in candidates {
        if size <= limit {
            break;
        }
        let part = &msg.parts[id];
        let Some((start, end)) =
            cut_range(mime, part.offset_header as usize, part.offset_end as usize)
        else {
            continue;
        };
        cuts.push((start, end, id));
        size -= end - start;
    }
    if size > limit {
        return Err(SplitError::TooLarge { bytes: size, limit });
    }
    cuts.sort();
    let mut out = Vec::with_capacity(size);
    let mut at = 0;
    let mut attachments = Vec::with_capacity(cuts.len());
    for (start, end, id) in cuts {
        out.extend_from_slice(&mime[at..start]);
        at = end;
        let part = &msg.parts[id];
        let body = &mime[part.offset_body as usize..part.offset_end as usize];
        let name = part
            .attachment_name()
            .map(str::to_string)
            .unwrap_or_else(|| format!("attachment-{id}"));
        let bytes = match part.encoding {
            Encoding::Base64 => base64_decode(body),
            Encoding::QuotedPrintable => quoted_printable_decode(body),
            Encoding::None => Some(body.to_vec()),
        }
        .ok_or_else(|| SplitError::Undecodable(name.clone()))?;
        let content_type = part
            .content_type()
            .map(|ct| match ct.subtype() {
                Some(sub) => format!("{}/{sub}", ct.ctype()),
                None => ct.ctype().to_string(),
            })
            .unwrap_or_else(|| "application/octet-stream".into());
        let inline = part.content_disposition().is_some_and(|d| d.is_inline());
        attachments.push(Attachment {
            name,
            content_type,
            content_id: part
                .content_id()
                .map(|c| c.trim_matches(['<', '>', ' ']).to_string()),
            inline,
            bytes,
        });
    }
    out.extend_from_slice(&mime[at..]);
    Ok(Split {
        mime: out,
        attachments,
    })
}

/// The bytes that hold the part at `header..end` with its delimiter line: from the start of
/// the `--boundary` line before it to the end of the part, so that what stays is still a
/// well-formed multipart (the CRLF after the part belongs to the next delimiter).
fn cut_range(mime: &[u8], header: usize, end: usize) -> Option<(usize, usize)> {
    if header > end || end > mime.len() || header < 2 {
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
    let line_start = mime[..line_end]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    if !mime[line_start..line_end].starts_with(b"--") {
        return None;
    }
    // Take the CRLF before the delimiter with it (it belongs to the delimiter), unless that
    // is the CRLF ending the header block or a preamble.
    let start = if line_start >= 2 && &mime[line_start - 2..line_start] == b"\r\n" {
        line_start - 2
    } else {
        line_start
    };
    let start = if start < line_start && mime[..start].ends_with(b"\r\n") {
        // "\r\n\r\n--b": an empty line before the delimiter; keep one CRLF in place.
        line_start
    } else {
        start
    };
    if start == line_start {
        // The part's end is followed by the next delimiter's CRLF: cut that one instead.
        let tail = mime.get(end..)?;
        let skip = if tail.starts_with(b"\r\n") {
            2
        } else if tail.starts_with(b"\n") {
            1
        } else {
            0
        };
        return Some((start, end + skip));
    }
    Some((start, end))
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
        assert_eq!(s.attachments[0].bytes, big);
        assert_eq!(s.attachments[1].bytes, mid);
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
        assert_eq!(by_name("q.txt").bytes, b"caf\xe9 na\xefve");
        assert_eq!(by_name("r.csv").bytes, b"a,b\r\n1,2");
        assert_eq!(by_name("r.csv").content_type, "text/csv");
    }
}
