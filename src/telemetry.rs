//! Logging setup (pretty or JSON, filtered by RUST_LOG) and the relay log event.
//!
//! The relay log is one INFO event per message, target `relay`, with the fields SPEC.md
//! names; [`Outcome`] is the one typed list of its `outcome` values (also the `outcome`
//! label of `smtp_oauth_bridge_messages_total`). It lives here, below relay and smtp, so
//! that everything writing a relay log line can name it without an arrow running up;
//! `relay::outcome` decides which one a message gets. Libraries that could print protocol lines or HTTP bodies are capped at INFO here
//! whatever RUST_LOG says, so a token can never reach the log through them.

use std::sync::atomic::{AtomicU64, Ordering};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Crates whose debug/trace output may contain protocol data; capped at INFO.
const NOISY: &[&str] = &[
    "lettre",
    "hyper",
    "hyper_util",
    "reqwest",
    "h2",
    "rustls",
    "tokio_rustls",
    "oauth2",
];

/// rustls's module that warns about a ClientHello's server name. msmtp, mutt, nullmailer,
/// Net::SMTP, git send-email and PHPMailer send the server's IP address as SNI, which
/// RFC 6066 does not allow and rustls ignores with a WARN ("Illegal SNI extension: ignoring
/// IP address presented as hostname") on every STARTTLS: normal client behaviour, nothing
/// an operator can act on. This module's warnings are all about the peer's SNI (and one
/// about a server's meaningless CertificateRequest, for our upstream client) and none
/// changes what happens, so it is capped at ERROR; every other rustls module keeps its
/// warnings (a failed handshake is logged by the listener either way).
const RUSTLS_SNI: &str = "rustls::msgs::handshake";

/// The filter every subscriber of ours uses: RUST_LOG (else `default`), with [`NOISY`] capped
/// at INFO and [`RUSTLS_SNI`] at ERROR.
pub fn filters(default: &str) -> (EnvFilter, Targets) {
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let mut cap = Targets::new().with_default(tracing::Level::TRACE);
    for t in NOISY {
        cap = cap.with_target(*t, tracing::Level::INFO);
    }
    cap = cap.with_target(RUSTLS_SNI, tracing::Level::ERROR);
    (env, cap)
}

/// Installs the global subscriber writing to stdout.
///
/// Lines are handed to a writer thread, so a message never waits for stdout (a pipe to a
/// log collector can be slow); nothing is dropped: when the queue is full, logging waits.
/// Keep the returned guard until exit: dropping it flushes what is queued.
pub fn init(format: LogFormat, default: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let (env, cap) = filters(default);
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::stdout());
    let layer = match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .with_target(true)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(writer)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(env).with_filter(cap))
        .try_init();
    guard
}

/// What happened to a message: the relay log's `outcome` field (SPEC "Relay log").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The upstream accepted it.
    Delivered,
    /// Refused for good (an upstream 5xx, or too big): the client got a 5xx.
    Rejected,
    /// Not delivered for now (an upstream 4xx, no connection, shutdown): the client got a
    /// 4xx, or the spool will retry.
    Deferred,
    /// Written to the spool; delivery follows later.
    Spooled,
    /// The spool gave up on it (5xx for every recipient, or too old): moved to `dead`.
    Dead,
    /// Removed from the spool by an operator (`queue delete`).
    Deleted,
}

impl Outcome {
    /// Every outcome, in the order SPEC lists them.
    #[cfg(test)]
    pub(crate) const ALL: [Outcome; 6] = [
        Outcome::Delivered,
        Outcome::Rejected,
        Outcome::Deferred,
        Outcome::Spooled,
        Outcome::Dead,
        Outcome::Deleted,
    ];

    /// The value in the relay log and in the metric label.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Rejected => "rejected",
            Outcome::Deferred => "deferred",
            Outcome::Spooled => "spooled",
            Outcome::Dead => "dead",
            Outcome::Deleted => "deleted",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a message's sender was established: the relay log's `via` field and the `via` label
/// of `smtp_oauth_bridge_messages_via_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    /// The client authenticated (AUTH).
    Auth,
    /// The client's address is in a `[[relay_network]]` (no AUTH).
    Network,
}

impl Via {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Via::Auth => "auth",
            Via::Network => "network",
        }
    }
}

/// The fields of one relay log line.
#[derive(Debug)]
pub struct RelayEvent<'a> {
    pub id: &'a str,
    pub account: &'a str,
    pub from: &'a str,
    pub rcpts: &'a [String],
    pub bytes: usize,
    pub outcome: Outcome,
    /// 0 when the upstream gave no reply (connection failure, timeout).
    pub upstream_code: u16,
    pub upstream_reply: &'a str,
    pub ms: u64,
    /// How the local client was let send (a session's lines); `None` for the spool's
    /// deliveries, whose line has no `via` field.
    pub via: Option<Via>,
}

pub fn relay_event(e: &RelayEvent<'_>) {
    let rcpts = e.rcpts.join(",");
    tracing::info!(
        target: "relay",
        id = e.id,
        account = e.account,
        from = e.from,
        rcpts = rcpts.as_str(),
        bytes = e.bytes,
        outcome = e.outcome.as_str(),
        upstream_code = e.upstream_code,
        upstream_reply = e.upstream_reply,
        ms = e.ms,
        via = e.via.map(Via::as_str),
    );
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A message id, unique within this host: seconds since the epoch and a counter, in hex
/// (Postfix-like, sorts by time).
pub(crate) fn new_message_id() -> String {
    let secs = crate::clock::unix_now();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:09X}{:07X}",
        secs & 0xF_FFFF_FFFF,
        (n ^ u64::from(std::process::id()) << 12) & 0xFFF_FFFF
    )
}

#[cfg(test)]
mod tests {
    use super::Outcome;

    #[test]
    fn outcomes_have_the_relay_log_values() {
        let values: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(
            values,
            [
                "delivered",
                "rejected",
                "deferred",
                "spooled",
                "dead",
                "deleted"
            ]
        );
        assert_eq!(Outcome::Delivered.as_str(), "delivered");
        assert_eq!(Outcome::Rejected.as_str(), "rejected");
        assert_eq!(Outcome::Deferred.as_str(), "deferred");
        assert_eq!(Outcome::Spooled.as_str(), "spooled");
        assert_eq!(Outcome::Dead.as_str(), "dead");
        assert_eq!(Outcome::Deleted.as_str(), "deleted");
        assert_eq!(Outcome::Dead.to_string(), "dead");
    }

    #[test]
    fn rustls_sni_warnings_are_quiet_and_other_rustls_warnings_are_not() {
        use tracing::Level;
        let (_, cap) = super::filters("info");
        assert!(!cap.would_enable("rustls::msgs::handshake", &Level::WARN));
        assert!(cap.would_enable("rustls::msgs::handshake", &Level::ERROR));
        assert!(cap.would_enable("rustls::server::hs", &Level::WARN));
        assert!(cap.would_enable("rustls::conn", &Level::WARN));
        assert!(!cap.would_enable("rustls::conn", &Level::DEBUG));
        assert!(cap.would_enable("smtp_oauth_bridge::smtp::listener", &Level::DEBUG));
    }

    #[test]
    fn message_ids_are_unique_and_fixed_length() {
        let a = super::new_message_id();
        let b = super::new_message_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
