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
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
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
