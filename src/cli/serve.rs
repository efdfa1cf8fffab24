//! `serve`: run the listener, token manager and relay until SIGINT/SIGTERM, then drain.

use super::{CliError, ConfigArg};
use smtp_oauth_bridge::bridge::{Bridge, Listeners};
use std::net::SocketAddr;
use tokio::net::TcpListener;

pub async fn run(config: &ConfigArg, print_config: bool) -> Result<(), CliError> {
    let config = config.load()?;
    if print_config {
        let text = config
            .to_toml()
            .map_err(|e| CliError::Runtime(e.to_string()))?;
        print!("{text}");
        return Ok(());
    }
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
    wait_for_signal().await;
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
