//! OAuth 2.0: provider presets, token requests, the token store and the token manager.
//!
//! Tokens flow one way: provider -> [`manager::TokenManager`] -> upstream sessions.

pub mod flows;
pub mod manager;
pub mod provider;
pub mod secret;
pub mod store;
