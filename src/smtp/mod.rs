//! The local side: the SMTP listener applications talk to.

pub mod auth;
pub mod data;
pub mod reply;
pub mod server;
pub mod session;
pub mod tls;
