//! Starting and stopping the four services as processes: one of each on
//! SQLite, or several replicas of each on PostgreSQL.
//!
//! Each replica is a process of its own on a loopback port of its own. On
//! PostgreSQL the replicas of a service share its database; every client is
//! pointed at every replica of its downstream through the comma-separated
//! `CHASSIS_DOWNSTREAM_<NAME>_URL` list, which the chassis client balances.
//! auth's issuer, token URL and key set can name only one base URL, so they
//! name auth's first replica (in production, a load balancer or a
//! Kubernetes Service in front of auth's replicas).
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use demo::system::{Layout, SERVICES, System, current_exe};
//!
//! // Three replicas of orders, two of mail, one of auth and ticketing.
//! let mut layout = Layout::free(&[("orders", 3), ("mail", 2)])?;
//! for service in SERVICES {
//!     let url = format!("postgres://postgres@127.0.0.1:5432/demo_{service}");
//!     layout = layout.postgres(service, url);
//! }
//! let data = std::path::Path::new("/tmp/demo-data");
//! let mut system = System::start_layout(&current_exe()?, data, layout, &[]).await?;
//! system.kill("orders", 1).await; // SIGKILL, as a crash
//! system.restart("orders", 1).await?; // and back, once ready
//! system.stop().await;
//! # Ok(())
//! # }
//! ```

use std::{
    fs::OpenOptions,
    net::TcpListener,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use chassis::client::{CallContext, Downstream};
use tokio::process::{Child, Command};

/// The services, in start order (auth first: the others load its keys).
pub const SERVICES: [&str; 4] = ["auth", "ticketing", "mail", "orders"];

/// The demo's client secret for orders (in auth's grants file).
const ORDERS_SECRET: &str = "orders-secret";

/// Ticketing's client secret in the demo's grants file.
const TICKETING_SECRET: &str = "ticketing-secret";

/// Where ticketing's sold-out notices go in the demo.
pub const SOLD_OUT_MAIL_TO: &str = "ops@acme.example";

/// auth's grants file in the data directory `data`: the demo's users and
/// service clients with their grants ([`auth::DEMO_GRANTS`] when the demo
/// writes it). auth applies an edit within seconds; the next token of the
/// subject has it.
pub fn grants_file(data: &Path) -> PathBuf {
    data.join("auth").join("grants.toml")
}

/// Writes [`auth::DEMO_GRANTS`] as auth's grants file, unless the data
/// directory has one already (edits survive restarts).
fn write_grants(data: &Path) -> std::io::Result<()> {
    let file = grants_file(data);
    if file.exists() {
        return Ok(());
    }
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(file, auth::DEMO_GRANTS)
}

/// Where each service listens (one process of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// auth.
    pub auth: u16,
    /// ticketing.
    pub ticketing: u16,
    /// orders.
    pub orders: u16,
    /// mail.
    pub mail: u16,
}

impl Ports {
    /// Four ports free now on loopback.
    ///
    /// # Errors
    ///
    /// No port could be bound.
    pub fn free() -> std::io::Result<Self> {
        let p = free_ports(4)?;
        Ok(Self {
            auth: p[0],
            ticketing: p[1],
            orders: p[2],
            mail: p[3],
        })
    }

    fn of(&self, service: &str) -> u16 {
        match service {
            "auth" => self.auth,
            "ticketing" => self.ticketing,
            "orders" => self.orders,
            _ => self.mail,
        }
    }
}

/// `n` ports free now on loopback, all different.
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    // Held together so that they differ.
    let l: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    l.iter().map(|l| l.local_addr().map(|a| a.port())).collect()
}

/// The most replicas of a service the demo starts.
pub const MAX_REPLICAS: usize = 20;

/// How the system is laid out: the port of every replica of every
/// service, and each service's database (a file under the data directory,
/// or a PostgreSQL database that its replicas share).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The ports of each service's replicas, in [`SERVICES`] order.
    ports: Vec<(&'static str, Vec<u16>)>,
    /// Each service's PostgreSQL database URL; none: SQLite.
    databases: Vec<(&'static str, String)>,
}

impl From<Ports> for Layout {
    /// One process of each service, on SQLite.
    fn from(ports: Ports) -> Self {
        Self {
            ports: SERVICES.iter().map(|s| (*s, vec![ports.of(s)])).collect(),
            databases: Vec::new(),
        }
    }
}

impl Layout {
    /// `replicas` of each service on fixed ports: replica `i` of a service
    /// listens on its first replica's port plus `10 × i` (auth 8081, 8091,
    /// ...).
    ///
    /// # Errors
    ///
    /// `replicas` is 0 or more than [`MAX_REPLICAS`], or a port would be
    /// beyond 65535.
    pub fn fixed(first: Ports, replicas: usize) -> Result<Self, String> {
        check_replicas(replicas)?;
        let mut ports = Vec::new();
        for s in SERVICES {
            let list = (0..replicas)
                .map(|i| {
                    u16::try_from(usize::from(first.of(s)) + 10 * i)
                        .map_err(|_| format!("replica {i} of {s} would need a port beyond 65535"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            ports.push((s, list));
        }
        Ok(Self {
            ports,
            databases: Vec::new(),
        })
    }

    /// Ports free now on loopback for `replicas` of each service named
    /// (one of each service not named).
    ///
    /// # Errors
    ///
    /// A count is 0 or more than [`MAX_REPLICAS`], a name is not a
    /// service, or no port could be bound.
    pub fn free(replicas: &[(&str, usize)]) -> Result<Self, String> {
        let mut counts = Vec::new();
        for (name, n) in replicas {
            if !SERVICES.contains(name) {
                return Err(format!("no service called {name:?}"));
            }
            check_replicas(*n)?;
        }
        for s in SERVICES {
            let n = replicas
                .iter()
                .rev()
                .find(|(name, _)| *name == s)
                .map_or(1, |(_, n)| *n);
            counts.push((s, n));
        }
        let total = counts.iter().map(|(_, n)| n).sum();
        let mut free = free_ports(total)
            .map_err(|e| format!("no free ports: {e}"))?
            .into_iter();
        Ok(Self {
            ports: counts
                .into_iter()
                .map(|(s, n)| (s, free.by_ref().take(n).collect()))
                .collect(),
            databases: Vec::new(),
        })
    }

    /// Runs `service` on the PostgreSQL database at `url` (the
    /// `<SVC>_DATABASE_URL` of each of its replicas).
    #[must_use]
    pub fn postgres(mut self, service: &'static str, url: impl Into<String>) -> Self {
        self.databases.retain(|(s, _)| *s != service);
        self.databases.push((service, url.into()));
        self
    }

    /// The ports of `service`'s replicas.
    pub fn ports(&self, service: &str) -> &[u16] {
        self.ports
            .iter()
            .find(|(s, _)| *s == service)
            .map_or(&[], |(_, p)| p.as_slice())
    }

    /// How many replicas of `service` run.
    pub fn replicas(&self, service: &str) -> usize {
        self.ports(service).len()
    }

    /// `service`'s PostgreSQL database URL; `None`: SQLite.
    pub fn database(&self, service: &str) -> Option<&str> {
        self.databases
            .iter()
            .find(|(s, _)| *s == service)
            .map(|(_, u)| u.as_str())
    }

    fn urls(&self, service: &str) -> Vec<String> {
        self.ports(service).iter().map(|p| url(*p)).collect()
    }
}

fn check_replicas(n: usize) -> Result<(), String> {
    if n == 0 || n > MAX_REPLICAS {
        return Err(format!(
            "replicas must be between 1 and {MAX_REPLICAS}, not {n}"
        ));
    }
    Ok(())
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The base URL of each service, and the data directory.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// auth (its first replica: the issuer's).
    pub auth: String,
    /// ticketing (its first replica).
    pub ticketing: String,
    /// orders (its first replica).
    pub orders: String,
    /// mail (its first replica).
    pub mail: String,
    /// Every replica's base URL, by service, in [`SERVICES`] order.
    pub replicas: Vec<(&'static str, Vec<String>)>,
    /// The data directory (mail's sent messages are under `mail/outbox`).
    pub data: PathBuf,
}

impl Endpoints {
    /// The issuer of the demo's tokens.
    pub fn issuer(&self) -> String {
        format!("{}/auth/v1", self.auth)
    }

    /// The base URL of every replica of `service`.
    pub fn urls(&self, service: &str) -> &[String] {
        self.replicas
            .iter()
            .find(|(s, _)| *s == service)
            .map_or(&[], |(_, u)| u.as_slice())
    }

    /// Every replica of `service` as one comma-separated list, as a chassis
    /// client takes it (`CHASSIS_DOWNSTREAM_<NAME>_URL`) to balance its
    /// calls.
    pub fn balanced(&self, service: &str) -> String {
        self.urls(service).join(",")
    }
}

/// One process of a service.
#[derive(Debug)]
struct Replica {
    service: &'static str,
    index: usize,
    port: u16,
    /// `None` once it was stopped and waited for.
    child: Option<Child>,
    /// How long it took from its spawn to ready, at its last start.
    ready: Option<Duration>,
}

/// The running services.
#[derive(Debug)]
pub struct System {
    replicas: Vec<Replica>,
    layout: Layout,
    endpoints: Endpoints,
    exe: PathBuf,
    /// Settings added to a service's environment at its next (re)start.
    extra: Vec<(&'static str, String, String)>,
    /// Settings added to every service's environment.
    common: Vec<(String, String)>,
}

/// Why the system did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A file or process could not be created.
    #[error("{0}")]
    Io(String),
    /// A service did not become ready.
    #[error("{service} did not become ready within {secs} s (its log: {log})")]
    NotReady {
        /// The service.
        service: &'static str,
        /// How long it was given.
        secs: u64,
        /// Its log file.
        log: String,
    },
}

/// The log file of replica `index` of `service`: `<service>.log` when it
/// runs alone, `<service>-<index>.log` otherwise.
pub fn log_file(data: &Path, service: &str, index: usize, replicas: usize) -> PathBuf {
    let name = if replicas <= 1 {
        format!("{service}.log")
    } else {
        format!("{service}-{index}.log")
    };
    data.join("logs").join(name)
}

/// The environment of replica `index` of `service`.
fn env_of(service: &str, index: usize, layout: &Layout, data: &Path) -> Vec<(String, String)> {
    let upper = service.to_ascii_uppercase();
    // The issuer, token URL and key set name one base URL: auth's first
    // replica (in production, a load balancer in front of every replica).
    let auth = url(layout.ports("auth")[0]);
    let list = |s: &str| layout.urls(s).join(",");
    let mut env = vec![
        (
            "CHASSIS_BIND".to_owned(),
            format!("127.0.0.1:{}", layout.ports(service)[index]),
        ),
        ("CHASSIS_SHUTDOWN_GRACE_SECS".to_owned(), "10".to_owned()),
        // Replicas of a service share its data directory: on PostgreSQL
        // it holds no database, and mail's file transport writes every
        // replica's mail into one outbox.
        (
            format!("{upper}_DATA_DIR"),
            data.join(service).display().to_string(),
        ),
    ];
    if let Some(db) = layout.database(service) {
        env.push((format!("{upper}_DATABASE_URL"), db.to_owned()));
    }
    let mut set = |k: &str, v: String| env.push((k.to_owned(), v));
    // The issuer is where its discovery document lives: the services find
    // auth's keys from the issuer alone.
    let issuer = format!("{auth}/auth/v1");
    if service == "auth" {
        set("AUTH_ISSUER", issuer);
        set("AUTH_PUBLIC_URL", auth.clone());
        // A token asked for without an `audience` is for auth alone.
        set("AUTH_DEFAULT_AUDIENCE", "auth".to_owned());
        // The demo's users and clients, with their well-known passwords,
        // are data: the grants file the demo writes.
        set("AUTH_GRANTS_FILE", grants_file(data).display().to_string());
        set("AUTH_GRANTS_POLL_SECS", "1".to_owned());
    } else {
        set("CHASSIS_AUTH_ISSUER", issuer);
        // Each service accepts only tokens minted for it.
        set("CHASSIS_AUTH_AUDIENCE", service.to_owned());
        set("CHASSIS_AUTH_ALGORITHMS", "EdDSA".to_owned());
    }
    if service == "ticketing" {
        // Sold-out notices go to mail, sent as ticketing itself.
        set("TICKETING_SOLD_OUT_MAIL_TO", SOLD_OUT_MAIL_TO.to_owned());
        set("CHASSIS_CLIENT_TOKEN_URL", format!("{auth}/auth/v1/token"));
        set("CHASSIS_CLIENT_ID", "ticketing".to_owned());
        set("CHASSIS_CLIENT_SECRET", TICKETING_SECRET.to_owned());
        set("CHASSIS_DOWNSTREAM_MAIL_URL", list("mail"));
        set("CHASSIS_DOWNSTREAM_MAIL_AUDIENCE", "mail".to_owned());
    }
    if service == "mail" {
        // A message whose worker died is sent again after this long.
        set("MAIL_LEASE_SECS", "10".to_owned());
    }
    if service == "orders" {
        // Events claimed by a relay that died are delivered by another
        // replica's relay after this long.
        set("ORDERS_RELAY_LEASE_MS", "10000".to_owned());
        set("CHASSIS_CLIENT_TOKEN_URL", format!("{auth}/auth/v1/token"));
        set("CHASSIS_CLIENT_ID", "orders".to_owned());
        set("CHASSIS_CLIENT_SECRET", ORDERS_SECRET.to_owned());
        set("CHASSIS_DOWNSTREAM_TICKETING_URL", list("ticketing"));
        set("CHASSIS_DOWNSTREAM_MAIL_URL", list("mail"));
        // Orders' own tokens are asked for each downstream's audience.
        set(
            "CHASSIS_DOWNSTREAM_TICKETING_AUDIENCE",
            "ticketing".to_owned(),
        );
        set("CHASSIS_DOWNSTREAM_MAIL_AUDIENCE", "mail".to_owned());
    }
    env
}

impl System {
    /// Starts every service with data under `data` and waits until each is
    /// ready.
    ///
    /// # Errors
    ///
    /// A process could not be started, or did not become ready in time.
    pub async fn start(data: &Path, ports: Ports) -> Result<Self, StartError> {
        Self::start_layout(&current_exe()?, data, ports.into(), &[]).await
    }

    /// [`start`](Self::start), running the services with the demo binary at
    /// `exe` (for tests, whose own binary is not the demo).
    ///
    /// # Errors
    ///
    /// A process could not be started, or did not become ready in time.
    pub async fn start_with(exe: &Path, data: &Path, ports: Ports) -> Result<Self, StartError> {
        Self::start_layout(exe, data, ports.into(), &[]).await
    }

    /// [`start_with`](Self::start_with), with `env` added to every
    /// service's environment (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
    ///
    /// # Errors
    ///
    /// A process could not be started, or did not become ready in time.
    pub async fn start_with_env(
        exe: &Path,
        data: &Path,
        ports: Ports,
        env: &[(&str, &str)],
    ) -> Result<Self, StartError> {
        Self::start_layout(exe, data, ports.into(), env).await
    }

    /// Starts every replica of every service as `layout` says, with the
    /// demo binary at `exe` ([`current_exe`] for the demo itself) and `env`
    /// added to every replica's environment, and waits until each is ready:
    /// services in [`SERVICES`] order, the replicas of each one after the
    /// other (the first creates or migrates the database).
    ///
    /// # Errors
    ///
    /// A process could not be started, or did not become ready in time.
    pub async fn start_layout(
        exe: &Path,
        data: &Path,
        layout: Layout,
        env: &[(&str, &str)],
    ) -> Result<Self, StartError> {
        let io = |what: &str, e: std::io::Error| StartError::Io(format!("{what}: {e}"));
        let logs = data.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| io("cannot create the data directory", e))?;
        write_grants(data).map_err(|e| io("cannot write auth's grants file", e))?;
        let first = |s: &str| layout.urls(s).into_iter().next().unwrap_or_default();
        let endpoints = Endpoints {
            auth: first("auth"),
            ticketing: first("ticketing"),
            orders: first("orders"),
            mail: first("mail"),
            replicas: SERVICES.iter().map(|s| (*s, layout.urls(s))).collect(),
            data: data.to_owned(),
        };
        let replicas = SERVICES
            .iter()
            .flat_map(|s| {
                layout
                    .ports(s)
                    .iter()
                    .enumerate()
                    .map(|(index, port)| Replica {
                        service: s,
                        index,
                        port: *port,
                        child: None,
                        ready: None,
                    })
            })
            .collect();
        let mut system = Self {
            replicas,
            layout,
            endpoints,
            exe: exe.to_owned(),
            extra: Vec::new(),
            common: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        for i in 0..system.replicas.len() {
            let (service, index) = (system.replicas[i].service, system.replicas[i].index);
            if let Err(e) = system.launch(service, index).await {
                system.stop().await;
                return Err(e);
            }
        }
        Ok(system)
    }

    /// The layout the system runs.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// What was added to `service`'s environment: every service's, then
    /// its own.
    fn extra_of(&self, service: &str) -> Vec<(String, String)> {
        let own = self
            .extra
            .iter()
            .filter(|(s, _, _)| *s == service)
            .map(|(_, k, v)| (k.clone(), v.clone()));
        self.common.iter().cloned().chain(own).collect()
    }

    fn position(&self, service: &str, index: usize) -> Result<usize, StartError> {
        self.replicas
            .iter()
            .position(|r| r.service == service && r.index == index)
            .ok_or_else(|| StartError::Io(format!("no replica {index} of {service}")))
    }

    fn child(&mut self, service: &str, index: usize) -> Option<&mut Child> {
        self.replicas
            .iter_mut()
            .find(|r| r.service == service && r.index == index)?
            .child
            .as_mut()
    }

    /// Starts replica `index` of `service` (killing what runs in its place)
    /// and waits until it is ready.
    async fn launch(&mut self, service: &str, index: usize) -> Result<(), StartError> {
        let i = self.position(service, index)?;
        if let Some(mut old) = self.replicas[i].child.take() {
            let _ = old.kill().await;
        }
        let service = self.replicas[i].service;
        let log = log_file(
            &self.endpoints.data,
            service,
            index,
            self.layout.replicas(service),
        );
        let mut env = env_of(service, index, &self.layout, &self.endpoints.data);
        env.extend(self.extra_of(service));
        let spawned = tokio::time::Instant::now();
        self.replicas[i].child = Some(spawn(&self.exe, service, &log, &env)?);
        let ready = wait_ready(&url(self.replicas[i].port), Duration::from_secs(60)).await;
        self.replicas[i].ready = Some(spawned.elapsed());
        ready.map_err(|secs| StartError::NotReady {
            service,
            secs,
            log: log.display().to_string(),
        })
    }

    /// Restarts every replica of `service` with `env` added to its
    /// environment (replacing what an earlier call added), e.g. a failure
    /// to inject.
    ///
    /// # Errors
    ///
    /// A replica could not be started or did not become ready.
    pub async fn restart_with(
        &mut self,
        service: &'static str,
        env: &[(&str, &str)],
    ) -> Result<(), StartError> {
        self.extra.retain(|(s, _, _)| *s != service);
        self.extra.extend(
            env.iter()
                .map(|(k, v)| (service, (*k).to_owned(), (*v).to_owned())),
        );
        for index in 0..self.layout.replicas(service) {
            self.launch(service, index).await?;
        }
        Ok(())
    }

    /// Sends SIGTERM to replica `index` of `service` and waits (at most
    /// 60 s) for it to exit.
    pub async fn terminate(
        &mut self,
        service: &str,
        index: usize,
    ) -> Option<std::process::ExitStatus> {
        let child = self.child(service, index)?;
        signal(child, rustix::process::Signal::TERM)?;
        tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .ok()?
            .ok()
    }

    /// Waits (at most 60 s) for replica `index` of `service` to exit by
    /// itself.
    pub async fn exited(
        &mut self,
        service: &str,
        index: usize,
    ) -> Option<std::process::ExitStatus> {
        let child = self.child(service, index)?;
        tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .ok()?
            .ok()
    }

    /// The process id of replica `index` of `service`, while it runs.
    pub fn pid(&self, service: &str, index: usize) -> Option<u32> {
        self.replicas
            .iter()
            .find(|r| r.service == service && r.index == index)?
            .child
            .as_ref()?
            .id()
    }

    /// How long replica `index` of `service` took from its spawn to its
    /// first ready answer, at its last start.
    pub fn ready_after(&self, service: &str, index: usize) -> Option<Duration> {
        self.replicas
            .iter()
            .find(|r| r.service == service && r.index == index)?
            .ready
    }

    /// How many replicas of `service` the system runs.
    pub fn replicas(&self, service: &str) -> usize {
        self.layout.replicas(service)
    }

    /// Kills replica `index` of `service` with SIGKILL, as a crash would,
    /// and waits for it.
    pub async fn kill(&mut self, service: &str, index: usize) {
        if let Some(child) = self.child(service, index) {
            let _ = child.kill().await;
        }
    }

    /// Starts replica `index` of `service` again, on its port and data (a
    /// running one is killed first), and waits until it is ready.
    ///
    /// # Errors
    ///
    /// It could not be started or did not become ready.
    pub async fn restart(&mut self, service: &str, index: usize) -> Result<(), StartError> {
        self.launch(service, index).await
    }

    /// The URLs.
    pub fn endpoints(&self) -> Endpoints {
        self.endpoints.clone()
    }

    /// Sends SIGTERM to every replica (the last started first) and waits for
    /// each to exit, killing what is still running after 20 s.
    pub async fn stop(&mut self) {
        for r in self.replicas.iter_mut().rev() {
            if let Some(child) = r.child.as_mut() {
                signal(child, rustix::process::Signal::TERM);
            }
        }
        for r in &mut self.replicas {
            let Some(mut child) = r.child.take() else {
                continue;
            };
            let name = if self.layout.replicas(r.service) > 1 {
                format!("{} replica {}", r.service, r.index)
            } else {
                r.service.to_owned()
            };
            match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => eprintln!("demo: {name} exited with {status}"),
                Ok(Err(e)) => eprintln!("demo: cannot wait for {name}: {e}"),
                Err(_) => {
                    eprintln!("demo: {name} did not stop in time; killing it");
                    let _ = child.kill().await;
                }
            }
        }
    }
}

/// The demo binary running now (its children are this binary, started
/// with `--serve <name>`).
///
/// # Errors
///
/// The running binary cannot be found.
pub fn current_exe() -> Result<PathBuf, StartError> {
    std::env::current_exe().map_err(|e| StartError::Io(format!("cannot find the demo binary: {e}")))
}

/// Sends `sig` to `child`; `None` when it has exited or cannot be signalled.
fn signal(child: &Child, sig: rustix::process::Signal) -> Option<()> {
    let pid = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(i32::try_from(id).ok()?))?;
    rustix::process::kill_process(pid, sig).ok()
}

/// Starts `service` as a child process with `env`, logging to `log`.
fn spawn(
    exe: &Path,
    service: &str,
    log: &Path,
    env: &[(String, String)],
) -> Result<Child, StartError> {
    let io = |what: &str, e: std::io::Error| StartError::Io(format!("{what}: {e}"));
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| io("cannot open a log file", e))?;
    let err = out
        .try_clone()
        .map_err(|e| io("cannot open a log file", e))?;
    Command::new(exe)
        .args(["--serve", service])
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| io(&format!("cannot start {service}"), e))
}

/// Polls `<base>/health/ready` until it answers 200; `Err` with the seconds
/// waited otherwise.
async fn wait_ready(base: &str, limit: Duration) -> Result<(), u64> {
    let probe = Downstream::builder("readiness", base)
        .max_attempts(1)
        .attempt_timeout(Duration::from_secs(2))
        .build()
        .map_err(|_| 0u64)?;
    // Refused connections are expected while the service starts.
    probe.breaker().disable(true);
    let cx = CallContext::background();
    let start = tokio::time::Instant::now();
    loop {
        if probe
            .anonymous(&cx)
            .get("/health/ready")
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
