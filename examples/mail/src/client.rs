//! The driver client of `mail`, and the types of its API.
//!
//! Other services send mail through [`MailClient`], never by building
//! requests by hand: the client knows the routes, sets the
//! `Idempotency-Key` (so the chassis may retry a send: `mail` deduplicates
//! by `message_id`) and turns answers into typed values. The identity of
//! each call is chosen where it is made: [`as_service`](chassis::client::DriverClient::as_service)
//! presents the calling service's own token (what an outbox relay does),
//! [`on_behalf_of`](chassis::client::DriverClient::on_behalf_of) forwards the token of the request being
//! served.
//!
//! # Example
//!
//! ```no_run
//! use chassis::client::{CallContext, Downstream};
//! use chassis::correlation::CorrelationId;
//! use mail::client::{MailClient, MailJob, OrderConfirmation};
//!
//! # async fn relay(tokens: chassis::client::TokenSource) -> Result<(), chassis::client::ClientError> {
//! let mail = MailClient::new(
//!     Downstream::builder("mail", "http://127.0.0.1:8084")
//!         .token_source(tokens)
//!         .build()
//!         .expect("a valid base URL"),
//! );
//! // The relay continues the work of the request that stored the event.
//! let cx = CallContext::continuing(CorrelationId::parse("req-42").expect("a valid id"));
//! let job = MailJob::order_confirmation(
//!     "evt-0001",
//!     "alice@example.com",
//!     &OrderConfirmation::new("ord_1", "tkt_1", 2),
//! );
//! let accepted = mail.as_service(&cx).send(&job).await?;
//! assert_eq!(accepted.message_id, "evt-0001");
//! if accepted.duplicate {
//!     // Sent before: nothing was queued twice.
//! }
//! # Ok(())
//! # }
//! ```

use std::{fmt, str::FromStr};

use chassis::client::ClientError;
use serde::{Deserialize, Serialize};

/// The path of the messages collection.
pub const MESSAGES_PATH: &str = "/mail/v1/messages";

/// The name of the order confirmation template.
pub const ORDER_CONFIRMATION: &str = "order_confirmation";

/// The name of the sold-out notice template.
pub const SOLD_OUT: &str = "sold_out";

/// The templates `mail` knows.
pub const TEMPLATES: &[&str] = &[ORDER_CONFIRMATION, SOLD_OUT];

/// Longest `message_id`.
pub const MAX_MESSAGE_ID_LEN: usize = 128;

/// Whether `id` is a valid `message_id`: 1-128 characters of
/// `[A-Za-z0-9._~:-]`.
pub fn is_valid_message_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_MESSAGE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b':' | b'-'))
}

/// A mail job, the body of `POST /mail/v1/messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MailJob {
    /// The caller's id for this mail (e.g. the event id of an outbox row):
    /// 1-128 characters of `[A-Za-z0-9._~:-]`. A second job with the same
    /// id is not queued again.
    #[schema(pattern = "^[A-Za-z0-9._~:-]{1,128}$")]
    pub message_id: String,
    /// The recipient's address.
    pub to: String,
    /// The template: [`ORDER_CONFIRMATION`] or [`SOLD_OUT`].
    #[schema(pattern = "^(order_confirmation|sold_out)$")]
    pub template: String,
    /// What the template shows; for [`ORDER_CONFIRMATION`], an
    /// [`OrderConfirmation`].
    #[serde(default)]
    pub data: serde_json::Value,
    /// The correlation id of the work that asked for this mail; when
    /// missing (or not a valid correlation id), the request's own
    /// `x-correlation-id` is stored instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

impl MailJob {
    /// A job for `template` with `data`.
    pub fn new(
        message_id: impl Into<String>,
        to: impl Into<String>,
        template: impl Into<String>,
        data: serde_json::Value,
    ) -> Self {
        Self {
            message_id: message_id.into(),
            to: to.into(),
            template: template.into(),
            data,
            correlation_id: None,
        }
    }

    /// An order confirmation for `order`.
    pub fn order_confirmation(
        message_id: impl Into<String>,
        to: impl Into<String>,
        order: &OrderConfirmation,
    ) -> Self {
        // A struct of strings and numbers always serializes.
        let data = serde_json::to_value(order).unwrap_or_default();
        Self::new(message_id, to, ORDER_CONFIRMATION, data)
    }

    /// Records `id` as the correlation id of the work that asked for this
    /// mail.
    #[must_use]
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }
}

/// The data of the [`ORDER_CONFIRMATION`] template. Only `order_id`,
/// `ticket_id` and `quantity` are required; unknown members are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderConfirmation {
    /// The order (1-128 characters of `[A-Za-z0-9._~:-]`); in the subject.
    pub order_id: String,
    /// The ticket product.
    pub ticket_id: String,
    /// Tickets bought, 1-100.
    pub quantity: u32,
    /// The account the order belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The ticket product's name, e.g. `Day pass`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket_name: Option<String>,
    /// The reservation holding the tickets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<String>,
    /// Price of one ticket in minor units (cents), with `currency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_minor: Option<i64>,
    /// ISO 4217 code, three capital letters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// First day the tickets are valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_from: Option<String>,
    /// Last day the tickets are valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<String>,
}

impl OrderConfirmation {
    /// The required members; set the optional ones on the result.
    pub fn new(order_id: impl Into<String>, ticket_id: impl Into<String>, quantity: u32) -> Self {
        Self {
            order_id: order_id.into(),
            ticket_id: ticket_id.into(),
            quantity,
            account: None,
            ticket_name: None,
            reservation_id: None,
            price_minor: None,
            currency: None,
            valid_from: None,
            valid_until: None,
        }
    }
}

/// The data of the [`SOLD_OUT`] template: a ticket product has no places
/// left. Every member is required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SoldOut {
    /// The account the product belongs to.
    pub account: String,
    /// The ticket product.
    pub ticket_id: String,
    /// The ticket product's name, e.g. `Day pass`.
    pub ticket_name: String,
    /// Its capacity, all of it taken.
    pub capacity: u32,
}

impl MailJob {
    /// A sold-out notice to `to` about `product`.
    pub fn sold_out(
        message_id: impl Into<String>,
        to: impl Into<String>,
        product: &SoldOut,
    ) -> Self {
        // A struct of strings and numbers always serializes.
        let data = serde_json::to_value(product).unwrap_or_default();
        Self::new(message_id, to, SOLD_OUT, data)
    }
}

/// Where a message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    /// Waiting for a worker (first attempt, or a retry after its backoff).
    Queued,
    /// Leased by a worker that is sending it.
    Sending,
    /// Sent; never sent again.
    Sent,
    /// Given up after the last attempt; `last_error` says why.
    Dead,
}

impl MessageStatus {
    /// The status as stored and sent: `queued`, `sending`, `sent`, `dead`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Sending => "sending",
            Self::Sent => "sent",
            Self::Dead => "dead",
        }
    }
}

impl fmt::Display for MessageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status text that is not one of the four.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown message status `{0}`")]
pub struct UnknownStatus(pub String);

impl FromStr for MessageStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "queued" => Ok(Self::Queued),
            "sending" => Ok(Self::Sending),
            "sent" => Ok(Self::Sent),
            "dead" => Ok(Self::Dead),
            other => Err(UnknownStatus(other.to_owned())),
        }
    }
}

/// The answer to a send: the job is stored (202), or was stored before
/// (200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Accepted {
    /// The job's `message_id`.
    pub message_id: String,
    /// `queued` for a new job; the stored status for a duplicate.
    pub status: MessageStatus,
    /// Whether a job with this `message_id` had been accepted before (the
    /// answer was 200, not 202). Not part of the body.
    #[serde(skip)]
    pub duplicate: bool,
}

/// A stored message, the body of `GET /mail/v1/messages/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Message {
    /// The job's `message_id`.
    pub message_id: String,
    /// The recipient.
    pub to: String,
    /// The template.
    pub template: String,
    /// Where it is.
    pub status: MessageStatus,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The correlation id stored with the job; the mail carries it in
    /// `X-Correlation-ID`.
    pub correlation_id: String,
    /// When the job was accepted (RFC 3339).
    pub created_at: String,
    /// When the next attempt is due (RFC 3339), while it is queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// When it was sent (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<String>,
}

chassis::driver_client! {
    /// The typed client of `mail`; see the [module docs](self). Made with
    /// `MailClient::new(downstream)`, `downstream`'s base URL being `mail`'s
    /// (e.g. `http://127.0.0.1:8084`); `as_service` calls need the calling
    /// service to hold `mail::send:message`.
    pub type MailClient = DriverClient<Mail>;
    /// The calls of `mail`'s API, with one identity and context; made by
    /// `as_service` and `on_behalf_of` of [`MailClient`].
    pub struct Calls;
}

impl Calls<'_> {
    /// `POST /mail/v1/messages`: queues `job`, or finds it queued before.
    /// Both are `Ok`; [`Accepted::duplicate`] tells which. The call carries
    /// `Idempotency-Key: <message_id>`, so the chassis retries it when that
    /// is safe.
    ///
    /// # Errors
    ///
    /// A [`ClientError`]: e.g. [`ClientError::Status`] with status 422 and
    /// the invalid fields in its problem's `errors` member, 403 without
    /// `mail::send:message`, or a transport failure.
    pub async fn send(&self, job: &MailJob) -> Result<Accepted, ClientError> {
        let res = self
            .0
            .post(MESSAGES_PATH)
            .idempotency_key(&job.message_id)
            .json(job)
            .send()
            .await?;
        let mut accepted: Accepted = res.json()?;
        accepted.duplicate = res.status() != http::StatusCode::ACCEPTED;
        Ok(accepted)
    }

    /// `GET /mail/v1/messages/{message_id}` (needs `mail::view:message`).
    ///
    /// # Errors
    ///
    /// [`ClientError::Status`] with 404 when there is no such message,
    /// [`ClientError::InvalidRequest`] when `message_id` is not a valid id
    /// (nothing is sent), or a transport failure.
    pub async fn get(&self, message_id: &str) -> Result<Message, ClientError> {
        let path = self.0.path("/mail/v1/messages/{}", &[&message_id])?;
        self.0.get_json(&path).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_follow_the_grammar() {
        for ok in ["a", "evt-1", "ord_0190:placed.v1~x", &"a".repeat(128)] {
            assert!(is_valid_message_id(ok), "{ok}");
        }
        for bad in ["", "a b", "a/b", "é", "a\n", &"a".repeat(129)] {
            assert!(!is_valid_message_id(bad), "{bad}");
        }
    }

    #[test]
    fn statuses_round_trip() {
        for s in [
            MessageStatus::Queued,
            MessageStatus::Sending,
            MessageStatus::Sent,
            MessageStatus::Dead,
        ] {
            assert_eq!(s.as_str().parse::<MessageStatus>().unwrap(), s);
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::from(s.as_str())
            );
        }
        assert!("lost".parse::<MessageStatus>().is_err());
    }

    #[test]
    fn jobs_serialize_as_the_contract_says() {
        let mut order = OrderConfirmation::new("ord_1", "tkt_1", 2);
        order.currency = Some("EUR".to_owned());
        let job = MailJob::order_confirmation("evt-1", "a@example.com", &order)
            .with_correlation_id("c-1");
        let v = serde_json::to_value(&job).unwrap();
        assert_eq!(v["message_id"], "evt-1");
        assert_eq!(v["to"], "a@example.com");
        assert_eq!(v["template"], "order_confirmation");
        assert_eq!(v["data"]["order_id"], "ord_1");
        assert_eq!(v["data"]["quantity"], 2);
        assert_eq!(v["data"]["currency"], "EUR");
        assert!(v["data"].get("account").is_none());
        assert_eq!(v["correlation_id"], "c-1");
        let accepted: Accepted =
            serde_json::from_str(r#"{"message_id":"evt-1","status":"sent"}"#).unwrap();
        assert_eq!(accepted.status, MessageStatus::Sent);
        assert!(!accepted.duplicate);
    }
}
