//! The `SMTP_OAUTH_BRIDGE_*` environment overlay: each variable sets one key of the file's
//! table before it is deserialized (`SMTP_OAUTH_BRIDGE_<SECTION>__<KEY>`, accounts and relay
//! networks as `ACCOUNT__<N>__<KEY>` and `RELAY_NETWORK__<N>__<KEY>`). Values are typed by
//! the key's name (lists comma-separated); what a key means is the raw structs' and the
//! validator's business.

use super::ConfigError;

/// Environment variables that set configuration keys start with this.
pub const ENV_PREFIX: &str = "SMTP_OAUTH_BRIDGE_";
/// ... except this one, which names the file.
pub const ENV_CONFIG_FILE: &str = "SMTP_OAUTH_BRIDGE_CONFIG";

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &[
    "allowed_from",
    "allowed_rcpt",
    "scopes",
    "smtp",
    "smtps",
    "allow_networks",
    "cidr",
];
/// The most entries an indexed section may have from the environment (the index is used to
/// grow a list: an absurd one must not allocate without bound).
const MAX_INDEX: usize = 1000;

/// Lists of tables, addressed by index: `ACCOUNT__<N>__<KEY>`, `RELAY_NETWORK__<N>__<KEY>`.
const INDEXED_SECTIONS: &[&str] = &["account", "relay_network"];
/// Keys whose environment value is a boolean.
const BOOL_KEYS: &[&str] = &["require_tls_for_auth", "bounce", "save_to_sent_items"];
/// Keys whose environment value is an integer (besides every `*_secs`).
const INT_KEYS: &[&str] = &[
    "port",
    "max_message_bytes",
    "max_bytes",
    "max_recipients",
    "max_connections",
    "max_sessions_per_mailbox",
    "warm_sessions",
    "messages_per_minute",
    "redirect_port",
];

/// The `SMTP_OAUTH_BRIDGE_*` variables that set keys (all but [`ENV_CONFIG_FILE`]).
pub(super) fn key_vars() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != ENV_CONFIG_FILE)
        .collect()
}

/// Sets one `SMTP_OAUTH_BRIDGE_*` variable in the configuration table.
pub(super) fn overlay(table: &mut toml::Table, name: &str, value: &str) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError {
        file: "environment".into(),
        key: name.to_string(),
        reason,
    };
    let rest = name.strip_prefix(ENV_PREFIX).unwrap_or(name);
    let segs: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
    if segs.len() < 2 || segs.iter().any(|s| s.is_empty()) {
        return Err(err(format!(
            "expected {ENV_PREFIX}<SECTION>__<KEY> (e.g. {ENV_PREFIX}UPSTREAM__PORT) or {ENV_PREFIX}ACCOUNT__<N>__<KEY>"
        )));
    }
    let leaf = segs.last().map(String::as_str).unwrap_or_default();
    let typed = if LIST_KEYS.contains(&leaf) {
        toml::Value::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        )
    } else if BOOL_KEYS.contains(&leaf) {
        match value.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => toml::Value::Boolean(true),
            "false" | "0" | "no" => toml::Value::Boolean(false),
            _ => return Err(err(format!("{value:?} is not a boolean (true or false)"))),
        }
    } else if INT_KEYS.contains(&leaf) || leaf.ends_with("_secs") {
        toml::Value::Integer(
            value
                .trim()
                .parse::<i64>()
                .map_err(|_| err(format!("{value:?} is not a whole number")))?,
        )
    } else {
        toml::Value::String(value.to_string())
    };
    let mut node = table;
    let mut path = &segs[..segs.len() - 1];
    if let Some(section) = INDEXED_SECTIONS.iter().find(|s| **s == segs[0]) {
        let index: usize = segs[1].parse().map_err(|_| {
            err(format!(
                "{:?} is not an {section} index (0, 1, ...)",
                segs[1]
            ))
        })?;
        if segs.len() < 3 {
            return Err(err(format!("names no key of the {section}")));
        }
        if index >= MAX_INDEX {
            return Err(err(format!(
                "{section} index {index} is too large (at most {})",
                MAX_INDEX - 1
            )));
        }
        let entries = node
            .entry(*section)
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        let toml::Value::Array(list) = entries else {
            return Err(err(format!(
                "[[{section}]] in the file is not a list of tables"
            )));
        };
        while list.len() <= index {
            list.push(toml::Value::Table(toml::Table::new()));
        }
        let toml::Value::Table(t) = &mut list[index] else {
            return Err(err(format!("{section} {index} is not a table")));
        };
        node = t;
        path = &segs[2..segs.len() - 1];
    }
    for seg in path {
        let next = node
            .entry(seg.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(t) = next else {
            return Err(err(format!("{seg} is not a table")));
        };
        node = t;
    }
    node.insert(leaf.to_string(), typed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absurd_index_is_an_error_not_an_allocation() {
        let mut t = toml::Table::new();
        let name = format!("{ENV_PREFIX}ACCOUNT__999999999__USERNAME");
        let e = overlay(&mut t, &name, "x").unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
        assert!(t
            .get("account")
            .is_none_or(|a| a.as_array().is_some_and(|a| a.len() <= 1)));
        let ok = format!("{ENV_PREFIX}ACCOUNT__2__USERNAME");
        overlay(&mut t, &ok, "x").unwrap();
        assert_eq!(t["account"].as_array().unwrap().len(), 3);
    }
}
