//! Every reply the local listener sends, each with its enhanced status code, in one place.
//!
//! Replies mapped from the upstream's answers are built in `relay::outcome`; the reply type
//! and its wire form are `crate::reply`'s. This file owns the bridge's own fixed replies.

use crate::reply::Reply;

pub(crate) const OK: Reply = Reply::fixed(250, "2.0.0", "OK");
pub(crate) const SENDER_OK: Reply = Reply::fixed(250, "2.1.0", "Sender OK");
pub(crate) const RECIPIENT_OK: Reply = Reply::fixed(250, "2.1.5", "Recipient OK");
pub(crate) const RESET_OK: Reply = Reply::fixed(250, "2.0.0", "Reset OK");
pub(crate) const BYE: Reply = Reply::fixed(221, "2.0.0", "Bye");
pub(crate) const VRFY: Reply = Reply::fixed(
    252,
    "2.5.0",
    "Cannot VRFY user, but will accept message and attempt delivery",
);
pub(crate) const HELP: Reply = Reply::fixed(
    214,
    "2.0.0",
    "Commands: EHLO HELO AUTH MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS",
);
pub(crate) const READY_TLS: Reply = Reply::fixed(220, "2.0.0", "Ready to start TLS");
pub(crate) const START_DATA: Reply =
    Reply::fixed(354, "", "Start mail input; end with <CRLF>.<CRLF>");
pub(crate) const AUTH_OK: Reply = Reply::fixed(235, "2.7.0", "Authentication successful");

pub(crate) const AUTH_FAILED: Reply =
    Reply::fixed(535, "5.7.8", "Authentication credentials invalid");
pub(crate) const AUTH_REQUIRED: Reply = Reply::fixed(530, "5.7.0", "Authentication required");
pub(crate) const AUTH_CANCELLED: Reply = Reply::fixed(501, "5.7.0", "Authentication cancelled");
pub(crate) const AUTH_BAD_BASE64: Reply =
    Reply::fixed(501, "5.5.2", "Cannot decode base64 response");
pub(crate) const AUTH_MECH: Reply = Reply::fixed(
    504,
    "5.5.4",
    "Unrecognized authentication type; use PLAIN or LOGIN",
);
pub(crate) const AUTH_ALREADY: Reply = Reply::fixed(503, "5.5.1", "Already authenticated");
pub(crate) const TLS_REQUIRED: Reply = Reply::fixed(
    538,
    "5.7.11",
    "Encryption required for requested authentication mechanism; use STARTTLS first",
);
pub(crate) const NOT_ALLOWED_FROM: Reply =
    Reply::fixed(550, "5.7.1", "Sender address not allowed for this account");
pub(crate) const NOT_ALLOWED_RCPT: Reply = Reply::fixed(
    550,
    "5.7.1",
    "Recipient address not allowed for this account",
);
/// At connect, to a client outside `listen.allow_networks` (then the connection is closed).
pub(crate) const NETWORK_REFUSED: Reply = Reply::fixed(
    554,
    "5.7.1",
    "Access denied: your address may not use this service",
);
pub(crate) const BAD_SEQUENCE_HELO: Reply = Reply::fixed(503, "5.5.1", "Send EHLO or HELO first");
pub(crate) const BAD_SEQUENCE_MAIL: Reply = Reply::fixed(503, "5.5.1", "Send MAIL first");
pub(crate) const BAD_SEQUENCE_NESTED_MAIL: Reply =
    Reply::fixed(503, "5.5.1", "Nested MAIL command");
pub(crate) const NO_VALID_RECIPIENTS: Reply = Reply::fixed(554, "5.5.1", "No valid recipients");
pub(crate) const TLS_ALREADY: Reply = Reply::fixed(503, "5.5.1", "TLS already active");
pub(crate) const TLS_UNAVAILABLE: Reply = Reply::fixed(502, "5.5.1", "STARTTLS not available");
pub(crate) const UNKNOWN_COMMAND: Reply = Reply::fixed(500, "5.5.1", "Command unrecognized");
pub(crate) const NOT_IMPLEMENTED: Reply = Reply::fixed(502, "5.5.1", "Command not implemented");
pub(crate) const BAD_COMMAND_BYTES: Reply =
    Reply::fixed(500, "5.5.2", "NUL or bare CR in command line");
pub(crate) const LINE_TOO_LONG: Reply = Reply::fixed(500, "5.5.2", "Line too long");
pub(crate) const AUTH_BUSY: Reply = Reply::fixed(
    454,
    "4.7.0",
    "Temporary authentication failure: too many logins in progress, try again later",
);
pub(crate) const AUTH_THROTTLED: Reply = Reply::fixed(
    454,
    "4.7.0",
    "Too many failed logins from your address, try again later",
);
pub(crate) const AUTHZID_REFUSED: Reply = Reply::fixed(
    535,
    "5.7.8",
    "Authorization identity must be empty or equal to the user",
);
pub(crate) const NEEDS_SMTPUTF8: Reply =
    Reply::fixed(553, "5.6.7", "Non-ASCII address requires SMTPUTF8");
pub(crate) const SYNTAX_SENDER: Reply = Reply::fixed(501, "5.1.7", "Bad sender address syntax");
pub(crate) const SYNTAX_RECIPIENT: Reply =
    Reply::fixed(501, "5.1.3", "Bad recipient address syntax");
pub(crate) const TOO_BIG: Reply = Reply::fixed(
    552,
    "5.3.4",
    "Message size exceeds fixed maximum message size",
);
pub(crate) const TOO_MANY_RECIPIENTS: Reply = Reply::fixed(452, "4.5.3", "Too many recipients");
pub(crate) const TOO_MANY_CONNECTIONS: Reply =
    Reply::fixed(421, "4.3.2", "Too many connections, try again later");
pub(crate) const SHUTTING_DOWN: Reply =
    Reply::fixed(421, "4.3.2", "Service shutting down, try again later");
pub(crate) const SESSION_TOO_LONG: Reply = Reply::fixed(
    421,
    "4.4.2",
    "Session time limit reached, closing connection",
);
pub(crate) const TOO_MANY_AUTH_FAILURES: Reply = Reply::fixed(
    421,
    "4.7.0",
    "Too many authentication failures, closing connection",
);
pub(crate) const IDLE_TIMEOUT: Reply =
    Reply::fixed(421, "4.4.2", "Idle timeout, closing connection");
pub(crate) const HELD_TOO_LONG: Reply = Reply::fixed(
    451,
    "4.4.2",
    "Transaction took too long before DATA; upstream session released, start again with MAIL",
);
pub(crate) const SPOOL_FULL: Reply = Reply::fixed(
    452,
    "4.3.1",
    "Insufficient system storage: cannot queue the message, try again later",
);
pub(crate) const INTERNAL: Reply = Reply::fixed(451, "4.3.0", "Local error in processing");

pub(crate) fn syntax(what: &str) -> Reply {
    Reply::new(501, "5.5.4", format!("Syntax error: {what}"))
}

pub(crate) fn parameter(what: &str) -> Reply {
    Reply::new(555, "5.5.4", format!("Unsupported parameter {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_replies_have_their_wire_form() {
        let mut out = Vec::new();
        AUTH_FAILED.write_to(&mut out);
        assert_eq!(out, b"535 5.7.8 Authentication credentials invalid\r\n");
        out.clear();
        START_DATA.write_to(&mut out);
        assert_eq!(out, b"354 Start mail input; end with <CRLF>.<CRLF>\r\n");
    }
}
