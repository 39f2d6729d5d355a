//! `reservation.confirm` from NATS JetStream: the confirm of
//! `POST /ticketing/v1/{account}/reservations/{id}/confirm`, as a message.
//!
//! When a broker is configured (`CHASSIS_NATS_URL`), ticketing consumes
//! `orders.v1.*.reservation.confirm` (see [`chassis::messaging`]) with the
//! durable consumer `ticketing-orders-v1-reservation_confirm`. It requires
//! of the publisher what the HTTP confirm route requires,
//! `ticketing:{account}:reserve:ticket`, the account taken from the
//! subject: the token on the message is verified with the service's own
//! verifier, and a publisher without the grant is refused, dead-lettered
//! to `ticketing.dlq.<subject>` (stream `ticketing-dlq`) and audited.
//!
//! The handler is the store's confirm, in the subject's account:
//! confirming twice is harmless (a confirmed reservation stays confirmed),
//! so a message delivered again takes effect once. A reservation that is
//! not found in the account, released or expired will not become
//! confirmable: the message is dead-lettered at once with that reason
//! (`reservation_not_found`, `reservation_released`,
//! `reservation_expired`). A database failure is retried with the broker's
//! backoff (`database`).

use chassis::{
    audit::Auditor,
    auth::Verifier,
    messaging::{Consumer, HandlerError, Message, MessagingConfig, MessagingError, Subscription},
    otel::Span,
};
use serde::Deserialize;

use crate::{client::ReservationStatus, error::ApiError, store::Store};

/// The publisher of the events ticketing consumes.
pub const PUBLISHER: &str = "orders";

/// The permission a publisher of `reservation.confirm` needs: the one of
/// the HTTP confirm route.
pub const RESERVE: &str = "ticketing:{account}:reserve:ticket";

/// The fields of orders' `reservation.confirm` (version 1) that ticketing
/// reads: a tolerant reader, ignoring fields it does not know.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReservationConfirm {
    /// The account, when the payload names it (it must be the subject's).
    #[serde(default)]
    pub account: Option<String>,
    /// The reservation to confirm.
    pub reservation_id: String,
}

/// Connects to the broker and builds the consumer of
/// `reservation.confirm` (under ticketing's name on the broker), its
/// handler confirming in `store`.
pub(crate) async fn reservation_confirm(
    nats: &MessagingConfig,
    verifier: Verifier,
    auditor: Auditor,
    store: Store,
) -> Result<Consumer, MessagingError> {
    let client = nats.connect(&nats.name(crate::NAME)).await?;
    Consumer::builder(
        client,
        nats,
        &nats.name(crate::NAME),
        Subscription::new(&nats.name(PUBLISHER), 1, "reservation.confirm").requires(RESERVE),
    )
    .verifier(verifier)
    .auditor(auditor)
    .handler(move |m: Message<ReservationConfirm>| {
        let store = store.clone();
        async move { handle(&store, m).await }
    })
    .build()
}

/// Confirms the reservation of `m` in the subject's account.
async fn handle(store: &Store, m: Message<ReservationConfirm>) -> Result<(), HandlerError> {
    let account = m.subject().account();
    if m.event
        .account
        .as_deref()
        .is_some_and(|a| a != account.as_str())
    {
        return Err(HandlerError::permanent(
            "account_mismatch",
            "the payload's account is not the subject's",
        ));
    }
    let mut span = Span::storage(m.trace(), store.system(), "confirm");
    match store.confirm(account, &m.event.reservation_id).await {
        Ok(r) => {
            tracing::info!(reservation_id = %r.id, order_event = %m.event_id(), "reservation confirmed");
            Ok(())
        }
        Err(e) => {
            let error = e.to_string();
            Err(match e {
                ApiError::NotFound(_) => HandlerError::permanent("reservation_not_found", error),
                ApiError::NotHeld(ReservationStatus::Released) => {
                    HandlerError::permanent("reservation_released", error)
                }
                ApiError::NotHeld(ReservationStatus::Expired) => {
                    HandlerError::permanent("reservation_expired", error)
                }
                ApiError::NotHeld(_) => HandlerError::permanent("reservation_not_held", error),
                ApiError::Database(_) => {
                    span.set_error(store.system());
                    HandlerError::retry("database", error)
                }
                _ => {
                    span.set_error(store.system());
                    HandlerError::permanent("stored_data", error)
                }
            })
        }
    }
}
