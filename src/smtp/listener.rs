//! The accept loop: connection limit, STARTTLS upgrade, graceful shutdown. What a
//! connection says is the session's business.
//!
//! The caller binds the listener and passes it in with the shutdown token (so tests use
//! port 0 and run in parallel). On shutdown we stop accepting, sessions between
//! transactions are told 421, and transactions in flight get a bounded grace period.

use crate::smtp::reply;
use crate::smtp::session::{End, Session, SessionContext};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

/// After the grace period, how long sessions get to write their 421 before we return.
const HARD_STOP_DRAIN: Duration = Duration::from_secs(5);
/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts connections until `ctx.shutdown` fires, then drains sessions (bounded).
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<SessionContext>,
    tls: Option<TlsAcceptor>,
    max_connections: usize,
    grace: Duration,
) {
    let limit = Arc::new(Semaphore::new(max_connections));
    let tracker = TaskTracker::new();
    let mut accept_errors = AcceptErrors::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = ctx.shutdown.cancelled() => break,
        };
        let (mut stream, peer) = match accepted {
            Ok(a) => {
                accept_errors.accepted("smtp");
                a
            }
            Err(e) => {
                // EMFILE and friends: back off (still stopping on shutdown) instead of spinning.
                let wait = accept_errors.failed("smtp", &e);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = ctx.shutdown.cancelled() => break,
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max_connections, "connection limit reached; refusing");
            tracker.spawn(async move {
                let mut out = Vec::new();
                reply::TOO_MANY_CONNECTIONS.write_to(&mut out);
                let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&out)).await;
            });
            continue;
        };
        let ctx = ctx.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            ctx.metrics.session_opened();
            handle(stream, peer, &ctx, tls).await;
            ctx.metrics.session_closed();
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            sessions = tracker.len(),
            grace_secs = grace.as_secs(),
            "grace period over; telling remaining sessions 421"
        );
        ctx.hard_stop.cancel();
        let _ = tokio::time::timeout(HARD_STOP_DRAIN, tracker.wait()).await;
    }
}

/// The first wait after a failed accept; it doubles while accept keeps failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest wait between accepts while they fail (EMFILE clears when connections close).
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// While accept keeps failing, one log line per this long (with the count), not per failure.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

/// What an accept loop does when `accept` fails (out of file descriptors, mostly): it logs
/// the first failure of a burst and then one line a minute with the count, backs off
/// exponentially, and says once when accepting works again. Used by every accept loop
/// (SMTP, admin).
#[derive(Debug, Default)]
pub(crate) struct AcceptErrors {
    /// Failures since the last successful accept.
    burst: u64,
    /// Failures not logged yet.
    unlogged: u64,
    logged_at: Option<tokio::time::Instant>,
    wait: Duration,
}

/// What to do about one failed accept.
#[derive(Debug, PartialEq, Eq)]
struct AcceptFailure {
    wait: Duration,
    /// Log now, reporting this many failures (this one included).
    log: Option<u64>,
}

impl AcceptErrors {
    /// After a failed accept: logs if due; returns how long to wait before the next accept.
    pub(crate) fn failed(&mut self, listener: &'static str, e: &std::io::Error) -> Duration {
        let f = self.on_failure(tokio::time::Instant::now());
        match f.log {
            Some(1) => tracing::warn!(listener, error = %e, "accept failed; backing off"),
            Some(n) => tracing::warn!(listener, error = %e, failures = n, "accept still failing"),
            None => {}
        }
        f.wait
    }

    /// After a successful accept: ends a burst of failures (logged once).
    pub(crate) fn accepted(&mut self, listener: &'static str) {
        if let Some(n) = self.on_success() {
            tracing::info!(listener, failures = n, "accepting connections again");
        }
    }

    fn on_failure(&mut self, now: tokio::time::Instant) -> AcceptFailure {
        self.burst += 1;
        self.unlogged += 1;
        self.wait = (self.wait * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
        let due = self
            .logged_at
            .is_none_or(|t| now.saturating_duration_since(t) >= ACCEPT_ERROR_LOG_EVERY);
        let log = due.then(|| {
            self.logged_at = Some(now);
            std::mem::take(&mut self.unlogged)
        });
        AcceptFailure {
            wait: self.wait,
            log,
        }
    }

    fn on_success(&mut self) -> Option<u64> {
        let burst = std::mem::take(&mut self.burst);
        *self = AcceptErrors::default();
        (burst > 0).then_some(burst)
    }
}

async fn handle(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    ctx: &SessionContext,
    tls: Option<TlsAcceptor>,
) {
    tracing::debug!(%peer, "connection");
    let End::StartTls(stream) = Session::new(ctx, stream, peer, false).run(true).await else {
        return;
    };
    let Some(acceptor) = tls else { return };
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            // After the handshake the client starts over with EHLO; no new greeting.
            let _ = Session::new(ctx, tls_stream, peer, true).run(false).await;
        }
        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_minutes_of_failed_accepts_log_a_line_a_minute_and_back_off() {
        let mut errors = AcceptErrors::default();
        let start = tokio::time::Instant::now();
        let mut now = start;
        let (mut failures, mut lines, mut reported) = (0u64, 0u64, 0u64);
        let mut waits = Vec::new();
        while now - start < Duration::from_secs(600) {
            let f = errors.on_failure(now);
            failures += 1;
            if let Some(n) = f.log {
                lines += 1;
                reported += n;
            }
            assert!(f.wait >= ACCEPT_BACKOFF_MIN && f.wait <= ACCEPT_BACKOFF_MAX);
            waits.push(f.wait);
            now += f.wait;
        }
        // The first failure at once, then one line a minute; none lost from the counts.
        assert_eq!(lines, 10, "{lines} lines for {failures} failures");
        assert_eq!(reported + errors.unlogged, failures);
        assert_eq!(
            waits[..8].iter().map(|w| w.as_millis()).collect::<Vec<_>>(),
            [10, 20, 40, 80, 160, 320, 640, 1000]
        );
        // About one attempt a second, not ten.
        assert!(failures < 620, "{failures}");
        // A success ends the burst: counted once, and the next failure is logged at once
        // with the shortest wait again.
        assert_eq!(errors.on_success(), Some(failures));
        assert_eq!(errors.on_success(), None);
        assert_eq!(
            errors.on_failure(now),
            AcceptFailure {
                wait: ACCEPT_BACKOFF_MIN,
                log: Some(1)
            }
        );
    }
}
