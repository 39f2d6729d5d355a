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
//! --postgres <url>     every service on the PostgreSQL server of <url>, a
//!                      database per service (chassis_demo_<service>)
//! --replicas <n>       n processes of each service (needs --postgres when
//!                      more than 1)
//! --nats <url>         events through NATS JetStream (CHASSIS_NATS_URL for
//!                      every service) instead of HTTP
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
    let mut options = demo::Options::default();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => smoke = true,
            "--measure" => measure = true,
            "--data" => match args.next() {
                Some(d) => data = Some(d.into()),
                None => return usage("--data needs a directory"),
            },
            "--postgres" => match args.next() {
                Some(url) => options.postgres = Some(url),
                None => {
                    return usage("--postgres needs a URL (postgres://user@host:port/database)");
                }
            },
            "--nats" => match args.next() {
                Some(url) => options.nats = Some(url),
                None => return usage("--nats needs a URL (nats://host:port)"),
            },
            "--replicas" => match args.next().map(|n| n.parse::<usize>()) {
                Some(Ok(n)) => options.replicas = n,
                Some(Err(_)) => return usage("--replicas needs a whole number (1 or more)"),
                None => return usage("--replicas needs a number"),
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
    if let Err(problem) = options.check() {
        return usage(&problem);
    }
    if measure {
        demo::measure::run(data, options).await
    } else if smoke {
        demo::smoke(data, options).await
    } else {
        demo::run(data.unwrap_or_else(|| PathBuf::from("data")), options).await
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("demo: {problem}\n\n{}", demo::USAGE);
    ExitCode::from(64)
}
