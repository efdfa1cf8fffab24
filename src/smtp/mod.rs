//! The local side: the SMTP listener applications talk to. `listener` accepts connections
//! (and upgrades TLS), `session` runs one connection's state machine over `framing`, with
//! `sasl` decoding, `auth` verifying and `policy` deciding who may send what.

pub mod auth;
pub mod data;
pub mod framing;
pub mod listener;
pub mod policy;
pub mod reply;
pub mod sasl;
pub mod session;
pub mod tls;
