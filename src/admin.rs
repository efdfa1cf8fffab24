//! The admin HTTP endpoint (when `listen.admin` is set): `GET /healthz`, `/readyz`, `/metrics`.
//!
//! /healthz is 200 while the process runs. /readyz is 200 when the SMTP listener is up and
//! every account has a usable access token, else 503 with a JSON body naming each account
//! that is not ready and why. /metrics is the Prometheus text exposition from `metrics`.
//! The caller binds the listener (loopback by default) and passes it in.

use crate::metrics::{AccountSnapshot, Metrics, Snapshot, CONTENT_TYPE};
use crate::oauth::manager::{AccountStatus, TokenManager};
use crate::relay::deliver::Queue;
use crate::relay::pool::Pool;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the admin endpoint reads.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub tokens: TokenManager,
    pub pool: Pool,
    pub queue: Option<Arc<Queue>>,
    pub accounts: Vec<String>,
    /// True while the SMTP listener accepts connections.
    pub smtp_up: Arc<AtomicBool>,
}

impl AdminState {
    pub fn snapshot(&self) -> Snapshot {
        let counts = self.tokens.counts();
        Snapshot {
            accounts: self
                .accounts
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
    pub fn not_ready(&self) -> Option<serde_json::Value> {
        let mut accounts = serde_json::Map::new();
        for a in &self.accounts {
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

/// Serves until `shutdown`.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "admin endpoint stopped");
    }
}
