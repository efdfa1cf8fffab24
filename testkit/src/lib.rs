//! Test doubles for the remote ends only: Microsoft's token endpoint, Microsoft 365's
//! SMTP submission server and Microsoft Graph's mail API, plus the throwaway CA their TLS
//! needs. Real sockets, real TLS, real HTTP and SMTP, so the `demo` command, integration
//! tests and benchmarks exercise the bridge exactly as in production. Nothing here is used
//! by the bridge's own code paths.
//!
//! Callers bind the listeners (e.g. `127.0.0.1:0`) and pass them in; each fake runs in
//! spawned tasks until the tokio runtime shuts down.
//!
//! Its own crate (`publish = false`), importing nothing of the bridge: the bridge binary
//! uses it only through its default `demo` feature, so a `--no-default-features` build holds
//! none of it; `tests/` and `benches/` use it as a dev-dependency.

pub mod ca;
pub mod credential;
pub mod delay;
pub mod graph;
pub mod token;
pub mod upstream;

pub use ca::TestCa;
pub use delay::DelayProxy;
pub use graph::{
    FakeGraph, FakeGraphOptions, GraphAttachment, GraphFault, GraphRequest, GraphSendPath,
    GraphSent,
};
pub use token::{FakeTokenEndpoint, TokenOptions};
pub use upstream::{FakeUpstream, FakeUpstreamOptions, Received, Reply, Stall};

#[cfg(test)]
mod interop_tests;
