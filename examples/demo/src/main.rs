//! `demo`: the exemplar system in one command.
//!
//! ```text
//! demo                 start auth, ticketing, orders and mail on loopback,
//!                      print the URLs, a token and a journey to paste, and
//!                      run the journey every minute as a synthetic monitor
//! demo --smoke         start the system on free ports with a fresh data
//!                      directory, run the journey once, exit 0 or 1
//! demo --measure      start-up time, memory and orders per second under
//!                      load (with wrk), for docs/benchmarks.md
//! demo --data <dir>    keep the data in <dir> (default ./data)
//! demo --serve <name>  run one service in this process (what the demo
//!                      starts its children with)
//! ```

use std::{path::PathBuf, process::ExitCode};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut smoke = false;
    let mut measure = false;
    let mut data: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => smoke = true,
            "--measure" => measure = true,
            "--data" => match args.next() {
                Some(d) => data = Some(d.into()),
                None => return usage("--data needs a directory"),
            },
            "--serve" => {
                return match args.next() {
                    Some(name) => demo::serve::run(&name).await,
                    None => usage("--serve needs a service name"),
                };
            }
            "-h" | "--help" => {
                println!("{}", demo::USAGE);
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    if measure {
        demo::measure::run(data).await
    } else if smoke {
        demo::smoke(data).await
    } else {
        demo::run(data.unwrap_or_else(|| PathBuf::from("data"))).await
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("demo: {problem}\n\n{}", demo::USAGE);
    ExitCode::from(64)
}
