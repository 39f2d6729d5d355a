//! SQLite storage: one database file per service, opened the same way by
//! every service.
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
//! * a **busy timeout** (5 s) so a writer waits for the lock instead of
//!   failing with `SQLITE_BUSY`;
//! * a **pool** of a configured size (SQLite has one writer at a time: a
//!   small pool, 4 by default, is plenty);
//! * **migrations** embedded in the binary (`sqlx::migrate!()`), run at
//!   start-up before the service answers;
//! * a **readiness check** (a read of the schema, with the check's
//!   timeout), so a database that cannot be read, or that another process
//!   holds locked, takes the service out of rotation.
//!
//! A storage failure answers the same in every service ([`StoreError`],
//! [`problem`]): a database that is busy, locked, out of connections or
//! failing I/O is **503 with `Retry-After`** (the request may succeed
//! later), a unique key already taken is **409**, anything else is 500.
//! The body never holds the database's message, SQL or file names; the
//! original error is logged.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `<PREFIX>_DATA_DIR` | `./data/<service>` | directory of the database file and other data |
//! | `<PREFIX>_DB_POOL_SIZE` | `4` | connections in the pool |
//!
//! # Example
//!
//! ```
//! use chassis::sqlite::{Database, DbConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let dir = std::env::temp_dir().join(format!("chassis-doc-{}", std::process::id()));
//! let db = Database::open(&DbConfig::new(&dir, "notes.db")).await.unwrap();
//! sqlx::query("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)")
//!     .execute(db.pool())
//!     .await
//!     .unwrap();
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
    SqlitePool,
    migrate::Migrator,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

mod error;

pub use error::{Failure, RETRY_AFTER_SECS, StoreError, problem};

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
    /// Connections in the pool.
    pub pool_size: u32,
    /// How long a statement waits for a lock held by another connection.
    pub busy_timeout: Duration,
}

impl DbConfig {
    /// A database `file` in `data_dir`, with the default pool.
    pub fn new(data_dir: impl AsRef<Path>, file: &str) -> Self {
        Self {
            data_dir: data_dir.as_ref().to_owned(),
            file: file.to_owned(),
            pool_size: 4,
            busy_timeout: Duration::from_secs(5),
        }
    }

    /// Reads `<prefix>_DATA_DIR` (default `./data/<service>`) and
    /// `<prefix>_DB_POOL_SIZE` (default 4); the file is `<service>.db`.
    pub fn read(r: &mut Reader<'_>, prefix: &str, service: &str) -> Self {
        let data_dir: PathBuf = r.optional(
            &format!("{prefix}_DATA_DIR"),
            PathBuf::from("data").join(service),
            "directory of the service's data",
        );
        let pool_size: u32 =
            r.optional(&format!("{prefix}_DB_POOL_SIZE"), 4, "database connections");
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

/// A service's database: a pool over one SQLite file. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Database {
    pool: SqlitePool,
    path: PathBuf,
}

impl Database {
    /// Opens (creating when missing) the database with the house settings.
    pub async fn open(config: &DbConfig) -> Result<Self, DbError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| DbError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let path = config.path();
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(config.busy_timeout);
        let pool = SqlitePoolOptions::new()
            .max_connections(config.pool_size)
            .acquire_timeout(config.busy_timeout)
            .connect_with(options)
            .await
            .map_err(|source| DbError::Open {
                path: path.clone(),
                source,
            })?;
        Ok(Self { pool, path })
    }

    /// Opens the database and runs `migrations` (embed them with
    /// `sqlx::migrate!()` in the service's crate).
    pub async fn open_migrated(config: &DbConfig, migrations: &Migrator) -> Result<Self, DbError> {
        let db = Self::open(config).await?;
        migrations
            .run(&db.pool)
            .await
            .map_err(|source| DbError::Migrate {
                path: db.path.clone(),
                source,
            })?;
        Ok(db)
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes every connection, checkpointing the WAL.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl Database {
    /// A readiness check that the database takes writes: it begins a write
    /// transaction and rolls it back, so a write lock held elsewhere for
    /// longer than the check's timeout (a stuck writer, another process
    /// holding the file) fails it. Register it for services that must write
    /// to serve; with the default hysteresis a lock must persist across
    /// three runs before readiness turns down.
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
        let tx = self
            .0
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(fail)?;
        tx.rollback().await.map_err(fail)
    }
}

/// Ready while the database can be read: the check reads the schema, so a
/// file another process holds locked, or one that cannot be read, is not
/// ready (a bare `SELECT 1` would not touch the file at all).
impl Check for Database {
    async fn check(&self) -> Result<(), CheckError> {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM sqlite_master")
            .fetch_one(&self.pool)
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
        let pool = db.pool();
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(pool)
            .await
            .unwrap();
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(pool)
            .await
            .unwrap();
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(pool)
            .await
            .unwrap();
        let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!((journal.as_str(), fk, sync, busy), ("wal", 1, 1, 5000));
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
