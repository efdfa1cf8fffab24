//! The upstream's replies: an incremental, bounded parser for (multi-line) SMTP replies
//! (RFC 5321 section 4.2), the EHLO capabilities we care about, and the reply value
//! callers see ([`UpReply`]).
//!
//! Bounds: a reply line is at most [`MAX_LINE`] bytes and a reply at most [`MAX_LINES`]
//! lines, so a hostile upstream cannot make us buffer without limit.

use std::fmt;

/// Longest reply line we accept, line ending included.
pub(crate) const MAX_LINE: usize = 4096;
/// Most lines in one reply (an EHLO reply has one per extension).
pub(crate) const MAX_LINES: usize = 64;
/// How much of a malformed line an error message quotes.
const EXCERPT: usize = 64;

/// A reply from the upstream, code and text (the enhanced status code is part of the text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpReply {
    pub code: u16,
    pub text: String,
}

impl fmt::Display for UpReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// Why bytes from the upstream are not a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReplyError {
    #[error("reply line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("reply of more than {MAX_LINES} lines")]
    TooManyLines,
    #[error("malformed reply line \"{0}\"")]
    Malformed(String),
    #[error("reply code changed within a multi-line reply (\"{0}\")")]
    CodeChanged(String),
}

/// One complete reply: its code and its lines' text (without code and separator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub(crate) code: u16,
    pub(crate) lines: Vec<String>,
}

impl Reply {
    /// The reply as callers see it: lines joined with spaces, an enhanced status code that
    /// every line repeats kept only once (as lettre rendered it).
    pub(crate) fn to_up(&self) -> UpReply {
        let Some((first, rest)) = self.lines.split_first() else {
            return UpReply {
                code: self.code,
                text: String::new(),
            };
        };
        let esc = enhanced_code(self.code, first);
        let mut text = first.clone();
        for line in rest {
            text.push(' ');
            let line = esc
                .and_then(|c| line.strip_prefix(c))
                .filter(|r| r.starts_with(' '))
                .map_or(line.as_str(), str::trim_start);
            text.push_str(line);
        }
        UpReply {
            code: self.code,
            text,
        }
    }
}

/// The first word of `line` if it is an enhanced status code of the reply's class
/// (RFC 2034 section 4).
fn enhanced_code(code: u16, line: &str) -> Option<&str> {
    let class = match code / 100 {
        2 => "2",
        4 => "4",
        5 => "5",
        _ => return None,
    };
    let word = line.split(' ').next()?;
    let (c, rest) = word.split_once('.')?;
    let (subject, detail) = rest.split_once('.')?;
    let part = |p: &str| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
    (c == class && part(subject) && part(detail)).then_some(word)
}

/// Printable excerpt of untrusted bytes for an error message (no control characters).
pub(crate) fn excerpt(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(EXCERPT)];
    let mut s = cut.escape_ascii().to_string();
    if bytes.len() > EXCERPT {
        s.push_str("...");
    }
    s
}

/// Reply text as a string: invalid UTF-8 replaced, control characters (but tab) as spaces,
/// so nothing from the upstream can break a line of ours.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c.is_control() && c != '\t' { ' ' } else { c })
        .collect()
}

/// Parses one reply from bytes that may arrive in any pieces.
#[derive(Debug, Default)]
pub(crate) struct ReplyParser {
    code: Option<u16>,
    lines: Vec<String>,
}

impl ReplyParser {
    /// Consumes complete lines from the front of `input`. Returns how many bytes were used
    /// and the reply once its last line was seen (bytes after it are left unused). An
    /// incomplete line is left unused too, unless it is already too long.
    pub(crate) fn feed(&mut self, input: &[u8]) -> Result<(usize, Option<Reply>), ReplyError> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            let Some(lf) = memchr::memchr(b'\n', rest) else {
                if rest.len() >= MAX_LINE {
                    return Err(ReplyError::LineTooLong);
                }
                return Ok((used, None));
            };
            if lf + 1 > MAX_LINE {
                return Err(ReplyError::LineTooLong);
            }
            let line = &rest[..lf];
            used += lf + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let (code, last, body) = split_line(line)?;
            match self.code {
                None => self.code = Some(code),
                Some(c) if c != code => return Err(ReplyError::CodeChanged(excerpt(line))),
                Some(_) => {}
            }
            if self.lines.len() >= MAX_LINES {
                return Err(ReplyError::TooManyLines);
            }
            self.lines.push(text(body));
            if last {
                let reply = Reply {
                    code,
                    lines: std::mem::take(&mut self.lines),
                };
                self.code = None;
                return Ok((used, Some(reply)));
            }
        }
    }
}

/// `250-text`, `250 text` or `250`: the code, whether it is the last line, and the text.
fn split_line(line: &[u8]) -> Result<(u16, bool, &[u8]), ReplyError> {
    let bad = || ReplyError::Malformed(excerpt(line));
    let (digits, rest) = line.split_at_checked(3).ok_or_else(bad)?;
    let ok = matches!(digits[0], b'2'..=b'5')
        && digits[1].is_ascii_digit()
        && digits[2].is_ascii_digit();
    if !ok {
        return Err(bad());
    }
    let code = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    match rest.split_first() {
        None => Ok((code, true, rest)),
        Some((b' ', text)) => Ok((code, true, text)),
        Some((b'-', text)) => Ok((code, false, text)),
        Some(_) => Err(bad()),
    }
}

/// The EHLO extensions the bridge may use, as the upstream announced them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// RFC 2920 command pipelining.
    pub pipelining: bool,
    /// RFC 3030 BDAT.
    pub chunking: bool,
    /// RFC 1870: the announced limit (`Some(0)`: SIZE without a fixed limit).
    pub size: Option<u64>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    /// Offered before TLS; after it, not relevant.
    pub(crate) starttls: bool,
}

impl Capabilities {
    /// From an EHLO reply: every line after the first names one extension.
    pub(crate) fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "CHUNKING" => caps.chunking = true,
                "8BITMIME" => caps.eightbitmime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "STARTTLS" => caps.starttls = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                _ => {}
            }
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Result<(usize, Option<Reply>), ReplyError> {
        ReplyParser::default().feed(input)
    }

    #[test]
    fn single_and_multi_line_replies() {
        let (used, r) = parse_all(b"250 2.0.0 OK\r\n").unwrap();
        assert_eq!(used, 14);
        assert_eq!(
            r.unwrap().to_up(),
            UpReply {
                code: 250,
                text: "2.0.0 OK".into()
            }
        );
        let input =
            b"250-mx.example Hello\r\n250-PIPELINING\r\n250-SIZE 37748736\r\n250 SMTPUTF8\r\nrest";
        let (used, r) = parse_all(input).unwrap();
        assert_eq!(
            &input[used..],
            b"rest",
            "bytes after the reply are left alone"
        );
        let r = r.unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(
            r.lines,
            [
                "mx.example Hello",
                "PIPELINING",
                "SIZE 37748736",
                "SMTPUTF8"
            ]
        );
        // A bare code ends a reply too.
        let (_, r) = parse_all(b"250-a\r\n250\r\n").unwrap();
        assert_eq!(r.unwrap().lines, ["a", ""]);
    }

    #[test]
    fn repeated_enhanced_code_is_kept_once() {
        let (_, r) = parse_all(b"550-5.7.1 first\r\n550 5.7.1 second\r\n").unwrap();
        assert_eq!(r.unwrap().to_up().text, "5.7.1 first second");
        let (_, r) = parse_all(b"250-a\r\n250 b\r\n").unwrap();
        assert_eq!(r.unwrap().to_up().text, "a b");
    }

    #[test]
    fn control_characters_in_text_become_spaces() {
        let (_, r) = parse_all(b"550 a\rb\0c\td\r\n").unwrap();
        assert_eq!(r.unwrap().to_up().text, "a b c\td");
    }

    #[test]
    fn bad_codes_and_separators_are_refused() {
        for bad in [
            &b"25 ok\r\n"[..],
            b"abc ok\r\n",
            b"150 ok\r\n",
            b"650 ok\r\n",
            b"2a0 ok\r\n",
            b"250_ok\r\n",
            b"\r\n",
            b"Queued\r\n",
        ] {
            assert!(
                matches!(parse_all(bad), Err(ReplyError::Malformed(_))),
                "{}",
                bad.escape_ascii()
            );
        }
        assert_eq!(
            parse_all(b"250-a\r\n251 b\r\n").unwrap_err(),
            ReplyError::CodeChanged("251 b".into())
        );
    }

    #[test]
    fn an_over_long_line_is_refused_complete_or_not() {
        let mut line = b"250 ".to_vec();
        line.resize(MAX_LINE - 2, b'x');
        line.extend_from_slice(b"\r\n");
        assert!(
            parse_all(&line).unwrap().1.is_some(),
            "exactly MAX_LINE fits"
        );
        let mut long = b"250 ".to_vec();
        long.resize(MAX_LINE - 1, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse_all(&long).unwrap_err(), ReplyError::LineTooLong);
        // Without a line ending: refused once it cannot become a valid line.
        assert_eq!(parse_all(&long[..MAX_LINE - 1]).unwrap(), (0, None));
        assert_eq!(
            parse_all(&long[..MAX_LINE]).unwrap_err(),
            ReplyError::LineTooLong
        );
    }

    #[test]
    fn too_many_lines_are_refused() {
        let mut p = ReplyParser::default();
        let mut input = b"250-x\r\n".repeat(MAX_LINES - 1);
        input.extend_from_slice(b"250 last\r\n");
        let (_, r) = p.feed(&input).unwrap();
        assert_eq!(r.unwrap().lines.len(), MAX_LINES);
        let input = b"250-x\r\n".repeat(MAX_LINES + 1);
        assert_eq!(
            ReplyParser::default().feed(&input).unwrap_err(),
            ReplyError::TooManyLines
        );
        // Also when the lines arrive one by one.
        let mut p = ReplyParser::default();
        let mut err = None;
        for _ in 0..=MAX_LINES {
            match p.feed(b"250-x\r\n") {
                Ok((7, None)) => {}
                Ok(other) => panic!("{other:?}"),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        assert_eq!(err, Some(ReplyError::TooManyLines));
    }

    #[test]
    fn a_reply_split_across_reads() {
        let input = b"250-mx Hello\r\n250-PIPELINING\r\n250 CHUNKING\r\n";
        for cut in 1..input.len() {
            for second in cut..input.len() {
                let mut p = ReplyParser::default();
                let mut buf = Vec::new();
                let mut got = None;
                for piece in [&input[..cut], &input[cut..second], &input[second..]] {
                    buf.extend_from_slice(piece);
                    let (used, r) = p.feed(&buf).unwrap();
                    buf.drain(..used);
                    if r.is_some() {
                        got = r;
                    }
                }
                let r = got.unwrap_or_else(|| panic!("no reply for cuts {cut}/{second}"));
                assert_eq!(r.lines, ["mx Hello", "PIPELINING", "CHUNKING"]);
                assert!(buf.is_empty());
            }
        }
    }

    #[test]
    fn ehlo_capabilities() {
        let (_, r) = parse_all(
            b"250-mx Hello [127.0.0.1]\r\n250-SIZE 37748736\r\n250-pipelining\r\n250-DSN\r\n250-STARTTLS\r\n250-8BITMIME\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n",
        )
        .unwrap();
        let caps = Capabilities::from_ehlo(&r.unwrap());
        assert_eq!(
            caps,
            Capabilities {
                pipelining: true,
                chunking: true,
                size: Some(37748736),
                eightbitmime: true,
                smtputf8: true,
                starttls: true,
            }
        );
        // The greeting line names no extension; SIZE without a number has no fixed limit.
        let (_, r) = parse_all(b"250-PIPELINING hello\r\n250 SIZE\r\n").unwrap();
        let caps = Capabilities::from_ehlo(&r.unwrap());
        assert_eq!(
            caps,
            Capabilities {
                size: Some(0),
                ..Capabilities::default()
            }
        );
    }
}
