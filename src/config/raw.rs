//! The file's shape: one serde struct per section, every key named once here.
//!
//! The loader deserializes these (unknown keys are errors) and `validate.rs` turns them into
//! the model; `--print-config` fills them from the model and serializes them (`print.rs`), so
//! every printed key is one the loader reads. Secrets never appear here, only the `*_env` /
//! `*_file` keys that say where to read them. Absent keys are `None` (and not printed).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub state: RawState,
    pub queue: Option<RawQueue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relay_network: Vec<RawRelayNetwork>,
    #[serde(default)]
    pub account: Vec<RawAccount>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
    pub smtp: Option<OneOrMany>,
    pub smtps: Option<Vec<String>>,
    pub allow_networks: Option<Vec<String>>,
    pub admin: Option<String>,
    pub tls: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub require_tls_for_auth: Option<bool>,
    pub max_message_bytes: Option<u64>,
    pub max_recipients: Option<u64>,
    pub max_connections: Option<u64>,
    pub shutdown_grace_secs: Option<u64>,
    pub command_timeout_secs: Option<u64>,
    pub session_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub security: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub timeout_secs: Option<u64>,
    pub max_sessions_per_mailbox: Option<u64>,
    pub idle_secs: Option<u64>,
    pub warm_sessions: Option<u64>,
    pub messages_per_minute: Option<u32>,
    /// "smtp" | "graph".
    pub transport: Option<String>,
    pub graph_url: Option<String>,
    pub save_to_sent_items: Option<bool>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    pub dir: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub key_env: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    pub mode: Option<String>,
    pub max_age_secs: Option<u64>,
    pub max_bytes: Option<u64>,
    pub retry_min_secs: Option<u64>,
    pub retry_max_secs: Option<u64>,
    pub bounce: Option<bool>,
}

/// `[[relay_network]]`: clients from `cidr` may send without AUTH, as `account`.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRelayNetwork {
    pub cidr: Option<Vec<String>>,
    pub account: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccount {
    pub username: Option<String>,
    /// An argon2 PHC string: a one-way hash, printed as it is (it is in the file already).
    pub password_hash: Option<String>,
    pub password_env: Option<String>,
    pub mailbox: Option<String>,
    pub allowed_from: Option<Vec<String>>,
    pub allowed_rcpt: Option<Vec<String>>,
    pub oauth: Option<RawOAuth>,
    /// Overrides `upstream.transport` for this account.
    pub transport: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuth {
    pub provider: Option<String>,
    pub tenant: Option<String>,
    pub flow: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_env: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    /// PEM certificate + RSA private key: signed client assertions instead of a secret.
    pub client_certificate_file: Option<PathBuf>,
    /// A federated assertion (workload identity), read afresh for every token request.
    pub client_assertion_file: Option<PathBuf>,
    /// `flow = "service_account"` (Google): the service account's JSON key.
    pub service_account_key_file: Option<PathBuf>,
    pub scopes: Option<Vec<String>>,
    pub token_url: Option<String>,
    pub authorize_url: Option<String>,
    pub device_authorization_url: Option<String>,
    pub redirect_port: Option<u16>,
}

/// A key that takes a string or a list of strings (`listen.smtp`); printed as a string when
/// it holds one value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn from_vec(mut v: Vec<String>) -> OneOrMany {
        match v.len() {
            1 => OneOrMany::One(v.remove(0)),
            _ => OneOrMany::Many(v),
        }
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<OneOrMany, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OneOrMany;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an address or a list of addresses")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_string()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                Ok(OneOrMany::Many(v))
            }
        }
        d.deserialize_any(Visitor)
    }
}
