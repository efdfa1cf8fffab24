//! The commands. Each returns `Result<(), CliError>`; `main` turns that into the exit code
//! (0 success, 1 runtime failure, 2 bad usage or invalid configuration).

pub mod check;
#[cfg(feature = "demo")]
pub mod demo;
pub mod hash_password;
pub mod login;
pub mod queue;
pub mod serve;

use smtp_oauth_bridge::config::Config;
use std::fmt;
use std::path::PathBuf;

/// Where the configuration comes from: `--config`, `$SMTP_OAUTH_BRIDGE_CONFIG` or
/// `./bridge.toml`, plus the `SMTP_OAUTH_BRIDGE_*` environment.
#[derive(Debug, Clone)]
pub struct ConfigArg {
    pub path: PathBuf,
    /// Named explicitly (flag or variable): then the file must exist.
    pub required: bool,
}

impl ConfigArg {
    pub fn load(&self) -> Result<Config, CliError> {
        Ok(Config::load(&self.path, self.required)?)
    }
}

#[derive(Debug)]
pub enum CliError {
    /// Invalid configuration or usage: exit 2.
    Usage(String),
    /// Something failed at run time: exit 1.
    Runtime(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Runtime(_) => 1,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(m) | CliError::Runtime(m) => f.write_str(m),
        }
    }
}

impl From<smtp_oauth_bridge::config::ConfigError> for CliError {
    fn from(e: smtp_oauth_bridge::config::ConfigError) -> Self {
        CliError::Usage(format!("invalid configuration: {e}"))
    }
}
