//! THE one place that maps an upstream result to the local reply (and the relay outcome).
//!
//! The reply is `crate::reply::Reply` and the outcome `crate::telemetry::Outcome` (the relay
//! log's vocabulary lives with the relay log, below relay, so that metrics and telemetry,
//! which relay calls, never import relay).
//!
//! Rules (SPEC "On the wire"):
//! - the upstream's positive and 5xx replies are handed back with their code and text;
//! - at DATA, 2xx becomes `250 2.0.0 <our id> <upstream text>`;
//! - at DATA, an upstream 4xx becomes 451 (keeping the upstream's enhanced code);
//! - our own failures (token, TLS, network, no free session) are always 4xx, never 5xx:
//!   4.4.1 no connection, 4.4.2 lost connection, 4.3.2 no free session, 4.7.0 token/auth.

use crate::oauth::manager::TokenError;
use crate::relay::pool::BeginError;
use crate::relay::upstream::{UpReply, UpstreamError};
use crate::reply::Reply;
use crate::telemetry::Outcome;

/// Which command an upstream reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Mail,
    Rcpt,
    Data,
}

/// Splits "5.1.10 text" into ("5.1.10", "text") when the text starts with an enhanced code
/// whose class matches the reply code's first digit.
fn split_enhanced(code: u16, text: &str) -> (Option<&str>, &str) {
    let (first, rest) = text.split_once(' ').unwrap_or((text, ""));
    let mut parts = first.split('.');
    let valid = matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(c), Some(s), Some(d), None)
            if c.len() == 1
                && c.as_bytes()[0] == b'0' + (code / 100) as u8
                && (1..=3).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
                && (1..=3).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit())
    );
    if valid {
        (Some(first), rest)
    } else {
        (None, text)
    }
}

fn default_status(code: u16, stage: Stage) -> &'static str {
    match (code / 100, stage) {
        (2, Stage::Mail) => "2.1.0",
        (2, Stage::Rcpt) => "2.1.5",
        (2, Stage::Data) => "2.0.0",
        (4, _) => "4.0.0",
        _ => "5.0.0",
    }
}

/// An upstream reply handed back as it is (adding an enhanced code if it had none).
fn pass_through(r: &UpReply, stage: Stage) -> Reply {
    let (status, text) = split_enhanced(r.code, &r.text);
    let status = status.unwrap_or_else(|| default_status(r.code, stage));
    Reply::new(r.code, status.to_string(), text.to_string())
}

fn upstream_failure(e: &UpstreamError, stage: Stage) -> Reply {
    match e {
        UpstreamError::Connect(m) => Reply::new(451, "4.4.1", format!("Upstream unavailable: {m}")),
        UpstreamError::Lost(m) => {
            Reply::new(451, "4.4.2", format!("Lost connection to upstream: {m}"))
        }
        // The upstream's 421 closes *its* channel, not ours: the local session goes on.
        UpstreamError::Reply(r) if r.code == 421 => {
            Reply::new(451, "4.4.2", format!("Upstream closed the session: {r}"))
        }
        UpstreamError::Reply(r) if r.code >= 500 || r.code < 400 => pass_through(r, stage),
        UpstreamError::Reply(r) if stage == Stage::Data => {
            let (status, text) = split_enhanced(r.code, &r.text);
            let status = status.unwrap_or("4.4.0");
            Reply::new(
                451,
                status.to_string(),
                format!("Upstream deferred: {} {text}", r.code),
            )
        }
        // A transient MAIL or RCPT answer (452 4.5.3, 450 4.2.1...) is precise as it is.
        UpstreamError::Reply(r) => pass_through(r, stage),
    }
}

/// An account whose refresh token the provider refused: 454 with the command that fixes it.
pub(crate) fn needs_login(account: &str) -> Reply {
    Reply::new(
        454,
        "4.7.0",
        format!("Account {account} needs login; run: smtp-oauth-bridge login {account}"),
    )
}

/// What DATA answers after the upstream connection broke during the envelope: the last
/// transient reply, or 451 4.4.2 (never a 354 that nothing would follow up).
pub(crate) fn transaction_lost(last: &Reply) -> Reply {
    if (400..500).contains(&last.code) {
        last.clone()
    } else {
        Reply::new(
            451,
            "4.4.2",
            "Lost connection to upstream during the transaction",
        )
    }
}

fn token_failure(e: &TokenError) -> Reply {
    match e {
        TokenError::NeedsLogin { account, .. } => needs_login(account),
        TokenError::Provider { reason, .. } => Reply::new(
            451,
            "4.7.0",
            format!("Cannot obtain an access token: {reason}"),
        ),
        TokenError::UnknownAccount(a) => Reply::new(451, "4.3.0", format!("Unknown account {a}")),
    }
}

/// The local reply to MAIL FROM (given at the first RCPT, when the session is taken).
pub(crate) fn mail_reply(r: Result<&UpReply, &BeginError>) -> Reply {
    match r {
        Ok(up) => pass_through(up, Stage::Mail),
        Err(BeginError::Busy) => Reply::new(
            451,
            "4.3.2",
            "All upstream sessions for this mailbox are busy, try again later",
        ),
        Err(BeginError::Token(e)) => token_failure(e),
        Err(BeginError::AuthRejected(up)) => Reply::new(
            454,
            "4.7.0",
            format!("Upstream refused the mailbox's OAuth authentication: {up}; run: smtp-oauth-bridge check"),
        ),
        Err(BeginError::AuthDeferred(up)) => Reply::new(
            451,
            "4.4.1",
            format!("Upstream refused AUTH for now: {up}"),
        ),
        Err(BeginError::Upstream(e)) => upstream_failure(e, Stage::Mail),
    }
}

/// The local reply to RCPT TO.
pub(crate) fn rcpt_reply(r: &Result<UpReply, UpstreamError>) -> Reply {
    match r {
        Ok(up) => pass_through(up, Stage::Rcpt),
        Err(e) => upstream_failure(e, Stage::Rcpt),
    }
}

/// The local reply to the end of DATA, and what to log.
pub(crate) fn data_reply(r: &Result<UpReply, UpstreamError>, id: &str) -> (Reply, Outcome) {
    match r {
        Ok(up) => {
            let (_, text) = split_enhanced(up.code, &up.text);
            (
                Reply::new(250, "2.0.0", format!("{id} {text}")),
                Outcome::Delivered,
            )
        }
        Err(e) => {
            let reply = upstream_failure(e, Stage::Data);
            let outcome = if reply.code >= 500 {
                Outcome::Rejected
            } else {
                Outcome::Deferred
            };
            (reply, outcome)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(code: u16, text: &str) -> UpReply {
        UpReply {
            code,
            text: text.into(),
        }
    }

    #[test]
    fn enhanced_codes_are_recognised_only_when_they_match_the_class() {
        assert_eq!(
            split_enhanced(550, "5.1.10 not found"),
            (Some("5.1.10"), "not found")
        );
        assert_eq!(split_enhanced(550, "4.1.10 odd"), (None, "4.1.10 odd"));
        assert_eq!(split_enhanced(250, "OK"), (None, "OK"));
        assert_eq!(
            split_enhanced(451, "4.7.500 Server busy"),
            (Some("4.7.500"), "Server busy")
        );
    }

    #[test]
    fn data_stage_mapping() {
        let (r, o) = data_reply(&Ok(up(250, "2.6.0 <x@y> Queued mail for delivery")), "ID1");
        assert_eq!(
            r.to_string(),
            "250 2.0.0 ID1 <x@y> Queued mail for delivery"
        );
        assert_eq!(o, Outcome::Delivered);
        let (r, o) = data_reply(
            &Err(UpstreamError::Reply(up(554, "5.6.0 bad content"))),
            "ID1",
        );
        assert_eq!(r.to_string(), "554 5.6.0 bad content");
        assert_eq!(o, Outcome::Rejected);
        let (r, o) = data_reply(
            &Err(UpstreamError::Reply(up(
                432,
                "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
            ))),
            "ID1",
        );
        assert_eq!(r.code, 451);
        assert_eq!(r.status, "4.3.2");
        assert!(r.text.contains("432"), "{r}");
        assert_eq!(o, Outcome::Deferred);
        let (r, o) = data_reply(&Err(UpstreamError::Lost("reset".into())), "ID1");
        assert_eq!((r.code, r.status.as_ref()), (451, "4.4.2"));
        assert_eq!(o, Outcome::Deferred);
    }

    #[test]
    fn our_own_failures_are_never_5xx() {
        let cases = [
            mail_reply(Err(&BeginError::Busy)),
            mail_reply(Err(&BeginError::AuthDeferred(up(432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded")))),
            mail_reply(Err(&BeginError::Upstream(UpstreamError::Connect("refused".into())))),
            mail_reply(Err(&BeginError::AuthRejected(up(535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.")))),
            mail_reply(Err(&BeginError::Token(TokenError::NeedsLogin { account: "a".into(), reason: "r".into() }))),
            mail_reply(Err(&BeginError::Token(TokenError::Provider { account: "a".into(), reason: "503".into() }))),
        ];
        for r in &cases {
            assert!((400..500).contains(&r.code), "{r}");
            assert!(r.status.starts_with("4."), "{r}");
        }
        assert_eq!((cases[1].code, cases[1].status.as_ref()), (451, "4.4.1"));
        assert!(cases[1].text.contains("432 4.3.2"), "{}", cases[1]);
        assert_eq!((cases[2].code, cases[2].status.as_ref()), (451, "4.4.1"));
        assert_eq!((cases[4].code, cases[4].status.as_ref()), (454, "4.7.0"));
        assert!(cases[4].text.contains("run: smtp-oauth-bridge login a"));
    }

    #[test]
    fn upstream_421_never_reaches_the_client_as_421() {
        let r = rcpt_reply(&Err(UpstreamError::Reply(up(
            421,
            "4.3.2 Service not available",
        ))));
        assert_eq!((r.code, r.status.as_ref()), (451, "4.4.2"));
        let (r, o) = data_reply(&Err(UpstreamError::Reply(up(421, "4.4.2 timeout"))), "X");
        assert_eq!((r.code, o), (451, Outcome::Deferred));
    }

    #[test]
    fn rcpt_replies_are_handed_back() {
        let r = rcpt_reply(&Err(UpstreamError::Reply(up(
            550,
            "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found",
        ))));
        assert_eq!(
            r.to_string(),
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found"
        );
        assert_eq!(
            rcpt_reply(&Ok(up(250, "2.1.5 Recipient OK"))).to_string(),
            "250 2.1.5 Recipient OK"
        );
        assert_eq!(rcpt_reply(&Ok(up(250, "OK"))).to_string(), "250 2.1.5 OK");
    }
}
