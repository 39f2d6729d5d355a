//! Storage failures as answers: 503 when trying again later can succeed,
//! 409 for a unique key already taken, 500 otherwise.

use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::problem::Problem;

/// Seconds a client is asked to wait (`Retry-After`) when the database is
/// busy.
pub const RETRY_AFTER_SECS: u32 = 1;

/// What a storage failure means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Failure {
    /// The database is busy, locked, out of connections or cannot be read
    /// or written right now: the same request may succeed later (503 with
    /// `Retry-After`).
    Unavailable,
    /// A unique key is already taken: the request conflicts with stored
    /// data (409).
    Conflict,
    /// Anything else: another constraint broken, a bad statement, data that
    /// does not decode; a bug to fix, not a reason to retry (500).
    Other,
}

impl Failure {
    /// What `error` means for the caller.
    ///
    /// [`Unavailable`](Self::Unavailable): the pool's timeout, closure and
    /// I/O errors (a connection lost); SQLite's primary result codes
    /// `SQLITE_BUSY` (5), `SQLITE_LOCKED` (6), `SQLITE_IOERR` (10),
    /// `SQLITE_FULL` (13) and `SQLITE_CANTOPEN` (14), with their extended
    /// codes; Postgres' SQLSTATE classes `08` (connection exception), `53`
    /// (insufficient resources), `57` (operator intervention: shutdown,
    /// statement cancelled) and the codes `40001` (serialization failure),
    /// `40P01` (deadlock) and `55P03` (lock not available).
    /// [`Conflict`](Self::Conflict): a unique or primary key violation, on
    /// either engine.
    pub fn of(error: &sqlx::Error) -> Self {
        match error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable,
            sqlx::Error::Database(db) => {
                if db.is_unique_violation() {
                    return Self::Conflict;
                }
                let Some(code) = db.code() else {
                    return Self::Other;
                };
                if is_sqlstate(&code) {
                    return match (&code[..2], &*code) {
                        ("08" | "53" | "57", _) | (_, "40001" | "40P01" | "55P03") => {
                            Self::Unavailable
                        }
                        _ => Self::Other,
                    };
                }
                match code.parse::<i32>().ok().map(|c| c & 0xff) {
                    Some(5 | 6 | 10 | 13 | 14) => Self::Unavailable,
                    _ => Self::Other,
                }
            }
            _ => Self::Other,
        }
    }

    /// Whether `error` certainly undid the whole transaction it happened
    /// in and running the transaction again from its start may succeed:
    /// Postgres' serialization failure (`40001`) and deadlock (`40P01`).
    /// Connection losses are not among them: a `COMMIT` cut short may have
    /// committed. See [`retry`].
    pub fn is_retryable(error: &sqlx::Error) -> bool {
        match error {
            sqlx::Error::Database(db) => {
                matches!(db.code().as_deref(), Some("40001" | "40P01"))
            }
            _ => false,
        }
    }

    /// The status the caller gets.
    pub fn status(self) -> StatusCode {
        match self {
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Conflict => StatusCode::CONFLICT,
            Self::Other => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A storage failure as a handler's error: `?` turns any `sqlx::Error`
/// into it, and it answers as the [module docs](super) say, logging the
/// original error (at `warn` for [`Failure::Unavailable`], `error`
/// otherwise) and never sending it.
///
/// ```
/// use chassis::db::StoreError;
///
/// async fn count(pool: &sqlx::AnyPool) -> Result<String, StoreError> {
///     let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notes").fetch_one(pool).await?;
///     Ok(n.to_string())
/// }
///
/// let busy = StoreError::from(sqlx::Error::PoolTimedOut);
/// let problem = chassis::Problem::from(busy);
/// assert_eq!(problem.status(), 503);
/// assert!(!problem.detail().contains("pool"));
/// ```
#[derive(Debug, thiserror::Error)]
#[error("storage: {0}")]
pub struct StoreError(#[from] sqlx::Error);

impl StoreError {
    /// What it means for the caller.
    pub fn failure(&self) -> Failure {
        Failure::of(&self.0)
    }

    /// The database's error.
    pub fn get_ref(&self) -> &sqlx::Error {
        &self.0
    }

    /// The database's error.
    pub fn into_inner(self) -> sqlx::Error {
        self.0
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        problem(&e.0)
    }
}

impl IntoResponse for StoreError {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}

/// The answer to a storage failure, the error logged (target
/// `chassis::db`) and never sent; the chassis wrote it, so it reaches
/// the client as it is (a handler's own 5xx would be replaced): 503 with
/// `Retry-After: 1` and `reason: storage_unavailable`, 409 with
/// `reason: conflict`, or 500. For handlers whose error type is their
/// own; [`StoreError`] does the same through `?`.
pub fn problem(error: &sqlx::Error) -> Problem {
    match Failure::of(error) {
        Failure::Unavailable => {
            tracing::warn!(target: "chassis::db", error = %error, "storage unavailable");
            Problem::unavailable(RETRY_AFTER_SECS)
                .with_detail("The service's storage is busy; retry later.")
                .with_member("reason", "storage_unavailable")
                .vetted()
        }
        Failure::Conflict => {
            tracing::info!(target: "chassis::db", error = %error, "unique key taken");
            Problem::new(StatusCode::CONFLICT)
                .with_detail("The request conflicts with data already stored.")
                .with_member("reason", "conflict")
        }
        Failure::Other => {
            tracing::error!(target: "chassis::db", error = %error, "storage error");
            Problem::internal().vetted()
        }
    }
}

/// A Postgres SQLSTATE is five characters; SQLite's result codes are
/// numbers below 10 000.
fn is_sqlstate(code: &str) -> bool {
    code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Attempts of a transaction [`retry`] makes, the first included.
const ATTEMPTS: u32 = 3;

/// Runs `transaction` (a function that begins, does and commits one write
/// transaction) again from its start when it fails with an error that
/// undid all of it and may not recur ([`Failure::is_retryable`]: a
/// serialization failure or a deadlock on Postgres), up to 3 attempts in
/// all, after a short random pause (5-25 ms, then 10-50 ms) so that the
/// transactions that collided do not collide again. Any other result is
/// returned as it is; the last error too, which answers 503 through
/// [`StoreError`].
///
/// Only a function that does nothing but the transaction may be run
/// again: no call to another service, no message sent, inside it.
///
/// ```
/// use chassis::db::{Database, StoreError, retry};
///
/// async fn move_place(db: &Database, from: &str, to: &str) -> Result<(), StoreError> {
///     retry(|| async {
///         let mut tx = db.begin_write().await?;
///         sqlx::query("UPDATE seats SET taken = taken - 1 WHERE id = $1").bind(from).execute(&mut *tx).await?;
///         sqlx::query("UPDATE seats SET taken = taken + 1 WHERE id = $1").bind(to).execute(&mut *tx).await?;
///         tx.commit().await
///     })
///     .await?;
///     Ok(())
/// }
/// ```
pub async fn retry<T, F, Fut>(mut transaction: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 1;
    loop {
        match transaction().await {
            Err(e) if attempt < ATTEMPTS && Failure::is_retryable(&e) => {
                tracing::debug!(target: "chassis::db", error = %e, attempt, "transaction undone; running it again");
                let base = 5 * u64::from(attempt);
                tokio::time::sleep(std::time::Duration::from_millis(
                    base + fastrand::u64(0..=4 * base),
                ))
                .await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::BodyExt as _;

    use super::*;
    use crate::db::{Database, DbConfig};

    async fn open(dir: &std::path::Path) -> Database {
        let mut config = DbConfig::new(dir, "t.db");
        config.busy_timeout = Duration::from_millis(50);
        let db = Database::open(&config).await.unwrap();
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, n INTEGER NOT NULL CHECK (n >= 0))",
        )
        .execute(&mut *db.writer().await.unwrap())
        .await
        .unwrap();
        db
    }

    async fn body(problem: Problem) -> (StatusCode, Option<String>, serde_json::Value) {
        let res = problem.into_response();
        let retry = res
            .headers()
            .get(http::header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, retry, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn a_locked_database_is_503_a_taken_key_409_a_broken_rule_500() {
        let dir = std::env::temp_dir().join(format!(
            "chassis-sqlite-errors-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let (a, b) = (open(&dir).await, open(&dir).await);

        // Another handle's writer holds the write lock past the busy timeout.
        let mut holder = a.begin_write().await.unwrap();
        sqlx::query("INSERT INTO t VALUES ('held', 1)")
            .execute(&mut *holder)
            .await
            .unwrap();
        let busy = sqlx::query("INSERT INTO t VALUES ('x', 1)")
            .execute(&mut *b.writer().await.unwrap())
            .await
            .unwrap_err();
        assert_eq!(Failure::of(&busy), Failure::Unavailable, "{busy}");
        let (status, retry, json) = body(problem(&busy)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(json["reason"], "storage_unavailable");
        let text = json.to_string();
        assert!(!text.contains("lock") && !text.contains("INSERT"), "{text}");
        holder.commit().await.unwrap();

        let taken = sqlx::query("INSERT INTO t VALUES ('held', 2)")
            .execute(&mut *b.writer().await.unwrap())
            .await
            .unwrap_err();
        assert_eq!(Failure::of(&taken), Failure::Conflict);
        let (status, _, json) = body(StoreError::from(taken).into()).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(json["reason"], "conflict");
        assert!(!json.to_string().contains("UNIQUE"), "{json}");

        let broken = sqlx::query("INSERT INTO t VALUES ('y', -1)")
            .execute(&mut *b.writer().await.unwrap())
            .await
            .unwrap_err();
        assert_eq!(Failure::of(&broken), Failure::Other);
        let (status, retry, json) = body(problem(&broken)).await;
        assert_eq!((status, retry), (StatusCode::INTERNAL_SERVER_ERROR, None));
        assert!(!json.to_string().contains("CHECK"), "{json}");

        assert_eq!(
            Failure::of(&sqlx::Error::PoolTimedOut),
            Failure::Unavailable
        );
        assert_eq!(Failure::of(&sqlx::Error::RowNotFound), Failure::Other);
        a.close().await;
        b.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
