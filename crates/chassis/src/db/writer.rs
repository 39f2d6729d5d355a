//! The connection that writes: SQLite's one writer behind a first-come,
//! first-served lock, or a connection of the Postgres pool; and the
//! transaction that holds it.

use std::{
    ops::{Deref, DerefMut},
    sync::Arc,
    time::Duration,
};

use sqlx::{Any, AnyConnection, Connection as _, Transaction, pool::PoolConnection};
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};

/// SQLite's writer: its connection (none once closed) and how long a
/// caller waits for it.
#[derive(Debug, Clone)]
pub(super) struct Writer {
    conn: Arc<Mutex<Option<Held>>>,
    acquire_timeout: Duration,
}

/// The connection and whether a transaction may have been left open on it.
#[derive(Debug)]
pub(super) struct Held {
    conn: AnyConnection,
    /// A transaction began and did not finish for certain (dropped, or its
    /// `COMMIT` or `ROLLBACK` failed or was cancelled): the next holder
    /// rolls it back first.
    unfinished: bool,
}

impl Writer {
    pub(super) fn new(conn: AnyConnection, acquire_timeout: Duration) -> Self {
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
        Ok(WriteConnection(Conn::Writer(held)))
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

/// A connection that writes, held: on SQLite the database's one writer (no
/// other write runs in the service until it is dropped), on Postgres a
/// connection of the pool. Use it as the connection it derefs to
/// (`execute(&mut *db.writer().await?)`), for writes of one statement; for
/// several, [`Database::begin_write`](super::Database::begin_write).
#[derive(Debug)]
pub struct WriteConnection(Conn);

#[derive(Debug)]
enum Conn {
    Writer(OwnedMappedMutexGuard<Option<Held>, Held>),
    Pooled(PoolConnection<Any>),
}

impl WriteConnection {
    pub(super) fn pooled(conn: PoolConnection<Any>) -> Self {
        Self(Conn::Pooled(conn))
    }

    fn mark_unfinished(&mut self, unfinished: bool) {
        if let Conn::Writer(held) = &mut self.0 {
            held.unfinished = unfinished;
        }
    }
}

impl Deref for WriteConnection {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        match &self.0 {
            Conn::Writer(held) => &held.conn,
            Conn::Pooled(conn) => conn,
        }
    }
}

impl DerefMut for WriteConnection {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match &mut self.0 {
            Conn::Writer(held) => &mut held.conn,
            Conn::Pooled(conn) => conn,
        }
    }
}

/// A write transaction, from
/// [`Database::begin_write`](super::Database::begin_write): on SQLite
/// `BEGIN IMMEDIATE` on the writer, on Postgres `BEGIN` on a connection of
/// the pool. Run its statements on `&mut *tx`; [`commit`](Self::commit)
/// it, or drop it (or [`rollback`](Self::rollback)) to undo it. It holds
/// its connection until then. (No nested transactions: it is not a
/// [`sqlx::Transaction`].)
///
/// Dropped unfinished (an error returned through `?`, a cancelled
/// request), it is rolled back at once by a task of its own, which holds
/// the writer until it is done: the file's write lock is not left held
/// until this service next writes, which would stall another process
/// writing to the same file. (Outside a runtime, the rollback waits for
/// the writer's next use.)
#[derive(Debug)]
pub struct WriteTransaction(Option<Tx>);

#[derive(Debug)]
enum Tx {
    Writer(WriteConnection),
    // sqlx's transaction rolls back a dropped one before its connection
    // goes back to the pool.
    Pooled(Transaction<'static, Any>),
}

impl WriteTransaction {
    pub(super) async fn begin(mut conn: WriteConnection) -> Result<Self, sqlx::Error> {
        // Set before `BEGIN` runs, so a caller that gives up while it runs
        // leaves no transaction open for the next holder: from here until
        // the transaction ends for certain, the next holder rolls back
        // whatever is left.
        conn.mark_unfinished(true);
        match sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *conn).await {
            Ok(_) => Ok(Self(Some(Tx::Writer(conn)))),
            Err(e) => {
                // A `BEGIN` that failed began nothing.
                conn.mark_unfinished(false);
                Err(e)
            }
        }
    }

    pub(super) fn pooled(tx: Transaction<'static, Any>) -> Self {
        Self(Some(Tx::Pooled(tx)))
    }

    fn tx(&self) -> &Tx {
        self.0.as_ref().expect("a transaction not yet ended")
    }

    fn tx_mut(&mut self) -> &mut Tx {
        self.0.as_mut().expect("a transaction not yet ended")
    }

    /// Commits the transaction and gives its connection back.
    ///
    /// # Errors
    ///
    /// The database's error; nothing is committed then (what is left of
    /// the transaction is rolled back before the connection's next use).
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        match self.0.take().expect("a transaction not yet ended") {
            Tx::Writer(conn) => end(conn, "COMMIT").await,
            Tx::Pooled(tx) => tx.commit().await,
        }
    }

    /// Undoes the transaction and gives its connection back.
    ///
    /// # Errors
    ///
    /// The database's error.
    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        match self.0.take().expect("a transaction not yet ended") {
            Tx::Writer(conn) => end(conn, "ROLLBACK").await,
            Tx::Pooled(tx) => tx.rollback().await,
        }
    }
}

impl Drop for WriteTransaction {
    fn drop(&mut self) {
        // sqlx rolls a pooled transaction back itself; the writer's is
        // rolled back here, holding the writer so that no other write
        // comes in between.
        if let (Some(Tx::Writer(conn)), Ok(runtime)) =
            (self.0.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move {
                let _ = end(conn, "ROLLBACK").await;
            });
        }
    }
}

async fn end(mut conn: WriteConnection, statement: &'static str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(statement).execute(&mut *conn).await?;
    conn.mark_unfinished(false);
    Ok(())
}

impl Deref for WriteTransaction {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        match self.tx() {
            Tx::Writer(conn) => conn,
            Tx::Pooled(tx) => tx,
        }
    }
}

impl DerefMut for WriteTransaction {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match self.tx_mut() {
            Tx::Writer(conn) => conn,
            Tx::Pooled(tx) => tx,
        }
    }
}
