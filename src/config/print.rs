//! Model -> TOML for `serve --print-config`: the effective configuration (file + environment
//! + defaults) in the loader's own keys, so the output loads back as `--config`.
//!
//! The model is turned back into the raw structs of `raw.rs` and serialized, so a key can only
//! be printed if the loader reads it. Secrets are printed as the `*_env` / `*_file` key they
//! came from (a variable name or a path, neither secret); the file's shape has no key that
//! holds a secret value, so there is nothing to redact. `password_hash` is printed as it is:
//! a one-way argon2 hash, needed for the output to load, and already in the file. Paths are
//! printed absolute, so the output means the same wherever it is saved.

use super::model::*;
use super::raw::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The configuration could not be written as TOML (e.g. a path that is not UTF-8).
#[derive(Debug, thiserror::Error)]
#[error("cannot print the configuration as TOML: {0}")]
pub struct PrintError(#[from] toml::ser::Error);

impl Config {
    /// The effective configuration as TOML in the loader's keys, without secret values
    /// (`serve --print-config`); it loads back to the same configuration.
    pub fn to_toml(&self) -> Result<String, PrintError> {
        let body = toml::to_string(&RawConfig::from(self))?;
        Ok(format!(
            "# effective configuration from {}\n{body}",
            self.source
        ))
    }
}

/// `p` made absolute against the working directory (as it is opened), or `p` if that fails.
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn secs(d: Duration) -> Option<u64> {
    Some(d.as_secs())
}

fn count(n: usize) -> Option<u64> {
    u64::try_from(n).ok()
}

/// `(env, file)`: the pair of keys a secret's source is printed as.
fn source_keys(s: &SecretSource) -> (Option<String>, Option<PathBuf>) {
    match s {
        SecretSource::Env(var) => (Some(var.clone()), None),
        SecretSource::File(p) => (None, Some(absolute(p))),
    }
}

impl From<&Config> for RawConfig {
    fn from(c: &Config) -> RawConfig {
        RawConfig {
            listen: RawListen::from(&c.listen),
            upstream: RawUpstream::from(&c.upstream),
            state: RawState::from(&c.state),
            queue: c.queue.as_ref().map(RawQueue::from),
            relay_network: c.relay_networks.iter().map(RawRelayNetwork::from).collect(),
            account: c
                .accounts
                .iter()
                .map(|a| RawAccount::printed(a, c.upstream.transport))
                .collect(),
        }
    }
}

impl From<&Listen> for RawListen {
    fn from(l: &Listen) -> RawListen {
        RawListen {
            smtp: Some(OneOrMany::from_vec(
                l.smtp.iter().map(ToString::to_string).collect(),
            )),
            smtps: (!l.smtps.is_empty()).then(|| l.smtps.iter().map(ToString::to_string).collect()),
            allow_networks: l
                .allow_networks
                .as_ref()
                .map(|n| n.iter().map(ToString::to_string).collect()),
            admin: l.admin.map(|a| a.to_string()),
            tls: Some(l.tls.as_str().to_string()),
            tls_cert: Some(absolute(&l.tls_cert)),
            tls_key: Some(absolute(&l.tls_key)),
            require_tls_for_auth: Some(l.require_tls_for_auth),
            max_message_bytes: count(l.max_message_bytes),
            max_recipients: count(l.max_recipients),
            max_connections: count(l.max_connections),
            shutdown_grace_secs: secs(l.shutdown_grace),
            command_timeout_secs: secs(l.command_timeout),
            session_timeout_secs: secs(l.session_timeout),
        }
    }
}

impl From<&RelayNetwork> for RawRelayNetwork {
    fn from(n: &RelayNetwork) -> RawRelayNetwork {
        RawRelayNetwork {
            cidr: Some(n.cidr.iter().map(ToString::to_string).collect()),
            account: Some(n.account.clone()),
        }
    }
}

impl From<&Upstream> for RawUpstream {
    fn from(u: &Upstream) -> RawUpstream {
        RawUpstream {
            host: Some(u.host.clone()),
            port: Some(u.port),
            security: Some(u.security.as_str().to_string()),
            ca_file: u.ca_file.as_deref().map(absolute),
            timeout_secs: secs(u.timeout),
            max_sessions_per_mailbox: count(u.max_sessions_per_mailbox),
            idle_secs: secs(u.idle),
            warm_sessions: count(u.warm_sessions),
            messages_per_minute: Some(u.messages_per_minute),
            transport: Some(u.transport.as_str().to_string()),
            graph_url: Some(u.graph_url.clone()),
            save_to_sent_items: Some(u.save_to_sent_items),
        }
    }
}

impl From<&State> for RawState {
    fn from(s: &State) -> RawState {
        let (key_env, key_file) = match &s.key {
            Some(k) => source_keys(&k.source),
            None => (None, None),
        };
        RawState {
            dir: Some(absolute(&s.dir)),
            key_file,
            key_env,
        }
    }
}

impl From<&Queue> for RawQueue {
    fn from(q: &Queue) -> RawQueue {
        RawQueue {
            mode: Some("spool".to_string()),
            max_age_secs: secs(q.max_age),
            max_bytes: Some(q.max_bytes),
            retry_min_secs: secs(q.retry_min),
            retry_max_secs: secs(q.retry_max),
            bounce: Some(q.bounce),
        }
    }
}

impl RawAccount {
    /// The account as printed under `[upstream]` whose transport is `default`: its own
    /// `transport` key only where it differs.
    fn printed(a: &Account, default: TransportKind) -> RawAccount {
        RawAccount {
            transport: (a.transport != default).then(|| a.transport.as_str().to_string()),
            ..RawAccount::from(a)
        }
    }
}

impl From<&Account> for RawAccount {
    fn from(a: &Account) -> RawAccount {
        let (password_hash, password_env) = match &a.password {
            LocalPassword::Hash(h) => (Some(h.expose().to_string()), None),
            LocalPassword::Plain(p) => (None, Some(p.var.clone())),
        };
        RawAccount {
            username: Some(a.username.clone()),
            password_hash,
            password_env,
            mailbox: Some(a.mailbox.clone()),
            allowed_from: Some(a.allowed_from.clone()),
            allowed_rcpt: a.allowed_rcpt.clone(),
            oauth: Some(RawOAuth::from(&a.oauth)),
            transport: Some(a.transport.as_str().to_string()),
        }
    }
}

impl From<&OAuth> for RawOAuth {
    fn from(o: &OAuth) -> RawOAuth {
        let (client_secret_env, client_secret_file) = match &o.client_secret {
            Some(s) => source_keys(&s.source),
            None => (None, None),
        };
        RawOAuth {
            provider: Some(o.provider.as_str().to_string()),
            tenant: Some(o.tenant.clone()),
            flow: Some(o.flow.as_str().to_string()),
            client_id: Some(o.client_id.clone()),
            client_secret_env,
            client_secret_file,
            // Paths, not secrets: the key material stays in the files.
            client_certificate_file: o.client_certificate.as_ref().map(|c| c.path.clone()),
            client_assertion_file: o.client_assertion_file.clone(),
            service_account_key_file: o.service_account.as_ref().map(|s| s.path.clone()),
            scopes: Some(o.scopes.clone()),
            token_url: Some(o.token_url.clone()),
            authorize_url: Some(o.authorize_url.clone()),
            device_authorization_url: Some(o.device_authorization_url.clone()),
            redirect_port: Some(o.redirect_port),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};
    use std::path::Path;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Jp1ow0uvWhc1W3f1KrGmwcdG7OcaI+UEmOsLVYaHy6k";
    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const LOCAL_PW: &str = "local-pw-Zq81";
    const ENV_SECRET: &str = "client-secret-from-env-Kx2";
    const FILE_SECRET: &str = "client-secret-from-file-Wm7";

    fn env(name: &str) -> Option<String> {
        match name {
            "PW" | "PW2" => Some(LOCAL_PW.into()),
            "SECRET" => Some(ENV_SECRET.into()),
            "STATE_KEY" => Some(KEY.into()),
            _ => None,
        }
    }

    fn load(text: &str, file: &str, base: &Path) -> Result<Config, ConfigError> {
        Config::from_toml(text, file, base, &env)
    }

    /// The printed text without its first line (which names where the configuration came from).
    fn body(printed: &str) -> &str {
        printed.split_once('\n').map_or("", |(_, rest)| rest)
    }

    /// A configuration using every section, with secrets from `*_env` and `*_file` keys: the
    /// state key from `state_key` (`key_env = ...` or `key_file = ...`).
    fn full_config(dir: &Path, state_key: &str) -> String {
        std::fs::write(dir.join("client-secret"), format!("{FILE_SECRET}\n")).unwrap();
        std::fs::write(dir.join("state.key"), format!("{KEY}\n")).unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
        use testkit::credential::{rsa_certificate, service_account_json, RSA_KEY_A, RSA_KEY_C};
        let cert = rsa_certificate(RSA_KEY_A, "app", 365 * 86_400);
        std::fs::write(dir.join("app.pem"), format!("{cert}{RSA_KEY_A}")).unwrap();
        std::fs::write(
            dir.join("sa.json"),
            service_account_json(
                "sa@p.iam.gserviceaccount.com",
                RSA_KEY_C,
                "https://oauth2.googleapis.com/token",
            ),
        )
        .unwrap();
        format!(
            r#"
[listen]
smtp = ["0.0.0.0:2525", "[::1]:2526"]
smtps = ["0.0.0.0:4465"]
allow_networks = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "10.9.9.9"]
admin = "127.0.0.1:9925"
tls = "starttls"
max_recipients = 100
command_timeout_secs = 60
[upstream]
security = "tls"
ca_file = "ca.pem"
warm_sessions = 2
messages_per_minute = 0
[state]
dir = "var/state"
{state_key}
[queue]
mode = "spool"
retry_min_secs = 10
[[relay_network]]
cidr = ["10.0.5.0/24", "10.0.6.17/32", "fd00:5::/64"]
account = "scanner"
[[account]]
username = "scanner"
password_env = "PW"
mailbox = "scanner@contoso.com"
allowed_from = ["scanner@contoso.com", "*@fabrikam.com"]
allowed_rcpt = ["*@contoso.com", "alerts@fabrikam.com"]
[account.oauth]
tenant = "contoso.onmicrosoft.com"
flow = "client_credentials"
client_id = "abc"
client_secret_env = "SECRET"
[[account]]
username = "printer"
password_hash = "{HASH}"
mailbox = "printer@contoso.com"
[account.oauth]
provider = "google"
flow = "authorization_code"
client_id = "def"
client_secret_file = "client-secret"
redirect_port = 8765
[[account]]
username = "cert"
password_env = "PW2"
mailbox = "cert@contoso.com"
transport = "graph"
[account.oauth]
tenant = "contoso.onmicrosoft.com"
flow = "client_credentials"
client_id = "abc"
client_certificate_file = "app.pem"
[[account]]
username = "federated"
password_env = "PW2"
mailbox = "federated@contoso.com"
[account.oauth]
tenant = "contoso.onmicrosoft.com"
flow = "client_credentials"
client_id = "abc"
client_assertion_file = "/var/run/secrets/azure/tokens/azure-identity-token"
[[account]]
username = "gsa"
password_env = "PW2"
mailbox = "gsa@example.org"
[account.oauth]
provider = "google"
flow = "service_account"
service_account_key_file = "sa.json"
"#
        )
    }

    #[test]
    fn printed_config_loads_back_and_prints_the_same() {
        for state_key in ["key_env = \"STATE_KEY\"", "key_file = \"state.key\""] {
            let dir = tempfile::tempdir().unwrap();
            let first = load(
                &full_config(dir.path(), state_key),
                "bridge.toml",
                dir.path(),
            )
            .unwrap()
            .to_toml()
            .unwrap();
            assert!(
                first.starts_with("# effective configuration from bridge.toml\n"),
                "{first}"
            );
            // Loaded from elsewhere: every path was printed absolute.
            let elsewhere = tempfile::tempdir().unwrap();
            let second = load(&first, "printed.toml", elsewhere.path())
                .unwrap_or_else(|e| panic!("{e}\n{first}"))
                .to_toml()
                .unwrap();
            assert_eq!(
                second.lines().next(),
                Some("# effective configuration from printed.toml")
            );
            assert_eq!(body(&second), body(&first));
            for line in [
                "smtp = [\"0.0.0.0:2525\", \"[::1]:2526\"]",
                "smtps = [\"0.0.0.0:4465\"]",
                "allow_networks = [\"127.0.0.0/8\", \"::1/128\", \"10.0.0.0/8\", \"10.9.9.9/32\"]",
                "[[relay_network]]",
                "cidr = [\"10.0.5.0/24\", \"10.0.6.17/32\", \"fd00:5::/64\"]",
                "account = \"scanner\"",
                "warm_sessions = 2",
                "allowed_rcpt = [\"*@contoso.com\", \"alerts@fabrikam.com\"]",
                "transport = \"smtp\"",
                "transport = \"graph\"",
                "scopes = [\"https://graph.microsoft.com/.default\"]",
            ] {
                assert_eq!(
                    first.lines().filter(|l| *l == line).count(),
                    1,
                    "{line}:\n{first}"
                );
            }
            let third = load(&second, "printed.toml", elsewhere.path())
                .unwrap()
                .to_toml()
                .unwrap();
            assert_eq!(third, second);
        }
    }

    #[test]
    fn printed_config_names_where_secrets_come_from_and_holds_none() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        for (state_key, printed_key) in [
            (
                "key_env = \"STATE_KEY\"",
                "key_env = \"STATE_KEY\"".to_string(),
            ),
            (
                "key_file = \"state.key\"",
                format!("key_file = \"{d}/state.key\""),
            ),
        ] {
            let text = load(
                &full_config(dir.path(), state_key),
                "bridge.toml",
                dir.path(),
            )
            .unwrap()
            .to_toml()
            .unwrap();
            // No key material: a line of each key's base64.
            let key_a = testkit::credential::RSA_KEY_A.lines().nth(3).unwrap();
            let key_c = testkit::credential::RSA_KEY_C.lines().nth(3).unwrap();
            for secret in [
                key_a,
                key_c,
                "PRIVATE KEY",
                LOCAL_PW,
                ENV_SECRET,
                FILE_SECRET,
                KEY,
                "AAECAwQFBgcICQoLDA0ODx",
            ] {
                assert!(!text.contains(secret), "secret printed:\n{text}");
            }
            for line in [
                printed_key.as_str(),
                "password_env = \"PW\"",
                &format!("password_hash = \"{HASH}\""),
                "client_secret_env = \"SECRET\"",
                &format!("client_secret_file = \"{d}/client-secret\""),
                &format!("client_certificate_file = \"{d}/app.pem\""),
                "client_assertion_file = \"/var/run/secrets/azure/tokens/azure-identity-token\"",
                &format!("service_account_key_file = \"{d}/sa.json\""),
                "flow = \"service_account\"",
                "client_id = \"sa@p.iam.gserviceaccount.com\"",
            ] {
                assert_eq!(
                    text.lines().filter(|l| *l == line).count(),
                    1,
                    "{line}:\n{text}"
                );
            }
            assert!(!text.contains("redacted"), "{text}");
        }
    }

    #[test]
    fn minimal_config_prints_every_effective_key() {
        let text = format!(
            "[[account]]\nusername = \"scanner\"\npassword_hash = \"{HASH}\"\nmailbox = \"scanner@contoso.com\"\n[account.oauth]\ntenant = \"contoso.onmicrosoft.com\"\nflow = \"client_credentials\"\nclient_id = \"abc\"\nclient_secret_env = \"SECRET\"\n"
        );
        let printed = load(&text, "bridge.toml", Path::new("/etc/b"))
            .unwrap()
            .to_toml()
            .unwrap();
        let expected = format!(
            r#"# effective configuration from bridge.toml
[listen]
smtp = "127.0.0.1:2525"
tls = "off"
tls_cert = "/etc/b/certs/bridge.crt"
tls_key = "/etc/b/certs/bridge.key"
require_tls_for_auth = false
max_message_bytes = 36700160
max_recipients = 500
max_connections = 1000
shutdown_grace_secs = 30
command_timeout_secs = 300
session_timeout_secs = 3600

[upstream]
host = "smtp.office365.com"
port = 587
security = "starttls"
timeout_secs = 60
max_sessions_per_mailbox = 3
idle_secs = 30
warm_sessions = 0
messages_per_minute = 30
transport = "smtp"
graph_url = "https://graph.microsoft.com"
save_to_sent_items = false

[state]
dir = "/etc/b/state"

[[account]]
username = "scanner"
password_hash = "{HASH}"
mailbox = "scanner@contoso.com"
allowed_from = ["scanner@contoso.com"]

[account.oauth]
provider = "microsoft"
tenant = "contoso.onmicrosoft.com"
flow = "client_credentials"
client_id = "abc"
client_secret_env = "SECRET"
scopes = ["https://outlook.office365.com/.default"]
token_url = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
authorize_url = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize"
device_authorization_url = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/devicecode"
redirect_port = 0
"#
        );
        assert_eq!(printed, expected);
    }

    /// Every key the printer writes can also be set from the environment, with the type the
    /// overlay gives it (lists, booleans, integers): the printed configuration turned into
    /// `SMTP_OAUTH_BRIDGE_*` variables alone loads and prints the same.
    #[test]
    fn every_printed_key_loads_back_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let printed = load(
            &full_config(dir.path(), "key_file = \"state.key\""),
            "bridge.toml",
            dir.path(),
        )
        .unwrap()
        .to_toml()
        .unwrap();
        let table: toml::Table = toml::from_str(&printed).unwrap();
        let mut vars = Vec::new();
        /// `SMTP_OAUTH_BRIDGE_<A>__<B>...` for every leaf under `t` (at `path`).
        fn leaves(path: &str, t: &toml::Table, vars: &mut Vec<(String, String)>) {
            for (k, v) in t {
                let name = match path {
                    "" => k.to_ascii_uppercase(),
                    p => format!("{p}__{}", k.to_ascii_uppercase()),
                };
                let value = match v {
                    toml::Value::Table(t) => {
                        leaves(&name, t, vars);
                        continue;
                    }
                    toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
                        for (i, item) in items.iter().enumerate() {
                            if let toml::Value::Table(t) = item {
                                leaves(&format!("{name}__{i}"), t, vars);
                            }
                        }
                        continue;
                    }
                    toml::Value::Array(items) => items
                        .iter()
                        .map(|i| i.as_str().unwrap().to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                vars.push((format!("{}{name}", crate::config::ENV_PREFIX), value));
            }
        }
        leaves("", &table, &mut vars);
        assert!(vars.len() > 50, "{vars:?}");
        let from_env = Config::from_parts(None, "none.toml", dir.path(), &vars, &env)
            .unwrap_or_else(|e| panic!("{e}\n{vars:?}"))
            .to_toml()
            .unwrap();
        assert_eq!(
            from_env.lines().next(),
            Some("# effective configuration from SMTP_OAUTH_BRIDGE_* environment (no none.toml)")
        );
        assert_eq!(body(&from_env), body(&printed));
    }
}
