//! `login ACCOUNT [--device] [--no-browser]`: obtain a refresh token for a delegated account
//! (authorization code + PKCE on a loopback redirect, or device code) and store it. A running
//! `serve` notices the new token in the store and recovers without a restart.

use super::{CliError, ConfigArg};
use smtp_oauth_bridge::clock::unix_now;
use smtp_oauth_bridge::config::Flow;
use smtp_oauth_bridge::oauth::flows::{self, DevicePrompt, MAX_TOKEN_LIFETIME};
use smtp_oauth_bridge::oauth::store::{StateKey, StoredTokens, TokenStore};

pub async fn run(
    config: &ConfigArg,
    account: &str,
    device: bool,
    no_browser: bool,
) -> Result<(), CliError> {
    let config = config.load()?;
    let Some(acc) = config.accounts.iter().find(|a| a.username == account) else {
        return Err(CliError::Usage(format!(
            "{}: no [[account]] with username {account:?}",
            config.source
        )));
    };
    let flow = if device {
        Flow::DeviceCode
    } else {
        acc.oauth.flow
    };
    let http = flows::http_client().map_err(|e| CliError::Runtime(e.to_string()))?;
    let result = match flow {
        Flow::ClientCredentials | Flow::ServiceAccount => {
            return Err(CliError::Usage(format!(
                "{}: account {account} uses flow = \"{}\" and needs no login; run: smtp-oauth-bridge check {account}",
                config.source,
                flow.as_str()
            )))
        }
        Flow::AuthorizationCode => {
            let login = flows::start_auth_code(&acc.oauth)
                .await
                .map_err(|e| CliError::Runtime(format!("login: {e}")))?;
            println!("Sign in as {} (redirect to {}) by opening:", acc.mailbox, login.redirect_uri);
            println!("{}", login.url);
            if !no_browser {
                open_browser(&login.url);
            }
            login.finish(&http, &acc.oauth).await
        }
        Flow::DeviceCode => {
            let mailbox = acc.mailbox.clone();
            flows::device_code(&http, &acc.oauth, move |p: &DevicePrompt| {
                println!(
                    "To sign in as {mailbox}, open {} and enter the code {} (valid {} minutes).",
                    p.verification_uri,
                    p.user_code,
                    p.expires_in.as_secs() / 60
                );
            })
            .await
        }
    };
    let tokens =
        result.map_err(|e| CliError::Runtime(format!("login for {account} failed: {e}")))?;
    let Some(refresh_token) = tokens.refresh_token else {
        return Err(CliError::Runtime(format!(
            "login for {account}: the provider returned no refresh token; include the offline_access scope"
        )));
    };
    let now = unix_now();
    let store = TokenStore::new(
        &config.state.dir,
        config.state.key.as_ref().map(|k| StateKey::from(&k.value)),
    );
    store
        .save(
            account,
            &StoredTokens {
                access_token: Some(tokens.access_token),
                expires_at: now.saturating_add(tokens.expires_in.min(MAX_TOKEN_LIFETIME).as_secs()),
                refresh_token: Some(refresh_token),
            },
        )
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    println!(
        "{account}: logged in; tokens stored in {}. A running `serve` picks them up without a restart.",
        store.path(account).display()
    );
    Ok(())
}

/// Best effort: the URL is printed anyway.
fn open_browser(url: &str) {
    let opener: &[&str] = if cfg!(target_os = "macos") {
        &["open"]
    } else if cfg!(windows) {
        &["cmd", "/C", "start", ""]
    } else {
        &["xdg-open"]
    };
    let spawned = std::process::Command::new(opener[0])
        .args(&opener[1..])
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if spawned.is_err() {
        println!("(could not start a browser; open the URL above yourself)");
    }
}
