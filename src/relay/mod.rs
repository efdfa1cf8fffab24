//! The upstream side: sessions to the provider, the per-mailbox pool, and the one mapping
//! from upstream results to local replies.

pub mod deliver;
pub mod dsn;
pub mod envelope;
pub mod outcome;
pub mod pool;
mod smtp;
pub mod spool;
pub mod transport;
pub mod upstream;
