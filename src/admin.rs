//! The admin HTTP endpoint (when `listen.admin` is set): `GET /healthz`, `/readyz`, `/metrics`.
//!
//! /healthz is 200 while the process runs. /readyz is 200 when the SMTP listener is up and
//! every account has a usable access token, else 503 with a JSON body naming each account
//! that is not ready and why. /metrics is the Prometheus text exposition from `metrics`.
//! The caller binds the listener (loopback by default) and passes it in.
//!
//! Whatever the port receives, it cannot take what the SMTP listener needs: at most
//! `MAX_ADMIN_CONNECTIONS` connections (more are closed at once), a request head within
//! `HEADER_READ_TIMEOUT` (also the keep-alive idle limit), an answer within
//! `REQUEST_TIMEOUT`, and no connection older than `MAX_CONNECTION_LIFETIME`.

use crate::metrics::{AccountSnapshot, Metrics, Snapshot, CONTENT_TYPE};
use crate::oauth::manager::{AccountStatus, TokenManager};
use crate::relay::deliver::Queue;
use crate::relay::pool::Pool;
use crate::smtp::listener::AcceptErrors;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the admin endpoint reads.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub tokens: TokenManager,
    pub pool: Pool,
    pub queue: Option<Arc<Queue>>,
    /// True while the SMTP listener accepts connections.
    pub smtp_up: Arc<AtomicBool>,
}

impl AdminState {
    pub fn snapshot(&self) -> Snapshot {
        let counts = self.tokens.counts();
        Snapshot {
            // The token manager's accounts: they follow configuration reloads.
            accounts: self
                .tokens
                .account_names()
                .iter()
                .map(|a| {
                    let (refreshes, failures) = counts
                        .iter()
                        .find(|(n, _, _)| n == a)
                        .map_or((0, 0), |(_, r, f)| (*r, *f));
                    AccountSnapshot {
                        account: a.clone(),
                        token_expires_in_secs: self.tokens.expires_in(a).map(|d| d.as_secs_f64()),
                        needs_login: matches!(
                            self.tokens.status(a),
                            Some(AccountStatus::NeedsLogin(_))
                        ),
                        token_refreshes: refreshes,
                        token_failures: failures,
                        token_store_write_failures: self.tokens.store_write_failures(a),
                        upstream_sessions_busy: self.pool.busy_sessions(a),
                        upstream_sessions_idle: self.pool.idle_sessions(a),
                    }
                })
                .collect(),
            spool: self.queue.as_ref().map(|q| {
                let (depth, oldest) = q.depth();
                (depth, oldest.map(|d| d.as_secs_f64()))
            }),
        }
    }

    /// `None` when ready, else the JSON body naming what is not.
    pub(crate) fn not_ready(&self) -> Option<serde_json::Value> {
        let mut accounts = serde_json::Map::new();
        for a in &self.tokens.account_names() {
            if self.tokens.is_usable(a) {
                continue;
            }
            let why = match self.tokens.status(a) {
                Some(AccountStatus::NeedsLogin(r)) => format!("needs login: {r}"),
                Some(AccountStatus::Failing(r)) => format!("token refresh failing: {r}"),
                Some(AccountStatus::StoreFailing(r)) => format!("token store write failing: {r}"),
                _ => "no access token yet".to_string(),
            };
            accounts.insert(a.clone(), serde_json::Value::String(why));
        }
        let listener = self.smtp_up.load(Ordering::Relaxed);
        if listener && accounts.is_empty() {
            return None;
        }
        Some(serde_json::json!({
            "ready": false,
            "smtp_listener": if listener { "up" } else { "down" },
            "accounts": accounts,
        }))
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    match s.not_ready() {
        None => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"ready": true})),
        ),
        Some(body) => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)),
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    match s.metrics.render(&s.snapshot()) {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Admin connections served at once; a connection beyond this is closed at once. Scrapers
/// and probes need a handful; the bound keeps the port from spending our file descriptors.
pub(crate) const MAX_ADMIN_CONNECTIONS: usize = 64;
/// A request head must arrive within this; it is also how long an idle keep-alive
/// connection (or one that never says anything) stays open.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A handler must answer within this (503 otherwise).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// No connection lives longer than this, however it is used (a client that does not read
/// its response, keep-alive forever): asked to close after the request in flight, then
/// dropped `REQUEST_TIMEOUT` later.
const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Read buffer per connection (hyper's minimum is 8 KiB): the admin requests are one line
/// and a few headers, so 64 connections cost at most 1 MiB.
const MAX_REQUEST_BUFFER: usize = 16 * 1024;
/// On shutdown, how long connections get to finish the request in flight.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn(deadline))
        .with_state(state)
}

async fn deadline(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("admin request timed out");
            StatusCode::SERVICE_UNAVAILABLE.into_response()
        }
    }
}

/// Serves until `shutdown`: at most `MAX_ADMIN_CONNECTIONS` at once, each bounded in time.
pub(crate) async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    let app = router(state);
    let limit = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let tracker = TaskTracker::new();
    let mut accept_errors = AcceptErrors::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                accept_errors.accepted("admin");
                stream
            }
            Err(e) => {
                let wait = accept_errors.failed("admin", &e);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // Closed at once: the descriptor is back before the next accept.
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(true)
                .max_buf_size(MAX_REQUEST_BUFFER)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let stop = tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "admin connection ended");
                    }
                    drop(permit);
                    return;
                }
                _ = tokio::time::sleep(MAX_CONNECTION_LIFETIME) => REQUEST_TIMEOUT,
                _ = shutdown.cancelled() => SHUTDOWN_DRAIN,
            };
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(stop, conn).await;
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    let _ = tokio::time::timeout(SHUTDOWN_DRAIN, tracker.wait()).await;
}
