//! The deployment files under deploy/: the Kubernetes manifests and the compose file parse and
//! wire the bridge up as deploy/README.md describes; the environment each deployment gives the
//! bridge (on top of the image's) is a valid configuration for the real binary, and so is the
//! systemd example; every SMTP_OAUTH_BRIDGE_* name under deploy/ is a real configuration key;
//! the Dockerfile builds what CI tests; the systemd unit passes `systemd-analyze verify` (when
//! installed; CI installs it) and keeps its sandbox; the Kubernetes manifests use only API
//! fields, with values of their type.
//!
//! The image cannot be built here (no Docker engine): the Dockerfile gets structural checks.
//! Nothing here binds a port or opens a connection: configurations are checked with
//! `serve --print-config`, which loads the configuration, prints it and exits.

use serde::Deserialize;
use serde_yaml::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

const PREFIX: &str = "SMTP_OAUTH_BRIDGE_";
/// Names the configuration file, not a key.
const CONFIG_FILE_VAR: &str = "SMTP_OAUTH_BRIDGE_CONFIG";
const STATE_DIR: &str = "/var/lib/smtp-oauth-bridge";

/// Every configuration key, by section (README.md "Configuration reference", SPEC.md).
const LISTEN_KEYS: &[&str] = &[
    "smtp",
    "admin",
    "tls",
    "tls_cert",
    "tls_key",
    "require_tls_for_auth",
    "max_message_bytes",
    "max_recipients",
    "max_connections",
    "shutdown_grace_secs",
];
const UPSTREAM_KEYS: &[&str] = &[
    "host",
    "port",
    "security",
    "ca_file",
    "timeout_secs",
    "max_sessions_per_mailbox",
    "idle_secs",
    "messages_per_minute",
];
const STATE_KEYS: &[&str] = &["dir", "key_file", "key_env"];
const QUEUE_KEYS: &[&str] = &["mode", "max_age_secs", "retry_min_secs", "retry_max_secs"];
const ACCOUNT_KEYS: &[&str] = &[
    "username",
    "password_hash",
    "password_env",
    "mailbox",
    "allowed_from",
];
const OAUTH_KEYS: &[&str] = &[
    "provider",
    "tenant",
    "flow",
    "client_id",
    "client_secret_env",
    "client_secret_file",
    "scopes",
    "token_url",
    "authorize_url",
    "device_authorization_url",
    "redirect_port",
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_smtp-oauth-bridge")
}

// ---- YAML helpers ---------------------------------------------------------------------------

/// Every non-empty document of a multi-document YAML file.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, doc)| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} document {}: {e}", path.display(), i + 1))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

fn seq_at<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn parse_addr(what: &str, s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("{what} = {s:?} is not IP:port: {e}"))
}

// ---- environment variable names -------------------------------------------------------------

/// Why `name` (which starts with SMTP_OAUTH_BRIDGE_) is not a configuration variable, if so.
fn env_name_problem(name: &str) -> Option<String> {
    if name == CONFIG_FILE_VAR {
        return None;
    }
    let rest = &name[PREFIX.len()..];
    if rest != rest.to_ascii_uppercase() {
        return Some("must be upper case".into());
    }
    let segs: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    if segs.iter().any(String::is_empty) {
        return Some("has an empty segment (a stray `_`?)".into());
    }
    let check = |keys: &[&str], key: &str, section: &str| {
        if keys.contains(&key) {
            None
        } else {
            Some(format!("{section} has no key {key:?} (keys: {keys:?})"))
        }
    };
    match segs
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["listen", key] => check(LISTEN_KEYS, key, "listen"),
        ["upstream", key] => check(UPSTREAM_KEYS, key, "upstream"),
        ["state", key] => check(STATE_KEYS, key, "state"),
        ["queue", key] => check(QUEUE_KEYS, key, "queue"),
        ["account", index, rest @ ..] => {
            if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
                return Some(format!(
                    "ACCOUNT__ must be followed by an index (0, 1, ...), not {index:?}"
                ));
            }
            match rest {
                [key] => check(ACCOUNT_KEYS, key, "account"),
                ["oauth", key] => check(OAUTH_KEYS, key, "account.oauth"),
                _ => Some("expected ACCOUNT__<N>__<KEY> or ACCOUNT__<N>__OAUTH__<KEY>".into()),
            }
        }
        [section, _] => Some(format!(
            "unknown section {section:?}; expected LISTEN, UPSTREAM, STATE, QUEUE or ACCOUNT"
        )),
        _ => Some("expected SMTP_OAUTH_BRIDGE_<SECTION>__<KEY>".into()),
    }
}

/// Every `SMTP_OAUTH_BRIDGE_[A-Za-z0-9_]+` in `text`. Templates in prose, a name followed by
/// `<` or `*` (`SMTP_OAUTH_BRIDGE_<SECTION>__<KEY>`, `..._ACCOUNT__<index>__<KEY>`,
/// `SMTP_OAUTH_BRIDGE_*`), are skipped.
fn env_names_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(pos) = rest.find(PREFIX) {
        let preceded_by_ident = rest[..pos]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let after = &rest[pos..];
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let template = after[len..].starts_with(['<', '*']);
        if !preceded_by_ident && !template && len > PREFIX.len() {
            out.push(after[..len].to_string());
        }
        rest = &after[PREFIX.len()..];
    }
    out
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn env_name_checker_accepts_keys_and_rejects_typos() {
    for ok in [
        "SMTP_OAUTH_BRIDGE_LISTEN__SMTP",
        "SMTP_OAUTH_BRIDGE_UPSTREAM__MESSAGES_PER_MINUTE",
        "SMTP_OAUTH_BRIDGE_STATE__KEY_ENV",
        "SMTP_OAUTH_BRIDGE_QUEUE__RETRY_MAX_SECS",
        "SMTP_OAUTH_BRIDGE_ACCOUNT__12__ALLOWED_FROM",
        "SMTP_OAUTH_BRIDGE_ACCOUNT__0__OAUTH__CLIENT_SECRET_FILE",
        "SMTP_OAUTH_BRIDGE_CONFIG",
    ] {
        assert_eq!(env_name_problem(ok), None, "{ok}");
    }
    for bad in [
        "SMTP_OAUTH_BRIDGE_LISTEN_SMTP",
        "SMTP_OAUTH_BRIDGE_LISTEN__SMTP_ADDR",
        "SMTP_OAUTH_BRIDGE_SERVER__SMTP",
        "SMTP_OAUTH_BRIDGE_ACCOUNT__USERNAME",
        "SMTP_OAUTH_BRIDGE_ACCOUNT__0__CLIENT_ID",
        "SMTP_OAUTH_BRIDGE_ACCOUNT__0__OAUTH__SECRET",
        "SMTP_OAUTH_BRIDGE_STATE___DIR",
        "SMTP_OAUTH_BRIDGE_SCANNER_PASSWORD",
    ] {
        assert!(env_name_problem(bad).is_some(), "{bad} was accepted");
    }
    assert_eq!(
        env_names_in("x SMTP_OAUTH_BRIDGE_<SECTION>__<KEY> SMTP_OAUTH_BRIDGE_ACCOUNT__<N>__X $SMTP_OAUTH_BRIDGE_LISTEN__SMTP=1 X_SMTP_OAUTH_BRIDGE_Y SMTP_OAUTH_BRIDGE_LISTEN__*"),
        vec!["SMTP_OAUTH_BRIDGE_LISTEN__SMTP".to_string()]
    );
}

#[test]
fn every_smtp_oauth_bridge_variable_in_deploy_names_a_real_key() {
    let mut problems = Vec::new();
    let mut seen = 0;
    for file in files_under(&deploy_dir()) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue; // not text
        };
        for name in env_names_in(&text) {
            seen += 1;
            if let Some(p) = env_name_problem(&name) {
                problems.push(format!("{}: {name}: {p}", file.display()));
            }
        }
    }
    assert!(
        seen >= 20,
        "only {seen} SMTP_OAUTH_BRIDGE_* names found under deploy/"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---- Kubernetes -----------------------------------------------------------------------------

/// A container's environment: name -> literal value, or (Secret name, key).
#[derive(Debug)]
enum EnvSource {
    Value(String),
    Secret(String, String),
    Other,
}

fn container_env(c: &Value) -> BTreeMap<String, EnvSource> {
    let name = str_at(c, &["name"]).unwrap_or("?");
    let mut env = BTreeMap::new();
    for e in seq_at(c, &["env"]) {
        let var = str_at(e, &["name"])
            .expect("env entry without name")
            .to_string();
        let src = if let Some(v) = e.get("value") {
            // The API server rejects anything but a string here (2525, true, ...).
            let s = v.as_str().unwrap_or_else(|| {
                panic!("container {name}: env {var}: value {v:?} must be a quoted string")
            });
            EnvSource::Value(s.to_string())
        } else if let Some(r) = at(e, &["valueFrom", "secretKeyRef"]) {
            EnvSource::Secret(
                str_at(r, &["name"]).expect("secretKeyRef.name").into(),
                str_at(r, &["key"]).expect("secretKeyRef.key").into(),
            )
        } else {
            EnvSource::Other
        };
        assert!(
            env.insert(var.clone(), src).is_none(),
            "container {name}: env {var} is set twice"
        );
    }
    env
}

fn env_value<'a>(env: &'a BTreeMap<String, EnvSource>, var: &str) -> &'a str {
    match env.get(var) {
        Some(EnvSource::Value(v)) => v,
        other => panic!("{var} should be a literal value, is {other:?}"),
    }
}

/// The port number a probe's httpGet.port names (a number or a named container port).
fn probe_port(container: &Value, probe: &str) -> (u16, String) {
    let get = at(container, &[probe, "httpGet"])
        .unwrap_or_else(|| panic!("the bridge has no {probe}.httpGet"));
    let path = str_at(get, &["path"]).unwrap_or("/").to_string();
    let port = match get.get("port") {
        Some(Value::Number(n)) => n.as_u64().expect("port number") as u16,
        Some(Value::String(name)) => seq_at(container, &["ports"])
            .iter()
            .find(|p| str_at(p, &["name"]) == Some(name.as_str()))
            .and_then(|p| p.get("containerPort"))
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("{probe}: no container port named {name:?}"))
            as u16,
        other => panic!("{probe}.httpGet.port: {other:?}"),
    };
    (port, path)
}

fn secret_keys(docs: &[Value], name: &str) -> Vec<String> {
    docs.iter()
        .filter(|d| str_at(d, &["kind"]) == Some("Secret"))
        .filter(|d| str_at(d, &["metadata", "name"]) == Some(name))
        .flat_map(|d| {
            ["stringData", "data"].into_iter().flat_map(move |field| {
                d.get(field)
                    .and_then(Value::as_mapping)
                    .into_iter()
                    .flat_map(|m| m.keys().filter_map(Value::as_str).map(String::from))
            })
        })
        .collect()
}

fn kubernetes_documents() -> Vec<(PathBuf, Vec<Value>)> {
    let dir = deploy_dir().join("kubernetes");
    let files: Vec<PathBuf> = files_under(&dir)
        .into_iter()
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    assert!(!files.is_empty(), "no YAML under {}", dir.display());
    files
        .into_iter()
        .map(|f| {
            let docs = yaml_documents(&f);
            assert!(!docs.is_empty(), "{}: no document", f.display());
            for d in &docs {
                for field in [&["apiVersion"][..], &["kind"], &["metadata", "name"]] {
                    assert!(
                        str_at(d, field).is_some(),
                        "{}: a document without {}",
                        f.display(),
                        field.join(".")
                    );
                }
            }
            (f, docs)
        })
        .collect()
}

#[test]
fn kubernetes_sidecar_deployment_is_wired_for_probes_secrets_and_a_read_only_root() {
    let all = kubernetes_documents();
    let (file, docs) = all
        .iter()
        .find(|(f, _)| f.ends_with("sidecar.yaml"))
        .expect("deploy/kubernetes/sidecar.yaml");
    let deployment = docs
        .iter()
        .find(|d| str_at(d, &["kind"]) == Some("Deployment"))
        .unwrap_or_else(|| panic!("{}: no Deployment", file.display()));
    let pod = at(deployment, &["spec", "template", "spec"]).expect("spec.template.spec");
    let labels = at(deployment, &["spec", "template", "metadata", "labels"]);
    let selector = at(deployment, &["spec", "selector", "matchLabels"])
        .and_then(Value::as_mapping)
        .expect("spec.selector.matchLabels");
    for (k, v) in selector {
        assert_eq!(
            labels.and_then(|l| l.get(k)),
            Some(v),
            "selector {k:?} does not match the pod labels"
        );
    }

    // The bridge: a native sidecar (init container, restartPolicy Always) or a plain container.
    let init = seq_at(pod, &["initContainers"]);
    let main = seq_at(pod, &["containers"]);
    assert!(
        !main.is_empty(),
        "the Deployment has no application container"
    );
    let runs_bridge = |c: &&Value| {
        str_at(c, &["image"]).is_some_and(|i| i.contains("smtp-oauth-bridge"))
            || seq_at(c, &["command"])
                .first()
                .and_then(Value::as_str)
                .is_some_and(|c| c.contains("smtp-oauth-bridge"))
    };
    let bridges: Vec<&Value> = init.iter().chain(main).filter(runs_bridge).collect();
    assert_eq!(
        bridges.len(),
        1,
        "exactly one container should run smtp-oauth-bridge"
    );
    let bridge = bridges[0];
    if init.iter().any(|c| std::ptr::eq(c, bridge)) {
        // An ordinary init container must exit before the app starts; serve never does.
        assert_eq!(
            str_at(bridge, &["restartPolicy"]),
            Some("Always"),
            "the bridge as an init container must be a sidecar (restartPolicy: Always)"
        );
    }
    let apps: Vec<&Value> = main.iter().filter(|c| !std::ptr::eq(*c, bridge)).collect();
    assert!(
        !apps.is_empty(),
        "no application container beside the bridge"
    );

    // The arguments the container runs are accepted by the real binary.
    let mut args: Vec<String> = seq_at(bridge, &["args"])
        .iter()
        .map(|a| a.as_str().expect("args are strings").to_string())
        .collect();
    if args.is_empty() {
        args.push("serve".into()); // the image's CMD
    }
    assert!(
        args.contains(&"serve".to_string()),
        "the bridge should run serve: {args:?}"
    );
    accepts_arguments(&args);

    let env = container_env(bridge);
    let smtp = parse_addr(
        "SMTP_OAUTH_BRIDGE_LISTEN__SMTP",
        env_value(&env, "SMTP_OAUTH_BRIDGE_LISTEN__SMTP"),
    );
    assert!(
        smtp.ip().is_loopback(),
        "the sidecar should listen on loopback, not {smtp}"
    );
    let admin = parse_addr(
        "SMTP_OAUTH_BRIDGE_LISTEN__ADMIN",
        env_value(&env, "SMTP_OAUTH_BRIDGE_LISTEN__ADMIN"),
    );
    assert!(
        !admin.ip().is_loopback(),
        "kubelet probes come from the node: the admin endpoint cannot be on {admin}"
    );

    // Probes on the admin port.
    let (ready_port, ready_path) = probe_port(bridge, "readinessProbe");
    assert_eq!((ready_port, ready_path.as_str()), (admin.port(), "/readyz"));
    let (live_port, live_path) = probe_port(bridge, "livenessProbe");
    assert_eq!((live_port, live_path.as_str()), (admin.port(), "/healthz"));
    if bridge.get("startupProbe").is_some() {
        let (port, path) = probe_port(bridge, "startupProbe");
        assert_eq!(port, admin.port(), "startupProbe port");
        assert!(
            path == "/healthz" || path == "/readyz",
            "startupProbe path {path}"
        );
    }

    // The application is pointed at the bridge's loopback listener.
    let app_values: Vec<String> = apps
        .iter()
        .flat_map(|c| container_env(c).into_values())
        .filter_map(|s| match s {
            EnvSource::Value(v) => Some(v),
            _ => None,
        })
        .collect();
    for needle in [smtp.ip().to_string(), smtp.port().to_string()] {
        assert!(
            app_values.iter().any(|v| v.contains(&needle)),
            "no application env value mentions {needle} (it should send to {smtp})"
        );
    }

    // Hardening.
    let sc = bridge
        .get("securityContext")
        .expect("bridge securityContext");
    let pod_sc = pod.get("securityContext");
    assert_eq!(sc.get("readOnlyRootFilesystem"), Some(&Value::Bool(true)));
    assert_eq!(
        sc.get("allowPrivilegeEscalation"),
        Some(&Value::Bool(false))
    );
    assert!(
        sc.get("runAsNonRoot") == Some(&Value::Bool(true))
            || pod_sc.and_then(|p| p.get("runAsNonRoot")) == Some(&Value::Bool(true)),
        "runAsNonRoot: true on the bridge or the pod"
    );
    if let Some(uid) = sc.get("runAsUser").and_then(Value::as_u64) {
        assert_ne!(uid, 0, "runAsUser 0");
    }
    assert!(
        seq_at(sc, &["capabilities", "drop"])
            .iter()
            .any(|c| c.as_str() == Some("ALL")),
        "capabilities.drop should contain ALL"
    );
    let limits = at(bridge, &["resources", "limits"])
        .and_then(Value::as_mapping)
        .expect("resources.limits");
    assert!(limits.contains_key("memory"), "resources.limits.memory");
    assert!(
        at(bridge, &["resources", "requests"]).is_some(),
        "resources.requests"
    );
    // SIGTERM, then listen.shutdown_grace_secs (30 s) for transactions in flight.
    let grace = at(pod, &["terminationGracePeriodSeconds"])
        .and_then(Value::as_u64)
        .unwrap_or(30);
    assert!(grace >= 45, "terminationGracePeriodSeconds {grace} < 45");

    // Volumes: state on a writable volume, the client secret from a Secret volume.
    let volumes = seq_at(pod, &["volumes"]);
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| str_at(v, &["name"]) == Some(name))
            .unwrap_or_else(|| panic!("no volume {name:?}"))
    };
    let mounts = seq_at(bridge, &["volumeMounts"]);
    let mount_for = |path: &str| {
        mounts
            .iter()
            .filter(|m| {
                let mp = str_at(m, &["mountPath"]).unwrap_or("");
                path == mp || path.starts_with(&format!("{}/", mp.trim_end_matches('/')))
            })
            .max_by_key(|m| str_at(m, &["mountPath"]).map(str::len))
            .unwrap_or_else(|| {
                panic!(
                    "{path} is on no volume mount of the bridge (the root filesystem is read-only)"
                )
            })
    };
    let state_dir = env_value(&env, "SMTP_OAUTH_BRIDGE_STATE__DIR");
    let state_mount = mount_for(state_dir);
    assert_eq!(str_at(state_mount, &["mountPath"]), Some(state_dir));
    assert_ne!(
        state_mount.get("readOnly"),
        Some(&Value::Bool(true)),
        "state mount is read-only"
    );
    let state_volume = volume(str_at(state_mount, &["name"]).unwrap());
    assert!(
        state_volume.get("emptyDir").is_some()
            || state_volume.get("persistentVolumeClaim").is_some(),
        "the state volume should be an emptyDir or a PVC: {state_volume:?}"
    );

    let secret_file = env_value(
        &env,
        "SMTP_OAUTH_BRIDGE_ACCOUNT__0__OAUTH__CLIENT_SECRET_FILE",
    );
    let secret_mount = mount_for(secret_file);
    let secret_volume = volume(str_at(secret_mount, &["name"]).unwrap());
    let secret_name = str_at(secret_volume, &["secret", "secretName"])
        .unwrap_or_else(|| panic!("{secret_file} should be on a Secret volume"));
    let file_in_volume = secret_file
        .strip_prefix(str_at(secret_mount, &["mountPath"]).unwrap())
        .unwrap()
        .trim_start_matches('/');
    let items = seq_at(secret_volume, &["secret", "items"]);
    let key = if items.is_empty() {
        file_in_volume.to_string()
    } else {
        items
            .iter()
            .find(|i| str_at(i, &["path"]) == Some(file_in_volume))
            .and_then(|i| str_at(i, &["key"]))
            .unwrap_or_else(|| panic!("no item of the Secret volume has path {file_in_volume}"))
            .to_string()
    };
    assert!(
        secret_keys(docs, secret_name).contains(&key),
        "Secret {secret_name} in {} has no key {key}",
        file.display()
    );

    // password_env names a variable of the bridge that comes from the Secret.
    let password_var = env_value(&env, "SMTP_OAUTH_BRIDGE_ACCOUNT__0__PASSWORD_ENV");
    assert!(
        !password_var.starts_with(PREFIX),
        "password_env {password_var} would be read as a configuration key"
    );
    assert!(
        matches!(env.get(password_var), Some(EnvSource::Secret(..))),
        "password_env names {password_var}, which the bridge should get from a Secret"
    );
    // Every Secret reference resolves to a Secret and key in the same file.
    for c in init.iter().chain(main) {
        for (var, src) in container_env(c) {
            if let EnvSource::Secret(name, key) = src {
                assert!(
                    secret_keys(docs, &name).contains(&key),
                    "env {var}: Secret {name} in {} has no key {key}",
                    file.display()
                );
            }
        }
    }

    // The image's environment with the container's on top (Secret values stand-ins) is a
    // valid configuration, with the container's global options.
    let mut full_env = image_env();
    for (var, src) in &env {
        let v = match src {
            EnvSource::Value(v) => v.clone(),
            EnvSource::Secret(..) => "secret-value".to_string(),
            EnvSource::Other => continue,
        };
        full_env.insert(var.clone(), v);
    }
    let global: Vec<String> = args.iter().take_while(|a| *a != "serve").cloned().collect();
    let dir = tempfile::tempdir().unwrap();
    let effective = effective_config(&global, &full_env, None, dir.path()).unwrap_or_else(|e| {
        panic!(
            "the bridge container's configuration ({}): {e}",
            file.display()
        )
    });
    assert_sidecar_listener(&effective, admin);
}

/// A sidecar's effective listener: loopback SMTP without TLS (AUTH allowed without it), the
/// admin endpoint where the probes go.
fn assert_sidecar_listener(effective: &toml::Table, admin: SocketAddr) {
    let listen = |k: &str| effective.get("listen").and_then(|l| l.get(k)).cloned();
    let smtp: SocketAddr = listen("smtp")
        .and_then(|v| v.as_str().map(String::from))
        .expect("listen.smtp")
        .parse()
        .unwrap();
    assert!(smtp.ip().is_loopback(), "effective listen.smtp {smtp}");
    assert_eq!(listen("tls"), Some(toml::Value::String("off".into())));
    assert_eq!(
        listen("require_tls_for_auth"),
        Some(toml::Value::Boolean(false))
    );
    assert_eq!(
        listen("admin"),
        Some(toml::Value::String(admin.to_string()))
    );
}

// ---- the Kubernetes API, for the fields the manifests use ---------------------------------

/// What a field of the Kubernetes API holds (the part of the schema our manifests use).
/// `kubernetes-validate` is no Debian package, so CI could never run it; this check always
/// runs: every field must be one the API has, at that place, with a value of its type.
#[derive(Clone, Debug)]
enum Ty {
    Str,
    Int,
    Bool,
    /// A resource quantity or a port: a number or a string.
    IntOrStr,
    /// Labels, annotations, Secret data: string to string.
    StrMap,
    Seq(Box<Ty>),
    Obj(Vec<(&'static str, Ty)>),
}

fn obj(fields: &[(&'static str, Ty)]) -> Ty {
    Ty::Obj(fields.to_vec())
}

fn seq(t: Ty) -> Ty {
    Ty::Seq(Box::new(t))
}

fn k8s_metadata() -> Ty {
    use Ty::*;
    obj(&[
        ("name", Str),
        ("namespace", Str),
        ("labels", StrMap),
        ("annotations", StrMap),
    ])
}

fn k8s_probe() -> Ty {
    use Ty::*;
    obj(&[
        (
            "httpGet",
            obj(&[("path", Str), ("port", IntOrStr), ("scheme", Str)]),
        ),
        ("tcpSocket", obj(&[("port", IntOrStr)])),
        ("exec", obj(&[("command", seq(Str))])),
        ("initialDelaySeconds", Int),
        ("periodSeconds", Int),
        ("timeoutSeconds", Int),
        ("failureThreshold", Int),
        ("successThreshold", Int),
    ])
}

fn k8s_container() -> Ty {
    use Ty::*;
    let key_ref = obj(&[("name", Str), ("key", Str), ("optional", Bool)]);
    let resources = obj(&[
        ("cpu", IntOrStr),
        ("memory", IntOrStr),
        ("ephemeral-storage", IntOrStr),
    ]);
    obj(&[
        ("name", Str),
        ("image", Str),
        ("imagePullPolicy", Str),
        ("restartPolicy", Str),
        ("command", seq(Str)),
        ("args", seq(Str)),
        (
            "env",
            seq(obj(&[
                ("name", Str),
                ("value", Str),
                (
                    "valueFrom",
                    obj(&[
                        ("secretKeyRef", key_ref.clone()),
                        ("configMapKeyRef", key_ref),
                        ("fieldRef", obj(&[("fieldPath", Str), ("apiVersion", Str)])),
                    ]),
                ),
            ])),
        ),
        (
            "ports",
            seq(obj(&[
                ("name", Str),
                ("containerPort", Int),
                ("protocol", Str),
            ])),
        ),
        ("startupProbe", k8s_probe()),
        ("readinessProbe", k8s_probe()),
        ("livenessProbe", k8s_probe()),
        (
            "resources",
            obj(&[("requests", resources.clone()), ("limits", resources)]),
        ),
        (
            "securityContext",
            obj(&[
                ("runAsNonRoot", Bool),
                ("runAsUser", Int),
                ("runAsGroup", Int),
                ("readOnlyRootFilesystem", Bool),
                ("allowPrivilegeEscalation", Bool),
                ("privileged", Bool),
                (
                    "capabilities",
                    obj(&[("drop", seq(Str)), ("add", seq(Str))]),
                ),
                ("seccompProfile", obj(&[("type", Str)])),
            ]),
        ),
        (
            "volumeMounts",
            seq(obj(&[
                ("name", Str),
                ("mountPath", Str),
                ("readOnly", Bool),
                ("subPath", Str),
            ])),
        ),
    ])
}

fn k8s_pod_spec() -> Ty {
    use Ty::*;
    let items = seq(obj(&[("key", Str), ("path", Str), ("mode", Int)]));
    obj(&[
        ("terminationGracePeriodSeconds", Int),
        ("automountServiceAccountToken", Bool),
        ("serviceAccountName", Str),
        (
            "securityContext",
            obj(&[
                ("runAsNonRoot", Bool),
                ("runAsUser", Int),
                ("runAsGroup", Int),
                ("fsGroup", Int),
                ("seccompProfile", obj(&[("type", Str)])),
            ]),
        ),
        ("initContainers", seq(k8s_container())),
        ("containers", seq(k8s_container())),
        (
            "volumes",
            seq(obj(&[
                ("name", Str),
                ("emptyDir", obj(&[("sizeLimit", IntOrStr), ("medium", Str)])),
                (
                    "secret",
                    obj(&[
                        ("secretName", Str),
                        ("items", items.clone()),
                        ("defaultMode", Int),
                        ("optional", Bool),
                    ]),
                ),
                (
                    "configMap",
                    obj(&[("name", Str), ("items", items), ("defaultMode", Int)]),
                ),
                (
                    "persistentVolumeClaim",
                    obj(&[("claimName", Str), ("readOnly", Bool)]),
                ),
            ])),
        ),
    ])
}

/// The schema of a document, by apiVersion and kind.
fn k8s_schema(api_version: &str, kind: &str) -> Option<Ty> {
    use Ty::*;
    let head = |rest: &[(&'static str, Ty)]| {
        let mut f = vec![
            ("apiVersion", Str),
            ("kind", Str),
            ("metadata", k8s_metadata()),
        ];
        f.extend_from_slice(rest);
        Ty::Obj(f)
    };
    match (api_version, kind) {
        ("v1", "Secret") => Some(head(&[
            ("type", Str),
            ("stringData", StrMap),
            ("data", StrMap),
            ("immutable", Bool),
        ])),
        ("apps/v1", "Deployment") => Some(head(&[(
            "spec",
            obj(&[
                ("replicas", Int),
                ("selector", obj(&[("matchLabels", StrMap)])),
                (
                    "template",
                    obj(&[("metadata", k8s_metadata()), ("spec", k8s_pod_spec())]),
                ),
            ]),
        )])),
        _ => None,
    }
}

/// Every problem of `v` against `ty`, as "path: what".
fn k8s_problems(v: &Value, ty: &Ty, path: &str, out: &mut Vec<String>) {
    let type_name = match ty {
        Ty::Str => "a string",
        Ty::Int => "an integer",
        Ty::Bool => "true or false",
        Ty::IntOrStr => "a number or a string",
        Ty::StrMap => "a map of strings",
        Ty::Seq(_) => "a list",
        Ty::Obj(_) => "a map",
    };
    let ok = match (ty, v) {
        (Ty::Str, Value::String(_)) | (Ty::Bool, Value::Bool(_)) => true,
        (Ty::Int, Value::Number(n)) => n.is_i64() || n.is_u64(),
        // `defaultMode: 0440`: Kubernetes reads YAML 1.1, where that is an octal number;
        // serde_yaml (YAML 1.2) keeps it a string.
        (Ty::Int, Value::String(s)) => {
            s.len() > 1 && s.starts_with('0') && s.bytes().all(|b| (b'0'..=b'7').contains(&b))
        }
        (Ty::IntOrStr, Value::Number(_) | Value::String(_)) => true,
        (Ty::StrMap, Value::Mapping(m)) => {
            for (k, v) in m {
                if !matches!((k, v), (Value::String(_), Value::String(_))) {
                    out.push(format!("{path}.{k:?}: must be a string (quote it): {v:?}"));
                }
            }
            true
        }
        (Ty::Seq(item), Value::Sequence(items)) => {
            for (i, v) in items.iter().enumerate() {
                k8s_problems(v, item, &format!("{path}[{i}]"), out);
            }
            true
        }
        (Ty::Obj(fields), Value::Mapping(m)) => {
            for (k, v) in m {
                let key = k.as_str().unwrap_or("?");
                match fields.iter().find(|(name, _)| *name == key) {
                    Some((_, t)) => k8s_problems(v, t, &format!("{path}.{key}"), out),
                    None => out.push(format!("{path}: unknown field {key:?}")),
                }
            }
            true
        }
        _ => false,
    };
    if !ok {
        out.push(format!("{path}: must be {type_name}, is {v:?}"));
    }
}

/// Problems of one document: schema, plus references inside a pod that the API server or
/// the kubelet would refuse (duplicate container names, mounts of undeclared volumes).
fn k8s_document_problems(doc: &Value) -> Vec<String> {
    let api = str_at(doc, &["apiVersion"]).unwrap_or("?");
    let kind = str_at(doc, &["kind"]).unwrap_or("?");
    let Some(schema) = k8s_schema(api, kind) else {
        return vec![format!(
            "{api} {kind}: no schema here; add the fields it uses to k8s_schema"
        )];
    };
    let mut out = Vec::new();
    k8s_problems(doc, &schema, kind, &mut out);
    if let Some(pod) = at(doc, &["spec", "template", "spec"]) {
        let containers: Vec<&Value> = seq_at(pod, &["initContainers"])
            .iter()
            .chain(seq_at(pod, &["containers"]))
            .collect();
        let volumes: Vec<&str> = seq_at(pod, &["volumes"])
            .iter()
            .filter_map(|v| str_at(v, &["name"]))
            .collect();
        let mut names = std::collections::BTreeSet::new();
        for c in &containers {
            let name = str_at(c, &["name"]).unwrap_or("");
            if name.is_empty() || !names.insert(name) {
                out.push(format!("container name {name:?} is missing or not unique"));
            }
            for m in seq_at(c, &["volumeMounts"]) {
                let v = str_at(m, &["name"]).unwrap_or("");
                if !volumes.contains(&v) {
                    out.push(format!("container {name}: mounts undeclared volume {v:?}"));
                }
            }
            for p in seq_at(c, &["ports"]) {
                let port = p.get("containerPort").and_then(Value::as_u64).unwrap_or(0);
                if !(1..=65535).contains(&port) {
                    out.push(format!("container {name}: containerPort {port}"));
                }
            }
        }
    }
    out
}

#[test]
fn kubernetes_manifests_use_only_api_fields_with_values_of_their_type() {
    for (file, docs) in kubernetes_documents() {
        for doc in &docs {
            let problems = k8s_document_problems(doc);
            assert!(
                problems.is_empty(),
                "{}:\n{}",
                file.display(),
                problems.join("\n")
            );
        }
    }
}

#[test]
fn the_kubernetes_check_finds_typos_wrong_types_and_dangling_mounts() {
    let doc: Value = serde_yaml::from_str(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: x, labels: {scrape: true}}
spec:
  template:
    spec:
      initContainers:
        - name: bridge
          restartpolicy: Always
          ports: [{containerPort: "9925"}]
          env: [{name: PORT, value: 2525}]
          volumeMounts: [{name: state, mountPath: /var/lib/x}]
      containers:
        - name: bridge
          readinessProbe: {httpGet: {path: /readyz, port: 9925}, periodSecond: 10}
"#,
    )
    .unwrap();
    let problems = k8s_document_problems(&doc).join("\n");
    for expected in [
        r#"Deployment.metadata.labels.String("scrape"): must be a string"#,
        r#"Deployment.spec.template.spec.initContainers[0]: unknown field "restartpolicy""#,
        "Deployment.spec.template.spec.initContainers[0].ports[0].containerPort: must be an integer",
        "Deployment.spec.template.spec.initContainers[0].env[0].value: must be a string",
        r#"Deployment.spec.template.spec.containers[0].readinessProbe: unknown field "periodSecond""#,
        r#"container name "bridge" is missing or not unique"#,
        r#"container bridge: mounts undeclared volume "state""#,
    ] {
        assert!(problems.contains(expected), "{expected}\nnot in:\n{problems}");
    }
    assert_eq!(problems.lines().count(), 8, "{problems}");
    assert_eq!(
        k8s_document_problems(&serde_yaml::from_str("{apiVersion: batch/v1, kind: Job}").unwrap()),
        ["batch/v1 Job: no schema here; add the fields it uses to k8s_schema"]
    );
}

// ---- docker compose -------------------------------------------------------------------------

/// A compose `environment:` as a map (it may be a map or a list of NAME=value).
fn compose_env(service: &Value) -> BTreeMap<String, String> {
    match service.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Mapping(m)) => m
            .iter()
            .map(|(k, v)| {
                let k = k.as_str().expect("environment name").to_string();
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => panic!("environment {k}: quote {other:?}"),
                };
                (k, v)
            })
            .collect(),
        Some(Value::Sequence(s)) => s
            .iter()
            .map(|e| {
                let e = e.as_str().expect("environment entry");
                let (k, v) = e.split_once('=').unwrap_or((e, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        Some(other) => panic!("environment: {other:?}"),
    }
}

fn compose_duration_secs(s: &str) -> u64 {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().unwrap_or_else(|_| panic!("duration {s:?}"));
    match unit {
        "s" | "" => n,
        "m" => n * 60,
        other => panic!("duration unit {other:?} in {s:?}"),
    }
}

#[test]
fn compose_runs_the_bridge_with_the_app_in_its_network_namespace() {
    let path = deploy_dir().join("docker-compose.yml");
    let docs = yaml_documents(&path);
    assert_eq!(docs.len(), 1, "one compose document");
    let compose = &docs[0];
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("services");
    let bridge = services.get("bridge").expect("a service named bridge");
    assert!(
        str_at(bridge, &["image"]).is_some_and(|i| i.contains("smtp-oauth-bridge"))
            || bridge.get("build").is_some(),
        "the bridge service needs an image or a build"
    );
    if let Some(build) = bridge.get("build") {
        let context = deploy_dir().join(str_at(build, &["context"]).unwrap_or("."));
        let dockerfile = context.join(str_at(build, &["dockerfile"]).unwrap_or("Dockerfile"));
        assert!(dockerfile.is_file(), "{} is missing", dockerfile.display());
        assert!(
            context.join("Cargo.lock").is_file(),
            "the build context should be the repository root"
        );
    }
    let apps: Vec<&str> = services
        .iter()
        .filter(|(_, s)| str_at(s, &["network_mode"]) == Some("service:bridge"))
        .map(|(k, _)| k.as_str().unwrap())
        .collect();
    assert!(
        !apps.is_empty(),
        "no service with network_mode: service:bridge"
    );

    let mut args: Vec<String> = seq_at(bridge, &["command"])
        .iter()
        .map(|a| a.as_str().expect("command entries are strings").to_string())
        .collect();
    if args.is_empty() {
        args.push("serve".into());
    }
    accepts_arguments(&args);

    let env = compose_env(bridge);
    let smtp = parse_addr("LISTEN__SMTP", &env["SMTP_OAUTH_BRIDGE_LISTEN__SMTP"]);
    assert!(
        smtp.ip().is_loopback(),
        "the app shares the bridge's namespace: listen on loopback, not {smtp}"
    );
    for app in &apps {
        let app_env = compose_env(&services[*app]);
        for needle in [smtp.ip().to_string(), smtp.port().to_string()] {
            assert!(
                app_env.values().any(|v| v.contains(&needle)),
                "service {app}: no environment value mentions {needle}"
            );
        }
    }

    assert_eq!(
        bridge.get("read_only"),
        Some(&Value::Bool(true)),
        "read_only: true"
    );
    let grace = compose_duration_secs(str_at(bridge, &["stop_grace_period"]).unwrap_or("10s"));
    assert!(grace >= 45, "stop_grace_period {grace}s < 45s");

    // State on a named volume declared at the top level.
    let state_dir = &env["SMTP_OAUTH_BRIDGE_STATE__DIR"];
    let volume = seq_at(bridge, &["volumes"])
        .iter()
        .filter_map(Value::as_str)
        .find_map(|v| {
            let mut parts = v.split(':');
            let (src, dst) = (parts.next()?, parts.next()?);
            (dst == state_dir).then(|| src.to_string())
        })
        .unwrap_or_else(|| panic!("no volume mounted at {state_dir}"));
    assert!(
        at(compose, &["volumes", &volume]).is_some(),
        "volume {volume} is not declared under volumes:"
    );

    // The client secret from a compose secret.
    let secret_file = &env["SMTP_OAUTH_BRIDGE_ACCOUNT__0__OAUTH__CLIENT_SECRET_FILE"];
    let secret = secret_file
        .strip_prefix("/run/secrets/")
        .unwrap_or_else(|| panic!("{secret_file} should be a compose secret under /run/secrets/"));
    assert!(
        seq_at(bridge, &["secrets"])
            .iter()
            .any(|s| s.as_str() == Some(secret)
                || str_at(s, &["source"]) == Some(secret)
                    && str_at(s, &["target"]).is_none_or(|t| t == secret)),
        "the bridge does not mount secret {secret}"
    );
    assert!(
        at(compose, &["secrets", secret]).is_some(),
        "secret {secret} is not declared under secrets:"
    );

    let password_var = &env["SMTP_OAUTH_BRIDGE_ACCOUNT__0__PASSWORD_ENV"];
    assert!(!password_var.starts_with(PREFIX));
    assert!(
        env.contains_key(password_var.as_str()),
        "password_env names {password_var}, which the bridge does not get"
    );

    // The image's environment with the service's on top (interpolated values stand-ins) is a
    // valid configuration, with the service's global options.
    let mut full_env = image_env();
    for (k, v) in &env {
        let v = if v.starts_with("${") {
            "secret-value"
        } else {
            v
        };
        full_env.insert(k.clone(), v.to_string());
    }
    let global: Vec<String> = args.iter().take_while(|a| *a != "serve").cloned().collect();
    let dir = tempfile::tempdir().unwrap();
    let effective = effective_config(&global, &full_env, None, dir.path())
        .unwrap_or_else(|e| panic!("the bridge service's configuration: {e}"));
    let admin = parse_addr(
        "LISTEN__ADMIN",
        &full_env["SMTP_OAUTH_BRIDGE_LISTEN__ADMIN"],
    );
    assert_sidecar_listener(&effective, admin);
}

// ---- Dockerfile -----------------------------------------------------------------------------

/// Dockerfile instructions (continuations joined, comments dropped), as (INSTRUCTION, rest).
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(stripped) = t.strip_suffix('\\') {
            current.push_str(stripped);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let full = std::mem::take(&mut current);
        let full = full.trim();
        if full.is_empty() {
            continue;
        }
        let (ins, rest) = full.split_once(char::is_whitespace).unwrap_or((full, ""));
        out.push((
            ins.to_ascii_uppercase(),
            rest.split_whitespace().collect::<Vec<_>>().join(" "),
        ));
    }
    out
}

/// `ENV A=1 B=2` or `ENV A 1`.
fn dockerfile_env(rest: &str) -> Vec<(String, String)> {
    if rest
        .split_whitespace()
        .next()
        .is_some_and(|w| w.contains('='))
    {
        rest.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect()
    } else {
        let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
        vec![(k.to_string(), v.trim_matches('"').to_string())]
    }
}

/// (image, alias, instructions) per stage of deploy/Dockerfile.
type Stage = (String, Option<String>, Vec<(String, String)>);

fn dockerfile_stages() -> Vec<Stage> {
    let instructions = dockerfile_instructions(&read(&deploy_dir().join("Dockerfile")));
    let mut stages: Vec<Stage> = Vec::new();
    for (ins, rest) in instructions {
        if ins == "FROM" {
            let words: Vec<&str> = rest
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let alias = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            stages.push((words[0].to_string(), alias, Vec::new()));
        } else if let Some(stage) = stages.last_mut() {
            stage.2.push((ins, rest));
        }
    }
    stages
}

/// The environment the runtime image sets (ENV of the last stage).
fn image_env() -> BTreeMap<String, String> {
    let stages = dockerfile_stages();
    let (_, _, runtime) = stages.last().expect("a stage");
    runtime
        .iter()
        .filter(|(i, _)| i == "ENV")
        .flat_map(|(_, r)| dockerfile_env(r))
        .collect()
}

#[test]
fn dockerfile_builds_with_cargo_locked_and_runs_as_non_root() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "a multi-stage build: {stages:?}");
    let (_, _, runtime) = stages.last().unwrap();
    let runtime_image = &stages.last().unwrap().0;

    // The build stage runs what CI runs.
    let builder = stages[..stages.len() - 1]
        .iter()
        .find(|(_, _, ins)| {
            ins.iter()
                .any(|(i, r)| i == "RUN" && r.contains("cargo build --release --locked"))
        })
        .expect("a stage that runs `cargo build --release --locked`");
    assert!(
        builder.0.starts_with("rust:"),
        "build on the official rust image, not {}",
        builder.0
    );
    let builder_name = builder
        .1
        .clone()
        .expect("the build stage needs a name (AS builder)");
    let workdir = builder
        .2
        .iter()
        .filter(|(i, _)| i == "WORKDIR")
        .map(|(_, r)| r.clone())
        .next_back()
        .unwrap_or_else(|| "/".into());
    assert!(
        builder.2.iter().any(|(i, r)| i == "COPY"
            && (r.split_whitespace().next() == Some(".") || r.contains("Cargo.lock"))),
        "the build stage must copy Cargo.lock (for --locked) and the sources"
    );

    // Runs as a non-root user.
    let user = runtime
        .iter()
        .filter(|(i, _)| i == "USER")
        .map(|(_, r)| r.as_str())
        .next_back();
    match user {
        Some(u) => {
            let name = u.split(':').next().unwrap();
            assert!(name != "root" && name != "0", "USER {u}");
        }
        None => assert!(
            runtime_image.contains("nonroot"),
            "no USER and {runtime_image} is not a nonroot image"
        ),
    }

    let all = |name: &str| -> Vec<&str> {
        runtime
            .iter()
            .filter(|(i, _)| i == name)
            .map(|(_, r)| r.as_str())
            .collect()
    };
    let exposed: Vec<&str> = all("EXPOSE")
        .iter()
        .flat_map(|r| r.split_whitespace())
        .collect();
    assert!(
        exposed.iter().any(|p| p.trim_end_matches("/tcp") == "2525"),
        "EXPOSE 2525: {exposed:?}"
    );

    let entrypoint: Vec<String> =
        serde_json::from_str(all("ENTRYPOINT").last().expect("ENTRYPOINT"))
            .expect("ENTRYPOINT in exec (JSON) form, so that signals reach the binary");
    let binary = entrypoint.first().expect("ENTRYPOINT binary");
    assert!(
        binary.ends_with("/smtp-oauth-bridge"),
        "ENTRYPOINT {entrypoint:?}"
    );
    let cmd: Vec<String> =
        serde_json::from_str(all("CMD").last().expect("CMD")).expect("CMD in JSON form");
    assert_eq!(cmd, ["serve"]);

    // The binary copied into the runtime image is the one cargo built, at ENTRYPOINT's path.
    let copied = all("COPY")
        .into_iter()
        .find(|r| r.contains(&format!("--from={builder_name}")) && r.contains("smtp-oauth-bridge"))
        .expect("COPY --from=<build stage> of the binary");
    let paths: Vec<&str> = copied
        .split_whitespace()
        .filter(|w| !w.starts_with("--"))
        .collect();
    let (src, dst) = (paths[0], paths[paths.len() - 1]);
    let src = if src.starts_with('/') {
        src.to_string()
    } else {
        format!("{}/{src}", workdir.trim_end_matches('/'))
    };
    assert!(
        src.ends_with("/target/release/smtp-oauth-bridge"),
        "copies {src}"
    );
    assert_eq!(
        dst.trim_end_matches('/'),
        binary.as_str(),
        "the binary is copied to {dst} but ENTRYPOINT runs {binary}"
    );

    // State on the volume; the image's listener settings do not make a config error.
    let env: BTreeMap<String, String> = all("ENV").into_iter().flat_map(dockerfile_env).collect();
    let state_dir = env
        .get("SMTP_OAUTH_BRIDGE_STATE__DIR")
        .expect("ENV SMTP_OAUTH_BRIDGE_STATE__DIR");
    assert_eq!(state_dir, STATE_DIR);
    let volumes = all("VOLUME").join(" ");
    assert!(
        volumes.contains(&format!("\"{state_dir}\""))
            || volumes.split_whitespace().any(|v| v == state_dir),
        "VOLUME {state_dir}: {volumes}"
    );
    if let Some(smtp) = env.get("SMTP_OAUTH_BRIDGE_LISTEN__SMTP") {
        let addr = parse_addr("image LISTEN__SMTP", smtp);
        let tls = env
            .get("SMTP_OAUTH_BRIDGE_LISTEN__TLS")
            .map(String::as_str)
            .unwrap_or("off");
        let require = env
            .get("SMTP_OAUTH_BRIDGE_LISTEN__REQUIRE_TLS_FOR_AUTH")
            .map(String::as_str);
        assert!(
            addr.ip().is_loopback() || tls == "starttls" || require == Some("false"),
            "{addr} requires TLS for AUTH by default, so the image must offer STARTTLS (or say require_tls_for_auth=false)"
        );
    }
    for (k, v) in &env {
        for path_key in ["TLS_CERT", "TLS_KEY"] {
            if k.ends_with(path_key) {
                assert!(
                    v.starts_with(state_dir),
                    "{k}={v}: the root filesystem is read-only, put it in {state_dir}"
                );
            }
        }
    }

    // A BuildKit ignore file beside the Dockerfile keeps target/ out of the context.
    let ignore = deploy_dir().join("Dockerfile.dockerignore");
    if ignore.is_file() {
        let text = read(&ignore);
        assert!(
            text.lines()
                .any(|l| l.trim().trim_start_matches('/') == "target"),
            "{} should exclude target",
            ignore.display()
        );
    }
}

// ---- systemd ------------------------------------------------------------------------------

/// [Section] -> [(Key, value)] of a unit file, in order.
fn unit_sections(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        if t.starts_with('[') && t.ends_with(']') {
            section = t[1..t.len() - 1].to_string();
            continue;
        }
        let (k, v) = t
            .split_once('=')
            .unwrap_or_else(|| panic!("unit line {t:?}"));
        out.entry(section.clone())
            .or_default()
            .push((k.trim().to_string(), v.trim().to_string()));
    }
    out
}

fn unit_values<'a>(
    unit: &'a BTreeMap<String, Vec<(String, String)>>,
    section: &str,
    key: &str,
) -> Vec<&'a str> {
    unit.get(section)
        .into_iter()
        .flatten()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn unit_path() -> PathBuf {
    deploy_dir().join("systemd/smtp-oauth-bridge.service")
}

#[test]
fn systemd_unit_keeps_its_sandbox_and_state_directory() {
    let unit = unit_sections(&read(&unit_path()));
    let one = |section: &str, key: &str| -> &str {
        let v = unit_values(&unit, section, key);
        assert_eq!(v.len(), 1, "[{section}] {key}= should appear once: {v:?}");
        v[0]
    };
    for (key, want) in [
        ("Type", "simple"),
        ("DynamicUser", "yes"),
        ("StateDirectory", "smtp-oauth-bridge"),
        ("ConfigurationDirectory", "smtp-oauth-bridge"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("CapabilityBoundingSet", ""),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictNamespaces", "yes"),
        ("SystemCallArchitectures", "native"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(one("Service", key), want, "[Service] {key}=");
    }
    assert!(
        unit_values(&unit, "Service", "SystemCallFilter").contains(&"@system-service"),
        "SystemCallFilter=@system-service"
    );
    let stop: u64 = one("Service", "TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop >= 45,
        "TimeoutStopSec={stop}: the shutdown grace is 30 s"
    );
    assert_eq!(one("Install", "WantedBy"), "multi-user.target");

    let env = unit_values(&unit, "Service", "Environment");
    assert!(
        env.contains(&"SMTP_OAUTH_BRIDGE_STATE__DIR=%S/smtp-oauth-bridge"),
        "state.dir should be the StateDirectory: {env:?}"
    );
    let exec = one("Service", "ExecStart");
    assert!(
        exec.starts_with("/usr/local/bin/smtp-oauth-bridge ")
            && exec.contains("--config /etc/smtp-oauth-bridge/bridge.toml")
            && exec.ends_with(" serve"),
        "ExecStart={exec}"
    );
    // The real binary accepts these arguments in this order.
    let args: Vec<String> = exec.split_whitespace().skip(1).map(String::from).collect();
    accepts_arguments(&args);
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    // Under CI (which installs systemd) a missing systemd-analyze fails instead.
    if crate::harness::tool("systemd-analyze").is_none() {
        return;
    }
    // verify checks that ExecStart's binary exists: run it against the binary under test.
    let text = read(&unit_path());
    let bin = bin();
    let quoted = if bin.contains(char::is_whitespace) {
        format!("\"{bin}\"")
    } else {
        bin.to_string()
    };
    let rewritten: String = text
        .lines()
        .map(
            |l| match l.strip_prefix("ExecStart=/usr/local/bin/smtp-oauth-bridge") {
                Some(rest) => format!("ExecStart={quoted}{rest}\n"),
                None => format!("{l}\n"),
            },
        )
        .collect();
    assert_ne!(
        rewritten, text,
        "ExecStart=/usr/local/bin/smtp-oauth-bridge not found"
    );
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("smtp-oauth-bridge.service");
    std::fs::write(&unit, rewritten).unwrap();

    let run = |args: &[&str]| {
        let out = Command::new("systemd-analyze")
            .args(args)
            .arg(&unit)
            .env("SYSTEMD_LOG_LEVEL", "info")
            .env("SYSTEMD_LOG_COLOR", "0")
            .env("SYSTEMD_PAGER", "")
            .output()
            .expect("run systemd-analyze");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, output) = run(&["verify"]);
    assert!(ok, "systemd-analyze verify failed:\n{output}");
    // verify exits 0 on unknown keys and unparsable values ("..., ignoring"): any line about
    // this unit is a finding.
    let findings: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("smtp-oauth-bridge.service"))
        .collect();
    assert!(
        findings.is_empty(),
        "systemd-analyze verify:\n{}",
        findings.join("\n")
    );

    // The sandbox's overall exposure (0 = locked down, 10 = none), offline (systemd >= 250).
    let help = Command::new("systemd-analyze")
        .arg("--help")
        .output()
        .expect("systemd-analyze --help");
    if String::from_utf8_lossy(&help.stdout).contains("--offline") {
        let (ok, output) = run(&["security", "--offline=true", "--threshold=20", "--no-pager"]);
        assert!(
            ok,
            "systemd-analyze security: exposure above 2.0:\n{output}"
        );
    } else {
        println!("SKIPPED: systemd-analyze security --offline needs systemd 250 or later");
    }
}

#[test]
fn systemd_unit_and_example_config_make_a_valid_configuration() {
    let dir = tempfile::tempdir().unwrap();
    // The example with its placeholders filled: a well-formed PHC string (only its syntax is
    // checked at load time) and a client secret file that exists.
    let example = read(&deploy_dir().join("systemd/bridge.toml.example"));
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "s3cret").unwrap();
    let mut replaced = 0;
    let text: String = example
        .lines()
        .map(|l| {
            let line = if l.starts_with("password_hash = ") {
                "password_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG\"".to_string()
            } else if l.starts_with("client_secret_file = ") {
                format!("client_secret_file = {:?}", secret.display().to_string())
            } else {
                return format!("{l}\n");
            };
            replaced += 1;
            line + "\n"
        })
        .collect();
    assert_eq!(
        replaced, 2,
        "the example's password_hash and client_secret_file lines moved"
    );
    let config = dir.path().join("bridge.toml");
    std::fs::write(&config, text).unwrap();

    // The file alone, as `check` and `login` run by hand as root see it.
    if let Err(e) = effective_config(&[], &BTreeMap::new(), Some(&config), dir.path()) {
        panic!("deploy/systemd/bridge.toml.example: {e}");
    }

    // With the unit's Environment= lines, specifiers resolved as systemd would
    // (%S = /var/lib, %d = the credentials directory, holding one file per LoadCredential= ID).
    let unit = unit_sections(&read(&unit_path()));
    let state_root = dir.path().join("var-lib");
    let credentials = dir.path().join("credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    for id in unit_values(&unit, "Service", "LoadCredential")
        .iter()
        .map(|v| v.split_once(':').expect("LoadCredential=ID:PATH").0)
    {
        std::fs::write(credentials.join(id), "s3cret").unwrap();
    }
    let mut env = BTreeMap::new();
    for assignment in unit_values(&unit, "Service", "Environment") {
        let (k, v) = assignment.split_once('=').expect("Environment=NAME=value");
        let v = v
            .replace("%S", &state_root.display().to_string())
            .replace("%d", &credentials.display().to_string());
        if let Some(id) = v.strip_prefix(&format!("{}/", credentials.display())) {
            assert!(
                credentials.join(id).is_file(),
                "Environment={assignment}: no LoadCredential={id}:..."
            );
        }
        assert!(
            !v.contains('%'),
            "Environment={assignment}: unresolved specifier"
        );
        env.insert(k.to_string(), v);
    }
    let effective = effective_config(&[], &env, Some(&config), dir.path())
        .unwrap_or_else(|e| panic!("bridge.toml.example with the unit's environment {env:?}: {e}"));
    // state.dir is the StateDirectory, whatever the file says.
    let state_dir = effective
        .get("state")
        .and_then(|s| s.get("dir"))
        .and_then(toml::Value::as_str)
        .expect("state.dir");
    assert_eq!(Path::new(state_dir), state_root.join("smtp-oauth-bridge"));
}

#[test]
fn image_environment_alone_is_a_valid_listener_configuration() {
    // The image's defaults plus the least an account needs: 0.0.0.0 with STARTTLS (and its
    // certificate paths in the state volume) must not be a configuration error.
    let mut env = image_env();
    for (k, v) in [
        ("SMTP_OAUTH_BRIDGE_ACCOUNT__0__USERNAME", "scanner"),
        (
            "SMTP_OAUTH_BRIDGE_ACCOUNT__0__PASSWORD_ENV",
            "BRIDGE_SCANNER_PASSWORD",
        ),
        ("BRIDGE_SCANNER_PASSWORD", "pw"),
        (
            "SMTP_OAUTH_BRIDGE_ACCOUNT__0__MAILBOX",
            "scanner@contoso.com",
        ),
        (
            "SMTP_OAUTH_BRIDGE_ACCOUNT__0__OAUTH__TENANT",
            "contoso.onmicrosoft.com",
        ),
        (
            "SMTP_OAUTH_BRIDGE_ACCOUNT__0__OAUTH__FLOW",
            "client_credentials",
        ),
        (
            "SMTP_OAUTH_BRIDGE_ACCOUNT__0__OAUTH__CLIENT_ID",
            "00000000-0000-0000-0000-000000000000",
        ),
        (
            "SMTP_OAUTH_BRIDGE_ACCOUNT__0__OAUTH__CLIENT_SECRET_FILE",
            "/run/secrets/client-secret",
        ),
    ] {
        env.insert(k.into(), v.into());
    }
    let dir = tempfile::tempdir().unwrap();
    let effective = effective_config(&[], &env, None, dir.path())
        .unwrap_or_else(|e| panic!("the image's environment {env:?}: {e}"));
    let listen = effective.get("listen").expect("[listen]");
    assert_eq!(
        listen.get("tls").and_then(toml::Value::as_str),
        Some("starttls")
    );
    assert_eq!(
        listen.get("require_tls_for_auth"),
        Some(&toml::Value::Boolean(true)),
        "a non-loopback listener must require STARTTLS before AUTH"
    );
}

// ---- the configuration the deployment files produce is valid ------------------------------------

/// `smtp-oauth-bridge [--config FILE] ARGS serve --print-config` with exactly `env`, adapted to
/// run here (paths under the state directory, and secret files that do not exist here, moved
/// into `dir`): the effective configuration (file + environment + defaults) as the bridge
/// prints it, or why it is invalid. Nothing is bound or connected.
fn effective_config(
    args: &[String],
    env: &BTreeMap<String, String>,
    config: Option<&Path>,
    dir: &Path,
) -> Result<toml::Table, String> {
    let state = dir.join("state");
    let secret = dir.join("secret-file");
    std::fs::write(&secret, "s3cret").unwrap();
    let env: BTreeMap<String, String> = env
        .iter()
        .map(|(k, v)| {
            let v = if k.ends_with("__CLIENT_SECRET_FILE") && !Path::new(v).is_file() {
                secret.display().to_string()
            } else if let Some(rest) = v.strip_prefix(STATE_DIR) {
                format!("{}{rest}", state.display())
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect();
    let mut cmd = Command::new(bin());
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(args)
        .args(["serve", "--print-config"])
        .env_clear()
        .envs(&env)
        .current_dir(dir);
    let out = run_bounded(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{:?}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    toml::from_str(&stdout).map_err(|e| format!("--print-config output: {e}\n{stdout}"))
}

/// Runs `cmd` to completion, killing it (and failing) after 30 s.
fn run_bounded(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run smtp-oauth-bridge");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("{cmd:?} was still running after 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

// ---- the binary accepts the deployment's arguments ----------------------------------------------

/// The binary parses `args` (global options, then the command, values included): run with a
/// configuration file that does not exist and an otherwise empty environment, it gets as far
/// as reading the configuration and fails there, naming the file, instead of failing on usage.
fn accepts_arguments(args: &[String]) {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml").display().to_string();
    let mut args = args.to_vec();
    if let Some(i) = args.iter().position(|a| a == "--config") {
        args[i + 1].clone_from(&missing);
    }
    // No SMTP_OAUTH_BRIDGE_* configuration from this process's environment, no RUST_LOG.
    let out = run_bounded(
        Command::new(bin())
            .args(&args)
            .env_clear()
            .env("SMTP_OAUTH_BRIDGE_CONFIG", &missing)
            .current_dir(dir.path()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2) && stderr.contains(&missing),
        "smtp-oauth-bridge {}: expected the missing configuration to be the only problem, got {:?}:\n{stderr}",
        args.join(" "),
        out.status
    );
}
