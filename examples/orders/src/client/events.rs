//! The events orders publishes: their subjects and versioned payloads.
//!
//! With a broker configured (`CHASSIS_NATS_URL`), the outbox relay
//! publishes each event to JetStream on
//! `orders.v1.<account>.<event>` (the chassis'
//! [subject convention](chassis::messaging)), in the stream
//! `orders-events`, with the outbox event id as `Nats-Msg-Id`; without
//! one, it delivers the same payloads through the receivers' HTTP APIs.
//!
//! | event | subject | payload | consumed by |
//! |---|---|---|---|
//! | `reservation.confirm` | `orders.v1.<account>.reservation.confirm` | [`ReservationConfirm`] | ticketing, requiring `ticketing:{account}:reserve:ticket` of orders |
//! | `order.placed` | `orders.v1.<account>.order.placed` | [`OrderPlaced`] | mail, requiring `mail::send:message` of orders |
//!
//! # Evolving the payloads
//!
//! Version 1 ([`VERSION`]) changes only **additively**: a new field is
//! optional (`#[serde(default)]` on the consumer's side), nothing is
//! removed, renamed or retyped, and consumers ignore fields they do not
//! know (none of these types, nor the consumers' readers, deny unknown
//! fields). A breaking change is version 2: a new subject
//! (`orders.v2.…`) and new types, published side by side with version 1
//! until no consumer of version 1 remains.
//!
//! Consumers cannot depend on the orders crate (orders depends on their
//! driver clients), so each keeps a reader of the fields it uses
//! (`mail::consume::OrderPlaced`, `ticketing::consume::ReservationConfirm`);
//! orders' tests check that every payload it publishes decodes into each
//! reader.
//!
//! ```
//! use orders::client::OrderPlaced;
//!
//! let event = OrderPlaced {
//!     account: "67000001".into(),
//!     email: "ann@example.com".into(),
//!     order_id: "ord_1".into(),
//!     quantity: 2,
//!     reservation_id: "rsv_1".into(),
//!     ticket_id: "tkt_1".into(),
//! };
//! assert_eq!(
//!     serde_json::to_string(&event).unwrap(),
//!     r#"{"account":"67000001","email":"ann@example.com","order_id":"ord_1","quantity":2,"reservation_id":"rsv_1","ticket_id":"tkt_1"}"#
//! );
//! ```

use serde::{Deserialize, Serialize};

/// The version of the payloads below: the `v1` of their subjects.
pub const VERSION: u32 = 1;

/// The name of the event that asks ticketing to confirm a reservation.
pub const RESERVATION_CONFIRM: &str = "reservation.confirm";

/// The name of the event that says an order was placed (mail sends its
/// confirmation).
pub const ORDER_PLACED: &str = "order.placed";

/// `reservation.confirm`: ticketing should confirm the order's
/// reservation (held → confirmed). Fields in the order they are
/// serialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationConfirm {
    /// The account (also the subject's).
    pub account: String,
    /// The order that holds the reservation.
    pub order_id: String,
    /// The reservation, in ticketing.
    pub reservation_id: String,
}

/// `order.placed`: an order was placed; mail sends its confirmation.
/// Fields in the order they are serialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPlaced {
    /// The account (also the subject's).
    pub account: String,
    /// Where the confirmation goes.
    pub email: String,
    /// The order.
    pub order_id: String,
    /// How many tickets.
    pub quantity: u32,
    /// The reservation, in ticketing.
    pub reservation_id: String,
    /// The ticket product.
    pub ticket_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_serialize_as_the_outbox_always_stored_them() {
        let placed = OrderPlaced {
            account: "acme".into(),
            email: "ann@example.com".into(),
            order_id: "ord_1".into(),
            quantity: 3,
            reservation_id: "rsv_1".into(),
            ticket_id: "tkt_1".into(),
        };
        let before = serde_json::json!({
            "account": "acme",
            "order_id": "ord_1",
            "reservation_id": "rsv_1",
            "ticket_id": "tkt_1",
            "quantity": 3,
            "email": "ann@example.com",
        });
        assert_eq!(serde_json::to_string(&placed).unwrap(), before.to_string());
        let confirm = ReservationConfirm {
            account: "acme".into(),
            order_id: "ord_1".into(),
            reservation_id: "rsv_1".into(),
        };
        let before = serde_json::json!({
            "account": "acme",
            "reservation_id": "rsv_1",
            "order_id": "ord_1",
        });
        assert_eq!(serde_json::to_string(&confirm).unwrap(), before.to_string());
    }

    #[test]
    fn a_field_added_later_is_ignored_by_version_1() {
        let later = r#"{"account":"a","order_id":"o","reservation_id":"r","note":"new"}"#;
        let read: ReservationConfirm = serde_json::from_str(later).unwrap();
        assert_eq!(read.reservation_id, "r");
    }

    #[test]
    fn every_consumer_reads_what_orders_publishes() {
        let placed = OrderPlaced {
            account: "acme".into(),
            email: "ann@example.com".into(),
            order_id: "ord_1".into(),
            quantity: 3,
            reservation_id: "rsv_1".into(),
            ticket_id: "tkt_1".into(),
        };
        let bytes = serde_json::to_vec(&placed).unwrap();
        let mail: mail::consume::OrderPlaced = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            (mail.order_id.as_str(), mail.email.as_str(), mail.quantity),
            ("ord_1", "ann@example.com", 3)
        );
        assert_eq!(
            (mail.ticket_id.as_str(), mail.reservation_id.as_deref()),
            ("tkt_1", Some("rsv_1"))
        );
        let confirm = ReservationConfirm {
            account: "acme".into(),
            order_id: "ord_1".into(),
            reservation_id: "rsv_1".into(),
        };
        let bytes = serde_json::to_vec(&confirm).unwrap();
        let ticketing: ticketing::consume::ReservationConfirm =
            serde_json::from_slice(&bytes).unwrap();
        assert_eq!(ticketing.reservation_id, "rsv_1");
    }
}
