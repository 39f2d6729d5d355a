//! `test`: the whole test suite, with the servers it needs.
//!
//! 1. Finds out which servers the tests can reach: PostgreSQL at
//!    `CHASSIS_TEST_POSTGRES_URL` (by default `127.0.0.1:5432`) and NATS
//!    with JetStream at `CHASSIS_TEST_NATS_URL` (by default
//!    `nats://127.0.0.1:4222`).
//! 2. Runs `cargo test --workspace --all-features --locked`: every test,
//!    the exemplars on their embedded default (SQLite), the chassis'
//!    messaging tests (`--all-features` turns on `nats`) and the demo's
//!    `tests/messaging.rs` (the exemplars' events through JetStream) on
//!    NATS; the demo's proofs on both servers run here, once: replicas on
//!    PostgreSQL killed at random (`tests/replicas.rs`) and nothing lost
//!    under chaos through JetStream (`tests/chaos_nats.rs`, about 40 s:
//!    publishers and consumers killed, the broker connection cut).
//! 3. Runs the exemplars' tests again on PostgreSQL
//!    (`CHASSIS_TEST_BACKEND=postgres`): the same tests, each service in
//!    each test on a database of its own, and the demo's events through
//!    JetStream with every service on PostgreSQL.
//!
//! Two tools are installed when missing, so that this one command runs
//! every test on a fresh machine:
//!
//! - Chromium (`CHASSIS_CHROMIUM`, or on `PATH`), which renders the docs
//!   pages in their browser tests: Debian's `chromium` package, with
//!   `apt-get`, when the run is root's; otherwise, like a server, a
//!   missing one is said plainly.
//! - schemathesis, for the exemplars' property-based API tests
//!   (`tests/schemathesis.rs`): `.ci/schemathesis --install` puts a pinned
//!   version in a virtualenv under the target directory, and
//!   `CHASSIS_SCHEMATHESIS` names its `st` for the tests (a value already
//!   set is used as it is). They run in both passes below, SQLite and
//!   PostgreSQL.
//!
//! A server that cannot be reached is said plainly, with the tests it
//! keeps from running, and those tests are not run; when
//! `CHASSIS_REQUIRE_SERVERS` is set (CI sets it), the run fails at once
//! instead, so nothing is skipped there.

use std::{
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    process::{Command, ExitCode},
    time::Duration,
};

/// The exemplars whose tests run on both engines.
const STATEFUL: [&str; 4] = ["auth", "ticketing", "orders", "mail"];

/// A server the tests use.
struct Server {
    name: &'static str,
    address: String,
    /// What does not run without it.
    needed_by: &'static str,
}

impl Server {
    /// Why it cannot be reached, if it cannot.
    fn unreachable(&self) -> Option<String> {
        let addrs: Vec<SocketAddr> = match self.address.to_socket_addrs() {
            Ok(addrs) => addrs.collect(),
            Err(e) => return Some(format!("{} does not resolve: {e}", self.address)),
        };
        let mut last = String::from("no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                Ok(_) => return None,
                Err(e) => last = e.to_string(),
            }
        }
        Some(last)
    }
}

/// The browser the docs pages' tests run (as `chassis::testing::Browser`
/// finds it): `CHASSIS_CHROMIUM`, or `chromium`, `chromium-browser` or
/// `google-chrome` on `PATH`.
fn chromium() -> Option<String> {
    if let Some(path) = std::env::var_os("CHASSIS_CHROMIUM") {
        let path = std::path::PathBuf::from(path);
        return path.is_file().then(|| path.display().to_string());
    }
    let dirs = std::env::var_os("PATH")?;
    std::env::split_paths(&dirs)
        .flat_map(|dir| ["chromium", "chromium-browser", "google-chrome"].map(|n| dir.join(n)))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

/// `host:port` of the first server of a `nats://` URL (4222 when it names
/// no port).
/// Installs Debian's `chromium` package when the run is root's and
/// `apt-get` is there; says why not otherwise.
fn install_chromium() -> Result<(), String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !root {
        return Err("installing it needs root".to_owned());
    }
    println!("Chromium: installing Debian's chromium package");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let install = [
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "chromium",
    ];
    // The package lists of a new machine may be stale: refreshed once.
    if apt(&install) || (apt(&["update", "-qq"]) && apt(&install)) {
        Ok(())
    } else {
        Err("`apt-get install chromium` failed".to_owned())
    }
}

/// schemathesis' `st`: `CHASSIS_SCHEMATHESIS`, or the one
/// `.ci/schemathesis --install` installs (pinned, under the target
/// directory).
fn schemathesis() -> Result<String, String> {
    if let Ok(st) = std::env::var("CHASSIS_SCHEMATHESIS") {
        return Ok(st);
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace root")?
        .to_owned();
    println!("schemathesis: installing the pinned version (.ci/schemathesis --install)");
    let out = Command::new(root.join(".ci/schemathesis"))
        .arg("--install")
        .current_dir(&root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run .ci/schemathesis: {e}"))?;
    let st = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() && !st.is_empty() {
        Ok(st)
    } else {
        Err("`.ci/schemathesis --install` failed (it needs python3 with venv and PyPI)".to_owned())
    }
}

fn nats_address(url: &str) -> String {
    let first = url.split(',').next().unwrap_or_default().trim();
    let rest = first.split_once("://").map_or(first, |(_, rest)| rest);
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let host = host.split('/').next().unwrap_or_default();
    if host.contains(':') && !host.ends_with(']') {
        host.to_owned()
    } else {
        format!("{host}:4222")
    }
}

/// `host:port` of a `postgres://` URL (5432 when it names no port).
fn postgres_address(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.contains(':') && !host.ends_with(']') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    }
}

fn cargo(args: &[&str], env: &[(&str, &str)]) -> bool {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    println!("\n==> cargo {}{}", env_text(env), args.join(" "));
    Command::new(cargo)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .is_ok_and(|s| s.success())
}

fn env_text(env: &[(&str, &str)]) -> String {
    env.iter().map(|(k, v)| format!("({k}={v}) ")).collect()
}

pub(crate) fn run(args: &[String]) -> ExitCode {
    if let Some(arg) = args.first() {
        eprintln!("test takes no arguments (got `{arg}`); it runs the whole suite");
        return ExitCode::from(2);
    }
    let required = std::env::var_os("CHASSIS_REQUIRE_SERVERS").is_some();
    let postgres_url = std::env::var("CHASSIS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let postgres = Server {
        name: "PostgreSQL",
        address: postgres_address(&postgres_url),
        needed_by: "the exemplars' tests on PostgreSQL, the chassis' tests/postgres.rs and the \
                    demo's tests/replicas.rs and tests/chaos_nats.rs",
    };

    let nats_url = std::env::var("CHASSIS_TEST_NATS_URL")
        .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let nats = Server {
        name: "NATS",
        address: nats_address(&nats_url),
        needed_by: "the chassis' tests/messaging.rs and the demo's tests/messaging.rs and \
                    tests/chaos_nats.rs",
    };

    let mut not_run = Vec::new();
    match nats.unreachable() {
        None => println!("{} at {}: reachable", nats.name, nats.address),
        Some(why) => {
            let line = format!(
                "{} at {} cannot be reached ({why}): {} cannot run",
                nats.name, nats.address, nats.needed_by
            );
            if required {
                eprintln!("error: {line}; CHASSIS_REQUIRE_SERVERS is set, so nothing is skipped");
                return ExitCode::FAILURE;
            }
            not_run.push(line);
        }
    }
    let found = chromium().map_or_else(
        || install_chromium().and_then(|()| chromium().ok_or("not found after".to_owned())),
        Ok,
    );
    match found {
        Ok(path) => println!("Chromium: {path}"),
        Err(why) => {
            let line = format!(
                "Chromium is not installed ({why}; Debian: `apt-get install -y chromium`, or \
                 set CHASSIS_CHROMIUM): the docs pages' browser tests (the chassis' \
                 tests/docs_ui.rs, orders' tests/docs_ui.rs) cannot run"
            );
            if required {
                eprintln!("error: {line}; CHASSIS_REQUIRE_SERVERS is set, so nothing is skipped");
                return ExitCode::FAILURE;
            }
            not_run.push(line);
        }
    }
    let postgres_up = match postgres.unreachable() {
        None => {
            println!("{} at {}: reachable", postgres.name, postgres.address);
            true
        }
        Some(why) => {
            let line = format!(
                "{} at {} cannot be reached ({why}): {} cannot run",
                postgres.name, postgres.address, postgres.needed_by
            );
            if required {
                eprintln!("error: {line}; CHASSIS_REQUIRE_SERVERS is set, so nothing is skipped");
                return ExitCode::FAILURE;
            }
            not_run.push(line);
            false
        }
    };

    let st = match schemathesis() {
        Ok(st) => {
            println!("schemathesis: {st}");
            Some(st)
        }
        Err(why) => {
            let line = format!(
                "schemathesis is not installed ({why}): the exemplars' tests/schemathesis.rs \
                 skip (docs/contracts.md)"
            );
            if required {
                eprintln!("error: {line}; CHASSIS_REQUIRE_SERVERS is set, so nothing is skipped");
                return ExitCode::FAILURE;
            }
            not_run.push(line);
            None
        }
    };
    let tools: Vec<(&str, &str)> = st
        .as_deref()
        .map(|st| ("CHASSIS_SCHEMATHESIS", st))
        .into_iter()
        .collect();

    let mut ok = cargo(
        &["test", "--workspace", "--all-features", "--locked"],
        &tools,
    );
    if postgres_up {
        let mut args = vec!["test", "--locked"];
        for crate_name in STATEFUL {
            args.extend(["-p", crate_name]);
        }
        let mut env = vec![("CHASSIS_TEST_BACKEND", "postgres")];
        env.extend(&tools);
        ok &= cargo(&args, &env);
        // The exemplars' events through JetStream, every service on
        // PostgreSQL (NATS required as above).
        ok &= cargo(
            &["test", "--locked", "-p", "demo", "--test", "messaging"],
            &[("CHASSIS_TEST_BACKEND", "postgres")],
        );
    }

    if !not_run.is_empty() {
        println!("\nNOT RUN:");
        for line in &not_run {
            println!("  {line}");
        }
    }
    if ok {
        println!("\nall tests passed");
        ExitCode::SUCCESS
    } else {
        eprintln!("\nerror: tests failed (see above)");
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_address_comes_from_the_url() {
        assert_eq!(
            postgres_address("postgres://postgres@127.0.0.1:5432/test"),
            "127.0.0.1:5432"
        );
        assert_eq!(
            postgres_address("postgres://u:p@db/x?sslmode=disable"),
            "db:5432"
        );
        assert_eq!(postgres_address("postgresql://[::1]:6543/x"), "[::1]:6543");
        assert_eq!(nats_address("nats://127.0.0.1:4222"), "127.0.0.1:4222");
        assert_eq!(nats_address("nats://u:p@broker, nats://b:1"), "broker:4222");
    }

    #[test]
    fn a_closed_port_is_unreachable_with_a_reason() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let server = Server {
            name: "x",
            address,
            needed_by: "y",
        };
        assert!(server.unreachable().is_some());
    }
}
