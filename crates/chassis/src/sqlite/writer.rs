//! The one writer connection: a connection behind a first-come,
//! first-served lock, and the transaction that holds it.

use std::{
    ops::{Deref, DerefMut},
    sync::Arc,
    time::Duration,
};

use sqlx::{Connection as _, SqliteConnection};
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};

/// The writer: its connection (none once closed) and how long a caller
/// waits for it.
#[derive(Debug, Clone)]
pub(super) struct Writer {
    conn: Arc<Mutex<Option<Held>>>,
    acquire_timeout: Duration,
}

/// The connection and whether a transaction may have been left open on it.
#[derive(Debug)]
pub(super) struct Held {
    conn: SqliteConnection,
    /// A transaction began and did not finish for certain (dropped, or its
    /// `COMMIT` or `ROLLBACK` failed or was cancelled): the next holder
    /// rolls it back first.
    unfinished: bool,
}

impl Writer {
    pub(super) fn new(conn: SqliteConnection, acquire_timeout: Duration) -> Self {
        Self {
            conn: Arc::new(Mutex::new(Some(Held {
                conn,
                unfinished: false,
            }))),
            acquire_timeout,
        }
    }

    /// The writer, once every caller that asked before has had it. A
    /// transaction its last holder left unfinished is rolled back first.
    pub(super) async fn acquire(&self) -> Result<WriteConnection, sqlx::Error> {
        let guard = tokio::time::timeout(self.acquire_timeout, self.conn.clone().lock_owned())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?;
        let mut held =
            OwnedMutexGuard::try_map(guard, Option::as_mut).map_err(|_| sqlx::Error::PoolClosed)?;
        if held.unfinished {
            // Fails harmlessly when the transaction did end after all (a
            // cancelled `COMMIT` that went through).
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut held.conn).await;
            held.unfinished = false;
        }
        Ok(WriteConnection(held))
    }

    /// Waits for the current holder, then closes the connection; later
    /// callers get [`sqlx::Error::PoolClosed`].
    pub(super) async fn close(&self) {
        let held = self.conn.lock().await.take();
        if let Some(held) = held {
            let _ = held.conn.close().await;
        }
    }
}

/// The database's one writer connection, held: no other write runs in
/// the service until it is dropped. Use it as the connection it derefs to
/// (`execute(&mut *db.writer().await?)`), for writes of one statement; for
/// several, [`Database::begin_write`](super::Database::begin_write).
#[derive(Debug)]
pub struct WriteConnection(OwnedMappedMutexGuard<Option<Held>, Held>);

impl Deref for WriteConnection {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.0.conn
    }
}

impl DerefMut for WriteConnection {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.0.conn
    }
}

/// A write transaction (`BEGIN IMMEDIATE`) on the writer, from
/// [`Database::begin_write`](super::Database::begin_write). Run its
/// statements on `&mut *tx`; [`commit`](Self::commit) it, or drop it (or
/// [`rollback`](Self::rollback)) to undo it. It holds the writer until
/// then. (No nested transactions: it is not a [`sqlx::Transaction`].)
#[derive(Debug)]
pub struct WriteTransaction(WriteConnection);

impl WriteTransaction {
    pub(super) async fn begin(mut conn: WriteConnection) -> Result<Self, sqlx::Error> {
        // Set before `BEGIN` runs, so a caller that gives up while it runs
        // leaves no transaction open for the next holder: from here until
        // the transaction ends for certain, the next holder rolls back
        // whatever is left.
        conn.0.unfinished = true;
        match sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *conn).await {
            Ok(_) => Ok(Self(conn)),
            Err(e) => {
                // A `BEGIN` that failed began nothing.
                conn.0.unfinished = false;
                Err(e)
            }
        }
    }

    /// Commits the transaction and gives the writer to the next caller.
    ///
    /// # Errors
    ///
    /// The database's error; nothing is committed then (what is left of
    /// the transaction is rolled back before the writer's next use).
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.end("COMMIT").await
    }

    /// Undoes the transaction and gives the writer to the next caller.
    ///
    /// # Errors
    ///
    /// The database's error.
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.end("ROLLBACK").await
    }

    async fn end(mut self, statement: &'static str) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(statement).execute(&mut *self.0).await?;
        self.0.0.unfinished = false;
        Ok(())
    }
}

impl Deref for WriteTransaction {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.0
    }
}

impl DerefMut for WriteTransaction {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.0
    }
}
