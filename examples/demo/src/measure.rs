//! `demo --measure`: the system's numbers, for `docs/benchmarks.md`.
//!
//! 1. **Start-up to ready** of each service with an existing database: the
//!    system is started once to create the databases, stopped, and started
//!    again; each service is timed from its spawn to its first 200 on
//!    `/health/ready` (auth first, the others after it).
//! 2. **Idle memory**: the resident set (`VmRSS`) of each process after two
//!    idle seconds.
//! 3. **Orders placed per second end to end**: `wrk` (installed from the
//!    distribution's packages when missing and allowed) posts orders with a
//!    fresh `Idempotency-Key` each, as alice, for `DEMO_LOAD_SECS` (default
//!    20) over `DEMO_LOAD_CONNECTIONS` (default 16) connections, to loopback
//!    only; every order reserves in ticketing, commits with its outbox events
//!    and is mailed afterwards. Then the resident set under load.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use crate::{
    journey,
    system::{Ports, SERVICES, System},
};

fn env_u64(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The resident set of `pid`, in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn rss_line(system: &System) -> String {
    SERVICES
        .iter()
        .map(|s| {
            let rss = system.pid(s).and_then(rss_mib);
            format!(
                "{s} {}",
                rss.map_or("?".to_owned(), |m| format!("{m:.1} MiB"))
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Finds `wrk`, installing it with apt-get when running as root.
fn wrk() -> Result<PathBuf, String> {
    let found = |name: &str| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
    };
    if let Some(p) = found("wrk") {
        return Ok(p);
    }
    println!("wrk is not installed; installing it from the distribution's packages");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-q", "wrk"])
        .status()
        .is_ok_and(|s| s.success());
    match found("wrk") {
        Some(p) if ok => Ok(p),
        _ => Err("wrk is needed: install it (`apt-get install wrk`) and run again".to_owned()),
    }
}

const SCRIPT: &str = r#"-- One order per request, each with its own Idempotency-Key.
local counter = 0
local prefix = tostring(os.time()) .. "-" .. tostring(math.random(1, 1000000000))
request = function()
  counter = counter + 1
  return wrk.format("POST", "/orders/v1/acme/orders", {
    ["authorization"] = "Bearer TOKEN",
    ["content-type"] = "application/json",
    ["idempotency-key"] = "load-" .. prefix .. "-" .. counter,
  }, '{"ticket_id":"TICKET","quantity":1,"email":"alice@example.com"}')
end
"#;

/// Runs the measurements and prints a table.
pub async fn run(data: Option<PathBuf>) -> ExitCode {
    let data = data.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("chassis-demo-measure-{}", chassis::id::uuid_v7()))
    });
    match measure(&data).await {
        Ok(table) => {
            println!("{table}");
            let _ = std::fs::remove_dir_all(&data);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("measure: {e} (data and logs in {})", data.display());
            ExitCode::FAILURE
        }
    }
}

async fn measure(data: &Path) -> Result<String, String> {
    let wrk = wrk()?;
    let ports = Ports::free().map_err(|e| e.to_string())?;
    // First start: creates the databases, keys and demo users.
    let mut first = System::start(data, ports)
        .await
        .map_err(|e| e.to_string())?;
    first.stop().await;
    // Second start: what a restart costs.
    let mut system = System::start(data, ports)
        .await
        .map_err(|e| e.to_string())?;
    let startup = SERVICES
        .iter()
        .map(|s| {
            format!(
                "{s} {} ms",
                system.ready_after(s).map_or(0, |d| d.as_millis())
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_line(&system);

    let e = system.endpoints();
    let (token, ticket) = journey::load_setup(&e).await.map_err(|e| e.to_string())?;
    let script = data.join("orders.lua");
    std::fs::write(
        &script,
        SCRIPT.replace("TOKEN", &token).replace("TICKET", &ticket),
    )
    .map_err(|e| e.to_string())?;
    let secs = env_u64("DEMO_LOAD_SECS", 20);
    let connections = env_u64("DEMO_LOAD_CONNECTIONS", 16);
    let command = format!(
        "wrk -t1 -c{connections} -d{secs}s --latency -s orders.lua {}",
        e.orders
    );
    let load = tokio::process::Command::new(&wrk)
        .args([
            "-t1".to_owned(),
            format!("-c{connections}"),
            format!("-d{secs}s"),
            "--latency".to_owned(),
            "-s".to_owned(),
            script.display().to_string(),
            e.orders.clone(),
        ])
        .output();
    // The resident set under load, half-way through.
    let sampler = async {
        tokio::time::sleep(Duration::from_secs(secs / 2)).await;
        rss_line(&system)
    };
    let (out, busy) = tokio::join!(load, sampler);
    let out = out.map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    system.stop().await;
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .map(|l| l[prefix.len()..].trim().to_owned())
            .unwrap_or_else(|| "?".to_owned())
    };
    let errors = field("Non-2xx or 3xx responses:");
    Ok(format!(
        "start-up to ready (existing database): {startup}\n\
         idle resident memory: {idle}\n\
         resident memory under load: {busy}\n\
         orders placed: {} per second; latency p50 {}, p99 {}; non-2xx answers: {}\n\
         load: {command}\n\n{text}",
        field("Requests/sec:"),
        field("50%"),
        field("99%"),
        if errors == "?" {
            "0".to_owned()
        } else {
            errors
        },
    ))
}
