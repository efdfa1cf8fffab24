//! Delivery status notifications (RFC 3464): the `multipart/report` a sender gets when its
//! spooled message goes dead (`[queue] bounce = true`). Pure: builds the bytes; when to send
//! one and through which account is the deliverer's business.
//!
//! The report carries a human-readable part, one `message/delivery-status` part with a
//! per-recipient block for each failed recipient (its status and the upstream's reply), and
//! the original message's headers (`text/rfc822-headers`). It is sent from the null sender
//! `<>` (RFC 3464 section 2 / RFC 5321 4.5.5), never for a message whose sender was `<>`,
//! and is marked `Auto-Submitted: auto-replied` (RFC 3834) so it does not loop.

use crate::relay::envelope::Address;
use crate::reply::one_line;

/// Longest original header block copied into a report.
const MAX_HEADERS: usize = 64 * 1024;

/// One recipient the message could not be delivered to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub recipient: String,
    /// The upstream's reply (or our reason), e.g. `550 5.1.10 Recipient not found`.
    pub reason: String,
}

/// What a report is about.
#[derive(Debug)]
pub(crate) struct Report<'a> {
    /// Our host name, for `Reporting-MTA` and the Message-ID.
    pub reporting_mta: &'a str,
    /// The mailbox the report is sent from (Microsoft 365 sends only as the account).
    pub from_mailbox: &'a str,
    /// The original envelope sender: the report's recipient.
    pub to: &'a Address,
    /// The bridge's id of the original message.
    pub id: &'a str,
    /// When the original message was accepted (seconds since the epoch).
    pub arrival: u64,
    /// Now (seconds since the epoch).
    pub now: u64,
    pub failures: &'a [Failure],
    /// The original message (only its header block is copied).
    pub original: &'a [u8],
}

/// The report as a complete RFC 5322 message with CRLF line endings.
pub(crate) fn build(r: &Report<'_>) -> Vec<u8> {
    let boundary = format!("=_dsn_{}", r.id);
    let mut m = String::new();
    let line = |m: &mut String, s: &str| {
        m.push_str(s);
        m.push_str("\r\n");
    };
    line(
        &mut m,
        &format!("From: Mail Delivery System <{}>", r.from_mailbox),
    );
    line(&mut m, &format!("To: <{}>", r.to));
    line(&mut m, "Subject: Undelivered Mail Returned to Sender");
    line(&mut m, &format!("Date: {}", rfc5322_date(r.now)));
    line(
        &mut m,
        &format!("Message-ID: <dsn.{}@{}>", r.id, r.reporting_mta),
    );
    line(&mut m, "Auto-Submitted: auto-replied");
    line(&mut m, "MIME-Version: 1.0");
    line(
        &mut m,
        &format!(
            "Content-Type: multipart/report; report-type=delivery-status; boundary=\"{boundary}\""
        ),
    );
    line(&mut m, "");
    line(&mut m, "This is a MIME-encapsulated message.");
    line(&mut m, "");
    line(&mut m, &format!("--{boundary}"));
    line(&mut m, "Content-Type: text/plain; charset=utf-8");
    line(&mut m, "");
    line(
        &mut m,
        "Your message could not be delivered to the following recipients:",
    );
    line(&mut m, "");
    for f in r.failures {
        line(
            &mut m,
            &format!("  <{}>: {}", one_line(&f.recipient), one_line(&f.reason)),
        );
    }
    line(&mut m, "");
    line(&mut m, &format!("--{boundary}"));
    line(&mut m, "Content-Type: message/delivery-status");
    line(&mut m, "");
    line(&mut m, &format!("Reporting-MTA: dns; {}", r.reporting_mta));
    line(&mut m, &format!("X-Smtp-Oauth-Bridge-Id: {}", r.id));
    line(
        &mut m,
        &format!("Arrival-Date: {}", rfc5322_date(r.arrival)),
    );
    for f in r.failures {
        line(&mut m, "");
        line(
            &mut m,
            &format!("Final-Recipient: rfc822; {}", one_line(&f.recipient)),
        );
        line(&mut m, "Action: failed");
        line(&mut m, &format!("Status: {}", status_of(&f.reason)));
        line(
            &mut m,
            &format!("Diagnostic-Code: smtp; {}", one_line(&f.reason)),
        );
    }
    line(&mut m, "");
    line(&mut m, &format!("--{boundary}"));
    line(&mut m, "Content-Type: text/rfc822-headers");
    line(&mut m, "");
    let mut out = m.into_bytes();
    out.extend_from_slice(header_block(r.original));
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The original's header block (up to the first empty line), bounded.
fn header_block(msg: &[u8]) -> &[u8] {
    let end = msg
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(msg.len(), |i| i + 2);
    &msg[..end.min(MAX_HEADERS)]
}

/// The enhanced status code in a reply (`550 5.1.10 ...` -> `5.1.10`), else `5.0.0`.
fn status_of(reason: &str) -> String {
    reason
        .split_whitespace()
        .take(2)
        .find(|w| {
            let mut p = w.split('.');
            matches!((p.next(), p.next(), p.next(), p.next()), (Some(c), Some(s), Some(d), None)
                if (c == "4" || c == "5")
                    && !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit())
                    && !d.is_empty() && d.len() <= 3 && d.bytes().all(|b| b.is_ascii_digit()))
        })
        // A report is about a permanent failure.
        .map_or_else(|| "5.0.0".to_string(), |s| format!("5{}", &s[1..]))
}

/// `Sat, 28 Nov 2026 18:54:16 +0000` for seconds since the epoch (UTC).
pub fn rfc5322_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_795_890_856),
            "Sat, 28 Nov 2026 18:34:16 +0000"
        );
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn a_report_names_each_failed_recipient_with_its_status_and_keeps_the_headers() {
        let to = Address::parse("app@contoso.com", false).unwrap();
        let original = b"From: app@contoso.com\r\nSubject: Invoice\r\n\r\nsecret body\r\n";
        let failures = [
            Failure {
                recipient: "gone@fabrikam.com".into(),
                reason: "550 5.1.10 RESOLVER.ADR.RecipientNotFound".into(),
            },
            Failure {
                recipient: "x@y.z".into(),
                reason: "not delivered within queue.max_age_secs\r\nInjected: yes".into(),
            },
        ];
        let report = Report {
            reporting_mta: "bridge.example",
            from_mailbox: "scanner@contoso.com",
            to: &to,
            id: "ABC123",
            arrival: 0,
            now: 60,
            failures: &failures,
            original,
        };
        let text = String::from_utf8(build(&report)).unwrap();
        assert!(text.starts_with(
            "From: Mail Delivery System <scanner@contoso.com>\r\nTo: <app@contoso.com>\r\n"
        ));
        assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status; boundary=\"=_dsn_ABC123\"\r\n"));
        assert!(text.contains("\r\nAuto-Submitted: auto-replied\r\n"));
        assert!(text.contains("\r\nFinal-Recipient: rfc822; gone@fabrikam.com\r\nAction: failed\r\nStatus: 5.1.10\r\nDiagnostic-Code: smtp; 550 5.1.10 RESOLVER.ADR.RecipientNotFound\r\n"));
        assert!(text
            .contains("\r\nFinal-Recipient: rfc822; x@y.z\r\nAction: failed\r\nStatus: 5.0.0\r\n"));
        assert!(
            !text.contains("\r\nInjected: yes"),
            "a reason cannot add header lines"
        );
        assert!(text.contains("Content-Type: text/rfc822-headers\r\n\r\nFrom: app@contoso.com\r\nSubject: Invoice\r\n\r\n--=_dsn_ABC123--\r\n"));
        assert!(
            !text.contains("secret body"),
            "only the headers are returned"
        );
        assert!(text.ends_with("--=_dsn_ABC123--\r\n"));
        assert!(!text.replace("\r\n", "").contains('\n'), "CRLF only");
    }
}
