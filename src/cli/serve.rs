//! `serve`: run the listener, token manager and relay until SIGINT/SIGTERM, then drain.

use super::CliError;
use smtp_oauth_bridge::bridge::Bridge;
use smtp_oauth_bridge::config::Config;
use std::path::Path;

pub async fn run(config_path: &Path) -> Result<(), CliError> {
    let config = Config::load(config_path)?;
    let listener = tokio::net::TcpListener::bind(config.listen.smtp)
        .await
        .map_err(|e| {
            CliError::Runtime(format!(
                "cannot listen on {} (listen.smtp): {e}",
                config.listen.smtp
            ))
        })?;
    let bridge = Bridge::start(&config, listener)
        .await
        .map_err(CliError::Runtime)?;
    wait_for_signal().await;
    tracing::info!("shutting down: no new connections; finishing transactions in flight");
    bridge.shutdown();
    bridge.wait().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
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
