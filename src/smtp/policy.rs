//! Who may send what: the sender an account may use (`allowed_from`). Pure decisions on
//! validated envelope values (`relay::envelope`); the session turns a "no" into 550 5.7.1.
//!
//! The null sender `<>` (bounces, RFC 5321 4.5.5) is allowed for every account.

use crate::config::Account;
use crate::relay::envelope::{Pattern, ReversePath};

/// Whether `account` may send with `from` (exact address or `*@domain`, ASCII case folded).
pub fn sender_allowed(account: &Account, from: &ReversePath) -> bool {
    match from.address() {
        None => true,
        Some(a) => account
            .allowed_from
            .iter()
            .any(|p| Pattern::parse(p).matches(a)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::envelope::parse_mail_args;

    fn allowed(patterns: &[&str], mail_args: &str) -> bool {
        let toml = format!(
            "[[account]]\nusername = \"u\"\npassword_env = \"P\"\nmailbox = \"scanner@contoso.com\"\nallowed_from = {patterns:?}\n[account.oauth]\nflow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"c\"\nclient_secret_env = \"P\"\n"
        );
        let config =
            crate::config::Config::from_toml(&toml, "t.toml", std::path::Path::new("."), &|_| {
                Some("x".into())
            })
            .expect("config");
        let from = parse_mail_args(mail_args.as_bytes())
            .expect("valid MAIL")
            .from;
        sender_allowed(&config.accounts[0], &from)
    }

    #[test]
    fn allowed_from_matching() {
        let p = ["scanner@contoso.com", "*@fabrikam.com"];
        assert!(allowed(&p, "FROM:<scanner@contoso.com>"));
        assert!(allowed(&p, "FROM:<Scanner@Contoso.com>"));
        assert!(allowed(&p, "FROM:<anyone@FABRIKAM.com>"));
        assert!(allowed(&p, "FROM:<>"));
        assert!(!allowed(&p, "FROM:<ceo@contoso.com>"));
        assert!(!allowed(&p, "FROM:<x@sub.fabrikam.com>"));
        // The quoted local part is the whole local part, at contoso.com: not fabrikam.
        assert!(!allowed(
            &p,
            "FROM:<\"ceo@fabrikam.com> ENVID=<\"@contoso.com>"
        ));
        assert!(allowed(
            &["*@contoso.com"],
            "FROM:<\"ceo@fabrikam.com> ENVID=<\"@contoso.com>"
        ));
        // U+212A KELVIN SIGN is not 'k'.
        assert!(!allowed(
            &["kelvin@contoso.com"],
            "FROM:<\u{212A}elvin@contoso.com> SMTPUTF8"
        ));
    }
}
