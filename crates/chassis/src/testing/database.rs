//! A database of its own for each test, on the engine the test run asks
//! for: the same tests run on SQLite and on Postgres.

use std::time::Duration;

use crate::db::{Backend, DbConfig};

/// The variable that picks the engine of a test run: `sqlite` (the
/// default) or `postgres`.
pub const BACKEND_VAR: &str = "CHASSIS_TEST_BACKEND";

/// The variable naming the Postgres server tests use, as the URL of a
/// database on it from which new databases can be made.
pub const POSTGRES_VAR: &str = "CHASSIS_TEST_POSTGRES_URL";

/// The Postgres server tests use when [`POSTGRES_VAR`] is unset: the
/// project machines' server on loopback, trust authentication.
pub const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

use super::support::REQUIRE_VAR;

/// The engine this test run asks for ([`BACKEND_VAR`]).
///
/// # Panics
///
/// When the variable holds anything but `sqlite` or `postgres`.
pub fn test_backend() -> Backend {
    match std::env::var(BACKEND_VAR).as_deref() {
        Err(_) | Ok("" | "sqlite") => Backend::Sqlite,
        Ok("postgres") => Backend::Postgres,
        Ok(other) => panic!("{BACKEND_VAR}={other}: expected `sqlite` or `postgres`"),
    }
}

/// The database of one service in one test, on the run's engine: nothing
/// to make on SQLite (the service makes its file in its data directory), a
/// new, empty Postgres database otherwise, dropped with this value.
///
/// ```no_run
/// use chassis::testing::TestDatabase;
///
/// let db = TestDatabase::new();
/// // The service's settings: its data directory, plus the database URL
/// // when the run is on Postgres.
/// let mut env = vec![("ORDERS_DATA_DIR".to_owned(), "/tmp/orders".to_owned())];
/// env.extend(db.env("ORDERS"));
/// ```
#[derive(Debug)]
pub struct TestDatabase {
    postgres: Option<TestPostgres>,
}

impl TestDatabase {
    /// A database on the run's engine ([`test_backend`]).
    ///
    /// # Panics
    ///
    /// When the run is on Postgres and no database can be made on the
    /// server ([`POSTGRES_VAR`]): the run asked for that server.
    pub fn new() -> Self {
        let postgres = match test_backend() {
            Backend::Sqlite => None,
            Backend::Postgres => Some(
                TestPostgres::create()
                    .unwrap_or_else(|e| panic!("{BACKEND_VAR}=postgres, but {e}")),
            ),
        };
        Self { postgres }
    }

    /// The engine.
    pub fn backend(&self) -> Backend {
        if self.postgres.is_some() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    /// The Postgres database's URL, on Postgres.
    pub fn url(&self) -> Option<&str> {
        self.postgres.as_ref().map(TestPostgres::url)
    }

    /// The settings that point a service at it: `<prefix>_DATABASE_URL` on
    /// Postgres, nothing on SQLite.
    pub fn env(&self, prefix: &str) -> Vec<(String, String)> {
        self.url()
            .map(|url| (format!("{prefix}_DATABASE_URL"), url.to_owned()))
            .into_iter()
            .collect()
    }

    /// `config` pointed at it.
    pub fn configure(&self, config: DbConfig) -> DbConfig {
        match self.url() {
            Some(url) => config.postgres(url),
            None => config,
        }
    }
}

impl Default for TestDatabase {
    fn default() -> Self {
        Self::new()
    }
}

/// A new, empty database on the test Postgres server ([`POSTGRES_VAR`]),
/// named `chassis_t_<random>`, dropped (with its connections) when this
/// value is.
#[derive(Debug)]
pub struct TestPostgres {
    url: String,
    name: String,
    server: String,
}

impl TestPostgres {
    /// Makes the database.
    ///
    /// # Errors
    ///
    /// A sentence saying which server could not be used and why.
    pub fn create() -> Result<Self, String> {
        let server = std::env::var(POSTGRES_VAR).unwrap_or_else(|_| DEFAULT_POSTGRES.to_owned());
        let name = format!(
            "chassis_t_{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        );
        let url = database_url(&server, &name)
            .ok_or_else(|| format!("{POSTGRES_VAR}={server} is not a postgres:// URL"))?;
        admin(&server, format!("CREATE DATABASE {name}")).map_err(|e| {
            format!(
                "no database could be made on the test PostgreSQL server at {} ({POSTGRES_VAR}): {e}",
                crate::db::DbConfig::new(".", "-").postgres(server.clone()).display_name()
            )
        })?;
        Ok(Self { url, name, server })
    }

    /// For a test that needs Postgres whatever the run's engine: the
    /// database, or `None` with a line on standard error saying the test
    /// did not run and why, when the server cannot be reached.
    ///
    /// # Panics
    ///
    /// When the server cannot be reached and [`REQUIRE_VAR`] is set.
    pub fn or_skip(test: &str) -> Option<Self> {
        match Self::create() {
            Ok(db) => Some(db),
            Err(e) if std::env::var_os(REQUIRE_VAR).is_some() => {
                panic!("{test}: {e} ({REQUIRE_VAR} is set, so it cannot be skipped)")
            }
            Err(e) => {
                eprintln!("NOT RUN: {test}: {e}");
                None
            }
        }
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = admin(
            &self.server,
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// `server` (a database URL) with its database replaced by `name`.
fn database_url(server: &str, name: &str) -> Option<String> {
    let (scheme, rest) = server.split_once("://")?;
    if scheme != "postgres" && scheme != "postgresql" {
        return None;
    }
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority = before_query.split('/').next().unwrap_or_default();
    let mut url = format!("{scheme}://{authority}/{name}");
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    Some(url)
}

/// Runs one statement on `server`, on a thread and runtime of its own so
/// that it works from synchronous code and from any runtime alike.
fn admin(server: &str, statement: String) -> Result<(), String> {
    use sqlx::Connection as _;
    let server = server.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let work = async {
                let mut conn = sqlx::postgres::PgConnection::connect(&server).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                    .execute(&mut conn)
                    .await?;
                conn.close().await
            };
            match tokio::time::timeout(Duration::from_secs(10), work).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err("no answer within 10 s".to_owned()),
            }
        })
    })
    .join()
    .unwrap_or_else(|_| Err("the connecting thread panicked".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_url_names_the_new_database() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/test", "x").as_deref(),
            Some("postgres://postgres@127.0.0.1:5432/x")
        );
        assert_eq!(
            database_url("postgresql://u:p@h/db?sslmode=disable", "y").as_deref(),
            Some("postgresql://u:p@h/y?sslmode=disable")
        );
        assert_eq!(
            database_url("postgres://h", "z").as_deref(),
            Some("postgres://h/z")
        );
        assert_eq!(database_url("mysql://h/db", "z"), None);
    }
}
