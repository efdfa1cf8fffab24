//! `serve`: run the listener, token manager and relay until SIGINT/SIGTERM, then drain;
//! SIGHUP reads the file and the environment again and reloads (`Bridge::reload`).

use super::{CliError, ConfigArg};
use smtp_oauth_bridge::bridge::{Bridge, Listeners};
use smtp_oauth_bridge::config::Config;
use std::net::SocketAddr;
use tokio::net::TcpListener;

pub async fn run(config_arg: &ConfigArg, print_config: bool) -> Result<(), CliError> {
    let config = config_arg.load()?;
    if print_config {
        let text = config
            .to_toml()
            .map_err(|e| CliError::Runtime(e.to_string()))?;
        print!("{text}");
        return Ok(());
    }
    // Before anything starts: SIGHUP's default action ends the process.
    let hup = Hangup::install();
    let mut listeners = Listeners::default();
    for (key, addrs, out) in [
        ("listen.smtp", &config.listen.smtp, &mut listeners.smtp),
        ("listen.smtps", &config.listen.smtps, &mut listeners.smtps),
    ] {
        for addr in addrs {
            out.push(bind(*addr, key).await?);
        }
    }
    if let Some(addr) = config.listen.admin {
        listeners.admin = Some(bind(addr, "listen.admin").await?);
    }
    let bridge = Bridge::start_listeners(&config, listeners)
        .await
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    serve_signals(&bridge, config_arg, hup).await;
    tracing::info!("shutting down: no new connections; finishing transactions in flight");
    bridge.shutdown();
    bridge.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// Binds one configured address; the error names the key and the address.
async fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener, CliError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::Runtime(format!("cannot listen on {addr} ({key}): {e}")))
}

/// The SIGHUP stream (unix), installed before the bridge starts.
struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    fn install() -> Hangup {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::hangup()) {
                Ok(s) => Hangup { signal: Some(s) },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot handle SIGHUP; reload needs a restart");
                    Hangup { signal: None }
                }
            }
        }
        #[cfg(not(unix))]
        Hangup {}
    }
}

/// Reloads at every SIGHUP; returns at SIGINT (Ctrl-C) or SIGTERM.
async fn serve_signals(bridge: &Bridge, config: &ConfigArg, hup: Hangup) {
    #[cfg(unix)]
    {
        match hup.signal {
            Some(mut hup) => {
                let stop = wait_for_signal();
                tokio::pin!(stop);
                loop {
                    tokio::select! {
                        _ = &mut stop => return,
                        Some(()) = hup.recv() => {
                            tracing::info!(file = %config.path.display(), "SIGHUP: reloading the configuration");
                            let loaded = Config::load(&config.path, config.required);
                            // Logged and counted inside; the running configuration stays on error.
                            let _ = bridge.reload(loaded);
                        }
                    }
                }
            }
            None => wait_for_signal().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (config, bridge, hup);
        wait_for_signal().await;
    }
}

/// Returns at SIGINT (Ctrl-C) or SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
