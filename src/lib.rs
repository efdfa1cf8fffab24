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
//! - [`oauth`]: provider presets, token requests, token store and manager
//! - [`telemetry`]: log setup and the relay log line
//! - [`testkit`]: fake Microsoft 365 SMTP server and token endpoint (demo, tests, benches)
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
pub mod telemetry;
pub mod testkit;
