//! OAuth 2.0: token requests, the token store and the token manager (provider presets are
//! configuration defaults: [`crate::config`]).
//!
//! Tokens flow one way: provider -> [`manager::TokenManager`] -> upstream sessions.

pub mod credential;
pub mod flows;
pub mod manager;
pub mod store;
