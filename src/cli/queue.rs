//! `queue list|show|retry|delete`: inspect and steer the spool in `state.dir`, also while
//! `serve` runs. How that is safe (per-message file locks, retry markers, the running
//! `serve`'s control scan) is `relay::spool`'s and `relay::deliver`'s business; this file
//! parses, prints and sets the exit code (1 naming an unknown id, 2 for bad usage).

use super::{CliError, ConfigArg};
use clap::Subcommand;
use serde::Serialize;
use smtp_oauth_bridge::clock::unix_now;
use smtp_oauth_bridge::relay::spool::{ControlError, Entry, Spool};
use smtp_oauth_bridge::telemetry::{self, LogFormat, Outcome, RelayEvent};
use std::io::Write;

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// One line per spooled message: id, account, from, recipients (pending/delivered/failed),
    /// bytes, age, attempts, next attempt, last reply
    List {
        /// The dead letters instead (state.dir/dead)
        #[arg(long)]
        dead: bool,
        /// A JSON array, for scripts
        #[arg(long)]
        json: bool,
    },
    /// A message's envelope, progress, every attempt's reply and its headers
    Show {
        id: String,
        /// JSON, for scripts
        #[arg(long)]
        json: bool,
    },
    /// Make messages due now; with --dead, move dead messages back into the spool
    Retry {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every message (in the spool, or with --dead every dead one)
        #[arg(long)]
        all: bool,
        #[arg(long)]
        dead: bool,
    },
    /// Remove messages (relay log outcome `deleted`); --all only with --dead
    Delete {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every dead message
        #[arg(long, requires = "dead")]
        all: bool,
        /// The ids are dead letters
        #[arg(long)]
        dead: bool,
    },
}

/// Logs (warnings, and the relay log lines of `delete`) go to stderr, so that stdout
/// carries only the listing.
pub fn init_log(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let (env, cap) = telemetry::filters("warn,relay=info");
    let layer = match format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(env).with_filter(cap))
        .try_init();
}

pub fn run(config: &ConfigArg, command: QueueCommand) -> Result<(), CliError> {
    let config = config.load()?;
    let spool = Spool::at(&config.state.dir);
    match command {
        QueueCommand::List { dead, json } => list(&spool, dead, json),
        QueueCommand::Show { id, json } => show(&spool, &id, json),
        QueueCommand::Retry { ids, all, dead } => retry(&spool, ids, all, dead),
        QueueCommand::Delete { ids, all, dead } => delete(&spool, ids, all, dead),
    }
}

fn runtime(e: impl std::fmt::Display) -> CliError {
    CliError::Runtime(e.to_string())
}

fn out(text: &str) -> Result<(), CliError> {
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(|e| runtime(format!("cannot write to stdout: {e}")))
}

/// A message as `list --json` and `show --json` print it.
#[derive(Debug, Serialize)]
struct Listed<'a> {
    id: &'a str,
    account: &'a str,
    from: &'a str,
    pending: Vec<&'a str>,
    delivered: &'a [String],
    failed: Vec<Failed<'a>>,
    bytes: usize,
    received_at: u64,
    age_secs: u64,
    attempts: u32,
    /// Unix seconds; null when none is scheduled (new, or dead).
    next_attempt: Option<u64>,
    retry_requested: bool,
    last_reply: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress_error: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct Failed<'a> {
    recipient: &'a str,
    reply: &'a str,
}

fn listed(e: &Entry, now: u64) -> Listed<'_> {
    Listed {
        id: &e.env.id,
        account: &e.env.account,
        from: &e.env.from,
        pending: e.progress.pending(&e.env).map(String::as_str).collect(),
        delivered: &e.progress.delivered,
        failed: e
            .progress
            .failed
            .iter()
            .map(|(r, why)| Failed {
                recipient: r,
                reply: why,
            })
            .collect(),
        bytes: e.env.bytes,
        received_at: e.env.received_at,
        age_secs: now.saturating_sub(e.env.received_at),
        attempts: e.progress.attempts,
        next_attempt: e.progress.next_attempt,
        retry_requested: e.retry_requested,
        last_reply: e.progress.last_error.as_deref(),
        dead_reason: e.dead_reason.as_deref(),
        progress_error: e.progress_error.as_deref(),
    }
}

/// `3s`, `4m`, `5h`, `2d`.
fn span(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn next_text(l: &Listed<'_>, now: u64) -> String {
    if l.dead_reason.is_some() {
        "-".into()
    } else if l.retry_requested {
        "now (retry)".into()
    } else {
        match l.next_attempt {
            Some(t) if t > now => format!("in {}", span(t - now)),
            _ => "now".into(),
        }
    }
}

fn list(spool: &Spool, dead: bool, json: bool) -> Result<(), CliError> {
    let entries = spool.entries(dead).map_err(|e| {
        runtime(format!(
            "cannot read the {}: {e}",
            if dead { "dead letters" } else { "spool" }
        ))
    })?;
    let now = unix_now();
    let rows: Vec<Listed<'_>> = entries.iter().map(|e| listed(e, now)).collect();
    if json {
        let mut text = serde_json::to_string_pretty(&rows).map_err(runtime)?;
        text.push('\n');
        return out(&text);
    }
    let mut text = format!(
        "{:<16}  {:<12}  {:<28}  {:>9}  {:>9}  {:>5}  {:>4}  {:<11}  {}\n",
        "ID",
        "ACCOUNT",
        "FROM",
        "RCPT P/D/F",
        "BYTES",
        "AGE",
        "TRY",
        "NEXT",
        if dead { "REASON" } else { "LAST REPLY" }
    );
    for l in &rows {
        let last = if dead {
            l.dead_reason.unwrap_or("")
        } else {
            l.last_reply.unwrap_or("-")
        };
        text.push_str(&format!(
            "{:<16}  {:<12}  {:<28}  {:>9}  {:>9}  {:>5}  {:>4}  {:<11}  {}\n",
            l.id,
            l.account,
            if l.from.is_empty() { "<>" } else { l.from },
            format!(
                "{}/{}/{}",
                l.pending.len(),
                l.delivered.len(),
                l.failed.len()
            ),
            l.bytes,
            span(l.age_secs),
            l.attempts,
            next_text(l, now),
            one_line(last),
        ));
    }
    text.push_str(&format!(
        "{} message{}{}\n",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        if dead { " in dead/" } else { "" }
    ));
    out(&text)
}

/// A reply or reason on one line (no control characters).
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn unknown(ids: &[String]) -> CliError {
    CliError::Runtime(format!(
        "unknown message id{} {}",
        if ids.len() == 1 { "" } else { "s" },
        ids.join(", ")
    ))
}

fn show(spool: &Spool, id: &str, json: bool) -> Result<(), CliError> {
    let Some(e) = spool.entry(id) else {
        return Err(unknown(&[id.to_string()]));
    };
    let dead = e.dead_reason.is_some();
    let headers = spool
        .headers(&e.env.id, dead)
        .map_err(|err| runtime(format!("message {id}: cannot read its headers: {err}")))?;
    let headers = String::from_utf8_lossy(&headers);
    let now = unix_now();
    let l = listed(&e, now);
    if json {
        #[derive(Serialize)]
        struct Shown<'a> {
            #[serde(flatten)]
            message: &'a Listed<'a>,
            params: &'a str,
            rcpts: &'a [String],
            dead: bool,
            history: &'a [smtp_oauth_bridge::relay::spool::Attempt],
            headers: &'a str,
        }
        let mut text = serde_json::to_string_pretty(&Shown {
            message: &l,
            params: &e.env.params,
            rcpts: &e.env.rcpts,
            dead,
            history: &e.progress.history,
            headers: &headers,
        })
        .map_err(runtime)?;
        text.push('\n');
        return out(&text);
    }
    let mut t = String::new();
    let date = |s: u64| smtp_oauth_bridge::relay::dsn::rfc5322_date(s);
    t.push_str(&format!("id:          {}\n", e.env.id));
    t.push_str(&format!(
        "where:       {}\n",
        if dead { "dead/" } else { "spool/" }
    ));
    t.push_str(&format!("account:     {}\n", e.env.account));
    t.push_str(&format!("from:        <{}>\n", e.env.from));
    t.push_str(&format!("params:      {}\n", e.env.params));
    t.push_str(&format!("recipients:  {}\n", e.env.rcpts.join(", ")));
    t.push_str(&format!("bytes:       {}\n", e.env.bytes));
    t.push_str(&format!(
        "received:    {} ({} ago)\n",
        date(e.env.received_at),
        span(l.age_secs)
    ));
    t.push_str(&format!("attempts:    {}\n", e.progress.attempts));
    t.push_str(&format!("next:        {}\n", next_text(&l, now)));
    if let Some(err) = &e.progress_error {
        t.push_str(&format!("progress:    unreadable: {err}\n"));
    }
    t.push_str(&format!("pending:     {}\n", l.pending.join(", ")));
    t.push_str(&format!(
        "delivered:   {}\n",
        e.progress.delivered.join(", ")
    ));
    for (r, why) in &e.progress.failed {
        t.push_str(&format!("failed:      {r}: {}\n", one_line(why)));
    }
    if let Some(reason) = &e.dead_reason {
        t.push_str(&format!("dead:        {}\n", one_line(reason)));
    }
    t.push_str("attempt history:\n");
    if e.progress.history.is_empty() {
        t.push_str("  (none recorded)\n");
    }
    for a in &e.progress.history {
        t.push_str(&format!(
            "  {}  {} {}\n",
            date(a.at),
            a.code,
            one_line(&a.reply)
        ));
    }
    t.push_str("headers:\n");
    for line in headers.lines() {
        t.push_str(&format!("  {line}\n"));
    }
    out(&t)
}

/// The ids to act on: those given (each must exist, else exit 1 naming them, before
/// anything is done), or with `--all` every message of the spool or `dead/`.
fn targets(
    spool: &Spool,
    ids: Vec<String>,
    all: bool,
    dead: bool,
) -> Result<Vec<String>, CliError> {
    if all {
        let entries = spool.entries(dead).map_err(runtime)?;
        return Ok(entries.into_iter().map(|e| e.env.id).collect());
    }
    let mut missing = Vec::new();
    for id in &ids {
        match spool.entry(id) {
            None => missing.push(id.clone()),
            Some(e) if e.dead_reason.is_some() && !dead => {
                return Err(CliError::Runtime(format!(
                    "message {id} is in dead/; use --dead"
                )))
            }
            Some(e) if e.dead_reason.is_none() && dead => {
                return Err(CliError::Runtime(format!(
                    "message {id} is in the spool, not in dead/"
                )))
            }
            Some(_) => {}
        }
    }
    if !missing.is_empty() {
        return Err(unknown(&missing));
    }
    Ok(ids)
}

/// Runs `f` on every id; the failures are reported together (exit 1 naming them).
fn each(
    ids: &[String],
    verb: &str,
    mut f: impl FnMut(&str) -> Result<(), ControlError>,
) -> Result<(), CliError> {
    let mut unknown_ids = Vec::new();
    let mut errors = Vec::new();
    for id in ids {
        match f(id) {
            Ok(()) => {}
            Err(ControlError::Unknown(id)) => unknown_ids.push(id),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !unknown_ids.is_empty() {
        errors.insert(0, unknown(&unknown_ids).to_string());
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CliError::Runtime(format!("{verb}: {}", errors.join("; "))))
    }
}

fn retry(spool: &Spool, ids: Vec<String>, all: bool, dead: bool) -> Result<(), CliError> {
    let ids = targets(spool, ids, all, dead)?;
    let mut done = String::new();
    let r = each(&ids, "retry", |id| {
        if dead {
            spool.requeue(id)?;
            done.push_str(&format!("{id}: moved back into the spool, due now\n"));
        } else {
            spool.request_retry(id)?;
            done.push_str(&format!("{id}: due now\n"));
        }
        Ok(())
    });
    out(&done)?;
    r
}

fn delete(spool: &Spool, ids: Vec<String>, all: bool, dead: bool) -> Result<(), CliError> {
    let ids = targets(spool, ids, all, dead)?;
    let mut done = String::new();
    let r = each(&ids, "delete", |id| {
        let env = spool.delete(id, dead)?;
        telemetry::relay_event(&RelayEvent {
            id: &env.id,
            account: &env.account,
            from: &env.from,
            rcpts: &env.rcpts,
            bytes: env.bytes,
            outcome: Outcome::Deleted,
            upstream_code: 0,
            upstream_reply: "",
            ms: 0,
            via: None,
        });
        done.push_str(&format!("{id}: deleted\n"));
        Ok(())
    });
    out(&done)?;
    r
}
