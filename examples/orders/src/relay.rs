//! The outbox relay: delivers every committed event at least once.
//!
//! Each order commits two events with it: `reservation.confirm` (to
//! ticketing) and `order.placed` (to mail, which sends the confirmation),
//! with the payloads of [`client::events`](crate::client::events). The
//! relay polls for due events and sends each through one of two
//! transports ([`Transport`]), as the orders service, carrying the
//! correlation id and the trace of the request that placed the order:
//!
//! * **HTTP** (the default, no broker): through the receiver's driver
//!   client (ticketing's confirm, mail's `POST /messages`);
//! * **JetStream** (when `CHASSIS_NATS_URL` is set): published to
//!   `orders.v1.<account>.<event>` in the stream `orders-events`, with the
//!   event id as `Nats-Msg-Id` and orders' own token, for ticketing and
//!   mail to consume (see [`chassis::messaging`]).
//!
//! Only "send one event" differs between them: claiming, leases, retries
//! and parking below are the same. An event is marked delivered only after
//! the receiver (or the broker, with a PubAck; a duplicate counts)
//! acknowledged it; every receiver is idempotent (confirming twice is
//! harmless; mail deduplicates by the event id; the stream drops an event
//! id it has seen within its duplicate window), so a delivery repeated
//! after a crash takes effect once.
//!
//! Events are independent, so the relay sends a claimed batch with up to
//! `ORDERS_RELAY_CONCURRENCY` events in flight at once (one at a time
//! falls far behind under load: each HTTP delivery waits for its answer).
//!
//! # Several instances
//!
//! Every instance of the service runs a relay over the same outbox (on
//! Postgres), so events are **leased**: a relay claims a batch of due
//! events with one conditional update that names it (a unique id from
//! [`chassis::id`]) as their `lease_owner` until `lease_until`, and
//! delivers only those; no other relay claims them while the lease holds
//! (see `store::claim_due`). Only the owner records the outcome
//! (delivered, retry later, parked): a relay whose lease ran out finds the
//! event claimed by another one and leaves it be. A relay that dies leaves
//! its events leased until the lease expires; then any relay claims them.
//! A relay starts delivering an event only in the first half of its lease,
//! so each delivery has at least half the lease to finish; events of the
//! batch it did not get to, and those it holds when it stops, it gives
//! back at once.
//!
//! Failures:
//!
//! * the receiver is unavailable (connection refused, timeout, 5xx, 429,
//!   circuit open): retried for as long as it takes, with exponential backoff
//!   and full jitter ([`backoff`]); while the breaker is open the receiver is
//!   not called at all and the event waits for the breaker's `Retry-After`;
//! * the receiver refuses the event (another 4xx): retried up to
//!   `max_attempts`, then **parked** with its reason: the order's status
//!   becomes `attention`, `outbox_parked` shows it and the non-critical
//!   readiness check `outbox-parked` turns down. Nothing disappears silently.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `ORDERS_RELAY_POLL_MS` | `200` | time between polls (none after a full batch: the next is claimed at once) |
//! | `ORDERS_RELAY_BATCH` | `32` | events per poll |
//! | `ORDERS_RELAY_RETRY_BASE_MS` | `500` | first backoff |
//! | `ORDERS_RELAY_RETRY_MAX_MS` | `60000` | longest backoff |
//! | `ORDERS_RELAY_MAX_ATTEMPTS` | `8` | attempts before a refused event is parked |
//! | `ORDERS_RELAY_LEASE_MS` | `60000` | how long a relay holds the events it claimed |
//! | `ORDERS_RELAY_CONCURRENCY` | `16` | events of a claimed batch sent at once (1: one after the other) |

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use chassis::{
    client::{CallContext, ClientError},
    config::Reader,
    context::TraceContext,
    correlation::CorrelationId,
    db::Database,
    health::{Check, CheckError},
    messaging::{MessagingError, OutgoingEvent, Publisher, Subject},
    otel::Span,
    permission::AccountId,
};
use futures_util::StreamExt as _;
use http::StatusCode;
use mail::client::{MailJob, OrderConfirmation};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    client::{
        OrderPlaced, ReservationConfirm,
        events::{ORDER_PLACED, RESERVATION_CONFIRM, VERSION},
    },
    store::{self, OutboxEvent},
};

/// The relay's tuning; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    /// Time between polls.
    pub poll: Duration,
    /// Events per poll.
    pub batch: u32,
    /// First backoff.
    pub retry_base: Duration,
    /// Longest backoff.
    pub retry_max: Duration,
    /// Attempts before a refused event is parked.
    pub max_attempts: u32,
    /// How long a relay holds the events it claimed.
    pub lease: Duration,
    /// Events of a claimed batch sent at once.
    pub concurrency: usize,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(200),
            batch: 32,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            max_attempts: 8,
            lease: Duration::from_secs(60),
            concurrency: 16,
        }
    }
}

impl RelaySettings {
    /// Reads `ORDERS_RELAY_*`.
    pub fn read(r: &mut Reader<'_>) -> Self {
        let d = Self::default();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let poll: u64 = r.optional(
            "ORDERS_RELAY_POLL_MS",
            ms(d.poll),
            "outbox poll interval, ms",
        );
        let batch: u32 = r.optional("ORDERS_RELAY_BATCH", d.batch, "events per poll");
        let base: u64 = r.optional(
            "ORDERS_RELAY_RETRY_BASE_MS",
            ms(d.retry_base),
            "first delivery backoff, ms",
        );
        let max: u64 = r.optional(
            "ORDERS_RELAY_RETRY_MAX_MS",
            ms(d.retry_max),
            "longest delivery backoff, ms",
        );
        let attempts: u32 = r.optional(
            "ORDERS_RELAY_MAX_ATTEMPTS",
            d.max_attempts,
            "attempts before a refused event is parked",
        );
        let lease: u64 = r.optional(
            "ORDERS_RELAY_LEASE_MS",
            ms(d.lease),
            "how long a relay holds the events it claimed, ms",
        );
        let concurrency: u32 = r.optional(
            "ORDERS_RELAY_CONCURRENCY",
            16,
            "events of a claimed batch sent at once",
        );
        if lease < 1000 {
            r.problem("ORDERS_RELAY_LEASE_MS", "must be at least 1000");
        }
        for (name, zero) in [
            ("ORDERS_RELAY_POLL_MS", poll == 0),
            ("ORDERS_RELAY_BATCH", batch == 0),
            ("ORDERS_RELAY_MAX_ATTEMPTS", attempts == 0),
            ("ORDERS_RELAY_CONCURRENCY", concurrency == 0),
        ] {
            if zero {
                r.problem(name, "must be at least 1");
            }
        }
        Self {
            poll: Duration::from_millis(poll.max(1)),
            batch: batch.max(1),
            retry_base: Duration::from_millis(base),
            retry_max: Duration::from_millis(max.max(base)),
            max_attempts: attempts.max(1),
            lease: Duration::from_millis(lease.max(1000)),
            concurrency: usize::try_from(concurrency.max(1)).unwrap_or(1),
        }
    }
}

/// The wait before attempt `attempt + 1`: a random time between zero and
/// `base × 2^attempt`, capped at `max` (exponential backoff with full
/// jitter). `unit` is a random number in `[0, 1)`.
pub fn backoff(attempt: u32, base: Duration, max: Duration, unit: f64) -> Duration {
    let bound = base.saturating_mul(1u32 << attempt.min(20)).min(max);
    bound.mul_f64(unit.clamp(0.0, 1.0))
}

/// How the relay sends one event: the only part of it that differs with a
/// broker. See the [module docs](self).
#[derive(Debug, Clone)]
pub enum Transport {
    /// Through the receivers' HTTP APIs, with their driver clients.
    Http {
        /// Ticketing, for `reservation.confirm`.
        ticketing: ticketing::client::TicketingClient,
        /// Mail, for `order.placed`.
        mail: mail::client::MailClient,
    },
    /// Published to JetStream. One publisher per event, each with orders'
    /// own token for the audience of the event's consumer (the audience
    /// orders' calls to it use: a token names the services it is for).
    Nats {
        /// Publishes `reservation.confirm`, with a token for ticketing.
        confirm: Publisher,
        /// Publishes `order.placed`, with a token for mail.
        placed: Publisher,
        /// Orders' name on the broker (`orders`, or `<prefix>-orders` with
        /// `CHASSIS_NATS_PREFIX`): the first part of every subject.
        service: String,
    },
}

/// An outbox event's payload, decoded.
enum Event {
    Confirm(ReservationConfirm),
    Placed(OrderPlaced),
}

impl Event {
    /// Decodes the stored payload of an event of `kind`.
    fn decode(kind: &str, payload: &serde_json::Value) -> Result<Self, String> {
        let bad = |e: serde_json::Error| format!("the {kind} event's payload is not valid: {e}");
        match kind {
            RESERVATION_CONFIRM => serde::Deserialize::deserialize(payload)
                .map(Self::Confirm)
                .map_err(bad),
            ORDER_PLACED => serde::Deserialize::deserialize(payload)
                .map(Self::Placed)
                .map_err(bad),
            other => Err(format!("unknown event kind {other:?}")),
        }
    }

    fn account(&self) -> &str {
        match self {
            Self::Confirm(e) => &e.account,
            Self::Placed(e) => &e.account,
        }
    }
}

/// A delivery refused for good by the relay itself (parked at once on its
/// last attempt, like a receiver's refusal).
fn refused(error: String) -> Delivery {
    Delivery::Later {
        wait: None,
        refused: true,
        error,
    }
}

/// Delivers the outbox; see the [module docs](self).
pub struct Relay {
    db: Database,
    transport: Transport,
    settings: RelaySettings,
    /// This relay's name in `lease_owner`, unique among all relays.
    owner: String,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("owner", &self.owner)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// How one delivery went.
enum Delivery {
    Done,
    /// Try again after `wait` (or the backoff); only refusals lead to
    /// parking.
    Later {
        wait: Option<Duration>,
        refused: bool,
        error: String,
    },
}

impl Relay {
    /// A relay over the outbox in `db`, sending through `transport`.
    pub fn new(db: Database, transport: Transport, settings: RelaySettings) -> Self {
        Self {
            db,
            transport,
            settings,
            owner: chassis::id::prefixed("relay"),
        }
    }

    /// This relay's name in the outbox's `lease_owner`.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// A readiness check that is down while events are parked.
    pub fn parked_check(&self) -> ParkedCheck {
        ParkedCheck(self.db.clone())
    }

    /// Runs until `stop`; the events being delivered when it fires are
    /// finished first.
    pub async fn run(self, stop: CancellationToken) {
        tracing::info!(owner = %self.owner, "outbox relay started");
        let lease = i64::try_from(self.settings.lease.as_millis()).unwrap_or(i64::MAX / 4);
        // A full batch means more are due: claim again at once rather than
        // after the poll interval, so a backlog drains at the speed of
        // delivery, not at a batch per poll.
        let mut full = false;
        let mut counted = tokio::time::Instant::now();
        loop {
            if full {
                if stop.is_cancelled() {
                    break;
                }
            } else {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(self.settings.poll) => {}
                }
            }
            full = false;
            let now = chassis::time::now_millis();
            let until = now.saturating_add(lease);
            match store::claim_due(&self.db, &self.owner, now, until, self.settings.batch).await {
                Ok(events) => {
                    full = events.len() >= self.settings.batch as usize;
                    let left = AtomicBool::new(false);
                    let me = &self;
                    futures_util::stream::iter(events)
                        .for_each_concurrent(self.settings.concurrency, |event| {
                            let left = &left;
                            let stop = &stop;
                            async move {
                                // Start a delivery only with half the lease left.
                                if stop.is_cancelled()
                                    || chassis::time::now_millis() > until - lease / 2
                                {
                                    left.store(true, Ordering::Relaxed);
                                    return;
                                }
                                me.deliver(event).await;
                            }
                        })
                        .await;
                    if left.load(Ordering::Relaxed) {
                        self.give_back().await;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot claim outbox events"),
            }
            // Counted once per poll interval, not once per batch: a count
            // reads every pending row.
            if counted.elapsed() >= self.settings.poll {
                counted = tokio::time::Instant::now();
                if let Ok((pending, parked)) = store::outbox_counts(&self.db).await {
                    metrics::gauge!("outbox_pending").set(pending as f64);
                    metrics::gauge!("outbox_parked").set(parked as f64);
                }
            }
        }
        tracing::info!("outbox relay stopped");
    }

    /// Gives back the events claimed and not delivered, for any relay to
    /// claim at once; should this fail, their lease expires.
    async fn give_back(&self) {
        if let Err(e) = store::release(&self.db, &self.owner).await {
            tracing::warn!(error = %e, "cannot give claimed events back; their lease will expire");
        }
    }

    async fn deliver(&self, event: OutboxEvent) {
        let id =
            CorrelationId::parse(&event.correlation_id).unwrap_or_else(CorrelationId::generate);
        // The delivery continues the trace of the request that stored the
        // event, as a child of the transaction that wrote it.
        let queued = event
            .trace
            .as_ref()
            .and_then(|(parent, state)| TraceContext::from_traceparent(parent, state.as_deref()))
            .unwrap_or_else(TraceContext::new_unrecorded_root);
        let mut delivery = Span::consumer(&queued, format!("outbox deliver {}", event.kind));
        delivery.set_attribute("messaging.system", "outbox");
        delivery.set_attribute("messaging.operation.type", "process");
        delivery.set_attribute("messaging.message.id", event.id.clone());
        let (trace_id, span_id) = (delivery.trace().trace_id(), delivery.trace().span_id());
        // Its log lines carry the ids, as a request's do.
        let span = tracing::info_span!(
            target: chassis::telemetry::REQUEST_TARGET,
            "outbox_delivery",
            correlation_id = %id,
            trace_id = trace_id.as_str(),
            span_id = span_id.as_str(),
            event_id = %event.id,
            kind = %event.kind,
        );
        let cx = CallContext::continuing(id.clone()).with_trace(delivery.trace().clone());
        let outcome = self
            .send(&cx, (&id, delivery.trace()), &event)
            .instrument(span.clone())
            .await;
        if !matches!(outcome, Delivery::Done) {
            delivery.set_error("not_delivered");
        }
        let _enter = span.enter();
        let kind = event.kind.clone();
        // Recording the outcome is a transaction of its own, inside the
        // delivery's span.
        let system = self.db.backend().system_name();
        let mut recorded = Span::storage(delivery.trace(), system, "record delivery");
        let result = match outcome {
            Delivery::Done => {
                metrics::counter!("outbox_delivered_total", "kind" => kind).increment(1);
                tracing::info!(attempts = event.attempts + 1, "event delivered");
                store::delivered(&self.db, &self.owner, &event).await
            }
            Delivery::Later {
                wait,
                refused,
                error,
            } => {
                metrics::counter!("outbox_delivery_failures_total", "kind" => kind).increment(1);
                if refused && event.attempts + 1 >= self.settings.max_attempts {
                    tracing::error!(%error, attempts = event.attempts + 1, "event parked");
                    store::park(&self.db, &self.owner, &event, &error).await
                } else {
                    // A wait given by an open breaker is no attempt at all.
                    let counted = wait.is_none();
                    let wait = wait.unwrap_or_else(|| {
                        backoff(
                            event.attempts,
                            self.settings.retry_base,
                            self.settings.retry_max,
                            fastrand::f64(),
                        )
                    });
                    tracing::warn!(%error, retry_in_ms = wait.as_millis() as u64, "event not delivered");
                    let next = chassis::time::now_millis()
                        + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
                    store::retry_later(&self.db, &self.owner, &event, counted, next, &error).await
                }
            }
        };
        match result {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                "the event's lease expired and another relay claimed it; it records the outcome"
            ),
            Err(e) => {
                recorded.set_error(system);
                tracing::warn!(error = %e, "cannot record the delivery; it will be repeated");
            }
        }
        recorded.end();
        delivery.end();
    }

    /// Sends one event through the transport: on HTTP with `cx`, on
    /// JetStream with the correlation id and the delivery's trace context.
    async fn send(
        &self,
        cx: &CallContext,
        (id, trace): (&CorrelationId, &TraceContext),
        event: &OutboxEvent,
    ) -> Delivery {
        let decoded = match Event::decode(&event.kind, &event.payload) {
            Ok(e) => e,
            Err(error) => return refused(error),
        };
        let Ok(account) = AccountId::parse(decoded.account()) else {
            return refused("the event names no valid account".to_owned());
        };
        match &self.transport {
            Transport::Http { ticketing, mail } => {
                let result = match decoded {
                    Event::Confirm(e) => ticketing
                        .as_service(cx)
                        .confirm(&account, &e.reservation_id)
                        .await
                        .map(drop),
                    Event::Placed(e) => {
                        let confirmation = OrderConfirmation {
                            account: Some(e.account),
                            reservation_id: Some(e.reservation_id),
                            ..OrderConfirmation::new(e.order_id, e.ticket_id, e.quantity)
                        };
                        let job =
                            MailJob::order_confirmation(event.id.clone(), e.email, &confirmation)
                                .with_correlation_id(event.correlation_id.clone());
                        mail.as_service(cx).send(&job).await.map(drop)
                    }
                };
                match result {
                    Ok(()) => Delivery::Done,
                    Err(e) => classify(&e),
                }
            }
            Transport::Nats {
                confirm,
                placed,
                service,
            } => {
                let publisher = match decoded {
                    Event::Confirm(_) => confirm,
                    Event::Placed(_) => placed,
                };
                let outgoing = Subject::new(service, VERSION, &account, &event.kind)
                    .map_err(|e| MessagingError::Payload(e.to_string()))
                    .and_then(|subject| match &decoded {
                        Event::Confirm(e) => OutgoingEvent::json(subject, &event.id, e),
                        Event::Placed(e) => OutgoingEvent::json(subject, &event.id, e),
                    });
                let outgoing = match outgoing {
                    Ok(o) => o.correlation_id(id.clone()).trace(trace.clone()),
                    Err(e) => return refused(e.to_string()),
                };
                match publisher.publish(&outgoing).await {
                    Ok(published) => {
                        tracing::debug!(
                            stream = %published.stream,
                            sequence = published.sequence,
                            duplicate = published.duplicate,
                            "event published"
                        );
                        Delivery::Done
                    }
                    // Invalid payloads or ids do not pass with time.
                    Err(e @ (MessagingError::Payload(_) | MessagingError::EventId)) => {
                        refused(e.to_string())
                    }
                    // The broker or auth unavailable: retried for as long as
                    // it takes.
                    Err(e) => Delivery::Later {
                        wait: None,
                        refused: false,
                        error: e.to_string(),
                    },
                }
            }
        }
    }
}

fn classify(e: &ClientError) -> Delivery {
    let error = e.to_string();
    match e {
        ClientError::CircuitOpen { retry_after, .. } => Delivery::Later {
            wait: Some((*retry_after).max(Duration::from_millis(50))),
            refused: false,
            error,
        },
        ClientError::Status { status, .. }
            if status.is_client_error()
                && *status != StatusCode::REQUEST_TIMEOUT
                && *status != StatusCode::TOO_MANY_REQUESTS =>
        {
            Delivery::Later {
                wait: None,
                refused: true,
                error,
            }
        }
        ClientError::NoCallerToken { .. } | ClientError::InvalidRequest { .. } => Delivery::Later {
            wait: None,
            refused: true,
            error,
        },
        _ => Delivery::Later {
            wait: None,
            refused: false,
            error,
        },
    }
}

/// Down while events are parked; see [`Relay::parked_check`].
#[derive(Debug, Clone)]
pub struct ParkedCheck(Database);

impl Check for ParkedCheck {
    async fn check(&self) -> Result<(), CheckError> {
        let (_, parked) = store::outbox_counts(&self.0)
            .await
            .map_err(|e| CheckError::new(format!("cannot read the outbox: {e}")))?;
        if parked > 0 {
            return Err(CheckError::new(format!(
                "{parked} outbox events are parked"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pairs: &[(&str, &str)]) -> Result<RelaySettings, chassis::config::ConfigError> {
        let env = chassis::config::Env::from_pairs(pairs.iter().copied());
        let mut r = Reader::new(&env);
        let s = RelaySettings::read(&mut r);
        r.finish().map(|()| s)
    }

    #[test]
    fn the_lease_is_a_setting_of_at_least_a_second() {
        assert_eq!(read(&[]).unwrap(), RelaySettings::default());
        assert_eq!(RelaySettings::default().lease, Duration::from_secs(60));
        let s = read(&[("ORDERS_RELAY_LEASE_MS", "5000")]).unwrap();
        assert_eq!(s.lease, Duration::from_secs(5));
        let err = read(&[
            ("ORDERS_RELAY_LEASE_MS", "999"),
            ("ORDERS_RELAY_BATCH", "0"),
        ])
        .unwrap_err();
        let names: Vec<_> = err.problems().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["ORDERS_RELAY_LEASE_MS", "ORDERS_RELAY_BATCH"]);
    }

    #[test]
    fn concurrency_is_a_setting_of_at_least_one() {
        assert_eq!(RelaySettings::default().concurrency, 16);
        assert_eq!(
            read(&[("ORDERS_RELAY_CONCURRENCY", "1")])
                .unwrap()
                .concurrency,
            1
        );
        let err = read(&[("ORDERS_RELAY_CONCURRENCY", "0")]).unwrap_err();
        assert_eq!(err.problems()[0].name, "ORDERS_RELAY_CONCURRENCY");
    }

    #[test]
    fn stored_payloads_decode_into_their_event_and_others_are_refused() {
        let placed = serde_json::json!({
            "account": "acme", "order_id": "o", "reservation_id": "r",
            "ticket_id": "t", "quantity": 2, "email": "a@example.com",
        });
        assert!(matches!(
            Event::decode(ORDER_PLACED, &placed),
            Ok(Event::Placed(OrderPlaced { quantity: 2, .. }))
        ));
        assert!(Event::decode(RESERVATION_CONFIRM, &placed).is_ok_and(|e| e.account() == "acme"));
        assert!(Event::decode(RESERVATION_CONFIRM, &serde_json::json!({"account": 1})).is_err());
        assert!(Event::decode("order.shipped", &placed).is_err());
    }

    #[test]
    fn backoff_doubles_within_full_jitter_and_caps() {
        let base = Duration::from_millis(500);
        let max = Duration::from_secs(60);
        for attempt in 0..12 {
            let bound = (base * 2u32.pow(attempt)).min(max);
            assert_eq!(backoff(attempt, base, max, 0.0), Duration::ZERO);
            assert_eq!(backoff(attempt, base, max, 1.0), bound, "attempt {attempt}");
            let mid = backoff(attempt, base, max, 0.5);
            assert!(mid <= bound && mid >= bound / 2 - Duration::from_millis(1));
        }
        assert_eq!(backoff(40, base, max, 1.0), max);
    }
}
