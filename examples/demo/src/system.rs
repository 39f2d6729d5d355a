//! Starting and stopping the four services as processes.

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

/// Where each service listens.
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
        // Held together so that the four differ.
        let l: Vec<TcpListener> = (0..4)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let p = |i: usize| l[i].local_addr().map(|a| a.port());
        Ok(Self {
            auth: p(0)?,
            ticketing: p(1)?,
            orders: p(2)?,
            mail: p(3)?,
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

/// The base URL of each service, and the data directory.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// auth.
    pub auth: String,
    /// ticketing.
    pub ticketing: String,
    /// orders.
    pub orders: String,
    /// mail.
    pub mail: String,
    /// The data directory (mail's sent messages are under `mail/outbox`).
    pub data: PathBuf,
}

impl Endpoints {
    /// The issuer of the demo's tokens.
    pub fn issuer(&self) -> String {
        format!("{}/auth/v1", self.auth)
    }
}

/// The running services.
#[derive(Debug)]
pub struct System {
    children: Vec<(&'static str, Child)>,
    endpoints: Endpoints,
    ports: Ports,
    exe: PathBuf,
    /// How long each service took from its spawn to ready, at start.
    ready: Vec<(&'static str, Duration)>,
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

/// The environment of one service's process.
fn env_of(service: &str, ports: Ports, data: &Path) -> Vec<(String, String)> {
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let auth = url(ports.auth);
    let mut env = vec![
        (
            "CHASSIS_BIND".to_owned(),
            format!("127.0.0.1:{}", ports.of(service)),
        ),
        ("CHASSIS_SHUTDOWN_GRACE_SECS".to_owned(), "10".to_owned()),
        (
            format!("{}_DATA_DIR", service.to_ascii_uppercase()),
            data.join(service).display().to_string(),
        ),
    ];
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
        set("CHASSIS_DOWNSTREAM_MAIL_URL", url(ports.mail));
        set("CHASSIS_DOWNSTREAM_MAIL_AUDIENCE", "mail".to_owned());
    }
    if service == "mail" {
        // A message whose worker died is sent again after this long.
        set("MAIL_LEASE_SECS", "10".to_owned());
    }
    if service == "orders" {
        set("CHASSIS_CLIENT_TOKEN_URL", format!("{auth}/auth/v1/token"));
        set("CHASSIS_CLIENT_ID", "orders".to_owned());
        set("CHASSIS_CLIENT_SECRET", ORDERS_SECRET.to_owned());
        set("CHASSIS_DOWNSTREAM_TICKETING_URL", url(ports.ticketing));
        set("CHASSIS_DOWNSTREAM_MAIL_URL", url(ports.mail));
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
        let exe = std::env::current_exe()
            .map_err(|e| StartError::Io(format!("cannot find the demo binary: {e}")))?;
        Self::start_with(&exe, data, ports).await
    }

    /// [`start`](Self::start), running the services with the demo binary at
    /// `exe` (for tests, whose own binary is not the demo).
    ///
    /// # Errors
    ///
    /// A process could not be started, or did not become ready in time.
    pub async fn start_with(exe: &Path, data: &Path, ports: Ports) -> Result<Self, StartError> {
        Self::start_with_env(exe, data, ports, &[]).await
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
        let io = |what: &str, e: std::io::Error| StartError::Io(format!("{what}: {e}"));
        let logs = data.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| io("cannot create the data directory", e))?;
        write_grants(data).map_err(|e| io("cannot write auth's grants file", e))?;
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        let endpoints = Endpoints {
            auth: url(ports.auth),
            ticketing: url(ports.ticketing),
            orders: url(ports.orders),
            mail: url(ports.mail),
            data: data.to_owned(),
        };
        let mut system = Self {
            children: Vec::new(),
            endpoints,
            ports,
            exe: exe.to_owned(),
            ready: Vec::new(),
            extra: Vec::new(),
            common: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        for service in SERVICES {
            let spawned = tokio::time::Instant::now();
            let child = spawn(&system.exe, service, ports, data, &system.extra_of(service))?;
            system.children.push((service, child));
            let ready = wait_ready(&system.url_of(service), Duration::from_secs(60)).await;
            system.ready.push((service, spawned.elapsed()));
            if let Err(secs) = ready {
                system.stop().await;
                return Err(StartError::NotReady {
                    service,
                    secs,
                    log: logs.join(format!("{service}.log")).display().to_string(),
                });
            }
        }
        Ok(system)
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

    /// Restarts `service` with `env` added to its environment (replacing
    /// what an earlier call added), e.g. a failure to inject.
    ///
    /// # Errors
    ///
    /// It could not be started or did not become ready.
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
        self.restart(service).await
    }

    /// Sends SIGTERM to `service` and waits (at most 60 s) for it to exit.
    pub async fn terminate(&mut self, service: &str) -> Option<std::process::ExitStatus> {
        let (_, child) = self.children.iter_mut().find(|(n, _)| *n == service)?;
        let pid = child
            .id()
            .and_then(|id| rustix::process::Pid::from_raw(id as i32))?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).ok()?;
        tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .ok()?
            .ok()
    }

    /// Waits (at most 60 s) for `service` to exit by itself.
    pub async fn exited(&mut self, service: &str) -> Option<std::process::ExitStatus> {
        let (_, child) = self.children.iter_mut().find(|(n, _)| *n == service)?;
        tokio::time::timeout(Duration::from_secs(60), child.wait())
            .await
            .ok()?
            .ok()
    }

    /// The process id of `service`.
    pub fn pid(&self, service: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| *n == service)
            .and_then(|(_, c)| c.id())
    }

    /// How long `service` took from its spawn to its first ready answer.
    pub fn ready_after(&self, service: &str) -> Option<Duration> {
        self.ready
            .iter()
            .find(|(n, _)| *n == service)
            .map(|(_, d)| *d)
    }

    /// Kills `service` with SIGKILL, as a crash would, and waits for it.
    pub async fn kill(&mut self, service: &str) {
        if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| *n == service) {
            let _ = child.kill().await;
        }
    }

    /// Starts `service` again, on its port and data, and waits until it is
    /// ready.
    ///
    /// # Errors
    ///
    /// It could not be started or did not become ready.
    pub async fn restart(&mut self, service: &'static str) -> Result<(), StartError> {
        let i = self
            .children
            .iter()
            .position(|(n, _)| *n == service)
            .ok_or_else(|| StartError::Io(format!("no service {service}")))?;
        let _ = self.children[i].1.kill().await;
        let extra = self.extra_of(service);
        let child = spawn(&self.exe, service, self.ports, &self.endpoints.data, &extra)?;
        self.children[i].1 = child;
        wait_ready(&self.url_of(service), Duration::from_secs(60))
            .await
            .map_err(|secs| StartError::NotReady {
                service,
                secs,
                log: self
                    .endpoints
                    .data
                    .join("logs")
                    .join(format!("{service}.log"))
                    .display()
                    .to_string(),
            })
    }

    fn url_of(&self, service: &str) -> String {
        format!("http://127.0.0.1:{}", self.ports.of(service))
    }

    /// The URLs.
    pub fn endpoints(&self) -> Endpoints {
        self.endpoints.clone()
    }

    /// Sends SIGTERM to every service (the last started first) and waits for
    /// each to exit, killing what is still running after 20 s.
    pub async fn stop(&mut self) {
        for (_, child) in self.children.iter().rev() {
            if let Some(pid) = child
                .id()
                .and_then(|id| rustix::process::Pid::from_raw(id as i32))
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        for (name, child) in &mut self.children {
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
        self.children.clear();
    }
}

/// Starts `service` as a child process logging to `<data>/logs/<service>.log`.
fn spawn(
    exe: &Path,
    service: &'static str,
    ports: Ports,
    data: &Path,
    extra: &[(String, String)],
) -> Result<Child, StartError> {
    let io = |what: &str, e: std::io::Error| StartError::Io(format!("{what}: {e}"));
    let log_path = data.join("logs").join(format!("{service}.log"));
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| io("cannot open a log file", e))?;
    let err = log
        .try_clone()
        .map_err(|e| io("cannot open a log file", e))?;
    Command::new(exe)
        .args(["--serve", service])
        .envs(env_of(service, ports, data))
        .envs(extra.iter().cloned())
        .stdin(Stdio::null())
        .stdout(log)
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
