//! The validated configuration: the types the rest of the bridge reads.
//!
//! Every value here has passed validation (see `validate.rs`), defaults are filled in and
//! relative paths are resolved. Secrets are held as [`Secret`]/[`SecretKey`] together with
//! the `*_env` / `*_file` key they came from, so the configuration can be printed back
//! without them (`print.rs`). Provider endpoint presets are in `presets.rs`.

use super::keys::{ClientCertificate, ServiceAccountKey};
use crate::secret::{Secret, SecretKey};
use ipnet::IpNet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Microsoft 365's message size limit (35 MiB): what we advertise in SIZE by default.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 36_700_160;
/// Microsoft 365's recipient limit per message.
pub const DEFAULT_MAX_RECIPIENTS: usize = 500;
/// Local connections held at once; beyond this new clients get 421.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;
/// Microsoft 365 allows 3 concurrent SMTP sessions per mailbox.
pub const DEFAULT_MAX_SESSIONS_PER_MAILBOX: usize = 3;

/// `listen.tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenTls {
    Off,
    StartTls,
}

impl ListenTls {
    pub fn parse(s: &str) -> Option<ListenTls> {
        match s {
            "off" => Some(ListenTls::Off),
            "starttls" => Some(ListenTls::StartTls),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ListenTls::Off => "off",
            ListenTls::StartTls => "starttls",
        }
    }
}

/// `upstream.security`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamSecurity {
    /// Plain connect, STARTTLS required before anything else.
    StartTls,
    /// Implicit TLS from the first byte (port 465 style).
    Tls,
}

impl UpstreamSecurity {
    pub fn parse(s: &str) -> Option<UpstreamSecurity> {
        match s {
            "starttls" => Some(UpstreamSecurity::StartTls),
            "tls" => Some(UpstreamSecurity::Tls),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            UpstreamSecurity::StartTls => "starttls",
            UpstreamSecurity::Tls => "tls",
        }
    }
}

/// How messages reach the provider (`upstream.transport`, `account.transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// SMTP submission with AUTH XOAUTH2.
    Smtp,
    /// Microsoft Graph (`sendMail` / drafts), for tenants with SMTP AUTH turned off.
    Graph,
}

impl TransportKind {
    pub fn parse(s: &str) -> Option<TransportKind> {
        match s {
            "smtp" => Some(TransportKind::Smtp),
            "graph" => Some(TransportKind::Graph),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TransportKind::Smtp => "smtp",
            TransportKind::Graph => "graph",
        }
    }
}

/// Which OAuth 2.0 grant obtains the account's tokens (`account.oauth.flow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    AuthorizationCode,
    DeviceCode,
    ClientCredentials,
    /// Google: JWT bearer grant (RFC 7523) with a service account acting as the mailbox.
    ServiceAccount,
}

impl Flow {
    pub fn parse(s: &str) -> Option<Flow> {
        match s {
            "authorization_code" => Some(Flow::AuthorizationCode),
            "device_code" => Some(Flow::DeviceCode),
            "client_credentials" => Some(Flow::ClientCredentials),
            "service_account" => Some(Flow::ServiceAccount),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Flow::AuthorizationCode => "authorization_code",
            Flow::DeviceCode => "device_code",
            Flow::ClientCredentials => "client_credentials",
            Flow::ServiceAccount => "service_account",
        }
    }

    /// The application acts on its own (no user login, no refresh token): a new token is
    /// requested with the app's credential whenever one is needed.
    pub fn is_app_only(self) -> bool {
        matches!(self, Flow::ClientCredentials | Flow::ServiceAccount)
    }
}

/// The identity provider (`account.oauth.provider`); its presets are in `presets.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Microsoft,
    MicrosoftUsGov,
    MicrosoftChina,
    Google,
}

impl Provider {
    pub fn parse(s: &str) -> Option<Provider> {
        match s {
            "microsoft" => Some(Provider::Microsoft),
            "microsoft-us-gov" => Some(Provider::MicrosoftUsGov),
            "microsoft-china" => Some(Provider::MicrosoftChina),
            "google" => Some(Provider::Google),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Provider::Microsoft => "microsoft",
            Provider::MicrosoftUsGov => "microsoft-us-gov",
            Provider::MicrosoftChina => "microsoft-china",
            Provider::Google => "google",
        }
    }

    pub(crate) fn is_microsoft(self) -> bool {
        !matches!(self, Provider::Google)
    }
}

/// Where a secret was read from: the `*_env` or `*_file` key's value (a variable name or a
/// resolved path; neither is secret, and they are what `--print-config` shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
}

/// A secret value with the place it was read from.
#[derive(Debug, Clone)]
pub struct Sourced<T> {
    pub source: SecretSource,
    pub value: T,
}

impl Sourced<Secret> {
    /// The plain value. Callers must not log or format it.
    pub fn expose(&self) -> &str {
        self.value.expose()
    }
}

/// A secret read from the environment variable a `*_env` key names.
#[derive(Debug, Clone)]
pub struct EnvSecret {
    /// The variable's name (not secret).
    pub var: String,
    pub value: Secret,
}

impl EnvSecret {
    /// The plain value. Callers must not log or format it.
    pub fn expose(&self) -> &str {
        self.value.expose()
    }
}

#[derive(Debug, Clone)]
pub struct Listen {
    /// Plain listeners (STARTTLS on them when `tls` says so).
    pub smtp: Vec<SocketAddr>,
    /// Implicit-TLS listeners (RFC 8314), with `tls_cert`/`tls_key`.
    pub smtps: Vec<SocketAddr>,
    /// Clients from elsewhere get 554 5.7.1 at connect; `None`: any address.
    pub allow_networks: Option<Vec<IpNet>>,
    pub admin: Option<SocketAddr>,
    pub tls: ListenTls,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub require_tls_for_auth: bool,
    pub max_message_bytes: usize,
    pub max_recipients: usize,
    pub max_connections: usize,
    /// After SIGTERM, how long transactions in flight may take before they get 421.
    pub shutdown_grace: Duration,
    /// A command line (and each read during DATA) must arrive within this.
    pub command_timeout: Duration,
    /// A session is ended with 421 at the next command boundary after this.
    pub session_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub security: UpstreamSecurity,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub max_sessions_per_mailbox: usize,
    pub idle: Duration,
    /// Authenticated sessions kept ready per mailbox (NOOPed, re-authenticated before the
    /// token expires, reopened when closed); at most `max_sessions_per_mailbox`, 0 = none.
    pub warm_sessions: usize,
    /// Messages per minute per mailbox: held in spool mode, reported in sync mode; 0 = no limit.
    pub messages_per_minute: u32,
    /// `upstream.transport`: the accounts' transport unless an account sets its own.
    pub transport: TransportKind,
    /// `upstream.graph_url`: Microsoft Graph's base URL (no trailing slash), preset per provider.
    pub graph_url: String,
    /// `upstream.save_to_sent_items` (Graph): keep a copy in the mailbox's Sent Items.
    pub save_to_sent_items: bool,
}

#[derive(Debug, Clone)]
pub struct State {
    pub dir: PathBuf,
    /// Seals the token files when set (`state.key_file` or `state.key_env`).
    pub key: Option<Sourced<SecretKey>>,
}

/// How a local password is checked.
#[derive(Debug, Clone)]
pub enum LocalPassword {
    /// An argon2 PHC string (`password_hash`); kept out of Debug output like a password.
    Hash(Secret),
    /// A plain password read from an environment variable (`password_env`).
    Plain(EnvSecret),
}

#[derive(Debug, Clone)]
pub struct OAuth {
    pub provider: Provider,
    pub tenant: String,
    pub flow: Flow,
    pub client_id: String,
    /// `client_secret_env` or `client_secret_file`. At most one of it,
    /// `client_certificate`, `client_assertion_file` and `service_account` is set.
    pub client_secret: Option<Sourced<Secret>>,
    /// `client_certificate_file`: signed client assertions (RS256, `x5t#S256`).
    pub client_certificate: Option<ClientCertificate>,
    /// `client_assertion_file`: a federated assertion, read afresh for every token request.
    pub client_assertion_file: Option<PathBuf>,
    /// `service_account_key_file` (flow `service_account`), with the mailbox as subject.
    pub service_account: Option<ServiceAccountKey>,
    pub scopes: Vec<String>,
    pub token_url: String,
    pub authorize_url: String,
    pub device_authorization_url: String,
    pub redirect_port: u16,
}

#[derive(Debug, Clone)]
pub struct Account {
    pub username: String,
    pub password: LocalPassword,
    pub mailbox: String,
    pub allowed_from: Vec<String>,
    /// Recipients this account may send to (exact address or `*@domain`); `None`: any.
    pub allowed_rcpt: Option<Vec<String>>,
    pub oauth: OAuth,
    /// The account's transport: its own `transport` key, else `upstream.transport`.
    pub transport: TransportKind,
}

/// `[[relay_network]]`: clients whose address is in `cidr` may send without AUTH, as the
/// account named `account` (an existing username).
#[derive(Debug, Clone)]
pub struct RelayNetwork {
    pub cidr: Vec<IpNet>,
    pub account: String,
}

/// `queue.max_bytes` when not set: 1 GiB of spooled messages.
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 1 << 30;

/// `[queue] mode = "spool"`: accept after fsync, deliver in the background.
#[derive(Debug, Clone)]
pub struct Queue {
    pub max_age: Duration,
    /// `queue.max_bytes`: the most the spool may hold (message files), so the token store
    /// beside it in `state.dir` keeps room.
    pub max_bytes: u64,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// `queue.bounce`: a delivery status notification to the sender when a message goes
    /// dead (never for a `<>` sender).
    pub bounce: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration came from (for messages).
    pub source: String,
    pub listen: Listen,
    pub upstream: Upstream,
    pub state: State,
    /// `None`: synchronous relay (the default).
    pub queue: Option<Queue>,
    pub relay_networks: Vec<RelayNetwork>,
    pub accounts: Vec<Account>,
}
