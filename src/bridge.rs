//! Wires a validated config into a running bridge: token manager (with its background
//! refresher), upstream pool, spool and delivery workers (spool mode), local authentication,
//! TLS, who may connect and relay, and the SMTP listeners (plain and implicit TLS). Used by
//! `serve`, `demo` and the tests.

use crate::admin::{self, AdminState};
use crate::config::{Config, ListenTls};
use crate::metrics::Metrics;
use crate::oauth::manager::{ManagerError, TokenManager};
use crate::relay::deliver::{Pacer, Queue};
use crate::relay::pool::Pool;
use crate::relay::transport::Transport;
use crate::relay::upstream::{local_hostname, UpstreamTarget};
use crate::smtp::auth::LocalAuth;
use crate::smtp::listener::{Admission, Bound};
use crate::smtp::policy::RelayNetworks;
use crate::smtp::session::{SessionContext, AUTH_FAILURE_DELAY};
use crate::smtp::tls::TlsSetupError;
use crate::smtp::{listener as server, tls};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener: {0}")]
    Listener(std::io::Error),
    #[error("no SMTP listener was given")]
    NoListener,
    #[error("token manager: {0}")]
    Tokens(#[from] ManagerError),
    #[error("{0}")]
    Upstream(Box<dyn std::error::Error + Send + Sync>),
    #[error("{0}")]
    Tls(#[from] TlsSetupError),
    #[error("spool {path}: {source}")]
    Spool {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The sockets a bridge serves, bound by the caller (`serve` binds every configured address;
/// tests bind port 0).
#[derive(Debug, Default)]
pub struct Listeners {
    /// Plain SMTP (`listen.smtp`; STARTTLS when `listen.tls = "starttls"`).
    pub smtp: Vec<TcpListener>,
    /// Implicit TLS (`listen.smtps`), with `listen.tls_cert`/`tls_key`.
    pub smtps: Vec<TcpListener>,
    /// The admin endpoint (`listen.admin`).
    pub admin: Option<TcpListener>,
}

/// A running bridge.
#[derive(Debug)]
pub struct Bridge {
    /// The first plain listener's address (the first implicit-TLS one's without any).
    pub local_addr: SocketAddr,
    pub smtp_addrs: Vec<SocketAddr>,
    pub smtps_addrs: Vec<SocketAddr>,
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
    pub async fn start(config: &Config, listener: TcpListener) -> Result<Bridge, StartError> {
        Self::start_with_admin(config, listener, None).await
    }

    /// Starts serving SMTP on `listener` and, if given, the admin endpoint on `admin`.
    pub async fn start_with_admin(
        config: &Config,
        listener: TcpListener,
        admin: Option<TcpListener>,
    ) -> Result<Bridge, StartError> {
        Self::start_listeners(
            config,
            Listeners {
                smtp: vec![listener],
                smtps: Vec::new(),
                admin,
            },
        )
        .await
    }

    /// Starts serving SMTP on every listener of `listeners` and, if given, the admin
    /// endpoint.
    pub async fn start_listeners(
        config: &Config,
        listeners: Listeners,
    ) -> Result<Bridge, StartError> {
        let Listeners { smtp, smtps, admin } = listeners;
        let addrs = |ls: &[TcpListener]| {
            ls.iter()
                .map(TcpListener::local_addr)
                .collect::<Result<Vec<_>, _>>()
                .map_err(StartError::Listener)
        };
        let smtp_addrs = addrs(&smtp)?;
        let smtps_addrs = addrs(&smtps)?;
        let local_addr = *smtp_addrs
            .first()
            .or(smtps_addrs.first())
            .ok_or(StartError::NoListener)?;
        let tokens = TokenManager::new(config)?;
        let target =
            UpstreamTarget::new(&config.upstream).map_err(|e| StartError::Upstream(e.into()))?;
        let pool = Pool::new(config, target, tokens.clone());
        let starttls = config.listen.tls == ListenTls::StartTls;
        // One certificate serves STARTTLS and the implicit-TLS listeners.
        let acceptor = if starttls || !smtps.is_empty() {
            Some(tls::acceptor(
                &config.listen.tls_cert,
                &config.listen.tls_key,
            )?)
        } else {
            None
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
                .map_err(|source| StartError::Spool {
                    path: config.state.dir.join("spool"),
                    source,
                })?,
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
            starttls_available: starttls,
            shutdown: shutdown.clone(),
            hard_stop: CancellationToken::new(),
            command_timeout: config.listen.command_timeout,
            session_timeout: config.listen.session_timeout,
            upstream_hold: config.upstream.timeout,
            auth_failure_delay: AUTH_FAILURE_DELAY,
            queue: queue.clone(),
            pacers,
            messages_per_minute: config.upstream.messages_per_minute,
            metrics: metrics.clone(),
            relay_networks: RelayNetworks::new(config),
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
                let addr = l.local_addr().map_err(StartError::Listener)?;
                tokio::spawn(admin::serve(l, admin_state.clone(), shutdown.clone()));
                tracing::info!(admin = %addr, "admin endpoint ready (/healthz /readyz /metrics)");
                Some(addr)
            }
        };
        let grace = config.listen.shutdown_grace;
        let admission = Admission {
            allow_networks: config.listen.allow_networks.clone(),
            max_connections: config.listen.max_connections,
        };
        let bound: Vec<Bound> = smtp
            .into_iter()
            .map(|listener| Bound {
                listener,
                implicit_tls: false,
            })
            .chain(smtps.into_iter().map(|listener| Bound {
                listener,
                implicit_tls: true,
            }))
            .collect();
        let q = queue.clone();
        let task = tokio::spawn(async move {
            server::serve(bound, ctx, acceptor, admission, grace).await;
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
        for a in smtp_addrs.iter().filter(|a| **a != local_addr) {
            tracing::info!(address = %a, "SMTP listener ready (plain)");
        }
        for a in &smtps_addrs {
            tracing::info!(address = %a, "SMTP listener ready (implicit TLS)");
        }
        Ok(Bridge {
            local_addr,
            smtp_addrs,
            smtps_addrs,
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
