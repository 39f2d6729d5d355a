//! Consuming: a durable pull consumer, the decision on each message, the
//! handler, the acknowledgement or the dead letter.

use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use async_nats::jetstream::{self, AckKind, consumer::pull, stream};
use futures_util::{FutureExt as _, StreamExt as _};
use http::Method;
use serde::de::DeserializeOwned;
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::{
    MessagingConfig, MessagingError,
    headers::{self, is_event_id},
    subject::{EventName, Subject, dead_letter_stream_name, dead_letter_subject, stream_name},
};
use crate::{
    audit::{
        AuditDecision, AuditEvent, AuditMessage, AuditRoute, Auditor, LogSink, MessageOutcome,
    },
    auth::{Principal, Verifier},
    context::{CorrelationId, TraceContext},
    health::{Check, CheckError, CheckOptions},
    otel::Span,
    permission::{Permission, PermissionTemplate, is_name},
};

/// What a subscription requires of a message's publisher.
#[derive(Debug, Clone)]
enum Access {
    Permission(PermissionTemplate),
    Public,
}

/// One subject pattern a consumer takes messages from, and what it
/// requires of their publisher: deny by default, as API routes are.
///
/// The pattern is `<publisher>.v<N>.*.<event>`: every account's `event`
/// in version `N` of `publisher`'s events. The requirement is a permission
/// template whose only placeholder is `{account}`, filled from the
/// message's subject (`mail:{account}:send:message`), or
/// [`public`](Self::public) (no token needed; still audited).
#[derive(Debug, Clone)]
#[must_use = "give it to `Consumer::builder`"]
pub struct Subscription {
    publisher: String,
    version: u32,
    event: String,
    access: Option<Result<Access, String>>,
}

impl Subscription {
    /// Every account's `event` in version `version` of `publisher`'s events.
    pub fn new(publisher: &str, version: u32, event: &str) -> Self {
        Self {
            publisher: publisher.to_owned(),
            version,
            event: event.to_owned(),
            access: None,
        }
    }

    /// Requires the publisher's token to grant `template`, its `{account}`
    /// filled from the subject.
    pub fn requires(mut self, template: &str) -> Self {
        self.access = Some(
            template
                .parse()
                .map(Access::Permission)
                .map_err(|e| format!("invalid permission `{template}`: {e}")),
        );
        self
    }

    /// Takes messages from any publisher, without a token (still audited,
    /// with reason `public`).
    pub fn public(mut self) -> Self {
        self.access = Some(Ok(Access::Public));
        self
    }

    /// The subject pattern, `<publisher>.v<N>.*.<event>`.
    pub fn pattern(&self) -> String {
        format!("{}.v{}.*.{}", self.publisher, self.version, self.event)
    }
}

/// Why a handler did not finish its work: retry later, or never.
#[derive(Debug, Clone)]
pub struct HandlerError {
    retry: bool,
    reason: &'static str,
    error: String,
}

impl HandlerError {
    /// A failure that may pass (a downstream unavailable, a database
    /// busy): the message is delivered again after the backoff, and
    /// dead-lettered with this error once it was delivered
    /// `CHASSIS_NATS_MAX_DELIVER` times. `reason` is a short code for the
    /// audit event and the dead letter (`downstream_unavailable`); `error`
    /// the text for operators.
    pub fn retry(reason: &'static str, error: impl fmt::Display) -> Self {
        Self {
            retry: true,
            reason,
            error: error.to_string(),
        }
    }

    /// A failure that will not pass (the event names an order that does
    /// not exist): the message is dead-lettered at once.
    pub fn permanent(reason: &'static str, error: impl fmt::Display) -> Self {
        Self {
            retry: false,
            reason,
            error: error.to_string(),
        }
    }

    /// Whether a later delivery may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retry
    }

    /// The reason code.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.error)
    }
}

impl std::error::Error for HandlerError {}

/// A message handed to a handler: its decoded event and what the chassis
/// established about it.
#[derive(Debug)]
pub struct Message<T> {
    /// The decoded payload.
    pub event: T,
    subject: Subject,
    event_id: Arc<str>,
    correlation_id: CorrelationId,
    trace: TraceContext,
    publisher: Option<Principal>,
    delivery: u64,
    published: SystemTime,
}

impl<T> Message<T> {
    /// The subject it was published to.
    pub fn subject(&self) -> &Subject {
        &self.subject
    }

    /// The event id (`Nats-Msg-Id`): what a handler deduplicates by, since
    /// a message may be delivered more than once.
    pub fn event_id(&self) -> &str {
        &self.event_id
    }

    /// The correlation id it carried (or a new one).
    pub fn correlation_id(&self) -> &CorrelationId {
        &self.correlation_id
    }

    /// The consumer span's context: calls and transactions the handler
    /// makes continue the publisher's trace from here.
    pub fn trace(&self) -> &TraceContext {
        &self.trace
    }

    /// The verified publisher; `None` on a public subscription.
    pub fn publisher(&self) -> Option<&Principal> {
        self.publisher.as_ref()
    }

    /// Which delivery this is, from 1.
    pub fn delivery(&self) -> u64 {
        self.delivery
    }

    /// When the broker stored it.
    pub fn published(&self) -> SystemTime {
        self.published
    }
}

/// What the type-erased handler is given.
struct Raw {
    payload: bytes::Bytes,
    subject: Subject,
    event_id: Arc<str>,
    correlation_id: CorrelationId,
    trace: TraceContext,
    publisher: Option<Principal>,
    delivery: u64,
    published: SystemTime,
}

/// How a delivery ended, from the handler's side.
enum Handled {
    Done,
    Malformed(String),
    Failed(HandlerError),
}

type BoxFuture = Pin<Box<dyn Future<Output = Handled> + Send>>;

trait ErasedHandler: Send + Sync + 'static {
    fn call(&self, raw: Raw) -> BoxFuture;
}

struct Typed<T, F> {
    f: F,
    _event: PhantomData<fn() -> T>,
}

impl<T, F, Fut> ErasedHandler for Typed<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(Message<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn call(&self, raw: Raw) -> BoxFuture {
        let event: T = match serde_json::from_slice(&raw.payload) {
            Ok(e) => e,
            Err(e) => {
                let error = e.to_string();
                return Box::pin(async move { Handled::Malformed(error) });
            }
        };
        let fut = (self.f)(Message {
            event,
            subject: raw.subject,
            event_id: raw.event_id,
            correlation_id: raw.correlation_id,
            trace: raw.trace,
            publisher: raw.publisher,
            delivery: raw.delivery,
            published: raw.published,
        });
        Box::pin(async move {
            match fut.await {
                Ok(()) => Handled::Done,
                Err(e) => Handled::Failed(e),
            }
        })
    }
}

/// Builds a [`Consumer`]; see [`Consumer::builder`].
#[must_use = "call `build`"]
pub struct ConsumerBuilder {
    client: async_nats::Client,
    config: MessagingConfig,
    service: String,
    subscription: Subscription,
    verifier: Option<Verifier>,
    auditor: Option<Auditor>,
    handler: Option<Box<dyn ErasedHandler>>,
}

impl fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("service", &self.service)
            .field("subscription", &self.subscription)
            .finish_non_exhaustive()
    }
}

impl ConsumerBuilder {
    /// The verifier of publishers' tokens (required unless the
    /// subscription is public): the service's own, with its leeway.
    pub fn verifier(mut self, verifier: Verifier) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Where the audit events go (default: the log, under the service's
    /// name). Give the service's own [`Auditor`] to share its sink.
    pub fn auditor(mut self, auditor: Auditor) -> Self {
        self.auditor = Some(auditor);
        self
    }

    /// The handler: an async function of a [`Message<T>`], `T` the event's
    /// payload decoded from JSON. It returns `Ok` once its work is
    /// committed (only then is the message acknowledged), or a
    /// [`HandlerError`] saying whether to retry.
    pub fn handler<T, F, Fut>(mut self, f: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Message<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.handler = Some(Box::new(Typed {
            f,
            _event: PhantomData,
        }));
        self
    }

    /// Checks the declarations and builds the consumer; nothing is asked of
    /// the broker until it [runs](Consumer::run).
    ///
    /// # Errors
    ///
    /// [`MessagingError::Declaration`] with every problem at once: a
    /// subscription that declares neither a permission nor `.public()`
    /// (denied by default), an invalid permission or one with a placeholder
    /// other than `{account}`, a permission but no verifier, an invalid
    /// service, publisher, version or event, no handler.
    pub fn build(self) -> Result<Consumer, MessagingError> {
        let sub = &self.subscription;
        let name = format!("{} <- {}", self.service, sub.pattern());
        let mut problems = Vec::new();
        if !is_name(&self.service) {
            problems.push(format!(
                "{name}: `{}` is not a valid service name",
                self.service
            ));
        }
        if !is_name(&sub.publisher) {
            problems.push(format!(
                "{name}: `{}` is not a valid publisher name",
                sub.publisher
            ));
        }
        if sub.version == 0 {
            problems.push(format!("{name}: versions start at 1"));
        }
        let event = match EventName::parse(&sub.event) {
            Ok(e) => Some(e),
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                None
            }
        };
        let access = match &sub.access {
            None => {
                problems.push(format!(
                    "{name}: declares neither a permission (`.requires(..)`) nor `.public()`; subscriptions are denied by default"
                ));
                None
            }
            Some(Err(e)) => {
                problems.push(format!("{name}: {e}"));
                None
            }
            Some(Ok(a)) => Some(a.clone()),
        };
        if let Some(Access::Permission(t)) = &access {
            for p in t.params() {
                if p != "account" {
                    problems.push(format!(
                        "{name}: placeholder `{{{p}}}` of `{t}` is not filled by a subject (only `{{account}}` is)"
                    ));
                }
            }
            if self.verifier.is_none() {
                problems.push(format!(
                    "{name}: requires `{t}` but no token verifier is given (`.verifier(..)`)"
                ));
            }
        }
        if self.handler.is_none() {
            problems.push(format!("{name}: no handler"));
        }
        let (Some(access), Some(event), Some(handler), true) =
            (access, event, self.handler, problems.is_empty())
        else {
            return Err(MessagingError::Declaration(problems));
        };
        let durable = format!(
            "{}-{}-v{}-{}",
            self.service,
            sub.publisher,
            sub.version,
            event.as_str().replace('.', "_")
        );
        let auditor = self
            .auditor
            .unwrap_or_else(|| Auditor::new(&self.service, LogSink, crate::audit::DEFAULT_QUEUE));
        Ok(Consumer {
            inner: Arc::new(Inner {
                js: jetstream::new(self.client.clone()),
                client: self.client,
                stream: stream_name(&sub.publisher),
                dlq_stream: dead_letter_stream_name(&self.service),
                pattern: sub.pattern().into(),
                durable,
                service: self.service,
                config: self.config,
                access,
                verifier: self.verifier,
                auditor,
                handler,
                state: State::default(),
            }),
        })
    }
}

/// A durable consumer of one [`Subscription`]; see the
/// [module docs](super). Cheap to clone.
#[derive(Clone)]
pub struct Consumer {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    dlq_stream: String,
    pattern: Arc<str>,
    durable: String,
    service: String,
    config: MessagingConfig,
    access: Access,
    verifier: Option<Verifier>,
    auditor: Auditor,
    handler: Box<dyn ErasedHandler>,
    state: State,
}

/// What the consume loop and the lag poller tell the readiness check.
#[derive(Default)]
struct State {
    started: AtomicBool,
    lag: AtomicU64,
    /// When the lag was last read from the broker.
    polled: Mutex<Option<Instant>>,
    in_flight: AtomicU64,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("durable", &self.inner.durable)
            .field("pattern", &self.inner.pattern)
            .finish_non_exhaustive()
    }
}

/// The facts of one delivery, gathered as it is decided: what its audit
/// event says.
struct Facts {
    subject: Arc<str>,
    parsed: Option<Subject>,
    event_id: Option<Arc<str>>,
    publisher: Option<Principal>,
    permission: Option<Permission>,
    delivery: u64,
}

/// Why the chassis refused a delivery before any handler ran: it is
/// dead-lettered, never processed.
struct Refusal {
    decision: AuditDecision,
    reason: &'static str,
    error: String,
}

impl Consumer {
    /// A consumer, in `service`, of `subscription`'s messages.
    pub fn builder(
        client: async_nats::Client,
        config: &MessagingConfig,
        service: &str,
        subscription: Subscription,
    ) -> ConsumerBuilder {
        ConsumerBuilder {
            client,
            config: config.clone(),
            service: service.to_owned(),
            subscription,
            verifier: None,
            auditor: None,
            handler: None,
        }
    }

    /// The durable consumer's name:
    /// `<service>-<publisher>-v<N>-<event with _ for .>`, also the `consumer`
    /// label of its metrics.
    pub fn name(&self) -> &str {
        &self.inner.durable
    }

    /// The subject pattern it consumes.
    pub fn pattern(&self) -> &str {
        &self.inner.pattern
    }

    /// Messages waiting or unacknowledged, as last read from the broker.
    pub fn lag(&self) -> Option<u64> {
        self.inner.state.polled.lock().ok()?.as_ref()?;
        Some(self.inner.state.lag.load(Ordering::Relaxed))
    }

    /// Messages being handled right now.
    pub fn in_flight(&self) -> u64 {
        self.inner.state.in_flight.load(Ordering::Relaxed)
    }

    /// The readiness check: down until the consumer has started, while the
    /// broker is unreachable, when the lag has not been read for three
    /// polls, and while the lag is above `CHASSIS_NATS_MAX_LAG`. Register it
    /// with [`ServiceBuilder::health_check`](crate::ServiceBuilder::health_check)
    /// under [`check_name`](Self::check_name).
    pub fn health_check(&self) -> (String, impl Check + use<>, CheckOptions) {
        let poll = self.inner.config.lag_poll;
        (
            self.check_name(),
            Ready(self.inner.clone()),
            CheckOptions::default()
                .interval(poll.min(Duration::from_secs(5)))
                .thresholds(2, 1),
        )
    }

    /// `nats:<consumer name>`.
    pub fn check_name(&self) -> String {
        format!("nats:{}", self.inner.durable)
    }

    /// Runs the consumer until `stop` is cancelled: for
    /// [`ServiceBuilder::background`](crate::ServiceBuilder::background).
    ///
    /// It creates (or updates) its dead-letter stream and its durable
    /// consumer, retrying with backoff while the broker or the publisher's
    /// stream is not there; then fetches and handles messages, at most
    /// `CHASSIS_NATS_MAX_IN_FLIGHT` at once. A failed fetch (a dropped
    /// connection, which the client re-establishes by itself) is retried
    /// with backoff, never in a busy loop. On `stop` it fetches no more and
    /// returns once the messages in hand are handled; a message fetched but
    /// not yet begun is delivered again after the ack wait.
    pub async fn run(self, stop: CancellationToken) {
        let inner = self.inner;
        let mut failures = 0u32;
        let consumer = loop {
            match inner.set_up().await {
                Ok(c) => break c,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(consumer = %inner.durable, error = %e, "consumer not set up; retrying");
                    if sleep_or_stop(&stop, retry_pause(failures)).await {
                        return;
                    }
                }
            }
        };
        inner.state.started.store(true, Ordering::Relaxed);
        tracing::info!(consumer = %inner.durable, pattern = %inner.pattern, "consumer started");
        let poller = tokio::spawn(inner.clone().poll_lag(consumer.clone(), stop.child_token()));
        inner.clone().consume(&consumer, &stop).await;
        poller.abort();
        tracing::info!(consumer = %inner.durable, "consumer stopped");
    }
}

/// Sleeps for `d`, or until `stop`; whether it stopped.
async fn sleep_or_stop(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

/// The pause after `failures` failures in a row: 100 ms doubling to 5 s,
/// with jitter.
fn retry_pause(failures: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << failures.min(6)).min(5_000);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base / 2))
}

/// How long a fetch waits for messages.
const FETCH_EXPIRES: Duration = Duration::from_secs(5);

impl Inner {
    async fn set_up(&self) -> Result<jetstream::consumer::Consumer<pull::Config>, String> {
        self.js
            .create_or_update_stream(stream::Config {
                name: self.dlq_stream.clone(),
                subjects: vec![format!("{}.dlq.>", self.service)],
                storage: stream::StorageType::File,
                duplicate_window: self.config.duplicate_window,
                description: Some(format!("dead letters of {}'s consumers", self.service)),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("dead-letter stream {}: {e}", self.dlq_stream))?;
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| format!("stream {}: {e}", self.stream))?;
        let in_flight = i64::from(self.config.max_in_flight);
        stream
            .create_consumer(pull::Config {
                durable_name: Some(self.durable.clone()),
                description: Some(format!("{} consuming {}", self.service, self.pattern)),
                filter_subject: self.pattern.to_string(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: self.config.ack_wait,
                // The chassis counts deliveries itself, so that the last one
                // is dead-lettered rather than left behind by the broker.
                max_deliver: -1,
                max_ack_pending: in_flight,
                max_batch: i64::from(self.config.batch()),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("consumer {}: {e}", self.durable))
    }

    async fn poll_lag(
        self: Arc<Self>,
        mut consumer: jetstream::consumer::Consumer<pull::Config>,
        stop: CancellationToken,
    ) {
        let gauge = metrics::gauge!(
            "messaging_consumer_lag",
            "service" => crate::metrics::service_label(),
            "consumer" => self.durable.clone(),
        );
        loop {
            match consumer.info().await {
                Ok(info) => {
                    let lag = info.num_pending + info.num_ack_pending as u64;
                    self.state.lag.store(lag, Ordering::Relaxed);
                    gauge.set(lag as f64);
                    if let Ok(mut polled) = self.state.polled.lock() {
                        *polled = Some(Instant::now());
                    }
                }
                Err(e) => {
                    tracing::debug!(consumer = %self.durable, error = %e, "lag not read");
                }
            }
            if sleep_or_stop(&stop, self.config.lag_poll).await {
                return;
            }
        }
    }

    async fn consume(
        self: Arc<Self>,
        consumer: &jetstream::consumer::Consumer<pull::Config>,
        stop: &CancellationToken,
    ) {
        let slots = Arc::new(Semaphore::new(self.config.max_in_flight as usize));
        let batch = self.config.batch() as usize;
        let mut tasks = JoinSet::new();
        let mut failures = 0u32;
        'fetching: loop {
            while tasks.try_join_next().is_some() {}
            let first = tokio::select! {
                () = stop.cancelled() => break,
                permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            };
            let wanted = (1 + slots.available_permits()).min(batch);
            let began = Instant::now();
            let fetched = tokio::select! {
                () = stop.cancelled() => break,
                b = consumer.batch().max_messages(wanted).expires(FETCH_EXPIRES).messages() => b,
            };
            let mut messages = match fetched {
                Ok(m) => m,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(consumer = %self.durable, error = %e, "fetch failed; retrying");
                    drop(first);
                    if sleep_or_stop(stop, retry_pause(failures)).await {
                        break;
                    }
                    continue;
                }
            };
            let mut permit = Some(first);
            let mut got = 0usize;
            let mut error = None;
            loop {
                let next = tokio::select! {
                    () = stop.cancelled() => break 'fetching,
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => {
                        got += 1;
                        let slot = match permit.take() {
                            Some(p) => p,
                            None => slots
                                .clone()
                                .acquire_owned()
                                .await
                                .expect("the semaphore is never closed"),
                        };
                        let me = self.clone();
                        tasks.spawn(async move {
                            me.deliver(message).await;
                            drop(slot);
                        });
                    }
                    Some(Err(e)) => {
                        error = Some(e.to_string());
                        break;
                    }
                    None => break,
                }
            }
            // A fetch that failed, or that ended empty well before its
            // expiry (the broker answering at once without messages), is
            // a failure: pause before the next, so nothing spins.
            let early = got == 0 && began.elapsed() < FETCH_EXPIRES / 2;
            if error.is_some() || early {
                failures += 1;
                if let Some(e) = error {
                    tracing::warn!(consumer = %self.durable, error = %e, "fetch failed; retrying");
                }
                if sleep_or_stop(stop, retry_pause(failures)).await {
                    break;
                }
            } else {
                failures = 0;
            }
        }
        // Finish the messages in hand.
        while tasks.join_next().await.is_some() {}
    }

    /// Decides about one delivery, runs the handler when allowed, and
    /// acknowledges, hands back or dead-letters it; records its audit event.
    async fn deliver(self: Arc<Self>, message: jetstream::Message) {
        let started = Instant::now();
        self.state.in_flight.fetch_add(1, Ordering::Relaxed);
        let in_flight = metrics::gauge!(
            "messaging_handlers_in_flight",
            "service" => crate::metrics::service_label(),
            "consumer" => self.durable.clone(),
        );
        in_flight.increment(1.0);
        let (delivery, published, stream_sequence) = match message.info() {
            Ok(info) => (
                u64::try_from(info.delivered).unwrap_or(1).max(1),
                info.published,
                info.stream_sequence,
            ),
            Err(e) => {
                // Not a JetStream delivery: nothing to acknowledge.
                tracing::warn!(consumer = %self.durable, error = %e, "message without delivery info ignored");
                self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
                in_flight.decrement(1.0);
                return;
            }
        };
        let published_secs = u64::try_from(published.unix_timestamp()).unwrap_or(0);
        let published_at = SystemTime::UNIX_EPOCH + Duration::from_secs(published_secs);
        let empty = async_nats::HeaderMap::new();
        let h = message.headers.as_ref().unwrap_or(&empty);
        let correlation_id = headers::single(h, headers::X_CORRELATION_ID)
            .and_then(CorrelationId::parse)
            .unwrap_or_else(CorrelationId::generate);
        let parent = headers::single(h, headers::TRACEPARENT)
            .and_then(|p| {
                TraceContext::from_traceparent(p, headers::single(h, headers::TRACESTATE))
            })
            .unwrap_or_else(TraceContext::new_root);
        let subject_text: Arc<str> = message.subject.as_str().into();
        let mut span = Span::consumer(&parent, format!("process {}", self.pattern));
        span.set_attribute("messaging.system", "nats");
        span.set_attribute("messaging.operation.type", "process");
        span.set_attribute("messaging.destination.name", subject_text.to_string());
        span.set_attribute("messaging.consumer.group.name", self.durable.clone());
        span.set_attribute("messaging.message.delivery_count", delivery as i64);
        let (trace_id, span_id) = (span.trace().trace_id(), span.trace().span_id());
        let log = tracing::info_span!(
            target: crate::telemetry::REQUEST_TARGET,
            "message",
            correlation_id = %correlation_id,
            trace_id = trace_id.as_str(),
            span_id = span_id.as_str(),
            consumer = %self.durable,
            subject = &*subject_text,
            delivery,
        );
        let mut facts = Facts {
            subject: subject_text,
            parsed: None,
            event_id: None,
            publisher: None,
            permission: None,
            delivery,
        };
        let outcome = async {
            let decided = self.decide(h, published_secs, &mut facts).await;
            let (decision, reason, outcome) = match decided {
                Err(Refusal {
                    decision,
                    reason,
                    error,
                }) => {
                    tracing::warn!(reason, %error, "message refused");
                    let outcome = self
                        .dead_letter(&message, &facts, reason, &error, stream_sequence)
                        .await;
                    (decision, Some(reason), outcome)
                }
                Ok(subject) => {
                    let raw = Raw {
                        payload: message.payload.clone(),
                        subject,
                        event_id: facts.event_id.clone().unwrap_or_else(|| "".into()),
                        correlation_id: correlation_id.clone(),
                        trace: span.trace().clone(),
                        publisher: facts.publisher.clone(),
                        delivery,
                        published: published_at,
                    };
                    let public = matches!(self.access, Access::Public).then_some("public");
                    let handled = AssertUnwindSafe(self.handler.call(raw))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| {
                            Handled::Failed(HandlerError::retry("panic", "the handler panicked"))
                        });
                    match handled {
                        Handled::Done => {
                            if let Err(e) = message.double_ack().await {
                                // The work is committed; the broker will
                                // deliver it again, and the handler's
                                // dedup by event id absorbs it.
                                tracing::warn!(error = %e, "acknowledgement not confirmed");
                            }
                            tracing::info!("message processed");
                            (AuditDecision::Allow, public, MessageOutcome::Processed)
                        }
                        Handled::Malformed(error) => {
                            tracing::warn!(%error, "message payload refused");
                            let reason = "malformed_payload";
                            let outcome = self
                                .dead_letter(&message, &facts, reason, &error, stream_sequence)
                                .await;
                            (AuditDecision::Rejected, Some(reason), outcome)
                        }
                        Handled::Failed(e) => {
                            span.set_error(e.reason);
                            let last = delivery >= u64::from(self.config.max_deliver);
                            if e.retry && !last {
                                let wait = self.config.backoff_after(delivery);
                                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "message handling failed; retrying later");
                                self.hand_back(&message, wait).await;
                                (AuditDecision::Allow, Some(e.reason), MessageOutcome::Retry)
                            } else {
                                tracing::error!(error = %e, "message handling failed; dead-lettering it");
                                let outcome = self
                                    .dead_letter(&message, &facts, e.reason, &e.error, stream_sequence)
                                    .await;
                                (AuditDecision::Allow, Some(e.reason), outcome)
                            }
                        }
                    }
                }
            };
            if outcome == MessageOutcome::DeadLettered {
                span.set_error(reason.unwrap_or("dead_lettered"));
            }
            (decision, reason, outcome)
        }
        .instrument(log)
        .await;
        let (decision, reason, outcome) = outcome;
        metrics::counter!(
            "messaging_consumed_total",
            "service" => crate::metrics::service_label(),
            "consumer" => self.durable.clone(),
            "outcome" => outcome.as_str(),
        )
        .increment(1);
        let (subject, subject_kind) = match &facts.publisher {
            Some(p) => (p.subject_arc(), p.kind().as_str()),
            None => (Arc::from("anonymous"), "anonymous"),
        };
        self.auditor.record(AuditEvent {
            time: SystemTime::now(),
            service: self.auditor.service().clone(),
            correlation_id: Some(correlation_id),
            trace_id: Some(trace_id),
            span_id: Some(span_id),
            subject,
            subject_kind,
            method: Method::from_bytes(b"MESSAGE").expect("a valid method token"),
            route: AuditRoute::Shared(self.pattern.clone()),
            api_version: None,
            account: facts.parsed.as_ref().map(|s| s.account().clone()),
            permission: facts.permission,
            decision,
            reason,
            status: 0,
            latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            mutation: false,
            message: Some(AuditMessage {
                subject: facts.subject,
                event_id: facts.event_id,
                delivery,
                outcome,
            }),
        });
        drop(span);
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        in_flight.decrement(1.0);
    }

    /// The chassis' decision: a valid subject, an event id, the publisher's
    /// token as of the broker's timestamp, its permission, and a delivery
    /// count within bounds.
    async fn decide(
        &self,
        h: &async_nats::HeaderMap,
        published: u64,
        facts: &mut Facts,
    ) -> Result<Subject, Refusal> {
        let refuse = |decision, reason: &'static str, error: String| Refusal {
            decision,
            reason,
            error,
        };
        let subject = Subject::parse(&facts.subject)
            .map_err(|e| refuse(AuditDecision::Rejected, "invalid_subject", e.to_string()))?;
        facts.parsed = Some(subject.clone());
        match headers::single(h, headers::NATS_MSG_ID) {
            Some(id) if is_event_id(id) => facts.event_id = Some(id.into()),
            Some(_) => {
                return Err(refuse(
                    AuditDecision::Rejected,
                    "invalid_event_id",
                    "Nats-Msg-Id is not 1-128 characters of [A-Za-z0-9._~:-]".to_owned(),
                ));
            }
            None => {
                return Err(refuse(
                    AuditDecision::Rejected,
                    "missing_event_id",
                    "no single Nats-Msg-Id header".to_owned(),
                ));
            }
        }
        if let Some(ct) = headers::single(h, headers::CONTENT_TYPE) {
            let media = ct.split(';').next().unwrap_or_default().trim();
            if !media.eq_ignore_ascii_case(headers::JSON) {
                return Err(refuse(
                    AuditDecision::Rejected,
                    "unsupported_content_type",
                    format!(
                        "content-type `{}` is not {}",
                        headers::header_safe(media),
                        headers::JSON
                    ),
                ));
            }
        }
        if let Access::Permission(template) = &self.access {
            let verifier = self
                .verifier
                .as_ref()
                .expect("build() requires a verifier with a permission");
            let principal = verifier
                .verify_at(&headers::authorization(h), published)
                .await
                .map_err(|e| {
                    let reason = e.reason().code();
                    refuse(
                        AuditDecision::Unauthenticated,
                        reason,
                        format!("token refused: {reason}"),
                    )
                })?;
            facts.publisher = Some(principal.clone());
            let account = subject.account().as_str();
            let (permission, _) = template
                .fill(|name| (name == "account").then_some(account))
                .map_err(|p| {
                    refuse(
                        AuditDecision::Rejected,
                        "invalid_subject",
                        format!("`{p}` cannot be filled from the subject"),
                    )
                })?;
            facts.permission = Some(permission.clone());
            if !principal.grants().decide(&permission).is_allowed() {
                return Err(refuse(
                    AuditDecision::Deny,
                    "forbidden",
                    format!("the publisher lacks {permission}"),
                ));
            }
        }
        // Deliveries past the bound are those whose handler never reported
        // (a crash during each): they are given up without running it again.
        if facts.delivery > u64::from(self.config.max_deliver) {
            return Err(refuse(
                AuditDecision::Rejected,
                "max_deliver_exceeded",
                format!("delivered {} times without an outcome", facts.delivery),
            ));
        }
        Ok(subject)
    }

    /// Hands the message back for a delivery after `wait`.
    async fn hand_back(&self, message: &jetstream::Message, wait: Duration) {
        if let Err(e) = message.ack_with(AckKind::Nak(Some(wait))).await {
            tracing::warn!(error = %e, "message not handed back; it returns after the ack wait");
        }
    }

    /// Publishes the message to the dead-letter subject with its reason and
    /// last error, then terminates it; when the dead letter cannot be
    /// stored, hands the message back instead (nothing is lost).
    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        facts: &Facts,
        reason: &'static str,
        error: &str,
        stream_sequence: u64,
    ) -> MessageOutcome {
        let mut h = async_nats::HeaderMap::new();
        if let Some(original) = &message.headers {
            for (name, values) in original.iter() {
                let n: &str = name.as_ref();
                // The publisher's credential is not kept at rest a second
                // time; who it was is in `x-dlq-publisher`.
                if n.eq_ignore_ascii_case(headers::AUTHORIZATION)
                    || n.eq_ignore_ascii_case(headers::NATS_MSG_ID)
                {
                    continue;
                }
                for v in values {
                    h.append(n, v.clone());
                }
            }
        }
        h.insert(headers::DLQ_REASON, reason);
        h.insert(headers::DLQ_ERROR, headers::header_safe(error));
        h.insert(headers::DLQ_SUBJECT, headers::header_safe(&facts.subject));
        h.insert(headers::DLQ_STREAM, self.stream.as_str());
        h.insert(headers::DLQ_SEQUENCE, stream_sequence.to_string());
        h.insert(headers::DLQ_DELIVERIES, facts.delivery.to_string());
        h.insert(headers::DLQ_CONSUMER, self.durable.as_str());
        if let Some(p) = &facts.publisher {
            h.insert(headers::DLQ_PUBLISHER, headers::header_safe(p.subject()));
        }
        if let Some(id) = &facts.event_id {
            h.insert(headers::DLQ_EVENT_ID, &**id);
        }
        // One dead letter per delivery of the source stream, however often
        // this is retried.
        h.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("{}:{}", self.stream, stream_sequence),
        );
        let subject = dead_letter_subject(&self.service, &facts.subject);
        let stored = match self
            .js
            .publish_with_headers(subject, h, message.payload.clone())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match stored {
            Ok(()) => {
                if let Err(e) = message.double_ack_with(AckKind::Term).await {
                    tracing::warn!(error = %e, "dead-lettered message not terminated; its copy is deduplicated if it returns");
                }
                metrics::counter!(
                    "messaging_dead_lettered_total",
                    "service" => crate::metrics::service_label(),
                    "consumer" => self.durable.clone(),
                    "reason" => reason,
                )
                .increment(1);
                MessageOutcome::DeadLettered
            }
            Err(e) => {
                tracing::error!(error = %e, "dead letter not stored; the message is handed back");
                self.hand_back(message, self.config.backoff_after(facts.delivery))
                    .await;
                MessageOutcome::Retry
            }
        }
    }
}

/// The readiness check of a consumer.
struct Ready(Arc<Inner>);

impl Check for Ready {
    async fn check(&self) -> Result<(), CheckError> {
        let inner = &self.0;
        if inner.client.connection_state() != async_nats::connection::State::Connected {
            return Err(CheckError::new("broker unreachable"));
        }
        if !inner.state.started.load(Ordering::Relaxed) {
            return Err(CheckError::new(format!(
                "consumer not set up yet (stream {})",
                inner.stream
            )));
        }
        let polled = inner.state.polled.lock().ok().and_then(|p| *p);
        let fresh = inner.config.lag_poll * 3 + Duration::from_secs(5);
        match polled {
            Some(at) if at.elapsed() <= fresh => {}
            _ => {
                return Err(CheckError::new(
                    "consumer lag unknown (broker not answering)",
                ));
            }
        }
        let lag = inner.state.lag.load(Ordering::Relaxed);
        if lag > inner.config.max_lag {
            return Err(CheckError::new(format!(
                "lag {lag} above {}",
                inner.config.max_lag
            )));
        }
        Ok(())
    }
}
