//! The bridge's Prometheus metrics and their text exposition (format 0.0.4), on
//! prometheus-client.
//!
//! Event counters live in a registry built once and move when a message gets its relay log
//! line ([`Metrics::record`] is the one place that writes that line), when a local session
//! opens or closes, and when a local AUTH fails. Values that are state, not events (token
//! expiry, upstream sessions, spool depth), are read from their owners at scrape time, passed
//! to [`Metrics::render`] as a [`Snapshot`] and encoded from a registry built for that scrape.
//! What the metrics are named and what they mean is SPEC's and the README's; this file keeps
//! those names exactly (prometheus-client appends `_total` to counters itself and a `.` to
//! every HELP text, so neither is written here).

use crate::telemetry::{self, Outcome, RelayEvent, Via};
use prometheus_client::encoding::{
    prometheus_text, EncodeLabelSet, EncodeLabelValue, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// The `Content-Type` of [`Metrics::render`]'s output (SPEC: exactly this, no charset).
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Every metric name starts with this and an underscore.
const PREFIX: &str = "smtp_oauth_bridge";

/// Upper bounds (seconds) of the relay latency histogram buckets.
const LATENCY_BUCKETS: [f64; 11] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A float gauge (seconds).
type FloatGauge = Gauge<f64, AtomicU64>;

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// `{account, outcome}`. The account is shared with the interner, so a message whose
/// series exists already allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MessageLabels {
    account: Arc<str>,
    outcome: Outcome,
}

impl EncodeLabelValue for Via {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// `{account, via}`: how a session's client was let send.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ViaLabels {
    account: Arc<str>,
    via: Via,
}

/// `{reason}` of a connection refused at accept.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    reason: &'static str,
}

/// `{result}` of a configuration reload: `ok` or `failed`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AccountLabels {
    account: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClassLabels {
    class: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SessionLabels {
    account: Arc<str>,
    state: &'static str,
}

/// Per-account state read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct AccountSnapshot {
    pub account: String,
    pub token_expires_in_secs: Option<f64>,
    pub needs_login: bool,
    pub token_refreshes: u64,
    pub token_failures: u64,
    /// Failed writes of the account's tokens to the token store.
    pub token_store_write_failures: u64,
    pub upstream_sessions_busy: usize,
    pub upstream_sessions_idle: usize,
}

/// Process state read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub accounts: Vec<AccountSnapshot>,
    /// Spool mode only: messages waiting and the oldest one's age.
    pub spool: Option<(usize, Option<f64>)>,
}

/// The event metrics of one process, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Account names seen so far, each allocated once (accounts come from the configuration,
    /// so this is bounded by it).
    accounts: Mutex<HashSet<Arc<str>>>,
    messages: Family<MessageLabels, Counter>,
    bytes: Family<AccountLabels, Counter>,
    upstream_replies: Family<ClassLabels, Counter>,
    latency: Histogram,
    local_sessions: Gauge,
    auth_failures: Counter,
    via: Family<ViaLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let messages = Family::<MessageLabels, Counter>::default();
        let bytes = Family::<AccountLabels, Counter>::default();
        let upstream_replies = Family::<ClassLabels, Counter>::default();
        let latency = Histogram::new(LATENCY_BUCKETS);
        let local_sessions = Gauge::default();
        let auth_failures = Counter::default();
        let via = Family::<ViaLabels, Counter>::default();
        let refused = Family::<RefusedLabels, Counter>::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register(
            "messages",
            "Messages by account and outcome (delivered, rejected, deferred, spooled, dead)",
            messages.clone(),
        );
        registry.register(
            "message_bytes",
            "Bytes of messages delivered or spooled, by account",
            bytes.clone(),
        );
        registry.register(
            "upstream_replies",
            "Final upstream replies to messages by class (none: no reply, e.g. connection failure)",
            upstream_replies.clone(),
        );
        registry.register(
            "relay_duration_seconds",
            "Time from MAIL to the final reply of each relayed message",
            latency.clone(),
        );
        registry.register(
            "local_sessions",
            "Local SMTP connections open now",
            local_sessions.clone(),
        );
        registry.register(
            "auth_failures",
            "Failed local AUTH attempts",
            auth_failures.clone(),
        );
        registry.register(
            "messages_via",
            "Messages local clients sent, by account and how the client was let send (auth: AUTH; network: a relay_network, without AUTH)",
            via.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused at accept, by reason (network: outside listen.allow_networks)",
            refused.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP) by result (ok: in effect; failed: invalid, the running configuration stays)",
            reloads.clone(),
        );
        Metrics {
            registry,
            accounts: Mutex::default(),
            messages,
            bytes,
            upstream_replies,
            latency,
            local_sessions,
            auth_failures,
            via,
            refused,
            reloads,
        }
    }
}

impl Metrics {
    /// Writes the relay log line for a message and counts it.
    pub(crate) fn record(&self, e: &RelayEvent<'_>) {
        telemetry::relay_event(e);
        let account = self.account(e.account);
        // Which counters an outcome moves; a new outcome must decide here.
        let (counts_bytes, ends_an_attempt) = match e.outcome {
            Outcome::Delivered => (true, true),
            Outcome::Spooled => (true, false),
            Outcome::Rejected | Outcome::Deferred | Outcome::Dead => (false, true),
            // An operator removed it from the spool: no attempt ended, nothing was sent.
            Outcome::Deleted => (false, false),
        };
        self.messages
            .get_or_create(&MessageLabels {
                account: account.clone(),
                outcome: e.outcome,
            })
            .inc();
        if let Some(via) = e.via {
            self.via
                .get_or_create(&ViaLabels {
                    account: account.clone(),
                    via,
                })
                .inc();
        }
        if counts_bytes {
            self.bytes
                .get_or_create(&AccountLabels { account })
                .inc_by(e.bytes as u64);
        }
        if ends_an_attempt {
            let class = match e.upstream_code {
                200..=299 => "2xx",
                400..=499 => "4xx",
                500..=599 => "5xx",
                _ => "none",
            };
            self.upstream_replies
                .get_or_create(&ClassLabels { class })
                .inc();
            self.latency.observe(e.ms as f64 / 1000.0);
        }
    }

    /// The shared name of an account: allocated the first time it is seen, then reused.
    fn account(&self, name: &str) -> Arc<str> {
        let mut seen = crate::sync::lock(&self.accounts);
        if let Some(a) = seen.get(name) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(name);
        seen.insert(a.clone());
        a
    }

    pub(crate) fn session_opened(&self) {
        self.local_sessions.inc();
    }

    pub(crate) fn session_closed(&self) {
        self.local_sessions.dec();
    }

    /// A configuration reload took effect (`ok`) or was refused (`failed`).
    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    pub fn auth_failed(&self) {
        self.auth_failures.inc();
    }

    /// A client outside `listen.allow_networks` was refused at accept.
    pub(crate) fn connection_refused_network(&self) {
        self.refused
            .get_or_create(&RefusedLabels { reason: "network" })
            .inc();
    }

    /// The Prometheus text exposition (format 0.0.4) of the event metrics and `snap`.
    pub fn render(&self, snap: &Snapshot) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(4096);
        prometheus_text::encode(&mut out, &self.registry)?;
        prometheus_text::encode(&mut out, &state_registry(snap))?;
        Ok(out)
    }
}

fn gauge_of(n: usize) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(n).unwrap_or(i64::MAX));
    g
}

fn seconds(v: Option<f64>) -> FloatGauge {
    let g = FloatGauge::default();
    g.set(v.unwrap_or(0.0));
    g
}

/// The state metrics of one scrape, in a registry of their own.
fn state_registry(snap: &Snapshot) -> Registry {
    let sessions = Family::<SessionLabels, Gauge>::default();
    let refreshes = Family::<AccountLabels, Counter>::default();
    let failures = Family::<AccountLabels, Counter>::default();
    let store_failures = Family::<AccountLabels, Counter>::default();
    let expiry = Family::<AccountLabels, FloatGauge>::default();
    let needs_login = Family::<AccountLabels, Gauge>::default();
    for a in &snap.accounts {
        let account: Arc<str> = Arc::from(a.account.as_str());
        let labels = AccountLabels {
            account: account.clone(),
        };
        for (state, n) in [
            ("busy", a.upstream_sessions_busy),
            ("idle", a.upstream_sessions_idle),
        ] {
            sessions
                .get_or_create(&SessionLabels {
                    account: account.clone(),
                    state,
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        refreshes.get_or_create(&labels).inc_by(a.token_refreshes);
        failures.get_or_create(&labels).inc_by(a.token_failures);
        store_failures
            .get_or_create(&labels)
            .inc_by(a.token_store_write_failures);
        expiry
            .get_or_create(&labels)
            .set(a.token_expires_in_secs.unwrap_or(0.0));
        needs_login
            .get_or_create(&labels)
            .set(i64::from(a.needs_login));
    }
    let mut r = Registry::with_prefix(PREFIX);
    r.register(
        "upstream_sessions",
        "Upstream SMTP sessions by account and state (busy, idle)",
        sessions,
    );
    r.register(
        "token_refreshes",
        "Successful token requests by account",
        refreshes,
    );
    r.register(
        "token_refresh_failures",
        "Failed token requests by account",
        failures,
    );
    r.register(
        "token_store_write_failures",
        "Failed writes of an account's tokens to the token store (a rotated refresh token not saved is lost at restart)",
        store_failures,
    );
    r.register(
        "token_expiry_seconds",
        "Seconds until the account's access token expires (0 without one)",
        expiry,
    );
    r.register(
        "account_needs_login",
        "1 when the account's refresh token was refused and a person must run login",
        needs_login,
    );
    if let Some((depth, oldest)) = snap.spool {
        r.register(
            "spool_messages",
            "Messages waiting in the spool",
            gauge_of(depth),
        );
        r.register(
            "spool_oldest_age_seconds",
            "Age of the oldest message in the spool (0 when empty)",
            seconds(oldest),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(
        account: &'a str,
        outcome: Outcome,
        code: u16,
        bytes: usize,
        ms: u64,
    ) -> RelayEvent<'a> {
        RelayEvent {
            id: "0000000000000001",
            account,
            from: "scanner@contoso.com",
            rcpts: &[],
            bytes,
            outcome,
            upstream_code: code,
            upstream_reply: "",
            ms,
            via: None,
        }
    }

    /// The exposition's lines, sorted (series within a family come in no fixed order).
    fn sorted_lines(text: &str) -> Vec<&str> {
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort_unstable();
        lines
    }

    fn help_and_type(name: &str, kind: &str, help: &str) -> [String; 2] {
        [
            format!("# HELP smtp_oauth_bridge_{name} {help}"),
            format!("# TYPE smtp_oauth_bridge_{name} {kind}"),
        ]
    }

    #[test]
    fn exposition_has_exactly_the_expected_series() {
        let m = Metrics::default();
        m.record(&event("scanner", Outcome::Delivered, 250, 100, 40));
        m.record(&event("scanner", Outcome::Delivered, 250, 20, 600));
        m.record(&event("scanner", Outcome::Rejected, 554, 7, 3));
        m.record(&event("printer", Outcome::Spooled, 0, 9, 1));
        m.record(&event("printer", Outcome::Deferred, 0, 9, 31_000));
        m.session_opened();
        m.session_opened();
        m.session_closed();
        m.auth_failed();
        let snap = Snapshot {
            accounts: vec![AccountSnapshot {
                account: "scanner".into(),
                token_expires_in_secs: Some(3599.5),
                needs_login: false,
                token_refreshes: 2,
                token_failures: 1,
                token_store_write_failures: 3,
                upstream_sessions_busy: 1,
                upstream_sessions_idle: 3,
            }],
            spool: Some((4, Some(12.5))),
        };
        let text = m.render(&snap).expect("renders");
        let mut expected: Vec<String> = Vec::new();
        let mut family = |name: &str, kind: &str, help: &str, series: &[&str]| {
            expected.extend(help_and_type(name, kind, help));
            expected.extend(series.iter().map(|s| format!("smtp_oauth_bridge_{s}")));
        };
        family(
            "messages_total",
            "counter",
            "Messages by account and outcome (delivered, rejected, deferred, spooled, dead).",
            &[
                r#"messages_total{account="scanner",outcome="delivered"} 2"#,
                r#"messages_total{account="scanner",outcome="rejected"} 1"#,
                r#"messages_total{account="printer",outcome="spooled"} 1"#,
                r#"messages_total{account="printer",outcome="deferred"} 1"#,
            ],
        );
        family(
            "message_bytes_total",
            "counter",
            "Bytes of messages delivered or spooled, by account.",
            &[
                r#"message_bytes_total{account="scanner"} 120"#,
                r#"message_bytes_total{account="printer"} 9"#,
            ],
        );
        family(
            "upstream_replies_total",
            "counter",
            "Final upstream replies to messages by class (none: no reply, e.g. connection failure).",
            &[
                r#"upstream_replies_total{class="2xx"} 2"#,
                r#"upstream_replies_total{class="5xx"} 1"#,
                r#"upstream_replies_total{class="none"} 1"#,
            ],
        );
        family(
            "relay_duration_seconds",
            "histogram",
            "Time from MAIL to the final reply of each relayed message.",
            &[
                r#"relay_duration_seconds_bucket{le="0.01"} 1"#,
                r#"relay_duration_seconds_bucket{le="0.025"} 1"#,
                r#"relay_duration_seconds_bucket{le="0.05"} 2"#,
                r#"relay_duration_seconds_bucket{le="0.1"} 2"#,
                r#"relay_duration_seconds_bucket{le="0.25"} 2"#,
                r#"relay_duration_seconds_bucket{le="0.5"} 2"#,
                r#"relay_duration_seconds_bucket{le="1"} 3"#,
                r#"relay_duration_seconds_bucket{le="2.5"} 3"#,
                r#"relay_duration_seconds_bucket{le="5"} 3"#,
                r#"relay_duration_seconds_bucket{le="10"} 3"#,
                r#"relay_duration_seconds_bucket{le="30"} 3"#,
                r#"relay_duration_seconds_bucket{le="+Inf"} 4"#,
                "relay_duration_seconds_sum 31.643",
                "relay_duration_seconds_count 4",
            ],
        );
        family(
            "local_sessions",
            "gauge",
            "Local SMTP connections open now.",
            &["local_sessions 1"],
        );
        family(
            "auth_failures_total",
            "counter",
            "Failed local AUTH attempts.",
            &["auth_failures_total 1"],
        );
        family(
            "upstream_sessions",
            "gauge",
            "Upstream SMTP sessions by account and state (busy, idle).",
            &[
                r#"upstream_sessions{account="scanner",state="busy"} 1"#,
                r#"upstream_sessions{account="scanner",state="idle"} 3"#,
            ],
        );
        family(
            "token_refreshes_total",
            "counter",
            "Successful token requests by account.",
            &[r#"token_refreshes_total{account="scanner"} 2"#],
        );
        family(
            "token_refresh_failures_total",
            "counter",
            "Failed token requests by account.",
            &[r#"token_refresh_failures_total{account="scanner"} 1"#],
        );
        family(
            "token_store_write_failures_total",
            "counter",
            "Failed writes of an account's tokens to the token store (a rotated refresh token not saved is lost at restart).",
            &[r#"token_store_write_failures_total{account="scanner"} 3"#],
        );
        family(
            "token_expiry_seconds",
            "gauge",
            "Seconds until the account's access token expires (0 without one).",
            &[r#"token_expiry_seconds{account="scanner"} 3599.5"#],
        );
        family(
            "account_needs_login",
            "gauge",
            "1 when the account's refresh token was refused and a person must run login.",
            &[r#"account_needs_login{account="scanner"} 0"#],
        );
        family(
            "spool_messages",
            "gauge",
            "Messages waiting in the spool.",
            &["spool_messages 4"],
        );
        family(
            "spool_oldest_age_seconds",
            "gauge",
            "Age of the oldest message in the spool (0 when empty).",
            &["spool_oldest_age_seconds 12.5"],
        );
        let mut expected: Vec<&str> = expected.iter().map(String::as_str).collect();
        expected.sort_unstable();
        assert_eq!(sorted_lines(&text), expected, "{text}");
        assert!(!text.contains("# EOF"), "{text}");

        // Each family's HELP and TYPE come before its samples, as one block, and a
        // Prometheus parser reads the types back.
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("valid Prometheus text");
        let counter = |name: &str, labels: &[(&str, &str)]| {
            scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                })
                .map(|s| s.value.clone())
        };
        assert!(matches!(
            counter("smtp_oauth_bridge_messages_total", &[("outcome", "delivered")]),
            Some(prometheus_parse::Value::Counter(v)) if v == 2.0
        ));
        assert!(matches!(
            counter("smtp_oauth_bridge_local_sessions", &[]),
            Some(prometheus_parse::Value::Gauge(v)) if v == 1.0
        ));
        assert!(matches!(
            counter("smtp_oauth_bridge_relay_duration_seconds", &[]),
            Some(prometheus_parse::Value::Histogram(_))
        ));
    }

    #[test]
    fn without_spool_or_events_only_the_fixed_series_appear() {
        let text = Metrics::default()
            .render(&Snapshot::default())
            .expect("renders");
        assert!(!text.contains("spool"), "{text}");
        assert!(
            !text.contains("smtp_oauth_bridge_messages_total{"),
            "{text}"
        );
        assert!(
            text.contains("\nsmtp_oauth_bridge_auth_failures_total 0\n"),
            "{text}"
        );
        assert!(
            text.contains("\nsmtp_oauth_bridge_local_sessions 0\n"),
            "{text}"
        );
        assert!(
            text.contains("\nsmtp_oauth_bridge_relay_duration_seconds_count 0\n"),
            "{text}"
        );
        // prometheus-client writes no HELP/TYPE for a family without series.
        assert!(!text.contains("messages_total"), "{text}");
        assert!(!text.contains("upstream_sessions"), "{text}");
        assert!(text.contains("# TYPE smtp_oauth_bridge_local_sessions gauge\n"));
        assert!(text.contains("# TYPE smtp_oauth_bridge_auth_failures_total counter\n"));
    }

    #[test]
    fn every_outcome_is_its_relay_log_value_as_a_label() {
        let m = Metrics::default();
        for o in Outcome::ALL {
            m.record(&event("a", o, 250, 1, 1));
        }
        let text = m.render(&Snapshot::default()).expect("renders");
        for (o, value) in [
            (Outcome::Delivered, "delivered"),
            (Outcome::Rejected, "rejected"),
            (Outcome::Deferred, "deferred"),
            (Outcome::Spooled, "spooled"),
            (Outcome::Dead, "dead"),
            (Outcome::Deleted, "deleted"),
        ] {
            assert_eq!(o.as_str(), value);
            let line = format!(
                "smtp_oauth_bridge_messages_total{{account=\"a\",outcome=\"{value}\"}} 1\n"
            );
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        // Bytes for delivered and spooled only; an upstream reply for every outcome but
        // spooled and deleted.
        assert!(text.contains("smtp_oauth_bridge_message_bytes_total{account=\"a\"} 2\n"));
        assert!(text.contains("smtp_oauth_bridge_upstream_replies_total{class=\"2xx\"} 4\n"));
        assert!(text.contains("smtp_oauth_bridge_relay_duration_seconds_count 4\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::default();
        m.record(&event("a\"b\\c\nd", Outcome::Delivered, 250, 1, 1));
        let text = m.render(&Snapshot::default()).expect("renders");
        assert!(
            text.contains(
                r#"smtp_oauth_bridge_messages_total{account="a\"b\\c\nd",outcome="delivered"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn an_account_is_allocated_once() {
        let m = Metrics::default();
        let first = m.account("scanner");
        let again = m.account("scanner");
        assert!(Arc::ptr_eq(&first, &again));
        m.record(&event("scanner", Outcome::Delivered, 250, 1, 1));
        assert_eq!(m.accounts.lock().map(|s| s.len()).unwrap_or(0), 1);
        assert!(Arc::ptr_eq(&first, &m.account("scanner")));
    }

    #[test]
    fn sessions_count_their_path_and_refusals_their_reason() {
        let m = Metrics::default();
        let mut e = event("scanner", Outcome::Delivered, 250, 1, 1);
        e.via = Some(Via::Network);
        m.record(&e);
        m.record(&e);
        e.via = Some(Via::Auth);
        m.record(&e);
        // The spool's deliveries carry no path.
        m.record(&event("scanner", Outcome::Delivered, 250, 1, 1));
        m.connection_refused_network();
        let text = m.render(&Snapshot::default()).expect("renders");
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("messages_via") || l.contains("connections_refused"))
            .collect();
        let mut lines = lines;
        lines.sort_unstable();
        assert_eq!(
            lines,
            [
                "# HELP smtp_oauth_bridge_connections_refused_total Connections refused at accept, by reason (network: outside listen.allow_networks).",
                "# HELP smtp_oauth_bridge_messages_via_total Messages local clients sent, by account and how the client was let send (auth: AUTH; network: a relay_network, without AUTH).",
                "# TYPE smtp_oauth_bridge_connections_refused_total counter",
                "# TYPE smtp_oauth_bridge_messages_via_total counter",
                r#"smtp_oauth_bridge_connections_refused_total{reason="network"} 1"#,
                r#"smtp_oauth_bridge_messages_via_total{account="scanner",via="auth"} 1"#,
                r#"smtp_oauth_bridge_messages_via_total{account="scanner",via="network"} 2"#,
            ],
            "{text}"
        );
    }
}
