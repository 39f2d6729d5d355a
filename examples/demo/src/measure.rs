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
//!
//! `--postgres <url>` and `--replicas <n>` measure the same on PostgreSQL
//! (fresh databases `chassis_demo_measure_<service>`, dropped afterwards),
//! with `n` processes of each service: one `wrk` per replica of orders,
//! the connections shared out among them, their rates added up and the
//! highest p50 and p99 reported, and the connections open on the demo's
//! databases half-way through the load
//! (`SELECT count(*) FROM pg_stat_activity WHERE datname LIKE 'chassis_demo_%'`).
//! Numbers per replica are separated by `/`.
//!
//! 4. **Events end to end**: once the load ends, the outbox is left to
//!    drain (at most `DEMO_DRAIN_SECS`, default 300); then, for every
//!    `order.placed` event, the time from the order's creation (its
//!    transaction commits a few milliseconds later) to the commit of mail's
//!    job for it (after which the consumer acknowledges), read from the two
//!    databases: p50, p99 and the longest, the events consumed per second
//!    while the load ran, and how long the drain took. With `--nats` the
//!    events go through JetStream, otherwise through the HTTP relay: the
//!    same numbers for either transport.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use chassis::db::{Database, DbConfig};

use crate::{
    Options, journey, postgres,
    system::{Layout, SERVICES, System, current_exe},
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
            let each: Vec<String> = (0..system.replicas(s))
                .map(|i| {
                    system
                        .pid(s, i)
                        .and_then(rss_mib)
                        .map_or("?".to_owned(), |m| format!("{m:.1}"))
                })
                .collect();
            format!("{s} {} MiB", each.join("/"))
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
-- PREFIX is unique per run of wrk (several run at once, one per replica).
local prefix = "PREFIX"
request = function()
  counter = counter + 1
  return wrk.format("POST", "/orders/v1/acme/orders", {
    ["authorization"] = "Bearer TOKEN",
    ["content-type"] = "application/json",
    ["idempotency-key"] = "load-" .. prefix .. "-" .. counter,
  }, '{"ticket_id":"TICKET","quantity":1,"email":"alice@example.com"}')
end
"#;

/// The prefix of the databases `--measure` makes on PostgreSQL (dropped
/// before and after): `chassis_demo_measure_<service>`.
pub const MEASURE_PREFIX: &str = "chassis_demo_measure";

/// Runs the measurements on the system `options` describe and prints a
/// table.
pub async fn run(data: Option<PathBuf>, options: Options) -> ExitCode {
    let fresh = data.is_none();
    let data = data.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("chassis-demo-measure-{}", chassis::id::uuid_v7()))
    });
    let result = measure(&data, &options).await;
    if let Some(server) = &options.postgres
        && let Err(e) = postgres::drop_all(server, MEASURE_PREFIX).await
    {
        eprintln!("measure: {e}");
    }
    match result {
        Ok(table) => {
            println!("{table}");
            if fresh {
                let _ = std::fs::remove_dir_all(&data);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("measure: {e} (data and logs in {})", data.display());
            ExitCode::FAILURE
        }
    }
}

/// What one run of wrk reported.
#[derive(Debug, Default)]
struct Load {
    per_second: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    non_2xx: u64,
    text: String,
}

/// A latency as wrk prints it (`812.00us`, `1.23ms`, `2.01s`), in ms.
fn latency_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(n / 1000.0),
        "ms" => Some(n),
        "s" => Some(n * 1000.0),
        "m" => Some(n * 60_000.0),
        _ => None,
    }
}

fn parse_wrk(text: String) -> Load {
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .map(|l| l[prefix.len()..].trim().to_owned())
    };
    Load {
        per_second: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        p50_ms: field("50%").and_then(|v| latency_ms(&v)),
        p99_ms: field("99%").and_then(|v| latency_ms(&v)),
        non_2xx: field("Non-2xx or 3xx responses:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        text,
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "?".to_owned(), |v| format!("{v:.2}ms"))
}

async fn measure(data: &Path, options: &Options) -> Result<String, String> {
    options.check()?;
    let wrk = wrk()?;
    let n = options.replicas;
    if let Some(server) = &options.postgres {
        // Fresh databases, as the fresh data directory is on SQLite.
        postgres::drop_all(server, MEASURE_PREFIX).await?;
    }
    let layout = options
        .databases(Layout::free(&SERVICES.map(|s| (s, n)))?, MEASURE_PREFIX)
        .await?;
    let exe = current_exe().map_err(|e| e.to_string())?;
    let env = options.nats_env(data)?;
    let env = crate::pairs(&env);
    // First start: creates the databases, keys and demo users.
    let mut first = System::start_layout(&exe, data, layout.clone(), &env)
        .await
        .map_err(|e| e.to_string())?;
    first.stop().await;
    // Second start: what a restart costs.
    let mut system = System::start_layout(&exe, data, layout, &env)
        .await
        .map_err(|e| e.to_string())?;
    let startup = SERVICES
        .iter()
        .map(|s| {
            let each: Vec<String> = (0..n)
                .map(|i| {
                    system
                        .ready_after(s, i)
                        .map_or(0, |d| d.as_millis())
                        .to_string()
                })
                .collect();
            format!("{s} {} ms", each.join("/"))
        })
        .collect::<Vec<_>>()
        .join(", ");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_line(&system);

    let e = system.endpoints();
    let (token, ticket) = journey::load_setup(&e).await.map_err(|e| e.to_string())?;
    let run = chassis::id::uuid_v7();
    let script = |i: usize| data.join(format!("orders-{i}.lua"));
    for i in 0..n {
        std::fs::write(
            script(i),
            SCRIPT
                .replace("TOKEN", &token)
                .replace("TICKET", &ticket)
                .replace("PREFIX", &format!("{run}-{i}")),
        )
        .map_err(|e| e.to_string())?;
    }
    let secs = env_u64("DEMO_LOAD_SECS", 20);
    let connections = usize::try_from(env_u64("DEMO_LOAD_CONNECTIONS", 16))
        .unwrap_or(16)
        .max(n);
    // wrk talks to one address: one wrk per replica of orders, the
    // connections shared out among them.
    let targets = e.urls("orders").to_vec();
    let mut loads = Vec::new();
    for (i, url) in targets.iter().enumerate() {
        let c = connections / n + usize::from(i < connections % n);
        let child = tokio::process::Command::new(&wrk)
            .args([
                "-t1".to_owned(),
                format!("-c{c}"),
                format!("-d{secs}s"),
                "--latency".to_owned(),
                "-s".to_owned(),
                script(i).display().to_string(),
                url.clone(),
            ])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("wrk: {e}"))?;
        loads.push(child);
    }
    let command = format!(
        "wrk -t1 -c{connections} -d{secs}s --latency -s orders-<i>.lua {}{}",
        targets.join(" "),
        if n > 1 {
            format!(" (one wrk per replica of orders, {connections} connections among {n})")
        } else {
            String::new()
        }
    );
    // The resident set and the database connections under load, half-way
    // through.
    let sampler = async {
        tokio::time::sleep(Duration::from_secs(secs / 2)).await;
        let pg = match &options.postgres {
            Some(server) => Some(postgres::connections(server).await),
            None => None,
        };
        (rss_line(&system), pg)
    };
    let outputs = async {
        // Every wrk runs from its spawn: waiting for each in turn is
        // waiting for all of them.
        let mut outs = Vec::new();
        for child in loads {
            outs.push(child.wait_with_output().await);
        }
        outs
    };
    let load_began = chassis::time::now_millis();
    let (outs, (busy, pg)) = tokio::join!(outputs, sampler);
    let flow = events(data, system.layout(), load_began).await;
    let mut runs = Vec::new();
    for out in outs {
        let out = out.map_err(|e| format!("wrk: {e}"))?;
        runs.push(parse_wrk(String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    system.stop().await;
    let worst = |f: fn(&Load) -> Option<f64>| {
        runs.iter()
            .filter_map(f)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
    };
    let engine = match &options.postgres {
        Some(server) => format!(
            "PostgreSQL ({}), {n} {} of each service",
            postgres::redact(server),
            if n == 1 { "process" } else { "processes" }
        ),
        None => "SQLite, one process of each service".to_owned(),
    };
    let engine = match &options.nats {
        Some(_) => format!("{engine}; events through NATS JetStream"),
        None => format!("{engine}; events over HTTP"),
    };
    let pg_line = match pg {
        None => String::new(),
        Some(Ok(c)) => format!("PostgreSQL connections open on chassis_demo_* under load: {c}\n"),
        Some(Err(e)) => format!("PostgreSQL connections open under load: unknown ({e})\n"),
    };
    let latency_note = if n > 1 {
        " (the highest of the wrk runs)"
    } else {
        ""
    };
    Ok(format!(
        "engine: {engine}\n\
         start-up to ready (existing database): {startup}\n\
         idle resident memory: {idle}\n\
         resident memory under load: {busy}\n\
         {pg_line}\
         orders placed: {:.2} per second; latency p50 {}, p99 {}{latency_note}; non-2xx answers: {}\n\
         {flow}\n\
         load: {command}\n\n{}",
        runs.iter().map(|r| r.per_second).sum::<f64>(),
        ms(worst(|r| r.p50_ms)),
        ms(worst(|r| r.p99_ms)),
        runs.iter().map(|r| r.non_2xx).sum::<u64>(),
        runs.iter()
            .map(|r| r.text.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    ))
}

/// The orders' and mail's databases, as the services open them.
async fn open(data: &Path, layout: &Layout, service: &str) -> Result<Database, String> {
    let config = DbConfig::new(data.join(service), &format!("{service}.db"));
    let config = match layout.database(service) {
        Some(url) => config.postgres(url),
        None => config,
    };
    Database::open(&config)
        .await
        .map_err(|e| format!("{service}'s database: {e}"))
}

/// Waits for the outbox to drain, then measures each `order.placed` event
/// from its order's creation to mail's commit of its job (module docs,
/// item 4); a line for the report.
async fn events(data: &Path, layout: &Layout, load_began: i64) -> String {
    match event_flow(data, layout, load_began).await {
        Ok(line) => line,
        Err(e) => format!("events end to end: not measured ({e})"),
    }
}

async fn event_flow(data: &Path, layout: &Layout, load_began: i64) -> Result<String, String> {
    let load_ended = chassis::time::now_millis();
    let (orders, mail) = (
        open(data, layout, "orders").await?,
        open(data, layout, "mail").await?,
    );
    let e = |e: sqlx::Error| e.to_string();
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(env_u64("DEMO_DRAIN_SECS", 300));
    let placed: i64 = loop {
        let (left, placed): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE delivered_at IS NULL AND parked_at IS NULL),
                    COUNT(*) FILTER (WHERE kind = 'order.placed')
             FROM outbox",
        )
        .fetch_one(orders.pool())
        .await
        .map_err(e)?;
        let mailed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages")
            .fetch_one(mail.pool())
            .await
            .map_err(e)?;
        if left == 0 && mailed >= placed {
            break placed;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{left} events still in the outbox, {mailed} of {placed} mailed, after the drain's limit"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let drained = chassis::time::now_millis() - load_ended;
    let created: Vec<(String, String)> =
        sqlx::query_as("SELECT id, created_at FROM outbox WHERE kind = 'order.placed'")
            .fetch_all(orders.pool())
            .await
            .map_err(e)?;
    let consumed: std::collections::HashMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT message_id, created_at FROM messages")
            .fetch_all(mail.pool())
            .await
            .map_err(e)?
            .into_iter()
            .collect();
    orders.close().await;
    mail.close().await;
    let mut latencies: Vec<i64> = created
        .iter()
        .filter_map(|(id, at)| {
            let at =
                time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                    .ok()?;
            let at = i64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()?;
            Some(consumed.get(id)? - at)
        })
        .collect();
    latencies.sort_unstable();
    let in_load = consumed
        .values()
        .filter(|&&at| at >= load_began && at <= load_ended)
        .count();
    let secs = (load_ended - load_began) as f64 / 1000.0;
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms} ms"))
    };
    Ok(format!(
        "events end to end: {placed} order.placed (and as many reservation.confirm); \
         order created -> mail's job committed: p50 {}, p99 {}, max {}; \
         consumed {:.1} per second while the load ran; drained {:.1} s after it",
        at(0.5),
        at(0.99),
        at(1.0),
        in_load as f64 / secs,
        drained as f64 / 1000.0,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_latencies_are_read_in_every_unit() {
        let close = |text: &str, ms: f64| {
            let got = latency_ms(text).unwrap();
            assert!((got - ms).abs() < 1e-9, "{text}: {got}");
        };
        close("812.00us", 0.812);
        close("1.23ms", 1.23);
        close("2.01s", 2010.0);
        close("1.50m", 90_000.0);
        assert_eq!(latency_ms("fast"), None);
    }

    #[test]
    fn a_wrk_report_is_read() {
        let load = parse_wrk(
            "  Latency Distribution\n     50%    3.10ms\n     99%   20.50ms\n  \
             Non-2xx or 3xx responses: 4\nRequests/sec:    512.25\n"
                .to_owned(),
        );
        assert!((load.per_second - 512.25).abs() < 1e-9);
        assert!((load.p50_ms.unwrap() - 3.10).abs() < 1e-9);
        assert!((load.p99_ms.unwrap() - 20.5).abs() < 1e-9);
        assert_eq!(load.non_2xx, 4);
    }
}
