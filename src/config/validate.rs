//! Raw -> model: defaults, checks, and the secrets read from `*_env` / `*_file` keys.
//!
//! Every error names the file, the key and what is wrong ([`ConfigError`]); the messages are
//! what users see (`invalid configuration: bridge.toml: account[0].mailbox: is missing ...`).

/// The longest duration any `*_secs` key takes: a year (deadlines are `Instant`s, which
/// overflow far before `u64::MAX` seconds).
const MAX_SECS: u64 = 365 * 24 * 3600;

/// The error for a `*_env` key whose variable is unset. A value that is not a variable name
/// at all is not echoed: it may be the secret itself, pasted into the wrong key.
fn unset_env_message(var: &str) -> String {
    let is_name = var
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if is_name {
        format!("environment variable {var} is not set or empty")
    } else {
        "is not the name of an environment variable (letters, digits and _; the value itself is not shown)".to_string()
    }
}

use super::keys;
use super::model::*;
use super::raw::*;
use super::ConfigError;
use crate::secret::{Secret, SecretKey};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A client certificate expiring sooner than this is warned about at load (30 days).
const CERTIFICATE_WARN_SECS: i64 = 30 * 86_400;

pub(super) struct Validator<'a> {
    pub file: &'a str,
    pub base: &'a Path,
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    pub(super) fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let queue = match raw.queue {
            None => None,
            Some(q) => self.queue(q)?,
        };
        let listen = self.listen(raw.listen, !raw.relay_network.is_empty())?;
        if raw.account.is_empty() {
            return Err(self.err(
                "account",
                "no [[account]] is configured; at least one is needed",
            ));
        }
        let transport_text = raw.upstream.transport.as_deref().unwrap_or("smtp");
        let transport = TransportKind::parse(transport_text).ok_or_else(|| {
            self.err(
                "upstream.transport",
                format!("unknown value {transport_text:?}; expected \"smtp\" or \"graph\""),
            )
        })?;
        let mut accounts: Vec<Account> = Vec::with_capacity(raw.account.len());
        for (i, a) in raw.account.into_iter().enumerate() {
            let acc = self.account(i, a, transport)?;
            if accounts.iter().any(|o| o.username == acc.username) {
                return Err(self.err(
                    format!("account[{i}].username"),
                    format!("duplicate username {:?}", acc.username),
                ));
            }
            accounts.push(acc);
        }
        let relay_networks = raw
            .relay_network
            .into_iter()
            .enumerate()
            .map(|(i, n)| self.relay_network(i, n, &accounts))
            .collect::<Result<Vec<_>, _>>()?;
        let upstream = self.upstream(raw.upstream, &accounts, transport)?;
        let state = self.state(raw.state)?;
        Ok(Config {
            source: self.file.to_string(),
            listen,
            upstream,
            state,
            queue,
            relay_networks,
            accounts,
        })
    }

    fn relay_network(
        &self,
        i: usize,
        n: RawRelayNetwork,
        accounts: &[Account],
    ) -> Result<RelayNetwork, ConfigError> {
        let k = |key: &str| format!("relay_network[{i}].{key}");
        let cidr = match n.cidr {
            Some(c) if !c.is_empty() => self.networks(&k("cidr"), &c)?,
            _ => {
                return Err(self.err(
                    k("cidr"),
                    "is missing: list the networks whose clients may send without AUTH (e.g. [\"10.0.5.0/24\"])",
                ))
            }
        };
        let account = n
            .account
            .filter(|a| !a.is_empty())
            .ok_or_else(|| self.err(k("account"), "is missing (the account to send as)"))?;
        if !accounts.iter().any(|a| a.username == account) {
            return Err(self.err(
                k("account"),
                format!("{account:?} is not the username of any [[account]]"),
            ));
        }
        Ok(RelayNetwork { cidr, account })
    }

    fn queue(&self, q: RawQueue) -> Result<Option<Queue>, ConfigError> {
        match q.mode.as_deref() {
            Some("spool") => {}
            Some("sync") => return Ok(None),
            None => {
                return Err(self.err(
                    "queue.mode",
                    "is missing; set mode = \"spool\" (or remove [queue] to relay synchronously)",
                ))
            }
            Some(other) => {
                return Err(self.err(
                    "queue.mode",
                    format!("unknown mode {other:?}; expected \"spool\" or \"sync\""),
                ))
            }
        }
        let secs = |key: &str, v: Option<u64>, d: u64| self.secs(key, v, d);
        let retry_min = secs("queue.retry_min_secs", q.retry_min_secs, 30)?;
        let retry_max = secs("queue.retry_max_secs", q.retry_max_secs, 1800)?;
        if retry_max < retry_min {
            return Err(self.err(
                "queue.retry_max_secs",
                "must not be smaller than retry_min_secs",
            ));
        }
        let max_bytes = q.max_bytes.unwrap_or(DEFAULT_QUEUE_MAX_BYTES);
        if max_bytes == 0 {
            return Err(self.err(
                "queue.max_bytes",
                "must be at least 1 (0 would refuse every message)",
            ));
        }
        Ok(Some(Queue {
            max_age: secs("queue.max_age_secs", q.max_age_secs, 86_400)?,
            max_bytes,
            retry_min,
            retry_max,
            bounce: q.bounce.unwrap_or(false),
        }))
    }

    fn state(&self, s: RawState) -> Result<State, ConfigError> {
        let key = match (s.key_file, s.key_env) {
            (Some(_), Some(_)) => {
                return Err(self.err("state.key_file", "set either key_file or key_env, not both"))
            }
            (Some(p), None) => {
                let p = self.path(&p);
                let text = std::fs::read_to_string(&p).map_err(|e| {
                    self.err(
                        "state.key_file",
                        format!("cannot read {}: {e}", p.display()),
                    )
                })?;
                let value = SecretKey::from_base64(&text)
                    .map_err(|r| self.err("state.key_file", format!("{}: {r}", p.display())))?;
                Some(Sourced {
                    source: SecretSource::File(p),
                    value,
                })
            }
            (None, Some(var)) => match (self.env)(&var) {
                Some(v) if !v.is_empty() => {
                    let value = SecretKey::from_base64(&v).map_err(|r| {
                        self.err("state.key_env", format!("environment variable {var} {r}"))
                    })?;
                    Some(Sourced {
                        source: SecretSource::Env(var),
                        value,
                    })
                }
                _ => return Err(self.err("state.key_env", unset_env_message(&var))),
            },
            (None, None) => None,
        };
        Ok(State {
            dir: self.path(&s.dir.unwrap_or_else(|| PathBuf::from("state"))),
            key,
        })
    }

    /// A positive number of seconds (default `d`), at most [`MAX_SECS`].
    fn secs(&self, key: &str, v: Option<u64>, d: u64) -> Result<Duration, ConfigError> {
        match v.unwrap_or(d) {
            0 => Err(self.err(key, "must be greater than 0")),
            n if n > MAX_SECS => Err(self.err(key, "must be at most 31536000 (one year)")),
            n => Ok(Duration::from_secs(n)),
        }
    }

    fn count(&self, key: &str, v: Option<u64>, default: usize) -> Result<usize, ConfigError> {
        match v {
            None => Ok(default),
            Some(0) => Err(self.err(key, "must be greater than 0")),
            Some(n) => usize::try_from(n).map_err(|_| self.err(key, "is too large")),
        }
    }

    /// `IP:port` addresses of a listener key; `key[i]` names an entry of a list.
    fn addrs(
        &self,
        key: &str,
        texts: Vec<String>,
        indexed: bool,
    ) -> Result<Vec<SocketAddr>, ConfigError> {
        let mut out = Vec::with_capacity(texts.len());
        for (i, t) in texts.into_iter().enumerate() {
            let k = if indexed {
                format!("{key}[{i}]")
            } else {
                key.to_string()
            };
            let a: SocketAddr = t
                .parse()
                .map_err(|_| self.err(k, format!("{t:?} is not an IP:port address")))?;
            out.push(a);
        }
        Ok(out)
    }

    /// CIDR blocks (`10.0.5.0/24`, `fd00::/8`; a bare address is one host).
    fn networks(&self, key: &str, texts: &[String]) -> Result<Vec<IpNet>, ConfigError> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                parse_network(t).ok_or_else(|| {
                    self.err(
                        format!("{key}[{i}]"),
                        format!("{t:?} is not a network (e.g. \"10.0.5.0/24\" or \"fd00::/8\")"),
                    )
                })
            })
            .collect()
    }

    fn listen(&self, l: RawListen, relay_networks: bool) -> Result<Listen, ConfigError> {
        let (smtp_texts, indexed) = match l.smtp {
            None => (vec!["127.0.0.1:2525".to_string()], false),
            Some(OneOrMany::One(s)) => (vec![s], false),
            Some(OneOrMany::Many(v)) => (v, true),
        };
        let smtp = self.addrs("listen.smtp", smtp_texts, indexed)?;
        let smtps = self.addrs("listen.smtps", l.smtps.unwrap_or_default(), true)?;
        if smtp.is_empty() && smtps.is_empty() {
            return Err(self.err(
                "listen.smtp",
                "no listener is configured; set listen.smtp or listen.smtps",
            ));
        }
        let mut seen: Vec<SocketAddr> = Vec::new();
        for (key, a) in smtp
            .iter()
            .map(|a| ("listen.smtp", a))
            .chain(smtps.iter().map(|a| ("listen.smtps", a)))
        {
            // Port 0 (any free port) may be asked for more than once.
            if a.port() != 0 && seen.contains(a) {
                return Err(self.err(key, format!("{a} is listed more than once")));
            }
            seen.push(*a);
        }
        let allow_networks = match l.allow_networks {
            None => None,
            Some(v) if v.is_empty() => {
                return Err(self.err(
                    "listen.allow_networks",
                    "is empty, so no client could connect; remove the key to allow any address",
                ))
            }
            Some(v) => Some(self.networks("listen.allow_networks", &v)?),
        };
        let admin = match l.admin {
            None => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| {
                self.err("listen.admin", format!("{a:?} is not an IP:port address"))
            })?),
        };
        let tls_text = l.tls.as_deref().unwrap_or("off");
        let tls = ListenTls::parse(tls_text).ok_or_else(|| {
            self.err(
                "listen.tls",
                format!("unknown value {tls_text:?}; expected \"off\" or \"starttls\""),
            )
        })?;
        let tls_cert = self.path(&l.tls_cert.unwrap_or_else(|| "certs/bridge.crt".into()));
        let tls_key = self.path(&l.tls_key.unwrap_or_else(|| "certs/bridge.key".into()));
        if tls == ListenTls::StartTls || !smtps.is_empty() {
            match (tls_cert.exists(), tls_key.exists()) {
                (true, true) | (false, false) => {}
                (true, false) => {
                    return Err(self.err(
                        "listen.tls_key",
                        format!(
                            "{} is missing while listen.tls_cert exists",
                            tls_key.display()
                        ),
                    ))
                }
                (false, true) => {
                    return Err(self.err(
                        "listen.tls_cert",
                        format!(
                            "{} is missing while listen.tls_key exists",
                            tls_cert.display()
                        ),
                    ))
                }
            }
            for (key, p) in [("listen.tls_cert", &tls_cert), ("listen.tls_key", &tls_key)] {
                if p.exists() {
                    std::fs::read(p)
                        .map_err(|e| self.err(key, format!("cannot read {}: {e}", p.display())))?;
                }
            }
        }
        let exposed = smtp.iter().find(|a| !a.ip().is_loopback());
        let require_tls_for_auth = l.require_tls_for_auth.unwrap_or(exposed.is_some());
        // With implicit-TLS listeners clients authenticate there; with relay networks the
        // plain listener may serve devices that never AUTH.
        if require_tls_for_auth && tls == ListenTls::Off && smtps.is_empty() && !relay_networks {
            let default = match exposed {
                Some(a) if l.require_tls_for_auth.is_none() => {
                    format!(" (the default when listen.smtp {a} is not a loopback address)")
                }
                _ => String::new(),
            };
            return Err(self.err(
                "listen.require_tls_for_auth",
                format!(
                    "is true{default} but listen.tls is \"off\", so no client could authenticate; set listen.tls = \"starttls\", add listen.smtps listeners, or set require_tls_for_auth = false"
                ),
            ));
        }
        Ok(Listen {
            smtp,
            smtps,
            allow_networks,
            admin,
            tls,
            tls_cert,
            tls_key,
            require_tls_for_auth,
            max_message_bytes: self.count(
                "listen.max_message_bytes",
                l.max_message_bytes,
                DEFAULT_MAX_MESSAGE_BYTES,
            )?,
            max_recipients: self.count(
                "listen.max_recipients",
                l.max_recipients,
                DEFAULT_MAX_RECIPIENTS,
            )?,
            max_connections: self.count(
                "listen.max_connections",
                l.max_connections,
                DEFAULT_MAX_CONNECTIONS,
            )?,
            shutdown_grace: match l.shutdown_grace_secs {
                // 0 is allowed: no grace period.
                Some(0) => Duration::ZERO,
                v => self.secs("listen.shutdown_grace_secs", v, 30)?,
            },
            command_timeout: self.secs(
                "listen.command_timeout_secs",
                l.command_timeout_secs,
                300,
            )?,
            session_timeout: self.secs(
                "listen.session_timeout_secs",
                l.session_timeout_secs,
                3600,
            )?,
        })
    }

    fn upstream(
        &self,
        u: RawUpstream,
        accounts: &[Account],
        transport: TransportKind,
    ) -> Result<Upstream, ConfigError> {
        let provider = accounts
            .first()
            .map_or(Provider::Microsoft, |a| a.oauth.provider);
        let security_text = u.security.as_deref().unwrap_or("starttls");
        let security = UpstreamSecurity::parse(security_text).ok_or_else(|| {
            self.err(
                "upstream.security",
                format!("unknown value {security_text:?}; expected \"starttls\" or \"tls\" (plaintext is never allowed)"),
            )
        })?;
        let host = u.host.unwrap_or_else(|| provider.smtp_host().to_string());
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(self.err("upstream.host", format!("{host:?} is not a host name")));
        }
        let port = u.port.unwrap_or(match security {
            UpstreamSecurity::StartTls => 587,
            UpstreamSecurity::Tls => 465,
        });
        if port == 0 {
            return Err(self.err("upstream.port", "must be greater than 0"));
        }
        let ca_file = match u.ca_file {
            None => None,
            Some(p) => {
                let p = self.path(&p);
                let pem = std::fs::read(&p).map_err(|e| {
                    self.err(
                        "upstream.ca_file",
                        format!("cannot read {}: {e}", p.display()),
                    )
                })?;
                let certs = rustls_pemfile::certs(&mut pem.as_slice())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        self.err(
                            "upstream.ca_file",
                            format!("{} is not PEM: {e}", p.display()),
                        )
                    })?;
                if certs.is_empty() {
                    return Err(self.err(
                        "upstream.ca_file",
                        format!("{} contains no PEM certificate", p.display()),
                    ));
                }
                Some(p)
            }
        };
        // The preset of the first account whose provider has a Graph (Google has none and
        // is refused with graph at the account).
        let graph_preset = accounts
            .iter()
            .find_map(|a| a.oauth.provider.graph_url())
            .or(Provider::Microsoft.graph_url())
            .unwrap_or_default();
        let graph_url = u
            .graph_url
            .unwrap_or_else(|| graph_preset.to_string())
            .trim_end_matches('/')
            .to_string();
        check_endpoint_url(&graph_url)
            .map_err(|reason| self.err("upstream.graph_url", reason.to_string()))?;
        let secs = |key: &str, v: Option<u64>, d: u64| self.secs(key, v, d);
        let max_sessions_per_mailbox = self.count(
            "upstream.max_sessions_per_mailbox",
            u.max_sessions_per_mailbox,
            DEFAULT_MAX_SESSIONS_PER_MAILBOX,
        )?;
        let warm_sessions = match u.warm_sessions {
            None => 0,
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| *n <= max_sessions_per_mailbox)
                .ok_or_else(|| {
                    self.err(
                        "upstream.warm_sessions",
                        format!(
                            "is {n}, more than upstream.max_sessions_per_mailbox ({max_sessions_per_mailbox}): warm sessions count in that cap"
                        ),
                    )
                })?,
        };
        Ok(Upstream {
            transport,
            graph_url,
            save_to_sent_items: u.save_to_sent_items.unwrap_or(false),
            host,
            port,
            security,
            ca_file,
            timeout: secs("upstream.timeout_secs", u.timeout_secs, 60)?,
            max_sessions_per_mailbox,
            idle: secs("upstream.idle_secs", u.idle_secs, 30)?,
            warm_sessions,
            messages_per_minute: u.messages_per_minute.unwrap_or(30),
        })
    }

    fn account(
        &self,
        i: usize,
        a: RawAccount,
        default_transport: TransportKind,
    ) -> Result<Account, ConfigError> {
        let k = |key: &str| format!("account[{i}].{key}");
        let username = a
            .username
            .filter(|u| !u.is_empty())
            .ok_or_else(|| self.err(k("username"), "is missing"))?;
        if username
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
            || username.contains(['/', '\\'])
        {
            return Err(self.err(
                k("username"),
                format!("{username:?} may not contain spaces, control characters or slashes"),
            ));
        }
        let password = match (a.password_hash, a.password_env) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    k("password_hash"),
                    "set either password_hash or password_env, not both",
                ))
            }
            (None, None) => {
                return Err(self.err(
                    k("password_hash"),
                    "is missing: set password_hash (from `smtp-oauth-bridge hash-password`) or password_env",
                ))
            }
            (Some(h), None) => {
                argon2::PasswordHash::new(&h).map_err(|e| {
                    self.err(k("password_hash"), format!("is not a PHC password hash ({e}); create one with `smtp-oauth-bridge hash-password`"))
                })?;
                LocalPassword::Hash(Secret::new(h))
            }
            (None, Some(var)) => match (self.env)(&var) {
                Some(v) if !v.is_empty() => LocalPassword::Plain(EnvSecret {
                    var,
                    value: Secret::new(v),
                }),
                _ => {
                    return Err(self.err(
                        k("password_env"),
                        unset_env_message(&var),
                    ))
                }
            },
        };
        let mailbox = a.mailbox.ok_or_else(|| {
            self.err(
                k("mailbox"),
                "is missing (the Microsoft 365 mailbox to send as)",
            )
        })?;
        if !is_address(&mailbox) {
            return Err(self.err(k("mailbox"), format!("{mailbox:?} is not an email address")));
        }
        let allowed_from = a.allowed_from.unwrap_or_else(|| vec![mailbox.clone()]);
        self.patterns(&k("allowed_from"), &allowed_from)?;
        if let Some(rcpt) = &a.allowed_rcpt {
            if rcpt.is_empty() {
                return Err(self.err(
                    k("allowed_rcpt"),
                    "is empty, so the account could send to no one; remove the key to allow any recipient",
                ));
            }
            self.patterns(&k("allowed_rcpt"), rcpt)?;
        }
        let transport = match a.transport.as_deref() {
            None => default_transport,
            Some(t) => TransportKind::parse(t).ok_or_else(|| {
                self.err(
                    k("transport"),
                    format!("unknown value {t:?}; expected \"smtp\" or \"graph\""),
                )
            })?,
        };
        let oauth = self.oauth(i, a.oauth.unwrap_or_default(), &mailbox, transport)?;
        if transport == TransportKind::Graph && oauth.provider.graph_url().is_none() {
            let key = if a.transport.is_some() {
                k("transport")
            } else {
                "upstream.transport".to_string()
            };
            return Err(self.err(
                key,
                format!(
                    "account {username:?} uses provider {:?}, which has no Microsoft Graph; use transport = \"smtp\" for it",
                    oauth.provider.as_str()
                ),
            ));
        }
        Ok(Account {
            transport,
            username,
            password,
            mailbox,
            allowed_from,
            allowed_rcpt: a.allowed_rcpt,
            oauth,
        })
    }

    /// Each entry an address or `*@domain` (`allowed_from`, `allowed_rcpt`).
    fn patterns(&self, key: &str, list: &[String]) -> Result<(), ConfigError> {
        for (j, f) in list.iter().enumerate() {
            let ok = match f.strip_prefix("*@") {
                Some(domain) => !domain.is_empty() && is_address(&format!("x@{domain}")),
                None => is_address(f),
            };
            if !ok {
                return Err(self.err(
                    format!("{key}[{j}]"),
                    format!("{f:?} is not an address or \"*@domain\""),
                ));
            }
        }
        Ok(())
    }

    fn oauth(
        &self,
        i: usize,
        o: RawOAuth,
        mailbox: &str,
        transport: TransportKind,
    ) -> Result<OAuth, ConfigError> {
        let k = |key: &str| format!("account[{i}].oauth.{key}");
        let provider_name = o.provider.unwrap_or_else(|| "microsoft".into());
        let provider = Provider::parse(&provider_name).ok_or_else(|| {
            self.err(
                k("provider"),
                format!("unknown provider {provider_name:?}; expected microsoft, microsoft-us-gov, microsoft-china or google"),
            )
        })?;
        let flow_name = o.flow.unwrap_or_else(|| "authorization_code".into());
        let flow = Flow::parse(&flow_name).ok_or_else(|| {
            self.err(
                k("flow"),
                format!("unknown flow {flow_name:?}; expected authorization_code, device_code, client_credentials or service_account"),
            )
        })?;
        let service_account = match (flow, o.service_account_key_file) {
            (Flow::ServiceAccount, _) if provider != Provider::Google => {
                return Err(self.err(
                    k("flow"),
                    "service_account is for provider = \"google\" (Microsoft: client_credentials with a certificate)",
                ))
            }
            (Flow::ServiceAccount, None) => {
                return Err(self.err(
                    k("service_account_key_file"),
                    "is missing: flow service_account needs the service account's JSON key file",
                ))
            }
            (Flow::ServiceAccount, Some(p)) => Some(
                keys::service_account(&self.path(&p), mailbox)
                    .map_err(|e| self.err(k("service_account_key_file"), e.to_string()))?,
            ),
            (_, Some(_)) => {
                return Err(self.err(
                    k("service_account_key_file"),
                    "is only used with flow = \"service_account\"",
                ))
            }
            (_, None) => None,
        };
        let credential_keys = [
            ("client_secret_env", o.client_secret_env.is_some()),
            ("client_secret_file", o.client_secret_file.is_some()),
            (
                "client_certificate_file",
                o.client_certificate_file.is_some(),
            ),
            ("client_assertion_file", o.client_assertion_file.is_some()),
        ];
        let set: Vec<&str> = credential_keys
            .iter()
            .filter(|(_, on)| *on)
            .map(|(key, _)| *key)
            .collect();
        if set.len() > 1 && set[..2] != ["client_secret_env", "client_secret_file"] {
            return Err(self.err(
                k(set[1]),
                format!(
                    "set at most one of client_secret_env, client_secret_file, client_certificate_file and client_assertion_file ({} is set too)",
                    set[0]
                ),
            ));
        }
        if let (Some(sa), Some(other)) = (&service_account, set.first()) {
            return Err(self.err(
                k(other),
                format!(
                    "flow service_account authenticates with service_account_key_file ({}); remove {other}",
                    sa.path.display()
                ),
            ));
        }
        let client_id = o
            .client_id
            .filter(|c| !c.is_empty())
            .or_else(|| service_account.as_ref().map(|sa| sa.client_email.clone()))
            .ok_or_else(|| {
                self.err(
                    k("client_id"),
                    "is missing (the application (client) ID of the app registration)",
                )
            })?;
        let client_certificate = match o.client_certificate_file {
            None => None,
            Some(p) => {
                let c = keys::client_certificate(&self.path(&p), crate::clock::unix_now())
                    .map_err(|e| self.err(k("client_certificate_file"), e.to_string()))?;
                let left = c.not_after - i64::try_from(crate::clock::unix_now()).unwrap_or(0);
                if left < CERTIFICATE_WARN_SECS {
                    tracing::warn!(
                        file = self.file,
                        key = k("client_certificate_file"),
                        path = %c.path.display(),
                        days_left = left / 86_400,
                        "the client certificate expires in less than 30 days: make and upload a new one"
                    );
                }
                if !c.key_matches {
                    tracing::warn!(
                        file = self.file,
                        key = k("client_certificate_file"),
                        path = %c.path.display(),
                        "the private key is not the certificate's key: the token endpoint will refuse the assertions"
                    );
                }
                Some(c)
            }
        };
        let client_assertion_file = o.client_assertion_file.map(|p| self.path(&p));
        let tenant = match o.tenant {
            Some(t) if !t.is_empty() => t,
            _ if flow == Flow::ClientCredentials
                && provider.is_microsoft()
                && o.token_url.is_none() =>
            {
                return Err(self.err(
                    k("tenant"),
                    "is missing: client_credentials needs the tenant (e.g. contoso.onmicrosoft.com or its ID)",
                ))
            }
            _ => "organizations".to_string(),
        };
        let client_secret = match (o.client_secret_env, o.client_secret_file) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    k("client_secret_env"),
                    "set either client_secret_env or client_secret_file, not both",
                ))
            }
            (Some(var), None) => match (self.env)(&var) {
                Some(v) if !v.is_empty() => Some(Sourced {
                    source: SecretSource::Env(var),
                    value: Secret::new(v),
                }),
                _ => return Err(self.err(k("client_secret_env"), unset_env_message(&var))),
            },
            (None, Some(p)) => {
                let p = self.path(&p);
                let text = std::fs::read_to_string(&p).map_err(|e| {
                    self.err(
                        k("client_secret_file"),
                        format!("cannot read {}: {e}", p.display()),
                    )
                })?;
                let v = text.trim();
                if v.is_empty() {
                    return Err(
                        self.err(k("client_secret_file"), format!("{} is empty", p.display()))
                    );
                }
                Some(Sourced {
                    value: Secret::new(v),
                    source: SecretSource::File(p),
                })
            }
            (None, None) => None,
        };
        if flow == Flow::ClientCredentials
            && client_secret.is_none()
            && client_certificate.is_none()
            && client_assertion_file.is_none()
        {
            return Err(self.err(
                k("client_secret_env"),
                "is missing: client_credentials needs a client secret, a certificate or a federated assertion (client_secret_env, client_secret_file, client_certificate_file or client_assertion_file)",
            ));
        }
        let scopes = o.scopes.unwrap_or_else(|| {
            provider
                .default_scopes(flow, transport)
                .iter()
                .map(|s| s.to_string())
                .collect()
        });
        if scopes.is_empty() {
            return Err(self.err(k("scopes"), "must name at least one scope"));
        }
        let url = |key: &str, v: Option<String>, preset: String| -> Result<String, ConfigError> {
            let u = v.unwrap_or(preset);
            check_endpoint_url(&u).map_err(|reason| self.err(k(key), reason.to_string()))?;
            Ok(u)
        };
        let token_url_preset = service_account
            .as_ref()
            .and_then(|sa| sa.token_uri.clone())
            .unwrap_or_else(|| provider.token_url(&tenant));
        Ok(OAuth {
            token_url: url("token_url", o.token_url, token_url_preset)?,
            authorize_url: url(
                "authorize_url",
                o.authorize_url,
                provider.authorize_url(&tenant),
            )?,
            device_authorization_url: url(
                "device_authorization_url",
                o.device_authorization_url,
                provider.device_authorization_url(&tenant),
            )?,
            provider,
            tenant,
            flow,
            client_id,
            client_secret,
            client_certificate,
            client_assertion_file,
            service_account,
            scopes,
            redirect_port: o.redirect_port.unwrap_or(0),
        })
    }
}

/// Why an endpoint URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum UrlError {
    #[error("{0:?} is not an absolute URL")]
    NotAbsolute(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?} must not contain a user name or password (user@host)")]
    Userinfo(String),
    #[error("{0:?} must use https (plain http is only allowed for loopback addresses)")]
    PlainHttp(String),
    #[error("{0:?} must be an https URL")]
    NotHttps(String),
}

/// An endpoint URL must be https, except on loopback (tests, local identity providers).
/// Decided on the URL as the url crate (and so reqwest) parses it, never on the text: a
/// userinfo part (`http://127.0.0.1:1@example.com/`) is refused outright, and "loopback"
/// means the parsed host is an IP literal in 127.0.0.0/8 or ::1, or exactly `localhost`.
fn check_endpoint_url(u: &str) -> Result<(), UrlError> {
    let parsed = url::Url::parse(u).map_err(|_| UrlError::NotAbsolute(u.to_string()))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UrlError::Userinfo(u.to_string()));
    }
    let Some(host) = parsed.host() else {
        return Err(UrlError::NoHost(u.to_string()));
    };
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(&host) => Ok(()),
        "http" => Err(UrlError::PlainHttp(u.to_string())),
        _ => Err(UrlError::NotHttps(u.to_string())),
    }
}

fn is_loopback_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => *d == "localhost",
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    }
}

/// A CIDR block, or a bare address as a one-host network.
fn parse_network(t: &str) -> Option<IpNet> {
    let t = t.trim();
    t.parse::<IpNet>()
        .ok()
        .or_else(|| t.parse::<IpAddr>().ok().map(IpNet::from))
}

/// A plain `local@domain` check: one '@', both sides non-empty, no spaces or angle brackets.
fn is_address(s: &str) -> bool {
    match s.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !s
                    .contains(|c: char| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Jp1ow0uvWhc1W3f1KrGmwcdG7OcaI+UEmOsLVYaHy6k";

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, "bridge.toml", Path::new("/etc/b"), &|v| match v {
            "PW" => Some("local-pw".into()),
            "SECRET" => Some("client-secret".into()),
            _ => None,
        })
    }

    fn account(extra: &str) -> String {
        format!(
            "[[account]]\nusername = \"scanner\"\npassword_hash = \"{HASH}\"\nmailbox = \"scanner@contoso.com\"\n{extra}\n[account.oauth]\ntenant = \"contoso.onmicrosoft.com\"\nflow = \"client_credentials\"\nclient_id = \"abc\"\nclient_secret_env = \"SECRET\"\n"
        )
    }

    #[test]
    fn graph_transport_keys_presets_and_errors() {
        let c = load(&account("")).expect("valid");
        assert_eq!(c.upstream.transport, TransportKind::Smtp);
        assert_eq!(c.upstream.graph_url, "https://graph.microsoft.com");
        assert!(!c.upstream.save_to_sent_items);
        assert_eq!(c.accounts[0].transport, TransportKind::Smtp);
        // upstream.transport = graph: Graph scopes by default.
        let c = load(&format!(
            "[upstream]\ntransport = \"graph\"\nsave_to_sent_items = true\n{}",
            account("")
        ))
        .expect("valid");
        assert_eq!(c.accounts[0].transport, TransportKind::Graph);
        assert!(c.upstream.save_to_sent_items);
        assert_eq!(
            c.accounts[0].oauth.scopes,
            ["https://graph.microsoft.com/.default"]
        );
        // Per-account override, both ways; the override decides the default scopes.
        let c = load(&format!(
            "[upstream]\ntransport = \"graph\"\n{}",
            account("transport = \"smtp\"")
        ))
        .expect("valid");
        assert_eq!(c.accounts[0].transport, TransportKind::Smtp);
        assert_eq!(
            c.accounts[0].oauth.scopes,
            ["https://outlook.office365.com/.default"]
        );
        let delegated = format!(
            "[[account]]\nusername = \"d\"\npassword_hash = \"{HASH}\"\nmailbox = \"d@contoso.com\"\ntransport = \"graph\"\n[account.oauth]\nflow = \"device_code\"\nclient_id = \"abc\"\n"
        );
        let c = load(&delegated).expect("valid");
        assert_eq!(
            c.accounts[0].oauth.scopes,
            ["https://graph.microsoft.com/Mail.Send", "offline_access"]
        );
        // Presets per cloud; an override must be https (or loopback http).
        let gov = delegated.replace(
            "[account.oauth]\n",
            "[account.oauth]\nprovider = \"microsoft-us-gov\"\n",
        );
        assert_eq!(
            load(&gov).unwrap().upstream.graph_url,
            "https://graph.microsoft.us"
        );
        let cn = delegated.replace(
            "[account.oauth]\n",
            "[account.oauth]\nprovider = \"microsoft-china\"\n",
        );
        assert_eq!(
            load(&cn).unwrap().upstream.graph_url,
            "https://microsoftgraph.chinacloudapi.cn"
        );
        let c = load(&format!(
            "[upstream]\ngraph_url = \"http://127.0.0.1:8080/\"\n{}",
            account("")
        ))
        .expect("valid");
        assert_eq!(c.upstream.graph_url, "http://127.0.0.1:8080");
        for (text, key, words) in [
            (
                format!(
                    "[upstream]\ngraph_url = \"http://graph.example.com\"\n{}",
                    account("")
                ),
                "upstream.graph_url",
                "must use https",
            ),
            (
                format!("[upstream]\ntransport = \"ews\"\n{}", account("")),
                "upstream.transport",
                "expected \"smtp\" or \"graph\"",
            ),
            (
                account("transport = \"http\""),
                "account[0].transport",
                "expected \"smtp\" or \"graph\"",
            ),
            (
                delegated.replace(
                    "[account.oauth]\n",
                    "[account.oauth]\nprovider = \"google\"\n",
                ),
                "account[0].transport",
                "has no Microsoft Graph",
            ),
            (
                format!(
                    "[upstream]\ntransport = \"graph\"\n{}",
                    delegated.replace("transport = \"graph\"\n", "").replace(
                        "[account.oauth]\n",
                        "[account.oauth]\nprovider = \"google\"\n"
                    )
                ),
                "upstream.transport",
                "has no Microsoft Graph",
            ),
        ] {
            let e = load(&text).expect_err(&text);
            assert_eq!(e.file, "bridge.toml", "{e}");
            assert_eq!(e.key, key, "{e}");
            assert!(e.reason.contains(words), "{e}");
        }
        // The environment sets them too.
        let vars: Vec<(String, String)> = [
            ("SMTP_OAUTH_BRIDGE_UPSTREAM__TRANSPORT", "graph"),
            ("SMTP_OAUTH_BRIDGE_UPSTREAM__SAVE_TO_SENT_ITEMS", "true"),
            ("SMTP_OAUTH_BRIDGE_ACCOUNT__0__TRANSPORT", "smtp"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let text = account("");
        let env = |v: &str| (v == "SECRET").then(|| "client-secret".to_string());
        let c = Config::from_parts(Some(&text), "bridge.toml", Path::new("/etc/b"), &vars, &env)
            .expect("valid");
        assert_eq!(c.upstream.transport, TransportKind::Graph);
        assert!(c.upstream.save_to_sent_items);
        assert_eq!(c.accounts[0].transport, TransportKind::Smtp);
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = load(&account("")).expect("valid");
        assert_eq!(c.listen.smtp, vec!["127.0.0.1:2525".parse().unwrap()]);
        assert!(c.listen.smtps.is_empty());
        assert!(c.listen.allow_networks.is_none());
        assert!(c.relay_networks.is_empty());
        assert_eq!(c.accounts[0].allowed_rcpt, None);
        assert!(!c.listen.require_tls_for_auth);
        assert_eq!(c.listen.max_message_bytes, 36_700_160);
        assert_eq!(c.listen.max_recipients, 500);
        assert_eq!(c.upstream.host, "smtp.office365.com");
        assert_eq!(c.upstream.port, 587);
        assert_eq!(c.upstream.max_sessions_per_mailbox, 3);
        assert_eq!(c.state.dir, Path::new("/etc/b/state"));
        let a = &c.accounts[0];
        assert_eq!(a.allowed_from, vec!["scanner@contoso.com".to_string()]);
        assert_eq!(
            a.oauth.token_url,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(
            a.oauth.scopes,
            vec!["https://outlook.office365.com/.default".to_string()]
        );
        assert_eq!(
            a.oauth.client_secret.as_ref().map(|s| s.expose()),
            Some("client-secret")
        );
    }

    #[test]
    fn queue_max_bytes_defaults_to_one_gib_and_zero_is_refused() {
        let q = load(&format!("[queue]\nmode = \"spool\"\n{}", account("")))
            .expect("valid")
            .queue
            .expect("spool mode");
        assert_eq!(q.max_bytes, 1 << 30);
        let q = load(&format!(
            "[queue]\nmode = \"spool\"\nmax_bytes = 5000\n{}",
            account("")
        ))
        .expect("valid")
        .queue
        .expect("spool mode");
        assert_eq!(q.max_bytes, 5000);
        let e = load(&format!(
            "[queue]\nmode = \"spool\"\nmax_bytes = 0\n{}",
            account("")
        ))
        .unwrap_err();
        assert_eq!(e.key, "queue.max_bytes");
    }

    #[test]
    fn warm_sessions_default_to_none_and_fit_in_the_session_cap() {
        let c = load(&account("")).expect("valid");
        assert_eq!(c.upstream.warm_sessions, 0);
        let c = load(&format!("[upstream]\nwarm_sessions = 3\n{}", account(""))).expect("valid");
        assert_eq!(c.upstream.warm_sessions, 3);
        let e = load(&format!("[upstream]\nwarm_sessions = 4\n{}", account(""))).unwrap_err();
        assert_eq!(
            (e.file.as_str(), e.key.as_str()),
            ("bridge.toml", "upstream.warm_sessions")
        );
        assert!(
            e.reason
                .contains("is 4, more than upstream.max_sessions_per_mailbox (3)"),
            "{e}"
        );
        let e = load(&format!(
            "[upstream]\nmax_sessions_per_mailbox = 1\nwarm_sessions = 2\n{}",
            account("")
        ))
        .unwrap_err();
        assert_eq!(e.key, "upstream.warm_sessions");
        assert!(e.reason.contains("(1)"), "{e}");
        // From the environment too, named by its variable.
        let env = |v: &str| (v == "SECRET").then(|| "client-secret".to_string());
        let var = |n: &str| {
            vec![(
                "SMTP_OAUTH_BRIDGE_UPSTREAM__WARM_SESSIONS".to_string(),
                n.to_string(),
            )]
        };
        let text = account("");
        let from_env = |n: &str| {
            Config::from_parts(
                Some(&text),
                "bridge.toml",
                Path::new("/etc/b"),
                &var(n),
                &env,
            )
        };
        assert_eq!(from_env("2").expect("valid").upstream.warm_sessions, 2);
        let e = from_env("9").unwrap_err();
        assert_eq!(e.key, "upstream.warm_sessions", "{e}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = load(&format!("[listen]\nsmpt = \"x\"\n{}", account(""))).unwrap_err();
        assert_eq!(e.file, "bridge.toml:2");
        assert!(e.reason.contains("unknown field `smpt`"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let cases: Vec<(String, &str, &str)> = vec![
            (
                account("").replace("mailbox = \"scanner@contoso.com\"\n", ""),
                "account[0].mailbox",
                "missing",
            ),
            (
                account("").replace("scanner@contoso.com", "not-an-address"),
                "account[0].mailbox",
                "not an email address",
            ),
            (
                account("").replace(&format!("password_hash = \"{HASH}\"\n"), ""),
                "account[0].password_hash",
                "missing",
            ),
            (
                account("").replace(HASH, "plain"),
                "account[0].password_hash",
                "PHC",
            ),
            (
                format!("{}{}", account(""), account("")),
                "account[1].username",
                "duplicate",
            ),
            (
                format!("[listen]\nsmtp = \"localhost\"\n{}", account("")),
                "listen.smtp",
                "not an IP:port",
            ),
            (
                format!("[listen]\nsmtp = \"0.0.0.0:25\"\n{}", account("")),
                "listen.require_tls_for_auth",
                "no client could authenticate",
            ),
            (
                format!(
                    "[upstream]\nca_file = \"/nonexistent/ca.pem\"\n{}",
                    account("")
                ),
                "upstream.ca_file",
                "cannot read /nonexistent/ca.pem",
            ),
            (
                format!("[upstream]\nsecurity = \"none\"\n{}", account("")),
                "upstream.security",
                "plaintext is never allowed",
            ),
            (
                account("password_env = \"UNSET\"")
                    .replace(&format!("password_hash = \"{HASH}\"\n"), ""),
                "account[0].password_env",
                "UNSET is not set",
            ),
            (
                account("allowed_from = [\"*@\"]"),
                "account[0].allowed_from[0]",
                "not an address",
            ),
            (
                account("").replace("client_secret_env = \"SECRET\"\n", ""),
                "account[0].oauth.client_secret_env",
                "needs a client secret",
            ),
            (
                format!(
                    "{}token_url = \"http://login.example.com/token\"\n",
                    account("")
                ),
                "account[0].oauth.token_url",
                "must use https",
            ),
            (String::new(), "account", "no [[account]]"),
            (
                account("password_env = \"hunter2 is my pass!\"")
                    .replace(&format!("password_hash = \"{HASH}\"\n"), ""),
                "account[0].password_env",
                "the value itself is not shown",
            ),
            (
                format!("[listen]\ncommand_timeout_secs = 9223372036854775807\n{}", account("")),
                "listen.command_timeout_secs",
                "at most 31536000",
            ),
            (
                format!("[upstream]\ntimeout_secs = 9223372036854775807\n{}", account("")),
                "upstream.timeout_secs",
                "at most 31536000",
            ),
            (
                format!("[listen]\nsmtp = [\"127.0.0.1:25\", \"x\"]\n{}", account("")),
                "listen.smtp[1]",
                "\"x\" is not an IP:port",
            ),
            (
                format!("[listen]\nsmtp = 25\n{}", account("")),
                "",
                "an address or a list of addresses",
            ),
            (
                format!("[listen]\nsmtp = []\n{}", account("")),
                "listen.smtp",
                "no listener",
            ),
            (
                format!("[listen]\nsmtps = [\"127.0.0.1:465\", \"127.0.0.1:465\"]\n{}", account("")),
                "listen.smtps",
                "127.0.0.1:465 is listed more than once",
            ),
            (
                format!("[listen]\nsmtps = [\"465\"]\n{}", account("")),
                "listen.smtps[0]",
                "not an IP:port",
            ),
            (
                format!("[listen]\nallow_networks = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n{}", account("")),
                "listen.allow_networks[1]",
                "\"10.0.0.0/33\" is not a network",
            ),
            (
                format!("[listen]\nallow_networks = []\n{}", account("")),
                "listen.allow_networks",
                "no client could connect",
            ),
            (
                format!("[[relay_network]]\ncidr = [\"10.0.5.0/24\"]\naccount = \"printer\"\n{}", account("")),
                "relay_network[0].account",
                "\"printer\" is not the username of any [[account]]",
            ),
            (
                format!("[[relay_network]]\naccount = \"scanner\"\n{}", account("")),
                "relay_network[0].cidr",
                "is missing",
            ),
            (
                format!("[[relay_network]]\ncidr = [\"10.0.5.0/24\", \"nope\"]\naccount = \"scanner\"\n{}", account("")),
                "relay_network[0].cidr[1]",
                "not a network",
            ),
            (
                account("allowed_rcpt = [\"a@b.c\", \"*@\"]"),
                "account[0].allowed_rcpt[1]",
                "not an address",
            ),
            (
                account("allowed_rcpt = []"),
                "account[0].allowed_rcpt",
                "could send to no one",
            ),
            (
                format!("[queue]\nmode = \"fifo\"\n{}", account("")),
                "queue.mode",
                "unknown mode",
            ),
            (
                format!(
                    "[queue]\nmode = \"spool\"\nretry_min_secs = 60\nretry_max_secs = 5\n{}",
                    account("")
                ),
                "queue.retry_max_secs",
                "smaller",
            ),
        ];
        for (text, key, reason) in cases {
            let e = load(&text).expect_err(key);
            if key.is_empty() {
                // A type error is the deserializer's, with the line.
                assert!(e.file.starts_with("bridge.toml:"), "{e}");
                assert!(e.reason.contains(reason), "{e}");
                continue;
            }
            assert_eq!(e.file, "bridge.toml", "{e}");
            assert_eq!(e.key, key, "{e}");
            assert!(e.reason.contains(reason), "{key}: {e}");
            assert!(
                !e.to_string().contains("hunter2"),
                "a pasted secret is echoed: {e}"
            );
        }
    }

    #[test]
    fn listeners_networks_and_recipients() {
        let c = load(&format!(
            "[listen]\nsmtp = [\"127.0.0.1:2525\", \"[::1]:25\"]\nsmtps = [\"127.0.0.1:465\"]\nallow_networks = [\"127.0.0.0/8\", \"::1/128\", \"10.0.6.17\"]\n[[relay_network]]\ncidr = [\"10.0.5.0/24\"]\naccount = \"scanner\"\n{}",
            account("allowed_rcpt = [\"*@contoso.com\", \"alerts@fabrikam.com\"]")
        ))
        .expect("valid");
        assert_eq!(
            c.listen.smtp,
            vec![
                "127.0.0.1:2525".parse::<SocketAddr>().unwrap(),
                "[::1]:25".parse().unwrap()
            ]
        );
        assert_eq!(c.listen.smtps, vec!["127.0.0.1:465".parse().unwrap()]);
        let nets: Vec<String> = c
            .listen
            .allow_networks
            .iter()
            .flatten()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["127.0.0.0/8", "::1/128", "10.0.6.17/32"]);
        assert_eq!(c.relay_networks.len(), 1);
        assert_eq!(c.relay_networks[0].account, "scanner");
        assert_eq!(
            c.relay_networks[0].cidr,
            vec!["10.0.5.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            c.accounts[0].allowed_rcpt,
            Some(vec!["*@contoso.com".into(), "alerts@fabrikam.com".into()])
        );
        // A string is one listener.
        let c = load(&format!(
            "[listen]\nsmtp = \"127.0.0.1:25\"\n{}",
            account("")
        ))
        .expect("valid");
        assert_eq!(c.listen.smtp, vec!["127.0.0.1:25".parse().unwrap()]);
        // Only implicit TLS on a public address: clients authenticate there.
        let c = load(&format!(
            "[listen]\nsmtp = []\nsmtps = [\"0.0.0.0:465\"]\n{}",
            account("")
        ))
        .expect("valid");
        assert!(c.listen.smtp.is_empty());
        // A public plain port without TLS is fine when devices relay by network (AUTH is
        // then never offered there in plaintext).
        let text = format!("[listen]\nsmtp = \"0.0.0.0:25\"\n[[relay_network]]\ncidr = [\"10.0.5.0/24\"]\naccount = \"scanner\"\n{}", account(""));
        let c = load(&text).expect("valid");
        assert!(c.listen.require_tls_for_auth);
    }

    #[test]
    fn environment_sets_the_listener_and_network_keys() {
        let vars: Vec<(String, String)> = [
            (
                "SMTP_OAUTH_BRIDGE_LISTEN__SMTP",
                "127.0.0.1:2525, 127.0.0.1:2526",
            ),
            ("SMTP_OAUTH_BRIDGE_LISTEN__SMTPS", "127.0.0.1:4465"),
            (
                "SMTP_OAUTH_BRIDGE_LISTEN__ALLOW_NETWORKS",
                "127.0.0.0/8,::1/128",
            ),
            (
                "SMTP_OAUTH_BRIDGE_RELAY_NETWORK__0__CIDR",
                "10.0.5.0/24,10.0.6.17/32",
            ),
            ("SMTP_OAUTH_BRIDGE_RELAY_NETWORK__0__ACCOUNT", "scanner"),
            (
                "SMTP_OAUTH_BRIDGE_ACCOUNT__0__ALLOWED_RCPT",
                "*@contoso.com,alerts@fabrikam.com",
            ),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let text = account("");
        let env = |v: &str| match v {
            "SECRET" => Some("client-secret".to_string()),
            _ => None,
        };
        let c = Config::from_parts(Some(&text), "bridge.toml", Path::new("/etc/b"), &vars, &env)
            .expect("valid");
        assert_eq!(
            c.listen.smtp,
            vec![
                "127.0.0.1:2525".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:2526".parse().unwrap()
            ]
        );
        assert_eq!(c.listen.smtps, vec!["127.0.0.1:4465".parse().unwrap()]);
        assert_eq!(
            c.listen.allow_networks,
            Some(vec![
                "127.0.0.0/8".parse().unwrap(),
                "::1/128".parse().unwrap()
            ])
        );
        assert_eq!(c.relay_networks.len(), 1);
        assert_eq!(c.relay_networks[0].account, "scanner");
        assert_eq!(
            c.relay_networks[0].cidr,
            vec![
                "10.0.5.0/24".parse::<IpNet>().unwrap(),
                "10.0.6.17/32".parse().unwrap()
            ]
        );
        assert_eq!(
            c.accounts[0].allowed_rcpt,
            Some(vec!["*@contoso.com".into(), "alerts@fabrikam.com".into()])
        );
        // A relay network naming no account from the environment is an error naming the key.
        let vars = vec![(
            "SMTP_OAUTH_BRIDGE_RELAY_NETWORK__1__ACCOUNT".to_string(),
            "nobody".to_string(),
        )];
        let e = Config::from_parts(Some(&text), "bridge.toml", Path::new("/etc/b"), &vars, &env)
            .unwrap_err();
        assert_eq!(e.key, "relay_network[0].cidr", "{e}");
        let vars = vec![
            (
                "SMTP_OAUTH_BRIDGE_RELAY_NETWORK__0__CIDR".to_string(),
                "10.0.5.0/24".to_string(),
            ),
            (
                "SMTP_OAUTH_BRIDGE_RELAY_NETWORK__0__ACCOUNT".to_string(),
                "nobody".to_string(),
            ),
        ];
        let e = Config::from_parts(Some(&text), "bridge.toml", Path::new("/etc/b"), &vars, &env)
            .unwrap_err();
        assert_eq!(e.key, "relay_network[0].account", "{e}");
        assert!(e.reason.contains("\"nobody\" is not the username"), "{e}");
        assert!(e.file.contains("environment"), "{e}");
    }

    #[test]
    fn loopback_http_token_url_is_allowed() {
        let c = load(&format!(
            "{}token_url = \"http://127.0.0.1:9/t/token\"\n",
            account("")
        ))
        .expect("valid");
        assert_eq!(c.accounts[0].oauth.token_url, "http://127.0.0.1:9/t/token");
    }

    #[test]
    fn endpoint_urls_are_judged_on_the_parsed_host() {
        let ok = [
            "https://login.microsoftonline.com/t/oauth2/v2.0/token",
            "HTTPS://login.example.com/token",
            "https://example.com:8443/token",
            "http://127.0.0.1:9/t/token",
            "http://127.0.0.2/token",
            "HTTP://127.0.0.1:9/t/token",
            "http://localhost:8080/token",
            "http://LOCALHOST/token",
            "http://[::1]:8080/",
        ];
        for u in ok {
            assert_eq!(check_endpoint_url(u), Ok(()), "{u}");
        }
        let userinfo = [
            "http://127.0.0.1:1@example.com/token",
            "https://127.0.0.1:1@example.com/token",
            "http://user@127.0.0.1/token",
            "http://:pw@localhost/token",
            "http://localhost@evil.example/token",
            "http://127.0.0.1%3A1@example.com/token",
        ];
        for u in userinfo {
            assert_eq!(
                check_endpoint_url(u),
                Err(UrlError::Userinfo(u.to_string())),
                "{u}"
            );
        }
        let plain = [
            "http://localhost.example.com/token",
            "http://127.0.0.1.nip.io/token",
            "http://localhost./token",
            "http://example.com/127.0.0.1",
            "http://example.com?x=http://127.0.0.1",
            "HTTP://example.com/token",
            "http://[::2]/token",
            "http://[::ffff:127.0.0.1]/token",
            "http://10.0.0.1/token",
        ];
        for u in plain {
            assert_eq!(
                check_endpoint_url(u),
                Err(UrlError::PlainHttp(u.to_string())),
                "{u}"
            );
        }
        assert_eq!(
            check_endpoint_url("ftp://127.0.0.1/token"),
            Err(UrlError::NotHttps("ftp://127.0.0.1/token".into()))
        );
        assert_eq!(
            check_endpoint_url("/token"),
            Err(UrlError::NotAbsolute("/token".into()))
        );
        assert_eq!(
            check_endpoint_url("127.0.0.1:9/token"),
            Err(UrlError::NotAbsolute("127.0.0.1:9/token".into()))
        );
        // Through the loader: the key is named.
        let e = load(&format!(
            "{}token_url = \"http://127.0.0.1:1@example.com/token\"\n",
            account("")
        ))
        .expect_err("userinfo");
        assert_eq!(e.key, "account[0].oauth.token_url", "{e}");
        assert!(e.reason.contains("user name or password"), "{e}");
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let c = load(
            &account("password_env = \"PW\"").replace(&format!("password_hash = \"{HASH}\"\n"), ""),
        )
        .expect("valid");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("local-pw"), "{dbg}");
        assert!(!dbg.contains("client-secret"), "{dbg}");
    }

    #[test]
    fn address_check() {
        assert!(is_address("a@b"));
        assert!(is_address("jörg@müller.de"));
        assert!(!is_address("a b@c"));
        assert!(!is_address("@c"));
        assert!(!is_address("a@"));
        assert!(!is_address("<a@b>"));
    }

    /// An account whose `[account.oauth]` is `oauth`, files relative to `dir`.
    fn load_oauth(dir: &Path, oauth: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "[[account]]\nusername = \"scanner\"\npassword_hash = \"{HASH}\"\nmailbox = \"scanner@contoso.com\"\n[account.oauth]\n{oauth}\n"
        );
        Config::from_toml(&text, "bridge.toml", dir, &|v| match v {
            "SECRET" => Some("client-secret".into()),
            _ => None,
        })
    }

    const CC: &str = "flow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"abc\"\n";

    #[test]
    fn client_certificates_are_read_and_checked_at_load() {
        use testkit::credential::{rsa_certificate, RSA_KEY_A, RSA_KEY_B_PKCS1};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let cert = rsa_certificate(RSA_KEY_A, "app", 365 * 86_400);
        std::fs::write(d.join("app.pem"), format!("{cert}{RSA_KEY_A}")).unwrap();
        let c = load_oauth(d, &format!("{CC}client_certificate_file = \"app.pem\"")).unwrap();
        let got = c.accounts[0].oauth.client_certificate.as_ref().unwrap();
        assert_eq!(got.path, d.join("app.pem"));
        assert!(got.key_matches);
        assert_eq!(got.thumbprint_hex().len(), 64);
        assert!(c.accounts[0].oauth.client_secret.is_none());
        // PKCS#1 keys are read too (and a key that is not the certificate's is noticed).
        std::fs::write(d.join("pkcs1.pem"), format!("{RSA_KEY_B_PKCS1}{cert}")).unwrap();
        let c = load_oauth(d, &format!("{CC}client_certificate_file = \"pkcs1.pem\"")).unwrap();
        assert!(
            !c.accounts[0]
                .oauth
                .client_certificate
                .as_ref()
                .unwrap()
                .key_matches
        );

        let key = "account[0].oauth.client_certificate_file";
        let ec = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let expired = rsa_certificate(RSA_KEY_A, "old", -86_400);
        for (content, reason) in [
            (None, "cannot read"),
            (Some(cert.clone()), "holds a certificate but no private key"),
            (Some(RSA_KEY_A.to_string()), "holds no CERTIFICATE block"),
            (Some(format!("{cert}{ec}")), "is not an RSA key"),
            (
                Some(format!("{expired}{RSA_KEY_A}")),
                "the certificate expired",
            ),
            (
                Some(format!(
                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n{RSA_KEY_A}"
                )),
                "cannot be parsed",
            ),
        ] {
            let f = d.join("bad.pem");
            let _ = std::fs::remove_file(&f);
            if let Some(c) = content {
                std::fs::write(&f, c).unwrap();
            }
            let e =
                load_oauth(d, &format!("{CC}client_certificate_file = \"bad.pem\"")).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(
                e.reason.contains(reason) && e.reason.contains("bad.pem"),
                "{reason}: {e}"
            );
            assert!(!e.to_string().contains("MII"), "no key material in {e}");
        }
    }

    #[test]
    fn at_most_one_credential_source() {
        let dir = tempfile::tempdir().unwrap();
        for (keys, named) in [
            (
                "client_secret_env = \"SECRET\"\nclient_assertion_file = \"/t\"",
                "client_assertion_file",
            ),
            (
                "client_certificate_file = \"a.pem\"\nclient_assertion_file = \"/t\"",
                "client_assertion_file",
            ),
            (
                "client_secret_file = \"s\"\nclient_certificate_file = \"a.pem\"",
                "client_certificate_file",
            ),
        ] {
            let e = load_oauth(dir.path(), &format!("{CC}{keys}")).unwrap_err();
            assert_eq!(e.key, format!("account[0].oauth.{named}"), "{e}");
            assert!(e.reason.contains("set at most one of"), "{e}");
        }
        // An assertion file need not exist at load (the kubelet writes it).
        let c = load_oauth(
            dir.path(),
            &format!("{CC}client_assertion_file = \"token\""),
        )
        .unwrap();
        assert_eq!(
            c.accounts[0].oauth.client_assertion_file,
            Some(dir.path().join("token"))
        );
    }

    #[test]
    fn service_accounts_are_google_only_and_their_key_is_checked() {
        use testkit::credential::{service_account_json, RSA_KEY_C};
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("sa.json"),
            service_account_json(
                "sa@p.iam.gserviceaccount.com",
                RSA_KEY_C,
                "https://oauth2.googleapis.com/token",
            ),
        )
        .unwrap();
        let sa = "flow = \"service_account\"\nservice_account_key_file = \"sa.json\"";
        let c = load_oauth(d, &format!("provider = \"google\"\n{sa}")).unwrap();
        let o = &c.accounts[0].oauth;
        assert_eq!(o.flow, Flow::ServiceAccount);
        assert_eq!(o.client_id, "sa@p.iam.gserviceaccount.com");
        assert_eq!(o.scopes, ["https://mail.google.com/"]);
        assert_eq!(o.token_url, "https://oauth2.googleapis.com/token");
        let key = o.service_account.as_ref().unwrap();
        assert_eq!(key.subject, "scanner@contoso.com");
        assert!(!format!("{o:?}").contains("MII"), "Debug shows no key");

        let e = load_oauth(d, sa).unwrap_err();
        assert_eq!(e.key, "account[0].oauth.flow", "{e}");
        let e = load_oauth(d, "provider = \"google\"\nflow = \"service_account\"").unwrap_err();
        assert_eq!(e.key, "account[0].oauth.service_account_key_file", "{e}");
        let e = load_oauth(d, &format!("{CC}service_account_key_file = \"sa.json\"")).unwrap_err();
        assert_eq!(e.key, "account[0].oauth.service_account_key_file", "{e}");
        let e = load_oauth(
            d,
            &format!("provider = \"google\"\n{sa}\nclient_secret_env = \"SECRET\""),
        )
        .unwrap_err();
        assert_eq!(e.key, "account[0].oauth.client_secret_env", "{e}");
        for (content, reason) in [
            ("{", "not JSON"),
            ("{\"client_email\": \"x@y\"}", "a field is missing"),
            (
                "{\"client_email\": \"x@y\", \"private_key\": \"nope\"}",
                "private_key holds no PEM private key",
            ),
        ] {
            std::fs::write(d.join("bad.json"), content).unwrap();
            let e = load_oauth(
                d,
                "provider = \"google\"\nflow = \"service_account\"\nservice_account_key_file = \"bad.json\"",
            )
            .unwrap_err();
            assert_eq!(e.key, "account[0].oauth.service_account_key_file", "{e}");
            assert!(
                e.reason.contains(reason) && e.reason.contains("bad.json"),
                "{e}"
            );
        }
    }

    #[test]
    fn environment_sets_the_credential_keys() {
        let dir = tempfile::tempdir().unwrap();
        let vars = vec![(
            "SMTP_OAUTH_BRIDGE_ACCOUNT__0__OAUTH__CLIENT_ASSERTION_FILE".to_string(),
            "/var/run/secrets/azure/tokens/azure-identity-token".to_string(),
        )];
        let text = format!(
            "[[account]]\nusername = \"scanner\"\npassword_hash = \"{HASH}\"\nmailbox = \"scanner@contoso.com\"\n[account.oauth]\n{CC}"
        );
        let c = Config::from_parts(Some(&text), "bridge.toml", dir.path(), &vars, &|_| None)
            .expect("valid");
        assert_eq!(
            c.accounts[0].oauth.client_assertion_file.as_deref(),
            Some(Path::new(
                "/var/run/secrets/azure/tokens/azure-identity-token"
            ))
        );
    }
}
