//! The database: tickets and reservations of every account.
//!
//! Every query is scoped by account, so one account never reads or changes
//! another's rows. The same statements run on SQLite and on Postgres
//! (`$1`, `$2`, ... for parameters).
//!
//! Capacity holds on both engines, with any number of instances on one
//! Postgres database: every transaction that decides on a ticket's places
//! (a reservation, a confirmation, a release) first locks the ticket's row
//! by writing it (`UPDATE tickets SET id = id ...`), and only then reads
//! the clock and counts. The places in use are the ticket's `confirmed`
//! count, changed only under that lock when a hold is confirmed, plus its
//! holds not yet expired: a reservation reads the ticket's current holds,
//! never every reservation it ever had. On Postgres that row lock makes such transactions
//! on one ticket take turns, whatever the isolation level, and each counts
//! what the ones before it committed; on SQLite the database's one writer
//! already makes every write transaction take turns. The insert itself
//! still checks the places left, in the same statement. An idempotency key
//! is settled by its unique key: a duplicate that comes in between is
//! answered with the reservation stored under it.
//!
//! Reads that decide nothing go through [`Database::pool`].

use std::time::Duration;

use chassis::{
    db::{Database, Failure, retry},
    permission::AccountId,
};
use time::{Date, OffsetDateTime, format_description::well_known::Rfc3339};

use crate::{
    client::{DATE_FORMAT, NewReservation, NewTicket, Reservation, ReservationStatus, Ticket},
    error::ApiError,
};

/// Tickets and reservations; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    db: Database,
    hold: Duration,
}

#[derive(Debug, sqlx::FromRow)]
struct TicketRow {
    id: String,
    account: String,
    name: String,
    price_minor: i64,
    currency: String,
    capacity: i64,
    available: i64,
    valid_from: String,
    valid_until: String,
    created_at: String,
}

#[derive(Debug, sqlx::FromRow)]
struct ReservationRow {
    id: String,
    account: String,
    ticket_id: String,
    quantity: i64,
    status: String,
    expires_at: String,
    created_at: String,
}

/// The places of ticket `t` in use at `$1` (a timestamp): confirmed (counted
/// on the ticket), and held until after `$1` (only the ticket's current
/// holds are read, through `reservations_by_ticket`).
const IN_USE: &str =
    "t.confirmed + (SELECT COALESCE(CAST(SUM(r.quantity) AS BIGINT), 0) FROM reservations r
                      WHERE r.ticket_id = t.id AND r.status = 'held' AND r.expires_at > $1)";

/// Locks ticket `$1` of account `$2` until the transaction ends (on
/// Postgres; SQLite's writer already holds the only write lock).
const LOCK_TICKET: &str = "UPDATE tickets SET id = id WHERE id = $1 AND account = $2";

const RESERVATION_COLUMNS: &str =
    "SELECT id, account, ticket_id, quantity, status, expires_at, created_at FROM reservations";

// === impl Store ===

/// The answer to a reservation request.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) reservation: Reservation,
    /// A new hold; `false` when an earlier one with the same key is given
    /// again.
    pub(crate) created: bool,
    /// This hold took the product's last places.
    pub(crate) sold_out: bool,
}

impl Store {
    /// Reservations made by this store are held for `hold`.
    pub(crate) fn new(db: Database, hold: Duration) -> Self {
        Self { db, hold }
    }

    /// The database engine's name, for spans: `sqlite` or `postgresql`.
    pub(crate) fn system(&self) -> &'static str {
        self.db.backend().system_name()
    }

    pub(crate) async fn create_ticket(
        &self,
        account: &AccountId,
        new: NewTicket,
    ) -> Result<Ticket, ApiError> {
        let now = now();
        let ticket = Ticket {
            id: chassis::id::prefixed("tkt"),
            account: account.to_string(),
            name: new.name,
            price_minor: new.price_minor,
            currency: new.currency,
            capacity: new.capacity,
            available: new.capacity,
            valid_from: new.valid_from,
            valid_until: new.valid_until,
            created_at: now,
        };
        sqlx::query(
            "INSERT INTO tickets
                 (id, account, name, price_minor, currency, capacity, valid_from, valid_until, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&ticket.id)
        .bind(&ticket.account)
        .bind(&ticket.name)
        .bind(ticket.price_minor)
        .bind(&ticket.currency)
        .bind(i64::from(ticket.capacity))
        .bind(date_text(ticket.valid_from)?)
        .bind(date_text(ticket.valid_until)?)
        .bind(timestamp_text(now))
        .execute(&mut *self.db.writer().await?)
        .await?;
        Ok(ticket)
    }

    /// The account's tickets, oldest first (`created_at`, then `id`), from
    /// strictly after `after` (the [`sort_key`] of the previous page's last
    /// ticket), at most `limit`.
    pub(crate) async fn list_tickets(
        &self,
        account: &AccountId,
        after: Option<&(String, String)>,
        limit: i64,
    ) -> Result<Vec<Ticket>, ApiError> {
        // Row values compare alike on SQLite and Postgres.
        let keyset = if after.is_some() {
            "AND (t.created_at, t.id) > ($4, $5)"
        } else {
            ""
        };
        let sql = format!(
            "SELECT t.id, t.account, t.name, t.price_minor, t.currency, t.capacity,
                    t.valid_from, t.valid_until, t.created_at,
                    t.capacity - ({IN_USE}) AS available
             FROM tickets t
             WHERE t.account = $2 {keyset}
             ORDER BY t.created_at, t.id
             LIMIT $3"
        );
        let mut query = sqlx::query_as::<_, TicketRow>(sqlx::AssertSqlSafe(sql))
            .bind(timestamp_text(now()))
            .bind(account.as_str())
            .bind(limit);
        if let Some((created_at, id)) = after {
            query = query.bind(created_at).bind(id);
        }
        let rows = query.fetch_all(self.db.pool()).await?;
        rows.into_iter().map(TicketRow::into_ticket).collect()
    }

    pub(crate) async fn ticket(&self, account: &AccountId, id: &str) -> Result<Ticket, ApiError> {
        let sql = format!(
            "SELECT t.id, t.account, t.name, t.price_minor, t.currency, t.capacity,
                    t.valid_from, t.valid_until, t.created_at,
                    t.capacity - ({IN_USE}) AS available
             FROM tickets t
             WHERE t.account = $2 AND t.id = $3"
        );
        let row: Option<TicketRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(timestamp_text(now()))
            .bind(account.as_str())
            .bind(id)
            .fetch_optional(self.db.pool())
            .await?;
        row.ok_or(ApiError::NotFound("ticket"))?.into_ticket()
    }

    /// Holds places of a ticket. With an idempotency key already used in
    /// this account, answers the reservation made then (and `false`);
    /// otherwise the new one (and `true`).
    pub(crate) async fn reserve(
        &self,
        account: &AccountId,
        new: &NewReservation,
        idempotency_key: Option<&str>,
    ) -> Result<Held, ApiError> {
        let outcome = retry(|| self.try_reserve(account, new, idempotency_key)).await;
        match (outcome, idempotency_key) {
            (Ok(held), _) => held,
            // The same key, stored by a request that committed while this
            // one ran (for another ticket, or on another instance): the
            // answer is the stored reservation's.
            (Err(e), Some(key)) if Failure::of(&e) == Failure::Conflict => {
                let earlier = self
                    .by_key(account, key)
                    .await?
                    .ok_or(ApiError::Database(e))?;
                replayed(earlier, new, now())
            }
            (Err(e), _) => Err(e.into()),
        }
    }

    /// One attempt at [`reserve`](Self::reserve): the database's errors
    /// outside, for [`retry`], the answer inside.
    async fn try_reserve(
        &self,
        account: &AccountId,
        new: &NewReservation,
        idempotency_key: Option<&str>,
    ) -> Result<Result<Held, ApiError>, sqlx::Error> {
        let mut tx = self.db.begin_write().await?;
        // The ticket's row first: from here until the commit no other
        // transaction decides on its places.
        let found = sqlx::query(LOCK_TICKET)
            .bind(&new.ticket_id)
            .bind(account.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        // Read the clock once the lock is held: which holds have expired is
        // decided as of now, not as of before a wait for the lock.
        let now = now();
        let now_text = timestamp_text(now);

        if let Some(key) = idempotency_key {
            let earlier: Option<ReservationRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "{RESERVATION_COLUMNS} WHERE account = $1 AND idempotency_key = $2"
            )))
            .bind(account.as_str())
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(earlier) = earlier {
                tx.rollback().await?;
                return Ok(replayed(earlier, new, now));
            }
        }
        if found == 0 {
            tx.rollback().await?;
            return Ok(Err(ApiError::NotFound("ticket")));
        }

        let available: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT t.capacity - ({IN_USE}) FROM tickets t WHERE t.id = $2"
        )))
        .bind(&now_text)
        .bind(&new.ticket_id)
        .fetch_one(&mut *tx)
        .await?;

        let reservation = Reservation {
            id: chassis::id::prefixed("rsv"),
            account: account.to_string(),
            ticket_id: new.ticket_id.clone(),
            quantity: new.quantity,
            status: ReservationStatus::Held,
            expires_at: now + self.hold,
            created_at: now,
        };
        // The capacity rule itself: the row goes in only if the places left,
        // counted by this statement, cover the quantity.
        let inserted = sqlx::query(
            "INSERT INTO reservations
                 (id, account, ticket_id, quantity, status, expires_at, created_at, idempotency_key)
             SELECT $1, $2, $3, $4, 'held', $5, $6, $7
             WHERE (SELECT capacity - confirmed FROM tickets WHERE id = $3)
                   - (SELECT COALESCE(CAST(SUM(quantity) AS BIGINT), 0) FROM reservations
                      WHERE ticket_id = $3 AND status = 'held' AND expires_at > $6)
                   >= $4",
        )
        .bind(&reservation.id)
        .bind(&reservation.account)
        .bind(&reservation.ticket_id)
        .bind(i64::from(reservation.quantity))
        .bind(timestamp_text(reservation.expires_at))
        .bind(&now_text)
        .bind(idempotency_key)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            // Ended at once rather than dropped: on SQLite a transaction
            // dropped holds the file's write lock until the writer's next
            // use, and another process may be waiting for it.
            tx.rollback().await?;
            return Ok(Err(ApiError::SoldOut {
                available: u32::try_from(available).unwrap_or(0),
            }));
        }
        tx.commit().await?;
        Ok(Ok(Held {
            sold_out: available == i64::from(reservation.quantity),
            reservation,
            created: true,
        }))
    }

    /// The account's reservation stored under `key`.
    async fn by_key(
        &self,
        account: &AccountId,
        key: &str,
    ) -> Result<Option<ReservationRow>, ApiError> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{RESERVATION_COLUMNS} WHERE account = $1 AND idempotency_key = $2"
        )))
        .bind(account.as_str())
        .bind(key)
        .fetch_optional(self.db.pool())
        .await?)
    }

    pub(crate) async fn reservation(
        &self,
        account: &AccountId,
        id: &str,
    ) -> Result<Reservation, ApiError> {
        let row: Option<ReservationRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{RESERVATION_COLUMNS} WHERE account = $1 AND id = $2"
        )))
        .bind(account.as_str())
        .bind(id)
        .fetch_optional(self.db.pool())
        .await?;
        row.ok_or(ApiError::NotFound("reservation"))?
            .into_reservation(now())
    }

    /// Held → confirmed. Confirmed stays confirmed; released or expired is
    /// a conflict.
    pub(crate) async fn confirm(
        &self,
        account: &AccountId,
        id: &str,
    ) -> Result<Reservation, ApiError> {
        self.transition(account, id, ReservationStatus::Confirmed)
            .await
    }

    /// Held → released. Released or expired stays as it is (its places are
    /// already free); confirmed is a conflict.
    pub(crate) async fn release(
        &self,
        account: &AccountId,
        id: &str,
    ) -> Result<Reservation, ApiError> {
        self.transition(account, id, ReservationStatus::Released)
            .await
    }

    async fn transition(
        &self,
        account: &AccountId,
        id: &str,
        to: ReservationStatus,
    ) -> Result<Reservation, ApiError> {
        retry(|| self.try_transition(account, id, to)).await?
    }

    /// One attempt at [`transition`](Self::transition).
    async fn try_transition(
        &self,
        account: &AccountId,
        id: &str,
        to: ReservationStatus,
    ) -> Result<Result<Reservation, ApiError>, sqlx::Error> {
        use ReservationStatus::{Confirmed, Expired, Held, Released};

        let mut tx = self.db.begin_write().await?;
        // The reservation's ticket first, as a reservation locks it: a hold
        // is confirmed, or found expired, in turn with the reservations that
        // count its places. The clock is read once the lock is held, so a
        // hold that expired while this call waited is not confirmed after
        // another reservation took its places.
        sqlx::query(
            "UPDATE tickets SET id = id
             WHERE id = (SELECT ticket_id FROM reservations WHERE id = $1 AND account = $2)",
        )
        .bind(id)
        .bind(account.as_str())
        .execute(&mut *tx)
        .await?;
        let now = now();
        // Only a hold still held changes, whatever else happened to it.
        let changed = sqlx::query(
            "UPDATE reservations SET status = $1
             WHERE id = $2 AND account = $3 AND status = 'held' AND expires_at > $4",
        )
        .bind(to.as_str())
        .bind(id)
        .bind(account.as_str())
        .bind(timestamp_text(now))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 1 && to == Confirmed {
            // Its places are the ticket's for good: counted there, under the
            // lock taken above, in the transaction that confirms them.
            sqlx::query(
                "UPDATE tickets SET confirmed = confirmed
                     + (SELECT quantity FROM reservations WHERE id = $1 AND account = $2)
                 WHERE id = (SELECT ticket_id FROM reservations WHERE id = $1 AND account = $2)",
            )
            .bind(id)
            .bind(account.as_str())
            .execute(&mut *tx)
            .await?;
        }
        let row: Option<ReservationRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{RESERVATION_COLUMNS} WHERE account = $1 AND id = $2"
        )))
        .bind(account.as_str())
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        let Some(row) = row else {
            return Ok(Err(ApiError::NotFound("reservation")));
        };
        let reservation = match row.into_reservation(now) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        Ok(match (changed, reservation.status, to) {
            (1.., ..) => Ok(reservation),
            (0, Confirmed, Confirmed) | (0, Released | Expired, Released) => Ok(reservation),
            (0, Held, _) => Err(ApiError::Stored(format!(
                "reservation {id}: held, and not changed"
            ))),
            (0, current, _) => Err(ApiError::NotHeld(current)),
        })
    }

    /// Marks held reservations past their expiry `expired`; returns how
    /// many. (They stopped counting against capacity when they expired;
    /// this makes the stored status say so.) Every instance may run it: it
    /// changes only holds still held and already past their expiry.
    ///
    /// Two instances expiring at once may lock the same rows in different
    /// orders (a deadlock on Postgres, which undoes one): that one runs
    /// again.
    pub(crate) async fn expire_holds(&self) -> Result<u64, ApiError> {
        let done = retry(|| async {
            sqlx::query(
                "UPDATE reservations SET status = 'expired'
                 WHERE status = 'held' AND expires_at <= $1",
            )
            .bind(timestamp_text(now()))
            .execute(&mut *self.db.writer().await?)
            .await
        })
        .await?;
        Ok(done.rows_affected())
    }
}

/// The reservation stored under a request's idempotency key, given again:
/// the same ticket and quantity, or the key was reused for another request.
fn replayed(
    earlier: ReservationRow,
    new: &NewReservation,
    now: OffsetDateTime,
) -> Result<Held, ApiError> {
    if earlier.ticket_id != new.ticket_id || earlier.quantity != i64::from(new.quantity) {
        return Err(ApiError::IdempotencyKeyReused);
    }
    Ok(Held {
        reservation: earlier.into_reservation(now)?,
        created: false,
        sold_out: false,
    })
}

// === impl TicketRow ===

impl TicketRow {
    fn into_ticket(self) -> Result<Ticket, ApiError> {
        Ok(Ticket {
            available: u32::try_from(self.available)
                .map_err(|_| ApiError::Stored(format!("ticket {}: places oversold", self.id)))?,
            valid_from: parse_date(&self.valid_from)?,
            valid_until: parse_date(&self.valid_until)?,
            created_at: parse_timestamp(&self.created_at)?,
            account: self.account,
            name: self.name,
            price_minor: self.price_minor,
            currency: self.currency,
            capacity: u32::try_from(self.capacity)
                .map_err(|_| ApiError::Stored(format!("ticket {}: capacity", self.id)))?,
            id: self.id,
        })
    }
}

// === impl ReservationRow ===

impl ReservationRow {
    /// The reservation as of `now`: a hold past its expiry is expired,
    /// whether or not the expiry task has marked it yet.
    fn into_reservation(self, now: OffsetDateTime) -> Result<Reservation, ApiError> {
        let expires_at = parse_timestamp(&self.expires_at)?;
        let mut status: ReservationStatus = self.status.parse().map_err(ApiError::Stored)?;
        if status == ReservationStatus::Held && expires_at <= now {
            status = ReservationStatus::Expired;
        }
        Ok(Reservation {
            status,
            expires_at,
            created_at: parse_timestamp(&self.created_at)?,
            quantity: u32::try_from(self.quantity)
                .map_err(|_| ApiError::Stored(format!("reservation {}: quantity", self.id)))?,
            id: self.id,
            account: self.account,
            ticket_id: self.ticket_id,
        })
    }
}

/// Now, from the chassis' clock ([`chassis::time::now_millis`]): to the
/// millisecond, as the database keeps it.
fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(chassis::time::now_millis()) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Where `ticket` sorts in its account's list: `(created_at, id)`, as
/// stored.
pub(crate) fn sort_key(ticket: &Ticket) -> (String, String) {
    (timestamp_text(ticket.created_at), ticket.id.clone())
}

/// `t` as the database keeps it: the chassis' shown form
/// ([`chassis::time::rfc3339_millis`], `2026-12-04T17:40:00.000Z`). Fixed
/// width, so comparing the text compares the times.
fn timestamp_text(t: OffsetDateTime) -> String {
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    chassis::time::rfc3339_millis(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// A stored timestamp read back. (The chassis formats times but does not
/// parse them; the `time` crate does, as it reads the API's dates.)
fn parse_timestamp(s: &str) -> Result<OffsetDateTime, ApiError> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| ApiError::Stored(format!("timestamp {s:?}: {e}")))
}

fn date_text(d: Date) -> Result<String, ApiError> {
    d.format(DATE_FORMAT)
        .map_err(|e| ApiError::Stored(format!("date {d}: {e}")))
}

fn parse_date(s: &str) -> Result<Date, ApiError> {
    Date::parse(s, DATE_FORMAT).map_err(|e| ApiError::Stored(format!("date {s:?}: {e}")))
}
