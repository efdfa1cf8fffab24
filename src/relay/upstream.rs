//! The upstream session API the rest of the crate uses: [`UpstreamSession`] (connect,
//! STARTTLS or implicit TLS, AUTH XOAUTH2, commands, content), its target, replies and
//! errors. The client itself lives in `relay::smtp`.

pub use crate::relay::smtp::reply::{Capabilities, UpReply};
pub use crate::relay::smtp::session::{
    local_hostname, TargetError, UpstreamError, UpstreamSession, UpstreamTarget,
};
