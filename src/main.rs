//! The `smtp-oauth-bridge` binary: command line, logging setup, dispatch, exit codes.

mod cli;

use clap::{Parser, Subcommand, ValueEnum};
use cli::CliError;
use smtp_oauth_bridge::telemetry::{self, LogFormat};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "smtp-oauth-bridge",
    version,
    about = "Local SMTP (AUTH PLAIN/LOGIN) to Microsoft 365 (STARTTLS + XOAUTH2) relay"
)]
struct Cli {
    /// Configuration file [default: $SMTP_OAUTH_BRIDGE_CONFIG, else ./bridge.toml]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log format [default: pretty on a terminal, json otherwise]
    #[arg(long, global = true, value_enum)]
    log_format: Option<Format>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the SMTP listener and relay until SIGINT/SIGTERM
    Serve {
        /// Print the effective configuration (file + environment, secrets redacted) and exit
        #[arg(long)]
        print_config: bool,
    },
    /// Sign in for a delegated account and store its refresh token
    Login {
        /// The account's local username
        account: String,
        /// Use the device code flow (for hosts without a browser)
        #[arg(long)]
        device: bool,
        /// Only print the sign-in URL; do not start a browser
        #[arg(long)]
        no_browser: bool,
    },
    /// Validate the config and test token + upstream STARTTLS + AUTH XOAUTH2 for each account
    Check {
        /// Only this account (its local username)
        account: Option<String>,
    },
    /// Read a password and print an argon2id hash for `password_hash`
    HashPassword,
    /// Inspect and steer the spool (spool mode), also while `serve` runs
    Queue {
        #[command(subcommand)]
        command: cli::queue::QueueCommand,
    },
    /// Run the whole pipeline on loopback with an embedded upstream and token endpoint
    #[cfg(feature = "demo")]
    Demo {
        /// Keep the pipeline running until Ctrl-C: print an address, user and password to
        /// point a real application or printer at, and each delivered copy as it arrives
        #[arg(long)]
        serve: bool,
        /// Deliver through the embedded Microsoft Graph endpoint instead of SMTP
        #[arg(long, value_enum, default_value_t = cli::demo::DemoTransport::Smtp)]
        transport: cli::demo::DemoTransport,
    },
}

fn main() {
    let cli = Cli::parse();
    let format = match cli.log_format {
        Some(Format::Pretty) => LogFormat::Pretty,
        Some(Format::Json) => LogFormat::Json,
        None if std::io::stdout().is_terminal() => LogFormat::Pretty,
        None => LogFormat::Json,
    };
    let required = cli.config.is_some()
        || std::env::var_os(smtp_oauth_bridge::config::ENV_CONFIG_FILE).is_some();
    let config = cli::ConfigArg {
        path: cli
            .config
            .unwrap_or_else(smtp_oauth_bridge::config::default_path),
        required,
    };
    let result = match cli.command {
        Command::HashPassword => cli::hash_password::run(),
        Command::Queue { command } => {
            cli::queue::init_log(format);
            cli::queue::run(&config, command)
        }
        command => {
            // `check` and `login` print their own report; their log shows only problems
            // unless RUST_LOG says otherwise.
            let quiet = matches!(command, Command::Check { .. } | Command::Login { .. });
            let default_level = if quiet { "warn" } else { "info" };
            let _log = telemetry::init(format, default_level);
            match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(run(command, &config, format)),
                Err(e) => Err(CliError::Runtime(format!("cannot start the runtime: {e}"))),
            }
        }
    };
    if let Err(e) = result {
        exit(e);
    }
}

async fn run(command: Command, config: &cli::ConfigArg, format: LogFormat) -> Result<(), CliError> {
    #[cfg(not(feature = "demo"))]
    let _ = format; // only `demo` prints in the chosen format itself
    match command {
        Command::Serve { print_config } => cli::serve::run(config, print_config).await,
        Command::Check { account } => cli::check::run(config, account.as_deref()).await,
        Command::Login {
            account,
            device,
            no_browser,
        } => cli::login::run(config, &account, device, no_browser).await,
        #[cfg(feature = "demo")]
        Command::Demo { serve, transport } => cli::demo::run(format, serve, transport).await,
        Command::HashPassword => cli::hash_password::run(),
        Command::Queue { command } => cli::queue::run(config, command),
    }
}

fn exit(e: CliError) -> ! {
    eprintln!("smtp-oauth-bridge: {e}");
    std::process::exit(e.exit_code());
}
