//! SQLite storage: one database file per service, opened the same way by
//! every service, with one writer and a pool of readers.
//!
//! # The standard
//!
//! A service owns its data: its own database file, which no other service
//! opens (services share data through their APIs and events, never through
//! tables). The file is opened with the settings that make SQLite a sound
//! server database:
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
//!   process that opened the file (a backup, a second instance, a shell);
//! * an **acquire timeout** (5 s): a request that cannot get the writer or
//!   a reader in time fails with 503 instead of waiting without end;
//! * **migrations** embedded in the binary (`sqlx::migrate!()`), run at
//!   start-up before the service answers;
//! * a **readiness check** (a read of the schema, with the check's
//!   timeout), so a database that cannot be read, or that another process
//!   holds locked, takes the service out of rotation.
//!
//! A storage failure answers the same in every service ([`StoreError`],
//! [`problem`]): a database that is busy, locked, out of connections
//! (the acquire timeout passed) or failing I/O is **503 with
//! `Retry-After`** (the request may succeed later), a unique key already
//! taken is **409**, anything else is 500 (a write through the readers
//! included: a bug). The body never holds the database's message, SQL or
//! file names; the original error is logged.
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
//! # How the chassis does it
//!
//! [`Database`] holds one writer connection behind a first-come,
//! first-served lock (tokio's fair mutex), and a sqlx pool of read-only
//! connections:
//!
//! * reads: [`Database::pool`], the readers;
//! * a write of one statement: `execute(&mut *db.writer().await?)`
//!   ([`Database::writer`]);
//! * a write of several statements, or a read that decides a write (a
//!   capacity check, an idempotency key, a state change):
//!   [`Database::begin_write`], a `BEGIN IMMEDIATE` [`WriteTransaction`]
//!   on the writer, with every statement of it, reads included, on the
//!   transaction (`&mut *tx`).
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
//! ## Connection budget
//!
//! Per service: `<PREFIX>_DB_POOL_SIZE` readers (4 by default) plus the one
//! writer, so 5 connections to the file, each with a thread of sqlx's
//! SQLite driver, and each with its page cache (up to 2 MiB for a reader,
//! 16 MiB for the writer). More writers would not write faster: SQLite
//! runs one write transaction at a time whatever the number of
//! connections.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `<PREFIX>_DATA_DIR` | `./data/<service>` | directory of the database file and other data |
//! | `<PREFIX>_DB_POOL_SIZE` | `4` | read connections (the writer is one more) |
//!
//! # Example
//!
//! ```
//! use chassis::sqlite::{Database, DbConfig, StoreError};
//!
//! /// Adds a note numbered after the ones before it.
//! async fn add_note(db: &Database) -> Result<i64, StoreError> {
//!     // The count and the insert in one transaction that holds the write
//!     // lock from its first statement: no other note can come in between.
//!     let mut tx = db.begin_write().await?;
//!     let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM notes")
//!         .fetch_one(&mut *tx)
//!         .await?;
//!     sqlx::query("INSERT INTO notes (text) VALUES (?)")
//!         .bind(format!("note {}", n + 1))
//!         .execute(&mut *tx)
//!         .await?;
//!     tx.commit().await?;
//!     Ok(n + 1)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let dir = std::env::temp_dir().join(format!("chassis-doc-{}", std::process::id()));
//! let db = Database::open(&DbConfig::new(&dir, "notes.db")).await.unwrap();
//! // One statement on the writer.
//! sqlx::query("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
//!     .execute(&mut *db.writer().await.unwrap())
//!     .await
//!     .unwrap();
//! let n = add_note(&db).await.unwrap();
//!
//! // Reads, on the readers, see every commit.
//! let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM notes").fetch_one(db.pool()).await.unwrap();
//! assert_eq!(count, n);
//! let mode: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(db.pool()).await.unwrap();
//! assert_eq!(mode, "wal");
//! # db.close().await;
//! # std::fs::remove_dir_all(&dir).ok();
//! # }
//! ```

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use sqlx::{
    ConnectOptions as _, SqlitePool,
    migrate::Migrator,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

mod error;
mod writer;

pub use error::{Failure, RETRY_AFTER_SECS, StoreError, problem};
use writer::Writer;
pub use writer::{WriteConnection, WriteTransaction};

use crate::{
    config::Reader,
    health::{Check, CheckError},
};

/// Where a service's database lives and how many connections it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbConfig {
    /// The service's data directory; created when missing.
    pub data_dir: PathBuf,
    /// The database file's name inside it.
    pub file: String,
    /// Read-only connections in the read pool; the writer is one more.
    pub pool_size: u32,
    /// How long a statement waits for a lock held by another connection
    /// (in practice, another process: within the service, writers queue for
    /// the one writer instead).
    pub busy_timeout: Duration,
    /// How long a request waits for the writer, or for a reader, before it
    /// fails with [`sqlx::Error::PoolTimedOut`] (503).
    pub acquire_timeout: Duration,
    /// The writer's page cache, in MiB (SQLite's default is 2 MiB). Only
    /// the writer changes the file, so what it caches stays valid from one
    /// write to the next; a reader's cache is emptied whenever the writer
    /// has committed since its last read, so readers keep the default.
    pub writer_cache_mib: u32,
}

impl DbConfig {
    /// A database `file` in `data_dir`, with 4 readers, 5 s timeouts and a
    /// 16 MiB cache for the writer.
    pub fn new(data_dir: impl AsRef<Path>, file: &str) -> Self {
        Self {
            data_dir: data_dir.as_ref().to_owned(),
            file: file.to_owned(),
            pool_size: 4,
            busy_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(5),
            writer_cache_mib: 16,
        }
    }

    /// Reads `<prefix>_DATA_DIR` (default `./data/<service>`) and
    /// `<prefix>_DB_POOL_SIZE` (readers, default 4); the file is
    /// `<service>.db`.
    pub fn read(r: &mut Reader<'_>, prefix: &str, service: &str) -> Self {
        let data_dir: PathBuf = r.optional(
            &format!("{prefix}_DATA_DIR"),
            PathBuf::from("data").join(service),
            "directory of the service's data",
        );
        let pool_size: u32 = r.optional(
            &format!("{prefix}_DB_POOL_SIZE"),
            4,
            "read connections to the database (the writer is one more)",
        );
        if pool_size == 0 {
            r.problem(&format!("{prefix}_DB_POOL_SIZE"), "must be at least 1");
        }
        Self {
            pool_size: pool_size.max(1),
            ..Self::new(data_dir, &format!("{service}.db"))
        }
    }

    /// The database file's path.
    pub fn path(&self) -> PathBuf {
        self.data_dir.join(&self.file)
    }
}

/// Why the database could not be opened or migrated.
#[derive(Debug, thiserror::Error)]
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
    #[error("cannot open the database {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("cannot migrate the database {path}: {source}")]
    Migrate {
        /// The file.
        path: PathBuf,
        /// Why.
        source: sqlx::migrate::MigrateError,
    },
}

/// A service's database: one writer connection and a pool of read-only
/// readers over one SQLite file (see the [module docs](self)). Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct Database {
    readers: SqlitePool,
    writer: Writer,
    path: PathBuf,
}

impl Database {
    /// Opens (creating when missing) the database with the house settings:
    /// the writer first (it creates the file and puts it in WAL mode), then
    /// the readers.
    pub async fn open(config: &DbConfig) -> Result<Self, DbError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| DbError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let path = config.path();
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(config.busy_timeout);
        let open = |source| DbError::Open {
            path: path.clone(),
            source,
        };
        // A negative `cache_size` is in KiB.
        let writer_cache = -i64::from(config.writer_cache_mib) * 1024;
        let writer = options
            .clone()
            .create_if_missing(true)
            .pragma("cache_size", writer_cache.to_string())
            .connect()
            .await
            .map_err(open)?;
        // A connection to a local file does not go stale, and sqlx tests
        // each one as it goes back to the pool: testing it again before
        // each use would only cost a round trip to its thread.
        let readers = SqlitePoolOptions::new()
            .max_connections(config.pool_size)
            .acquire_timeout(config.acquire_timeout)
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await
            .map_err(open)?;
        Ok(Self {
            readers,
            writer: Writer::new(writer, config.acquire_timeout),
            path,
        })
    }

    /// Opens the database and runs `migrations` (embed them with
    /// `sqlx::migrate!()` in the service's crate) on the writer.
    pub async fn open_migrated(config: &DbConfig, migrations: &Migrator) -> Result<Self, DbError> {
        let db = Self::open(config).await?;
        let migrate = |source| DbError::Migrate {
            path: db.path.clone(),
            source,
        };
        let mut writer = db
            .writer()
            .await
            .map_err(|e| migrate(sqlx::migrate::MigrateError::Execute(e)))?;
        migrations.run(&mut *writer).await.map_err(migrate)?;
        drop(writer);
        Ok(db)
    }

    /// The readers: a pool of read-only connections, for every statement
    /// that only reads. A write through them fails (`SQLITE_READONLY`).
    pub fn pool(&self) -> &SqlitePool {
        &self.readers
    }

    /// The writer, the one connection that writes, for a write of one
    /// statement: `execute(&mut *db.writer().await?)`. Callers get it in
    /// turn, in the order they asked; the next one as soon as this one is
    /// dropped. For several statements use
    /// [`begin_write`](Self::begin_write).
    ///
    /// # Errors
    ///
    /// [`sqlx::Error::PoolTimedOut`] when the writer stays busy past
    /// [`DbConfig::acquire_timeout`] (503 through [`StoreError`]);
    /// [`sqlx::Error::PoolClosed`] after [`close`](Self::close).
    pub async fn writer(&self) -> Result<WriteConnection, sqlx::Error> {
        self.writer.acquire().await
    }

    /// Begins a write transaction on the writer, with `BEGIN IMMEDIATE`:
    /// it holds the write lock from its first statement, so what it reads
    /// stays as read until it commits. Run every statement of it, reads
    /// included, on the transaction; dropping it uncommitted rolls it
    /// back.
    ///
    /// # Errors
    ///
    /// [`sqlx::Error::PoolTimedOut`] when the writer stays busy past
    /// [`DbConfig::acquire_timeout`]; `SQLITE_BUSY` when another process
    /// holds the lock past [`DbConfig::busy_timeout`]. Both answer 503
    /// through [`StoreError`].
    pub async fn begin_write(&self) -> Result<WriteTransaction, sqlx::Error> {
        WriteTransaction::begin(self.writer.acquire().await?).await
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes every connection, the readers first, so that the writer,
    /// closing last, checkpoints the WAL into the file.
    pub async fn close(&self) {
        self.readers.close().await;
        self.writer.close().await;
    }
}

impl Database {
    /// A readiness check that the database takes writes: it begins a write
    /// transaction on the writer and rolls it back, so a write lock held
    /// elsewhere for longer than the check's timeout (a stuck writer,
    /// another process holding the file) fails it. Register it for services
    /// that must write to serve; with the default hysteresis a lock must
    /// persist across three runs before readiness turns down.
    pub fn write_check(&self) -> WriteCheck {
        WriteCheck(self.clone())
    }
}

/// See [`Database::write_check`].
#[derive(Debug, Clone)]
pub struct WriteCheck(Database);

impl Check for WriteCheck {
    async fn check(&self) -> Result<(), CheckError> {
        let fail = |e: sqlx::Error| {
            CheckError::new(format!(
                "database {} takes no writes: {e}",
                self.0.path.display()
            ))
        };
        let tx = self.0.begin_write().await.map_err(fail)?;
        tx.rollback().await.map_err(fail)
    }
}

/// Ready while the database can be read: the check reads the schema, so a
/// file another process holds locked, or one that cannot be read, is not
/// ready (a bare `SELECT 1` would not touch the file at all).
impl Check for Database {
    async fn check(&self) -> Result<(), CheckError> {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM sqlite_master")
            .fetch_one(&self.readers)
            .await
            .map(drop)
            .map_err(|e| CheckError::new(format!("database {}: {e}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Env;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "chassis-sqlite-{name}-{}-{}",
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
        let other = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(SqliteConnectOptions::new().filename(db.path()))
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
            conn: &mut sqlx::pool::PoolConnection<sqlx::Sqlite>,
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

    #[test]
    fn reads_its_settings_and_reports_problems() {
        let env = Env::from_pairs([
            ("ORDERS_DATA_DIR", "/srv/orders"),
            ("ORDERS_DB_POOL_SIZE", "8"),
        ]);
        let mut r = Reader::new(&env);
        let c = DbConfig::read(&mut r, "ORDERS", "orders");
        r.finish().unwrap();
        assert_eq!(c.path(), PathBuf::from("/srv/orders/orders.db"));
        assert_eq!(c.pool_size, 8);
        assert_eq!(
            (c.busy_timeout, c.acquire_timeout, c.writer_cache_mib),
            (Duration::from_secs(5), Duration::from_secs(5), 16)
        );

        let env = Env::from_pairs([("ORDERS_DB_POOL_SIZE", "0")]);
        let mut r = Reader::new(&env);
        let c = DbConfig::read(&mut r, "ORDERS", "orders");
        assert_eq!(c.path(), PathBuf::from("data/orders/orders.db"));
        assert_eq!(
            r.finish().unwrap_err().problems()[0].name,
            "ORDERS_DB_POOL_SIZE"
        );
    }
}
