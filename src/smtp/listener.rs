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

use crate::smtp::policy;
use crate::smtp::reply;
use crate::smtp::session::{End, Session, SessionContext};
use ipnet::IpNet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
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

/// One bound socket and what is spoken on it.
#[derive(Debug)]
pub struct Bound {
    pub listener: TcpListener,
    /// TLS from the first byte (`listen.smtps`); otherwise plain, STARTTLS when offered.
    pub implicit_tls: bool,
}

/// Who may connect and how many at once.
#[derive(Debug, Clone)]
pub struct Admission {
    /// `listen.allow_networks`; `None`: any address.
    pub allow_networks: Option<Vec<IpNet>>,
    pub max_connections: usize,
}

/// Accepts connections on every listener until `ctx.shutdown` fires, then drains sessions
/// (bounded). `tls` serves STARTTLS and the implicit-TLS listeners.
pub async fn serve(
    listeners: Vec<Bound>,
    ctx: Arc<SessionContext>,
    tls: Option<TlsAcceptor>,
    admission: Admission,
    grace: Duration,
) {
    let max_connections = admission.max_connections;
    let limit = Arc::new(Semaphore::new(max_connections));
    let tracker = TaskTracker::new();
    let mut refusals = RefusalLog::default();
    let mut next = 0;
    loop {
        let (which, accepted) = tokio::select! {
            a = accept_any(&listeners, &mut next) => a,
            _ = ctx.shutdown.cancelled() => break,
        };
        let (mut stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let implicit_tls = listeners.get(which).is_some_and(|b| b.implicit_tls);
        if !policy::connection_allowed(admission.allow_networks.as_deref(), peer.ip()) {
            ctx.metrics.connection_refused_network();
            refusals.note(peer);
            if !implicit_tls {
                tracker.spawn(async move {
                    let mut out = Vec::new();
                    reply::NETWORK_REFUSED.write_to(&mut out);
                    let write = stream.write_all(&out);
                    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
                });
            }
            continue;
        }
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
        ctx.hard_stop.cancel();
        let _ = tokio::time::timeout(HARD_STOP_DRAIN, tracker.wait()).await;
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
    last_info: Option<tokio::time::Instant>,
    /// Refusals logged at DEBUG since the last INFO line.
    quiet: u64,
}

impl RefusalLog {
    fn note(&mut self, peer: SocketAddr) {
        let now = tokio::time::Instant::now();
        if self
            .last_info
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.quiet += 1;
            tracing::debug!(%peer, "connection from outside listen.allow_networks refused");
            return;
        }
        tracing::info!(%peer, also_refused = self.quiet, "connection from outside listen.allow_networks refused (554 5.7.1)");
        self.last_info = Some(now);
        self.quiet = 0;
    }
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
