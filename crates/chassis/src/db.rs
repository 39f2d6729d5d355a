//! Storage: one database per service, SQLite on one machine or Postgres
//! for several replicas, opened the same way by every service and used
//! through the same handlers.
//!
//! # The standard
//!
//! A service owns its data: its own database, which no other service
//! opens (services share data through their APIs and events, never through
//! tables). Where it lives is configuration, not code:
//!
//! * **SQLite, the embedded default**: one file in the service's data
//!   directory (`<PREFIX>_DATA_DIR`), for one instance of the service. No
//!   server to install.
//! * **Postgres, for several replicas** (feature `postgres`): when
//!   `<PREFIX>_DATABASE_URL` holds a `postgres://` URL, every instance of
//!   the service uses that database.
//!
//! Handlers do not know which: they run on sqlx's `Any` driver, with `$1`,
//! `$2`, ... for parameters (both engines read them) and SQL both engines
//! share; each engine has its own migrations ([`Migrations`]), since DDL
//! differs. Whatever the engine:
//!
//! * **writes go through [`Database::begin_write`]** (or
//!   [`Database::writer`] for one statement), reads through
//!   [`Database::pool`];
//! * **a read that decides a write makes its own guarantee**: the write
//!   checks its condition itself (`UPDATE ... SET used = used + $1 WHERE
//!   id = $2 AND used + $1 <= capacity`, then count the rows it changed),
//!   or the transaction first locks the row it decides on by writing it
//!   (`UPDATE tickets SET id = id WHERE id = $1`: a row lock on Postgres
//!   until commit, and nothing more on SQLite, whose writer already
//!   excludes every other write). Unique keys settle races on inserts.
//!   Code written so is correct at Postgres' default isolation (read
//!   committed) and at any stronger one;
//! * **work shared by replicas is leased**, not assumed to be one's own:
//!   a worker claims due rows with a conditional update that sets a lease
//!   owner and expiry, and only the claimer works on them; a dead
//!   worker's lease expires (see the exemplars' outbox relay and mail
//!   queue);
//! * **migrations** are embedded in the binary (`sqlx::migrate!()`) and
//!   run at start-up before the service answers; on Postgres, replicas
//!   starting together take turns under the migrator's advisory lock;
//! * **a readiness check** ([`Check`] for [`Database`]), and a write check
//!   ([`Database::write_check`]) for services that must write to serve;
//! * **an acquire timeout** (5 s): a request that cannot get a connection
//!   in time fails with 503 instead of waiting without end.
//!
//! A storage failure answers the same in every service ([`StoreError`],
//! [`problem`]): a database that is busy, locked, unreachable, out of
//! connections (the acquire timeout passed), failing I/O, or that undid a
//! transaction for a serialization failure or a deadlock is **503 with
//! `Retry-After`** (the request may succeed later), a unique key already
//! taken is **409**, anything else is 500 (a write through SQLite's
//! readers included: a bug). The body never holds the database's message,
//! SQL, file names or URL; the original error is logged. A transaction
//! undone by a serialization failure or deadlock is run again first,
//! when the caller wraps it in [`retry`].
//!
//! # SQLite
//!
//! The file is opened with the settings that make SQLite a sound server
//! database:
//!
//! * **WAL journal** so readers never block the writer, with
//!   `synchronous = NORMAL` (durable at each checkpoint, and never corrupt);
//! * **foreign keys enforced**;
//! * **one writer**: every write goes through the same single connection,
//!   and a transaction that writes starts with `BEGIN IMMEDIATE`, so it
//!   holds the write lock from its first statement (what it reads cannot
//!   change under it, and it never fails half-way for want of the lock);
//! * **a pool of read-only readers** of a configured size (4 by default)
//!   for everything that only reads: in WAL mode they read the last commit
//!   while the writer writes, and opened read-only they cannot write by
//!   mistake;
//! * a **busy timeout** (5 s) as a safety net, for a lock held by another
//!   process that opened the file (a backup, a second instance, a shell).
//!
//! ## Why one writer
//!
//! SQLite lets one connection write at a time. When several connections of
//! a pool write, all but one find the lock taken and wait in SQLite's busy
//! handler, which puts the thread to sleep and tries again after 1, 2, 5,
//! 10, ... up to 100 ms: a waiter that wakes up just after the lock was
//! taken again sleeps once more, waiters are served in no order, and a
//! request can lose that race many times. Under load that is the latency
//! tail: with a pool of 4 connections that all wrote and 16 clients, the
//! exemplar system's orders had a p99 of 40 to 46 times their median
//! (`docs/benchmarks.md`, "Storage: one writer per SQLite database").
//! With one writer, writers wait for it in the service instead:
//! asynchronously (no thread sleeps), first come first served, each handed
//! the writer the moment the one before lets it go, and for no longer than
//! the acquire timeout. SQLite's lock is then never contended inside the
//! process, and the busy timeout only matters when another process holds
//! the file. In the same measurement the p99 came down to about twice the
//! median, with more orders per second.
//!
//! A committed write is seen by every read that starts after the commit,
//! on any reader. Two things to avoid: reading through the readers inside
//! a write transaction (they do not see the transaction's own changes, and
//! what they read is not protected by its lock), and asking for the writer
//! while holding it (`db.writer()` within `begin_write()` waits for itself
//! until the acquire timeout). Keep a write transaction short: do the slow
//! work (a call to another service, hashing) before it begins, since every
//! other write of the service waits behind it.
//!
//! The writer is a connection of its own rather than a sqlx pool of one:
//! a pool tests each connection with a round trip to its thread as it is
//! given back, in a task of its own, and the next writer would wait for
//! both; the lock hands the writer over at once. A transaction dropped
//! before it ends (an error, a cancelled request) is rolled back before
//! the writer's next use. Since only the writer changes the file, its page
//! cache stays valid from one write to the next, so it gets a larger one
//! ([`DbConfig::writer_cache_mib`], 16 MiB); a reader's cache is emptied
//! whenever the writer has committed since its last read.
//!
//! # Postgres
//!
//! One pool of `<PREFIX>_DB_POOL_SIZE + 1` connections serves reads and
//! writes; a write transaction is `BEGIN` on one of them, at the server's
//! default isolation (read committed), hence the rule above on reads that
//! decide writes. sqlx tests a connection before handing it out, so a
//! connection the server dropped (a restart, a fail-over) is replaced
//! rather than failing a request.
//!
//! ## Connection budget
//!
//! An instance opens at most `<PREFIX>_DB_POOL_SIZE + 1` connections on
//! either engine: 5 by default. On SQLite those are the readers and the
//! writer, each with a thread of sqlx's SQLite driver and its page cache
//! (up to 2 MiB for a reader, 16 MiB for the writer); more writers would
//! not write faster, as SQLite runs one write transaction at a time. On
//! Postgres they count against the server's `max_connections` (100 by
//! default, a few kept for superusers): the system needs the sum over its
//! services of `instances × (pool size + 1)`. The exemplar system with 3
//! replicas of each of its 4 services at the default takes
//! `4 × 3 × 5 = 60`; with more, lower the pool size or put a connection
//! pooler (PgBouncer in transaction mode) in front of the server.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `<PREFIX>_DATABASE_URL` | unset: SQLite | `postgres://user:password@host:port/database` |
//! | `<PREFIX>_DATA_DIR` | `./data/<service>` | directory of the SQLite file and other data |
//! | `<PREFIX>_DB_POOL_SIZE` | `4` | SQLite: read connections (the writer is one more); Postgres: the pool holds one more than this |
//! | `<PREFIX>_DB_ACQUIRE_TIMEOUT_MS` | `5000` | longest wait for a connection (or SQLite's writer) before 503 |
//! | `<PREFIX>_DB_WRITER_CACHE_MIB` | `16` | page cache of SQLite's writer |
//!
//! # Example
//!
//! ```
//! use chassis::db::{Database, DbConfig, StoreError};
//!
//! /// Adds a note numbered after the ones before it.
//! async fn add_note(db: &Database) -> Result<i64, StoreError> {
//!     // The insert numbers the note itself, in one statement, so no other
//!     // note can come in between on either engine.
//!     let n: i64 = sqlx::query_scalar(
//!         "INSERT INTO notes (n, text) SELECT COALESCE(MAX(n), 0) + 1, $1 FROM notes RETURNING n",
//!     )
//!     .bind("a note")
//!     .fetch_one(&mut *db.writer().await?)
//!     .await?;
//!     Ok(n)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let dir = std::env::temp_dir().join(format!("chassis-doc-{}", std::process::id()));
//! let db = Database::open(&DbConfig::new(&dir, "notes.db")).await.unwrap();
//! sqlx::query("CREATE TABLE IF NOT EXISTS notes (n BIGINT PRIMARY KEY, text TEXT NOT NULL)")
//!     .execute(&mut *db.writer().await.unwrap())
//!     .await
//!     .unwrap();
//! let n = add_note(&db).await.unwrap();
//!
//! // Reads see every commit.
//! let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM notes").fetch_one(db.pool()).await.unwrap();
//! assert_eq!(count, n);
//! # db.close().await;
//! # std::fs::remove_dir_all(&dir).ok();
//! # }
//! ```

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use sqlx::{
    AnyConnection, AnyPool, Connection as _,
    any::{AnyConnectOptions, AnyPoolOptions},
    migrate::Migrator,
};

mod error;
mod writer;

pub use error::{Failure, RETRY_AFTER_SECS, StoreError, problem, retry};
use writer::Writer;
pub use writer::{WriteConnection, WriteTransaction};

use crate::{
    config::{Reader, Secret},
    health::{Check, CheckError},
};

/// The database engine behind a [`Database`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backend {
    /// One SQLite file in the service's data directory: the embedded
    /// default, for one instance of the service.
    Sqlite,
    /// A PostgreSQL database shared by every instance of the service
    /// (feature `postgres`).
    Postgres,
}

impl Backend {
    /// The OpenTelemetry `db.system.name` of the engine: `sqlite` or
    /// `postgresql`, for [`Span::storage`](crate::otel::Span::storage).
    pub fn system_name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgresql",
        }
    }
}

/// Where a service's database lives and how many connections it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbConfig {
    /// The service's data directory; created when missing. The SQLite
    /// file lives in it; with Postgres it still holds the service's other
    /// local data, if any.
    pub data_dir: PathBuf,
    /// The SQLite file's name inside it.
    pub file: String,
    /// A `postgres://` URL: the database is that Postgres database instead
    /// of the SQLite file (feature `postgres`). The URL may hold a
    /// password, so it is kept as a [`Secret`] and shown without it.
    pub url: Option<Secret<String>>,
    /// SQLite: read-only connections in the read pool, the writer being
    /// one more. Postgres: the pool holds `pool_size + 1` connections,
    /// shared by reads and writes; so an instance opens at most
    /// `pool_size + 1` connections on either backend.
    pub pool_size: u32,
    /// SQLite: how long a statement waits for a lock held by another
    /// connection (in practice, another process: within the service,
    /// writers queue for the one writer instead).
    pub busy_timeout: Duration,
    /// How long a request waits for the writer, or for a connection,
    /// before it fails with [`sqlx::Error::PoolTimedOut`] (503).
    pub acquire_timeout: Duration,
    /// SQLite: the writer's page cache, in MiB (SQLite's default is
    /// 2 MiB). Only the writer changes the file, so what it caches stays
    /// valid from one write to the next; a reader's cache is emptied
    /// whenever the writer has committed since its last read, so readers
    /// keep the default.
    pub writer_cache_mib: u32,
}

impl DbConfig {
    /// A SQLite database `file` in `data_dir`, with 4 readers, 5 s timeouts
    /// and a 16 MiB cache for the writer.
    pub fn new(data_dir: impl AsRef<Path>, file: &str) -> Self {
        Self {
            data_dir: data_dir.as_ref().to_owned(),
            file: file.to_owned(),
            url: None,
            pool_size: 4,
            busy_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(5),
            writer_cache_mib: 16,
        }
    }

    /// The same settings on the Postgres database at `url`
    /// (`postgres://user:password@host:port/database`).
    #[must_use]
    pub fn postgres(mut self, url: impl Into<String>) -> Self {
        self.url = Some(Secret::new(url.into()));
        self
    }

    /// Reads the settings of the table in the [module docs](self) under
    /// `prefix` (`ORDERS` reads `ORDERS_DATABASE_URL`, ...); the SQLite
    /// file is `<service>.db`. Every problem is reported to `r`.
    pub fn read(r: &mut Reader<'_>, prefix: &str, service: &str) -> Self {
        let data_dir: PathBuf = r.optional(
            &format!("{prefix}_DATA_DIR"),
            PathBuf::from("data").join(service),
            "directory of the service's data (and of its SQLite database)",
        );
        let url_var = format!("{prefix}_DATABASE_URL");
        let url = r.maybe_secret(
            &url_var,
            "postgres:// URL of the service's database; unset: SQLite in the data directory",
        );
        if let Some(Err(problem)) = url.as_ref().map(|url| check_url(url.expose())) {
            r.problem(&url_var, problem);
        }
        let pool_var = format!("{prefix}_DB_POOL_SIZE");
        let pool_size: u32 = r.optional(
            &pool_var,
            4,
            "read connections to the database (the writer is one more)",
        );
        if pool_size == 0 {
            r.problem(&pool_var, "must be at least 1");
        }
        let acquire_var = format!("{prefix}_DB_ACQUIRE_TIMEOUT_MS");
        let acquire_ms: u64 = r.optional(
            &acquire_var,
            5_000,
            "longest wait for the writer or a connection before 503",
        );
        if acquire_ms == 0 {
            r.problem(&acquire_var, "must be at least 1");
        }
        let cache_var = format!("{prefix}_DB_WRITER_CACHE_MIB");
        let writer_cache_mib: u32 =
            r.optional(&cache_var, 16, "page cache of the SQLite writer, in MiB");
        if writer_cache_mib == 0 {
            r.problem(&cache_var, "must be at least 1");
        }
        Self {
            url,
            pool_size: pool_size.max(1),
            acquire_timeout: Duration::from_millis(acquire_ms.max(1)),
            writer_cache_mib: writer_cache_mib.max(1),
            ..Self::new(data_dir, &format!("{service}.db"))
        }
    }

    /// The SQLite database file's path (unused on Postgres).
    pub fn path(&self) -> PathBuf {
        self.data_dir.join(&self.file)
    }

    /// The engine these settings open.
    pub fn backend(&self) -> Backend {
        if self.url.is_some() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    /// What the database is called in messages: the SQLite file's path,
    /// or the Postgres URL without its password and parameters.
    pub fn display_name(&self) -> String {
        match &self.url {
            Some(url) => redacted(url.expose()),
            None => self.path().display().to_string(),
        }
    }
}

/// Why `url` cannot name a Postgres database, if it cannot.
fn check_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(
            "must be a postgres:// URL (leave it unset for SQLite in the data directory)".into(),
        );
    }
    if !cfg!(feature = "postgres") {
        return Err("this build has no Postgres support (the chassis' `postgres` feature)".into());
    }
    Ok(())
}

/// `url` without its password and query: `postgres://user@host:5432/db`.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(an unreadable database URL)".into();
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = match authority.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or_default();
            format!("{user}@{host}")
        }
        None => authority.to_owned(),
    };
    format!("{scheme}://{host}/{path}")
}

/// The migrations of a service, one directory per engine, embedded with
/// `sqlx::migrate!`: SQL differs between SQLite and Postgres, the schema's
/// meaning does not.
///
/// ```no_run
/// # async fn f(config: chassis::db::DbConfig) -> Result<(), chassis::db::DbError> {
/// use chassis::db::{Database, Migrations};
///
/// let db = Database::open_migrated(
///     &config,
///     Migrations::new(&sqlx::migrate!("migrations/sqlite"))
///         .postgres(&sqlx::migrate!("migrations/postgres")),
/// )
/// .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Migrations<'a> {
    sqlite: &'a Migrator,
    postgres: Option<&'a Migrator>,
}

impl<'a> Migrations<'a> {
    /// The SQLite migrations; a service without Postgres migrations can
    /// only run on SQLite.
    pub fn new(sqlite: &'a Migrator) -> Self {
        Self {
            sqlite,
            postgres: None,
        }
    }

    /// The Postgres migrations.
    #[must_use]
    pub fn postgres(mut self, postgres: &'a Migrator) -> Self {
        self.postgres = Some(postgres);
        self
    }
}

/// Why the database could not be opened or migrated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The database could not be opened.
    #[error("cannot open the database {name}: {source}")]
    Open {
        /// The database: its file, or its URL without the password.
        name: String,
        /// Why.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("cannot migrate the database {name}: {source}")]
    Migrate {
        /// The database: its file, or its URL without the password.
        name: String,
        /// Why.
        source: sqlx::migrate::MigrateError,
    },
    /// The service has no migrations for the configured engine.
    #[error("the database {name} is {backend:?}, and the service has no migrations for it")]
    NoMigrations {
        /// The database.
        name: String,
        /// Its engine.
        backend: Backend,
    },
}

/// A service's database (see the [module docs](self)): on SQLite one
/// writer connection and a pool of read-only readers over one file, on
/// Postgres one pool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Database {
    pool: AnyPool,
    /// SQLite's one writer; `None` on Postgres, where writes take a
    /// connection of the pool.
    writer: Option<Writer>,
    backend: Backend,
    name: Arc<str>,
}

impl Database {
    /// Opens the database with the house settings. SQLite: the file is
    /// created when missing; the writer first (it creates the file and
    /// puts it in WAL mode), then the readers. Postgres: the pool, with
    /// one connection made to check the server answers.
    pub async fn open(config: &DbConfig) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        std::fs::create_dir_all(&config.data_dir).map_err(|source| DbError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let name: Arc<str> = config.display_name().into();
        let open = |source| DbError::Open {
            name: name.to_string(),
            source,
        };
        match &config.url {
            Some(url) => {
                let options: AnyConnectOptions = url.expose().parse().map_err(open)?;
                let pool = AnyPoolOptions::new()
                    .max_connections(config.pool_size + 1)
                    .acquire_timeout(config.acquire_timeout)
                    .connect_with(options)
                    .await
                    .map_err(open)?;
                Ok(Self {
                    pool,
                    writer: None,
                    backend: Backend::Postgres,
                    name,
                })
            }
            None => {
                let url = sqlite_url(&config.path());
                let each = format!(
                    "PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = {}",
                    config.busy_timeout.as_millis()
                );
                // A negative `cache_size` is in KiB.
                let writer_setup = format!(
                    "PRAGMA journal_mode = WAL; {each}; PRAGMA cache_size = {}",
                    -i64::from(config.writer_cache_mib) * 1024
                );
                let options: AnyConnectOptions = format!("{url}?mode=rwc").parse().map_err(open)?;
                let mut writer = AnyConnection::connect_with(&options).await.map_err(open)?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(writer_setup))
                    .execute(&mut writer)
                    .await
                    .map_err(open)?;
                // A connection to a local file does not go stale, and sqlx
                // tests each one as it goes back to the pool: testing it
                // again before each use would only cost a round trip to
                // its thread.
                let each: Arc<str> = each.into();
                let options: AnyConnectOptions = format!("{url}?mode=ro").parse().map_err(open)?;
                let readers = AnyPoolOptions::new()
                    .max_connections(config.pool_size)
                    .acquire_timeout(config.acquire_timeout)
                    .test_before_acquire(false)
                    .after_connect(move |conn, _| {
                        let each = each.clone();
                        Box::pin(async move {
                            sqlx::raw_sql(sqlx::AssertSqlSafe(each.to_string()))
                                .execute(conn)
                                .await
                                .map(drop)
                        })
                    })
                    .connect_with(options)
                    .await
                    .map_err(open)?;
                Ok(Self {
                    pool: readers,
                    writer: Some(Writer::new(writer, config.acquire_timeout)),
                    backend: Backend::Sqlite,
                    name,
                })
            }
        }
    }

    /// Opens the database and runs the service's `migrations` for its
    /// engine. On Postgres, instances starting together take turns (the
    /// migrations hold an advisory lock), and each migration runs once.
    pub async fn open_migrated(
        config: &DbConfig,
        migrations: Migrations<'_>,
    ) -> Result<Self, DbError> {
        let db = Self::open(config).await?;
        let migrator = match db.backend {
            Backend::Sqlite => migrations.sqlite,
            Backend::Postgres => migrations.postgres.ok_or_else(|| DbError::NoMigrations {
                name: db.name.to_string(),
                backend: db.backend,
            })?,
        };
        let migrate = |source| DbError::Migrate {
            name: db.name.to_string(),
            source,
        };
        let mut writer = db
            .writer()
            .await
            .map_err(|e| migrate(sqlx::migrate::MigrateError::Execute(e)))?;
        migrator.run(&mut *writer).await.map_err(migrate)?;
        drop(writer);
        Ok(db)
    }

    /// The engine.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The connections for statements that only read. SQLite: the
    /// read-only readers (a write through them fails with
    /// `SQLITE_READONLY`, a bug: 500). Postgres: the pool.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A connection that writes, for a write of one statement:
    /// `execute(&mut *db.writer().await?)`. SQLite: the one writer;
    /// callers get it in turn, in the order they asked, the next one as
    /// soon as this one is dropped. Postgres: a connection of the pool.
    /// For several statements use [`begin_write`](Self::begin_write).
    ///
    /// # Errors
    ///
    /// [`sqlx::Error::PoolTimedOut`] when no connection frees up within
    /// [`DbConfig::acquire_timeout`] (503 through [`StoreError`]);
    /// [`sqlx::Error::PoolClosed`] after [`close`](Self::close).
    pub async fn writer(&self) -> Result<WriteConnection, sqlx::Error> {
        match &self.writer {
            Some(writer) => writer.acquire().await,
            None => self.pool.acquire().await.map(WriteConnection::pooled),
        }
    }

    /// Begins a write transaction. SQLite: on the writer, with
    /// `BEGIN IMMEDIATE`, so it holds the write lock from its first
    /// statement and what it reads stays as read until it commits.
    /// Postgres: `BEGIN` on a connection of the pool, at the server's
    /// isolation level (read committed unless configured otherwise): a
    /// read that decides a write locks what it reads, or the write checks
    /// its condition itself (see the module docs). Run every statement of
    /// it, reads included, on the transaction; dropping it uncommitted
    /// rolls it back.
    ///
    /// # Errors
    ///
    /// [`sqlx::Error::PoolTimedOut`] when no connection frees up within
    /// [`DbConfig::acquire_timeout`]; `SQLITE_BUSY` when another process
    /// holds the file's lock past [`DbConfig::busy_timeout`]. Both answer
    /// 503 through [`StoreError`].
    pub async fn begin_write(&self) -> Result<WriteTransaction, sqlx::Error> {
        match &self.writer {
            Some(writer) => WriteTransaction::begin(writer.acquire().await?).await,
            None => self.pool.begin().await.map(WriteTransaction::pooled),
        }
    }

    /// What the database is called in messages: the SQLite file, or the
    /// Postgres URL without its password.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes every connection; on SQLite the readers first, so that the
    /// writer, closing last, checkpoints the WAL into the file.
    pub async fn close(&self) {
        self.pool.close().await;
        if let Some(writer) = &self.writer {
            writer.close().await;
        }
    }

    /// A readiness check that the database takes writes: it begins a write
    /// transaction and rolls it back, so a write lock held elsewhere for
    /// longer than the check's timeout (a stuck writer, another process
    /// holding the SQLite file), or a Postgres pool with no connection to
    /// spare, fails it. Register it for services that must write to serve;
    /// with the default hysteresis a failure must persist across three
    /// runs before readiness turns down.
    pub fn write_check(&self) -> WriteCheck {
        WriteCheck(self.clone())
    }
}

/// `path` as a `sqlite:` URL: the characters that would end the path
/// (`?`, `#`) and `%` itself percent-encoded.
fn sqlite_url(path: &Path) -> String {
    let mut url = String::from("sqlite:");
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => url.push_str("%25"),
            '?' => url.push_str("%3F"),
            '#' => url.push_str("%23"),
            c => url.push(c),
        }
    }
    url
}

/// See [`Database::write_check`].
#[derive(Debug, Clone)]
pub struct WriteCheck(Database);

impl Check for WriteCheck {
    async fn check(&self) -> Result<(), CheckError> {
        let fail = |e: sqlx::Error| {
            CheckError::new(format!("database {} takes no writes: {e}", self.0.name))
        };
        let tx = self.0.begin_write().await.map_err(fail)?;
        tx.rollback().await.map_err(fail)
    }
}

/// Ready while the database can be read. SQLite: the check reads the
/// schema, so a file another process holds locked, or one that cannot be
/// read, is not ready (a bare `SELECT 1` would not touch the file at all).
/// Postgres: a statement on a connection of the pool, so a server that is
/// down, or a pool with no connection to spare, is not ready.
impl Check for Database {
    async fn check(&self) -> Result<(), CheckError> {
        let sql = match self.backend {
            Backend::Sqlite => "SELECT COUNT(*) FROM sqlite_master",
            Backend::Postgres => "SELECT COUNT(*) FROM pg_catalog.pg_namespace",
        };
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.pool)
            .await
            .map(drop)
            .map_err(|e| CheckError::new(format!("database {}: {e}", self.name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "chassis-db-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn opens_with_the_house_settings() {
        let dir = temp_dir("settings").join("nested");
        let db = Database::open(&DbConfig::new(&dir, "t.db")).await.unwrap();
        // journal mode, foreign keys, synchronous, busy timeout, cache (in
        // KiB when negative).
        type Settings = (String, i64, i64, i64, i64);
        let settings = sqlx::query_as::<_, Settings>(
            "SELECT * FROM pragma_journal_mode, pragma_foreign_keys, pragma_synchronous,
                           pragma_busy_timeout, pragma_cache_size",
        );
        let reader = settings.fetch_one(db.pool()).await.unwrap();
        assert_eq!(reader, ("wal".to_owned(), 1, 1, 5000, -2000));
        let settings = sqlx::query_as::<_, Settings>(
            "SELECT * FROM pragma_journal_mode, pragma_foreign_keys, pragma_synchronous,
                           pragma_busy_timeout, pragma_cache_size",
        );
        let writer = settings
            .fetch_one(&mut *db.writer().await.unwrap())
            .await
            .unwrap();
        assert_eq!(writer, ("wal".to_owned(), 1, 1, 5000, -16384));
        assert!(dir.join("t.db").exists());
        assert!(db.check().await.is_ok());
        assert!(db.write_check().check().await.is_ok());

        // Another connection holding the write lock fails the write check.
        let other = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(dir.join("t.db")))
            .await
            .unwrap();
        let mut held = other.begin_with("BEGIN IMMEDIATE").await.unwrap();
        sqlx::query("SELECT 1").execute(&mut *held).await.unwrap();
        let short = Database::open(&DbConfig {
            busy_timeout: Duration::from_millis(50),
            ..DbConfig::new(&dir, "t.db")
        })
        .await
        .unwrap();
        assert!(short.write_check().check().await.is_err());
        assert!(short.check().await.is_ok(), "reads go on in WAL mode");
        held.rollback().await.unwrap();
        assert!(short.write_check().check().await.is_ok());
        short.close().await;
        other.close().await;

        db.close().await;
        assert!(db.check().await.is_err(), "a closed pool is not ready");
    }

    /// The primary result code of a database error.
    fn primary_code(e: &sqlx::Error) -> Option<i32> {
        let code = e.as_database_error()?.code()?.parse::<i32>().ok()?;
        Some(code & 0xff)
    }

    /// A database with no busy handler at all: a statement that finds the
    /// lock taken fails at once with `SQLITE_BUSY` instead of sleeping.
    async fn without_busy_handler(dir: &Path, acquire_timeout: Duration) -> Database {
        let db = Database::open(&DbConfig {
            busy_timeout: Duration::ZERO,
            acquire_timeout,
            ..DbConfig::new(dir, "t.db")
        })
        .await
        .unwrap();
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
             INSERT OR IGNORE INTO counter VALUES (1, 0);
             CREATE TABLE IF NOT EXISTS turns (n INTEGER PRIMARY KEY)",
        )
        .execute(&mut *db.writer().await.unwrap())
        .await
        .unwrap();
        db
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_take_turns_at_the_writer_and_never_meet_the_lock() {
        let dir = temp_dir("writers");
        let db = without_busy_handler(&dir, Duration::from_secs(60)).await;
        let read = sqlx::query_scalar::<_, i64>("PRAGMA busy_timeout");
        let written = sqlx::query_scalar::<_, i64>("PRAGMA busy_timeout");
        let busy = (
            written
                .fetch_one(&mut *db.writer().await.unwrap())
                .await
                .unwrap(),
            read.fetch_one(db.pool()).await.unwrap(),
        );
        assert_eq!(busy, (0, 0));

        // Without the busy handler a contended lock fails at once: another
        // handle on the file (as a second process would be) cannot write
        // while this one's writer holds the lock.
        let other = without_busy_handler(&dir, Duration::from_secs(60)).await;
        let held = db.begin_write().await.unwrap();
        let refused = other.begin_write().await.unwrap_err();
        assert_eq!(primary_code(&refused), Some(5), "{refused}");
        assert_eq!(Failure::of(&refused), Failure::Unavailable);
        held.rollback().await.unwrap();
        other.close().await;

        // So 50 write transactions at once, each reading, yielding with the
        // lock held, and writing what it read plus one, all succeed only
        // because they wait for the writer in turn, never for the lock; and
        // none lost another's update.
        let writers: Vec<_> = (0..50)
            .map(|_| {
                let db = db.clone();
                tokio::spawn(async move {
                    let mut tx = db.begin_write().await?;
                    let n: i64 = sqlx::query_scalar("SELECT n FROM counter")
                        .fetch_one(&mut *tx)
                        .await?;
                    tokio::task::yield_now().await;
                    sqlx::query("UPDATE counter SET n = ?")
                        .bind(n + 1)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("INSERT INTO turns (n) VALUES (?)")
                        .bind(n + 1)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap().unwrap();
        }
        let (n, turns): (i64, i64) =
            sqlx::query_as("SELECT n, (SELECT COUNT(*) FROM turns) FROM counter")
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!((n, turns), (50, 50));
        db.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn readers_cannot_write_and_see_every_commit() {
        let dir = temp_dir("readers");
        let db = without_busy_handler(&dir, Duration::from_secs(60)).await;

        let refused = sqlx::query("UPDATE counter SET n = 7")
            .execute(db.pool())
            .await
            .unwrap_err();
        assert_eq!(
            primary_code(&refused),
            Some(8),
            "SQLITE_READONLY: {refused}"
        );
        assert_eq!(Failure::of(&refused), Failure::Other, "a bug, not a retry");

        // Every reader at once, each its own connection.
        let mut readers = Vec::new();
        for _ in 0..DbConfig::new(&dir, "t.db").pool_size {
            readers.push(db.pool().acquire().await.unwrap());
        }
        async fn read(
            conn: &mut sqlx::pool::PoolConnection<sqlx::Any>,
        ) -> Result<i64, sqlx::Error> {
            sqlx::query_scalar("SELECT n FROM counter")
                .fetch_one(&mut **conn)
                .await
        }
        let mut tx = db.begin_write().await.unwrap();
        sqlx::query("UPDATE counter SET n = 1")
            .execute(&mut *tx)
            .await
            .unwrap();
        // A write in progress holds no reader up (with no busy handler a
        // wait would be an error) and is not seen before it commits.
        for conn in &mut readers {
            assert_eq!(read(conn).await.unwrap(), 0);
        }
        tx.commit().await.unwrap();
        for conn in &mut readers {
            assert_eq!(
                read(conn).await.unwrap(),
                1,
                "a read after the commit sees it"
            );
        }
        drop(readers);
        db.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_writer_busy_past_the_acquire_timeout_answers_503() {
        let dir = temp_dir("acquire");
        let db = without_busy_handler(&dir, Duration::from_millis(50)).await;
        let held = db.begin_write().await.unwrap();
        let late = db.begin_write().await.unwrap_err();
        assert!(matches!(late, sqlx::Error::PoolTimedOut), "{late}");
        let problem = crate::Problem::from(StoreError::from(late));
        assert_eq!(problem.status(), 503);
        let res = axum::response::IntoResponse::into_response(problem);
        assert_eq!(res.headers()[http::header::RETRY_AFTER], "1");
        // One statement on the writer waits in the same queue.
        let late = db.writer().await.unwrap_err();
        assert!(matches!(late, sqlx::Error::PoolTimedOut), "{late}");
        // Reads go on meanwhile.
        assert!(db.check().await.is_ok());
        held.rollback().await.unwrap();
        db.begin_write().await.unwrap().commit().await.unwrap();
        db.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_write_left_unfinished_is_undone_before_the_next() {
        let dir = temp_dir("unfinished");
        let db = without_busy_handler(&dir, Duration::from_secs(60)).await;
        let mut tx = db.begin_write().await.unwrap();
        sqlx::query("UPDATE counter SET n = 10")
            .execute(&mut *tx)
            .await
            .unwrap();
        drop(tx);
        // Callers that give up (a request cancelled) wherever they are:
        // waiting for the writer, beginning, writing.
        for wait in 0..6 {
            let given_up = tokio::time::timeout(Duration::from_millis(wait), async {
                let mut tx = db.begin_write().await?;
                sqlx::query("UPDATE counter SET n = 20")
                    .execute(&mut *tx)
                    .await?;
                std::future::pending::<()>().await;
                tx.commit().await
            })
            .await;
            assert!(given_up.is_err());
        }
        let mut tx = db.begin_write().await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT n FROM counter")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 0, "nothing of the unfinished writes is left");
        sqlx::query("UPDATE counter SET n = 1")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT n FROM counter")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(n, 1);

        db.close().await;
        let closed = db.writer().await.unwrap_err();
        assert!(matches!(closed, sqlx::Error::PoolClosed), "{closed}");
        assert_eq!(Failure::of(&closed), Failure::Unavailable);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_write_dropped_unfinished_frees_the_file_for_another_process() {
        let dir = temp_dir("dropped");
        let a = without_busy_handler(&dir, Duration::from_secs(60)).await;
        // Another handle on the file, as a second process would be, that
        // waits for the lock at most 5 s.
        let b = Database::open(&DbConfig::new(&dir, "t.db")).await.unwrap();
        async fn fails_half_way(db: &Database) -> Result<(), sqlx::Error> {
            let mut tx = db.begin_write().await?;
            sqlx::query("UPDATE counter SET n = 5")
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO no_such_table VALUES (1)")
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
        assert!(fails_half_way(&a).await.is_err());
        // `a` does not write again; `b` gets the lock all the same, and
        // sees nothing of the failed transaction.
        let mut tx = b.begin_write().await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT n FROM counter")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 0);
        tx.commit().await.unwrap();
        a.close().await;
        b.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reads_its_settings_and_reports_problems() {
        let env = Env::from_pairs([
            ("ORDERS_DATA_DIR", "/srv/orders"),
            ("ORDERS_DB_POOL_SIZE", "8"),
            ("ORDERS_DB_ACQUIRE_TIMEOUT_MS", "250"),
            ("ORDERS_DB_WRITER_CACHE_MIB", "64"),
        ]);
        let mut r = Reader::new(&env);
        let c = DbConfig::read(&mut r, "ORDERS", "orders");
        r.finish().unwrap();
        assert_eq!(c.path(), PathBuf::from("/srv/orders/orders.db"));
        assert_eq!(c.backend(), Backend::Sqlite);
        assert_eq!(c.pool_size, 8);
        assert_eq!(
            (c.busy_timeout, c.acquire_timeout, c.writer_cache_mib),
            (Duration::from_secs(5), Duration::from_millis(250), 64)
        );

        let defaults = DbConfig::read(
            &mut Reader::new(&Env::from_pairs::<&str, &str>([])),
            "ORDERS",
            "orders",
        );
        assert_eq!(defaults.path(), PathBuf::from("data/orders/orders.db"));
        assert_eq!(
            (
                defaults.pool_size,
                defaults.acquire_timeout,
                defaults.writer_cache_mib
            ),
            (4, Duration::from_secs(5), 16)
        );

        // Every problem at once.
        let env = Env::from_pairs([
            ("ORDERS_DB_POOL_SIZE", "0"),
            ("ORDERS_DB_ACQUIRE_TIMEOUT_MS", "0"),
            ("ORDERS_DB_WRITER_CACHE_MIB", "lots"),
            ("ORDERS_DATABASE_URL", "mysql://root:hunter2@db/orders"),
        ]);
        let mut r = Reader::new(&env);
        let _ = DbConfig::read(&mut r, "ORDERS", "orders");
        let err = r.finish().unwrap_err();
        let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ORDERS_DATABASE_URL",
                "ORDERS_DB_POOL_SIZE",
                "ORDERS_DB_ACQUIRE_TIMEOUT_MS",
                "ORDERS_DB_WRITER_CACHE_MIB"
            ]
        );
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn a_postgres_url_is_shown_without_its_password() {
        let url = "postgres://orders:hunter2@db.internal:5432/orders?sslmode=require&password=x";
        let c = DbConfig::new("/srv", "o.db").postgres(url);
        assert_eq!(c.backend(), Backend::Postgres);
        assert_eq!(
            c.display_name(),
            "postgres://orders@db.internal:5432/orders"
        );
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(redacted("postgresql://db/x"), "postgresql://db/x");
        assert_eq!(redacted("nonsense"), "(an unreadable database URL)");
        assert_eq!(
            sqlite_url(Path::new("/data/a?b#c%d.db")),
            "sqlite:/data/a%3Fb%23c%25d.db"
        );
    }

    #[tokio::test]
    async fn a_file_named_with_url_characters_opens() {
        let dir = temp_dir("name?with#odd%chars");
        let db = Database::open(&DbConfig::new(&dir, "a?b.db"))
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (n BIGINT)")
            .execute(&mut *db.writer().await.unwrap())
            .await
            .unwrap();
        db.close().await;
        assert!(dir.join("a?b.db").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
