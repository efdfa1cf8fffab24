//! Counters the bridge keeps per process, and their Prometheus text exposition (0.0.4).
//!
//! Event counters live here and move when a message gets its relay log line
//! ([`Metrics::record`] is the one place that writes that line), when a local session opens or
//! closes, and when a local AUTH fails. Values that are state, not events (token expiry,
//! upstream sessions, spool depth), are read from their owners at scrape time and passed to
//! [`Metrics::render`]. The exposition is written by hand: a few dozen series whose values
//! mostly come from live state would otherwise need a custom registry collector.

use crate::sync::lock;
use crate::telemetry::{self, RelayEvent};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the relay latency histogram buckets.
const LATENCY_BUCKETS: [f64; 11] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// Per-account state read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct AccountSnapshot {
    pub account: String,
    pub token_expires_in_secs: Option<f64>,
    pub needs_login: bool,
    pub token_refreshes: u64,
    pub token_failures: u64,
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

#[derive(Debug, Default)]
pub struct Metrics {
    /// account -> outcome -> count
    messages: Mutex<BTreeMap<String, BTreeMap<&'static str, u64>>>,
    bytes: Mutex<BTreeMap<String, u64>>,
    upstream_replies: Mutex<BTreeMap<&'static str, u64>>,
    latency: Histogram,
    local_sessions: AtomicI64,
    auth_failures: AtomicU64,
}

/// Escapes a label value for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Writes the relay log line for a message and counts it.
    pub fn record(&self, e: &RelayEvent<'_>) {
        telemetry::relay_event(e);
        // The account's entry is created once; later messages allocate nothing here.
        {
            let mut m = lock(&self.messages);
            if !m.contains_key(e.account) {
                m.insert(e.account.to_string(), BTreeMap::new());
            }
            if let Some(by_outcome) = m.get_mut(e.account) {
                *by_outcome.entry(e.outcome).or_default() += 1;
            }
        }
        if e.outcome == "delivered" || e.outcome == "spooled" {
            let mut b = lock(&self.bytes);
            match b.get_mut(e.account) {
                Some(n) => *n += e.bytes as u64,
                None => {
                    b.insert(e.account.to_string(), e.bytes as u64);
                }
            }
        }
        if e.outcome != "spooled" {
            let class = match e.upstream_code {
                200..=299 => "2xx",
                400..=499 => "4xx",
                500..=599 => "5xx",
                _ => "none",
            };
            *lock(&self.upstream_replies).entry(class).or_default() += 1;
            let secs = e.ms as f64 / 1000.0;
            for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                if secs <= *bound {
                    self.latency.buckets[i].fetch_add(1, Ordering::Relaxed);
                }
            }
            self.latency.count.fetch_add(1, Ordering::Relaxed);
            self.latency
                .sum_micros
                .fetch_add(e.ms * 1000, Ordering::Relaxed);
        }
    }

    pub fn session_opened(&self) {
        self.local_sessions.fetch_add(1, Ordering::Relaxed);
    }

    pub fn session_closed(&self) {
        self.local_sessions.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn auth_failed(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, snap: &Snapshot) -> String {
        let mut o = String::with_capacity(4096);
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP smtp_oauth_bridge_{name} {help}");
            let _ = writeln!(o, "# TYPE smtp_oauth_bridge_{name} {kind}");
        };
        head(
            &mut o,
            "messages_total",
            "counter",
            "Messages by account and outcome (delivered, rejected, deferred, spooled, dead).",
        );
        for (account, outcome, n) in lock(&self.messages)
            .iter()
            .flat_map(|(a, m)| m.iter().map(move |(o, n)| (a, o, n)))
        {
            let _ = writeln!(
                o,
                "smtp_oauth_bridge_messages_total{{account=\"{}\",outcome=\"{}\"}} {n}",
                label(account),
                label(outcome)
            );
        }
        head(
            &mut o,
            "message_bytes_total",
            "counter",
            "Bytes of messages delivered or spooled, by account.",
        );
        for (account, n) in lock(&self.bytes).iter() {
            let _ = writeln!(
                o,
                "smtp_oauth_bridge_message_bytes_total{{account=\"{}\"}} {n}",
                label(account)
            );
        }
        head(&mut o, "upstream_replies_total", "counter", "Final upstream replies to messages by class (none: no reply, e.g. connection failure).");
        for (class, n) in lock(&self.upstream_replies).iter() {
            let _ = writeln!(
                o,
                "smtp_oauth_bridge_upstream_replies_total{{class=\"{class}\"}} {n}"
            );
        }
        head(
            &mut o,
            "relay_duration_seconds",
            "histogram",
            "Time from MAIL to the final reply of each relayed message.",
        );
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            let n = self.latency.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                o,
                "smtp_oauth_bridge_relay_duration_seconds_bucket{{le=\"{bound}\"}} {n}"
            );
        }
        let count = self.latency.count.load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "smtp_oauth_bridge_relay_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            o,
            "smtp_oauth_bridge_relay_duration_seconds_sum {}",
            self.latency.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(o, "smtp_oauth_bridge_relay_duration_seconds_count {count}");
        head(
            &mut o,
            "local_sessions",
            "gauge",
            "Local SMTP connections open now.",
        );
        let _ = writeln!(
            o,
            "smtp_oauth_bridge_local_sessions {}",
            self.local_sessions.load(Ordering::Relaxed).max(0)
        );
        head(
            &mut o,
            "auth_failures_total",
            "counter",
            "Failed local AUTH attempts.",
        );
        let _ = writeln!(
            o,
            "smtp_oauth_bridge_auth_failures_total {}",
            self.auth_failures.load(Ordering::Relaxed)
        );
        head(
            &mut o,
            "upstream_sessions",
            "gauge",
            "Upstream SMTP sessions by account and state (busy, idle).",
        );
        for a in &snap.accounts {
            let acc = label(&a.account);
            let _ = writeln!(
                o,
                "smtp_oauth_bridge_upstream_sessions{{account=\"{acc}\",state=\"busy\"}} {}",
                a.upstream_sessions_busy
            );
            let _ = writeln!(
                o,
                "smtp_oauth_bridge_upstream_sessions{{account=\"{acc}\",state=\"idle\"}} {}",
                a.upstream_sessions_idle
            );
        }
        head(
            &mut o,
            "token_refreshes_total",
            "counter",
            "Successful token requests by account.",
        );
        for a in &snap.accounts {
            let _ = writeln!(
                o,
                "smtp_oauth_bridge_token_refreshes_total{{account=\"{}\"}} {}",
                label(&a.account),
                a.token_refreshes
            );
        }
        head(
            &mut o,
            "token_refresh_failures_total",
            "counter",
            "Failed token requests by account.",
        );
        for a in &snap.accounts {
            let _ = writeln!(
                o,
                "smtp_oauth_bridge_token_refresh_failures_total{{account=\"{}\"}} {}",
                label(&a.account),
                a.token_failures
            );
        }
        head(
            &mut o,
            "token_expiry_seconds",
            "gauge",
            "Seconds until the account's access token expires (0 without one).",
        );
        for a in &snap.accounts {
            let _ = writeln!(
                o,
                "smtp_oauth_bridge_token_expiry_seconds{{account=\"{}\"}} {}",
                label(&a.account),
                a.token_expires_in_secs.unwrap_or(0.0)
            );
        }
        head(
            &mut o,
            "account_needs_login",
            "gauge",
            "1 when the account's refresh token was refused and a person must run login.",
        );
        for a in &snap.accounts {
            let _ = writeln!(
                o,
                "smtp_oauth_bridge_account_needs_login{{account=\"{}\"}} {}",
                label(&a.account),
                u8::from(a.needs_login)
            );
        }
        if let Some((depth, oldest)) = snap.spool {
            head(
                &mut o,
                "spool_messages",
                "gauge",
                "Messages waiting in the spool.",
            );
            let _ = writeln!(o, "smtp_oauth_bridge_spool_messages {depth}");
            head(
                &mut o,
                "spool_oldest_age_seconds",
                "gauge",
                "Age of the oldest message in the spool (0 when empty).",
            );
            let _ = writeln!(
                o,
                "smtp_oauth_bridge_spool_oldest_age_seconds {}",
                oldest.unwrap_or(0.0)
            );
        }
        o
    }
}
