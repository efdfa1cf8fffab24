//! The local side: the SMTP listener applications talk to. `listener` accepts connections
//! (and upgrades TLS), `session` runs one connection's state machine over `framing`, with
//! `sasl` decoding, `auth` verifying and `policy` deciding who may send what.

pub mod auth;
pub(crate) mod data;
pub(crate) mod framing;
pub(crate) mod listener;
pub(crate) mod policy;
pub(crate) mod reply;
pub(crate) mod sasl;
pub(crate) mod session;
pub(crate) mod tls;
