//! Liveness, readiness and health checks.
//!
//! # The standard
//!
//! * `GET /health/live` answers 200 for as long as the process serves
//!   requests. It checks **no** dependency: a database outage must not make
//!   the orchestrator restart every instance at once.
//! * `GET /health/ready` answers whether this instance should get traffic:
//!   200 when every *critical* check is up, 503 otherwise, and 503 from the
//!   moment shutdown starts. Anyone may ask, so the body shows each check's
//!   name and state and nothing else:
//!   `{"status":"up"|"down","checks":{"<name>":{"status":"up"|"down"}}}`.
//!   Error texts (database paths, driver errors, URLs) never reach it.
//! * Checks run **in the background**, each on its own schedule and with its
//!   own timeout (default 1 s). A probe only reads their last state, so a
//!   burst of probes can never hammer a database, and a check that hangs is
//!   cut off at its timeout and counted as a failure.
//! * Checks have **hysteresis**, as Dropwizard's health module does: once up,
//!   a check turns down only after `failure_threshold` consecutive failures
//!   (default 3), and once down it turns up only after `success_threshold`
//!   consecutive successes (default 2), so one slow answer does not flap
//!   readiness. Until its first success a check is down: readiness stays 503
//!   until every critical check has passed once.
//! * A non-critical check (a cache, an optional downstream) is reported but
//!   does not fail readiness.
//! * Error texts are for operators. They go to the **log**: a `WARN` line
//!   `health check down` with the check's name and its error when a check
//!   turns down (or fails its first run), an `INFO` line `health check up`
//!   when it recovers. An operator may also read them over HTTP, on the
//!   detail view `GET /health/ready?detail`, which the service builder
//!   serves only to a bearer token holding the permission
//!   `<service>::view:health` (401 without a valid token, 403 without the
//!   permission) and which adds each check's `critical`, `duration_ms` and
//!   `error`. Still keep secrets out of error texts (they are cut to 200
//!   characters). Check *names* are shown to anyone: make them plain words
//!   (`database`, `ticketing`), not connection strings.
//!
//! # How the chassis does it
//!
//! Implement [`Check`] (or use [`check_fn`], [`HttpCheck`], [`TcpCheck`]) and
//! register it on the service builder or a [`Health`]; the service starts the
//! check loops and stops them on shutdown.
//!
//! [`ready`] is the public view and [`detailed`] the operators' one; mount
//! [`detailed`] only behind authorization (the service builder does, see
//! [`crate::service`]). The readiness report is the chassis' own body, so the
//! service builder lets its 503 through the rule of [`crate::problem`] that
//! withholds 5xx bodies; a stack composed by hand with
//! [`EnsureProblemLayer`](crate::problem::EnsureProblemLayer) answers a
//! not-ready probe with the generic 503 problem instead (the status, which
//! is what probes read, is the same).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use chassis::health::{check_fn, CheckOptions, Health};
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let health = Health::new();
//! health.register("database", check_fn(|| async { Ok(()) }), CheckOptions::default());
//! health.register(
//!     "cache",
//!     check_fn(|| async { Err("connection refused".into()) }),
//!     CheckOptions::default().non_critical(),
//! );
//! assert!(!health.is_ready(), "nothing has passed yet");
//!
//! let stop = CancellationToken::new();
//! let tasks = health.spawn(&stop);
//! tokio::time::sleep(Duration::from_millis(10)).await;
//! let report = health.report();
//! assert!(report.is_up());
//! assert_eq!(report.checks["cache"].status, chassis::health::Status::Down);
//!
//! health.set_shutting_down();
//! assert!(!health.is_ready());
//! stop.cancel();
//! for t in tasks { t.await.unwrap(); }
//! # }
//! ```

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

/// Longest error text kept from a check.
const MAX_ERROR_LEN: usize = 200;

/// Why a check failed: a short text for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckError(String);

impl CheckError {
    /// A failure described by `message`.
    pub fn new(message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_LEN {
            let mut end = MAX_ERROR_LEN;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Self(message)
    }

    /// The text.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CheckError {}

impl From<&str> for CheckError {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl From<String> for CheckError {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

/// A health check: one probe of one dependency.
pub trait Check: Send + Sync + 'static {
    /// Probes the dependency once. The caller applies the timeout.
    fn check(&self) -> impl Future<Output = Result<(), CheckError>> + Send;
}

/// Object-safe form of [`Check`].
trait DynCheck: Send + Sync + 'static {
    fn check_boxed(&self) -> Pin<Box<dyn Future<Output = Result<(), CheckError>> + Send + '_>>;
}

impl<C: Check> DynCheck for C {
    fn check_boxed(&self) -> Pin<Box<dyn Future<Output = Result<(), CheckError>> + Send + '_>> {
        Box::pin(self.check())
    }
}

/// A check from an async closure; see [`check_fn`].
pub struct FnCheck<F>(F);

impl<F> fmt::Debug for FnCheck<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnCheck")
    }
}

/// A check that calls `f` each time.
pub fn check_fn<F, Fut>(f: F) -> FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), CheckError>> + Send,
{
    FnCheck(f)
}

impl<F, Fut> Check for FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), CheckError>> + Send,
{
    fn check(&self) -> impl Future<Output = Result<(), CheckError>> + Send {
        (self.0)()
    }
}

/// Checks that a TCP connection to an address can be opened.
#[derive(Debug, Clone)]
pub struct TcpCheck {
    addr: SocketAddr,
}

impl TcpCheck {
    /// Connects to `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }
}

impl Check for TcpCheck {
    async fn check(&self) -> Result<(), CheckError> {
        tokio::net::TcpStream::connect(self.addr)
            .await
            .map(drop)
            .map_err(|e| CheckError::new(format!("cannot connect to {}: {}", self.addr, e.kind())))
    }
}

/// Checks that an HTTP GET answers 2xx: typically a downstream's
/// `/health/live`. Plain HTTP only; the body is ignored.
#[derive(Clone)]
pub struct HttpCheck {
    uri: http::Uri,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
}

impl fmt::Debug for HttpCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCheck").field("uri", &self.uri).finish()
    }
}

impl HttpCheck {
    /// GETs `url`, e.g. `http://127.0.0.1:8081/health/live`.
    ///
    /// # Errors
    ///
    /// If `url` is not an absolute `http://` URL.
    pub fn get(url: &str) -> Result<Self, CheckError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| CheckError::new("not a valid URL"))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(CheckError::new("expected an absolute http:// URL"));
        }
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Ok(Self { uri, client })
    }
}

impl Check for HttpCheck {
    async fn check(&self) -> Result<(), CheckError> {
        let req = http::Request::get(self.uri.clone())
            .body(http_body_util::Empty::new())
            .map_err(|_| CheckError::new("cannot build request"))?;
        let res = self
            .client
            .request(req)
            .await
            .map_err(|_| CheckError::new(format!("GET {} failed to connect", self.uri)))?;
        if res.status().is_success() {
            Ok(())
        } else {
            Err(CheckError::new(format!(
                "GET {} answered {}",
                self.uri,
                res.status().as_u16()
            )))
        }
    }
}

/// How a check is scheduled and judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// Time between the end of one run and the start of the next (default 5 s).
    pub interval: Duration,
    /// Longest a run may take before it counts as failed (default 1 s).
    pub timeout: Duration,
    /// Consecutive failures that turn an up check down (default 3).
    pub failure_threshold: u32,
    /// Consecutive successes that turn a down check up again (default 2).
    pub success_threshold: u32,
    /// Whether readiness depends on the check (default true).
    pub critical: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            failure_threshold: 3,
            success_threshold: 2,
            critical: true,
        }
    }
}

impl CheckOptions {
    /// Reported, but readiness does not depend on it.
    #[must_use]
    pub fn non_critical(mut self) -> Self {
        self.critical = false;
        self
    }

    /// Sets the interval.
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Sets the timeout.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the failure and success thresholds (each at least 1).
    #[must_use]
    pub fn thresholds(mut self, failures: u32, successes: u32) -> Self {
        self.failure_threshold = failures.max(1);
        self.success_threshold = successes.max(1);
        self
    }
}

/// The state of a check or of the whole service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Healthy.
    Up,
    /// Unhealthy, or not checked yet.
    Down,
}

/// The last known state of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Up or down, after hysteresis.
    pub status: Status,
    /// Whether readiness depends on it.
    pub critical: bool,
    /// How long the last run took, in milliseconds.
    pub duration_ms: Option<u64>,
    /// The error of the last failed run, while the check is failing.
    pub error: Option<String>,
}

/// What `/health/ready` shows to anyone: each check's name and state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Up when not shutting down and every critical check is up.
    pub status: Status,
    /// Each check's state by name.
    pub checks: BTreeMap<String, CheckSummary>,
}

/// The state of one check, as `/health/ready` shows it to anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CheckSummary {
    /// Up or down, after hysteresis.
    pub status: Status,
}

/// The readiness answer, with every check's error: for operators and the
/// process itself; `/health/ready` shows its [`summary`](Report::summary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Up when not shutting down and every critical check is up.
    pub status: Status,
    /// Each check by name.
    pub checks: BTreeMap<String, CheckReport>,
}

impl Report {
    /// Whether the service is ready.
    pub fn is_up(&self) -> bool {
        self.status == Status::Up
    }

    /// Names and states only: what anyone may see.
    pub fn summary(&self) -> Summary {
        Summary {
            status: self.status,
            checks: self
                .checks
                .iter()
                .map(|(name, c)| (name.clone(), CheckSummary { status: c.status }))
                .collect(),
        }
    }
}

struct Entry {
    name: String,
    options: CheckOptions,
    check: Arc<dyn DynCheck>,
    state: Mutex<CheckState>,
}

#[derive(Debug, Clone, Default)]
struct CheckState {
    up: bool,
    passed_once: bool,
    failures: u32,
    successes: u32,
    duration: Option<Duration>,
    error: Option<String>,
}

impl CheckState {
    /// Applies one run's outcome, with hysteresis.
    fn record(&mut self, outcome: Result<(), CheckError>, duration: Duration, o: &CheckOptions) {
        self.duration = Some(duration);
        match outcome {
            Ok(()) => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                self.error = None;
                if !self.passed_once || self.successes >= o.success_threshold {
                    self.up = true;
                }
                self.passed_once = true;
            }
            Err(e) => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                self.error = Some(e.0);
                if self.failures >= o.failure_threshold {
                    self.up = false;
                }
            }
        }
    }
}

/// The registry of checks and the readiness state of a service.
///
/// Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Mutex<Vec<Arc<Entry>>>,
    shutting_down: AtomicBool,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// No checks yet; ready until one is registered.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                entries: Mutex::new(Vec::new()),
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    /// Registers a check. Checks registered after [`spawn`](Self::spawn) are
    /// reported but not run.
    pub fn register(&self, name: impl Into<String>, check: impl Check, options: CheckOptions) {
        let entry = Arc::new(Entry {
            name: name.into(),
            options,
            check: Arc::new(check),
            state: Mutex::new(CheckState::default()),
        });
        lock(&self.inner.entries).push(entry);
    }

    /// Starts one task per check; they stop when `stop` is cancelled.
    pub fn spawn(&self, stop: &CancellationToken) -> Vec<JoinHandle<()>> {
        lock(&self.inner.entries)
            .iter()
            .map(|entry| tokio::spawn(run(entry.clone(), stop.clone())))
            .collect()
    }

    /// Turns readiness down for good: shutdown has started.
    pub fn set_shutting_down(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has started.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Whether the service should receive traffic.
    pub fn is_ready(&self) -> bool {
        !self.is_shutting_down()
            && lock(&self.inner.entries)
                .iter()
                .filter(|e| e.options.critical)
                .all(|e| lock(&e.state).up)
    }

    /// The current state of every check.
    pub fn report(&self) -> Report {
        let mut ready = !self.is_shutting_down();
        let mut checks = BTreeMap::new();
        for e in lock(&self.inner.entries).iter() {
            let s = lock(&e.state).clone();
            ready &= s.up || !e.options.critical;
            let error = match (&s.error, s.passed_once, s.duration) {
                (Some(err), ..) => Some(err.clone()),
                (None, false, None) => Some("not checked yet".to_owned()),
                _ => None,
            };
            checks.insert(
                e.name.clone(),
                CheckReport {
                    status: if s.up { Status::Up } else { Status::Down },
                    critical: e.options.critical,
                    duration_ms: s.duration.map(|d| d.as_millis() as u64),
                    error,
                },
            );
        }
        Report {
            status: if ready { Status::Up } else { Status::Down },
            checks,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data is still valid.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn run(entry: Arc<Entry>, stop: CancellationToken) {
    loop {
        let start = Instant::now();
        let check = entry.check.clone();
        let mut task = tokio::spawn(async move { check.check_boxed().await });
        let outcome = tokio::select! {
            () = stop.cancelled() => {
                task.abort();
                return;
            }
            joined = tokio::time::timeout(entry.options.timeout, &mut task) => match joined {
                Ok(Ok(result)) => result,
                Ok(Err(e)) if e.is_panic() => Err(CheckError::new("the check panicked")),
                Ok(Err(_)) => Err(CheckError::new("the check was cancelled")),
                Err(_) => {
                    task.abort();
                    Err(CheckError::new(format!(
                        "timed out after {} ms",
                        entry.options.timeout.as_millis()
                    )))
                }
            },
        };
        let elapsed = start.elapsed();
        let (first, was_up, is_up, error) = {
            let mut state = lock(&entry.state);
            let (first, was_up) = (state.duration.is_none(), state.up);
            state.record(outcome, elapsed, &entry.options);
            (first, was_up, state.up, state.error.clone())
        };
        // A check starts down: its first failure is a change worth a line
        // too, or a check that never passes would never say why.
        if is_up && !was_up {
            tracing::info!(check = %entry.name, "health check up");
        } else if !is_up && (was_up || first) {
            let error = error.unwrap_or_default();
            tracing::warn!(check = %entry.name, error, "health check down");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(entry.options.interval) => {}
        }
    }
}

/// `GET /health/live`.
pub async fn live() -> Response {
    Json(serde_json::json!({ "status": "up" })).into_response()
}

/// `GET /health/ready`: 200 or 503, each check's name and state
/// ([`Report::summary`]), for anyone.
pub async fn ready(State(health): State<Health>) -> Response {
    let report = health.report();
    answer(report.is_up(), &report.summary())
}

/// The operators' readiness answer: 200 or 503 with the whole [`Report`],
/// error texts included. Serve it only to callers allowed to read them; the
/// service builder serves it at `/health/ready?detail` to a bearer token
/// holding `<service>::view:health`.
pub fn detailed(report: &Report) -> Response {
    answer(report.is_up(), report)
}

fn answer<T: Serialize>(up: bool, body: &T) -> Response {
    let status = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut res = (status, Json(body)).into_response();
    res.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// A check whose outcomes the test scripts, counting its runs.
    #[derive(Clone, Default)]
    struct Scripted {
        fail: Arc<AtomicBool>,
        hang: Arc<AtomicBool>,
        runs: Arc<AtomicU32>,
    }

    impl Check for Scripted {
        async fn check(&self) -> Result<(), CheckError> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if self.fail.load(Ordering::SeqCst) {
                Err("down".into())
            } else {
                Ok(())
            }
        }
    }

    const OPTS: CheckOptions = CheckOptions {
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(1),
        failure_threshold: 3,
        success_threshold: 2,
        critical: true,
    };

    /// Lets the check tasks run at the current (paused) instant.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn not_ready_until_first_pass_then_hysteresis() {
        let health = Health::new();
        let c = Scripted::default();
        c.fail.store(true, Ordering::SeqCst);
        health.register("db", c.clone(), OPTS);
        let stop = CancellationToken::new();
        health.spawn(&stop);
        settle().await;
        assert_eq!(c.runs.load(Ordering::SeqCst), 1);
        assert!(!health.is_ready());
        assert_eq!(health.report().checks["db"].error.as_deref(), Some("down"));

        c.fail.store(false, Ordering::SeqCst);
        tokio::time::sleep(OPTS.interval).await;
        settle().await;
        assert!(health.is_ready(), "the first pass turns it up at once");

        // Two failures are not enough to turn it down.
        c.fail.store(true, Ordering::SeqCst);
        for _ in 0..2 {
            tokio::time::sleep(OPTS.interval).await;
            settle().await;
            assert!(health.is_ready());
        }
        tokio::time::sleep(OPTS.interval).await;
        settle().await;
        assert!(!health.is_ready(), "the third failure does");

        // One success is not enough to turn it up again.
        c.fail.store(false, Ordering::SeqCst);
        tokio::time::sleep(OPTS.interval).await;
        settle().await;
        assert!(!health.is_ready());
        tokio::time::sleep(OPTS.interval).await;
        settle().await;
        assert!(health.is_ready());
        assert_eq!(c.runs.load(Ordering::SeqCst), 7);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn hanging_check_is_cut_at_its_timeout() {
        let health = Health::new();
        let c = Scripted::default();
        c.hang.store(true, Ordering::SeqCst);
        health.register("slow", c.clone(), OPTS.thresholds(1, 1));
        let stop = CancellationToken::new();
        health.spawn(&stop);
        settle().await;
        assert!(
            health.report().checks["slow"].duration_ms.is_none(),
            "still running"
        );
        tokio::time::sleep(OPTS.timeout).await;
        settle().await;
        let report = health.report();
        assert_eq!(
            report.checks["slow"].error.as_deref(),
            Some("timed out after 1000 ms")
        );
        assert_eq!(report.checks["slow"].duration_ms, Some(1000));
        assert!(!report.is_up());
        // The next run starts one interval later, not sooner.
        tokio::time::sleep(OPTS.interval - Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(c.runs.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(c.runs.load(Ordering::SeqCst), 2);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn panicking_check_is_a_failure() {
        let health = Health::new();
        health.register("boom", check_fn(|| async { panic!("check bug") }), OPTS);
        let stop = CancellationToken::new();
        health.spawn(&stop);
        settle().await;
        assert_eq!(
            health.report().checks["boom"].error.as_deref(),
            Some("the check panicked")
        );
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn non_critical_checks_report_without_failing() {
        let health = Health::new();
        let c = Scripted::default();
        c.fail.store(true, Ordering::SeqCst);
        health.register("cache", c, OPTS.non_critical());
        health.register("db", check_fn(|| async { Ok(()) }), OPTS);
        let stop = CancellationToken::new();
        health.spawn(&stop);
        settle().await;
        let report = health.report();
        assert!(report.is_up());
        assert_eq!(report.checks["cache"].status, Status::Down);
        assert!(!report.checks["cache"].critical);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["status"], "up");
        assert_eq!(json["checks"]["db"]["status"], "up");
        assert_eq!(json["checks"]["cache"]["error"], "down");
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn probes_only_read_state() {
        let health = Health::new();
        let c = Scripted::default();
        health.register("db", c.clone(), OPTS);
        let stop = CancellationToken::new();
        health.spawn(&stop);
        settle().await;
        for _ in 0..1000 {
            let res = ready(State(health.clone())).await;
            assert_eq!(res.status(), StatusCode::OK);
        }
        assert_eq!(c.runs.load(Ordering::SeqCst), 1);
        health.set_shutting_down();
        assert_eq!(
            ready(State(health.clone())).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        stop.cancel();
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let e = CheckError::new("é".repeat(150));
        assert!(e.message().len() <= MAX_ERROR_LEN);
        assert!(e.message().chars().all(|c| c == 'é'));
    }

    #[tokio::test]
    async fn tcp_and_http_checks_against_real_sockets() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/health/live", axum::routing::get(|| async { "ok" }))
            .route(
                "/broken",
                axum::routing::get(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
            );
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        assert_eq!(TcpCheck::new(addr).check().await, Ok(()));
        let ok = HttpCheck::get(&format!("http://{addr}/health/live")).unwrap();
        assert_eq!(ok.check().await, Ok(()));
        let broken = HttpCheck::get(&format!("http://{addr}/broken")).unwrap();
        assert_eq!(
            broken.check().await.unwrap_err().message(),
            format!("GET http://{addr}/broken answered 500")
        );
        server.abort();
        let _ = server.await;
        // Nothing listens there any more.
        assert!(TcpCheck::new(addr).check().await.is_err());
        assert!(ok.check().await.is_err());
        assert!(HttpCheck::get("https://127.0.0.1/").is_err());
        assert!(HttpCheck::get("/relative").is_err());
    }
}
