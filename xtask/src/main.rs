//! Project tasks, run with `cargo xtask <task>` (an alias of
//! `cargo run -q -p xtask -- <task>`).
//!
//! `test` runs the whole test suite: every test on the exemplars' embedded
//! default (SQLite), then the exemplars' tests again on PostgreSQL, saying
//! plainly which tests a missing server keeps from running (see
//! `src/test.rs`).
//!
//! `new-service <name>` makes a new service from the template exemplar
//! (`examples/ticketing` unless `--from` names another): every file is
//! copied, and every form of the template's name is renamed, in code, tests,
//! docs, migrations and file names, along with its port. See
//! `docs/new-service.md`.
//!
//! ```text
//! cargo run -p xtask -- new-service keycards
//! cargo run -p xtask -- new-service keycards --from ticketing --into ../services/keycards --port 8090
//! ```

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use xtask::{NewService, Workspace};

mod test;

const USAGE: &str = "usage: cargo xtask test
       cargo xtask new-service <name> [--from <exemplar>] [--into <dir>] [--port <port>]

  test              the whole test suite: SQLite, then the exemplars again on PostgreSQL

  <name>            the new service's name: lowercase letters, digits and `-`, starting with a letter
  --from <exemplar> the exemplar to copy, under examples/ (default: ticketing)
  --into <dir>      where to write it (default: examples/<name>, a member of this workspace)
  --port <port>     its port on loopback in docs and examples (default: one above the highest an exemplar uses)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("new-service") => new_service(&args[1..]),
        Some("test") => test::run(&args[1..]),
        Some("-h" | "--help") | None => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("unknown task `{other}`\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn new_service(args: &[String]) -> ExitCode {
    let mut problems = Vec::new();
    let mut name = None;
    let mut from = "ticketing".to_owned();
    let mut into = None;
    let mut port = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| match it.next() {
            Some(v) => Some(v.clone()),
            None => {
                problems.push(format!("{flag} needs a value"));
                None
            }
        };
        match arg.as_str() {
            "--from" => from = value("--from").unwrap_or(from),
            "--into" => into = value("--into").map(PathBuf::from),
            "--port" => {
                if let Some(v) = value("--port") {
                    match v.parse::<u16>() {
                        Ok(p) if p > 0 => port = Some(p),
                        _ => problems.push(format!("--port `{v}`: not a port number (1-65535)")),
                    }
                }
            }
            flag if flag.starts_with('-') => problems.push(format!("unknown option `{flag}`")),
            positional => {
                if name.replace(positional.to_owned()).is_some() {
                    problems.push(format!("more than one name given (`{positional}`)"));
                }
            }
        }
    }
    if name.is_none() {
        problems.push("the new service's name is missing".to_owned());
    }
    if !problems.is_empty() {
        return refuse(&problems);
    }
    let workspace = Workspace::locate();
    let task = match NewService::plan(
        &workspace,
        name.as_deref().unwrap_or_default(),
        &from,
        into,
        port,
    ) {
        Ok(task) => task,
        Err(problems) => return refuse(&problems),
    };
    match task.write() {
        Ok(mut report) => {
            report.into = shown(&report.into);
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(problems) => refuse(&problems),
    }
}

/// `path` relative to the current directory when it is below it
/// (`examples/keycards` from the workspace's root), else as it is.
fn shown(path: &Path) -> PathBuf {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
}

fn refuse(problems: &[String]) -> ExitCode {
    eprintln!("new-service: nothing was written:");
    for p in problems {
        eprintln!("  - {p}");
    }
    eprintln!("\n{USAGE}");
    ExitCode::from(2)
}
