//! Who may send what: which client addresses may connect (`listen.allow_networks`), which
//! may send without AUTH and as whom (`[[relay_network]]`), the sender an account may use
//! (`allowed_from`) and the recipients it may send to (`allowed_rcpt`). Pure decisions on
//! client addresses and validated envelope values (`relay::envelope`); the listener turns a
//! refused address into 554 5.7.1, the session a refused sender or recipient into 550 5.7.1.
//!
//! The null sender `<>` (bounces, RFC 5321 4.5.5) is allowed for every account.

use crate::config::{Account, Config};
use crate::relay::envelope::{Address, Pattern, ReversePath};
use ipnet::IpNet;
use std::net::IpAddr;
use std::sync::Arc;

pub use crate::telemetry::Via;

/// Whether a client at `ip` may connect: `allow` is `listen.allow_networks` (`None`: any).
/// An IPv4 client on an IPv6 socket (`::ffff:a.b.c.d`) is matched as IPv4.
pub(crate) fn connection_allowed(allow: Option<&[IpNet]>, ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    allow.is_none_or(|nets| nets.iter().any(|n| n.contains(&ip)))
}

/// `[[relay_network]]`: the account a client address may send as without AUTH.
#[derive(Debug, Clone, Default)]
pub(crate) struct RelayNetworks {
    nets: Vec<(IpNet, Arc<Account>)>,
}

impl RelayNetworks {
    /// From the validated configuration (every `account` names an existing username).
    pub fn new(config: &Config) -> RelayNetworks {
        let mut nets = Vec::new();
        for rn in &config.relay_networks {
            let Some(account) = config.accounts.iter().find(|a| a.username == rn.account) else {
                continue;
            };
            let account = Arc::new(account.clone());
            nets.extend(rn.cidr.iter().map(|n| (*n, account.clone())));
        }
        RelayNetworks { nets }
    }

    /// The account of the most specific network holding `ip`, if any.
    pub(crate) fn account_for(&self, ip: IpAddr) -> Option<Arc<Account>> {
        let ip = ip.to_canonical();
        self.nets
            .iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, a)| a.clone())
    }
}

/// Whether `account` may send to `to` (`allowed_rcpt`: exact address or `*@domain`, ASCII
/// case folded; no list: anyone).
pub(crate) fn recipient_allowed(account: &Account, to: &Address) -> bool {
    account
        .allowed_rcpt
        .as_ref()
        .is_none_or(|list| list.iter().any(|p| Pattern::parse(p).matches(to)))
}

/// Whether `account` may send with `from` (exact address or `*@domain`, ASCII case folded).
pub(crate) fn sender_allowed(account: &Account, from: &ReversePath) -> bool {
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

    fn account(extra: &str) -> Config {
        let toml = format!(
            "{extra}\n[[account]]\nusername = \"u\"\npassword_env = \"P\"\nmailbox = \"scanner@contoso.com\"\nallowed_rcpt = [\"alerts@Fabrikam.com\", \"*@contoso.com\"]\n[account.oauth]\nflow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"c\"\nclient_secret_env = \"P\"\n[[account]]\nusername = \"v\"\npassword_env = \"P\"\nmailbox = \"v@contoso.com\"\n[account.oauth]\nflow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"c\"\nclient_secret_env = \"P\"\n"
        );
        crate::config::Config::from_toml(&toml, "t.toml", std::path::Path::new("."), &|_| {
            Some("x".into())
        })
        .expect("config")
    }

    #[test]
    fn allowed_rcpt_matching() {
        let c = account("");
        let to = |s: &str| Address::parse(s, true).expect("address");
        let a = &c.accounts[0];
        assert!(recipient_allowed(a, &to("alerts@fabrikam.com")));
        assert!(recipient_allowed(a, &to("ALERTS@FABRIKAM.COM")));
        assert!(recipient_allowed(a, &to("anyone@Contoso.com")));
        assert!(!recipient_allowed(a, &to("other@fabrikam.com")));
        assert!(!recipient_allowed(a, &to("x@sub.contoso.com")));
        assert!(!recipient_allowed(a, &to("x@contoso.com.evil")));
        // No allowed_rcpt: anyone.
        assert!(recipient_allowed(&c.accounts[1], &to("x@anywhere.example")));
    }

    #[test]
    fn networks_match_by_address_and_most_specific_wins() {
        let c = account(
            "[[relay_network]]\ncidr = [\"10.0.0.0/8\", \"fd00::/8\"]\naccount = \"v\"\n[[relay_network]]\ncidr = [\"10.0.5.0/24\", \"10.0.6.17\"]\naccount = \"u\"\n",
        );
        let nets = RelayNetworks::new(&c);
        let who = |ip: &str| {
            nets.account_for(ip.parse().expect("ip"))
                .map(|a| a.username.clone())
        };
        assert_eq!(who("10.0.5.9").as_deref(), Some("u"));
        assert_eq!(who("10.0.6.17").as_deref(), Some("u"));
        assert_eq!(who("10.0.6.18").as_deref(), Some("v"));
        assert_eq!(who("::ffff:10.0.5.1").as_deref(), Some("u"));
        assert_eq!(who("fd12::1").as_deref(), Some("v"));
        assert_eq!(who("11.0.0.1"), None);
        assert_eq!(who("127.0.0.1"), None);
        assert!(RelayNetworks::new(&account(""))
            .account_for("10.0.5.9".parse().unwrap())
            .is_none());

        let allow: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(connection_allowed(
            Some(&allow),
            "127.0.0.1".parse().unwrap()
        ));
        assert!(connection_allowed(
            Some(&allow),
            "::ffff:127.0.0.1".parse().unwrap()
        ));
        assert!(connection_allowed(Some(&allow), "::1".parse().unwrap()));
        assert!(!connection_allowed(
            Some(&allow),
            "127.0.0.2".parse().unwrap()
        ));
        assert!(connection_allowed(None, "192.0.2.1".parse().unwrap()));
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
