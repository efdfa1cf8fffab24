//! Every reply the local listener sends, each with its enhanced status code, in one place.
//!
//! Replies mapped from the upstream's answers are built in `relay::outcome`; this file owns
//! the reply type, its wire form, and the bridge's own fixed replies.

use std::borrow::Cow;
use std::fmt;

/// An SMTP reply: code, enhanced status code (RFC 3463) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: Cow<'static, str>,
    pub text: Cow<'static, str>,
}

impl Reply {
    pub const fn fixed(code: u16, status: &'static str, text: &'static str) -> Reply {
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

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the wire form: one line, CR/LF and other control characters in the text
    /// replaced by spaces so a reply can never be split or smuggle a second one.
    pub fn write_to(&self, out: &mut Vec<u8>) {
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

pub const OK: Reply = Reply::fixed(250, "2.0.0", "OK");
pub const SENDER_OK: Reply = Reply::fixed(250, "2.1.0", "Sender OK");
pub const RECIPIENT_OK: Reply = Reply::fixed(250, "2.1.5", "Recipient OK");
pub const RESET_OK: Reply = Reply::fixed(250, "2.0.0", "Reset OK");
pub const BYE: Reply = Reply::fixed(221, "2.0.0", "Bye");
pub const VRFY: Reply = Reply::fixed(
    252,
    "2.5.0",
    "Cannot VRFY user, but will accept message and attempt delivery",
);
pub const HELP: Reply = Reply::fixed(
    214,
    "2.0.0",
    "Commands: EHLO HELO AUTH MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS",
);
pub const READY_TLS: Reply = Reply::fixed(220, "2.0.0", "Ready to start TLS");
pub const START_DATA: Reply = Reply::fixed(354, "", "Start mail input; end with <CRLF>.<CRLF>");
pub const AUTH_OK: Reply = Reply::fixed(235, "2.7.0", "Authentication successful");

pub const AUTH_FAILED: Reply = Reply::fixed(535, "5.7.8", "Authentication credentials invalid");
pub const AUTH_REQUIRED: Reply = Reply::fixed(530, "5.7.0", "Authentication required");
pub const AUTH_CANCELLED: Reply = Reply::fixed(501, "5.7.0", "Authentication cancelled");
pub const AUTH_BAD_BASE64: Reply = Reply::fixed(501, "5.5.2", "Cannot decode base64 response");
pub const AUTH_MECH: Reply = Reply::fixed(
    504,
    "5.5.4",
    "Unrecognized authentication type; use PLAIN or LOGIN",
);
pub const AUTH_ALREADY: Reply = Reply::fixed(503, "5.5.1", "Already authenticated");
pub const TLS_REQUIRED: Reply = Reply::fixed(
    538,
    "5.7.11",
    "Encryption required for requested authentication mechanism; use STARTTLS first",
);
pub const NOT_ALLOWED_FROM: Reply =
    Reply::fixed(550, "5.7.1", "Sender address not allowed for this account");
pub const BAD_SEQUENCE_HELO: Reply = Reply::fixed(503, "5.5.1", "Send EHLO or HELO first");
pub const BAD_SEQUENCE_MAIL: Reply = Reply::fixed(503, "5.5.1", "Send MAIL first");
pub const BAD_SEQUENCE_NESTED_MAIL: Reply = Reply::fixed(503, "5.5.1", "Nested MAIL command");
pub const NO_VALID_RECIPIENTS: Reply = Reply::fixed(554, "5.5.1", "No valid recipients");
pub const TLS_ALREADY: Reply = Reply::fixed(503, "5.5.1", "TLS already active");
pub const TLS_UNAVAILABLE: Reply = Reply::fixed(502, "5.5.1", "STARTTLS not available");
pub const UNKNOWN_COMMAND: Reply = Reply::fixed(500, "5.5.1", "Command unrecognized");
pub const NOT_IMPLEMENTED: Reply = Reply::fixed(502, "5.5.1", "Command not implemented");
pub const BAD_COMMAND_BYTES: Reply = Reply::fixed(500, "5.5.2", "NUL or bare CR in command line");
pub const LINE_TOO_LONG: Reply = Reply::fixed(500, "5.5.2", "Line too long");
pub const AUTHZID_REFUSED: Reply = Reply::fixed(
    535,
    "5.7.8",
    "Authorization identity must be empty or equal to the user",
);
pub const NEEDS_SMTPUTF8: Reply = Reply::fixed(553, "5.6.7", "Non-ASCII address requires SMTPUTF8");
pub const SYNTAX_SENDER: Reply = Reply::fixed(501, "5.1.7", "Bad sender address syntax");
pub const SYNTAX_RECIPIENT: Reply = Reply::fixed(501, "5.1.3", "Bad recipient address syntax");
pub const TOO_BIG: Reply = Reply::fixed(
    552,
    "5.3.4",
    "Message size exceeds fixed maximum message size",
);
pub const TOO_MANY_RECIPIENTS: Reply = Reply::fixed(452, "4.5.3", "Too many recipients");
pub const TOO_MANY_CONNECTIONS: Reply =
    Reply::fixed(421, "4.3.2", "Too many connections, try again later");
pub const SHUTTING_DOWN: Reply =
    Reply::fixed(421, "4.3.2", "Service shutting down, try again later");
pub const SESSION_TOO_LONG: Reply = Reply::fixed(
    421,
    "4.4.2",
    "Session time limit reached, closing connection",
);
pub const TOO_MANY_AUTH_FAILURES: Reply = Reply::fixed(
    421,
    "4.7.0",
    "Too many authentication failures, closing connection",
);
pub const IDLE_TIMEOUT: Reply = Reply::fixed(421, "4.4.2", "Idle timeout, closing connection");
pub const SPOOL_FULL: Reply = Reply::fixed(
    452,
    "4.3.1",
    "Insufficient system storage: cannot queue the message, try again later",
);
pub const INTERNAL: Reply = Reply::fixed(451, "4.3.0", "Local error in processing");

pub fn syntax(what: &str) -> Reply {
    Reply::new(501, "5.5.4", format!("Syntax error: {what}"))
}

pub fn parameter(what: &str) -> Reply {
    Reply::new(555, "5.5.4", format!("Unsupported parameter {what}"))
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
        AUTH_FAILED.write_to(&mut out);
        assert_eq!(out, b"535 5.7.8 Authentication credentials invalid\r\n");
    }
}
