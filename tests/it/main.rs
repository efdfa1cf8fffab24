//! Integration tests: the real bridge (in-process or the real binary) on 127.0.0.1:0
//! against testkit's fake upstream and token endpoint. One test binary.
#![allow(clippy::unwrap_used)]

mod admin;
mod cli;
mod clients;
mod credentials;
mod deploy;
mod failures;
mod features;
mod graph;
mod hardening;
mod harness;
mod hostile;
mod layout;
mod limits;
mod login;
mod memory;
mod office;
mod operate;
mod pipelining;
mod queue;
mod relay;
mod reload;
mod secrets;
mod spool;
mod tokens;
mod warm;
