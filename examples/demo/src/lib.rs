//! The exemplar system in one command: starts auth, ticketing, orders and
//! mail as four processes on loopback, each with its own database under the
//! data directory, and shows the journey a customer takes.
//!
//! Each service runs in its own process (this binary, started with
//! `--serve <name>`), exactly as it runs on its own: its own settings, its
//! own metrics registry and logs, its own database file. Their logs go to
//! `<data>/logs/<name>.log`.
//!
//! | service | port | variable to move it |
//! |---|---|---|
//! | auth | 8081 | `DEMO_AUTH_PORT` |
//! | ticketing | 8082 | `DEMO_TICKETING_PORT` |
//! | orders | 8083 | `DEMO_ORDERS_PORT` |
//! | mail | 8084 | `DEMO_MAIL_PORT` |
//! | the demo's own `/metrics` and health (the synthetic monitor) | 8080 | `DEMO_PORT` |
//!
//! auth's users and service clients, with their grants, are data: the
//! demo writes [`auth::DEMO_GRANTS`] as `<data>/auth/grants.toml` (unless
//! the data directory has one already) and runs auth with
//! `AUTH_GRANTS_FILE` pointing at it. An edit of that file reaches the
//! subject's next token within a second or two, with nothing restarted.
//!
//! The synthetic monitor runs the journey every `DEMO_MONITOR_SECS` (60 by
//! default) and exports `synthetic_journey_runs_total{outcome}` and
//! `synthetic_journey_duration_seconds` at `http://127.0.0.1:8080/metrics`.
//!
//! `--postgres <url>` runs every service on a PostgreSQL server instead:
//! one database per service (`chassis_demo_<service>`, made when missing
//! through a connection to the database the URL names), and
//! `--replicas <n>` starts `n` processes of each service, replica `i` on
//! its first replica's port plus `10 × i`, all replicas of a service on its
//! database (see [`system`]). SQLite is one node: `--replicas` above 1
//! needs `--postgres`.
//!
//! `--nats <url>` sets `CHASSIS_NATS_URL` for every service: orders
//! publishes its outbox events to NATS JetStream, and ticketing and mail
//! consume them (without it, orders' relay calls them over HTTP). The
//! demo's streams, subjects and consumers carry a prefix of the data
//! directory's own (`CHASSIS_NATS_PREFIX`, kept in `<data>/nats-prefix`),
//! so several demos, and tests, share one server.

use std::{path::PathBuf, process::ExitCode, time::Duration};

pub mod journey;
pub mod measure;
pub mod postgres;
pub mod serve;
pub mod system;

use system::{Layout, System};

/// The command line.
pub const USAGE: &str =
    "usage: demo [--smoke | --measure] [--data <dir>] [--postgres <url>] [--replicas <n>] [--nats <url>]
       demo --serve <auth|ticketing|orders|mail>

  demo              start the system on 127.0.0.1:8081-8084, data in ./data
  demo --smoke      start it on free ports with a fresh data directory,
                    run the journey once, exit 0 (it worked) or 1
  demo --measure    start-up time, memory and orders per second under load
                    (wrk, installed when missing), for docs/benchmarks.md
  demo --data DIR   keep the data in DIR
  --postgres URL    run every service on the PostgreSQL server of URL
                    (postgres://user@host:port/database): one database per
                    service, chassis_demo_<service>, made when missing
  --replicas N      N processes of each service (default 1; more than 1
                    needs --postgres: SQLite is one node); replica i listens
                    on its first replica's port + 10 x i
  --nats URL        events go through the NATS JetStream server of URL
                    (nats://host:port): orders publishes, ticketing and
                    mail consume; without it, orders calls them over HTTP";

/// How the system runs: how many processes of each service, on which
/// database engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Processes of each service (at least 1).
    pub replicas: usize,
    /// The PostgreSQL server, as the URL of a database on it; `None`:
    /// SQLite files under the data directory.
    pub postgres: Option<String>,
    /// The NATS JetStream server; `None`: events go over HTTP.
    pub nats: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            replicas: 1,
            postgres: None,
            nats: None,
        }
    }
}

/// The file in the data directory that keeps the demo's prefix on the
/// broker.
pub const NATS_PREFIX_FILE: &str = "nats-prefix";

impl Options {
    /// Refuses what cannot run: no replicas, too many, or several on
    /// SQLite.
    ///
    /// # Errors
    ///
    /// A sentence saying what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.replicas == 0 || self.replicas > system::MAX_REPLICAS {
            return Err(format!(
                "--replicas must be between 1 and {}, not {}",
                system::MAX_REPLICAS,
                self.replicas
            ));
        }
        if let Some(url) = &self.postgres {
            postgres::database_url(url, postgres::PREFIX)?;
        }
        if let Some(url) = &self.nats
            && !(url.starts_with("nats://") || url.starts_with("tls://"))
        {
            return Err("--nats needs a URL, nats://host:port".to_owned());
        }
        if self.replicas > 1 && self.postgres.is_none() {
            return Err(format!(
                "--replicas {} needs --postgres <url>: on SQLite each service's database is a \
                 file written by one process, so each service runs as one node",
                self.replicas
            ));
        }
        Ok(())
    }

    /// What every service's environment gets for the broker: its URL and
    /// the data directory's prefix (made and kept in
    /// `<data>/nats-prefix` the first time, so a restarted demo finds its
    /// streams again); nothing without `--nats`.
    ///
    /// # Errors
    ///
    /// The prefix file cannot be read or written, or holds no valid
    /// prefix.
    pub fn nats_env(&self, data: &std::path::Path) -> Result<Vec<(String, String)>, String> {
        let Some(url) = &self.nats else {
            return Ok(Vec::new());
        };
        let file = data.join(NATS_PREFIX_FILE);
        let prefix = match std::fs::read_to_string(&file) {
            Ok(p) => p.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let uuid = chassis::id::uuid_v7().to_string();
                let p = format!("demo{}", &uuid[uuid.len() - 10..]);
                std::fs::create_dir_all(data)
                    .and_then(|()| std::fs::write(&file, &p))
                    .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
                p
            }
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        };
        if !chassis::permission::is_name(&prefix) || prefix.len() > 32 {
            return Err(format!("{} holds no valid prefix", file.display()));
        }
        Ok(vec![
            ("CHASSIS_NATS_URL".to_owned(), url.clone()),
            ("CHASSIS_NATS_PREFIX".to_owned(), prefix),
        ])
    }

    /// `layout` with every service on its database `<prefix>_<service>` on
    /// the PostgreSQL server (made when missing), or as it is on SQLite.
    ///
    /// # Errors
    ///
    /// The server cannot be reached or a database cannot be made.
    pub async fn databases(&self, layout: Layout, prefix: &str) -> Result<Layout, String> {
        let Some(server) = &self.postgres else {
            return Ok(layout);
        };
        let mut layout = layout;
        for (service, url) in postgres::ensure(server, prefix).await? {
            layout = layout.postgres(service, url);
        }
        Ok(layout)
    }
}

fn port(var: &str, default: u16) -> u16 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Starts the system with fixed ports and data in `data`, prints the
/// journey, runs the monitor until Ctrl-C or SIGTERM, then stops every
/// service gracefully.
pub async fn run(data: PathBuf, options: Options) -> ExitCode {
    let ports = system::Ports {
        auth: port("DEMO_AUTH_PORT", 8081),
        ticketing: port("DEMO_TICKETING_PORT", 8082),
        orders: port("DEMO_ORDERS_PORT", 8083),
        mail: port("DEMO_MAIL_PORT", 8084),
    };
    let mut system = match start(&data, &options, Layout::fixed(ports, options.replicas)).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let endpoints = system.endpoints();
    match journey::prepare(&endpoints).await {
        Ok(intro) => println!(
            "{}",
            journey::instructions(&endpoints, &intro, system.layout())
        ),
        Err(e) => eprintln!("demo: the system started, but the first journey failed: {e}"),
    }
    let monitor_every = Duration::from_secs(
        std::env::var("DEMO_MONITOR_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60)
            .max(1),
    );
    let code = serve::monitor(endpoints, port("DEMO_PORT", 8080), monitor_every).await;
    system.stop().await;
    code
}

/// Starts the system as `options` say on `layout` (its ports), the
/// databases on PostgreSQL named `chassis_demo_<service>`.
async fn start(
    data: &std::path::Path,
    options: &Options,
    layout: Result<Layout, String>,
) -> Result<System, String> {
    options.check()?;
    let layout = options.databases(layout?, postgres::PREFIX).await?;
    let exe = system::current_exe().map_err(|e| e.to_string())?;
    let env = options.nats_env(data)?;
    System::start_layout(&exe, data, layout, &pairs(&env))
        .await
        .map_err(|e| e.to_string())
}

/// `(name, value)` pairs borrowed, as [`System::start_layout`] takes them.
pub fn pairs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Starts the system on free ports, runs the journey once, stops it.
pub async fn smoke(data: Option<PathBuf>, options: Options) -> ExitCode {
    let (data, fresh) = match data {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("chassis-demo-smoke-{}", chassis::id::uuid_v7())),
            true,
        ),
    };
    let n = options.replicas;
    let layout = Layout::free(&system::SERVICES.map(|s| (s, n)));
    let mut system = match start(&data, &options, layout).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("smoke: FAILED to start the system: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = journey::run(&system.endpoints()).await;
    system.stop().await;
    let code = match result {
        Ok(report) => {
            println!("smoke: ok\n{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "smoke: FAILED: {e}\n(logs in {})",
                data.join("logs").display()
            );
            return ExitCode::FAILURE;
        }
    };
    if fresh {
        let _ = std::fs::remove_dir_all(&data);
    }
    code
}
