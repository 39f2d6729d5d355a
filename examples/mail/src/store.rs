//! The message queue, in the service's SQLite database.
//!
//! Every change of a row is one statement, so it is atomic without an
//! explicit transaction: every write goes through the database's one writer
//! ([`Database::writer`]), SQLite runs one writer at a time, and a write
//! statement takes the write lock before it reads, so two workers running
//! the lease statement at once get different rows (or none). Reads go
//! through the read-only readers ([`Database::pool`]).

use chassis::db::Database;
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
             VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?)
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
        let (status, recipient, template): (String, String, String) =
            sqlx::query_as("SELECT status, recipient, template FROM messages WHERE message_id = ?")
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
             FROM messages WHERE message_id = ?",
        )
        .bind(id)
        .fetch_optional(self.db.pool())
        .await
    }

    /// Leases the message due first, if any: a queued one whose time has
    /// come, or one whose lease has expired (its worker died or gave it
    /// up), for `owner` until `until`.
    pub(crate) async fn lease(
        &self,
        owner: &str,
        now: i64,
        until: i64,
    ) -> Result<Option<Leased>, sqlx::Error> {
        sqlx::query_as(
            "UPDATE messages
             SET status = 'sending', lease_until = ?, lease_owner = ?
             WHERE message_id = (
                 SELECT message_id FROM messages
                 WHERE (status = 'queued' AND next_attempt_at <= ?)
                    OR (status = 'sending' AND lease_until < ?)
                 ORDER BY next_attempt_at
                 LIMIT 1
             )
             RETURNING message_id, recipient, template, data, correlation_id, attempts,
                       traceparent, tracestate",
        )
        .bind(until)
        .bind(owner)
        .bind(now)
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
             SET status = 'sent', sent_at = ?, lease_until = NULL, lease_owner = NULL
             WHERE message_id = ? AND status = 'sending' AND lease_owner = ?",
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
             WHERE message_id = ? AND status = 'sending' AND lease_owner = ?",
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
             SET status = CASE WHEN ? IS NULL THEN 'dead' ELSE 'queued' END,
                 attempts = ?,
                 next_attempt_at = COALESCE(?, next_attempt_at),
                 last_error = ?,
                 lease_until = NULL,
                 lease_owner = NULL
             WHERE message_id = ? AND status = 'sending' AND lease_owner = ?",
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
