//! A service's binary under test, and the checks every service's binary
//! must pass.

use std::{
    ffi::OsStr,
    io::BufRead as _,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, SystemTime},
};

use serde_json::Value;

use super::{
    TempDir,
    support::{plain_downstream, until_ready},
};
use crate::{
    client::{CallContext, ClientError, Downstream},
    correlation::CorrelationId,
};

/// How long [`ServiceProcess::ready`] waits for `/health/ready`.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

/// A service binary started for a test, as operators run it: its own
/// process, `CHASSIS_BIND=127.0.0.1:0` (a free loopback port), JSON logs on
/// stdout. Its address is read from its `listening` log line, and every
/// stdout line is kept for the test to inspect after it exits. Dropping it
/// kills the process.
///
/// [`stop`](Self::stop) sends SIGTERM, as an orchestrator does, and fails
/// the test unless the process exits with status 0 in time. SIGTERM exists
/// on Unix only: elsewhere the process is killed instead and only its exit
/// is awaited (its status is not checked).
///
/// ```no_run
/// use std::time::Duration;
/// use chassis::testing::ServiceProcess;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // In an integration test: `env!("CARGO_BIN_EXE_<name>")`.
/// let service = ServiceProcess::builder("target/debug/lessons")
///     .env("CHASSIS_SHUTDOWN_GRACE_SECS", "5")
///     .data_dir("LESSONS_DATA_DIR")
///     .spawn();
/// service.ready().await;
/// assert!(service.data_dir().unwrap().join("lessons.db").exists());
/// // SIGTERM, then exit 0 within 60 s, or the test fails with its log.
/// let lines = service.stop_json(Duration::from_secs(60)).await;
/// assert!(lines.iter().any(|l| l["message"] == "stopped"));
/// # }
/// ```
#[derive(Debug)]
pub struct ServiceProcess {
    child: Child,
    addr: String,
    lines: Option<std::thread::JoinHandle<Vec<String>>>,
    data_dir: Option<TempDir>,
}

/// Builds a [`ServiceProcess`]: its environment and its data directory.
#[derive(Debug)]
pub struct ServiceProcessBuilder {
    binary: std::ffi::OsString,
    env: Vec<(String, String)>,
    data_dir: Option<TempDir>,
}

// === impl ServiceProcessBuilder ===

impl ServiceProcessBuilder {
    /// Sets `name=value` in its environment (added after the defaults, so
    /// it may override `CHASSIS_BIND` and `CHASSIS_LOG`).
    #[must_use]
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets every pair of `env`.
    #[must_use]
    pub fn envs(mut self, env: &[(&str, &str)]) -> Self {
        for (k, v) in env {
            self = self.env(k, v);
        }
        self
    }

    /// A fresh [`TempDir`] as its data directory, passed in `variable`
    /// (e.g. `LESSONS_DATA_DIR`); removed when the process is dropped or
    /// stopped.
    ///
    /// # Panics
    ///
    /// If the directory cannot be made.
    #[must_use]
    pub fn data_dir(mut self, variable: &str) -> Self {
        let name = Path::new(&self.binary)
            .file_stem()
            .map_or_else(|| "service".into(), |s| s.to_string_lossy().into_owned());
        let dir = TempDir::new(&name);
        self.env
            .push((variable.to_owned(), dir.path().display().to_string()));
        self.data_dir = Some(dir);
        self
    }

    /// Starts it, and waits up to two minutes for its `listening` line.
    ///
    /// # Panics
    ///
    /// If it cannot be started or never says where it listens (a test
    /// helper: the panic is the test's failure).
    pub fn spawn(self) -> ServiceProcess {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut process = ServiceProcess::spawn(&self.binary, &env);
        process.data_dir = self.data_dir;
        process
    }
}

// === impl ServiceProcess ===

impl ServiceProcess {
    /// A process of `binary` to configure, then [`spawn`](ServiceProcessBuilder::spawn).
    pub fn builder(binary: impl AsRef<OsStr>) -> ServiceProcessBuilder {
        ServiceProcessBuilder {
            binary: binary.as_ref().to_owned(),
            env: Vec::new(),
            data_dir: None,
        }
    }

    /// Starts `binary` with `CHASSIS_BIND=127.0.0.1:0`, `CHASSIS_LOG=info`
    /// and `env` (which may override them), and waits up to two minutes for
    /// its `listening` line.
    ///
    /// # Panics
    ///
    /// If it cannot be started or never says where it listens (a test
    /// helper: the panic is the test's failure).
    pub fn spawn(binary: impl AsRef<OsStr>, env: &[(&str, &str)]) -> Self {
        let binary = binary.as_ref();
        let mut child = Command::new(binary)
            .env("CHASSIS_BIND", "127.0.0.1:0")
            .env("CHASSIS_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.to_string_lossy()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "listening"
                {
                    let _ = tx.send(v["address"].as_str().unwrap_or_default().to_owned());
                }
                lines.push(line);
            }
            lines
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                panic!("{} never logged where it listens", binary.to_string_lossy())
            });
        Self {
            child,
            addr,
            lines: Some(lines),
            data_dir: None,
        }
    }

    /// `host:port` it listens on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `http://host:port` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its data directory, when the builder made one.
    pub fn data_dir(&self) -> Option<&Path> {
        self.data_dir.as_ref().map(TempDir::path)
    }

    /// A [`Downstream`] named `process` to its address: one attempt per
    /// call, 30 s each, the breaker disabled, so that a test sees every
    /// answer as it is.
    ///
    /// # Panics
    ///
    /// Never for an address the process logged.
    pub fn downstream(&self) -> Downstream {
        plain_downstream("process", &self.url(""))
    }

    /// Waits until `GET /health/ready` answers 200, for at most
    /// [`READY_WITHIN`].
    ///
    /// # Panics
    ///
    /// If it is not ready in time.
    pub async fn ready(&self) {
        until_ready(&self.downstream(), READY_WITHIN).await;
    }

    /// Sends SIGTERM, as an orchestrator does to stop a service; on other
    /// platforms than Unix, kills it.
    ///
    /// # Panics
    ///
    /// If the signal cannot be sent.
    pub fn terminate(&mut self) {
        #[cfg(unix)]
        {
            let sent = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status()
                .is_ok_and(|s| s.success());
            assert!(sent, "cannot send SIGTERM to {}", self.child.id());
        }
        #[cfg(not(unix))]
        {
            let _ = self.child.kill();
        }
    }

    /// Waits at most `limit` for it to exit; `None` if it is still running.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        // Real time, on a thread of its own: the process does not see a
        // paused test clock.
        let start = SystemTime::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if start.elapsed().unwrap_or_default() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it as an orchestrator does (SIGTERM) and returns every line it
    /// wrote, once it has exited. Blocks the thread: from async code, use
    /// [`stop_json`](Self::stop_json) or `spawn_blocking`.
    ///
    /// # Panics
    ///
    /// Unless it exits with status 0 within `limit` (on Unix; elsewhere,
    /// unless it exits); the message holds its log.
    pub fn stop(mut self, limit: Duration) -> Vec<String> {
        self.terminate();
        let status = self.wait(limit);
        let clean = if cfg!(unix) {
            status.and_then(|s| s.code()) == Some(0)
        } else {
            status.is_some()
        };
        if !clean {
            // Still running, perhaps: end it, which ends its output too.
            let _ = self.child.kill();
            let _ = self.child.wait();
            let lines = self.lines();
            panic!(
                "expected exit 0 within {limit:?} of SIGTERM, got {status:?}; its log:\n{}",
                lines.join("\n")
            );
        }
        self.lines()
    }

    /// [`stop`](Self::stop) off the async runtime's threads, every line
    /// parsed as the JSON object it must be.
    ///
    /// # Panics
    ///
    /// As [`stop`](Self::stop) does, and if a line is not JSON.
    pub async fn stop_json(self, limit: Duration) -> Vec<Value> {
        let lines = tokio::task::spawn_blocking(move || self.stop(limit))
            .await
            .expect("stopping does not panic");
        parse_lines(&lines)
    }

    /// Every stdout line, once it has exited (wait for that first).
    ///
    /// # Panics
    ///
    /// If the lines were already taken.
    pub fn lines(&mut self) -> Vec<String> {
        self.lines
            .take()
            .expect("lines are taken once")
            .join()
            .unwrap_or_default()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Each line parsed as JSON.
///
/// # Panics
///
/// On a line that is not JSON, naming it.
pub fn parse_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {l}"))
        })
        .collect()
}

/// Runs `command`, a service's binary given bad settings, and checks what
/// every service does with them: it exits 78 ([`EXIT_CONFIG`]) without
/// writing to stdout, and its one message on stderr lists exactly
/// `problems.len()` problems, each of `problems` (a variable's name, or
/// text of its message) appearing in it. Returns stderr, for the service's
/// own checks (no secret in it, nothing created on disk, ...).
///
/// ```no_run
/// # fn test() {
/// let stderr = chassis::testing::refused_settings(
///     std::process::Command::new("target/debug/lessons")
///         .env("CHASSIS_BIND", "not-an-address")
///         .env("LESSONS_DB_POOL_SIZE", "many"),
///     &["CHASSIS_BIND", "CHASSIS_AUTH_ISSUER", "LESSONS_DB_POOL_SIZE"],
/// );
/// assert!(!stderr.contains("hunter2"));
/// # }
/// ```
///
/// # Panics
///
/// When the binary cannot be run, or a check fails (the panic names it).
///
/// [`EXIT_CONFIG`]: crate::config::EXIT_CONFIG
pub fn refused_settings(command: &mut Command, problems: &[&str]) -> String {
    let out = command.output().expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(i32::from(crate::config::EXIT_CONFIG)),
        "bad settings exit 78: {stderr}"
    );
    let n = problems.len();
    let head = format!(
        "invalid configuration ({n} problem{}):",
        if n == 1 { "" } else { "s" }
    );
    assert!(stderr.starts_with(&head), "{head} expected: {stderr}");
    for problem in problems {
        assert!(stderr.contains(problem), "{problem} missing: {stderr}");
    }
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// What every service's binary must do, checked on a running
/// [`ServiceProcess`]: the process test that is the same for every
/// service, in one call.
///
/// [`serving`](Self::serving) checks, while it runs:
///
/// * `/health/ready` turns 200 (within [`READY_WITHIN`]) and reports `up`;
///   `/health/live` is 200;
/// * `/info` names the service and its package;
/// * a protected route called without a token is a 401 problem+json with
///   `reason: missing_token` and the caller's correlation id;
/// * `/metrics` then counts that call under its route template.
///
/// [`stopped`](Self::stopped) stops it with SIGTERM (exit 0) and checks its
/// log: every line is JSON, `listening` comes before `stopped`, and the
/// refused call left one access line and one audit event
/// (`unauthenticated`, `missing_token`, not reaching authorization), both
/// with the caller's correlation id. It returns the lines for the
/// service's own checks.
///
/// ```no_run
/// use chassis::testing::{ProcessCheck, ServiceProcess};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let check = ProcessCheck::new("lessons")
///     .protected("/lessons/v1/acme/lessons", "/lessons/v1/{account}/lessons");
/// let service = ServiceProcess::builder("target/debug/lessons").data_dir("LESSONS_DATA_DIR").spawn();
/// let log = check.run(service).await;
/// assert!(log.iter().any(|l| l["message"] == "database migrated"));
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ProcessCheck {
    service: String,
    package: String,
    protected: Option<(String, String)>,
    correlation_id: String,
    limit: Duration,
}

// === impl ProcessCheck ===

impl ProcessCheck {
    /// The checks for `service` (its name in `/info` and in every log
    /// line), whose package has the same name.
    pub fn new(service: &str) -> Self {
        Self {
            service: service.to_owned(),
            package: service.to_owned(),
            protected: None,
            correlation_id: format!("process-check-{service}"),
            limit: Duration::from_secs(60),
        }
    }

    /// The package name `/info` reports, when it is not the service's.
    #[must_use]
    pub fn package(mut self, package: &str) -> Self {
        package.clone_into(&mut self.package);
        self
    }

    /// A `GET` of `path` that needs a token, whose route template is
    /// `route` (e.g. `/lessons/v1/acme/lessons` and
    /// `/lessons/v1/{account}/lessons`). Without one, the refusal and its
    /// log lines are not checked.
    #[must_use]
    pub fn protected(mut self, path: &str, route: &str) -> Self {
        self.protected = Some((path.to_owned(), route.to_owned()));
        self
    }

    /// How long it may take to exit after SIGTERM (60 s unless set).
    #[must_use]
    pub fn stop_within(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// The correlation id of the refused call.
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }

    /// [`serving`](Self::serving), then [`stopped`](Self::stopped).
    ///
    /// # Panics
    ///
    /// When a check fails.
    pub async fn run(&self, process: ServiceProcess) -> Vec<Value> {
        self.serving(&process).await;
        self.stopped(process).await
    }

    /// The checks on the running process; see the [type docs](Self).
    ///
    /// # Panics
    ///
    /// When a check fails.
    pub async fn serving(&self, process: &ServiceProcess) {
        process.ready().await;
        let downstream = process.downstream();
        let cx = CallContext::background();
        let calls = downstream.anonymous(&cx);

        let ready: Value = calls
            .get("/health/ready")
            .send()
            .await
            .and_then(|r| r.json())
            .expect("/health/ready answers JSON");
        assert_eq!(ready["status"], "up", "/health/ready: {ready}");
        calls
            .get("/health/live")
            .send()
            .await
            .expect("/health/live answers 200");
        let info: Value = calls
            .get("/info")
            .send()
            .await
            .and_then(|r| r.json())
            .expect("/info answers JSON");
        assert_eq!(info["service"], self.service.as_str(), "/info: {info}");
        assert_eq!(
            info["build"]["package"],
            self.package.as_str(),
            "/info: {info}"
        );

        if let Some((path, route)) = &self.protected {
            let id = CorrelationId::parse(&self.correlation_id).expect("a valid correlation id");
            let cx = CallContext::continuing(id);
            let result = downstream.anonymous(&cx).get(path).send().await;
            let Err(ClientError::Status {
                status,
                problem: Some(problem),
                ..
            }) = &result
            else {
                panic!("GET {path} without a token: expected a 401 problem, got {result:?}");
            };
            assert_eq!(status.as_u16(), 401, "GET {path}: {problem:?}");
            assert_eq!(
                problem.members.get("reason").and_then(Value::as_str),
                Some("missing_token"),
                "{problem:?}"
            );
            assert_eq!(
                problem.correlation_id.as_deref(),
                Some(self.correlation_id.as_str()),
                "{problem:?}"
            );

            let metrics = calls
                .get("/metrics")
                .send()
                .await
                .expect("/metrics answers 200");
            let text = String::from_utf8_lossy(metrics.body());
            let counted = text.lines().any(|l| {
                l.starts_with("http_server_request_duration_seconds_count{")
                    && l.contains(&format!("http_route=\"{route}\""))
                    && l.contains("http_response_status_code=\"401\"")
                    && l.contains(&format!("service=\"{}\"", self.service))
            });
            assert!(counted, "the refused call is not in /metrics:\n{text}");
        } else {
            calls
                .get("/metrics")
                .send()
                .await
                .expect("/metrics answers 200");
        }
    }

    /// Stops the process (SIGTERM, exit 0) and checks its log; see the
    /// [type docs](Self). Returns every line, parsed.
    ///
    /// # Panics
    ///
    /// When a check fails.
    pub async fn stopped(&self, process: ServiceProcess) -> Vec<Value> {
        let json = process.stop_json(self.limit).await;
        let dump = || {
            json.iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        };
        let position = |message: &str| {
            json.iter()
                .position(|l| l["message"] == message && l["service"] == self.service.as_str())
                .unwrap_or_else(|| panic!("no {message:?} line of {}:\n{}", self.service, dump()))
        };
        assert!(position("listening") < position("stopped"), "{}", dump());

        if let Some((_, route)) = &self.protected {
            let of_call = |target: &str| -> Vec<&Value> {
                json.iter()
                    .filter(|l| {
                        l["target"] == target && l["correlation_id"] == self.correlation_id.as_str()
                    })
                    .collect()
            };
            let access = of_call("chassis::access");
            assert_eq!(
                access.len(),
                1,
                "one access line for the refused call:\n{}",
                dump()
            );
            let access = access[0];
            assert_eq!(access["route"], route.as_str(), "{access}");
            assert_eq!(access["status"], 401, "{access}");
            assert_eq!(access["service"], self.service.as_str(), "{access}");

            let audit = of_call("audit");
            assert_eq!(
                audit.len(),
                1,
                "one audit event for the refused call:\n{}",
                dump()
            );
            let audit = audit[0];
            assert_eq!(audit["level"], "INFO", "{audit}");
            assert_eq!(audit["message"], "audit", "{audit}");
            assert_eq!(audit["service"], self.service.as_str(), "{audit}");
            assert_eq!(audit["route"], route.as_str(), "{audit}");
            assert_eq!(audit["decision"], "unauthenticated", "{audit}");
            assert_eq!(audit["reason"], "missing_token", "{audit}");
            assert_eq!(audit["method"], "GET", "{audit}");
            assert_eq!(audit["status"], 401, "{audit}");
            assert_eq!(audit["mutation"], false, "{audit}");
            assert!(audit["latency_ms"].as_f64().is_some(), "{audit}");
            assert!(
                audit["time"].as_str().is_some_and(|t| t.ends_with('Z')),
                "{audit}"
            );
            assert!(
                audit.get("account").is_none(),
                "not reached authorization: {audit}"
            );
        }
        json
    }
}
