//! The upstream side: sessions to the provider, the per-mailbox pool, and the one mapping
//! from upstream results to local replies.

pub(crate) mod deliver;
pub mod dsn;
pub mod envelope;
pub mod graph;
pub(crate) mod outcome;
pub mod pool;
mod smtp;
pub mod spool;
pub(crate) mod transport;
pub mod upstream;
