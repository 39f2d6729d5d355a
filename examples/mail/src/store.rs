//! The message queue, in the service's database (SQLite, or Postgres for
//! several replicas; see [`chassis::db`]).
//!
//! Every change of a row is one statement, so it is atomic without an
//! explicit transaction. Workers of every instance share the queue, so a
//! message is **leased**, not assumed to be one's own: [`Store::lease`]
//! takes a due message with one conditional `UPDATE … RETURNING` that
//! re-checks, on the row it changes, that the message is still due (queued
//! and its time come, or leased to a worker whose lease has expired). On
//! SQLite every write goes through the database's one writer and takes the
//! write lock before it reads, so two workers get different rows (or none).
//! On Postgres, at read committed, a worker that finds the row changed by
//! another one re-checks that condition on the new row and leaves it, and
//! the candidate is picked `FOR UPDATE SKIP LOCKED`, so concurrent workers
//! take different messages instead of waiting for each other. Only the
//! worker named in `lease_owner` may mark a message sent, failed or
//! released. Reads go through [`Database::pool`].

use chassis::db::{Backend, Database};
use serde_json::Value;

use crate::client::MessageStatus;

/// Longest `last_error` kept.
const MAX_ERROR_LEN: usize = 500;

/// The queue; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    db: Database,
}

/// A job to store.
#[derive(Debug)]
pub(crate) struct NewMessage<'a> {
    pub(crate) message_id: &'a str,
    pub(crate) recipient: &'a str,
    pub(crate) template: &'a str,
    pub(crate) data: &'a Value,
    pub(crate) correlation_id: &'a str,
    /// The span of the request that queued it, as a `traceparent`, and its
    /// `tracestate`.
    pub(crate) traceparent: Option<&'a str>,
    pub(crate) tracestate: Option<&'a str>,
}

/// What storing a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Inserted {
    /// The job is new and queued.
    New,
    /// A job with that id was stored before; nothing changed.
    Existing {
        status: MessageStatus,
        /// Whether the stored job has another recipient or template.
        differs: bool,
    },
}

/// A stored message.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Row {
    pub(crate) message_id: String,
    pub(crate) recipient: String,
    pub(crate) template: String,
    pub(crate) correlation_id: String,
    pub(crate) status: String,
    pub(crate) attempts: i64,
    pub(crate) next_attempt_at: i64,
    pub(crate) last_error: Option<String>,
    pub(crate) created_at: i64,
    pub(crate) sent_at: Option<i64>,
}

/// A message leased by a worker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Leased {
    pub(crate) message_id: String,
    pub(crate) recipient: String,
    pub(crate) template: String,
    pub(crate) data: String,
    pub(crate) correlation_id: String,
    /// Failed attempts before this one.
    pub(crate) attempts: i64,
    /// The span of the request that queued it.
    pub(crate) traceparent: Option<String>,
    pub(crate) tracestate: Option<String>,
}

impl Store {
    pub(crate) fn new(db: Database) -> Self {
        Self { db }
    }

    /// Stores `m` unless a message with its id exists.
    pub(crate) async fn insert(
        &self,
        m: &NewMessage<'_>,
        now: i64,
    ) -> Result<Inserted, sqlx::Error> {
        let data = m.data.to_string();
        let done = sqlx::query(
            "INSERT INTO messages
                 (message_id, recipient, template, data, correlation_id, traceparent,
                  tracestate, status, attempts, next_attempt_at, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', 0, $8, $9)
             ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(m.message_id)
        .bind(m.recipient)
        .bind(m.template)
        .bind(&data)
        .bind(m.correlation_id)
        .bind(m.traceparent)
        .bind(m.tracestate)
        .bind(now)
        .bind(now)
        .execute(&mut *self.db.writer().await?)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(Inserted::New);
        }
        // Rows are never deleted, so the one that won is still there.
        let (status, recipient, template): (String, String, String) = sqlx::query_as(
            "SELECT status, recipient, template FROM messages WHERE message_id = $1",
        )
        .bind(m.message_id)
        .fetch_one(self.db.pool())
        .await?;
        Ok(Inserted::Existing {
            status: parse_status(&status)?,
            differs: recipient != m.recipient || template != m.template,
        })
    }

    /// The message `id`.
    pub(crate) async fn get(&self, id: &str) -> Result<Option<Row>, sqlx::Error> {
        sqlx::query_as(
            "SELECT message_id, recipient, template, correlation_id, status, attempts,
                    next_attempt_at, last_error, created_at, sent_at
             FROM messages WHERE message_id = $1",
        )
        .bind(id)
        .fetch_optional(self.db.pool())
        .await
    }

    /// Leases the message due first, if any: a queued one whose time has
    /// come, or one whose lease has expired (its worker died or gave it
    /// up), for `owner` until `until`. `None` when nothing is due, or when
    /// another worker took the candidate first.
    pub(crate) async fn lease(
        &self,
        owner: &str,
        now: i64,
        until: i64,
    ) -> Result<Option<Leased>, sqlx::Error> {
        // The one place the engines differ: on Postgres, skip rows another
        // worker is leasing right now rather than wait for it.
        let skip_locked = match self.db.backend() {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            _ => "",
        };
        let due = "((status = 'queued' AND next_attempt_at <= $3)
                    OR (status = 'sending' AND lease_until < $3))";
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE messages
             SET status = 'sending', lease_until = $1, lease_owner = $2
             WHERE message_id = (
                 SELECT message_id FROM messages
                 WHERE {due}
                 ORDER BY next_attempt_at
                 LIMIT 1
                 {skip_locked}
             )
             AND {due}
             RETURNING message_id, recipient, template, data, correlation_id, attempts,
                       traceparent, tracestate"
        )))
        .bind(until)
        .bind(owner)
        .bind(now)
        .fetch_optional(&mut *self.db.writer().await?)
        .await
    }

    /// Marks `id` sent, if `owner` still holds its lease. `false` when the
    /// lease was lost (it expired and another worker took the message).
    pub(crate) async fn mark_sent(
        &self,
        id: &str,
        owner: &str,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE messages
             SET status = 'sent', sent_at = $1, lease_until = NULL, lease_owner = NULL
             WHERE message_id = $2 AND status = 'sending' AND lease_owner = $3",
        )
        .bind(now)
        .bind(id)
        .bind(owner)
        .execute(&mut *self.db.writer().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives `id` back untried (shutdown came between leasing and sending):
    /// queued again, due at once, no attempt counted.
    pub(crate) async fn release(&self, id: &str, owner: &str) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE messages
             SET status = 'queued', lease_until = NULL, lease_owner = NULL
             WHERE message_id = $1 AND status = 'sending' AND lease_owner = $2",
        )
        .bind(id)
        .bind(owner)
        .execute(&mut *self.db.writer().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records a failed attempt of `id`: queued again for `next_attempt_at`,
    /// or dead when `next_attempt_at` is `None`. `false` when the lease was
    /// lost.
    pub(crate) async fn mark_failed(
        &self,
        id: &str,
        owner: &str,
        attempts: i64,
        next_attempt_at: Option<i64>,
        error: &str,
    ) -> Result<bool, sqlx::Error> {
        let error = truncate(error, MAX_ERROR_LEN);
        let done = sqlx::query(
            "UPDATE messages
             SET status = CASE WHEN $1 IS NULL THEN 'dead' ELSE 'queued' END,
                 attempts = $2,
                 next_attempt_at = COALESCE($3, next_attempt_at),
                 last_error = $4,
                 lease_until = NULL,
                 lease_owner = NULL
             WHERE message_id = $5 AND status = 'sending' AND lease_owner = $6",
        )
        .bind(next_attempt_at)
        .bind(attempts)
        .bind(next_attempt_at)
        .bind(error)
        .bind(id)
        .bind(owner)
        .execute(&mut *self.db.writer().await?)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Messages not yet sent nor dead.
    pub(crate) async fn depth(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE status IN ('queued', 'sending')")
            .fetch_one(self.db.pool())
            .await
    }

    /// Dead messages.
    pub(crate) async fn dead(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE status = 'dead'")
            .fetch_one(self.db.pool())
            .await
    }
}

/// A stored status; the table's CHECK admits only the four.
pub(crate) fn parse_status(s: &str) -> Result<MessageStatus, sqlx::Error> {
    s.parse()
        .map_err(|e: crate::client::UnknownStatus| sqlx::Error::Decode(Box::new(e)))
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chassis::{
        db::{DbConfig, Migrations},
        testing::{TempDir, TestDatabase},
    };

    use super::*;

    /// Two handles on one database, as two instances of the service have:
    /// on SQLite two writers on one file, on Postgres two pools.
    async fn two_instances(dir: &TempDir, db: &TestDatabase) -> (Store, Store) {
        let config = db.configure(DbConfig::new(dir.path(), "mail.db"));
        let open = || async {
            Database::open_migrated(
                &config,
                Migrations::new(&sqlx::migrate!("./migrations/sqlite"))
                    .postgres(&sqlx::migrate!("./migrations/postgres")),
            )
            .await
            .unwrap()
        };
        let a = open().await;
        let b = open().await;
        (Store::new(a), Store::new(b))
    }

    async fn queue(store: &Store, n: usize, now: i64) {
        for i in 0..n {
            let m = NewMessage {
                message_id: &format!("evt-{i:03}"),
                recipient: "alice@example.com",
                template: "order_confirmation",
                data: &serde_json::json!({"i": i}),
                correlation_id: "corr",
                traceparent: None,
                tracestate: None,
            };
            assert_eq!(store.insert(&m, now).await.unwrap(), Inserted::New);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_workers_of_two_instances_lease_each_message_once() {
        let dir = TempDir::new("mail-lease-race");
        let db = TestDatabase::new();
        let (a, b) = two_instances(&dir, &db).await;
        let now = chassis::time::now_millis();
        let n = 60;
        queue(&a, n, now).await;

        // Eight workers, four per instance, lease until nothing is left;
        // nobody marks anything sent, so a message leased twice would be
        // one leased while its first lease still holds.
        let mut workers = Vec::new();
        for w in 0..8 {
            let store = if w % 2 == 0 { a.clone() } else { b.clone() };
            workers.push(tokio::spawn(async move {
                let owner = format!("worker-{w}");
                let mut got = Vec::new();
                let mut empty = 0;
                // Bounded: a worker stops after a few empty looks in a row
                // (on Postgres a lost race also answers `None`).
                while empty < 3 {
                    match store.lease(&owner, now, now + 60_000).await.unwrap() {
                        Some(m) => {
                            empty = 0;
                            got.push(m.message_id);
                        }
                        None => empty += 1,
                    }
                }
                (owner, got)
            }));
        }
        let mut holders: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for w in workers {
            let (owner, got) = w.await.unwrap();
            for id in got {
                holders.entry(id).or_default().push(owner.clone());
            }
        }
        let twice: Vec<_> = holders.iter().filter(|(_, o)| o.len() > 1).collect();
        assert!(twice.is_empty(), "leased by two workers: {twice:?}");
        assert_eq!(holders.len(), n, "every message leased");

        // Each message is held by the worker the database names, and only
        // that worker can mark it sent.
        for (id, owners) in &holders {
            let other = if owners[0] == "worker-0" {
                "worker-1"
            } else {
                "worker-0"
            };
            assert!(!b.mark_sent(id, other, now).await.unwrap(), "{id}");
            assert!(a.mark_sent(id, &owners[0], now).await.unwrap(), "{id}");
        }
        assert_eq!(a.depth().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_and_the_old_owner_cannot_finish() {
        let dir = TempDir::new("mail-lease-expiry");
        let db = TestDatabase::new();
        let (a, b) = two_instances(&dir, &db).await;
        let now = 1_000_000;
        queue(&a, 1, now).await;

        let first = a
            .lease("dead-worker", now, now + 1000)
            .await
            .unwrap()
            .unwrap();
        // Held: nobody else gets it before the lease ends, even at its last
        // millisecond.
        assert!(
            b.lease("other", now + 1000, now + 2000)
                .await
                .unwrap()
                .is_none()
        );
        // Expired: taken over.
        let again = b
            .lease("other", now + 1001, now + 2001)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.message_id, first.message_id);
        assert!(
            !a.mark_sent(&first.message_id, "dead-worker", now + 1002)
                .await
                .unwrap()
        );
        assert!(!a.release(&first.message_id, "dead-worker").await.unwrap());
        assert!(
            !a.mark_failed(&first.message_id, "dead-worker", 1, Some(now), "late")
                .await
                .unwrap()
        );
        assert!(
            b.mark_sent(&again.message_id, "other", now + 1003)
                .await
                .unwrap()
        );
        let row = b.get(&again.message_id).await.unwrap().unwrap();
        assert_eq!((row.status.as_str(), row.attempts), ("sent", 0));
    }
}
