//! The envelope, typed: validated addresses, the MAIL parameters we decided to send, and the
//! one place that renders `MAIL FROM` and `RCPT TO` lines for the upstream.
//!
//! Addresses are parsed from the client's own bytes (RFC 5321 4.1.2, with RFC 6531's UTF-8
//! extension), never from another parser's unquoted result, and rendered back in canonical
//! form: a local part that is not a dot-string is re-quoted, so nothing the client wrote can
//! end the path early or smuggle a parameter. Parameters are values we choose (SIZE, BODY,
//! SMTPUTF8), never the client's text. Comparison (`allowed_from`, `allowed_rcpt`) folds ASCII
//! case only: no Unicode case mapping (U+212A KELVIN SIGN is not `k`).
//! Which addresses an account may use is `smtp::policy`'s decision, using [`Pattern`].

use std::fmt;

/// Longest path we accept (RFC 5321 4.5.3.1.3: 256 octets including the brackets).
pub(crate) const MAX_PATH: usize = 256;
/// Longest local part (RFC 5321 4.5.3.1.1).
const MAX_LOCAL: usize = 64;
/// Longest domain (RFC 5321 4.5.3.1.2).
const MAX_DOMAIN: usize = 255;

/// Why an address or a parameter is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("syntax error in the address")]
    Syntax,
    #[error("the address is too long")]
    TooLong,
    #[error("a non-ASCII address needs SMTPUTF8")]
    NeedsUtf8,
    #[error("parameter {0} is not supported")]
    UnsupportedParameter(String),
    #[error("invalid parameter {0}")]
    InvalidParameter(String),
}

/// A mailbox `local@domain`, validated. `local` is stored unquoted; rendering re-quotes it
/// when it is not a dot-string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    local: String,
    domain: String,
}

impl Address {
    /// The unquoted local part.
    #[cfg(test)]
    pub(crate) fn local(&self) -> &str {
        &self.local
    }

    #[cfg(test)]
    pub(crate) fn domain(&self) -> &str {
        &self.domain
    }

    /// Whether rendering it needs SMTPUTF8 upstream.
    pub(crate) fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || !self.domain.is_ascii()
    }

    /// Parses the inside of a path (`local@domain`, or `Postmaster`, no brackets) as stored
    /// or configured.
    pub fn parse(s: &str, utf8: bool) -> Result<Address, EnvelopeError> {
        if s.eq_ignore_ascii_case("postmaster") {
            return Ok(Address {
                local: s.to_string(),
                domain: String::new(),
            });
        }
        let mut p = Parser::new(s.as_bytes(), utf8);
        let a = p.mailbox()?;
        if p.rest().is_empty() {
            Ok(a)
        } else {
            Err(EnvelopeError::Syntax)
        }
    }
}

impl fmt::Display for Address {
    /// The canonical form: dot-string or quoted-string, `@`, domain.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_dot_string(self.local.as_bytes()) {
            f.write_str(&self.local)?;
        } else {
            f.write_str("\"")?;
            for c in self.local.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\"")?;
        }
        if self.domain.is_empty() {
            // Only `<Postmaster>` (RFC 5321 4.1.1.3) has no domain.
            return Ok(());
        }
        write!(f, "@{}", self.domain)
    }
}

/// The sender: an address or the null path `<>` (bounces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReversePath {
    Null,
    Address(Address),
}

impl ReversePath {
    pub(crate) fn address(&self) -> Option<&Address> {
        match self {
            ReversePath::Null => None,
            ReversePath::Address(a) => Some(a),
        }
    }

    pub(crate) fn is_utf8(&self) -> bool {
        self.address().is_some_and(Address::is_utf8)
    }

    /// Parses the stored form (the text between the brackets, empty for `<>`).
    pub(crate) fn parse_stored(s: &str) -> Result<ReversePath, EnvelopeError> {
        if s.is_empty() {
            Ok(ReversePath::Null)
        } else {
            Address::parse(s, true).map(ReversePath::Address)
        }
    }
}

impl fmt::Display for ReversePath {
    /// The text between the brackets (empty for the null path).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => Ok(()),
            ReversePath::Address(a) => a.fmt(f),
        }
    }
}

/// `BODY=` values (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Body {
    #[default]
    SevenBit,
    EightBitMime,
}

/// The MAIL parameters we honour and forward; anything else the client sends is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MailParams {
    /// SIZE= as declared by the client (0 when absent); forwarded as the real size.
    pub size: usize,
    pub body: Body,
    pub smtputf8: bool,
}

impl MailParams {
    /// The parameters as the spool stores them (`BODY=8BITMIME SMTPUTF8`); SIZE is not kept.
    pub(crate) fn stored(&self) -> String {
        let mut v = Vec::new();
        if self.body == Body::EightBitMime {
            v.push("BODY=8BITMIME");
        }
        if self.smtputf8 {
            v.push("SMTPUTF8");
        }
        v.join(" ")
    }

    /// Parses the spool's stored form back.
    pub(crate) fn parse_stored(s: &str) -> Result<MailParams, EnvelopeError> {
        let mut p = MailParams::default();
        for word in s.split_ascii_whitespace() {
            match word {
                "BODY=8BITMIME" => p.body = Body::EightBitMime,
                "SMTPUTF8" => p.smtputf8 = true,
                other => return Err(EnvelopeError::UnsupportedParameter(sanitize(other))),
            }
        }
        Ok(p)
    }
}

/// `MAIL FROM:<from> [SIZE=n] [BODY=8BITMIME] [SMTPUTF8]`, the only MAIL line we send.
pub fn mail_command(from: &ReversePath, params: &MailParams, size: Option<usize>) -> String {
    let mut cmd = format!("MAIL FROM:<{from}>");
    if let Some(n) = size.filter(|n| *n > 0) {
        cmd.push_str(&format!(" SIZE={n}"));
    }
    if params.body == Body::EightBitMime {
        cmd.push_str(" BODY=8BITMIME");
    }
    if params.smtputf8 || from.is_utf8() {
        cmd.push_str(" SMTPUTF8");
    }
    cmd
}

/// `RCPT TO:<to>`, the only RCPT line we send (no parameters: we offer no DSN).
pub(crate) fn rcpt_command(to: &Address) -> String {
    format!("RCPT TO:<{to}>")
}

/// What a client's `MAIL FROM:` line said, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MailFrom {
    pub from: ReversePath,
    pub params: MailParams,
}

/// Parses the arguments of `MAIL` (everything after the verb, e.g. `FROM:<a@b> SIZE=10`,
/// without CRLF). Unknown parameters are refused; `AUTH=` (RFC 4954) is accepted and dropped.
pub(crate) fn parse_mail_args(args: &[u8]) -> Result<MailFrom, EnvelopeError> {
    let rest = strip_keyword(args, b"FROM:").ok_or(EnvelopeError::Syntax)?;
    let (path, params_text) = split_path(rest)?;
    let mut params = MailParams::default();
    for (key, value) in parse_params(params_text)? {
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(v)) => {
                params.size = v
                    .parse::<usize>()
                    .ok()
                    .filter(|_| v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| EnvelopeError::InvalidParameter("SIZE".into()))?;
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => {
                params.body = Body::EightBitMime
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => params.body = Body::SevenBit,
            ("BODY", _) => return Err(EnvelopeError::InvalidParameter("BODY".into())),
            ("SMTPUTF8", None) => params.smtputf8 = true,
            ("AUTH", Some(_)) => {}
            (k, _) => return Err(EnvelopeError::UnsupportedParameter(sanitize(k))),
        }
    }
    let from = if path == b"<>" {
        ReversePath::Null
    } else {
        ReversePath::Address(parse_path(path, params.smtputf8)?)
    };
    Ok(MailFrom { from, params })
}

/// Parses the arguments of `RCPT` (`TO:<a@b>`). `<Postmaster>` without a domain (RFC 5321
/// 4.1.1.3: every server must accept it) is an address with an empty domain, rendered as
/// `<Postmaster>` again.
pub(crate) fn parse_rcpt_args(args: &[u8], smtputf8: bool) -> Result<Address, EnvelopeError> {
    let rest = strip_keyword(args, b"TO:").ok_or(EnvelopeError::Syntax)?;
    let (path, params_text) = split_path(rest)?;
    if let Some((key, _)) = parse_params(params_text)?.into_iter().next() {
        return Err(EnvelopeError::UnsupportedParameter(sanitize(&key)));
    }
    if path.eq_ignore_ascii_case(b"<postmaster>") {
        return Ok(Address {
            local: utf8(&path[1..path.len() - 1])?,
            domain: String::new(),
        });
    }
    parse_path(path, smtputf8)
}

/// A pattern of `allowed_from` / `allowed_rcpt`: an exact address or `*@domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pattern {
    Exact(String),
    Domain(String),
}

impl Pattern {
    pub fn parse(s: &str) -> Pattern {
        match s.strip_prefix("*@") {
            Some(d) => Pattern::Domain(d.to_string()),
            None => Pattern::Exact(s.to_string()),
        }
    }

    /// ASCII case-insensitive; a non-ASCII character matches only itself.
    pub(crate) fn matches(&self, a: &Address) -> bool {
        match self {
            Pattern::Domain(d) => a.domain.eq_ignore_ascii_case(d),
            Pattern::Exact(e) => match e.rsplit_once('@') {
                Some((l, d)) => a.local.eq_ignore_ascii_case(l) && a.domain.eq_ignore_ascii_case(d),
                None => false,
            },
        }
    }
}

fn strip_keyword<'a>(s: &'a [u8], kw: &[u8]) -> Option<&'a [u8]> {
    let s = trim_start(s);
    (s.len() >= kw.len() && s[..kw.len()].eq_ignore_ascii_case(kw))
        .then(|| trim_start(&s[kw.len()..]))
}

fn trim_start(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| **b == b' ').count();
    &s[n..]
}

/// Splits `<path> params` at the closing bracket that ends the path (quotes respected).
fn split_path(s: &[u8]) -> Result<(&[u8], &[u8]), EnvelopeError> {
    if s.first() != Some(&b'<') {
        return Err(EnvelopeError::Syntax);
    }
    let mut quoted = false;
    let mut i = 1;
    while i < s.len() {
        match s[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => {
                let (path, rest) = s.split_at(i + 1);
                if path.len() > MAX_PATH {
                    return Err(EnvelopeError::TooLong);
                }
                return match rest {
                    [] => Ok((path, rest)),
                    [b' ', ..] => Ok((path, rest)),
                    _ => Err(EnvelopeError::Syntax),
                };
            }
            _ => {}
        }
        i += 1;
    }
    Err(EnvelopeError::Syntax)
}

/// `<[@a,@b:]mailbox>` -> the mailbox (a source route is accepted and ignored, RFC 5321 C).
fn parse_path(path: &[u8], utf8: bool) -> Result<Address, EnvelopeError> {
    let inner = &path[1..path.len() - 1];
    let inner = if inner.first() == Some(&b'@') {
        let colon = inner
            .iter()
            .position(|b| *b == b':')
            .ok_or(EnvelopeError::Syntax)?;
        let mut route = Parser::new(&inner[1..colon], false);
        loop {
            route.domain()?;
            match route.rest() {
                [] => break,
                [b',', b'@', ..] => route.pos += 2,
                _ => return Err(EnvelopeError::Syntax),
            }
        }
        &inner[colon + 1..]
    } else {
        inner
    };
    let mut p = Parser::new(inner, utf8);
    let a = p.mailbox()?;
    if !p.rest().is_empty() {
        return Err(EnvelopeError::Syntax);
    }
    Ok(a)
}

/// ` KEY[=VALUE] KEY2...` -> pairs. Values are printable ASCII without `=` (RFC 5321
/// esmtp-value) or, with SMTPUTF8, UTF-8; control characters are refused.
fn parse_params(s: &[u8]) -> Result<Vec<(String, Option<String>)>, EnvelopeError> {
    let text = std::str::from_utf8(s).map_err(|_| EnvelopeError::Syntax)?;
    let mut out = Vec::new();
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let (k, v) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        let key_ok = k.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !key_ok {
            return Err(EnvelopeError::Syntax);
        }
        if let Some(v) = v {
            if v.is_empty() || v.chars().any(|c| c.is_control() || c == '=') {
                return Err(EnvelopeError::InvalidParameter(sanitize(k)));
            }
        }
        out.push((k.to_string(), v.map(str::to_string)));
    }
    Ok(out)
}

/// RFC 5322 atext (plus UTF-8 with SMTPUTF8, RFC 6531).
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

fn is_dot_string(s: &[u8]) -> bool {
    !s.is_empty()
        && s.split(|b| *b == b'.')
            .all(|atom| !atom.is_empty() && atom.iter().all(|b| is_atext(*b) || *b >= 0x80))
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    utf8: bool,
}

impl<'a> Parser<'a> {
    fn new(s: &'a [u8], utf8: bool) -> Self {
        Parser { s, pos: 0, utf8 }
    }

    fn rest(&self) -> &'a [u8] {
        &self.s[self.pos..]
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn mailbox(&mut self) -> Result<Address, EnvelopeError> {
        let local = if self.peek() == Some(b'"') {
            self.quoted()?
        } else {
            self.dot_string()?
        };
        if self.peek() != Some(b'@') {
            return Err(EnvelopeError::Syntax);
        }
        self.pos += 1;
        let domain = if self.peek() == Some(b'[') {
            self.literal()?
        } else {
            self.domain()?
        };
        if local.len() > MAX_LOCAL || domain.len() > MAX_DOMAIN {
            return Err(EnvelopeError::TooLong);
        }
        let a = Address { local, domain };
        if a.is_utf8() && !self.utf8 {
            return Err(EnvelopeError::NeedsUtf8);
        }
        Ok(a)
    }

    /// Takes a run of bytes; non-ASCII only as whole valid UTF-8 (checked at the end).
    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a [u8] {
        let start = self.pos;
        while self.peek().is_some_and(&f) {
            self.pos += 1;
        }
        &self.s[start..self.pos]
    }

    fn dot_string(&mut self) -> Result<String, EnvelopeError> {
        let run = self.take_while(|b| is_atext(b) || b == b'.' || b >= 0x80);
        if !is_dot_string(run) {
            return Err(EnvelopeError::Syntax);
        }
        utf8(run)
    }

    fn quoted(&mut self) -> Result<String, EnvelopeError> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(EnvelopeError::Syntax),
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => {
                    let c = *self.s.get(self.pos + 1).ok_or(EnvelopeError::Syntax)?;
                    if !(32..=126).contains(&c) {
                        return Err(EnvelopeError::Syntax);
                    }
                    out.push(c);
                    self.pos += 2;
                }
                Some(c) if (32..=126).contains(&c) || c >= 0x80 => {
                    out.push(c);
                    self.pos += 1;
                }
                Some(_) => return Err(EnvelopeError::Syntax),
            }
        }
        if out.is_empty() {
            return Err(EnvelopeError::Syntax);
        }
        utf8(&out)
    }

    /// sub-domain *("." sub-domain), sub-domain = Let-dig [Ldh-str] (or a U-label).
    fn domain(&mut self) -> Result<String, EnvelopeError> {
        let run =
            self.take_while(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b >= 0x80);
        let ok = !run.is_empty()
            && run.split(|b| *b == b'.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.first() != Some(&b'-')
                    && label.last() != Some(&b'-')
            });
        if !ok {
            return Err(EnvelopeError::Syntax);
        }
        utf8(run)
    }

    /// `[IPv4]`, `[IPv6:...]` or a general literal `[tag:printable]`.
    fn literal(&mut self) -> Result<String, EnvelopeError> {
        let start = self.pos;
        self.pos += 1;
        let body =
            self.take_while(|b| (33..=126).contains(&b) && b != b'[' && b != b']' && b != b'\\');
        if self.peek() != Some(b']') || body.is_empty() {
            return Err(EnvelopeError::Syntax);
        }
        self.pos += 1;
        let text = utf8(body)?;
        let valid = match text.split_once(':') {
            Some(("IPv6", v6)) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            Some((tag, _)) => tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            None => text.parse::<std::net::Ipv4Addr>().is_ok(),
        };
        if !valid {
            return Err(EnvelopeError::Syntax);
        }
        utf8(&self.s[start..self.pos])
    }
}

fn utf8(b: &[u8]) -> Result<String, EnvelopeError> {
    String::from_utf8(b.to_vec()).map_err(|_| EnvelopeError::Syntax)
}

/// Client text made safe for replies and logs (bounded, no control characters).
fn sanitize(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail(s: &str) -> Result<MailFrom, EnvelopeError> {
        parse_mail_args(s.as_bytes())
    }

    fn rendered_mail(s: &str) -> String {
        let m = mail(s).expect(s);
        mail_command(&m.from, &m.params, Some(m.params.size))
    }

    #[test]
    fn plain_addresses_render_as_sent() {
        assert_eq!(
            rendered_mail("FROM:<a.b@contoso.com>"),
            "MAIL FROM:<a.b@contoso.com>"
        );
        assert_eq!(
            rendered_mail("FROM: <a@b.c> SIZE=10 BODY=8BITMIME"),
            "MAIL FROM:<a@b.c> SIZE=10 BODY=8BITMIME"
        );
        assert_eq!(rendered_mail("from:<>"), "MAIL FROM:<>");
        assert_eq!(
            rendered_mail("FROM:<@relay.example,@r2.example:x@y.z>"),
            "MAIL FROM:<x@y.z>"
        );
        assert_eq!(
            rendered_mail("FROM:<x@[192.0.2.1]>"),
            "MAIL FROM:<x@[192.0.2.1]>"
        );
        assert_eq!(
            rendered_mail("FROM:<x@[IPv6:2001:db8::1]>"),
            "MAIL FROM:<x@[IPv6:2001:db8::1]>"
        );
        assert_eq!(rendered_mail("FROM:<a@b.c> AUTH=<>"), "MAIL FROM:<a@b.c>");
    }

    #[test]
    fn quoted_local_parts_are_requoted_and_cannot_inject() {
        let m = mail("FROM:<\"ceo@fabrikam.com> ENVID=<\"@contoso.com>").unwrap();
        let a = m.from.address().unwrap();
        assert_eq!(a.local(), "ceo@fabrikam.com> ENVID=<");
        assert_eq!(a.domain(), "contoso.com");
        assert_eq!(
            mail_command(&m.from, &m.params, None),
            "MAIL FROM:<\"ceo@fabrikam.com> ENVID=<\"@contoso.com>"
        );
        let m = mail("FROM:<\"a\\\"b\\\\c\"@d.e>").unwrap();
        assert_eq!(
            mail_command(&m.from, &m.params, None),
            "MAIL FROM:<\"a\\\"b\\\\c\"@d.e>"
        );
        // A quoted dot-string is rendered unquoted (the same address).
        let m = mail("FROM:<\"abc\"@d.e>").unwrap();
        assert_eq!(
            mail_command(&m.from, &m.params, None),
            "MAIL FROM:<abc@d.e>"
        );
    }

    #[test]
    fn parameters_the_client_wrote_never_pass_through() {
        for bad in [
            "FROM:<a@b.c> ENVID=x",
            "FROM:<a@b.c> RET=HDRS",
            "FROM:<a@b.c> X-FOO",
            "FROM:<a@b.c> BODY=BINARYMIME",
            "FROM:<a@b.c> SIZE=abc",
            "FROM:<a@b.c> SIZE=99999999999999999999999",
            "FROM:<a@b.c>ENVID=x",
            "FROM:<a@b.c> SIZE=1\x01",
        ] {
            assert!(mail(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            parse_rcpt_args(b"TO:<a@b.c> NOTIFY=SUCCESS ORCPT=rfc822;x@y", false),
            Err(EnvelopeError::UnsupportedParameter(_))
        ));
        assert!(parse_rcpt_args(b"TO:<\"x> NOTIFY=NEVER\"@b.c>", false).is_ok());
        assert_eq!(
            rcpt_command(&parse_rcpt_args(b"TO:<\"x> NOTIFY=NEVER\"@b.c>", false).unwrap()),
            "RCPT TO:<\"x> NOTIFY=NEVER\"@b.c>"
        );
    }

    #[test]
    fn malformed_paths_are_refused() {
        for bad in [
            "FROM:a@b.c",
            "FROM:<a@b.c",
            "FROM:<a@b.c>>",
            "FROM:<a b@c.d>",
            "FROM:<a@b..c>",
            "FROM:<a@-b.c>",
            "FROM:<@b.c>",
            "FROM:<a@>",
            "FROM:<a>",
            "FROM:<postmaster>",
            "FROM:<a.@b.c>",
            "FROM:<\"\"@b.c>",
            "FROM:<\"a\x01\"@b.c>",
            "FROM:<a@[1.2.3]>",
            "FROM:<a@b.c\0>",
            "TO:<a@b.c>",
        ] {
            assert!(mail(bad).is_err(), "{bad:?}");
        }
        let pm = parse_rcpt_args(b"TO:<Postmaster>", false).unwrap();
        assert_eq!(rcpt_command(&pm), "RCPT TO:<Postmaster>");
        assert_eq!(Address::parse(&pm.to_string(), false).unwrap(), pm);
        assert!(!Pattern::parse("*@contoso.com").matches(&pm));
        let long = format!("FROM:<{}@b.c>", "x".repeat(65));
        assert_eq!(mail(&long), Err(EnvelopeError::TooLong));
    }

    #[test]
    fn non_ascii_needs_smtputf8_and_then_is_declared_upstream() {
        assert_eq!(
            mail("FROM:<\u{212A}elvin@contoso.com>"),
            Err(EnvelopeError::NeedsUtf8)
        );
        let m = mail("FROM:<jos\u{e9}@exampl\u{e9}.com> SMTPUTF8").unwrap();
        assert_eq!(
            mail_command(&m.from, &m.params, None),
            "MAIL FROM:<jos\u{e9}@exampl\u{e9}.com> SMTPUTF8"
        );
        assert_eq!(
            parse_rcpt_args("TO:<\u{e9}@b.c>".as_bytes(), false),
            Err(EnvelopeError::NeedsUtf8)
        );
        assert!(parse_rcpt_args("TO:<\u{e9}@b.c>".as_bytes(), true).is_ok());
        // Invalid UTF-8 is a syntax error, with or without SMTPUTF8.
        assert!(parse_mail_args(b"FROM:<\xff@b.c> SMTPUTF8").is_err());
    }

    #[test]
    fn patterns_fold_ascii_case_only() {
        let a = |s: &str| Address::parse(s, true).unwrap();
        let exact = Pattern::parse("scanner@contoso.com");
        let domain = Pattern::parse("*@fabrikam.com");
        assert!(exact.matches(&a("Scanner@Contoso.COM")));
        assert!(!exact.matches(&a("ceo@contoso.com")));
        assert!(domain.matches(&a("anyone@FABRIKAM.com")));
        assert!(!domain.matches(&a("x@sub.fabrikam.com")));
        // U+212A KELVIN SIGN lower-cases to 'k' in Unicode; not here.
        let kelvin = Pattern::parse("kelvin@contoso.com");
        assert!(!kelvin.matches(&a("\u{212A}elvin@contoso.com")));
        let quoted = a("\"ceo@fabrikam.com> ENVID=<\"@contoso.com");
        assert!(!Pattern::parse("ceo@fabrikam.com").matches(&quoted));
    }

    #[test]
    fn stored_forms_round_trip() {
        let m = mail("FROM:<\"a b\"@c.d> BODY=8BITMIME SMTPUTF8").unwrap();
        let stored = m.from.to_string();
        assert_eq!(ReversePath::parse_stored(&stored).unwrap(), m.from);
        assert_eq!(
            MailParams::parse_stored(&m.params.stored()).unwrap().body,
            Body::EightBitMime
        );
        assert_eq!(ReversePath::parse_stored("").unwrap(), ReversePath::Null);
        assert!(MailParams::parse_stored("ENVID=x").is_err());
    }
}
