//! Our upstream SMTP client: the session API the pool uses (`session`), the wire under it
//! (`client`: socket, TLS upgrade, reading replies, writing dot-stuffed content) and the
//! bounded reply parser with the EHLO capabilities (`reply`), and one transaction on a pooled
//! session behind `relay::transport` (`transaction`).
//!
//! Owned rather than borrowed from lettre so that replies are only ever matched to the
//! command that asked for them (no STARTTLS response injection), content is written as it
//! is given, and PIPELINING can follow (see DESIGN.md on the upstream SMTP client).

pub(crate) mod client;
pub(crate) mod reply;
pub(crate) mod session;
pub(crate) mod transaction;
