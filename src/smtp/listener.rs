//! The accept loop: who may connect (`listen.allow_networks`), connection limit, STARTTLS
//! upgrade, implicit TLS (RFC 8314), graceful shutdown. What a connection says is the
//! session's business.
//!
//! The caller binds the listeners and passes them in with the shutdown token (so tests use
//! port 0 and run in parallel); one loop accepts on all of them, under one connection
//! limit. A client outside `allow_networks` is refused before anything is read: 554 5.7.1
//! on a plain listener, a closed connection on an implicit-TLS one (it could not read a
//! plaintext reply), counted, and logged at INFO at most once a second (DEBUG otherwise, so
//! a flood does not flood the log). On shutdown we stop accepting, sessions between
//! transactions are told 421, and transactions in flight get a bounded grace period.
//!
//! What a new connection gets (its [`SessionContext`] and the admission rules) is read
//! from a `watch` channel at each accept ([`Live`]): a configuration reload publishes a new
//! value, and sessions keep the context they started with.

use crate::smtp::policy;
use crate::smtp::reply;
use crate::smtp::session::{End, Session, SessionContext};
use ipnet::IpNet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

/// After the grace period, how long sessions get to write their 421 before we return.
const HARD_STOP_DRAIN: Duration = Duration::from_secs(5);
/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// One bound socket and what is spoken on it.
#[derive(Debug)]
pub(crate) struct Bound {
    pub listener: TcpListener,
    /// TLS from the first byte (`listen.smtps`); otherwise plain, STARTTLS when offered.
    pub implicit_tls: bool,
}

/// Who may connect and how many at once.
#[derive(Debug, Clone)]
pub(crate) struct Admission {
    /// `listen.allow_networks`; `None`: any address.
    pub allow_networks: Option<Vec<IpNet>>,
    pub max_connections: usize,
}

/// What a new connection is served with; a reload sends a new one. Every value shares the
/// first one's `shutdown` and `hard_stop` tokens.
#[derive(Debug, Clone)]
pub struct Live {
    pub ctx: Arc<SessionContext>,
    pub admission: Admission,
}

/// The connection limit, resized when a reload changes `listen.max_connections`.
struct Limit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl Limit {
    fn new(max: usize) -> Limit {
        Limit {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Grows at once; shrinks by the free permits now and the rest as connections end.
    fn resize(&mut self, max: usize) {
        if max > self.max {
            self.permits.add_permits(max - self.max);
        } else if max < self.max {
            let want = self.max - max;
            let rest = want - self.permits.forget_permits(want);
            if rest > 0 {
                let permits = self.permits.clone();
                let rest = u32::try_from(rest).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(p) = permits.acquire_many_owned(rest).await {
                        p.forget();
                    }
                });
            }
        }
        self.max = max;
    }
}

/// Accepts connections on every listener until the context's shutdown fires, then drains
/// sessions (bounded). Each connection is served with the [`Live`] value current when it
/// is accepted. `tls` serves STARTTLS and the implicit-TLS listeners.
pub async fn serve(
    listeners: Vec<Bound>,
    live: watch::Receiver<Live>,
    tls: Option<TlsAcceptor>,
    grace: Duration,
) {
    let (shutdown, hard_stop, first_max) = {
        let l = live.borrow();
        (
            l.ctx.shutdown.clone(),
            l.ctx.hard_stop.clone(),
            l.admission.max_connections,
        )
    };
    let mut limit = Limit::new(first_max);
    let tracker = TaskTracker::new();
    let mut accept_errors = AcceptErrors::default();
    let mut refusals =
        RefusalLog::new("connection from outside listen.allow_networks refused (554 5.7.1)");
    let mut over_limit = RefusalLog::new("connection limit reached; refusing (421 4.3.2)");
    let mut next = 0;
    loop {
        let (which, accepted) = tokio::select! {
            a = accept_any(&listeners, &mut next) => a,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                accept_errors.accepted("smtp");
                a
            }
            Err(e) => {
                // EMFILE and friends: back off (still stopping on shutdown) instead of spinning.
                let wait = accept_errors.failed("smtp", &e);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
        };
        let Live { ctx, admission } = live.borrow().clone();
        if admission.max_connections != limit.max {
            limit.resize(admission.max_connections);
        }
        let _ = stream.set_nodelay(true);
        let implicit_tls = listeners.get(which).is_some_and(|b| b.implicit_tls);
        if !policy::connection_allowed(admission.allow_networks.as_deref(), peer.ip()) {
            ctx.metrics.connection_refused_network();
            refusals.note(peer);
            if !implicit_tls {
                refuse(stream, &reply::NETWORK_REFUSED);
            }
            continue;
        }
        let Ok(permit) = limit.permits.clone().try_acquire_owned() else {
            over_limit.note(peer);
            refuse(stream, &reply::TOO_MANY_CONNECTIONS);
            continue;
        };
        let tls = tls.clone();
        tracker.spawn(async move {
            ctx.metrics.session_opened();
            match (implicit_tls, tls) {
                (true, Some(acceptor)) => handle_implicit(stream, peer, &ctx, acceptor).await,
                (true, None) => {}
                (false, tls) => handle(stream, peer, &ctx, tls).await,
            }
            ctx.metrics.session_closed();
            drop(permit);
        });
    }
    drop(listeners);
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            sessions = tracker.len(),
            grace_secs = grace.as_secs(),
            "grace period over; telling remaining sessions 421"
        );
        hard_stop.cancel();
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

/// The next connection on any of `listeners`, with the index of the one it came in on;
/// the listener polled first rotates, so a busy one cannot starve the others.
fn accept_any<'a>(
    listeners: &'a [Bound],
    next: &'a mut usize,
) -> impl Future<Output = (usize, std::io::Result<(TcpStream, SocketAddr)>)> + 'a {
    std::future::poll_fn(move |cx| {
        let n = listeners.len();
        for k in 0..n {
            let i = (*next + k) % n;
            if let Poll::Ready(r) = listeners[i].listener.poll_accept(cx) {
                *next = (i + 1) % n;
                return Poll::Ready((i, r));
            }
        }
        Poll::Pending
    })
}

/// Logs refused connections at INFO at most once a second, the rest at DEBUG.
#[derive(Debug, Default)]
struct RefusalLog {
    what: &'static str,
    last_info: Option<tokio::time::Instant>,
    /// Refusals logged at DEBUG since the last INFO line.
    quiet: u64,
}

impl RefusalLog {
    fn new(what: &'static str) -> RefusalLog {
        RefusalLog {
            what,
            last_info: None,
            quiet: 0,
        }
    }

    /// One INFO line a second at most (with how many were refused quietly since); the rest
    /// at DEBUG, so a flood of connections cannot flood the log.
    fn note(&mut self, peer: SocketAddr) {
        let now = tokio::time::Instant::now();
        if self
            .last_info
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.quiet += 1;
            tracing::debug!(%peer, "{}", self.what);
            return;
        }
        tracing::info!(%peer, also_refused = self.quiet, "{}", self.what);
        self.last_info = Some(now);
        self.quiet = 0;
    }
}

/// Refuses a connection with one reply, written without waiting (it fits any socket buffer)
/// and without a task: a flood of connections costs no more than their accept.
fn refuse(stream: TcpStream, r: &crate::reply::Reply) {
    let mut out = Vec::new();
    r.write_to(&mut out);
    let _ = stream.try_write(&out);
}

/// Implicit TLS (`listen.smtps`): the handshake first (bounded), then the session over TLS
/// with its greeting. A client that does not speak TLS fails the handshake and is closed.
async fn handle_implicit(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: &SessionContext,
    acceptor: TlsAcceptor,
) {
    tracing::debug!(%peer, "connection (implicit TLS)");
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            let _ = Session::new(ctx, tls_stream, peer, true).run(true).await;
        }
        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed (implicit TLS)"),
        Err(_) => tracing::info!(%peer, "TLS handshake timed out (implicit TLS)"),
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
