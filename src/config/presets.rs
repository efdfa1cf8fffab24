//! Provider presets: the endpoint URLs (from the tenant), the SMTP host and the default
//! scopes per flow. They are configuration defaults, filled in at validation; every URL can
//! be overridden in the account's `[account.oauth]`.

use super::model::{Flow, Provider, TransportKind};

impl Provider {
    fn login_host(self) -> &'static str {
        match self {
            Provider::Microsoft => "https://login.microsoftonline.com",
            Provider::MicrosoftUsGov => "https://login.microsoftonline.us",
            Provider::MicrosoftChina => "https://login.chinacloudapi.cn",
            Provider::Google => "https://accounts.google.com",
        }
    }

    /// The SMTP submission host of the provider (upstream.host's default).
    pub(crate) fn smtp_host(self) -> &'static str {
        match self {
            Provider::Microsoft => "smtp.office365.com",
            Provider::MicrosoftUsGov => "smtp.office365.us",
            Provider::MicrosoftChina => "smtp.partner.outlook.cn",
            Provider::Google => "smtp.gmail.com",
        }
    }

    /// Microsoft Graph's base URL in the provider's cloud (`upstream.graph_url`'s default);
    /// `None`: the provider has no Graph (Google).
    pub(crate) fn graph_url(self) -> Option<&'static str> {
        match self {
            Provider::Microsoft => Some("https://graph.microsoft.com"),
            Provider::MicrosoftUsGov => Some("https://graph.microsoft.us"),
            Provider::MicrosoftChina => Some("https://microsoftgraph.chinacloudapi.cn"),
            Provider::Google => None,
        }
    }

    pub(crate) fn token_url(self, tenant: &str) -> String {
        match self {
            Provider::Google => "https://oauth2.googleapis.com/token".into(),
            _ => format!("{}/{tenant}/oauth2/v2.0/token", self.login_host()),
        }
    }

    pub(crate) fn authorize_url(self, tenant: &str) -> String {
        match self {
            Provider::Google => "https://accounts.google.com/o/oauth2/v2/auth".into(),
            _ => format!("{}/{tenant}/oauth2/v2.0/authorize", self.login_host()),
        }
    }

    pub(crate) fn device_authorization_url(self, tenant: &str) -> String {
        match self {
            Provider::Google => "https://oauth2.googleapis.com/device/code".into(),
            _ => format!("{}/{tenant}/oauth2/v2.0/devicecode", self.login_host()),
        }
    }

    /// Scopes used when the account does not list its own (Graph: Mail.Send in the
    /// provider's Graph cloud).
    pub(crate) fn default_scopes(
        self,
        flow: Flow,
        transport: TransportKind,
    ) -> &'static [&'static str] {
        if transport == TransportKind::Graph {
            return match (self, flow) {
                (Provider::Google, _) => &["https://mail.google.com/"],
                (Provider::Microsoft, Flow::ClientCredentials) => {
                    &["https://graph.microsoft.com/.default"]
                }
                (Provider::MicrosoftUsGov, Flow::ClientCredentials) => {
                    &["https://graph.microsoft.us/.default"]
                }
                (Provider::MicrosoftChina, Flow::ClientCredentials) => {
                    &["https://microsoftgraph.chinacloudapi.cn/.default"]
                }
                (Provider::Microsoft, _) => {
                    &["https://graph.microsoft.com/Mail.Send", "offline_access"]
                }
                (Provider::MicrosoftUsGov, _) => {
                    &["https://graph.microsoft.us/Mail.Send", "offline_access"]
                }
                (Provider::MicrosoftChina, _) => &[
                    "https://microsoftgraph.chinacloudapi.cn/Mail.Send",
                    "offline_access",
                ],
            };
        }
        match (self, flow) {
            (Provider::Google, _) => &["https://mail.google.com/"],
            (Provider::Microsoft, Flow::ClientCredentials) => {
                &["https://outlook.office365.com/.default"]
            }
            (Provider::MicrosoftUsGov, Flow::ClientCredentials) => {
                &["https://outlook.office365.us/.default"]
            }
            (Provider::MicrosoftChina, Flow::ClientCredentials) => {
                &["https://partner.outlook.cn/.default"]
            }
            (Provider::Microsoft, _) => &["https://outlook.office.com/SMTP.Send", "offline_access"],
            (Provider::MicrosoftUsGov, _) => {
                &["https://outlook.office365.us/SMTP.Send", "offline_access"]
            }
            (Provider::MicrosoftChina, _) => {
                &["https://partner.outlook.cn/SMTP.Send", "offline_access"]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microsoft_preset_fills_tenant() {
        let p = Provider::parse("microsoft").unwrap();
        assert_eq!(
            p.authorize_url("contoso.onmicrosoft.com"),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize"
        );
        assert_eq!(
            p.default_scopes(Flow::AuthorizationCode, TransportKind::Smtp),
            ["https://outlook.office.com/SMTP.Send", "offline_access"]
        );
        assert_eq!(
            p.default_scopes(Flow::ClientCredentials, TransportKind::Graph),
            ["https://graph.microsoft.com/.default"]
        );
        assert_eq!(
            p.default_scopes(Flow::DeviceCode, TransportKind::Graph),
            ["https://graph.microsoft.com/Mail.Send", "offline_access"]
        );
        assert_eq!(p.graph_url(), Some("https://graph.microsoft.com"));
        assert_eq!(
            Provider::MicrosoftUsGov.graph_url(),
            Some("https://graph.microsoft.us")
        );
        assert_eq!(
            Provider::MicrosoftChina.graph_url(),
            Some("https://microsoftgraph.chinacloudapi.cn")
        );
        assert_eq!(Provider::Google.graph_url(), None);
        assert_eq!(p.smtp_host(), "smtp.office365.com");
        assert_eq!(
            Provider::parse("google").unwrap().smtp_host(),
            "smtp.gmail.com"
        );
        assert!(Provider::parse("yahoo").is_none());
    }
}
