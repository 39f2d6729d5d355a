//! `order.placed` from NATS JetStream: the order confirmation, queued as
//! `POST /messages` queues it.
//!
//! When a broker is configured (`CHASSIS_NATS_URL`), mail consumes
//! `orders.v1.*.order.placed` (see [`chassis::messaging`]) with the
//! durable consumer `mail-orders-v1-order_placed`. It requires of the
//! publisher the permission orders needs to `POST /mail/v1/messages`,
//! `mail::send:message`: the token on the message is verified with the
//! service's own verifier (as of the time the broker stored the message)
//! and a publisher without the grant is refused, dead-lettered to
//! `mail.dlq.<subject>` (stream `mail-dlq`) and audited; nothing is
//! queued.
//!
//! An allowed message becomes an order confirmation whose `message_id` is
//! the event id, queued by the same code as `POST /messages` (so a
//! confirmation delivered by HTTP and again by the broker, or twice by the
//! broker, is queued once); the message is acknowledged only after the job
//! is committed. A payload that does not make a valid job is dead-lettered
//! at once (`invalid_event`); a database failure is retried with the
//! broker's backoff (`database`).

use chassis::{
    audit::Auditor,
    auth::Verifier,
    messaging::{Consumer, HandlerError, Message, MessagingConfig, MessagingError, Subscription},
};
use serde::Deserialize;

use crate::{
    client::{MailJob, OrderConfirmation},
    job,
    routes::{self, AppState},
};

/// The publisher of the events mail consumes.
pub const PUBLISHER: &str = "orders";

/// The permission a publisher of `order.placed` needs: the one of
/// `POST /mail/v1/messages`.
pub const SEND: &str = "mail::send:message";

/// The fields of orders' `order.placed` (version 1) that mail reads: a
/// tolerant reader, ignoring fields it does not know.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OrderPlaced {
    /// The account, when the payload names it (it must be the subject's).
    #[serde(default)]
    pub account: Option<String>,
    /// Where the confirmation goes.
    pub email: String,
    /// The order.
    pub order_id: String,
    /// How many tickets.
    pub quantity: u32,
    /// The reservation, in ticketing.
    #[serde(default)]
    pub reservation_id: Option<String>,
    /// The ticket product.
    pub ticket_id: String,
}

/// Connects to the broker and builds the consumer of `order.placed`
/// (under mail's name on the broker, `nats.name("mail")`), its handler
/// queueing into `state`.
pub(crate) async fn order_placed(
    nats: &MessagingConfig,
    verifier: Verifier,
    auditor: Auditor,
    state: AppState,
) -> Result<Consumer, MessagingError> {
    let client = nats.connect(&nats.name(crate::NAME)).await?;
    Consumer::builder(
        client,
        nats,
        &nats.name(crate::NAME),
        Subscription::new(&nats.name(PUBLISHER), 1, "order.placed").requires(SEND),
    )
    .verifier(verifier)
    .auditor(auditor)
    .handler(move |m: Message<OrderPlaced>| {
        let state = state.clone();
        async move { handle(&state, m).await }
    })
    .build()
}

/// Queues the confirmation of `m`, once per event id.
async fn handle(state: &AppState, m: Message<OrderPlaced>) -> Result<(), HandlerError> {
    let account = m.subject().account().as_str();
    let e = &m.event;
    if e.account.as_deref().is_some_and(|a| a != account) {
        return Err(HandlerError::permanent(
            "account_mismatch",
            "the payload's account is not the subject's",
        ));
    }
    let confirmation = OrderConfirmation {
        account: Some(account.to_owned()),
        reservation_id: e.reservation_id.clone(),
        ..OrderConfirmation::new(e.order_id.clone(), e.ticket_id.clone(), e.quantity)
    };
    let request = MailJob::order_confirmation(m.event_id(), e.email.clone(), &confirmation)
        .with_correlation_id(m.correlation_id().to_string());
    // The job as `POST /messages` takes it, validated by the same code.
    let body =
        serde_json::to_value(&request).map_err(|e| HandlerError::permanent("invalid_event", e))?;
    let valid = job::validate(&body).map_err(|e| HandlerError::permanent("invalid_event", e))?;
    routes::accept(state, &valid, m.correlation_id(), m.trace())
        .await
        .map_err(|e| HandlerError::retry("database", e))?;
    Ok(())
}
