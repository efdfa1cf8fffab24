//! The SMTP reply value (code, RFC 3463 enhanced status code, text) and its wire form.
//!
//! A neutral place below both sides: `relay::outcome` maps upstream results to it and
//! `smtp` sends it, so relay never imports smtp. The local listener's fixed replies live in
//! `smtp::reply`; the mapping from upstream answers lives in `relay::outcome`.

use std::borrow::Cow;
use std::fmt;

/// An SMTP reply: code, enhanced status code (RFC 3463) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub code: u16,
    pub status: Cow<'static, str>,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub(crate) const fn fixed(code: u16, status: &'static str, text: &'static str) -> Reply {
        Reply {
            code,
            status: Cow::Borrowed(status),
            text: Cow::Borrowed(text),
        }
    }

    pub fn new(code: u16, status: impl Into<Cow<'static, str>>, text: impl Into<String>) -> Reply {
        Reply {
            code,
            status: status.into(),
            text: Cow::Owned(text.into()),
        }
    }

    pub(crate) fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the wire form: one line, CR/LF and other control characters in the text
    /// replaced by spaces so a reply can never be split or smuggle a second one.
    pub(crate) fn write_to(&self, out: &mut Vec<u8>) {
        // 3xx intermediate replies (354, 334) carry no enhanced status code (RFC 2034).
        if self.status.is_empty() {
            out.extend_from_slice(format!("{} ", self.code).as_bytes());
        } else {
            out.extend_from_slice(format!("{} {} ", self.code, self.status).as_bytes());
        }
        out.extend(
            self.text
                .bytes()
                .map(|b| if b.is_ascii_control() { b' ' } else { b }),
        );
        out.extend_from_slice(b"\r\n");
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.status.is_empty() {
            write!(f, "{} {}", self.code, self.text)
        } else {
            write!(f, "{} {} {}", self.code, self.status, self.text)
        }
    }
}

/// `s` as one line of reply or header text: every control character (CR and LF included)
/// becomes a space, so text from outside (an upstream, Graph, a spooled reason) can never
/// end a line of ours or start another.
pub(crate) fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_one_line_with_enhanced_code() {
        let mut out = Vec::new();
        Reply::new(451, "4.4.2", "lost\r\n250 2.0.0 fake").write_to(&mut out);
        assert_eq!(out, b"451 4.4.2 lost  250 2.0.0 fake\r\n");
        out.clear();
        Reply::fixed(354, "", "Start mail input").write_to(&mut out);
        assert_eq!(out, b"354 Start mail input\r\n");
    }

    #[test]
    fn display_omits_an_empty_status() {
        assert_eq!(Reply::fixed(250, "2.0.0", "OK").to_string(), "250 2.0.0 OK");
        assert_eq!(
            Reply::fixed(354, "", "go ahead").to_string(),
            "354 go ahead"
        );
    }
}
