//! Wires a validated config into a running bridge: token manager (with its background
//! refresher), upstream pool, spool and delivery workers (spool mode), local authentication,
//! TLS, who may connect and relay, and the SMTP listeners (plain and implicit TLS). Used by
//! `serve`, `demo` and the tests.
//!
//! [`Bridge::reload`] swaps the shared state for a new configuration (SIGHUP): the parts
//! that follow (token manager, pool, spool queue, pacers) are told first, then a new
//! session context and admission rules are published to the listener, which serves each
//! new connection with the value current at accept; sessions in flight keep theirs. Keys
//! that need a restart (listener addresses, TLS files, upstream endpoint, state, queue
//! settings) are logged at WARN by name. Everything that can fail is done before anything
//! changes, so an invalid configuration leaves the running one as it was.

use crate::admin::{self, AdminState};
use crate::config::{Config, ConfigError, ListenTls};
use crate::metrics::Metrics;
use crate::oauth::manager::{ManagerError, TokenManager};
use crate::relay::deliver::{Pacers, Queue};
use crate::relay::graph::GraphTransport;
use crate::relay::pool::Pool;
use crate::relay::transport::Transport;
use crate::relay::upstream::{local_hostname, UpstreamTarget};
use crate::smtp::auth::LocalAuth;
use crate::smtp::listener::{Admission, Bound, Live};
use crate::smtp::policy::RelayNetworks;
use crate::smtp::session::{SessionContext, AUTH_FAILURE_DELAY};
use crate::smtp::tls::TlsSetupError;
use crate::smtp::{listener as server, tls};
use crate::sync::lock;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::watch;
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

/// Why a reloaded configuration was not taken (the running one stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("token manager: {0}")]
    Tokens(#[from] ManagerError),
}

/// What every session context shares, whatever the configuration.
struct Shared {
    hostname: String,
    transport: Transport,
    tokens: TokenManager,
    starttls: bool,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    queue: Option<Arc<Queue>>,
    pacers: Arc<Pacers>,
    metrics: Arc<Metrics>,
}

impl Shared {
    /// The context new sessions get under `config`.
    fn context(&self, config: &Config, auth: LocalAuth) -> SessionContext {
        SessionContext {
            hostname: self.hostname.clone(),
            auth,
            transport: self.transport.clone(),
            tokens: self.tokens.clone(),
            max_message_bytes: config.listen.max_message_bytes,
            max_recipients: config.listen.max_recipients,
            require_tls_for_auth: config.listen.require_tls_for_auth,
            starttls_available: self.starttls,
            shutdown: self.shutdown.clone(),
            hard_stop: self.hard_stop.clone(),
            command_timeout: config.listen.command_timeout,
            session_timeout: config.listen.session_timeout,
            upstream_hold: config.upstream.timeout,
            auth_failure_delay: AUTH_FAILURE_DELAY,
            queue: self.queue.clone(),
            pacers: self.pacers.clone(),
            messages_per_minute: config.upstream.messages_per_minute,
            metrics: self.metrics.clone(),
            relay_networks: RelayNetworks::new(config),
        }
    }
}

fn admission(config: &Config) -> Admission {
    Admission {
        allow_networks: config.listen.allow_networks.clone(),
        max_connections: config.listen.max_connections,
    }
}

/// The running configuration and what a reload swaps.
struct Reloader {
    shared: Shared,
    /// The configuration the process started with (what restart-only keys are compared
    /// with, so a change is reported at every reload until a restart).
    started: Config,
    /// The `LocalAuth` of the configuration in effect (a reload derives the next one).
    auth: Mutex<LocalAuth>,
    pool: Pool,
    live: watch::Sender<Live>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

/// The keys whose change needs a restart, with whether they differ.
fn restart_keys(old: &Config, new: &Config) -> Vec<&'static str> {
    let (ol, nl) = (&old.listen, &new.listen);
    let (ou, nu) = (&old.upstream, &new.upstream);
    let queue = |c: &Config| {
        c.queue
            .as_ref()
            .map(|q| (q.max_age, q.max_bytes, q.retry_min, q.retry_max))
    };
    let key_source = |c: &Config| c.state.key.as_ref().map(|k| k.source.clone());
    [
        ("listen.smtp", ol.smtp != nl.smtp),
        ("listen.smtps", ol.smtps != nl.smtps),
        ("listen.admin", ol.admin != nl.admin),
        ("listen.tls", ol.tls != nl.tls),
        ("listen.tls_cert", ol.tls_cert != nl.tls_cert),
        ("listen.tls_key", ol.tls_key != nl.tls_key),
        (
            "listen.shutdown_grace_secs",
            ol.shutdown_grace != nl.shutdown_grace,
        ),
        ("upstream.host", ou.host != nu.host),
        ("upstream.port", ou.port != nu.port),
        ("upstream.security", ou.security != nu.security),
        ("upstream.ca_file", ou.ca_file != nu.ca_file),
        ("upstream.timeout_secs", ou.timeout != nu.timeout),
        ("upstream.idle_secs", ou.idle != nu.idle),
        ("upstream.graph_url", ou.graph_url != nu.graph_url),
        ("state.dir", old.state.dir != new.state.dir),
        ("state.key_file/key_env", key_source(old) != key_source(new)),
        ("queue.mode", old.queue.is_some() != new.queue.is_some()),
        (
            "queue (max_age_secs, max_bytes, retry_*_secs)",
            old.queue.is_some() && new.queue.is_some() && queue(old) != queue(new),
        ),
    ]
    .into_iter()
    .filter_map(|(k, changed)| changed.then_some(k))
    .collect()
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
    reloader: Arc<Reloader>,
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
        let graph = GraphTransport::new(config, tokens.clone())
            .map_err(|e| StartError::Upstream(e.into()))?;
        let transport = Transport::smtp(pool.clone()).with_graph(graph);
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
        let pacers = Arc::new(Pacers::new(config));
        let metrics = Arc::new(Metrics::default());
        let queue = match &config.queue {
            None => None,
            Some(q) => Some(
                Queue::start(
                    config,
                    q,
                    transport.clone(),
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
        let shared = Shared {
            hostname: local_hostname(),
            transport,
            tokens: tokens.clone(),
            starttls,
            shutdown: shutdown.clone(),
            hard_stop: CancellationToken::new(),
            queue: queue.clone(),
            pacers,
            metrics: metrics.clone(),
        };
        let auth = LocalAuth::new(config);
        let (live, live_rx) = watch::channel(Live {
            ctx: Arc::new(shared.context(config, auth.clone())),
            admission: admission(config),
        });
        let reloader = Arc::new(Reloader {
            shared,
            started: config.clone(),
            auth: Mutex::new(auth),
            pool: pool.clone(),
            live,
        });
        let smtp_up = Arc::new(AtomicBool::new(true));
        let admin_state = AdminState {
            metrics: metrics.clone(),
            tokens: tokens.clone(),
            pool: pool.clone(),
            queue: queue.clone(),
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
            server::serve(bound, live_rx, acceptor, grace).await;
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
            reloader,
            shutdown,
            task,
        })
    }

    /// Takes `loaded` (the file and environment read again) for new connections and
    /// transactions: see the module doc. A configuration that did not load, or that the
    /// token manager cannot take, changes nothing; either way the outcome is logged and
    /// counted in `smtp_oauth_bridge_config_reloads_total{result}`.
    pub fn reload(&self, loaded: Result<Config, ConfigError>) -> Result<(), ReloadError> {
        let r = loaded
            .map_err(ReloadError::from)
            .and_then(|config| self.reloader.apply(&config));
        let metrics = &self.reloader.shared.metrics;
        metrics.config_reload(r.is_ok());
        match &r {
            Ok(()) => {}
            Err(ReloadError::Config(e)) => tracing::error!(
                file = %e.file,
                key = %e.key,
                reason = %e.reason,
                "configuration reload failed: {e}; the running configuration stays"
            ),
            Err(e) => tracing::error!(
                error = %e,
                "configuration reload failed: {e}; the running configuration stays"
            ),
        }
        r
    }

    /// Stops accepting and ends idle sessions; `wait` returns when sessions are done.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

impl Reloader {
    fn apply(&self, config: &Config) -> Result<(), ReloadError> {
        let mut current = lock(&self.auth);
        // The one step that can fail comes first; everything after it cannot.
        let changes = self.shared.tokens.reload(config)?;
        for key in restart_keys(&self.started, config) {
            tracing::warn!(
                key,
                "configuration reload: {key} changed; this takes effect only at the next restart"
            );
        }
        self.pool.reconfigure(config);
        self.shared.transport.reconfigure(config);
        self.shared.pacers.follow(config);
        if let Some(q) = &self.shared.queue {
            q.reconfigure(config);
        }
        let auth = current.reloaded(config);
        let ctx = Arc::new(self.shared.context(config, auth.clone()));
        self.live.send_replace(Live {
            ctx,
            admission: admission(config),
        });
        tracing::info!(
            accounts = config.accounts.len(),
            added = ?changes.added,
            removed = ?changes.removed,
            oauth_changed = ?changes.changed,
            relay_networks = config.relay_networks.len(),
            "configuration reloaded; new connections use it, sessions in flight finish under the old one"
        );
        *current = auth;
        Ok(())
    }
}
