//! `hash-password`: read a password (terminal without echo, or one line of stdin) and print
//! an argon2id PHC string for `password_hash`.

use super::CliError;
use smtp_oauth_bridge::secret::Secret;
use smtp_oauth_bridge::smtp::auth::hash_password;
use std::io::{BufRead, IsTerminal};

pub fn run() -> Result<(), CliError> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")
            .map_err(|e| CliError::Runtime(format!("cannot read the password: {e}")))?;
        let again = rpassword::prompt_password("Again: ")
            .map_err(|e| CliError::Runtime(format!("cannot read the password: {e}")))?;
        if first != again {
            return Err(CliError::Usage("the passwords differ".into()));
        }
        Secret::new(first)
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| CliError::Runtime(format!("cannot read the password from stdin: {e}")))?;
        Secret::new(line.trim_end_matches(['\r', '\n']))
    };
    if password.is_empty() {
        return Err(CliError::Usage("the password is empty".into()));
    }
    let phc =
        hash_password(&password).map_err(|e| CliError::Runtime(format!("hashing failed: {e}")))?;
    println!("{phc}");
    Ok(())
}
