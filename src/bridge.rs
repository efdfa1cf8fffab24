//! Wires a validated config into a running bridge: token manager (with its background
//! refresher), upstream pool, spool and delivery workers (spool mode), local authentication,
//! TLS and the SMTP listener. Used by `serve`, `demo` and the tests.

use crate::admin::{self, AdminState};
use crate::config::{Config, ListenTls};
use crate::metrics::Metrics;
use crate::oauth::manager::TokenManager;
use crate::relay::deliver::{Pacer, Queue};
use crate::relay::pool::Pool;
use crate::relay::transport::Transport;
use crate::relay::upstream::{local_hostname, UpstreamTarget};
use crate::smtp::auth::LocalAuth;
use crate::smtp::session::{SessionContext, AUTH_FAILURE_DELAY};
use crate::smtp::{listener as server, tls};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running bridge.
#[derive(Debug)]
pub struct Bridge {
    pub local_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    /// What the admin endpoint serves (also usable without it).
    pub admin: AdminState,
    pub tokens: TokenManager,
    pub pool: Pool,
    /// Spool mode only.
    pub queue: Option<Arc<Queue>>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Bridge {
    /// Starts serving on `listener` (already bound by the caller).
    pub async fn start(config: &Config, listener: TcpListener) -> Result<Bridge, String> {
        Self::start_with_admin(config, listener, None).await
    }

    /// Starts serving SMTP on `listener` and, if given, the admin endpoint on `admin`.
    pub async fn start_with_admin(
        config: &Config,
        listener: TcpListener,
        admin: Option<TcpListener>,
    ) -> Result<Bridge, String> {
        let local_addr = listener.local_addr().map_err(|e| e.to_string())?;
        let tokens = TokenManager::new(config).map_err(|e| e.to_string())?;
        let target = UpstreamTarget::new(&config.upstream).map_err(|e| e.to_string())?;
        let pool = Pool::new(config, target, tokens.clone());
        let acceptor = match config.listen.tls {
            ListenTls::Off => None,
            ListenTls::StartTls => Some(tls::acceptor(
                &config.listen.tls_cert,
                &config.listen.tls_key,
            )?),
        };
        let shutdown = CancellationToken::new();
        let pacers: Arc<HashMap<String, Pacer>> = Arc::new(
            config
                .accounts
                .iter()
                .map(|a| (a.username.clone(), Pacer::default()))
                .collect(),
        );
        let metrics = Arc::new(Metrics::default());
        let queue = match &config.queue {
            None => None,
            Some(q) => Some(
                Queue::start(
                    config,
                    q,
                    Transport::smtp(pool.clone()),
                    pacers.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                )
                .map_err(|e| format!("spool {}: {e}", config.state.dir.join("spool").display()))?,
            ),
        };
        // Tokens are fetched at start (client credentials) and refreshed ahead of expiry.
        tokens.spawn_refresher(shutdown.clone());
        let ctx = Arc::new(SessionContext {
            hostname: local_hostname(),
            auth: LocalAuth::new(config),
            transport: Transport::smtp(pool.clone()),
            tokens: tokens.clone(),
            max_message_bytes: config.listen.max_message_bytes,
            max_recipients: config.listen.max_recipients,
            require_tls_for_auth: config.listen.require_tls_for_auth,
            starttls_available: acceptor.is_some(),
            shutdown: shutdown.clone(),
            hard_stop: CancellationToken::new(),
            command_timeout: config.listen.command_timeout,
            session_timeout: config.listen.session_timeout,
            auth_failure_delay: AUTH_FAILURE_DELAY,
            queue: queue.clone(),
            pacers,
            messages_per_minute: config.upstream.messages_per_minute,
            metrics: metrics.clone(),
        });
        let smtp_up = Arc::new(AtomicBool::new(true));
        let admin_state = AdminState {
            metrics: metrics.clone(),
            tokens: tokens.clone(),
            pool: pool.clone(),
            queue: queue.clone(),
            accounts: config.accounts.iter().map(|a| a.username.clone()).collect(),
            smtp_up: smtp_up.clone(),
        };
        let admin_addr = match admin {
            None => None,
            Some(l) => {
                let addr = l.local_addr().map_err(|e| e.to_string())?;
                tokio::spawn(admin::serve(l, admin_state.clone(), shutdown.clone()));
                tracing::info!(admin = %addr, "admin endpoint ready (/healthz /readyz /metrics)");
                Some(addr)
            }
        };
        let grace = config.listen.shutdown_grace;
        let max_connections = config.listen.max_connections;
        let q = queue.clone();
        let task = tokio::spawn(async move {
            server::serve(listener, ctx, acceptor, max_connections, grace).await;
            smtp_up.store(false, Ordering::Relaxed);
            // Spool workers finish the delivery they are in, within the grace period; a
            // message cut off here stays in the spool and is retried at the next start.
            if let Some(q) = q {
                let _ = tokio::time::timeout(grace, q.stopped()).await;
            }
        });
        tracing::info!(
            listen = %local_addr,
            accounts = config.accounts.len(),
            mode = if queue.is_some() { "spool" } else { "sync" },
            "SMTP listener ready"
        );
        Ok(Bridge {
            local_addr,
            admin_addr,
            admin: admin_state,
            tokens,
            pool,
            queue,
            shutdown,
            task,
        })
    }

    /// Stops accepting and ends idle sessions; `wait` returns when sessions are done.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn wait(self) {
        let _ = self.task.await;
    }
}
