//! The `demo` cargo feature: a `--no-default-features` build holds no testkit (and so no
//! `sha2` of its own), has no `demo` command, and still serves and relays. Runs cargo
//! itself (offline, locked): `cargo tree` for the dependency graph, and a debug build of
//! the binary into its own target dir under `CARGO_TARGET_TMPDIR` (the test's only slow
//! part: the first run compiles the dependencies once more).

use crate::harness::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");

/// `cargo <args>` on this workspace, offline and locked; stdout, or a panic with stderr.
fn cargo(args: &[&str]) -> String {
    cargo_with(args, &[])
}

fn cargo_with(args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO"))
        .args(args)
        .envs(envs.iter().copied())
        .args(["--offline", "--locked", "--manifest-path", MANIFEST])
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 cargo output")
}

/// `cargo tree` of the bridge's normal (non-dev, non-build) dependencies.
fn tree(features: &[&str], extra: &[&str]) -> String {
    let mut args = vec!["tree", "-e", "normal", "-p", "smtp-oauth-bridge"];
    args.extend_from_slice(features);
    args.extend_from_slice(extra);
    cargo(&args)
}

/// Package names in `cargo tree --prefix none` output.
fn names(tree: &str) -> Vec<&str> {
    tree.lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

#[test]
fn no_default_features_tree_has_no_testkit_and_no_sha2_of_its_own() {
    let no_demo = ["--no-default-features"];
    let all = tree(&no_demo, &["--prefix", "none"]);
    let all = names(&all);
    assert!(
        all.contains(&"smtp-oauth-bridge") && all.contains(&"tokio"),
        "{all:?}"
    );
    assert!(!all.contains(&"testkit"), "testkit in the tree: {all:?}");

    // sha2 is no dependency of the bridge itself; it is only there because oauth2 needs it
    // for PKCE (that crate's own use, not testkit's).
    let direct = tree(&no_demo, &["--prefix", "none", "--depth", "1"]);
    let direct = names(&direct);
    assert!(direct.contains(&"oauth2"), "{direct:?}");
    assert!(
        !direct.contains(&"sha2"),
        "sha2 is a direct dependency: {direct:?}"
    );
    let users = tree(&no_demo, &["--prefix", "depth", "-i", "sha2"]);
    let users: Vec<&str> = users
        .lines()
        .filter_map(|l| l.strip_prefix('1'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(users, ["oauth2"], "what pulls sha2 in without demo");

    // The same check sees testkit (and its sha2) in a default build, so it can fail.
    let default = tree(&[], &["--prefix", "none", "--depth", "1"]);
    assert!(names(&default).contains(&"testkit"), "{default}");
    let users = tree(&[], &["--prefix", "depth", "-i", "sha2"]);
    assert!(users.lines().any(|l| l.starts_with("1testkit ")), "{users}");
}

/// Builds the binary without default features (debug profile) into its own target dir.
fn build_without_demo() -> PathBuf {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("no-default-features");
    let target_str = target.to_str().expect("utf-8 target dir");
    let started = std::time::Instant::now();
    // Without debug info and incremental state the build takes about a third less time.
    let lean = [("CARGO_PROFILE_DEV_DEBUG", "0"), ("CARGO_INCREMENTAL", "0")];
    cargo_with(
        &[
            "build",
            "--no-default-features",
            "-p",
            "smtp-oauth-bridge",
            "--bin",
            "smtp-oauth-bridge",
            "--target-dir",
            target_str,
        ],
        &lean,
    );
    println!(
        "built the binary without default features in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    target
        .join("debug")
        .join(format!("smtp-oauth-bridge{}", std::env::consts::EXE_SUFFIX))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_default_features_binary_serves_relays_and_has_no_demo() {
    let bin = tokio::task::spawn_blocking(build_without_demo)
        .await
        .expect("build task");

    // No `demo` command: clap's usage error (exit 2) naming it; the default build has it.
    let out = Command::new(&bin).arg("demo").output().expect("run binary");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unrecognized subcommand 'demo'"), "{err}");
    let help = |bin: &Path| {
        let out = Command::new(bin).arg("--help").output().expect("help");
        assert!(out.status.success());
        String::from_utf8(out.stdout).expect("utf-8 help")
    };
    let commands = |help: &str| -> Vec<String> {
        help.lines()
            .filter_map(|l| l.strip_prefix("  "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    };
    let without = commands(&help(&bin));
    assert!(without.iter().any(|c| c == "serve"), "{without:?}");
    assert!(!without.iter().any(|c| c == "demo"), "{without:?}");
    let with = commands(&help(Path::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))));
    assert!(with.iter().any(|c| c == "demo"), "{with:?}");

    // It serves: client_credentials token from the fake endpoint, one message relayed
    // byte-identical to the fake upstream, and a clean exit on SIGTERM.
    let env = remote_ends(&Opts::default()).await;
    let args = [
        "--config",
        env.config_path.to_str().expect("utf-8 path"),
        "--log-format",
        "json",
        "serve",
    ];
    let envs = [("RUST_LOG".to_string(), "info".to_string())];
    let bridge = BridgeProcess::spawn_bin(&bin, &args, &envs, None);
    let content: &[u8] = b"From: Scanner <scanner@contoso.com>\r\nTo: <a@fabrikam.com>\r\n\
        Subject: built without demo\r\n\r\n.leading dot\r\nbody \xc3\xa9\r\n";
    let mut c = TcpSmtp::connect(bridge.addr).await;
    c.login().await;
    let (code, text) = c.send_message(MAILBOX, &["a@fabrikam.com"], content).await;
    assert_eq!(code, 250, "{text}");
    let got = env.upstream.wait_received(1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, content);
    assert_eq!(got[0].mail_from, MAILBOX);
    assert_eq!(got[0].rcpts, ["a@fabrikam.com"]);
    assert_eq!(got[0].auth_user, MAILBOX);
    assert_eq!(env.tokens.requests_by_grant("client_credentials"), 1);
    assert!(env.tokens.is_valid(&got[0].auth_token));
    let (status, log) = bridge.stop();
    assert!(status.success(), "{status:?}\n{log}");
}
