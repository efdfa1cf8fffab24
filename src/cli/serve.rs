//! `serve`: run the listener, token manager and relay until SIGINT/SIGTERM, then drain.

use super::{CliError, ConfigArg};
use smtp_oauth_bridge::bridge::Bridge;

pub async fn run(config: &ConfigArg, print_config: bool) -> Result<(), CliError> {
    let config = config.load()?;
    if print_config {
        let text = config
            .to_toml()
            .map_err(|e| CliError::Runtime(e.to_string()))?;
        print!("{text}");
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(config.listen.smtp)
        .await
        .map_err(|e| {
            CliError::Runtime(format!(
                "cannot listen on {} (listen.smtp): {e}",
                config.listen.smtp
            ))
        })?;
    let admin = match config.listen.admin {
        None => None,
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            CliError::Runtime(format!("cannot listen on {addr} (listen.admin): {e}"))
        })?),
    };
    let bridge = Bridge::start_with_admin(&config, listener, admin)
        .await
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    wait_for_signal().await;
    tracing::info!("shutting down: no new connections; finishing transactions in flight");
    bridge.shutdown();
    bridge.wait().await;
    tracing::info!("stopped");
    Ok(())
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
