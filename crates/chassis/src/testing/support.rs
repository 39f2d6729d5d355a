//! Small things every service's tests need: a temporary directory, polling
//! with a bound, the refusal in a client error.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use serde_json::Value;

use crate::client::{CallContext, ClientError, Downstream};

/// How long [`eventually`] polls.
pub const EVENTUALLY_WITHIN: Duration = Duration::from_secs(60);

/// A fresh directory under the system's temporary directory, removed with
/// everything in it when dropped.
///
/// ```
/// let dir = chassis::testing::TempDir::new("notes");
/// std::fs::write(dir.path().join("a.txt"), "a").unwrap();
/// let path = dir.path().to_owned();
/// drop(dir);
/// assert!(!path.exists());
/// ```
#[derive(Debug)]
pub struct TempDir(PathBuf);

// === impl TempDir ===

impl TempDir {
    /// `<tmp>/chassis-test-<name>-<pid>-<n>-<random>`, made empty.
    ///
    /// # Panics
    ///
    /// If it cannot be made (a test helper: the panic is the test's
    /// failure).
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "chassis-test-{name}-{}-{}-{:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..),
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot make {}: {e}", dir.display()));
        Self(dir)
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `path` within it.
    pub fn join(&self, path: impl AsRef<Path>) -> PathBuf {
        self.0.join(path)
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The variable that makes a test fail, rather than skip, when a server
/// it needs cannot be reached (CI sets it: nothing is skipped there).
pub const REQUIRE_VAR: &str = "CHASSIS_REQUIRE_SERVERS";

/// Polls `check` until it holds, for at most [`EVENTUALLY_WITHIN`] (60 s:
/// generous, as test machines are busy). The pause between polls grows
/// from 10 ms to 250 ms.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let start = tokio::time::Instant::now();
/// chassis::testing::eventually("50 ms to pass", || async move {
///     start.elapsed() >= std::time::Duration::from_millis(50)
/// })
/// .await;
/// # }
/// ```
///
/// # Panics
///
/// When it does not hold in time, naming `what`.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_within(EVENTUALLY_WITHIN, what, check).await;
}

/// [`eventually`] with another bound.
///
/// # Panics
///
/// When `check` does not hold within `limit`, naming `what`.
pub async fn eventually_within<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// The status and problem document of a refused call: what a test of a
/// refusal asserts on.
///
/// ```
/// use chassis::client::ClientError;
///
/// let refused: Result<(), ClientError> = Err(ClientError::Status {
///     downstream: "lessons".into(),
///     status: http::StatusCode::CONFLICT,
///     problem: None,
///     body: r#"{"status":409,"reason":"full"}"#.into(),
/// });
/// let (status, problem) = chassis::testing::refusal(refused);
/// assert_eq!((status, problem["reason"].as_str()), (409, Some("full")));
/// ```
///
/// # Panics
///
/// When the call succeeded, failed otherwise than with a status, or its
/// body is not JSON.
pub fn refusal<T: std::fmt::Debug>(result: Result<T, ClientError>) -> (u16, Value) {
    match result {
        Err(ClientError::Status { status, body, .. }) => (
            status.as_u16(),
            serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&body))),
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A downstream named `name` to `base`: one attempt per call (30 s), the
/// breaker disabled, so that a test sees every answer as it is.
pub(super) fn plain_downstream(name: &str, base: &str) -> Downstream {
    let downstream = Downstream::builder(name, base)
        .attempt_timeout(Duration::from_secs(30))
        .max_attempts(1)
        .build()
        .expect("a loopback base URL");
    downstream.breaker().disable(true);
    downstream
}

/// Waits until `GET /health/ready` through `downstream` answers 2xx, for
/// at most `limit`.
pub(super) async fn until_ready(downstream: &Downstream, limit: Duration) {
    let cx = CallContext::background();
    let calls = downstream.anonymous(&cx);
    eventually_within(limit, "/health/ready to answer 200", || async move {
        calls.get("/health/ready").send().await.is_ok()
    })
    .await;
}
