//! The driver client: how other services call `ticketing`, and the types of
//! its API.
//!
//! The request and response types below are the ones the server's handlers
//! use, so the client and the server cannot drift apart. Every call goes
//! through a [`Downstream`], with its timeouts, retries, circuit breaker and
//! bulkhead, and the caller chooses the identity at each call site:
//!
//! * [`as_service`](chassis::client::DriverClient::as_service): the calling service's own token (from
//!   the `Downstream`'s token source); `orders` reserves tickets this way;
//! * [`on_behalf_of`](chassis::client::DriverClient::on_behalf_of): the token of the request being
//!   served, so ticketing checks the end user's own permissions.
//!
//! Errors are [`ClientError`]s. A refusal by ticketing is
//! [`ClientError::Status`] with ticketing's problem document;
//! [`ClientError::reason`] reads its `reason` code (`sold_out`,
//! `reservation_expired`, `invalid_fields`, ...). Ids that are not ids
//! (`../x`) are refused before anything is sent.
//!
//! [`Downstream`]: chassis::client::Downstream
//!
//! # Example
//!
//! ```no_run
//! use chassis::{client::{CallContext, Downstream}, permission::AccountId};
//! use ticketing::client::{NewReservation, TicketingClient};
//!
//! # async fn example(cx: CallContext) -> Result<(), chassis::client::ClientError> {
//! let downstream = Downstream::builder("ticketing", "http://127.0.0.1:8082").build().unwrap();
//! let ticketing = TicketingClient::new(downstream);
//! let account = AccountId::parse("acme").unwrap();
//! let new = NewReservation { ticket_id: "tkt_0190...".to_owned(), quantity: 2 };
//! let held = ticketing.as_service(&cx).reserve(&account, &new, "order-42").await?;
//! ticketing.as_service(&cx).confirm(&account, &held.id).await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;

use chassis::{
    client::{ClientError, Pages},
    page::Page,
    permission::AccountId,
};
use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime, format_description::StaticFormatDescription};

/// Dates on the wire: `YYYY-MM-DD`.
pub(crate) const DATE_FORMAT: StaticFormatDescription =
    time::macros::format_description!("[year]-[month]-[day]");

time::serde::format_description!(iso_date, Date, DATE_FORMAT);

/// A ticket product: what customers buy, with its capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Ticket {
    /// `tkt_<uuid v7>`.
    pub id: String,
    /// The account that owns it.
    pub account: String,
    /// Display name, 1 to 100 characters.
    pub name: String,
    /// Price in minor units of `currency` (cents for EUR).
    pub price_minor: i64,
    /// ISO 4217 code, three capital letters.
    pub currency: String,
    /// Places in all.
    pub capacity: u32,
    /// Places neither confirmed nor held by an unexpired reservation.
    pub available: u32,
    /// First day the ticket is valid.
    #[serde(with = "iso_date")]
    #[schema(value_type = String, format = Date)]
    pub valid_from: Date,
    /// Last day the ticket is valid.
    #[serde(with = "iso_date")]
    #[schema(value_type = String, format = Date)]
    pub valid_until: Date,
    /// When it was created (RFC 3339, UTC).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

/// What `create_ticket` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewTicket {
    /// Display name, 1 to 100 characters, not only white space.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "[^\\t-\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]"
    )]
    pub name: String,
    /// Price in minor units, at least 0.
    #[schema(minimum = 0)]
    pub price_minor: i64,
    /// Three capital letters.
    #[schema(pattern = "^[A-Z]{3}$")]
    pub currency: String,
    /// Places in all, 1 to 1 000 000.
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub capacity: u32,
    /// First day the ticket is valid.
    #[serde(with = "iso_date")]
    #[schema(value_type = String, format = Date)]
    pub valid_from: Date,
    /// Last day the ticket is valid, not before `valid_from`.
    #[serde(with = "iso_date")]
    #[schema(value_type = String, format = Date)]
    pub valid_until: Date,
}

/// Places of one ticket, held until `expires_at` unless confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reservation {
    /// `rsv_<uuid v7>`.
    pub id: String,
    /// The account that owns it.
    pub account: String,
    /// The ticket reserved.
    pub ticket_id: String,
    /// Places reserved.
    pub quantity: u32,
    /// Where it is in its life.
    pub status: ReservationStatus,
    /// When a held reservation stops holding its places (RFC 3339, UTC).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: OffsetDateTime,
    /// When it was made (RFC 3339, UTC).
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

/// What `reserve` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewReservation {
    /// The ticket to reserve, of the same account: 1 to 64 of
    /// `A-Z a-z 0-9 _ -`.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub ticket_id: String,
    /// Places, 1 to 100.
    #[schema(minimum = 1, maximum = 100)]
    pub quantity: u32,
}

/// The life of a reservation: `held`, then `confirmed`, `released` or
/// `expired`, each final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReservationStatus {
    /// Holds its places until it expires.
    Held,
    /// Sold: keeps its places.
    Confirmed,
    /// Given back by the caller.
    Released,
    /// Not confirmed in time: its places are available again.
    Expired,
}

impl ReservationStatus {
    /// The name on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Confirmed => "confirmed",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }
}

impl fmt::Display for ReservationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ReservationStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "held" => Ok(Self::Held),
            "confirmed" => Ok(Self::Confirmed),
            "released" => Ok(Self::Released),
            "expired" => Ok(Self::Expired),
            other => Err(format!("unknown reservation status {other:?}")),
        }
    }
}

chassis::driver_client! {
    /// A client of the ticketing API over one
    /// [`Downstream`](chassis::client::Downstream); cheap to clone.
    /// Made with `TicketingClient::new(downstream)`, whose base URL is
    /// ticketing's root (e.g. `http://127.0.0.1:8082`).
    pub type TicketingClient = DriverClient<Ticketing>;
    /// The ticketing API with one identity and call context; made by
    /// `as_service` and `on_behalf_of` of [`TicketingClient`].
    pub struct Calls;
}

impl<'a> Calls<'a> {
    /// `POST /ticketing/v1/{account}/tickets`.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]; ticketing answers 422 (`invalid_fields`) for an
    /// invalid ticket.
    pub async fn create_ticket(
        self,
        account: &AccountId,
        ticket: &NewTicket,
    ) -> Result<Ticket, ClientError> {
        let path = self.0.path("/ticketing/v1/{}/tickets", &[account])?;
        self.0.post_json(&path, ticket).await
    }

    /// `GET /ticketing/v1/{account}/tickets`: the first page of the
    /// account's tickets, oldest first, `limit` of them (the service's
    /// default, 50, when `None`); its `next` leads to the rest (see
    /// [`ticket_pages`](Self::ticket_pages)).
    ///
    /// # Errors
    ///
    /// A [`ClientError`]; 422 `invalid_fields` for a `limit` outside 1 to
    /// 100.
    pub async fn list_tickets(
        self,
        account: &AccountId,
        limit: Option<u32>,
    ) -> Result<Page<Ticket>, ClientError> {
        Ok(self
            .ticket_pages(account, limit)?
            .next()
            .await?
            .unwrap_or(Page {
                items: Vec::new(),
                next: None,
            }))
    }

    /// The account's tickets page by page, oldest first, `limit` each:
    /// [`Pages::next`] for one page at a time, [`Pages::all`] for every
    /// ticket.
    ///
    /// # Errors
    ///
    /// A [`ClientError`] for an account that cannot be a path segment.
    pub fn ticket_pages(
        self,
        account: &AccountId,
        limit: Option<u32>,
    ) -> Result<Pages<'a, Ticket>, ClientError> {
        let path = self.0.path("/ticketing/v1/{}/tickets", &[account])?;
        Ok(self.0.pages(&path, limit))
    }

    /// Every ticket of the account, oldest first, following every page.
    ///
    /// # Errors
    ///
    /// A [`ClientError`].
    pub async fn all_tickets(self, account: &AccountId) -> Result<Vec<Ticket>, ClientError> {
        self.ticket_pages(account, Some(chassis::page::MAX_LIMIT))?
            .all()
            .await
    }

    /// `GET /ticketing/v1/{account}/tickets/{id}`.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]; 404 when the account has no such ticket.
    pub async fn get_ticket(self, account: &AccountId, id: &str) -> Result<Ticket, ClientError> {
        let path = self
            .0
            .path("/ticketing/v1/{}/tickets/{}", &[account, &id])?;
        self.0.get_json(&path).await
    }

    /// `POST /ticketing/v1/{account}/reservations` with an `Idempotency-Key`:
    /// holds places until the reservation expires. The same key (per
    /// account) returns the reservation it made the first time, so the
    /// call is safe to retry, and is retried on transient failures.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]; ticketing answers 409 `sold_out` when too few
    /// places are left, 404 when the account has no such ticket, 422
    /// `idempotency_key_reused` when the key was used for another request.
    pub async fn reserve(
        self,
        account: &AccountId,
        reservation: &NewReservation,
        idempotency_key: &str,
    ) -> Result<Reservation, ClientError> {
        let path = self.0.path("/ticketing/v1/{}/reservations", &[account])?;
        self.0
            .post(&path)
            .idempotency_key(idempotency_key)
            .json(reservation)
            .send()
            .await?
            .json()
    }

    /// `GET /ticketing/v1/{account}/reservations/{id}`.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]; 404 when the account has no such reservation.
    pub async fn get_reservation(
        self,
        account: &AccountId,
        id: &str,
    ) -> Result<Reservation, ClientError> {
        let path = self
            .0
            .path("/ticketing/v1/{}/reservations/{}", &[account, &id])?;
        self.0.get_json(&path).await
    }

    /// `POST /ticketing/v1/{account}/reservations/{id}/confirm`: the held
    /// places are sold. Confirming a confirmed reservation is a success.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]; 409 `reservation_expired` or
    /// `reservation_released` when it no longer holds its places.
    pub async fn confirm(self, account: &AccountId, id: &str) -> Result<Reservation, ClientError> {
        let path = self
            .0
            .path("/ticketing/v1/{}/reservations/{}/confirm", &[account, &id])?;
        self.0
            .post(&path)
            // Idempotent by contract (see above), so safe to retry.
            .retry_safe()
            .send()
            .await?
            .json()
    }

    /// `POST /ticketing/v1/{account}/reservations/{id}/release`: gives the
    /// held places back. Releasing a released or expired reservation is a
    /// success.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]; 409 `reservation_confirmed` for a confirmed one.
    pub async fn release(self, account: &AccountId, id: &str) -> Result<Reservation, ClientError> {
        let path = self
            .0
            .path("/ticketing/v1/{}/reservations/{}/release", &[account, &id])?;
        self.0
            .post(&path)
            // Idempotent by contract (see above), so safe to retry.
            .retry_safe()
            .send()
            .await?
            .json()
    }
}
