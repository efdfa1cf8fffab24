//! `check [ACCOUNT]`: for each account, get a valid access token, connect to the upstream,
//! STARTTLS, AUTH XOAUTH2, QUIT; one line per account, `ok` or the failure and a hint, and
//! under it the client credential the token came from (with a certificate's expiry).
//! Accounts with `transport = "graph"` are checked against Microsoft Graph instead
//! (`relay::graph::probe`: token, then mailbox and Mail.Send by a `sendMail` without
//! recipients, drafts by one made and deleted; nothing sent).

use super::{CliError, ConfigArg};
use smtp_oauth_bridge::config::{Account, TransportKind};
use smtp_oauth_bridge::oauth::credential;
use smtp_oauth_bridge::oauth::manager::{TokenError, TokenManager};
use smtp_oauth_bridge::relay::envelope::{self, Address, MailParams, ReversePath};
use smtp_oauth_bridge::relay::graph::{self, GraphTransport};
use smtp_oauth_bridge::relay::pool::{authenticate, BeginError};
use smtp_oauth_bridge::relay::upstream::{UpReply, UpstreamError, UpstreamSession, UpstreamTarget};

pub async fn run(config: &ConfigArg, only: Option<&str>) -> Result<(), CliError> {
    let config = config.load()?;
    if let Some(name) = only {
        if !config.accounts.iter().any(|a| a.username == name) {
            return Err(CliError::Usage(format!(
                "{}: no [[account]] with username {name:?}",
                config.source
            )));
        }
    }
    let tokens = TokenManager::new(&config).map_err(|e| CliError::Runtime(e.to_string()))?;
    let target =
        UpstreamTarget::new(&config.upstream).map_err(|e| CliError::Usage(e.to_string()))?;
    let graph =
        GraphTransport::new(&config, tokens.clone()).map_err(|e| CliError::Usage(e.to_string()))?;
    let mut failed = 0;
    let mut checked = 0;
    for a in config
        .accounts
        .iter()
        .filter(|a| only.is_none_or(|n| n == a.username))
    {
        checked += 1;
        if a.transport == TransportKind::Graph {
            let line = match check_graph(&tokens, &graph, a).await {
                Ok(ok) => ok,
                Err((what, hint)) => {
                    failed += 1;
                    format!("{}: FAILED {what}\n  hint: {hint}", a.username)
                }
            };
            println!("{line}\n  credential: {}", credential::describe(&a.oauth));
            continue;
        }
        let line = match check_account(&tokens, &target, a).await {
            Ok(()) => format!(
                "{}: ok (mailbox {}, {} STARTTLS + XOAUTH2 accepted)",
                a.username,
                a.mailbox,
                target.addr()
            ),
            Err((what, hint)) => {
                failed += 1;
                format!("{}: FAILED {what}\n  hint: {hint}", a.username)
            }
        };
        println!("{line}\n  credential: {}", credential::describe(&a.oauth));
    }
    if failed > 0 {
        return Err(CliError::Runtime(format!(
            "{failed} of {checked} accounts failed the check"
        )));
    }
    Ok(())
}

async fn check_account(
    tokens: &TokenManager,
    target: &UpstreamTarget,
    acc: &Account,
) -> Result<(), (String, String)> {
    let (account, mailbox) = (acc.username.as_str(), acc.mailbox.as_str());
    let token_failed = |e: TokenError| {
        let hint = match &e {
            TokenError::NeedsLogin { .. } => format!("run: smtp-oauth-bridge login {account}"),
            TokenError::Provider { reason, .. } => token_hint(reason),
            TokenError::UnknownAccount(_) => "check the configuration".into(),
        };
        (format!("token: {e}"), hint)
    };
    let token = tokens.force_refresh(account).await.map_err(token_failed)?;
    // The same connect + STARTTLS + AUTH (with one refresh on 535 5.7.3) as serve.
    let (mut session, _) = authenticate(target, tokens, account, mailbox, token)
        .await
        .map_err(|e| match e {
            BeginError::Token(e) => token_failed(e),
            BeginError::AuthRejected(rep) | BeginError::AuthDeferred(rep) => {
                (format!("AUTH XOAUTH2: {rep}"), smtp_hint(&rep))
            }
            BeginError::Upstream(UpstreamError::Lost(m)) => (format!("AUTH XOAUTH2: {m}"), DROPPED.into()),
            BeginError::Upstream(e) => (
                e.to_string(),
                "check upstream.host/port, the network path to it, and upstream.ca_file for private CAs".into(),
            ),
            BeginError::Busy => ("no upstream session free".into(), DROPPED.into()),
        })?;
    let r = send_as(&mut session, acc).await;
    session.close().await;
    r
}

/// A Graph account: a fresh token, then the probe (see `relay::graph::probe`).
async fn check_graph(
    tokens: &TokenManager,
    graph: &GraphTransport,
    acc: &Account,
) -> Result<String, (String, String)> {
    let account = acc.username.as_str();
    if let Err(e) = tokens.force_refresh(account).await {
        let hint = match &e {
            TokenError::NeedsLogin { .. } => format!("run: smtp-oauth-bridge login {account}"),
            TokenError::Provider { reason, .. } => token_hint(reason),
            TokenError::UnknownAccount(_) => "check the configuration".into(),
        };
        return Err((format!("token: {e}"), hint));
    }
    let probe = graph::probe(graph, account, &acc.mailbox)
        .await
        .map_err(|f| (f.what, f.hint))?;
    let drafts = match probe.drafts {
        Ok(()) => "drafts allowed (Mail.ReadWrite)".to_string(),
        Err(why) => format!("warning: {why}"),
    };
    if let Some(why) = probe.inconclusive {
        return Ok(format!(
            "{account}: inconclusive (mailbox {}): {why}; nothing sent\n  graph: {drafts}",
            acc.mailbox
        ));
    }
    Ok(format!(
        "{account}: ok (mailbox {}, Microsoft Graph accepts Mail.Send for it; nothing sent)\n  graph: {drafts}",
        acc.mailbox
    ))
}

const DROPPED: &str = "the upstream dropped the session; try again";

/// MAIL FROM each exact `allowed_from` address, then RSET: catches missing Send As rights
/// where the upstream reports them at MAIL. Nothing is sent.
async fn send_as(session: &mut UpstreamSession, acc: &Account) -> Result<(), (String, String)> {
    for from in acc.allowed_from.iter().filter(|f| !f.starts_with("*@")) {
        let Ok(address) = Address::parse(from, true) else {
            return Err((
                format!("allowed_from {from:?}"),
                "not a valid address".into(),
            ));
        };
        let cmd =
            envelope::mail_command(&ReversePath::Address(address), &MailParams::default(), None);
        match session.command(&cmd).await {
            Ok(_) => {
                let _ = session.command("RSET").await;
            }
            Err(UpstreamError::Reply(rep)) => {
                return Err((format!("MAIL FROM:<{from}>: {rep}"), smtp_hint(&rep)))
            }
            Err(e) => return Err((format!("MAIL FROM:<{from}>: {e}"), DROPPED.into())),
        }
    }
    Ok(())
}

/// What to do about an error from the token endpoint.
pub fn token_hint(reason: &str) -> String {
    let r = reason.to_ascii_lowercase();
    if r.contains("aadsts700027") {
        "the client assertion was refused: the certificate (its SHA-256 thumbprint is shown under credential) is not uploaded to the app registration, or the private key in client_certificate_file is not the certificate's key".into()
    } else if r.contains("client assertion file") && r.contains("is empty") {
        "the federated token file is empty: check the workload identity setup (the pod's service account annotation and the projected token at AZURE_FEDERATED_TOKEN_FILE); it is read again at the next token request".into()
    } else if r.contains("client assertion file") {
        "the federated token file cannot be read: check client_assertion_file (AZURE_FEDERATED_TOKEN_FILE) and the pod's workload identity setup".into()
    } else if r.contains("invalid jwt signature") {
        "the service account key was refused: check service_account_key_file is a current key of the service account".into()
    } else if r.contains("unauthorized_client") && r.contains("client is unauthorized") {
        "domain-wide delegation is missing: authorize the service account's client ID for https://mail.google.com/ in the Google Admin console".into()
    } else if r.contains("invalid_client")
        || r.contains("aadsts7000215")
        || r.contains("aadsts7000222")
    {
        "the client secret is wrong or expired: create a new one under Certificates & secrets in the app registration".into()
    } else if r.contains("aadsts700016") || r.contains("unauthorized_client") {
        "client_id is not an application in this tenant: check client_id and tenant".into()
    } else if r.contains("aadsts90002") || r.contains("aadsts900023") {
        "the tenant was not found: check tenant (e.g. contoso.onmicrosoft.com or its ID)".into()
    } else if r.contains("invalid_scope") || r.contains("aadsts70011") {
        "the scope is not valid for this flow: client_credentials uses https://outlook.office365.com/.default".into()
    } else if r.contains("unreachable") {
        "the token endpoint could not be reached: check DNS, proxy and firewall".into()
    } else {
        "see the provider's error above".into()
    }
}

/// What to do about an upstream AUTH failure.
pub fn smtp_hint(r: &UpReply) -> String {
    let t = &r.text;
    if t.contains("5.7.139") {
        "SMTP AUTH is disabled for the tenant or mailbox: enable Authenticated SMTP for the mailbox (Set-CASMailbox -SmtpClientAuthenticationDisabled $false)".into()
    } else if t.contains("5.7.3") {
        "the token was refused: check that mailbox matches the signed-in user (or the mailbox the app may send as) and the scopes".into()
    } else if t.contains("SendAsDenied") || t.contains("5.2.252") {
        "the mailbox may not send as this address: grant Send As (Add-RecipientPermission <address> -AccessRights SendAs -Trustee <mailbox>) or remove it from allowed_from".into()
    } else if r.code == 430 || t.contains("4.2.0") || t.contains("5.7.57") {
        "client credentials: register the Exchange service principal (New-ServicePrincipal) and grant it FullAccess on the mailbox (Add-MailboxPermission)".into()
    } else {
        "see the upstream's reply above".into()
    }
}
