//! smtp-oauth-bridge: a local SMTP submission server (AUTH PLAIN/LOGIN) that relays every
//! message unchanged to Microsoft 365 (or another XOAUTH2 provider) over STARTTLS + XOAUTH2.
//!
//! Mail flows one way: local client -> [`smtp`] session -> [`relay`] upstream session ->
//! provider. Tokens flow one way: provider -> [`oauth`] manager -> upstream session.
//!
//! - [`config`]: file -> validated configuration
//! - [`smtp`]: the local listener (sessions, replies, local authentication, TLS)
//! - [`relay`]: upstream sessions, the per-mailbox pool, and the reply mapping
//! - [`reply`]: the SMTP reply value both sides use (relay maps to it, smtp sends it)
//! - [`oauth`]: token requests, token store and manager
//! - [`secret`]: secret values with redacted Debug/Display, zeroed on drop
//! - [`telemetry`]: log setup and the relay log line
//! - [`clock`]: the one clock (tokio's monotonic time and the wall clock), `unix_now`
#![forbid(unsafe_code)]

pub mod admin;
pub mod bridge;
pub mod clock;
pub mod config;
pub mod fsutil;
pub mod metrics;
pub mod oauth;
pub mod relay;
pub mod reply;
pub mod secret;
pub mod smtp;
pub(crate) mod sync;
pub mod telemetry;
