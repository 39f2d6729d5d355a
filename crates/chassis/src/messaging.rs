//! Messaging between services: events over NATS JetStream, with the same
//! authentication, authorization, audit, correlation and nothing-lost
//! guarantees as HTTP calls.
//!
//! # The standard
//!
//! A service that tells others what happened (an order placed) publishes an
//! **event**; services that care consume it, each at its own pace, none of
//! them known to the publisher. Every event:
//!
//! * **leaves from the transactional outbox.** The state change and its
//!   event are written in one transaction; a relay publishes the event after
//!   the commit and marks the outbox row sent only once the broker
//!   acknowledged it ([`Publisher::publish`] returns). A relay that dies in
//!   between publishes it again; the stream drops the copy, because the
//!   event's id is its `Nats-Msg-Id` and the stream remembers ids for its
//!   duplicate window (`CHASSIS_NATS_DUPLICATE_WINDOW_SECS`).
//! * **goes to a subject named by convention**, in line with API paths
//!   (`/<service>/v<N>/<account>/...`):
//!
//!   ```text
//!   <service>.v<N>.<account>.<event>        orders.v1.67000001.order.placed
//!   ```
//!
//!   `service` is the publisher (`[a-z][a-z0-9_-]{0,63}`), `N` the version
//!   of the payload, `account` the account it belongs to
//!   (`[A-Za-z0-9_-]{1,64}`, as in [`permission`](crate::permission)), and
//!   `event` one or more dot-separated names (`order.placed`,
//!   `reservation.confirm`). [`Subject`] builds and validates them. Each
//!   publishing service owns one stream, `<service>-events`, capturing
//!   `<service>.v<N>.>` for each version it publishes, on file storage,
//!   created or updated idempotently by every publisher at start-up.
//! * **carries a versioned payload** (JSON). Within a version, changes are
//!   **additive** only: a new optional field, never a removed, renamed or
//!   retyped one, and consumers ignore fields they do not know (serde's
//!   default; never `deny_unknown_fields` on an event). A breaking change
//!   is a **new version**, `v<N+1>`, published side by side with `v<N>`
//!   (the publisher lists both versions and writes both events from the
//!   outbox) until no consumer of `v<N>` remains.
//! * **carries the same headers as a call**:
//!
//!   | header | value |
//!   |---|---|
//!   | `Nats-Msg-Id` | the event id (1-128 of `[A-Za-z0-9._~:-]`), JetStream's de-duplication key |
//!   | `x-correlation-id` | the correlation id of the request that caused the event |
//!   | `traceparent`, `tracestate` | W3C trace context: the publisher's producer span |
//!   | `authorization` | `Bearer <the publisher's own service token>` ([`PublisherToken`]) |
//!   | `content-type` | `application/json` |
//!
//! A consumer:
//!
//! * **declares, per subject pattern, what the publisher needs**, as an API
//!   route does: a permission template filled from the subject
//!   ([`Subscription::requires`]`("mail:{account}:send:message")`) or
//!   [`Subscription::public`]. A subscription that declares neither does not
//!   build (deny by default).
//! * **verifies the publisher's token** with the service's
//!   [`Verifier`](crate::auth::Verifier) and its leeway, and **checks the
//!   permission** against the token's grants; deny wins, no grant means no.
//! * **judges expiry by the broker's clock, not its own.** A message may
//!   wait in the stream (a consumer down for an hour) or be redelivered
//!   late; its token is checked as of the time JetStream stored the message
//!   (the `published` timestamp of its delivery, which the broker sets and
//!   the publisher cannot forge), with the usual leeway. So a message
//!   published with a valid token is processed however late it is
//!   delivered, while a captured token replayed after its expiry is refused
//!   (`expired`): the broker stamps the replay with the time it arrived.
//!   (Keys follow the same rule as for calls: a token whose signing key is
//!   no longer published is refused, so keep retired keys published for
//!   longer than messages may wait.)
//! * **never processes a refused message**: no token, a bad or expired
//!   one, another audience, a missing permission, an invalid subject, no
//!   event id, or a payload that does not decode each **dead-letters** the
//!   message with its reason, and the message is terminated.
//! * **acknowledges only after the work is committed**: the handler returns
//!   `Ok` once its transaction committed. A handler error says whether a
//!   later delivery may succeed ([`HandlerError::retry`]: the message comes
//!   back after the backoff, `CHASSIS_NATS_BACKOFF_MS`) or not
//!   ([`HandlerError::permanent`]: dead-lettered at once). The delivery
//!   numbered `CHASSIS_NATS_MAX_DELIVER` that fails is dead-lettered with
//!   its last error. Delivery is at least once: handlers deduplicate by
//!   [event id](Message::event_id), as the exemplars' inboxes do.
//! * **is never blocked by a poison message**: it is dead-lettered and
//!   terminated while the messages after it are handled.
//! * **bounds the work in flight**: at most `CHASSIS_NATS_MAX_IN_FLIGHT`
//!   messages are handled at once (JetStream's `max_ack_pending` too);
//!   `1` means one at a time, one per fetch (the email worker's
//!   "concurrency 1, batch 1").
//! * **audits every decision**: one [audit](crate::audit) event per
//!   delivery, with the subject, the publisher, the decision, the reason and
//!   what became of the message (`processed`, `retry`, `dead_lettered`).
//! * **continues the trace and the correlation id**: the handler runs in a
//!   consumer span that continues `traceparent`, and its log lines carry
//!   the correlation id, the trace and span ids, as a request's do.
//! * **reports its lag**: waiting plus unacknowledged messages, polled from
//!   the broker, as the gauge `messaging_consumer_lag{consumer}`, and as a
//!   readiness check that is down above `CHASSIS_NATS_MAX_LAG` or while the
//!   broker is unreachable.
//!
//! # Dead letters
//!
//! A message a consumer of service `mail` gives up goes to
//! `mail.dlq.<original subject>` (`mail.dlq.orders.v1.67000001.order.placed`)
//! in the stream `mail-dlq`, owned by the consumer's service. It carries the
//! original payload and headers (less `authorization`: a credential is not
//! kept at rest a second time), plus `x-dlq-reason` (the reason code),
//! `x-dlq-error` (the last error, at most 1 KiB), `x-dlq-subject`,
//! `x-dlq-stream`, `x-dlq-stream-sequence`, `x-dlq-deliveries`,
//! `x-dlq-consumer`, `x-dlq-event-id` and `x-dlq-publisher` (the verified
//! `sub`, when there was one). When the dead letter cannot be stored, the
//! message is handed back for a later delivery instead: nothing is lost.
//!
//! # Metrics
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `messaging_published_total` | counter | `service`, `stream`, `outcome` (`published`, `duplicate`, `error`) |
//! | `messaging_consumed_total` | counter | `service`, `consumer`, `outcome` (`processed`, `retry`, `dead_lettered`) |
//! | `messaging_dead_lettered_total` | counter | `service`, `consumer`, `reason` |
//! | `messaging_consumer_lag` | gauge | `service`, `consumer` |
//! | `messaging_handlers_in_flight` | gauge | `service`, `consumer` |
//!
//! # How the chassis does it
//!
//! [`MessagingConfig::read`] reads `CHASSIS_NATS_*` (`None` without
//! `CHASSIS_NATS_URL`: the service keeps its HTTP relay) and
//! [`MessagingConfig::connect`]s. A [`Publisher`] publishes
//! [`OutgoingEvent`]s with a producer span each. A [`Consumer`] is built
//! from a [`Subscription`] and a handler, checked at build time, and run as
//! a background task of the service with
//! [`ServiceBuilder::background`](crate::ServiceBuilder::background); its
//! [`health_check`](Consumer::health_check) goes to
//! [`ServiceBuilder::health_check`](crate::ServiceBuilder::health_check).
//! On shutdown it fetches nothing more and finishes the messages in hand.
//!
//! # Example
//!
//! An orders service's outbox relay publishes `order.placed`; the mail
//! service consumes it, requiring `mail:{account}:send:message` of the
//! publisher:
//!
//! ```no_run
//! use chassis::messaging::{
//!     Consumer, HandlerError, Message, MessagingConfig, OutgoingEvent, Publisher, Subject,
//!     Subscription,
//! };
//! use chassis::permission::AccountId;
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct OrderPlaced {
//!     order_id: String,
//! }
//!
//! # async fn example(
//! #     tokens: chassis::client::TokenSource,
//! #     verifier: chassis::auth::Verifier,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! let env = chassis::config::Env::process();
//! let mut r = chassis::config::Reader::new(&env);
//! let Some(config) = MessagingConfig::read(&mut r) else {
//!     return Ok(()); // no broker: keep the HTTP relay
//! };
//! r.finish()?;
//! let client = config.connect("orders").await?;
//!
//! // Publishing, from the outbox relay, after the commit:
//! let publisher = Publisher::new(client.clone(), &config, "orders", &[1], tokens).await?;
//! let account = AccountId::parse("67000001")?;
//! let subject = Subject::new("orders", 1, &account, "order.placed")?;
//! let event = OutgoingEvent::json(subject, "evt_0193", &OrderPlaced { order_id: "o1".into() })?;
//! let published = publisher.publish(&event).await?; // mark the outbox row sent now
//! assert_eq!(published.stream, "orders-events");
//!
//! // Consuming, in the mail service:
//! let consumer = Consumer::builder(
//!     client,
//!     &config,
//!     "mail",
//!     Subscription::new("orders", 1, "order.placed").requires("mail:{account}:send:message"),
//! )
//! .verifier(verifier)
//! .handler(|m: Message<OrderPlaced>| async move {
//!     // Dedup by m.event_id(), do the work, commit; then return Ok.
//!     let _ = (&m.event.order_id, m.event_id());
//!     Ok::<(), HandlerError>(())
//! })
//! .build()?;
//! let (name, check, options) = consumer.health_check();
//! let service = chassis::ServiceBuilder::new("mail", 1)
//!     .health_check(&name, check, options)
//!     .background("consumer order.placed", move |stop| consumer.run(stop));
//! # let _ = service;
//! # Ok(())
//! # }
//! ```

mod config;
mod consume;
pub mod headers;
mod publish;
mod subject;

pub use config::MessagingConfig;
pub use consume::{Consumer, ConsumerBuilder, HandlerError, Message, Subscription};
pub use publish::{OutgoingEvent, Published, Publisher, PublisherToken, StaticToken};
pub use subject::{
    EventName, MAX_EVENT_LEN, Subject, SubjectError, dead_letter_stream_name, dead_letter_subject,
    stream_name,
};

/// What went wrong in messaging.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum MessagingError {
    /// The broker could not be reached.
    #[error("{0}")]
    Connect(String),
    /// The broker refused or did not acknowledge an operation.
    #[error("broker: {0}")]
    Broker(String),
    /// The publisher's token could not be had.
    #[error("no token to publish with: {0}")]
    Token(String),
    /// An event id outside its grammar.
    #[error("an event id is 1 to 128 characters of [A-Za-z0-9._~:-]")]
    EventId,
    /// A payload that does not serialize, or an invalid content type.
    #[error("payload: {0}")]
    Payload(String),
    /// Invalid declarations (a subscription that declares no access, a bad
    /// name): every problem at once.
    #[error("invalid messaging declarations:{}", .0.iter().map(|p| format!("\n  - {p}")).collect::<String>())]
    Declaration(Vec<String>),
}
