//! The database: tickets and reservations of every account.
//!
//! Every query is scoped by account, so one account never reads or changes
//! another's rows. Capacity is enforced by the statement that inserts a
//! reservation: it inserts only when enough places are left, counted in the
//! same statement, inside a transaction that holds SQLite's write lock from
//! its first statement (`BEGIN IMMEDIATE`, [`Database::begin_write`]).
//! SQLite has one writer at a time, so two reservations can never both see
//! the last place. Every write goes through the database's one writer, where
//! writers wait their turn in order; reads that decide nothing go through
//! the read-only readers ([`Database::pool`]).

use std::time::Duration;

use chassis::{db::Database, permission::AccountId};
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
    capacity: u32,
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
    quantity: u32,
    status: String,
    expires_at: String,
    created_at: String,
}

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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&ticket.id)
        .bind(&ticket.account)
        .bind(&ticket.name)
        .bind(ticket.price_minor)
        .bind(&ticket.currency)
        .bind(ticket.capacity)
        .bind(date_text(ticket.valid_from)?)
        .bind(date_text(ticket.valid_until)?)
        .bind(timestamp_text(now))
        .execute(&mut *self.db.writer().await?)
        .await?;
        Ok(ticket)
    }

    /// The account's tickets, oldest first.
    pub(crate) async fn list_tickets(&self, account: &AccountId) -> Result<Vec<Ticket>, ApiError> {
        let rows: Vec<TicketRow> = sqlx::query_as(
            "SELECT t.id, t.account, t.name, t.price_minor, t.currency, t.capacity,
                    t.valid_from, t.valid_until, t.created_at,
                    t.capacity - (SELECT COALESCE(SUM(r.quantity), 0) FROM reservations r
                                  WHERE r.ticket_id = t.id
                                    AND (r.status = 'confirmed'
                                         OR (r.status = 'held' AND r.expires_at > ?1)))
                        AS available
             FROM tickets t
             WHERE t.account = ?2
             ORDER BY t.created_at, t.id",
        )
        .bind(timestamp_text(now()))
        .bind(account.as_str())
        .fetch_all(self.db.pool())
        .await?;
        rows.into_iter().map(TicketRow::into_ticket).collect()
    }

    pub(crate) async fn ticket(&self, account: &AccountId, id: &str) -> Result<Ticket, ApiError> {
        let row: Option<TicketRow> = sqlx::query_as(
            "SELECT t.id, t.account, t.name, t.price_minor, t.currency, t.capacity,
                    t.valid_from, t.valid_until, t.created_at,
                    t.capacity - (SELECT COALESCE(SUM(r.quantity), 0) FROM reservations r
                                  WHERE r.ticket_id = t.id
                                    AND (r.status = 'confirmed'
                                         OR (r.status = 'held' AND r.expires_at > ?1)))
                        AS available
             FROM tickets t
             WHERE t.account = ?2 AND t.id = ?3",
        )
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
        // The write lock from the first statement: the key lookup, the
        // capacity check and the insert see no other writer in between.
        let mut tx = self.db.begin_write().await?;
        // Read the clock once the lock is held: which holds have expired is
        // decided as of now, not as of before a wait for the lock.
        let now = now();
        let now_text = timestamp_text(now);

        if let Some(key) = idempotency_key {
            let earlier: Option<ReservationRow> = sqlx::query_as(
                "SELECT id, account, ticket_id, quantity, status, expires_at, created_at
                 FROM reservations WHERE account = ? AND idempotency_key = ?",
            )
            .bind(account.as_str())
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(earlier) = earlier {
                if earlier.ticket_id != new.ticket_id || earlier.quantity != new.quantity {
                    return Err(ApiError::IdempotencyKeyReused);
                }
                return Ok(Held {
                    reservation: earlier.into_reservation(now)?,
                    created: false,
                    sold_out: false,
                });
            }
        }

        let available: Option<i64> = sqlx::query_scalar(
            "SELECT t.capacity - (SELECT COALESCE(SUM(r.quantity), 0) FROM reservations r
                                  WHERE r.ticket_id = t.id
                                    AND (r.status = 'confirmed'
                                         OR (r.status = 'held' AND r.expires_at > ?1)))
             FROM tickets t
             WHERE t.account = ?2 AND t.id = ?3",
        )
        .bind(&now_text)
        .bind(account.as_str())
        .bind(&new.ticket_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(available) = available else {
            return Err(ApiError::NotFound("ticket"));
        };

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
             SELECT ?1, ?2, ?3, ?4, 'held', ?5, ?6, ?7
             WHERE (SELECT capacity FROM tickets WHERE id = ?3)
                   - (SELECT COALESCE(SUM(quantity), 0) FROM reservations
                      WHERE ticket_id = ?3
                        AND (status = 'confirmed' OR (status = 'held' AND expires_at > ?6)))
                   >= ?4",
        )
        .bind(&reservation.id)
        .bind(&reservation.account)
        .bind(&reservation.ticket_id)
        .bind(reservation.quantity)
        .bind(timestamp_text(reservation.expires_at))
        .bind(&now_text)
        .bind(idempotency_key)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(ApiError::SoldOut {
                available: u32::try_from(available).unwrap_or(0),
            });
        }
        tx.commit().await?;
        Ok(Held {
            sold_out: available == i64::from(reservation.quantity),
            reservation,
            created: true,
        })
    }

    pub(crate) async fn reservation(
        &self,
        account: &AccountId,
        id: &str,
    ) -> Result<Reservation, ApiError> {
        let row: Option<ReservationRow> = sqlx::query_as(
            "SELECT id, account, ticket_id, quantity, status, expires_at, created_at
             FROM reservations WHERE account = ? AND id = ?",
        )
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
        use ReservationStatus::{Confirmed, Expired, Held, Released};

        // Under the write lock nothing changes between the read and the
        // update; the clock is read once the lock is held, so a hold that
        // expired while this call waited is not confirmed after another
        // reservation took its places.
        let mut tx = self.db.begin_write().await?;
        let now = now();
        let row: Option<ReservationRow> = sqlx::query_as(
            "SELECT id, account, ticket_id, quantity, status, expires_at, created_at
             FROM reservations WHERE account = ? AND id = ?",
        )
        .bind(account.as_str())
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let mut reservation = row
            .ok_or(ApiError::NotFound("reservation"))?
            .into_reservation(now)?;
        match (reservation.status, to) {
            (Held, _) => {
                sqlx::query("UPDATE reservations SET status = ? WHERE id = ?")
                    .bind(to.as_str())
                    .bind(&reservation.id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                reservation.status = to;
            }
            (Confirmed, Confirmed) | (Released | Expired, Released) => {}
            (current, _) => return Err(ApiError::NotHeld(current)),
        }
        Ok(reservation)
    }

    /// Marks held reservations past their expiry `expired`; returns how
    /// many. (They stopped counting against capacity when they expired;
    /// this makes the stored status say so.)
    pub(crate) async fn expire_holds(&self) -> Result<u64, ApiError> {
        let done = sqlx::query(
            "UPDATE reservations SET status = 'expired'
             WHERE status = 'held' AND expires_at <= ?",
        )
        .bind(timestamp_text(now()))
        .execute(&mut *self.db.writer().await?)
        .await?;
        Ok(done.rows_affected())
    }
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
            id: self.id,
            account: self.account,
            name: self.name,
            price_minor: self.price_minor,
            currency: self.currency,
            capacity: self.capacity,
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
            id: self.id,
            account: self.account,
            ticket_id: self.ticket_id,
            quantity: self.quantity,
        })
    }
}

/// Now, from the chassis' clock ([`chassis::time::now_millis`]): to the
/// millisecond, as the database keeps it.
fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(chassis::time::now_millis()) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
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
